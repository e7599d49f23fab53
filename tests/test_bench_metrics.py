"""Goodput metrics on hand-made traces."""

from __future__ import annotations

import math

import pytest

from bench.metrics import (
    SLO,
    RequestRecord,
    attainment,
    goodput,
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


def test_goodput_interpolates_between_the_last_pass_and_the_first_fail():
    sweep = [(1.0, 1.0), (2.0, 0.95), (3.0, 0.85), (4.0, 0.5)]
    # 0.95 at 2 and 0.85 at 3: the 0.9 line is crossed halfway
    assert goodput(sweep, 0.9) == pytest.approx(2.5)
    assert goodput([(1.0, 0.95), (2.0, 0.92)], 0.9) == 2.0  # never failed: the last tested rate
    assert goodput([(1.0, 0.5)], 0.9) == 0.0


def test_tightest_slo_scale_is_the_ninetieth_percentile_ratio():
    # ttft/tpot ratios to the SLO: request i is at scale (i + 1) / 10 on both
    slo = SLO(1.0, 1.0)
    records = [rec(0, (i + 1) / 10, (i + 1) / 10 + 9 * (i + 1) / 10, 10) for i in range(10)]
    assert tightest_slo_scale(records, slo, 0.9) == pytest.approx(0.9, abs=1e-9)
    assert tightest_slo_scale([rec(0, None, None, 0, "x")], slo) == math.inf
