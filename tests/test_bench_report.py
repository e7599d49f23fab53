"""Experiment sweep logic, report analysis and plots on hand-made records; configurations
validated by the app's own schema; the simulator replays the load generator's schedule."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from bench.experiment import CONFIGURATIONS, RatePoint, app_args, merge, sweep
from bench.metrics import SLO, RequestRecord
from bench.report import (
    analyze,
    band_hits,
    band_section,
    bounded_text,
    error_text,
    map_table,
    per_rate_table,
    plot,
    scale_errors,
    scale_section,
    sim_requests,
    table,
)

pytestmark = pytest.mark.unit


def _records(n_good: int, n_bad: int) -> list[RequestRecord]:
    good = [RequestRecord(0.0, 0.5, 1.4, 10) for _ in range(n_good)]  # ttft 0.5, tpot 0.1
    bad = [RequestRecord(0.0, 3.0, 12.0, 10) for _ in range(n_bad)]  # ttft 3, tpot 1
    return good + bad


def test_sweep_stops_once_the_loosest_slo_fails_then_bisects_the_headline_crossing():
    strict, loose = SLO(1.0, 0.2), SLO(5.0, 2.0)
    good = RequestRecord(0.0, 0.5, 1.4, 10)  # meets both
    medium = RequestRecord(0.0, 2.0, 2.9, 10)  # ttft 2 s: only the loose SLO
    bad = RequestRecord(0.0, 10.0, 19.0, 10)  # ttft 10 s: neither
    sent = []

    def send(rate):
        sent.append(rate)
        record = good if rate < 0.5 else medium if rate < 0.7 else bad
        return [record] * 10, 10.0

    points = sweep(send, [0.8, 0.2, 0.4, 0.6, 1.0], strict, loose, bisect=1, log=str)
    # ascending; 0.8 fails even the loose SLO, so 1.0 is never sent; one bisection: 0.5
    assert sent == [0.2, 0.4, 0.6, 0.8, 0.5]
    assert [p.rate for p in points] == [0.2, 0.4, 0.5, 0.6, 0.8]


def _report(curves: dict[str, tuple[bool, list[tuple[float, int]]]]) -> dict:
    """curves: name -> (colocated, [(rate, good requests out of 10)])."""
    configs = {}
    for name, (colocated, points) in curves.items():
        configs[name] = {
            "description": name,
            "colocated": colocated,
            "cores": 2,
            "points": [RatePoint(r, 10.0, _records(g, 10 - g)).to_json() for r, g in points],
        }
    meta = {
        "slo_unit": {"ttft_s": 1.0, "tpot_s": 0.2, "source": "given"},
        "grid": {"headline": [1.0, 1.0], "ttft": [1.0, 4.0], "tpot": [1.0, 6.0]},
        "target": 0.9,
        "command": "test",
        "date": "today",
        "machine": "here",
    }
    return {"meta": meta, "configs": configs}


def test_analysis_goodput_ratio_and_slo_map_from_hand_made_curves():
    report = _report(
        {
            "disagg": (False, [(1.0, 10), (2.0, 10), (3.0, 8)]),
            "coloc": (True, [(1.0, 10), (2.0, 8)]),
        }
    )
    a = analyze(report)
    # disagg: 1.0 at rate 2, 0.8 at rate 3 -> crosses 0.9 at 2.5; coloc: crosses at 1.5
    assert a["configs"]["disagg"]["goodput_rps"] == pytest.approx(2.5)
    assert a["configs"]["coloc"]["goodput_rps"] == pytest.approx(1.5)
    assert a["configs"]["disagg"]["goodput_per_core"] == pytest.approx(1.25)
    assert a["disagg_over_best_colocated"] == pytest.approx(2.5 / 1.5)
    assert a["configs"]["coloc"]["vs_best_colocated"] == pytest.approx(1.0)
    # at 4x TTFT and 6x TPOT the "bad" requests (ttft 3 s, tpot 1 s) pass too: every rate passes
    loose = next(c for c in a["slo_map"] if c["ttft_scale"] == 4.0 and c["tpot_scale"] == 6.0)
    assert loose["goodput"] == {"disagg": 3.0, "coloc": 2.0}
    curve = a["configs"]["disagg"]["curve"]
    assert [p["attainment"] for p in curve] == [1.0, 1.0, 0.8]
    assert curve[2]["ttft_s"]["p90"] == pytest.approx(3.0)
    # SLO-scale sweep: 9 of 10 must pass; at rate 3 that takes a "bad" request (ttft 3 s of 1,
    # tpot 1 s of 0.2): 5x; where all are good, 0.5x (ttft 0.5 of 1, tpot 0.1 of 0.2)
    assert [p["tightest_slo_scale"] for p in curve] == pytest.approx([0.5, 0.5, 5.0])
    scales = per_rate_table(a, "tightest_slo_scale", ".2f")
    assert "| disagg | 0.50 | 0.50 | 5.00 |" in scales and "| coloc | 0.50 | 5.00 | - |" in scales
    curve[0]["simulated_tightest_slo_scale"] = 0.45  # the simulator's, beside the measured
    paired = per_rate_table(a, "tightest_slo_scale", ".2f", "simulated_tightest_slo_scale")
    assert "| disagg | 0.50 (0.45) | 0.50 (-) | 5.00 (-) |" in paired
    assert "| coloc | 0.50 (-) | 5.00 (-) | - |" in paired
    assert scale_errors(a, "simulated") == pytest.approx([-0.1])  # 0.45 / 0.50 - 1
    section = scale_section(a, 0.9)
    assert "| disagg | 0.50 (0.45) |" in section and "with the profile" in section
    assert "median error 10% (largest -10%), within 15% at 1 of 1 measured rates" in section
    # bootstrap over each rate's 10 requests: disagg's rate-3 count K ~ Binomial(10, 0.8), whose
    # 5% quantile is 6 (goodput 2 + 0.1 / 0.4) and 95% quantile >= 9 (passes: 3.0)
    assert a["configs"]["disagg"]["goodput_interval_rps"] == pytest.approx((2.25, 3.0))
    assert a["configs"]["coloc"]["goodput_interval_rps"] == pytest.approx((1.25, 2.0))
    low, high = a["ratio_interval"]
    assert low < 2.5 / 1.5 < high and high <= 3.0 / 1.25
    rows = table(a).splitlines()
    assert rows[2].startswith("| disagg | 2 | 2.500 | 2.250-3.000 | 1.250 | 1.67x")
    table_text = map_table(a, report["meta"]["grid"])
    assert "disagg 2.50 (1.67x)" in table_text
    # at the loose cell both passed every tested rate: lower bounds, ratio unknown
    assert loose["range"] == {"disagg": (3.0, math.inf), "coloc": (2.0, math.inf)}
    assert "disagg >=3.00 (?)" in table_text


def test_a_sweep_that_never_passes_is_reported_as_below_its_lowest_rate():
    # the pair fails at every rate (goodput < 1.0); coloc crosses at 1.5
    report = _report(
        {"disagg": (False, [(1.0, 8), (2.0, 5)]), "coloc": (True, [(1.0, 10), (2.0, 8)])}
    )
    a = analyze(report)
    assert a["configs"]["disagg"]["goodput_range_rps"] == (0.0, 1.0)
    assert a["ratio_range"] == pytest.approx((0.0, 1.0 / 1.5))
    # a prediction of 1.2 req/s is at least 20% above a goodput below 1.0
    a["configs"]["disagg"]["simulated_goodput_rps"] = 1.2
    a["configs"]["disagg"]["simulated_goodput_range_rps"] = (1.2, 1.2)
    row = table(a).splitlines()[2]
    assert row.startswith("| disagg | 2 | <1.000 |")
    assert "| <0.500 | <=0.67x | 1.200 | >= +20%" in row
    # and a prediction of 0.5 cannot be judged against it
    assert error_text((0.5, 0.5), (0.0, 1.0)) == "-"
    # a prediction of 1.5 against a goodput of at least 2.0 (never failed) is >= 25% low
    assert error_text((1.5, 1.5), (2.0, math.inf)) == "<= -25%"
    assert error_text((2.4, 2.4), (2.0, 2.0)) == "+20%"
    assert bounded_text(0.0, math.inf, str) == "?"


def test_plots_are_written_as_png(tmp_path):
    a = analyze(_report({"disagg": (False, [(1.0, 10), (2.0, 7)]), "c": (True, [(1.0, 9)])}))
    for path in plot(a, tmp_path, 0.9):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_simulator_replays_the_load_generators_schedule():
    from bench.datasets import DatasetItem
    from bench.loadgen import from_dataset, synthetic
    from placement.workload import Workload

    w = {"num_requests": 20, "input_len": 300, "output_len": 30, "cv": 2.0, "seed": 3}
    sent = synthetic(Workload(20, 300, 30, cv=2.0), 0.7, seed=3)
    replay = sim_requests({"workload": {**w, "dataset_lengths": None}}, 0.7)
    assert [r.arrival_ms / 1e3 for r in replay] == pytest.approx([s.arrival_s for s in sent])
    assert {(r.input_len, r.output_len) for r in replay} == {(300, 30)}

    items = [DatasetItem(tuple(range(n)), out) for n, out in ((5, 7), (40, 3), (12, 90))]
    sent = from_dataset(items, 20, 0.7, cv=2.0, seed=3)
    lengths = [[i.input_len, i.output_len] for i in items]
    replay = sim_requests({"workload": {**w, "dataset_lengths": lengths}}, 0.7)
    assert [(r.input_len, r.output_len) for r in replay] == [
        (len(s.prompt), s.max_tokens) for s in sent
    ]
    assert [r.arrival_ms / 1e3 for r in replay] == pytest.approx([s.arrival_s for s in sent])
    assert len({len(s.prompt) for s in sent}) == 3  # all three items were drawn


def test_every_configuration_is_valid_app_args_on_the_same_engine_threads():
    from app.config import AppArgs

    assert merge({"a": {"b": 1, "c": 2}, "d": 1}, {"a": {"c": 3}}) == {
        "a": {"b": 1, "c": 3},
        "d": 1,
    }
    for name, config in CONFIGURATIONS.items():
        args = AppArgs.model_validate(app_args(name))
        assert args.mode == ("colocated" if config.colocated else "disaggregated")
        if not config.gpus:
            assert config.cores == 2, name  # every CPU configuration computes on two threads
            continue
        # the GPU ones: one GPU in all, the phases' replicas splitting it
        phases = ("colocated",) if config.colocated else ("prefill", "decode")
        assert args.device == "cuda" and config.cores == 1, name
        assert sum(getattr(args, p).num_gpus * getattr(args, p).num_replicas for p in phases) == 1
        # decode steps replay graphs unless the configuration is the eager one
        graphs = {args.engine_config(p).graph_batch > 0 for p in phases if p != "prefill"}
        assert graphs == {not name.endswith("-eager")}, name
    chunked = AppArgs.model_validate(app_args("chunked-2"))
    assert chunked.colocated.engine.chunked_prefill and chunked.colocated.num_replicas == 2


def test_stepped_arrivals_follow_each_segments_rate():
    import numpy as np

    from bench.autoscale import stepped_arrivals

    arrivals = np.array(stepped_arrivals([(2.0, 2000.0), (10.0, 1000.0), (1.0, 3000.0)], seed=4))
    counts = [
        ((arrivals >= lo) & (arrivals < hi)).sum()
        for lo, hi in ((0, 2000), (2000, 3000), (3000, 6000))
    ]
    for count, expected in zip(counts, (4000, 10_000, 3000), strict=True):
        assert count == pytest.approx(expected, rel=0.05)
    gaps = np.diff(arrivals[arrivals >= 3000])
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, rel=0.05)  # Poisson within a segment


def test_windows_take_p90_of_the_requests_arriving_in_each():
    from bench.autoscale import windows

    records = [RequestRecord(100.0 + t, 100.0 + t + 0.1 * (i + 1), 100.0 + t + 1, 10) for i, t in
               enumerate([1.0, 2.0, 3.0, 25.0])]  # fmt: skip
    rows = windows(records, t0=100.0, width_s=20.0)
    assert [(w["t_s"], w["requests"]) for w in rows] == [(10.0, 3), (30.0, 1)]
    assert rows[0]["ttft_p90_s"] == pytest.approx(np.percentile([0.1, 0.2, 0.3], 90))


def test_step_entry_recovers_in_server_coefficients(tmp_path):
    from bench.report import step_entry
    from placement.latency_model import Coefficients, Entry

    base = Entry(1, 1, Coefficients(1, 1, 0), Coefficients(1, 0, 1), 1000)
    true_pre, true_dec = Coefficients(90.0, 3.0, 0.002), Coefficients(80.0, 0.01, 4.0)
    lines = []
    for lens in ([512], [100, 200], [300], [64, 64, 64], [1000]):
        ms = true_pre.a + true_pre.b * sum(lens) + true_pre.c * sum(n * n for n in lens)
        lines.append({"duration_ms": ms, "prefill_lens": lens, "decode_contexts": []})
    for ctx in ([600], [600, 700, 800], [100] * 8, [2000, 10]):
        ms = true_dec.a + true_dec.b * sum(ctx) + true_dec.c * len(ctx)
        lines.append({"duration_ms": ms, "prefill_lens": [], "decode_contexts": ctx})
    # a chunked step mixes both and must not enter either fit
    lines.append({"duration_ms": 1e6, "prefill_lens": [8], "decode_contexts": [9]})
    for i, line in enumerate(lines):  # one replica, back-to-back steps 1 s apart
        line["start_s"] = 1000.0 + i
    (tmp_path / "prefill-1.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    fitted = step_entry(tmp_path, base)
    entry = fitted.entry
    for got, want in ((entry.prefill, true_pre), (entry.decode, true_dec)):
        assert [got.a, got.b, got.c] == pytest.approx([want.a, want.b, want.c], rel=1e-6)
    assert entry.kv_capacity_tokens == 1000 and fitted.report["prefill_steps"] == 5
    assert fitted.contention == 0.0  # a lone replica has no neighbour to be slowed by
    assert fitted.wander is None  # every step on its model: nothing wanders
    assert step_entry(tmp_path / "missing", base) is None


def test_step_entry_recovers_the_node_contention_of_two_replicas(tmp_path):
    """Two replicas whose decode steps overlap by known amounts, slowed by processor sharing
    with contention 0.3: the fit finds 0.3 and the solo-speed coefficients."""
    from bench.report import step_entry
    from placement.latency_model import Coefficients, Entry

    base = Entry(1, 1, Coefficients(1, 1, 0), Coefficients(1, 0, 1), 1000)
    kappa, dec = 0.3, Coefficients(50.0, 0.0, 10.0)
    rng = np.random.default_rng(0)
    a_steps, b_steps, t = [], [], 0.0
    for i in range(40):
        batch = rng.integers(100, 900, size=int(rng.integers(1, 5))).tolist()
        work = dec.a + dec.c * len(batch)
        if i % 2:  # replica B runs one long prefill step that covers all of A's step
            shared_ms = work * (1 + kappa)
            b_steps.append({"start_s": t - 0.001, "duration_ms": shared_ms + 2.0,
                            "prefill_lens": [500], "decode_contexts": []})  # fmt: skip
        else:
            shared_ms = work
        a_steps.append({"start_s": t, "duration_ms": shared_ms, "prefill_lens": [],
                        "decode_contexts": batch})  # fmt: skip
        t += shared_ms / 1e3 + 1.0
    for steps, name in ((a_steps, "decode-1"), (b_steps, "prefill-2")):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(s) for s in steps))
    fitted = step_entry(tmp_path, base)
    assert fitted.contention == pytest.approx(kappa, abs=0.011)
    assert [fitted.entry.decode.a, fitted.entry.decode.c] == pytest.approx([dec.a, dec.c], rel=0.03)
    assert fitted.report["node_contention"] == fitted.contention


def test_shared_ms_splits_a_step_by_how_many_neighbours_ran():
    from placement.step_traces import _shared_ms

    step = {"start_s": 10.0, "duration_ms": 100.0}  # 10.00 .. 10.10
    others = [
        {"start_s": 9.95, "duration_ms": 80.0},  # 9.95 .. 10.03
        {"start_s": 10.02, "duration_ms": 30.0},  # 10.02 .. 10.05
        {"start_s": 10.2, "duration_ms": 10.0},  # after the step
    ]
    [row] = _shared_ms([step], others, n_replicas=3)
    # 10.00-10.02: one neighbour; 10.02-10.03: two; 10.03-10.05: one; 10.05-10.10: none
    assert row == pytest.approx([50.0, 40.0, 10.0])


def test_busy_gaps_are_the_loop_time_between_back_to_back_steps():
    from placement.step_traces import _busy_gaps_ms

    steps = [  # 10 ms steps; 2 ms and 3 ms gaps while busy, then an idle second
        {"start_s": 1.000, "duration_ms": 10.0},
        {"start_s": 1.012, "duration_ms": 10.0},
        {"start_s": 1.025, "duration_ms": 10.0},
        {"start_s": 2.500, "duration_ms": 10.0},
        {"start_s": 0.0, "duration_ms": 10.0},  # untimed (an older trace): ignored
    ]
    assert _busy_gaps_ms(steps) == pytest.approx([2.0, 3.0])


def test_machine_pace_is_the_median_lone_batch_1_decode_step_in_each_rate_window(tmp_path):
    """Two replicas; in the first window replica A's batch-1 steps take 50 ms alone and 90 ms
    while B computes, in the second 70 ms alone: the pace is 50 then 70 (B's overlapped steps
    and A's bigger batches never count), and None where too few steps ran."""
    from bench.report import machine_pace

    a, b = [], []
    for k in range(30):  # window 1: t = 1000 + k
        t = 1000.0 + k
        a.append({"start_s": t, "duration_ms": 50.0, "prefill_lens": [], "decode_contexts": [9]})
        a.append({"start_s": t + 0.2, "duration_ms": 90.0, "prefill_lens": [],
                  "decode_contexts": [9]})  # fmt: skip
        b.append({"start_s": t + 0.19, "duration_ms": 200.0, "prefill_lens": [64],
                  "decode_contexts": []})  # fmt: skip
        a.append({"start_s": t + 0.5, "duration_ms": 10.0, "prefill_lens": [],
                  "decode_contexts": [9, 9]})  # fmt: skip
    for k in range(30):  # window 2
        a.append({"start_s": 2000.0 + k, "duration_ms": 70.0, "prefill_lens": [],
                  "decode_contexts": [5]})  # fmt: skip
    for name, steps in (("decode-1", a), ("prefill-2", b)):
        (tmp_path / f"{name}.jsonl").write_text("\n".join(json.dumps(x) for x in steps))
    points = [
        {"started_s": 999.5, "duration_s": 40.0},
        {"started_s": 1999.5, "duration_s": 40.0},
        {"started_s": 1999.5, "duration_s": 10.0},  # 10 steps: too few
        {"duration_s": 40.0},  # a report from before started_s was recorded
    ]
    assert machine_pace(points, tmp_path) == [50.0, 70.0, None, None]
    assert machine_pace(points, tmp_path / "missing") == [None] * 4


def _one_point_setup(tmp_path, extra: str = "") -> tuple[Path, dict]:
    """A profile (plus `extra` YAML) and a coloc-2 report with one measured point, 20 req/s."""
    profile = tmp_path / "p.yaml"
    profile.write_text(
        "model: m\ndevice: d\nentries:\n  - {tp: 1, pp: 1, kv_capacity_tokens: 50000,\n"
        "     prefill: {a: 12.0, b: 0.08, c: 5.0e-6}, decode: {a: 15.0, b: 0.0005, c: 0.03}}\n"
        + extra
    )
    workload = {"num_requests": 40, "input_len": 400, "output_len": 20, "cv": 1.0, "seed": 1,
                "dataset_lengths": None}  # fmt: skip
    meta = {"target": 0.9, "workload": workload}
    points = [{"rate": 20.0}]
    return profile, {
        "meta": meta,
        "configs": {"coloc-2": {"args": app_args("coloc-2"), "points": points}},
    }


def test_one_simulation_per_rate_gives_every_slos_goodput(tmp_path):
    """predict() simulates each rate once and reads every SLO off it: each SLO's curve and
    goodput match the simulator's own attainment for that SLO alone."""
    from bench.metrics import goodput_range
    from bench.report import placement_for, predict
    from placement.latency_model import Profile
    from placement.simulator import SLO as SimSLO
    from placement.simulator import attainment, simulate_draws

    profile, report = _one_point_setup(tmp_path)
    meta, args = report["meta"], report["configs"]["coloc-2"]["args"]
    slos = [SLO(0.1, 0.02), SLO(0.3, 0.04)]
    out = predict(report, str(profile), slos)["coloc-2"]
    placement = placement_for(args, Profile.load(profile).entry(1, 1))
    rates = [r for r, _ in out["curve"]]
    for k, slo in enumerate(slos):
        alone = SimSLO(slo.ttft_s * 1e3, slo.tpot_s * 1e3)
        curve = [(r, attainment(simulate_draws(placement, sim_requests(meta, r)), alone))
                 for r in rates]  # fmt: skip
        if k == 0:
            assert [a for _, a in out["curve"]] == pytest.approx([a for _, a in curve])
        assert out["ranges"][k] == pytest.approx(goodput_range(curve, 0.9))
    # at the measured rate, the tightest scale of the first SLO: closed form, the 36th smallest
    # of 40 requests' max(TTFT / 100 ms, TPOT / 20 ms)
    results = simulate_draws(placement, sim_requests(meta, 20.0))
    need = sorted(max(r.ttft_ms / 100, r.tpot_ms / 20) for r in results)
    assert out["tightest_slo_scale"] == pytest.approx([need[35]], rel=1e-9)
    # the looser SLO's goodput is higher, and both crossings lie inside the simulated grid
    (tight, _), (loose, high) = out["ranges"]
    assert 0 < tight < loose <= high < math.inf
    # without step wander every re-run is the same run: the band is its one attainment
    [(low, top)] = out["attainment_band"]
    assert low == top == pytest.approx(attainment(results, SimSLO(100.0, 20.0)))


def test_the_attainment_band_spans_simulated_re_runs_of_the_point(tmp_path):
    """With step wander, the band at a measured rate is the 5-95% range of the attainment of
    64 runs of its schedule, each its own seed and machine pace (a second path: simulate()
    seed by seed); the forecast beside it runs at the typical pace, as without run_sd."""
    from dataclasses import replace

    from bench.report import placement_for, predict
    from placement.latency_model import Profile
    from placement.simulator import SLO as SimSLO
    from placement.simulator import attainment, simulate
    from placement.wander import BAND_DRAWS

    profile, report = _one_point_setup(
        tmp_path,
        "step_wander: {sd: 0.3, tau_ms: 500.0, white_sd: 0.1, drift_sd: 0.1, "
        "drift_tau_ms: 20000.0, run_sd: 0.2}\n",
    )
    meta, args = report["meta"], report["configs"]["coloc-2"]["args"]
    slo = SLO(0.1, 0.02)
    out = predict(report, str(profile), [slo])["coloc-2"]
    [(low, top)] = out["attainment_band"]
    loaded = Profile.load(profile)
    placement = replace(placement_for(args, loaded.entry(1, 1)), wander=loaded.step_wander)
    requests = sim_requests(meta, 20.0)
    per_run = [
        attainment(simulate(placement, requests, seed, pace=True), SimSLO(100.0, 20.0))
        for seed in range(BAND_DRAWS)
    ]
    assert (low, top) == pytest.approx(tuple(np.quantile(per_run, [0.05, 0.95])))
    assert low < top  # the wander makes re-runs differ
    steady = tmp_path / "steady.yaml"
    steady.write_text(profile.read_text().replace(", run_sd: 0.2", ""))
    again = predict(report, str(steady), [slo])["coloc-2"]
    assert again["tightest_slo_scale"] == out["tightest_slo_scale"]
    assert again["curve"] == out["curve"]
    [(low_steady, top_steady)] = again["attainment_band"]
    assert top_steady - low_steady < top - low  # the machine's pace widens the band


def test_the_band_section_counts_measured_attainments_inside_each_band():
    report = _report({"disagg": (False, [(1.0, 10), (2.0, 8)]), "coloc": (True, [(1.0, 9)])})
    a = analyze(report)
    assert band_section(a) == ""  # no simulation ran
    (d1, d2), (c1,) = a["configs"]["disagg"]["curve"], a["configs"]["coloc"]["curve"]
    # measured 1.0, 0.8, 0.9; in-server steps: inside, outside (above), inside at the edge
    for point, band in ((d1, [0.9, 1.0]), (d2, [0.85, 1.0]), (c1, [0.7, 0.9])):
        point["simulated_in_situ_attainment_band"] = band
    d2["simulated_per_point_attainment_band"] = [0.7, 0.8]  # the replay: inside at the edge
    assert band_hits(a, "simulated_in_situ") == (2, 3)
    assert band_hits(a, "simulated_per_point") == (1, 1)
    assert band_hits(a, "simulated") == (0, 0)
    text = band_section(a)
    assert "| disagg | 1.00 (0.90-1.00) | 0.80 (0.85-1.00) |" in text
    assert "| coloc | 0.90 (0.70-0.90) | - |" in text
    assert "(in-server steps;" in text  # the table shows the forecast, not the replay
    assert "in-server steps: 2 of 3; each rate point's own in-server steps: 1 of 1" in text


def test_each_rate_point_is_replayed_with_the_steps_that_ran_during_it(tmp_path):
    """predict_per_point fits each point's time window; a second path fits each deployment's
    own trace directory (the points ran in separate deployments) and simulates the same
    schedule: both agree, the slow point's latency is its own, and a configuration with a
    point lacking its wall-clock start is left out."""
    from bench.metrics import goodput_range
    from bench.report import _sim_attainments, _sim_placement, predict_per_point
    from placement.latency_model import Coefficients, Entry
    from placement.simulator import simulate_draws
    from placement.step_traces import fit_traces

    profile = tmp_path / "p.yaml"
    profile.write_text(
        "model: m\ndevice: d\nentries:\n  - {tp: 1, pp: 1, kv_capacity_tokens: 50000,\n"
        "     prefill: {a: 1.0, b: 1.0, c: 0.0}, decode: {a: 1.0, b: 0.0, c: 1.0}}\n"
    )
    pre, dec = Coefficients(90.0, 3.0, 0.002), Coefficients(80.0, 0.01, 4.0)
    batches = [
        ([512], []),
        ([100, 200], []),
        ([300], []),
        ([64, 64, 64], []),
        ([1000], []),
        ([], [600]),
        ([], [600, 700, 800]),
        ([], [100] * 8),
        ([], [2000, 10]),
    ]
    steps = tmp_path / "steps" / "coloc-2"
    points = []
    for turn, (start, speed, rate) in enumerate(((1000.0, 1.0, 0.2), (2000.0, 2.0, 0.4))):
        lines = [
            {"start_s": start + i, "prefill_lens": p, "decode_contexts": d,
             "duration_ms": speed * (pre.a + pre.b * sum(p) + pre.c * sum(n * n for n in p)
                                     if p else dec.a + dec.b * sum(d) + dec.c * len(d))}
            for i, (p, d) in enumerate(batches)
        ]  # fmt: skip
        (steps / f"{turn:03d}").mkdir(parents=True)
        (steps / f"{turn:03d}" / "replica-1.jsonl").write_text(
            "\n".join(json.dumps(x) for x in lines)
        )
        points.append({"rate": rate, "started_s": start, "duration_s": 100.0, "records": []})
    workload = {"num_requests": 40, "input_len": 400, "output_len": 20, "cv": 1.0, "seed": 1,
                "dataset_lengths": None}  # fmt: skip
    meta = {"target": 0.9, "workload": workload}
    args = app_args("coloc-2")
    untimed = [{k: v for k, v in p.items() if k != "started_s"} for p in points]
    configs = {"coloc-2": {"args": args, "points": points},
               "chunked-2": {"args": args, "points": untimed}}  # fmt: skip
    report = {"meta": meta, "configs": configs}
    slos = [SLO(3.0, 0.15), SLO(12.0, 0.5)]
    out = predict_per_point(report, str(profile), slos, tmp_path / "steps")
    assert list(out) == ["coloc-2"]
    base = Entry(1, 1, Coefficients(1, 1, 0), Coefficients(1, 0, 1), 50000)
    results = [
        simulate_draws(_sim_placement(args, fit_traces([steps / f"{t:03d}"], base)),
                       sim_requests(meta, p["rate"]))
        for t, p in enumerate(points)
    ]  # fmt: skip
    for k, slo in enumerate(slos):
        curve = [(p["rate"], _sim_attainments(r, [slo])[0])
                 for p, r in zip(points, results, strict=True)]  # fmt: skip
        if k == 0:
            assert np.array(out["coloc-2"]["curve"]) == pytest.approx(np.array(curve))
        assert out["coloc-2"]["ranges"][k] == pytest.approx(goodput_range(curve, 0.9))
    fast, slow = out["coloc-2"]["tightest_slo_scale"]
    assert slow > 2 * fast  # twice the step time, at twice the rate


def _fidelity_analysis() -> dict:
    """Two configurations over a 1 x 3 map; measured and simulated goodput ranges."""
    measured = [
        {"a": (1.0, 1.0), "b": (0.5, 0.5)},  # a wins
        {"a": (0.0, 0.2), "b": (0.4, 0.4)},  # a below the lowest rate: b wins
        {"a": (2.0, math.inf), "b": (1.0, 1.0)},  # a passed every rate: a wins
    ]
    simulated = [
        {"a": (1.1, 1.1), "b": (0.7, 0.7)},  # +10% within, +40% out; a wins
        {"a": (0.1, 0.1), "b": (0.35, 0.35)},  # -50% / +inf: open; -12.5% within; b wins
        {"a": (1.5, 1.5), "b": (1.6, 1.6)},  # <= -25% out; +60% out; b wins: disagree
    ]
    cells = [
        {"ttft_scale": 1.0, "tpot_scale": k, "range": m, "simulated": s}
        for k, (m, s) in enumerate(zip(measured, simulated, strict=True), start=1)
    ]
    return {"slo_map": cells}


def test_fidelity_over_the_map_classes_each_error_and_compares_winners():
    from bench.report import clear_winner, error_class, fidelity, fidelity_table

    assert error_class((1.1, 1.1), (1.0, 1.0), 0.15) == "within"
    assert error_class((0.1, 0.1), (0.0, 0.2), 0.15) == "open"  # anything from -50% up
    assert error_class((0.1, 0.1), (0.0, 0.05), 0.15) == "out"  # at least +100%
    assert error_class((1.5, 1.5), (2.0, math.inf), 0.15) == "out"  # at most -25%
    assert error_class((2.1, 2.1), (2.0, math.inf), 0.15) == "open"
    assert clear_winner({"a": (2.0, math.inf), "b": (1.0, 1.0)}) == "a"
    assert clear_winner({"a": (0.0, 0.2), "b": (0.1, 0.1)}) is None  # a may be above b
    a = _fidelity_analysis()
    result = fidelity(a, "simulated")
    assert result["counts"] == {"within": 2, "out": 3, "open": 1}
    assert result["winners"] == {"agree": 2, "disagree": 1}
    assert result["cells"][0]["errors"] == {"a": "+10%", "b": "+40%"}
    text = fidelity_table(result, {"ttft": [1.0], "tpot": [1, 2, 3]})
    assert "| 1 | +10% / +40% | - / -13% | <= -25% / +60% |" in text
    assert "Within 15%: 2 of 6" in text and "Same clear winner in 2 of 3 cells" in text
    assert fidelity(a, "simulated_in_situ") is None  # nothing simulated from traces


def test_load_requests_are_greedy_unless_the_sampling_flags_say_otherwise():
    """vLLM's benchmark flags: temperature always sent (0 by default), the others only when
    given; every request of a run carries the same fields, and the experiment's metadata
    records them."""
    import argparse

    from bench.experiment import _meta
    from bench.loadgen import add_workload_args, make_requests, sampling_of
    from bench.metrics import SLO

    parser = argparse.ArgumentParser()
    add_workload_args(parser)
    plain = make_requests(parser.parse_args(["--input-len", "8"]), None, 2.0, 3)
    assert [r.sampling for r in plain] == [{"temperature": 0.0}] * 3
    assert sampling_of(argparse.Namespace(top_k=5)) == {"temperature": 0.0, "top_k": 5}
    args = parser.parse_args(["--input-len", "8", "--temperature", "0.7", "--top-p", "0.95"])
    sampled = make_requests(args, None, 2.0, 3)
    assert [r.sampling for r in sampled] == [{"temperature": 0.7, "top_p": 0.95}] * 3
    assert [r.prompt for r in sampled] == [r.prompt for r in plain]  # the same workload
    sampled[0].sampling["top_k"] = 5  # each request its own dict
    assert "top_k" not in sampled[1].sampling
    args.argv, args.slo_source, args.target, args.num_requests = [], "test", 0.9, 3
    meta = _meta(args, SLO(1, 1), {}, None)
    assert meta["workload"]["sampling"] == {"temperature": 0.7, "top_p": 0.95}


def test_a_clusters_serve_mode_reaches_its_processes_not_this_one(monkeypatch):
    """Ray's processes inherit the environment ray.init starts them in: the mode's settings
    are there then (HAProxy's ports the cluster's own), and afterwards this process's
    environment is as it was (a variable it had keeps its value, one it lacked is gone)."""
    import os

    import ray
    from ray import serve

    from bench.experiment import Cluster

    seen, options = {}, []
    names = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED")
    monkeypatch.setattr(ray, "init", lambda **kw: seen.update(os.environ) or options.append(kw))
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", lambda **kw: options.append(kw))
    monkeypatch.setattr(serve, "shutdown", lambda: None)
    monkeypatch.delenv(names[0], raising=False)
    monkeypatch.setenv(names[1], "0")
    with Cluster(serve_mode="haproxy", env={"SPLITSERVE_BENCH_MARK": "on"}):
        assert names[0] not in os.environ and os.environ[names[1]] == "0"
    assert [seen[n] for n in names] == ["1", "1"]
    assert seen["RAY_SERVE_HAPROXY_STATS_PORT"] != "8404"
    # the controller's setting and the cluster's own variables, inherited too: no
    # runtime_env, which every replica would inherit (a second Python start per worker)
    assert seen["RAY_SERVE_FORCE_STOP_UNHEALTHY_REPLICAS"] == "1"
    assert seen["SPLITSERVE_BENCH_MARK"] == "on" and seen["TOKENIZERS_PARALLELISM"] == "false"
    init, start = options
    assert "runtime_env" not in init and "controller_options" not in start
    seen.clear()
    with Cluster():
        assert names[0] not in seen and seen[names[1]] == "0"


def test_a_killed_experiment_still_shuts_its_cluster_down(monkeypatch):
    """SIGTERM inside `with Cluster()` unwinds as SystemExit through __exit__ (Ray's agents
    would outlive a plain kill), and the previous handler is back afterwards."""
    import os
    import signal

    import ray
    from ray import serve

    from bench.experiment import Cluster

    calls = []
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "start", lambda **kw: calls.append("serve.start"))
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as exited, Cluster():
        os.kill(os.getpid(), signal.SIGTERM)
    assert exited.value.code == 128 + signal.SIGTERM
    assert calls == ["init", "serve.start", "serve.shutdown", "ray.shutdown"]
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_cluster_whose_serve_fails_to_start_is_shut_down(monkeypatch):
    """A failed __enter__ gets no __exit__: the cluster is shut down before the error goes
    on, so the next ray.init (the next module's) starts a cluster of its own. CI once lost a
    module this way when HAProxy could not bind its port."""
    import signal

    import ray
    from ray import serve

    from bench.experiment import Cluster

    calls = []

    def refuse(**kw):
        raise RuntimeError("cannot bind socket")

    monkeypatch.setattr(ray, "init", lambda **kw: calls.append("init"))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "start", refuse)
    monkeypatch.setattr(serve, "shutdown", lambda: calls.append("serve.shutdown"))
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="cannot bind socket"), Cluster(serve_mode="haproxy"):
        pass
    assert calls == ["init", "serve.shutdown", "ray.shutdown"]
    assert signal.getsignal(signal.SIGTERM) is before


class _FakeCluster:
    """Stands in for bench.experiment.Cluster: logs deployments; each one's replicas "trace"
    into the experiment's current step directory, as the real servers do."""

    url = "http://stand-in"
    started: list = []  # every stand-in entered: (its Serve settings, whether it was exited)

    def __init__(self, env=None, serve_mode="default"):
        self.trace = Path(env["SPLITSERVE_STEP_TRACE"])
        self.serve_mode = serve_mode
        self.log: list = []

    def __enter__(self):
        _FakeCluster.last = self
        _FakeCluster.started.append([self.serve_mode, False])
        return self

    def __exit__(self, *exc):
        _FakeCluster.started[-1][1] = True
        return False

    def deploy(self, args):
        self.log.append(("deploy", args["mode"]))
        self.trace.mkdir(parents=True)
        (self.trace / "decode-1.jsonl").write_text("")

    def undeploy(self):
        self.log.append(("undeploy",))


def _fake_experiment(monkeypatch, tmp_path, send, **overrides):
    """run_experiment's orchestration with a stand-in cluster; `send(args mode, rate)` gives
    the records of one point."""
    import argparse

    import bench.experiment as experiment

    monkeypatch.setattr(experiment, "Cluster", _FakeCluster)
    monkeypatch.setattr(_FakeCluster, "started", [])
    monkeypatch.setattr(experiment, "_warm_up", lambda url, model: None)

    def fake_send(url, model, make):
        mode = _FakeCluster.last.log[-1][1]
        return lambda rate: (send(mode, rate), 10.0)

    monkeypatch.setattr(experiment, "_send", fake_send)
    args = argparse.Namespace(
        out=str(tmp_path), configs=["disagg-1p1d", "coloc-2"], model=None, rates=[0.5],
        target=0.9, bisect=0, argv=[], dataset=None, input_len=16, output_len=4,
        num_requests=10, cv=1.0, seed=0, slo_source="given",
    )  # fmt: skip
    vars(args).update(overrides)
    grid = {"headline": [1.0, 1.0], "ttft": [1.0], "tpot": [1.0]}
    return experiment.run_experiment(args, None, SLO(1.0, 0.2), grid)


def test_interleaved_configurations_take_turns_rate_by_rate(tmp_path, monkeypatch):
    """Each configuration is deployed afresh for each of its points; the rounds rotate who
    goes first; a configuration whose loosest SLO fails drops out while the others go on; a
    bisection is a turn like any other; each deployment's traces get their own directory."""
    sent = []

    def send(mode, rate):
        sent.append((mode, rate))
        bad = 0 if mode == "colocated" or rate < 0.5 else 10  # the pair fails from 0.5 on
        return _records(10 - bad, bad)

    report = _fake_experiment(monkeypatch, tmp_path, send, rates=[0.25, 0.5, 0.75], bisect=1)
    d, c = "disaggregated", "colocated"
    # round 1: d, c; round 2 starts with c; then the pair has failed (its bisection, 0.375,
    # comes in round 3, which starts with it again: two configurations left, round 3 % 2 = 0)
    assert sent == [(d, 0.25), (c, 0.25), (c, 0.5), (d, 0.5), (d, 0.375), (c, 0.75)]
    log = _FakeCluster.last.log
    assert log == [x for mode, _ in sent for x in (("deploy", mode), ("undeploy",))]
    assert [p["rate"] for p in report["configs"]["disagg-1p1d"]["points"]] == [0.25, 0.375, 0.5]
    assert list(report["configs"]) == ["disagg-1p1d", "coloc-2"]
    assert report["meta"]["order"] == "interleaved"
    steps = tmp_path / "steps"
    assert sorted(d.name for d in (steps / "disagg-1p1d").iterdir()) == ["000", "003", "004"]
    assert sorted(d.name for d in (steps / "coloc-2").iterdir()) == ["001", "002", "005"]
    assert not (steps / "current").exists()


def test_sequential_order_runs_each_sweep_on_one_deployment(tmp_path, monkeypatch):
    sent = []

    def send(mode, rate):
        sent.append((mode, rate))
        return _records(10, 0)

    _fake_experiment(monkeypatch, tmp_path, send, rates=[0.25, 0.5], order="sequential")
    d, c = "disaggregated", "colocated"
    assert sent == [(d, 0.25), (d, 0.5), (c, 0.25), (c, 0.5)]
    assert _FakeCluster.last.log == [("deploy", d), ("undeploy",), ("deploy", c), ("undeploy",)]


def test_one_cluster_serves_a_run_unless_the_serve_mode_changes(tmp_path, monkeypatch):
    """Configurations in the same Serve mode share one cluster for the whole run; one in
    another mode (read by Ray's processes when they start) gets a cluster of its own, started
    again at each change of turn, each one shut down."""
    same = tmp_path / "same"
    _fake_experiment(monkeypatch, same, lambda mode, rate: _records(10, 0), rates=[0.25, 0.5])
    assert _FakeCluster.started == [["default", True]]
    sent = []

    def send(mode, rate):
        sent.append(rate)
        return _records(10, 0)

    configs = ["disagg-1p1d", "disagg-1p1d-tput"]
    report = _fake_experiment(
        monkeypatch, tmp_path / "mixed", send, rates=[0.25, 0.5], configs=configs
    )
    # turns: plain, tput; then tput, plain (each round starts one further on)
    assert _FakeCluster.started == [["default", True], ["throughput", True], ["default", True]]
    assert sent == [0.25, 0.25, 0.5, 0.5]
    assert report["configs"]["disagg-1p1d-tput"]["serve_mode"] == "throughput"
    assert report["configs"]["disagg-1p1d"]["serve_mode"] == "default"


def test_a_run_stopped_in_a_later_configuration_keeps_the_finished_ones(tmp_path, monkeypatch):
    """report.json is written after every turn: when the second configuration fails, the
    first one's points are on disk (the orchestration only; the cluster is a stand-in)."""

    def send(mode, rate):
        if mode == "colocated":
            raise RuntimeError("the machine went away")
        return _records(9, 1)

    with pytest.raises(RuntimeError, match="went away"):
        _fake_experiment(monkeypatch, tmp_path, send)
    assert _FakeCluster.last.log[-1] == ("undeploy",)  # the failed turn cleaned up after itself
    saved = json.loads((tmp_path / "report.json").read_text())
    assert list(saved["configs"]) == ["disagg-1p1d"]
    [point] = saved["configs"]["disagg-1p1d"]["points"]
    assert point["rate"] == 0.5 and len(point["records"]) == 10
    assert analyze(saved)["configs"]["disagg-1p1d"]["curve"][0]["attainment"] == 0.9


def test_a_gpu_configuration_without_a_gpu_is_refused_before_anything_starts(tmp_path, capsys):
    import torch

    from bench.experiment import main

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv = ["--out", str(tmp_path), "--configs", "coloc-2", "gpu-coloc-1", "--rates", "1"]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--goodput", "ttft:500", "tpot:50"])
    assert e.value.code == 2 and "need 1 GPU(s); this machine has 0" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_stream_cost_rows_are_cpu_per_token_of_each_process():
    """bench/stream_cost.py: its app is the default one with the decode replica's interval,
    and a row is each process's CPU time over the tokens streamed, the median of the rounds."""
    from app.config import AppArgs
    from bench.stream_cost import _row, app_args, table

    args = AppArgs.model_validate(app_args(50))
    assert args.decode.stream_batching_interval_ms == 50 and args.mode == "disaggregated"
    rounds = [
        {"tokens": 1000, "chunks": 500, "tpot_s": 0.1,
         "cpu_s": {"ingress": 0.5, "proxy": 0.3, "client": 0.1}},
        {"tokens": 2000, "chunks": 500, "tpot_s": 0.3,
         "cpu_s": {"ingress": 2.0, "proxy": 0.2, "client": 0.4}},
        {"tokens": 1000, "chunks": 250, "tpot_s": 0.2,
         "cpu_s": {"ingress": 0.7, "proxy": 0.1, "client": 0.2}},
    ]  # fmt: skip
    row = _row(50, rounds)
    assert row["tokens_per_chunk"] == 4  # 2, 4, 4
    assert row["ingress_us_per_token"] == pytest.approx(700)  # 500, 1000, 700 µs
    assert row["proxy_us_per_token"] == pytest.approx(100)  # 300, 100, 100
    assert row["client_us_per_token"] == pytest.approx(200)  # 100, 200, 200
    assert row["tpot_ms"] == pytest.approx(200)
    assert "| 50 | 4.0 | 700 | 100 | 200 | 200.0 |" in table([row])


def test_stream_cost_fit_recovers_a_cost_per_request_and_per_chunk():
    """Rounds made from known costs (ingress 20 ms a request + 1 a chunk, proxy 10 + 0.5) at
    three chunk counts give those costs back; one chunk count alone gives no fit."""
    from bench.stream_cost import fit_costs

    def measured(chunks_per_request: float, requests: int = 16) -> dict:
        per = {"ingress": 20 + 1.0 * chunks_per_request, "proxy": 10 + 0.5 * chunks_per_request}
        cpu_s = {name: ms * requests / 1e3 for name, ms in per.items()}
        return {"requests": requests, "chunks": chunks_per_request * requests, "cpu_s": cpu_s}

    cost = fit_costs([measured(96), measured(50.5), measured(17.1)])
    assert (cost.ingress_request_ms, cost.ingress_chunk_ms) == pytest.approx((20, 1.0))
    assert (cost.proxy_request_ms, cost.proxy_chunk_ms) == pytest.approx((10, 0.5))
    with pytest.raises(ValueError, match="join tokens"):
        fit_costs([measured(96), measured(96, requests=8)])
    # a process's idle CPU over a round's time is not the requests': taken off before the fit
    idle = {"ingress": 0.02, "proxy": 0.01}  # CPU seconds a second
    slow = []
    for chunks, seconds in ((96, 15.0), (50.5, 14.0), (17.1, 13.0)):
        round_ = measured(chunks)
        cpu = {name: s + idle[name] * seconds for name, s in round_["cpu_s"].items()}
        slow.append({**round_, "cpu_s": cpu, "duration_s": seconds, "idle_cpu_per_s": idle})
    assert dataclasses.astuple(fit_costs(slow)) == pytest.approx(dataclasses.astuple(cost))
    assert fit_costs([{**r, "idle_cpu_per_s": {}} for r in slow]).ingress_request_ms > 30


def test_stream_cost_writes_its_fit_into_a_profile_and_keeps_the_rest(tmp_path):
    from bench.stream_cost import save_costs
    from placement.frontend import ServingCost
    from placement.latency_model import Coefficients, Entry, Profile

    entry = Entry(1, 1, Coefficients(1, 2, 3), Coefficients(4, 5, 6), 1000)
    Profile("m", "h200 (roofline)", [entry], 0.1).save(tmp_path / "p.yaml")
    save_costs(tmp_path / "p.yaml", ServingCost(5.0, 0.4, 2.0, 0.3))
    loaded = Profile.load(tmp_path / "p.yaml")
    assert loaded.serving == ServingCost(5.0, 0.4, 2.0, 0.3)
    assert (loaded.entries, loaded.node_contention, loaded.device) == (
        [entry],
        0.1,
        "h200 (roofline)",
    )


def test_the_tiny_model_serves_through_the_engine_and_the_experiments_configs(tmp_path):
    """bench/tiny_model.py: a random Llama with the default tokenizer that the engine loads and
    generates from, every token asked for; bench.experiment serves it in each configuration
    with --serve-model, the front-end ones differing from disagg-1p1d only where named."""
    from app.config import AppArgs
    from bench.experiment import app_args
    from bench.tiny_model import build
    from engine import EngineConfig, LLMEngine, SamplingParams

    path = build(tmp_path / "tiny")
    engine = LLMEngine(EngineConfig(model=str(path), num_threads=1))
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    [out] = engine.generate([list(range(100, 116))], params)
    assert len(out.token_ids) == 20
    assert engine.runner.model.config.hidden_size == 64
    plain = app_args("disagg-1p1d", model=str(path))
    batched = app_args("disagg-1p1d-batched", model=str(path))
    two = app_args("disagg-1p1d-2ingress", model=str(path))
    for args in (plain, batched, two):
        assert AppArgs.model_validate(args).model == str(path)
    assert batched["decode"].pop("stream_batching_interval_ms") == 50
    assert two["ingress"].pop("num_replicas") == 2
    assert batched == plain and two == plain
    # the front-end modes: the same apps, in another mode of Serve's
    from bench.experiment import CONFIGURATIONS

    for suffix, mode in (("tput", "throughput"), ("haproxy", "haproxy")):
        for base in ("disagg-1p1d", "disagg-1p1d-batched"):
            name = f"{base}-{suffix}"
            assert app_args(name) == app_args(base) and CONFIGURATIONS[name].serve_mode == mode
            assert CONFIGURATIONS[base].serve_mode == "default"
