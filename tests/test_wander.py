"""Step wander (placement/wander.py): the fit recovers a known process, a draw has the asked
mean, spread and correlation, and in the simulator slow stretches, not per-step scatter, are
what spread a request's TPOT."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from placement.latency_model import Coefficients, Entry, Profile
from placement.simulator import SLO as SimSLO
from placement.simulator import InstanceSpec, Placement, attainment_band, simulate, simulate_draws
from placement.wander import StepWander, fit_run_sd, fit_wander, mean_variance
from placement.workload import SimRequest

pytestmark = pytest.mark.unit


def ou(sd: float, tau_ms: float, n: int, every_ms: float, rng) -> np.ndarray:
    keep = math.exp(-every_ms / tau_ms)
    x = np.empty(n)
    x[0] = sd * rng.standard_normal()
    for i in range(1, n):
        x[i] = x[i - 1] * keep + sd * math.sqrt(1 - keep**2) * rng.standard_normal()
    return x


def ou_series(wander: StepWander, n: int, every_ms: float, seed: int) -> np.ndarray:
    """(n, 2): step start times and log factors of exact OU processes plus white noise."""
    rng = np.random.default_rng(seed)
    x = ou(wander.sd, wander.tau_ms, n, every_ms, rng)
    z = ou(wander.drift_sd, wander.drift_tau_ms, n, every_ms, rng)
    t = np.arange(n) * every_ms
    return np.column_stack([t, x + z + wander.white_sd * rng.standard_normal(n)])


def test_fit_recovers_the_slow_part_its_correlation_time_and_the_per_step_part():
    truth = StepWander(sd=0.15, tau_ms=2000.0, white_sd=0.1)
    series = [ou_series(truth, 8000, 50.0, seed) for seed in range(4)]  # 4 x 400 s
    got = fit_wander(series)
    assert got.sd == pytest.approx(truth.sd, rel=0.15)
    assert got.white_sd == pytest.approx(truth.white_sd, rel=0.15)
    assert got.tau_ms == pytest.approx(truth.tau_ms, rel=0.4)
    assert got.drift_sd < 0.05  # none in the data
    # pure per-step scatter: nothing slow
    white = fit_wander([ou_series(StepWander(0.0, 1000.0, 0.2), 8000, 50.0, 9)])
    assert max(white.sd, white.drift_sd) < 0.03
    assert white.white_sd == pytest.approx(0.2, rel=0.05)


def test_fit_separates_seconds_long_stretches_from_a_drift_over_minutes():
    truth = StepWander(0.15, 2000.0, 0.1, drift_sd=0.1, drift_tau_ms=60_000.0)
    got = fit_wander([ou_series(truth, 12_000, 200.0, seed) for seed in range(6)])  # 6 x 40 min
    assert got.sd == pytest.approx(truth.sd, rel=0.2)
    assert got.tau_ms == pytest.approx(truth.tau_ms, rel=0.5)
    assert got.drift_sd == pytest.approx(truth.drift_sd, rel=0.35)
    assert 20_000 <= got.drift_tau_ms <= 200_000
    assert got.white_sd == pytest.approx(truth.white_sd, rel=0.2)


def test_a_draw_has_mean_one_the_asked_spread_and_correlation_and_is_repeatable():
    wander = StepWander(sd=0.2, tau_ms=1000.0, white_sd=0.1, drift_sd=0.1, drift_tau_ms=20_000)
    a, b = object(), object()
    draw = wander.draw(seed=3)
    t = np.arange(20_000) * 100.0
    fa, fb = np.empty(len(t)), np.empty(len(t))
    for i, x in enumerate(t):
        fa[i], fb[i] = draw.factor(a, x), draw.factor(b, x)
    assert fa.mean() == pytest.approx(1.0, abs=0.03)  # the model keeps its mean step
    assert np.log(fa).std() == pytest.approx(math.sqrt(0.04 + 0.01 + 0.01), rel=0.08)
    la, lb = np.log(fa) - np.log(fa).mean(), np.log(fb) - np.log(fb).mean()
    lag5 = (la[:-5] * la[5:]).mean()  # 500 ms apart: both slow parts, not the per-step one
    assert lag5 == pytest.approx(0.04 * math.exp(-0.5) + 0.01 * math.exp(-0.025), rel=0.2)
    assert (la * lb).mean() == pytest.approx(0.01, rel=0.4)  # instances share only the drift
    assert draw.factor(a, t[-1]) == fa[-1]  # work started at one instant shares its factor
    again = wander.draw(seed=3)  # the same seed and calls: the same factors
    assert [(again.factor(a, x), again.factor(b, x)) for x in t[:50]] == list(
        zip(fa[:50], fb[:50], strict=True)
    )
    with pytest.raises(ValueError, match="correlation times > 0"):
        StepWander(0.1, 0.0, 0.1)


def one_decoder(wander: StepWander | None) -> Placement:
    entry = Entry(1, 1, Coefficients(0.0, 0.01, 0.0), Coefficients(50.0, 0.0, 0.0), 100_000)
    return Placement(prefill=InstanceSpec(entry), decode=InstanceSpec(entry), wander=wander)


def test_slow_stretches_spread_tpot_and_per_step_scatter_averages_out():
    request = [SimRequest(0.0, 100, 65)]  # 64 decode steps of 50 ms on average
    for wander, spread in ((StepWander(0.2, 1e9, 0.0), 0.2), (StepWander(0.0, 1.0, 0.2), 0.025)):
        tpots = np.array([r.tpot_ms for r in simulate_draws(one_decoder(wander), request, 0, 400)])
        assert len(tpots) == 400
        assert tpots.mean() == pytest.approx(50.0, rel=0.03)
        assert np.log(tpots).std() == pytest.approx(spread, rel=0.25)
    # without wander one run is all there is, whatever the seed
    assert simulate_draws(one_decoder(None), request, 0, 400) == simulate(
        one_decoder(None), request
    )
    runs = [simulate(one_decoder(StepWander(0.2, 100.0, 0.1)), request, s) for s in (1, 1, 2)]
    assert runs[0] == runs[1] != runs[2]


def test_profiles_carry_the_wander_and_leave_it_out_when_absent(tmp_path):
    entry = Entry(1, 1, Coefficients(1, 1, 0), Coefficients(1, 0, 1), 100)
    plain = Profile("m", "cpu", [entry], 0.1)
    assert "step_wander" not in plain.to_yaml()
    wander = StepWander(0.15, 4000.0, 0.16, run_sd=0.08)
    served = Profile("m", "cpu (served)", [entry], 0.1, wander)
    served.save(tmp_path / "p.yaml")
    assert Profile.load(tmp_path / "p.yaml") == served
    assert "tau_ms: 4000.0" in (tmp_path / "p.yaml").read_text()
    # a profile written before the run-to-run part reads with none
    older = (tmp_path / "p.yaml").read_text().replace("  run_sd: 0.08\n", "")
    (tmp_path / "old.yaml").write_text(older)
    assert Profile.load(tmp_path / "old.yaml").step_wander.run_sd == 0.0
    with pytest.raises(ValueError, match="sds >= 0"):
        Profile.from_dict({**served.__dict__, "entries": [], "step_wander": {"sd": -1,
                           "tau_ms": 1.0, "white_sd": 0.0}})  # fmt: skip


def test_the_variance_of_a_run_mean_has_its_closed_form():
    """mean_variance against the spread of the means of many simulated runs."""
    truth = StepWander(0.15, 2000.0, 0.1, drift_sd=0.1, drift_tau_ms=30_000.0)
    n, every = 400, 50.0  # 20 s runs
    means = [ou_series(truth, n, every, seed)[:, 1].mean() for seed in range(1500)]
    want = mean_variance(truth, (n - 1) * every, n)
    assert np.var(means) == pytest.approx(want, rel=0.12)
    # a run much shorter than every correlation time keeps all the slow variance
    assert mean_variance(truth, 1.0, 10**9) == pytest.approx(0.15**2 + 0.1**2, rel=1e-3)


def test_run_to_run_pace_is_recovered_beyond_what_the_within_run_wander_explains():
    truth = StepWander(0.15, 2000.0, 0.1, drift_sd=0.05, drift_tau_ms=30_000.0)
    rng = np.random.default_rng(4)
    paced = []
    for seed in range(40):  # 40 runs of 60 s, each on the machine at its own pace
        s = ou_series(truth, 1200, 50.0, seed)
        paced.append(np.column_stack([s[:, 0], s[:, 1] + 0.12 * rng.standard_normal()]))
    assert fit_run_sd(paced, truth) == pytest.approx(0.12, rel=0.3)
    steady = [ou_series(truth, 1200, 50.0, seed) for seed in range(40)]  # one pace
    assert fit_run_sd(steady, truth) < 0.06  # sampling noise of 40 runs' means
    assert fit_run_sd(paced[:1], truth) == 0.0  # one run says nothing about the next


def test_a_draw_s_run_pace_is_shared_by_every_instance_and_keeps_the_mean():
    wander = StepWander(sd=0.0, tau_ms=1000.0, white_sd=0.0, run_sd=0.2)
    a, b = object(), object()
    assert wander.draw(7).factor(a, 0.0) == 1.0  # a forecast runs at the typical pace
    paces = []
    for seed in range(2000):
        draw = wander.draw(seed, pace=True)
        fa = draw.factor(a, 0.0)
        assert draw.factor(b, 5000.0) == pytest.approx(fa)  # one pace for the whole run
        paces.append(fa)
    assert np.mean(paces) == pytest.approx(1.0, abs=0.03)
    assert np.log(paces).std() == pytest.approx(0.2, rel=0.08)
    with pytest.raises(ValueError, match="sds >= 0"):
        StepWander(0.1, 100.0, 0.1, run_sd=-0.1)


def test_the_attainment_band_of_single_runs_widens_with_the_machine_s_pace():
    """40 lone requests, each 64 decode steps of 50 ms on average, against a 55 ms TPOT: the
    share that meets it varies from run to run with the wander, more with run-to-run pace
    (a slow run fails nearly all); without wander the band is the one run's value."""
    requests = [SimRequest(10_000.0 * k, 100, 65) for k in range(40)]  # never overlapping
    slo = SimSLO(1e9, 55.0)
    steady = attainment_band(one_decoder(None), requests, slo)
    assert steady == (1.0, 1.0)
    wander = StepWander(0.1, 1000.0, 0.05)
    low, high = attainment_band(one_decoder(wander), requests, slo)
    assert 0.0 < low < high <= 1.0
    paced_low, paced_high = attainment_band(one_decoder(replace(wander, run_sd=0.2)), requests, slo)
    assert paced_high - paced_low > high - low
    assert paced_low < 0.2  # the slowest runs at 5%: most requests over 55 ms
