"""Goodput metrics from per-request records. Pure: no I/O, no clock.

TTFT = first token - arrival; TPOT = (last token - first token) / (output tokens - 1);
a request attains the SLO only if it meets both targets (failed requests never do).
Goodput = the highest rate whose attainment is >= the target share, interpolated linearly
between the last rate that passes and the first that fails. The SLO-scale search finds the
tightest multiple of the SLO that a run still meets: thresholds change, the run does not.
A bootstrap over each rate's requests gives the goodput's sampling interval: how far a
crossing measured with a few dozen requests per rate can move by chance alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class RequestRecord:
    arrival_s: float
    first_token_s: float | None
    last_token_s: float | None
    num_output_tokens: int
    num_prompt_tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.first_token_s is not None

    @property
    def ttft_s(self) -> float:
        return self.first_token_s - self.arrival_s if self.ok else math.inf

    @property
    def tpot_s(self) -> float:
        if not self.ok:
            return math.inf
        if self.num_output_tokens <= 1:
            return 0.0
        return (self.last_token_s - self.first_token_s) / (self.num_output_tokens - 1)

    @property
    def e2e_s(self) -> float:
        return self.last_token_s - self.arrival_s if self.ok else math.inf


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float

    def scaled(self, scale: float) -> SLO:
        return SLO(self.ttft_s * scale, self.tpot_s * scale)

    def scaled_each(self, ttft_scale: float, tpot_scale: float) -> SLO:
        return SLO(self.ttft_s * ttft_scale, self.tpot_s * tpot_scale)


def attainment(records: list[RequestRecord], slo: SLO) -> float:
    if not records:
        return 0.0
    return sum(r.ttft_s <= slo.ttft_s and r.tpot_s <= slo.tpot_s for r in records) / len(records)


def percentiles(values: list[float], qs=(50, 90, 99)) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {f"p{q}": math.inf for q in qs}
    return {f"p{q}": float(np.percentile(finite, q)) for q in qs}


def summarize(
    records: list[RequestRecord], slo: SLO, duration_s: float, target: float = 0.9
) -> dict:
    return {
        "requests": len(records),
        "errors": sum(not r.ok for r in records),
        "throughput_rps": len(records) / duration_s if duration_s > 0 else 0.0,
        "attainment": attainment(records, slo),
        # the SLO-scale sweep at this rate: how far both targets could shrink (< 1) or must
        # grow (> 1) for `target` of the requests to meet them
        "tightest_slo_scale": tightest_slo_scale(records, slo, target),
        "ttft_s": percentiles([r.ttft_s for r in records]),
        "tpot_s": percentiles([r.tpot_s for r in records]),
        "e2e_s": percentiles([r.e2e_s for r in records]),
    }


def goodput(points: list[tuple[float, float]], target: float = 0.9) -> float:
    """points: (rate, attainment) from a sweep -> the interpolated highest rate >= target."""
    pts = sorted(points)
    passing = [(r, a) for r, a in pts if a >= target]
    if not passing:
        return 0.0
    r0, a0 = max(passing)
    failing = [(r, a) for r, a in pts if r > r0 and a < target]
    if not failing:
        return r0
    r1, a1 = min(failing)
    return r0 + (r1 - r0) * (a0 - target) / (a0 - a1)  # where the line crosses the target


def goodput_range(points: list[tuple[float, float]], target: float = 0.9) -> tuple[float, float]:
    """What a sweep says about goodput: (g, g) where it brackets the crossing; (highest rate,
    inf) where every tested rate met the target; (0, lowest rate) where none did. The low end
    is always `goodput(points, target)`."""
    if not points:
        return 0.0, math.inf
    met = [a >= target for _, a in points]
    if all(met):
        return max(r for r, _ in points), math.inf
    if not any(met):
        return 0.0, min(r for r, _ in points)
    g = goodput(points, target)
    return g, g


def tightest_slo_scale(
    records: list[RequestRecord], slo: SLO, target: float = 0.9, hi: float = 1e3
) -> float:
    """The smallest s such that attainment(records, s * slo) >= target (bisection)."""
    if attainment(records, slo.scaled(hi)) < target:
        return math.inf
    lo = 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if attainment(records, slo.scaled(mid)) >= target:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class RateCount:
    """One rate of a sweep reduced to what attainment depends on."""

    rate: float
    attained: int
    requests: int


def goodput_samples(
    points: list[RateCount], target: float, samples: int, rng: np.random.Generator
) -> np.ndarray:
    """Goodput of `samples` bootstrap resamples of a sweep: each rate's requests drawn again
    with replacement. For a pass/fail statistic that is exactly a binomial draw of the
    attaining count, so no request list is needed. Requests at one rate share queues and are
    not independent; the spread is a lower bound on the run-to-run spread."""
    if not points:
        return np.zeros(samples)
    pts = sorted(points, key=lambda p: p.rate)
    draws = np.stack(
        [
            rng.binomial(p.requests, p.attained / max(p.requests, 1), samples) / max(p.requests, 1)
            for p in pts
        ],
        axis=1,
    )
    rates = [p.rate for p in pts]
    return np.array([goodput(list(zip(rates, row, strict=True)), target) for row in draws])


def interval(values: np.ndarray, level: float = 0.9) -> tuple[float, float]:
    """Central `level` percentile interval (empirical quantiles: no interpolation, so a ratio's
    infinite samples stay infinite instead of turning into NaN)."""
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail], method="inverted_cdf")
    return float(low), float(high)
