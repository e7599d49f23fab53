"""Goodput metrics on hand-made traces."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench.metrics import (
    SLO,
    RateCount,
    RequestRecord,
    attainment,
    goodput,
    goodput_range,
    goodput_samples,
    interval,
    summarize,
    tightest_slo_scale,
)

pytestmark = pytest.mark.unit


def rec(arrival, first, last, n, error=None) -> RequestRecord:
    return RequestRecord(arrival, first, last, n, error=error)


def test_ttft_tpot_e2e_of_one_request():
    r = rec(10.0, 10.5, 12.5, 5)
    assert (r.ttft_s, r.tpot_s, r.e2e_s) == pytest.approx((0.5, 0.5, 2.5))
    assert rec(0.0, 0.2, 0.2, 1).tpot_s == 0.0  # a single token has no inter-token time


def test_attainment_needs_both_targets_and_counts_failures_as_misses():
    records = [
        rec(0, 0.1, 1.0, 10),  # ttft 0.1, tpot 0.1: meets both
        rec(0, 0.5, 1.4, 10),  # ttft too slow
        rec(0, 0.1, 3.0, 10),  # tpot too slow
        rec(0, None, None, 0, error="HTTP 503"),
    ]
    assert attainment(records, SLO(ttft_s=0.2, tpot_s=0.15)) == 0.25
    s = summarize(records, SLO(0.2, 0.15), duration_s=2.0)
    assert s["errors"] == 1 and s["throughput_rps"] == 2.0 and s["attainment"] == 0.25
    assert s["ttft_s"]["p50"] == pytest.approx(0.1)
    # 90% of 4 needs the failed request too: no scale will do; half needs the tpot-slow one,
    # whose 2.9 s over 9 tokens is 2.15x the 0.15 s target
    assert s["tightest_slo_scale"] == math.inf
    half = summarize(records, SLO(0.2, 0.15), duration_s=2.0, target=0.5)
    assert half["tightest_slo_scale"] == pytest.approx(2.9 / 9 / 0.15)


def test_goodput_interpolates_between_the_last_pass_and_the_first_fail():
    sweep = [(1.0, 1.0), (2.0, 0.95), (3.0, 0.85), (4.0, 0.5)]
    # 0.95 at 2 and 0.85 at 3: the 0.9 line is crossed halfway
    assert goodput(sweep, 0.9) == pytest.approx(2.5)
    assert goodput([(1.0, 0.95), (2.0, 0.92)], 0.9) == 2.0  # never failed: the last tested rate
    assert goodput([(1.0, 0.5)], 0.9) == 0.0
    # what the sweep bounds: bracketed, open above, below its lowest rate
    assert goodput_range(sweep, 0.9) == pytest.approx((2.5, 2.5))
    assert goodput_range([(1.0, 0.95), (2.0, 0.92)], 0.9) == (2.0, math.inf)
    assert goodput_range([(1.0, 0.5), (2.0, 0.3)], 0.9) == (0.0, 1.0)
    for points in (sweep, [(1.0, 0.95), (2.0, 0.92)], [(1.0, 0.5), (2.0, 0.3)], []):
        assert goodput_range(points, 0.9)[0] == goodput(points, 0.9)  # the report relies on it


def test_tightest_slo_scale_is_the_ninetieth_percentile_ratio():
    # ttft/tpot ratios to the SLO: request i is at scale (i + 1) / 10 on both
    slo = SLO(1.0, 1.0)
    records = [rec(0, (i + 1) / 10, (i + 1) / 10 + 9 * (i + 1) / 10, 10) for i in range(10)]
    assert tightest_slo_scale(records, slo, 0.9) == pytest.approx(0.9, abs=1e-9)
    assert tightest_slo_scale([rec(0, None, None, 0, "x")], slo) == math.inf


def test_bootstrap_goodput_follows_the_binomial_law_of_the_failing_rates_count():
    # rate 1: 40 of 40 attain (always resampled as 1.0); rate 2: 32 of 40, so a resample's
    # count K ~ Binomial(40, 0.8) and its goodput is 1 + 0.1 / (1 - K/40) below 36, else 2
    n, p, samples = 40, 0.8, 20000
    points = [RateCount(2.0, 32, n), RateCount(1.0, n, n)]  # order must not matter
    g = goodput_samples(points, 0.9, samples, np.random.default_rng(1))

    def goodput_of(k: int) -> float:
        return 1 + 0.1 / (1 - k / n) if k < 36 else 2.0

    cdf = 0.0
    for k in range(24, 36):
        cdf += math.comb(n, k) * p**k * (1 - p) ** (n - k)
        assert np.mean(g <= goodput_of(k) + 1e-12) == pytest.approx(cdf, abs=0.015)
    low, high = interval(g, 0.9)
    assert low < goodput([(1.0, 1.0), (2.0, 0.8)], 0.9) < high


def test_bootstrap_of_all_or_nothing_rates_has_no_spread():
    points = [RateCount(1.0, 10, 10), RateCount(2.0, 10, 10), RateCount(3.0, 0, 10)]
    g = goodput_samples(points, 0.9, 500, np.random.default_rng(0))
    # every resample: 1.0 at rate 2, 0.0 at rate 3 -> crosses 0.9 at 2.1
    assert interval(g) == pytest.approx((2.1, 2.1))
    assert interval(np.array([1.0, np.inf, np.inf, np.inf]), 0.5) == (1.0, np.inf)  # no NaN


def test_the_ingress_counts_a_request_within_the_slo_as_the_benchmark_does():
    """deployments.metrics.slo_met (the live counter's rule) against bench.metrics.attainment
    (the benchmark's), request by request, on either side of each target."""
    from deployments.metrics import slo_met

    slo = SLO(ttft_s=0.4, tpot_s=0.04)
    for ttft in (0.1, 0.4, 0.41):
        for tpot in (0.01, 0.04, 0.05):
            for n in (1, 2, 9):
                for error in (None, "abort"):
                    last = 1.0 + ttft + tpot * (n - 1)
                    record = RequestRecord(1.0, 1.0 + ttft, last, n, error=error)
                    met = slo_met(
                        record.ttft_s * 1e3 if error is None else ttft * 1e3,
                        record.tpot_s * 1e3 if error is None else tpot * 1e3,
                        error is None,
                        (slo.ttft_s * 1e3, slo.tpot_s * 1e3),
                    )
                    assert (met == "both") == (attainment([record], slo) == 1.0)
                    assert (met in ("both", "ttft")) == (error is None and record.ttft_s <= 0.4)
                    tpot_ok = error is None and (n == 1 or record.tpot_s <= 0.04)
                    assert (met in ("both", "tpot")) == tpot_ok
