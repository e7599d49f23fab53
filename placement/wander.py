"""How served step times wander around the latency model, fitted from step traces and drawn in
the simulator.

On a shared CPU the steps a replica runs while serving scatter 15-25% (RMS) around any fit of
their batch, and not at random: slow steps come in runs that last seconds (the ingress, the
proxy and the load generator take their share of the cores in bursts; whatever else the
machine runs). A request's TPOT averages its ~60 decode steps: independent scatter averages
out of it, a slow few seconds does not, and that is what puts a request over a TPOT target
close to the mean step. A simulator that times every step by the model's mean misses it.
The machine's pace also differs from one run to the next (a lone batch-1 decode step took
43-57 ms from one rate point to the next in one interleaved experiment, 45-79 ms in another):
a forecast of a run not yet made must allow for that too.

Model: log(step / model) = x(t) + z(t) + e. x is each instance's own Ornstein-Uhlenbeck process
(stationary standard deviation `sd`, correlation time `tau_ms`: its stretches of a second or
so); z is one such process for the whole machine (`drift_sd`, `drift_tau_ms`: the minutes over
which the shared machine runs faster or slower, which every instance feels at once); e is
independent per step (`white_sd`); r is one constant per run, shared by every instance
(`run_sd`: the machine's pace that run; drawn only where a spread of runs is asked for, a
forecast runs at the typical pace). The factor is normalised to mean 1, so the model keeps
its mean step time (placement/step_traces.py fits the model to the traced mean). `fit_wander`
estimates the first five numbers from the autocovariance of traced log residuals over time
lags within runs, `fit_run_sd` the last from how the runs' mean residuals differ beyond what
the within-run processes explain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

# lag bins (ms) of the autocovariance the model is fitted to: a request's decode lasts seconds,
# a sweep's rate point minutes, so lags from one step to minutes matter
LAG_BINS_MS = ((0, 100), (100, 300), (300, 600), (600, 1200), (1200, 2500), (2500, 5000),
               (5000, 10000), (10000, 20000), (20000, 40000), (40000, 80000), (80000, 160000),
               (160000, 320000))  # fmt: skip
TAU_GRID_MS = np.geomspace(50.0, 20_000.0, 60)  # the instance's own stretches
DRIFT_TAU_GRID_MS = np.geomspace(20_000.0, 1_200_000.0, 30)  # the machine's drift
DRAWS = 16  # simulations averaged per rate when steps wander, at most
DRAW_REQUESTS = 1024  # simulated requests per rate that are enough
BAND_DRAWS = 64  # simulated runs behind an attainment band (the spread of runs, not a mean)


@dataclass(frozen=True)
class StepWander:
    sd: float  # standard deviation of the instance's slow log factor x
    tau_ms: float  # its correlation time
    white_sd: float  # standard deviation of the per-step log factor e
    drift_sd: float = 0.0  # standard deviation of the machine's log factor z (all instances)
    drift_tau_ms: float = 600_000.0  # its correlation time
    run_sd: float = 0.0  # standard deviation of the machine's log pace from run to run

    def __post_init__(self) -> None:
        if (
            min(self.sd, self.white_sd, self.drift_sd, self.run_sd) < 0
            or min(self.tau_ms, self.drift_tau_ms) <= 0
        ):
            raise ValueError(f"step wander needs sds >= 0 and correlation times > 0, got {self}")

    def draw(self, seed: int, pace: bool = False) -> WanderDraw:
        """One realisation; with `pace` also this run's own machine pace (run_sd), else the
        typical pace: a forecast of a run is made at the typical pace, the spread of what
        runs may measure with each its own."""
        return WanderDraw(self, seed, pace)


class WanderDraw:
    """One realisation: every instance (`owner`) follows its own x(t), all of them the node's
    z(t), both drawn lazily at the start times of steps (exact OU transitions, so the step
    times need no grid). Work an owner starts at one instant (a pipeline's stage and its whole
    batch) shares one factor."""

    def __init__(self, wander: StepWander, seed: int, pace: bool = False) -> None:
        self.wander = wander
        self.rng = np.random.default_rng(seed)
        self.state: dict[int, tuple[float, float, float]] = {}  # id(owner) -> (x, t_ms, factor)
        self.drift = (wander.drift_sd * self.rng.standard_normal(), 0.0)  # (z, t_ms)
        total = wander.sd**2 + wander.white_sd**2 + wander.drift_sd**2
        self.shift = -total / 2  # E[exp(x + z + e + shift)] = 1
        if pace and wander.run_sd > 0:  # this run's pace r joins the constant, E[exp(r)] = 1
            self.shift += wander.run_sd * self.rng.standard_normal() - wander.run_sd**2 / 2

    def _ou(self, value: float, sd: float, tau_ms: float, dt_ms: float) -> float:
        keep = math.exp(-max(dt_ms, 0.0) / tau_ms)
        return value * keep + sd * math.sqrt(1.0 - keep * keep) * self.rng.standard_normal()

    def factor(self, owner: object, t_ms: float) -> float:
        w = self.wander
        previous = self.state.get(id(owner))
        if previous is not None and previous[1] == t_ms:
            return previous[2]
        if previous is None:
            x = w.sd * self.rng.standard_normal()
        else:
            x = self._ou(previous[0], w.sd, w.tau_ms, t_ms - previous[1])
        z0, t0 = self.drift
        if t_ms > t0:
            self.drift = (self._ou(z0, w.drift_sd, w.drift_tau_ms, t_ms - t0), t_ms)
        e = w.white_sd * self.rng.standard_normal()
        factor = math.exp(x + self.drift[0] + e + self.shift)
        self.state[id(owner)] = (x, t_ms, factor)
        return factor


def autocovariance(series: list[np.ndarray]) -> tuple[float, np.ndarray]:
    """series: per instance, (N, 2) rows of (step start ms, log residual), time-ordered.
    -> (variance, autocovariance per LAG_BINS_MS bin), each series about its own mean, pooled
    over instances (pairs are only formed within one instance)."""
    centred = [(s[:, 0], s[:, 1] - s[:, 1].mean()) for s in series if len(s) > 1]
    if not centred:
        raise ValueError("autocovariance needs a series of two or more steps")
    var = float(np.mean(np.concatenate([y for _, y in centred]) ** 2))
    cov = []
    for lo, hi in LAG_BINS_MS:
        total = count = 0.0
        for t, y in centred:
            sums = np.concatenate([[0.0], np.cumsum(y)])
            first = np.searchsorted(t, t + lo, side="right")
            last = np.searchsorted(t, t + hi, side="right")
            total += float(y @ (sums[last] - sums[first]))
            count += float((last - first).sum())
        cov.append(total / count if count else np.nan)
    return var, np.array(cov)


def fit_wander(series: list[np.ndarray]) -> StepWander:
    """The StepWander whose autocovariance, sd^2 exp(-lag / tau) + drift_sd^2 exp(-lag /
    drift_tau), fits the traced one best (least squares over the lag bins that hold pairs,
    variances >= 0); the rest of the variance is per-step."""
    var, cov = autocovariance(series)
    lags = np.array([(lo + hi) / 2 for lo, hi in LAG_BINS_MS], dtype=float)
    keep = np.isfinite(cov)
    lags, cov = lags[keep], cov[keep]
    best: tuple[float, float, float, float, float] | None = None
    for tau in TAU_GRID_MS:
        for drift_tau in DRIFT_TAU_GRID_MS:
            shapes = np.column_stack([np.exp(-lags / tau), np.exp(-lags / drift_tau)])
            v = _nonnegative_lstsq(shapes, cov)
            err = float(((cov - shapes @ v) ** 2).sum())
            if best is None or err < best[0]:
                best = (err, float(tau), float(drift_tau), float(v[0]), float(v[1]))
    assert best is not None
    _, tau, drift_tau, slow, drift = best
    scale = min(1.0, var / (slow + drift)) if slow + drift > 0 else 0.0  # no more than all of it
    slow, drift = slow * scale, drift * scale
    white = math.sqrt(max(var - slow - drift, 0.0))
    return StepWander(math.sqrt(slow), tau, white, math.sqrt(drift), drift_tau)


def mean_variance(wander: StepWander, duration_ms: float, steps: int) -> float:
    """Variance of the mean log residual of `steps` steps spread over `duration_ms` under the
    within-run processes: an OU process of sd s and time tau averaged over T has variance
    s^2 * 2 (x - 1 + e^-x) / x^2 with x = T / tau; per-step scatter averages as 1 / steps."""

    def averaged(sd: float, tau_ms: float) -> float:
        x = max(duration_ms, 1e-9) / tau_ms
        return sd**2 * (2 * (x - 1 + math.exp(-x)) / x**2 if x > 1e-6 else 1.0)

    return (
        averaged(wander.sd, wander.tau_ms)
        + averaged(wander.drift_sd, wander.drift_tau_ms)
        + wander.white_sd**2 / max(steps, 1)
    )


def fit_run_sd(runs: list[np.ndarray], wander: StepWander) -> float:
    """The run-to-run sd of the machine's log pace. runs: per run, (N, 2) rows of (step start
    ms, log residual) of all its instances. The spread of the runs' mean residuals, less what
    the within-run processes of `wander` give a mean of that many steps over that long by
    themselves; 0 with fewer than two runs."""
    runs = [r for r in runs if len(r) > 1]
    if len(runs) < 2:
        return 0.0
    means = np.array([r[:, 1].mean() for r in runs])
    within = np.mean([mean_variance(wander, float(np.ptp(r[:, 0])), len(r)) for r in runs])
    return math.sqrt(max(float(np.var(means, ddof=1)) - float(within), 0.0))


def _nonnegative_lstsq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Least squares over two columns with both coefficients >= 0 (a negative one is dropped
    and the other refitted)."""
    if len(b) == 0:
        return np.zeros(a.shape[1])
    v, *_ = np.linalg.lstsq(a, b, rcond=None)
    if (v >= 0).all():
        return v
    out = np.zeros(a.shape[1])
    for k in range(a.shape[1]):
        col = a[:, k]
        single = max(float(col @ b / (col @ col)), 0.0)
        if ((b - single * col) ** 2).sum() < ((b - a @ out) ** 2).sum():
            out = np.zeros(a.shape[1])
            out[k] = single
    return out
