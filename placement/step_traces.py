"""The latency model fitted to a server's own steps: what the replicas did while serving.

Each replica of a running server can write its steps (SPLITSERVE_STEP_TRACE: one JSON line per
step with its start, duration, prompt lengths and decode contexts). Fitting those instead of a
solo profile catches what a solo engine never sees: on a CPU the ingress, the proxy and Ray's
own processes take their share of the cores once every engine computes. Pure prefill steps give
the prefill coefficients, pure decode steps the decode ones (chunked steps that mix both are
left out), and how much a step slows while the other replicas run theirs gives the node
contention (placement/simulator.py). Traces of several runs (directories of one server's
replicas each) pool into one fit; overlap is only counted within a run.

Two things a mean-step simulator would miss are fitted as well: the coefficients are scaled so
that the model's mean over the traced steps is their mean (the relative-error fit sits below
it: the served steps' scatter has a long slow tail), and how the steps' log(traced / model)
drifts over time becomes the profile's step wander (placement/wander.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from placement.latency_model import (
    Coefficients,
    Entry,
    decode_curve_features,
    decode_curve_sizes,
    fit_contention,
    fit_decode_curve,
    fit_shaped,
    prefill_features,
)
from placement.wander import StepWander, fit_run_sd, fit_wander


def load_replicas(trace_dir: Path) -> list[list[dict]]:
    """One time-ordered step list per replica (*.jsonl in trace_dir)."""
    replicas = [
        [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(Path(trace_dir).glob("*.jsonl"))
    ]
    return [sorted((s for s in r if s.get("start_s")), key=_start) for r in replicas]


def trace_runs(trace_dir: Path) -> list[Path]:
    """The runs under one configuration's trace directory: its subdirectories, one per
    deployment (bench.experiment), and the directory itself where it holds traces directly."""
    trace_dir = Path(trace_dir)
    if not trace_dir.is_dir():
        return []
    runs = sorted(d for d in trace_dir.iterdir() if d.is_dir() and any(d.glob("*.jsonl")))
    return ([trace_dir] if any(trace_dir.glob("*.jsonl")) else []) + runs


def load_all_replicas(trace_dir: Path) -> list[list[dict]]:
    """Every replica of every run under trace_dir (runs apart in time: overlap stays zero)."""
    return [r for run in trace_runs(trace_dir) for r in load_replicas(run)]


MIN_WANDER = 1e-3  # log-sd below which steps keep to the model (0.1%: rounding, not drift)


@dataclass(frozen=True)
class TraceFit:
    entry: Entry  # the base with the fitted coefficients, scaled to the traced mean step
    contention: float  # node contention
    wander: StepWander | None  # how the steps drift around it; None when they do not
    report: dict | None  # what was fitted, from how many steps, how well (None: not fitted)


def fit_traces(trace_dirs: list[Path], base: Entry) -> TraceFit | None:
    """None when the traces hold fewer than 3 pure steps of either kind."""
    return fit_steps([load_replicas(d) for d in trace_dirs], base)


def fit_window(
    runs: list[list[list[dict]]], base: Entry, start_s: float, end_s: float
) -> TraceFit | None:
    """The fit to the steps that started between start_s and end_s (one rate point's), from
    loaded runs (load_replicas of each trace_runs directory); None with too few steps."""
    windowed = [
        [
            kept
            for steps in replicas
            if (kept := [s for s in steps if start_s <= s["start_s"] < end_s])
        ]
        for replicas in runs
    ]
    return fit_steps([replicas for replicas in windowed if replicas], base)


def fit_steps(runs: list[list[list[dict]]], base: Entry) -> TraceFit | None:
    """The fit to loaded runs (per run, one step list per replica); None when they hold fewer
    than 3 pure steps of either kind."""
    width = max((len(r) for r in runs), default=1)
    prefills, decodes, overheads = [], [], []
    for run, replicas in enumerate(runs):
        gaps = [g for steps in replicas for g in _busy_gaps_ms(steps)]
        # the engine loop's own time between two back-to-back steps (streaming the outputs,
        # metrics, admitting imports) is part of every step period the requests see
        overhead = float(np.median(gaps)) if gaps else 0.0
        overheads.append(overhead)
        for i, steps in enumerate(replicas):
            others = [s for j, r in enumerate(replicas) if j != i for s in r]
            shared = np.zeros((len(steps), width))
            shared[:, : len(replicas)] = _shared_ms(steps, others, len(replicas))
            shared[:, 0] += overhead
            for step, row in zip(steps, shared, strict=True):
                if step.get("draft_tokens"):  # speculative decodes: neither model's step
                    continue
                traced = _Traced((run, i), step["start_s"] * 1e3, row)
                if step["prefill_lens"] and not step["decode_contexts"]:
                    # traces written before offsets were recorded: whole prompts
                    offsets = step.get("prefill_offsets") or [0] * len(step["prefill_lens"])
                    prefills.append(((step["prefill_lens"], offsets), traced))
                elif step["decode_contexts"] and not step["prefill_lens"]:
                    decodes.append((step["decode_contexts"], traced))
    if len(prefills) < 3 or len(decodes) < 3:
        return None
    dec_batches = [b for b, _ in decodes]
    pre_features = prefill_features([b for (b, _), _ in prefills], [o for (_, o), _ in prefills])
    sizes = decode_curve_sizes(dec_batches)
    contention, [pre_work, dec_work] = fit_contention([
        (pre_features, np.array([t.shared_ms for _, t in prefills])),
        (decode_curve_features(dec_batches, sizes), np.array([t.shared_ms for _, t in decodes])),
    ])  # fmt: skip
    pre, pre_err = fit_shaped(pre_features, pre_work, base.prefill)
    dec, curve, dec_err = fit_decode_curve(dec_batches, dec_work, sizes)
    fitted = replace(base, prefill=pre, decode=dec, decode_batch_ms=curve)
    pre_model = pre_features @ np.array([pre.a, pre.b, pre.c])
    dec_model = np.array([fitted.decode_ms(b) for b in dec_batches])
    # a request's TTFT and TPOT add step times up, so the simulator needs the mean step; a fit
    # on relative error sits below it when steps scatter with a long slow tail (they do)
    scale = (float(pre_work.sum() / pre_model.sum()), float(dec_work.sum() / dec_model.sum()))
    pre_ratio, dec_ratio = pre_work / pre_model, dec_work / dec_model
    entry = _scaled(fitted, *scale)
    wander = _wander(
        [t for _, t in prefills] + [t for _, t in decodes],
        np.log(np.concatenate([pre_ratio / scale[0], dec_ratio / scale[1]])),
    )
    report = {
        "prefill": vars(entry.prefill), "decode": vars(entry.decode),
        "decode_batch_ms": dict(entry.decode_batch_ms), "node_contention": contention,
        "mean_scale": {"prefill": scale[0], "decode": scale[1]},
        "step_wander": None if wander is None else vars(wander),
        "loop_overhead_ms": float(np.mean(overheads)), "prefill_rms": pre_err,
        "decode_rms": dec_err, "prefill_steps": len(prefills), "decode_steps": len(decodes),
    }  # fmt: skip
    return TraceFit(entry, contention, wander, report)


@dataclass(frozen=True)
class _Traced:
    replica: tuple[int, int]  # (run, replica): steps of one instance over time
    start_ms: float
    shared_ms: np.ndarray  # ms spent while k = 0.. other replicas were mid-step


def _scaled(entry: Entry, prefill: float, decode: float) -> Entry:
    """The entry with every prefill time times `prefill` and every decode time times `decode`."""
    p, d = entry.prefill, entry.decode
    return replace(
        entry,
        prefill=Coefficients(p.a * prefill, p.b * prefill, p.c * prefill),
        decode=Coefficients(d.a * decode, d.b * decode, d.c * decode),
        decode_batch_ms=tuple((n, ms * decode) for n, ms in entry.decode_batch_ms),
    )


def _wander(steps: list[_Traced], log_ratio: np.ndarray) -> StepWander | None:
    """The wander of the steps' log(traced / model) over time, each replica its own series."""
    series: dict[tuple[int, int], list[tuple[float, float]]] = {}
    for step, value in zip(steps, log_ratio, strict=True):
        series.setdefault(step.replica, []).append((step.start_ms, float(value)))
    arrays = [np.array(sorted(rows)) for rows in series.values() if len(rows) > 1]
    if not arrays:
        return None
    wander = fit_wander(arrays)
    if max(wander.sd, wander.white_sd) <= MIN_WANDER:
        return None
    by_run: dict[int, list[tuple[float, float]]] = {}
    for (run, _), rows in series.items():
        by_run.setdefault(run, []).extend(rows)
    runs = [np.array(sorted(rows)) for rows in by_run.values()]
    return replace(wander, run_sd=fit_run_sd(runs, wander))


def quiet_decode_ms(
    replicas: list[list[dict]], start_s: float, end_s: float, min_steps: int = 20
) -> float | None:
    """The machine's pace between start_s and end_s: the median batch-1 decode step that ran
    while no other replica was mid-step (the same work in any configuration, so it differs
    between rate points and runs only as far as the machine does); None with fewer than
    `min_steps` such steps."""
    quiet = []
    for i, steps in enumerate(replicas):
        others = [s for j, r in enumerate(replicas) if j != i for s in r]
        window = [
            s for s in steps
            if start_s <= s["start_s"] < end_s and len(s["decode_contexts"]) == 1
            and not s["prefill_lens"] and not s.get("draft_tokens")
        ]  # fmt: skip
        if not window:
            continue
        alone = _shared_ms(window, others, 2)[:, 1] == 0
        quiet += [s["duration_ms"] for s, ok in zip(window, alone, strict=True) if ok]
    return float(np.median(quiet)) if len(quiet) >= min_steps else None


def _start(step: dict) -> float:
    return step["start_s"]


def _end(step: dict) -> float:
    return step["start_s"] + step["duration_ms"] / 1e3


def _shared_ms(steps: list[dict], others: list[dict], n_replicas: int) -> np.ndarray:
    """(len(steps), n_replicas): ms each step spent while k = 0.. other replicas ran a step."""
    edges = sorted(
        [(s["start_s"], 1) for s in others] + [(_end(s), -1) for s in others]
    )  # fmt: skip
    times = np.array([t for t, _ in edges])
    busy = np.cumsum([d for _, d in edges])  # other replicas mid-step just after each edge
    out = np.zeros((len(steps), n_replicas))
    for row, step in zip(out, steps, strict=True):
        t, end = step["start_s"], _end(step)
        i = int(np.searchsorted(times, t, side="right"))
        while t < end:
            k = int(busy[i - 1]) if i > 0 else 0
            nxt = min(times[i], end) if i < len(times) else end
            row[min(k, n_replicas - 1)] += (nxt - t) * 1e3
            t, i = nxt, i + 1
    return out


def _busy_gaps_ms(steps: list[dict], busy_s: float = 0.1) -> list[float]:
    """Idle time between consecutive steps of one replica while it was busy (the next step
    started within `busy_s` of the previous one's end)."""
    timed = sorted((s for s in steps if s.get("start_s")), key=_start)
    gaps = []
    for a, b in zip(timed, timed[1:], strict=False):
        gap = b["start_s"] - _end(a)
        if 0 <= gap < busy_s:
            gaps.append(gap * 1e3)
    return gaps
