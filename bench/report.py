"""From an experiment's raw records to goodput, the SLO-scale map, the simulator's predictions,
a markdown table and PNG plots.

    python -m bench.report bench/results/goodput-512-64/report.json [--profile profile.yaml]

SLOs are a unit (TTFT = the profiled single-request prefill time of the workload's prompt,
TPOT = the profiled batch-1 decode step) times a scale per target, so a grid of scales reads
the same on any device. Goodput per configuration and grid cell comes from the same measured
requests (thresholds change, the runs do not). With a profile, the placement simulator replays
each configuration on the very same arrival schedule and lengths: its predicted goodput sits
next to the measured one, at the headline SLO and at every cell of the map (how often it is
within 15%, and whether both name the same winner), and its tightest SLO scale sits next to the
measured one at each rate: the error in latency at the target percentile, which stays readable
where a flat attainment curve near the target makes the goodput's error large. With the step
traces (--steps) it also predicts with the latency model fitted to the in-server steps, and
replays each measured point with the steps that ran during it (the machine's pace there taken
out of the comparison: a check of the simulator's queueing model, not a forecast).
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.metrics import (
    SLO,
    RateCount,
    RequestRecord,
    attainment,
    goodput_range,
    goodput_samples,
    interval,
    percentiles,
    tightest_slo_scale,
)

DEFAULT_GRID = {
    "headline": [5.5, 2.0],  # the reference's proportions: TTFT 5.5x prefill, TPOT 2x decode
    "ttft": [2.0, 3.5, 5.5, 8.0, 12.0],
    "tpot": [1.25, 1.5, 2.0, 3.0, 4.0],
}
KV_TRANSFER_MS_PER_TOKEN = 0.025  # bench.kv_transfer, shm, this machine: 12.6 ms / 512 tokens
BOOTSTRAP_SAMPLES = 2000
INTERVAL_LEVEL = 0.9
FIDELITY_TOLERANCE = 0.15  # the placement issue's target for the simulator
BAND_LEVEL = 0.9  # the band of simulated re-runs beside each measured attainment
# the simulator's two sources of step times: analysis keys and what they mean
SIMULATIONS = (
    ("simulated", "the profile"),
    ("simulated_in_situ", "in-server steps"),
    ("simulated_per_point", "each rate point's own in-server steps"),
)
# the per-point replay knows the machine's pace at each point, which no prediction made before
# a run can: it measures the simulator's queueing and batching, not its forecast
PREDICTIONS = ("simulated", "simulated_in_situ")


def loosest_slo(unit: SLO, grid: dict) -> SLO:
    return unit.scaled_each(max(grid["ttft"]), max(grid["tpot"]))


def slo_unit_from_profile(
    path: str, input_len: int, output_len: int, items=None, prefix_len: int = 0
) -> SLO:
    """TTFT unit = prefill of one mean-length prompt (with `prefix_len` shared tokens before
    it, computed whole); TPOT unit = a batch-1 decode step at the mean context (prompt + half
    the output), from the profile's tp=1, pp=1 entry."""
    from placement.latency_model import Profile

    entry = Profile.load(path).entry(1, 1)
    if items:
        input_len = round(float(np.mean([i.input_len for i in items])))
        output_len = round(float(np.mean([i.output_len for i in items])))
    input_len += prefix_len
    prefill_ms = entry.prefill_ms([input_len])
    decode_ms = entry.decode_ms([input_len + output_len // 2])
    return SLO(prefill_ms / 1e3, decode_ms / 1e3)


def _records(point: dict) -> list[RequestRecord]:
    return [RequestRecord(*row) for row in point["records"]]


def _unit(report: dict) -> SLO:
    u = report["meta"]["slo_unit"]
    return SLO(u["ttft_s"], u["tpot_s"])


def curve(points: list[dict], slo: SLO, target: float) -> list[dict]:
    """Per measured rate: attainment, the tightest scale of `slo` it meets at `target`, and
    latency percentiles."""
    rows = []
    for p in points:
        records = _records(p)
        rows.append(
            {
                "rate": p["rate"],
                "attainment": attainment(records, slo),
                "tightest_slo_scale": tightest_slo_scale(records, slo, target),
                "errors": sum(not r.ok for r in records),
                "ttft_s": percentiles([r.ttft_s for r in records]),
                "tpot_s": percentiles([r.tpot_s for r in records]),
                **_host_columns(p.get("host")),
            }
        )
    return rows


def _host_columns(condition: dict | None) -> dict:
    """The point's host probe (bench.host) as curve columns; none for older reports."""
    if condition is None:
        return {}
    steal = condition.get("steal_share")
    return {
        "host_copy_gbs": condition["copy_gbs"],
        "host_matmul_gflops": condition["matmul_gflops"],
        "host_steal_pct": None if steal is None else 100 * steal,
    }


def sweep_of(points: list[dict], slo: SLO) -> list[tuple[float, float]]:
    """(rate, attainment) of each measured rate under `slo`."""
    return [(p["rate"], attainment(_records(p), slo)) for p in points]


def bootstrap(configs: dict, slo: SLO, target: float, seed: int = 0) -> dict[str, np.ndarray]:
    """Per configuration, the goodput of BOOTSTRAP_SAMPLES resamples of its requests."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, c in configs.items():
        counts = []
        for p in c["points"]:
            records = _records(p)
            counts.append(
                RateCount(p["rate"], round(attainment(records, slo) * len(records)), len(records))
            )
        out[name] = goodput_samples(counts, target, BOOTSTRAP_SAMPLES, rng)
    return out


def sides(colocated: set[str], values: dict) -> tuple[list, list] | None:
    """Per-configuration values split into (disaggregated, colocated); None when a side is
    empty, so that no ratio of the two exists."""
    disagg = [v for n, v in values.items() if n not in colocated]
    coloc = [v for n, v in values.items() if n in colocated]
    return (disagg, coloc) if disagg and coloc else None


def ratio_samples(colocated: set[str], samples: dict[str, np.ndarray]) -> np.ndarray | None:
    """disagg_ratio of each resample (infinite where no colocated configuration passed)."""
    if (split := sides(colocated, samples)) is None:
        return None
    disagg, coloc = split
    top, base = np.max(disagg, axis=0), np.max(coloc, axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(base > 0, top / np.where(base > 0, base, 1), np.inf)


def slo_map(report: dict) -> list[dict]:
    """Goodput of every configuration at every (TTFT scale, TPOT scale) of the grid."""
    meta, unit = report["meta"], _unit(report)
    cells = []
    for kt in meta["grid"]["ttft"]:
        for kp in meta["grid"]["tpot"]:
            slo = unit.scaled_each(kt, kp)
            # where the sweep did not bracket the crossing: a one-sided bound
            ranges = {
                n: goodput_range(sweep_of(c["points"], slo), meta["target"])
                for n, c in report["configs"].items()
            }
            goodputs = {n: lo for n, (lo, _) in ranges.items()}
            cells.append({"ttft_scale": kt, "tpot_scale": kp, "goodput": goodputs, "range": ranges})
    return cells


def ratio_range(colocated: set[str], ranges: dict[str, tuple[float, float]]):
    """Range of best disaggregated / best colocated goodput given each goodput's range (None
    when either side is missing)."""
    if (split := sides(colocated, ranges)) is None:
        return None
    return quotient(*map(best_of, split))


def best_of(ranges: list[tuple[float, float]]) -> tuple[float, float]:
    """Range of the largest of several goodputs given as ranges."""
    return max(lo for lo, _ in ranges), max(hi for _, hi in ranges)


def quotient(a: tuple[float, float], b: tuple[float, float]) -> tuple[float, float]:
    """Range of a / b for two ranges of positive quantities."""
    return a[0] / b[1], a[1] / b[0] if b[0] > 0 else math.inf


def disagg_ratio(colocated: set[str], rates: dict[str, float]) -> float | None:
    """Best disaggregated goodput / best colocated goodput (None when either is missing)."""
    if (split := sides(colocated, rates)) is None:
        return None
    disagg, coloc = split
    if max(coloc) == 0:
        return float("inf") if max(disagg) > 0 else None
    return max(disagg) / max(coloc)


def analyze(report: dict, profile: str | None = None, steps: Path | None = None) -> dict:
    meta, unit = report["meta"], _unit(report)
    headline = unit.scaled_each(*meta["grid"]["headline"])
    configs = report["configs"]
    ranges = {
        n: goodput_range(sweep_of(c["points"], headline), meta["target"])
        for n, c in configs.items()
    }
    rates = {n: lo for n, (lo, _) in ranges.items()}  # the range's low end is the goodput
    colocated = {n for n, c in configs.items() if c["colocated"]}
    coloc_ranges = [ranges[n] for n in colocated]
    best_coloc = max((rates[n] for n in colocated), default=None)
    samples = bootstrap(configs, headline, meta["target"])
    ratios = ratio_samples(colocated, samples)
    out = {
        "headline_slo": {"ttft_s": headline.ttft_s, "tpot_s": headline.tpot_s},
        "configs": {},
        "disagg_over_best_colocated": disagg_ratio(colocated, rates),
        "ratio_range": ratio_range(colocated, ranges),
        "ratio_interval": None if ratios is None else interval(ratios, INTERVAL_LEVEL),
        "interval_level": INTERVAL_LEVEL,
        "slo_map": slo_map(report),
    }
    # the headline first, then every cell of the map: one simulation per rate serves them all
    slos = [headline] + [unit.scaled_each(c["ttft_scale"], c["tpot_scale"]) for c in out["slo_map"]]
    simulations = {
        "simulated": predict(report, profile, slos) if profile else {},
        "simulated_in_situ": predict(report, profile, slos, steps) if profile and steps else {},
        "simulated_per_point": predict_per_point(report, profile, slos, steps)
        if profile and steps
        else {},
    }
    for key, pred in simulations.items():
        for k, cell in enumerate(out["slo_map"] if pred else [], start=1):
            cell[key] = {n: v["ranges"][k] for n, v in pred.items()}
    for name, c in configs.items():
        row = {
            "description": c["description"],
            "colocated": c["colocated"],
            "cores": c["cores"],
            "goodput_rps": rates[name],
            "goodput_range_rps": ranges[name],
            "goodput_interval_rps": interval(samples[name], INTERVAL_LEVEL),
            "goodput_per_core": rates[name] / c["cores"],
            "vs_best_colocated": rates[name] / best_coloc if best_coloc else None,
            "vs_best_colocated_range": quotient(ranges[name], best_of(coloc_ranges))
            if coloc_ranges
            else None,
            "curve": curve(c["points"], headline, meta["target"]),
        }
        if steps is not None:
            for point, pace in zip(row["curve"], machine_pace(c["points"], steps / name),
                                   strict=True):  # fmt: skip
                point["quiet_decode_ms"] = pace
        for key, pred in simulations.items():
            if name in pred:
                for field in ("tightest_slo_scale", "attainment_band"):
                    for point, value in zip(row["curve"], pred[name][field], strict=True):
                        point[f"{key}_{field}"] = value
        if name in (predicted := simulations["simulated"]):
            row["simulated_goodput_range_rps"] = predicted[name]["ranges"][0]
            row["simulated_goodput_rps"] = predicted[name]["ranges"][0][0]
            row["simulated_curve"] = predicted[name]["curve"]
        for key in ("simulated_in_situ", "simulated_per_point"):
            if name in (pred := simulations[key]):
                row[f"{key}_range_rps"] = pred[name]["ranges"][0]
                row[f"{key}_rps"] = pred[name]["ranges"][0][0]
        if name in simulations["simulated_in_situ"]:
            row["in_situ_fit"] = simulations["simulated_in_situ"][name]["fit"]
        out["configs"][name] = row
    for key, _ in SIMULATIONS:
        out[f"fidelity_{key}"] = fidelity(out, key)
    return out


def sim_requests(meta: dict, rate: float):
    """The arrival schedule and lengths the load generator sent at `rate`, for the simulator."""
    from bench.loadgen import dataset_schedule
    from placement.workload import SimRequest, Workload

    w = meta["workload"]
    prefix, groups = w.get("prefix_len", 0), w.get("num_prefixes", 1)  # older reports: none
    workload = Workload(
        w["num_requests"], w["input_len"], w["output_len"], w["cv"], None, prefix, groups
    )
    if w["dataset_lengths"]:
        lengths = w["dataset_lengths"]
        schedule = dataset_schedule(len(lengths), w["num_requests"], rate, w["cv"], w["seed"])
        ids = workload.prefix_ids(len(schedule), w["seed"])
        return [
            SimRequest(t * 1e3, prefix + lengths[i][0], lengths[i][1], prefix, g)
            for (t, i), g in zip(schedule, ids, strict=True)
        ]
    return workload.sample(rate, w["seed"])


def placement_for(args: dict, entry):
    """The simulator's view of a configuration: replicas, budgets and KV capacity from its
    serve args, step times from the profile entry."""
    from engine.model_store import resolve_model
    from placement.hardware import ModelSpec
    from placement.simulator import PREFIX_AFFINITY, InstanceSpec, Placement

    config = resolve_model(args.get("model"), args.get("revision")) / "config.json"
    model = ModelSpec.from_config(config, args["dtype"], args.get("kv_cache_dtype", "auto"))

    def spec(phase: str) -> InstanceSpec:
        p = args[phase]
        e = p["engine"]
        block = e.get("block_size", 16)
        tokens = e["kv_cache_memory_mb"] * 2**20 // model.kv_bytes_per_token // block * block
        return InstanceSpec(
            replace(entry, kv_capacity_tokens=tokens),
            count=p["num_replicas"],
            max_batch_tokens=e.get("max_num_batched_tokens", 2048),
            max_batch_size=e.get("max_num_seqs", 32),
            chunked_prefill=e.get("chunked_prefill", False),
            prefix_caching=e.get("enable_prefix_caching", False),
            block_size=block,
            prefix_affinity=p.get("prefix_affinity_max_imbalance", PREFIX_AFFINITY)
            if p.get("prefix_affinity", True)
            else None,
        )

    if args["mode"] == "colocated":
        return Placement(colocated=spec("colocated"))
    return Placement(
        prefill=spec("prefill"),
        decode=spec("decode"),
        kv_transfer_ms_per_token=KV_TRANSFER_MS_PER_TOKEN,
    )


def step_entry(trace_dir: Path, base):
    """The latency model fitted to one configuration's in-server steps (placement/
    step_traces.py: entry, contention, wander, report), or None with too few steps."""
    from placement.step_traces import fit_traces, trace_runs

    return fit_traces(trace_runs(trace_dir), base)


def predict(report: dict, profile: str, slos: list[SLO], steps: Path | None = None) -> dict:
    """Simulated attainment on a fine rate grid over the measured range under each of `slos`
    (one simulation per rate serves them all: thresholds change, the runs do not), and each
    SLO's goodput; with `steps` (the experiment's step traces), per configuration with its
    in-server step times. The curve is the first SLO's."""
    from placement.latency_model import Profile
    from placement.simulator import simulate_draws
    from placement.step_traces import TraceFit

    meta = report["meta"]
    loaded = Profile.load(profile)
    base = loaded.entry(1, 1)
    out = {}
    for name, c in report["configs"].items():
        source = TraceFit(base, loaded.node_contention, loaded.step_wander, None)
        if steps is not None:
            source = step_entry(steps / name, base)
            if source is None:
                continue
        placement = _sim_placement(c["args"], source)
        top = 1.5 * max(p["rate"] for p in c["points"])
        grid = np.linspace(top / 60, top, 60)
        per_rate = [
            _sim_attainments(simulate_draws(placement, sim_requests(meta, r)), slos) for r in grid
        ]
        curves = [
            [(float(r), a[k]) for r, a in zip(grid, per_rate, strict=True)]
            for k in range(len(slos))
        ]
        out[name] = {
            "ranges": [goodput_range(c_, meta["target"]) for c_ in curves],
            "curve": curves[0],
            "fit": source.report,
            # at each measured rate, the first SLO's scale that the simulation meets: an error
            # in latency, which stays small where the goodput's error does not (a flat curve)
            **_point_checks(
                [(placement, sim_requests(meta, p["rate"])) for p in c["points"]],
                slos[0],
                meta["target"],
            ),
        }
    return out


def predict_per_point(report: dict, profile: str, slos: list[SLO], steps: Path) -> dict:
    """Each measured rate point replayed with the latency model fitted to the steps that ran
    during it (placement.step_traces.fit_window), on its arrival schedule: attainment at the
    measured rates only, and goodput from them as the measurement's. What stays between this
    and the measurement is the simulator's queueing, batching and contention model, with the
    machine's drift between points taken out. A configuration is left out where a point has no
    wall-clock start or too few traced steps."""
    from placement.latency_model import Profile
    from placement.simulator import simulate_draws
    from placement.step_traces import fit_window, load_replicas, trace_runs

    meta = report["meta"]
    base = Profile.load(profile).entry(1, 1)
    out = {}
    for name, c in report["configs"].items():
        runs = [load_replicas(d) for d in trace_runs(steps / name)]
        fits = [
            None
            if p.get("started_s") is None
            else fit_window(runs, base, p["started_s"], p["started_s"] + p["duration_s"])
            for p in c["points"]
        ]
        if any(f is None for f in fits):
            continue
        scheduled = [
            (_sim_placement(c["args"], f), sim_requests(meta, p["rate"]))
            for p, f in zip(c["points"], fits, strict=True)
        ]
        typical = [simulate_draws(*run) for run in scheduled]
        per_rate = [_sim_attainments(results, slos) for results in typical]
        curves = [
            [(p["rate"], a[k]) for p, a in zip(c["points"], per_rate, strict=True)]
            for k in range(len(slos))
        ]
        out[name] = {
            "ranges": [goodput_range(c_, meta["target"]) for c_ in curves],
            "curve": curves[0],
            **_point_checks(scheduled, slos[0], meta["target"], typical),
        }
    return out


def _point_checks(
    runs: list[tuple], slo: SLO, target: float, typical: list[list] | None = None
) -> dict[str, list]:
    """At each measured point ((placement, its schedule) in `runs`): the tightest scale of
    `slo` that `target` of the simulated requests meet (the forecast at the typical machine
    pace: simulate_draws, or the caller's results of it in `typical`), and the BAND_LEVEL
    band of the attainment at `slo` over simulated re-runs of the point
    (placement.simulator.attainment_band)."""
    from placement.simulator import SLO as SimSLO
    from placement.simulator import attainment_band, simulate_draws

    if typical is None:
        typical = [simulate_draws(*run) for run in runs]
    in_ms = SimSLO(slo.ttft_s * 1e3, slo.tpot_s * 1e3)
    return {
        "tightest_slo_scale": [
            tightest_slo_scale(_sim_records(results), slo, target) for results in typical
        ],
        "attainment_band": [
            list(attainment_band(placement, requests, in_ms, BAND_LEVEL))
            for placement, requests in runs
        ],
    }


def _sim_placement(args: dict, source):
    """placement_for with a fit's (placement.step_traces.TraceFit) entry, contention and
    wander."""
    return replace(
        placement_for(args, source.entry), node_contention=source.contention, wander=source.wander
    )


def _sim_records(results: list) -> list[RequestRecord]:
    """Simulated requests as two-token records with their TTFT and TPOT (arrival at 0)."""
    return [
        RequestRecord(0.0, r.ttft_ms / 1e3, (r.ttft_ms + r.tpot_ms) / 1e3, 2)
        if math.isfinite(r.ttft_ms + r.tpot_ms)
        else RequestRecord(0.0, None, None, 0, error="unfinished")
        for r in results
    ]


def _sim_attainments(results: list, slos: list[SLO]) -> list[float]:
    """Share of simulated requests that meet both targets, under each SLO."""
    ttft = np.array([r.ttft_ms for r in results]) / 1e3
    tpot = np.array([r.tpot_ms for r in results]) / 1e3
    return [float(np.mean((ttft <= s.ttft_s) & (tpot <= s.tpot_s))) for s in slos]


def bounded_text(lo: float, hi: float, fmt, below: str = "<=") -> str:
    """A value, or the one-sided bound a sweep gives (`>=` / `below`), or `?`."""
    if lo == hi:
        return fmt(lo)
    if hi == math.inf:
        return "?" if lo == 0 else ">=" + fmt(lo)
    if lo == 0:
        return below + fmt(hi)
    return f"{fmt(lo)}-{fmt(hi)}"


def error_bounds(sim: tuple[float, float], measured: tuple[float, float]) -> tuple[float, float]:
    """The range of a prediction's relative error that a predicted and a measured goodput
    range allow (each a value where low == high, else a one-sided bound from the sweep)."""
    (s_lo, s_hi), (m_lo, m_hi) = sim, measured
    lo = s_lo / m_hi - 1
    hi = s_hi / m_lo - 1 if m_lo > 0 else math.inf
    return lo, hi


def error_text(sim: tuple[float, float], measured: tuple[float, float]) -> str:
    """Relative error of a prediction, or the bound on it that two ranges allow."""
    lo, hi = error_bounds(sim, measured)
    if lo == hi:
        return f"{lo:+.0%}"
    if lo > 0:
        return f">= {lo:+.0%}"
    if hi < 0:
        return f"<= {hi:+.0%}"
    return "-"


def error_class(sim: tuple[float, float], measured: tuple[float, float], tolerance: float) -> str:
    """'within' when every error the ranges allow is within `tolerance`, 'out' when none is,
    else 'open' (the measurement's bound neither confirms nor refutes the prediction)."""
    lo, hi = error_bounds(sim, measured)
    if -tolerance <= lo and hi <= tolerance:
        return "within"
    if lo > tolerance or hi < -tolerance:
        return "out"
    return "open"


def clear_winner(ranges: dict[str, tuple[float, float]]) -> str | None:
    """The configuration whose goodput is certainly the highest (its range's low end above
    every other's high end), else None."""
    for name, (lo, _) in ranges.items():
        if all(lo > hi for other, (_, hi) in ranges.items() if other != name):
            return name
    return None


def fidelity(analysis: dict, key: str, tolerance: float = FIDELITY_TOLERANCE) -> dict | None:
    """The simulator against the measurement over the whole SLO map (`key`: 'simulated' or
    'simulated_in_situ'): per cell and configuration the error and its class, how many pairs
    fall in each class, and in how many cells with a clear winner on both sides the two agree
    on it (what a placement decision rests on). None where nothing was simulated."""
    cells = [c for c in analysis["slo_map"] if key in c]
    if not cells:
        return None
    counts = {"within": 0, "out": 0, "open": 0}
    winners = {"agree": 0, "disagree": 0}
    rows = []
    for cell in cells:
        errors = {}
        for name, sim in cell[key].items():
            measured = cell["range"][name]
            errors[name] = error_text(sim, measured)
            counts[error_class(sim, measured, tolerance)] += 1
        rows.append({"ttft_scale": cell["ttft_scale"], "tpot_scale": cell["tpot_scale"],
                     "errors": errors})  # fmt: skip
        measured_best, sim_best = clear_winner(cell["range"]), clear_winner(cell[key])
        if measured_best and sim_best:
            winners["agree" if measured_best == sim_best else "disagree"] += 1
    return {"tolerance": tolerance, "cells": rows, "counts": counts, "winners": winners}


def fidelity_table(result: dict, grid: dict) -> str:
    """Rows: TTFT scale; columns: TPOT scale; cell: each configuration's error, in order."""
    head = "| TTFT x \\ TPOT x | " + " | ".join(f"{k:g}" for k in grid["tpot"]) + " |"
    lines = [head, "|---" * (len(grid["tpot"]) + 1) + "|"]
    for kt in grid["ttft"]:
        cells = [" / ".join(c["errors"].values()) for c in result["cells"] if c["ttft_scale"] == kt]
        lines.append(f"| {kt:g} | " + " | ".join(cells) + " |")
    counts, winners = result["counts"], result["winners"]
    lines.append(
        f"\nWithin {result['tolerance']:.0%}: {counts['within']} of "
        f"{sum(counts.values())} (configuration, SLO) pairs; outside: {counts['out']}; "
        f"undetermined by the measured bounds: {counts['open']}. Same clear winner in "
        f"{winners['agree']} of {winners['agree'] + winners['disagree']} cells where both "
        "have one."
    )
    return "\n".join(lines)


def _goodput_text(bounds: tuple[float, float]) -> str:
    return bounded_text(*bounds, "{:.3f}".format, below="<")


def _ratio_text(bounds: tuple[float, float] | None) -> str:
    return "-" if bounds is None else bounded_text(*bounds, "{:.2f}x".format)


def _sim_cells(row: dict, key: str) -> str:
    """Prediction and its error; `out` where it lies outside the measurement's interval."""
    if (sim := row.get(f"{key}_range_rps")) is None:
        return "- | -"
    low, high = row["goodput_interval_rps"]
    outside = " (out)" if sim[0] > high or sim[1] < low else ""
    return f"{_goodput_text(sim)} | {error_text(sim, row['goodput_range_rps'])}{outside}"


_EXTRA_COLUMNS = {  # simulations beside the profile's, where they ran: their table heading
    "simulated_in_situ": "simulated, in-server steps",
    "simulated_per_point": "replayed, each point's steps",
}


def table(analysis: dict) -> str:
    extra = [
        k for k in _EXTRA_COLUMNS if any(f"{k}_rps" in r for r in analysis["configs"].values())
    ]
    level = analysis.get("interval_level", INTERVAL_LEVEL)
    head = f"| configuration | cores | goodput (req/s) | {level:.0%} interval | per core "
    head += "| vs best colocated | simulated goodput | sim error |"
    head += "".join(f" {_EXTRA_COLUMNS[k]} | error |" for k in extra)
    lines = [head, "|---" * (8 + 2 * len(extra)) + "|"]
    for name, row in analysis["configs"].items():
        low, high = row["goodput_interval_rps"]
        per_core = tuple(v / row["cores"] for v in row["goodput_range_rps"])
        line = (
            f"| {name} | {row['cores']} | {_goodput_text(row['goodput_range_rps'])} | "
            f"{low:.3f}-{high:.3f} | {_goodput_text(per_core)} | "
            f"{_ratio_text(row['vs_best_colocated_range'])} | "
            f"{_sim_cells(row, 'simulated_goodput')} |"
        )
        line += "".join(f" {_sim_cells(row, k)} |" for k in extra)
        lines.append(line)
    return "\n".join(lines)


def per_rate_table(analysis: dict, key: str, fmt: str, beside: str | None = None) -> str:
    """Per configuration and measured rate, the `key` of its curve row ('-' where none), e.g.
    the SLO-scale sweep: the smallest multiple of the headline SLO (TTFT and TPOT together)
    that the rate still meets; with `beside`, that key's value in parentheses after it."""
    configs = analysis["configs"]
    rates = sorted({p["rate"] for row in configs.values() for p in row["curve"]})
    lines = [
        "| configuration | " + " | ".join(f"{r:g} req/s" for r in rates) + " |",
        "|---" * (len(rates) + 1) + "|",
    ]

    def text(point: dict | None, k: str) -> str:
        value = None if point is None else point.get(k)
        if isinstance(value, list):  # a band
            return "-".join(format(v, fmt) for v in value)
        return "-" if value is None else format(value, fmt)

    for name, row in configs.items():
        points = {p["rate"]: p for p in row["curve"]}
        cells = [text(points.get(r), key) for r in rates]
        if beside is not None:
            cells = [
                f"{cell} ({text(points.get(r), beside)})" if r in points else cell
                for cell, r in zip(cells, rates, strict=True)
            ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def scale_errors(analysis: dict, key: str) -> list[float]:
    """Simulated / measured tightest SLO scale - 1 at every measured rate where both are
    finite (`key`: 'simulated' or 'simulated_in_situ'): the simulator's error in latency at
    the target percentile."""
    return [
        p[f"{key}_tightest_slo_scale"] / p["tightest_slo_scale"] - 1
        for row in analysis["configs"].values()
        for p in row["curve"]
        if math.isfinite(p.get(f"{key}_tightest_slo_scale", math.inf))
        and 0 < p["tightest_slo_scale"] < math.inf
    ]


def scale_error_text(errors: list[float], tolerance: float = FIDELITY_TOLERANCE) -> str:
    if not errors:
        return ""
    size = np.abs(errors)
    return (
        f"Simulated / measured scale: median error {np.median(size):.0%} (largest "
        f"{max(errors, key=abs):+.0%}), within {tolerance:.0%} at {int(np.sum(size <= tolerance))}"
        f" of {len(errors)} measured rates."
    )


def scale_section(analysis: dict, target: float) -> str:
    """The SLO-scale sweep's table; beside each measured scale the simulator's (in-server
    steps where it ran with them), and how far the two differ."""
    ran = [
        (name, source)
        for name, source in SIMULATIONS
        if any(f"{name}_tightest_slo_scale" in p for r in analysis["configs"].values()
               for p in r["curve"])
    ]  # fmt: skip
    # in parentheses the last prediction that ran (in-server steps over the profile)
    key, what = next(((n, w) for n, w in reversed(ran) if n in PREDICTIONS), (None, ""))
    text = (
        f"Tightest SLO scale met by {target:.0%} of the requests at each measured rate (a "
        "multiple of the headline SLO; below 1: room to spare)"
    )
    if key is None:
        return text + ":\n\n" + per_rate_table(analysis, "tightest_slo_scale", ".2f")
    replayed = [
        f"Replayed with {w}: " + scale_error_text(errors).lower()
        for n, w in ran
        if n not in PREDICTIONS and (errors := scale_errors(analysis, n))
    ]
    parts = [
        f"{text}; in parentheses the simulator's, with {what}, on the same schedule:",
        per_rate_table(analysis, "tightest_slo_scale", ".2f", f"{key}_tightest_slo_scale"),
        scale_error_text(scale_errors(analysis, key)),
        *replayed,
    ]
    return "\n\n".join(part for part in parts if part)


def band_hits(analysis: dict, key: str) -> tuple[int, int]:
    """(measured rates whose headline attainment lies inside `key`'s simulated band, measured
    rates with a band)."""
    points = [
        (p["attainment"], band)
        for row in analysis["configs"].values()
        for p in row["curve"]
        if (band := p.get(f"{key}_attainment_band")) is not None
    ]
    return sum(lo <= a <= hi for a, (lo, hi) in points), len(points)


def band_section(analysis: dict) -> str:
    """The measured attainment at the headline SLO beside the band that simulated re-runs of
    the same schedule reach, and how often it lies inside: a check of the simulator that the
    measurement's own scatter (a few requests either way at 90%) cannot fail by itself."""
    from placement.wander import BAND_DRAWS

    hits = {n: band_hits(analysis, n) for n, _ in SIMULATIONS}
    ran = [(n, w) for n, w in SIMULATIONS if hits[n][1]]
    if not ran:
        return ""
    key, what = next(((n, w) for n, w in reversed(ran) if n in PREDICTIONS), ran[-1])
    counts = "; ".join(f"{w}: {hits[n][0]} of {hits[n][1]}" for n, w in ran)
    return (
        f"Measured attainment at the headline SLO; in parentheses the {BAND_LEVEL:.0%} band "
        f"of {BAND_DRAWS} simulated runs of the same schedule ({what}; each run a draw of the "
        "steps' wander, so the band is what re-running the point could measure if the "
        "simulator is right; without wander every run is the same and the band one value):\n\n"
        + per_rate_table(analysis, "attainment", ".2f", f"{key}_attainment_band")
        + f"\n\nMeasured inside the band at: {counts} measured rates."
    )


def machine_pace(points: list[dict], trace_dir: Path) -> list[float | None]:
    """Per measured rate, the machine's pace while it ran (placement.step_traces.
    quiet_decode_ms), where the point has its wall-clock start and the traces exist."""
    from placement.step_traces import load_all_replicas, quiet_decode_ms

    replicas = load_all_replicas(trace_dir)
    return [
        quiet_decode_ms(replicas, p["started_s"], p["started_s"] + p["duration_s"])
        if replicas and p.get("started_s") is not None
        else None
        for p in points
    ]


def host_section(analysis: dict) -> str:
    """The host probe at each measured rate (bench.host), where the run recorded it."""
    if not any("host_copy_gbs" in p for r in analysis["configs"].values() for p in r["curve"]):
        return ""
    return (
        "\n\nThe host at each measured rate: memory copy bandwidth (GB/s, one thread) measured "
        "just before the point, and in parentheses the hypervisor's steal share of CPU time "
        "during it (%): the host's state that day (other guests take bandwidth and CPU), not a "
        "forecast of the point's own pace:\n\n"
        + per_rate_table(analysis, "host_copy_gbs", ".1f", "host_steal_pct")
    )


def map_table(analysis: dict, grid: dict) -> str:
    """Rows: TTFT scale; columns: TPOT scale; cell: winner and disagg / best colocated.
    `>=` marks a configuration that met the SLO at every tested rate (a lower bound), `<=` a
    ratio bounded by one; a ratio between two such bounds is unknown (`?`)."""
    colocated = {n for n, r in analysis["configs"].items() if r["colocated"]}
    head = "| TTFT x \\ TPOT x | " + " | ".join(f"{k:g}" for k in grid["tpot"]) + " |"
    lines = [head, "|---" * (len(grid["tpot"]) + 1) + "|"]
    for kt in grid["ttft"]:
        cells = []
        for cell in analysis["slo_map"]:
            if cell["ttft_scale"] != kt:
                continue
            rates, ranges = cell["goodput"], cell["range"]
            best = max(rates, key=rates.get)
            bound = ">=" if ranges[best][1] == math.inf else ""
            ratio = _ratio_text(ratio_range(colocated, ranges))
            cells.append(
                "none" if rates[best] == 0 else f"{best} {bound}{rates[best]:.2f} ({ratio})"
            )
        lines.append(f"| {kt:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(analysis: dict, out: Path, target: float) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slo = analysis["headline_slo"]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, (name, row) in enumerate(analysis["configs"].items()):
        color = f"C{i}"
        xs = [p["rate"] for p in row["curve"]]
        ax.plot(xs, [p["attainment"] for p in row["curve"]], "o-", color=color, label=name)
        if "simulated_curve" in row:
            sx, sy = zip(*row["simulated_curve"], strict=True)
            ax.plot(sx, sy, "--", color=color, alpha=0.6, label=f"{name} (simulated)")
    ax.axhline(target, color="gray", lw=0.8, ls=":")
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment", ylim=(-0.02, 1.02))
    ax.set_title(f"TTFT <= {slo['ttft_s']:.2f} s and TPOT <= {slo['tpot_s'] * 1e3:.0f} ms")
    ax.legend(fontsize=7)
    fig.tight_layout()
    paths = [out / "attainment.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for metric, ax, limit in (("ttft_s", axes[0], "ttft_s"), ("tpot_s", axes[1], "tpot_s")):
        for i, (name, row) in enumerate(analysis["configs"].items()):
            xs = [p["rate"] for p in row["curve"]]
            for q, style in (("p90", "o-"), ("p50", "x:")):
                ys = [p[metric][q] for p in row["curve"]]
                ax.plot(xs, ys, style, color=f"C{i}", label=f"{name} {q.upper()}")
        ax.axhline(slo[limit], color="gray", lw=0.8, ls="--", label="SLO")
        ax.set(xlabel="request rate (req/s)", ylabel=metric.replace("_s", " (s)").upper())
        ax.set_yscale("log")
        ax.legend(fontsize=6)
    fig.tight_layout()
    paths.append(out / "latency.png")
    fig.savefig(paths[1], dpi=110)
    plt.close(fig)
    return paths


def _finite(obj):
    """JSON has no infinity: an unbounded side is written as null."""
    if isinstance(obj, float) and math.isinf(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj


_ORDER_TEXT = {  # reports written before the order was recorded ran sequentially
    "interleaved": "interleaved rate by rate",
    "sequential": "one after another",
}


def write_report(
    report: dict, out: Path, profile: str | None = None, steps: Path | None = None
) -> str:
    """analysis.json, summary.md and the plots into `out`; returns the summary."""
    analysis = analyze(report, profile, steps)
    (out / "analysis.json").write_text(json.dumps(_finite(analysis), indent=1))
    plot(analysis, out, report["meta"]["target"])
    meta = report["meta"]
    ratio_text = _ratio_text(analysis["ratio_range"])
    if analysis["ratio_interval"] is not None:
        low, high = analysis["ratio_interval"]
        ratio_text += f" ({analysis['interval_level']:.0%} interval {low:.2f}-{high:.2f}x)"
    slo = analysis["headline_slo"]
    summary = "\n\n".join(
        part
        for part in [
            f"`{meta['command']}` ({meta['date']}, {meta['machine']}, configurations "
            f"{_ORDER_TEXT[meta.get('order', 'sequential')]})",
            f"Headline SLO: TTFT <= {slo['ttft_s'] * 1e3:.0f} ms, TPOT <= "
            f"{slo['tpot_s'] * 1e3:.0f} ms (scales {meta['grid']['headline']} of the unit "
            f"{meta['slo_unit']['ttft_s'] * 1e3:.0f} / {meta['slo_unit']['tpot_s'] * 1e3:.1f} "
            f"ms, {meta['slo_unit']['source']}); disaggregated / best colocated: " + ratio_text,
            table(analysis),
            "Goodput map (winner, goodput req/s, disaggregated / best colocated):",
            map_table(analysis, meta["grid"]),
            scale_section(analysis, meta["target"]),
            band_section(analysis),
        ]
        if part
    )
    if any(p.get("quiet_decode_ms") for r in analysis["configs"].values() for p in r["curve"]):
        summary += (
            "\n\nThe machine's pace at each measured rate: the median traced batch-1 decode "
            "step (ms) that ran while no other replica computed (the same work in every "
            "configuration: differences are the machine's):\n\n"
            + per_rate_table(analysis, "quiet_decode_ms", ".1f")
        )
    summary += host_section(analysis)
    names = " / ".join(analysis["configs"])
    for key, what in SIMULATIONS:
        if (result := analysis.get(f"fidelity_{key}")) is not None:
            summary += (
                f"\n\nThe simulator ({what}) against the measurement over the SLO map: "
                f"relative error of the predicted goodput ({names}; `>=` / `<=` a bound, `-` "
                "where the measured bounds allow any error):\n\n"
                + fidelity_table(result, meta["grid"])
            )
    (out / "summary.md").write_text(summary + "\n")
    return summary


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", help="report.json written by bench.experiment")
    parser.add_argument("--profile", help="add the simulator's predictions")
    parser.add_argument(
        "--steps",
        help="step traces (DIR/<configuration>/[<turn>/]*.jsonl, from bench.experiment): also "
        "predict with the latency model fitted to each configuration's in-server steps",
    )
    args = parser.parse_args(argv)
    path = Path(args.report)
    steps = Path(args.steps) if args.steps else None
    print(write_report(json.loads(path.read_text()), path.parent, args.profile, steps))


if __name__ == "__main__":
    main()
