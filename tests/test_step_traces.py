"""A profile fitted to a server's own step traces, pooled over runs (placement profile
--from-steps): known coefficients come back, and the written profile plans like any other."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from placement.latency_model import Coefficients, Entry, Profile
from placement.profiler import served_profile
from placement.step_traces import (
    fit_traces,
    fit_window,
    load_all_replicas,
    load_replicas,
    trace_runs,
)
from placement.wander import StepWander
from tests.test_wander import ou_series

pytestmark = pytest.mark.unit

PRE, DEC = Coefficients(90.0, 3.0, 0.002), Coefficients(80.0, 0.01, 4.0)
BASE = Entry(1, 1, Coefficients(1, 1, 0), Coefficients(1, 0, 1), 4321)


def _steps(prefills: list[list[int]], decodes: list[list[int]]) -> list[dict]:
    lines = [
        {"duration_ms": PRE.a + PRE.b * sum(x) + PRE.c * sum(n * n for n in x),
         "prefill_lens": x, "decode_contexts": []}
        for x in prefills
    ] + [
        {"duration_ms": DEC.a + DEC.b * sum(c) + DEC.c * len(c), "prefill_lens": [],
         "decode_contexts": c}
        for c in decodes
    ]  # fmt: skip
    for i, line in enumerate(lines):  # one replica, steps 1 s apart: no overlap, no idle gap
        line["start_s"] = 1000.0 + i
    return lines


def _run(tmp_path, name: str, steps: list[dict]):
    run = tmp_path / name
    run.mkdir()
    (run / "replica-1.jsonl").write_text("\n".join(json.dumps(s) for s in steps))
    return run


def test_runs_pool_into_one_fit_that_neither_run_could_make_alone(tmp_path):
    # each run alone has too few decode or prefill steps; together they recover both models
    one = _run(tmp_path, "one", _steps([[512], [100, 200], [300], [1000]], [[600]]))
    two = _run(tmp_path, "two", _steps([[64, 64, 64]], [[600, 700, 800], [100] * 8, [2000, 10]]))
    assert fit_traces([one], BASE) is None and fit_traces([two], BASE) is None
    fitted = fit_traces([one, two], BASE)
    for got, want in ((fitted.entry.prefill, PRE), (fitted.entry.decode, DEC)):
        assert [got.a, got.b, got.c] == pytest.approx([want.a, want.b, want.c], rel=1e-6)
    assert (fitted.report["prefill_steps"], fitted.report["decode_steps"]) == (5, 4)
    assert fitted.contention == 0.0


def test_steps_that_verified_drafts_are_left_out_of_the_fit(tmp_path):
    """A speculative decode step computes several tokens per decode: its time fits neither
    model, and the fit is the one without it."""
    steps = _steps([[512], [100, 200], [300], [1000]], [[600], [600, 700], [100] * 8])
    drafted = [
        {"duration_ms": 900.0, "prefill_lens": [], "decode_contexts": [600, 700],
         "draft_tokens": 6, "start_s": 2000.0 + 10 * i}  # not back to back: no loop gaps
        for i in range(4)
    ]  # fmt: skip
    plain = fit_traces([_run(tmp_path, "plain", steps)], BASE)
    mixed = fit_traces([_run(tmp_path, "mixed", steps + drafted)], BASE)
    assert mixed.report["decode_steps"] == plain.report["decode_steps"] == 3
    assert mixed.entry.decode == plain.entry.decode


def test_a_configuration_deployed_once_per_point_pools_its_deployments_as_runs(tmp_path):
    """bench.experiment's interleaved order files each deployment's traces in its own
    subdirectory; an older run's flat directory still reads as one run."""
    config = tmp_path / "coloc-2"
    config.mkdir()
    one = _run(config, "000", _steps([[512], [100, 200], [300], [1000]], [[600]]))
    two = _run(config, "003", _steps([[64, 64, 64]], [[600, 700, 800], [100] * 8, [2000, 10]]))
    (config / "004").mkdir()  # a deployment that traced nothing
    assert trace_runs(config) == [one, two]
    pooled = fit_traces(trace_runs(config), BASE)
    assert pooled.report == fit_traces([one, two], BASE).report
    assert len(load_all_replicas(config)) == 2
    assert trace_runs(one) == [one] and trace_runs(tmp_path / "absent") == []


def test_a_window_fits_only_the_steps_that_started_in_it(tmp_path):
    """One deployment served two rate points, the second on a machine half as fast: each
    point's window recovers its own coefficients, the pooled fit neither, an empty window
    none."""
    fast = _steps([[512], [100, 200], [300], [64, 64, 64], [1000]],
                  [[600], [600, 700, 800], [100] * 8, [2000, 10]])  # fmt: skip
    slow = [{**s, "start_s": s["start_s"] + 1000, "duration_ms": 2 * s["duration_ms"]}
            for s in fast]  # fmt: skip
    _run(tmp_path, "000", fast + slow)
    runs = [load_replicas(d) for d in trace_runs(tmp_path)]
    for (start, end), k in (((1000, 1100), 1.0), ((2000, 2100), 2.0)):
        fitted = fit_window(runs, BASE, start, end)
        for got, want in ((fitted.entry.prefill, PRE), (fitted.entry.decode, DEC)):
            assert [got.a, got.b, got.c] == pytest.approx([k * want.a, k * want.b, k * want.c],
                                                          rel=1e-6)  # fmt: skip
        assert fitted.report["prefill_steps"] == 5 and fitted.wander is None
    pooled = fit_traces(trace_runs(tmp_path), BASE)
    assert pooled.entry.prefill.a == pytest.approx(1.5 * PRE.a)  # the two speeds' mean
    assert fit_window(runs, BASE, 1100, 2000) is None


def test_chunked_prefill_traces_fit_with_their_offsets_or_keep_the_base_shape(tmp_path):
    """A chunked server's pure prefill steps are chunks of one size: with their offsets the
    prefix's attention tells the coefficients apart; traces from before offsets were recorded
    keep the base's shape (scaled to the steps' mean) instead of an arbitrary split."""
    decodes = [[600], [600, 700, 800], [100] * 8, [2000, 10]]
    chunks = [([256], [0]), ([256], [256]), ([32], [0]), ([256], [0]), ([256], [256])]
    steps = _steps([], decodes)
    for i, (lens, at) in enumerate(chunks):
        work = PRE.a + PRE.b * sum(lens) + sum(PRE.c * ((o + n) ** 2 - o * o)
                                               for n, o in zip(lens, at, strict=True))  # fmt: skip
        # 2 s apart: a chunk takes up to 1.3 s, and the gap must not read as loop overhead
        steps.append({"start_s": 2000.0 + 2 * i, "duration_ms": work, "prefill_lens": lens,
                      "decode_contexts": [], "prefill_offsets": at})  # fmt: skip
    got = fit_traces([_run(tmp_path, "with", steps)], BASE).entry.prefill
    assert [got.a, got.b, got.c] == pytest.approx([PRE.a, PRE.b, PRE.c], rel=1e-6)
    old = [{k: v for k, v in s.items() if k != "prefill_offsets"} for s in steps]
    got = fit_traces([_run(tmp_path, "without", old)], BASE).entry.prefill
    k = got.a / BASE.prefill.a
    assert [got.b, got.c] == pytest.approx([BASE.prefill.b * k, BASE.prefill.c * k])


def test_served_profile_keeps_the_base_and_says_what_is_missing(tmp_path):
    base = tmp_path / "base.yaml"
    Profile("smollm2-135m", "cpu-1thread", [BASE], 0.02).save(base)
    run = _run(
        tmp_path, "run",
        _steps([[512], [100, 200], [300], [1000]], [[600, 700, 800], [100] * 8, [2000, 10]]),
    )  # fmt: skip
    out = tmp_path / "served.yaml"
    served_profile([str(run)], str(base), str(out))
    loaded = Profile.load(out)
    assert loaded.model == "smollm2-135m" and loaded.device == "cpu-1thread (served)"
    entry = loaded.entry(1, 1)
    assert entry.kv_capacity_tokens == 4321  # from the base
    assert entry.decode.c == pytest.approx(DEC.c, rel=1e-6)
    assert loaded.node_contention == 0.0  # fitted, not the base's 0.02
    with pytest.raises(SystemExit, match="needs --base"):
        served_profile([str(run)], None, str(out))
    with pytest.raises(SystemExit, match="no step traces"):
        served_profile([str(tmp_path / "empty")], str(base), str(out))


def test_a_decode_step_that_is_not_linear_in_the_batch_is_fitted_as_a_curve(tmp_path):
    # a CPU's decode step jumps where its matrix kernels change path (here from 2 to 3 rows)
    curve = ((1, 50.0), (2, 55.0), (3, 80.0), (4, 100.0), (6, 120.0), (8, 135.0))
    truth = Entry(1, 1, PRE, Coefficients(40.0, 0.01, 5.0), 1, curve)
    decodes = [[300 + 50 * k] * n for n in (1, 2, 3, 4, 5, 6, 7, 8) for k in range(4)]
    lines = _steps([[512], [100, 200], [300], [1000]], [])
    lines += [
        {"duration_ms": truth.decode_ms(c), "prefill_lens": [], "decode_contexts": c,
         "start_s": 2000.0 + i}
        for i, c in enumerate(decodes)
    ]  # fmt: skip
    fitted = fit_traces([_run(tmp_path, "run", lines)], BASE)
    entry, fit = fitted.entry, fitted.report
    assert entry.decode.b == pytest.approx(0.01, rel=1e-6) and fit["decode_rms"] < 1e-9
    fitted = dict(entry.decode_batch_ms)
    assert list(fitted) == [1, 2, 3, 4, 5, 6, 8]  # 5 between its neighbours: 110 ms
    assert [fitted[n] for n in (1, 2, 3, 4, 5, 6, 8)] == pytest.approx(
        [50.0, 55.0, 80.0, 100.0, 110.0, 120.0, 135.0]
    )
    for c in decodes:  # the fitted entry times every traced step as it ran
        assert entry.decode_ms(c) == pytest.approx(truth.decode_ms(c), rel=1e-6)


def test_served_steps_that_scatter_slow_are_fitted_to_their_mean_and_their_wander(tmp_path):
    # decode steps on the model times an OU factor (slow stretches) and per-step scatter: the
    # relative-error fit alone sits below their mean; the fitted entry times their mean, and
    # the wander comes back
    truth = StepWander(sd=0.2, tau_ms=3000.0, white_sd=0.1)
    factors = np.exp(ou_series(truth, 4000, 500.0, seed=5)[:, 1])
    rng = np.random.default_rng(5)
    batches = [[int(c) for c in rng.integers(100, 900, size=int(rng.integers(1, 4)))]
               for _ in range(len(factors))]  # fmt: skip
    lines = _steps([[512], [100, 200], [300], [1000]], [])
    for i, (batch, f) in enumerate(zip(batches, factors, strict=True)):  # 0.5 s apart: idle between
        ms = f * (DEC.a + DEC.b * sum(batch) + DEC.c * len(batch))
        lines.append({"duration_ms": ms, "prefill_lens": [], "decode_contexts": batch,
                      "start_s": 2000.0 + 0.5 * i})  # fmt: skip
    fitted = fit_traces([_run(tmp_path, "run", lines)], BASE)
    traced = sum(x["duration_ms"] for x in lines if x["decode_contexts"])
    modelled = sum(fitted.entry.decode_ms(b) for b in batches)
    assert modelled == pytest.approx(traced, rel=1e-9)
    assert fitted.report["mean_scale"]["decode"] > 1.02  # what the relative fit missed
    assert fitted.report["mean_scale"]["prefill"] == pytest.approx(1.0, rel=1e-9)
    w = fitted.wander
    assert w.sd == pytest.approx(truth.sd, rel=0.25) and w.white_sd == pytest.approx(0.1, rel=0.3)
    assert w.tau_ms == pytest.approx(truth.tau_ms, rel=0.6)
    assert w.run_sd == 0.0  # one run: nothing to say about the next one's pace


def test_runs_on_a_machine_at_different_paces_give_the_wander_a_run_to_run_part(tmp_path):
    """Twelve deployments' decode steps with the same OU stretches, each run at its own
    pace (log sd 0.15): the pooled fit's run_sd comes back near it; each run's own fit (a
    window) has none."""
    truth = StepWander(sd=0.15, tau_ms=1000.0, white_sd=0.1)
    rng = np.random.default_rng(8)
    runs = []
    for k in range(12):
        pace = math.exp(0.15 * rng.standard_normal())
        factors = pace * np.exp(ou_series(truth, 600, 500.0, seed=k)[:, 1])
        lines = _steps([[512], [100, 200], [300], [1000]], [])
        for i, f in enumerate(factors):
            batch = [200 + i % 7 * 100] * (1 + i % 3)
            lines.append({"duration_ms": f * (DEC.a + DEC.b * sum(batch) + DEC.c * len(batch)),
                          "prefill_lens": [], "decode_contexts": batch,
                          "start_s": 2000.0 + 0.5 * i})  # 0.5 s apart: idle between  # fmt: skip
        runs.append(_run(tmp_path, f"{k:03d}", lines))
    pooled = fit_traces(runs, BASE)
    assert pooled.wander.run_sd == pytest.approx(0.15, rel=0.45)
    assert pooled.report["step_wander"]["run_sd"] == pooled.wander.run_sd
    assert fit_traces(runs[:1], BASE).wander.run_sd == 0.0
