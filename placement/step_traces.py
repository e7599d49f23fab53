"""The latency model fitted to a server's own steps: what the replicas did while serving.

Each replica of a running server can write its steps (SPLITSERVE_STEP_TRACE: one JSON line per
step with its start, duration, prompt lengths and decode contexts). Fitting those instead of a
solo profile catches what a solo engine never sees: on a CPU the ingress, the proxy and Ray's
own processes take their share of the cores once every engine computes. Pure prefill steps give
the prefill coefficients, pure decode steps the decode ones (chunked steps that mix both are
left out), and how much a step slows while the other replicas run theirs gives the node
contention (placement/simulator.py). Traces of several runs (directories of one server's
replicas each) pool into one fit; overlap is only counted within a run.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from placement.latency_model import (
    Entry,
    decode_curve_features,
    decode_curve_sizes,
    fit_contention,
    fit_decode_curve,
    fit_relative,
    prefill_features,
)


def load_replicas(trace_dir: Path) -> list[list[dict]]:
    """One time-ordered step list per replica (*.jsonl in trace_dir)."""
    replicas = [
        [json.loads(line) for line in path.read_text().splitlines()]
        for path in sorted(Path(trace_dir).glob("*.jsonl"))
    ]
    return [sorted((s for s in r if s.get("start_s")), key=_start) for r in replicas]


def fit_traces(trace_dirs: list[Path], base: Entry) -> tuple[Entry, float, dict] | None:
    """-> (base with the fitted coefficients, node contention, fit report), or None when the
    traces hold fewer than 3 pure steps of either kind."""
    runs = [load_replicas(d) for d in trace_dirs]
    width = max((len(r) for r in runs), default=1)
    prefills, decodes, overheads = [], [], []
    for replicas in runs:
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
                if step["prefill_lens"] and not step["decode_contexts"]:
                    prefills.append((step["prefill_lens"], row))
                elif step["decode_contexts"] and not step["prefill_lens"]:
                    decodes.append((step["decode_contexts"], row))
    if len(prefills) < 3 or len(decodes) < 3:
        return None
    pre_batches, dec_batches = [b for b, _ in prefills], [b for b, _ in decodes]
    pre_features = prefill_features(pre_batches)
    sizes = decode_curve_sizes(dec_batches)
    contention, [pre_work, dec_work] = fit_contention([
        (pre_features, np.array([r for _, r in prefills])),
        (decode_curve_features(dec_batches, sizes), np.array([r for _, r in decodes])),
    ])  # fmt: skip
    pre, pre_err = fit_relative(pre_features, pre_work)
    dec, curve, dec_err = fit_decode_curve(dec_batches, dec_work, sizes)
    fit = {
        "prefill": vars(pre), "decode": vars(dec), "decode_batch_ms": dict(curve),
        "node_contention": contention, "loop_overhead_ms": float(np.mean(overheads)),
        "prefill_rms": pre_err, "decode_rms": dec_err, "prefill_steps": len(prefills),
        "decode_steps": len(decodes),
    }  # fmt: skip
    return replace(base, prefill=pre, decode=dec, decode_batch_ms=curve), contention, fit


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
