"""Profile the engine on this device and fit the latency model.

    python -m placement profile --out profiles/smollm2-cpu.yaml [--threads 1] [--quick]
    python -m placement profile --out served.yaml --base profiles/smollm2-cpu.yaml \
        --from-steps RUN/steps/disagg-1p1d RUN/steps/coloc-2 ...

Prefill: one step over a batch of prompts for each (batch size, prompt length) in the grid.
Decode: requests prefilled to a context length, then the median of a few decode steps, for each
(batch size, context length). Both fitted by least squares on relative error; the RMS relative
error of each fit is reported next to the profile. With three or more batch sizes in the grid the
decode step's batch term is fitted per batch size (the profile's `decode_batch_ms`): on a CPU it
is not a line, the matrix kernels change path with the number of rows.

Node contention: with `--contention-neighbours N` (default 1) the same prefill and decode steps
are then timed with N neighbour engines paused and computing, alternately; the slowdown per
neighbour goes into the profile as `node_contention` for the simulator.

`--from-steps DIR ...` measures nothing: it fits the profile to a running server's own steps
(the step traces bench.experiment writes, placement/step_traces.py), coefficients, node
contention and step wander included, keeping the rest (model, KV capacity) from `--base`. That
profile carries what the serving processes cost on this machine, which a solo engine never sees.

`--co-load N` runs N other engines (same threads each) doing back-to-back 512-token prefills
in separate processes while measuring: the step times an engine sees when its neighbours on
the machine are busy, as in a serving deployment whose replicas share the cores and memory
bandwidth (a disaggregated decode replica next to a busy prefill replica).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch

from engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig
from placement.latency_model import (
    Entry,
    Profile,
    decode_curve_sizes,
    fit_decode_curve,
    fit_relative,
    prefill_features,
)

logger = logging.getLogger(__name__)

FULL_GRID = {
    "prefill": [(1, 32), (1, 128), (1, 512), (1, 1024), (2, 256), (4, 128), (4, 512), (8, 64)],
    "decode": [
        (1, 64),
        (1, 512),
        (2, 256),
        (3, 256),
        (4, 256),
        (8, 128),
        (8, 512),
        (16, 256),
        (32, 128),
        (32, 512),
    ],  # fmt: skip
}
QUICK_GRID = {
    "prefill": [(1, 32), (1, 256), (2, 128), (4, 64)],
    "decode": [(1, 64), (4, 128), (8, 64), (8, 256)],
}


@dataclass(frozen=True)
class FitReport:
    prefill_rms_rel_error: float
    decode_rms_rel_error: float
    num_prefill_points: int
    num_decode_points: int


def _prompts(batch: int, length: int, vocab: int, rng: np.random.Generator) -> list[list[int]]:
    return rng.integers(10, vocab - 10, size=(batch, length)).tolist()


def measure_prefill(engine: LLMEngine, batch: int, length: int, rng, repeats: int = 1) -> float:
    """The median of `repeats` prefill steps of `batch` new prompts of `length` tokens: one
    step is one sample, and on a shared host one stalled sample would move the whole fit."""
    vocab = engine.runner.shape.vocab_size
    samples = []
    for _ in range(repeats):
        for ids in _prompts(batch, length, vocab, rng):
            engine.add_request(None, ids, SamplingParams(max_tokens=1))
        t0 = time.perf_counter()
        engine.step()  # the budget holds the whole batch: one step
        samples.append((time.perf_counter() - t0) * 1e3)
        while engine.has_unfinished:
            engine.step()
    return float(np.median(samples))


def measure_decode(engine: LLMEngine, batch: int, context: int, steps: int, rng) -> tuple:
    vocab = engine.runner.shape.vocab_size
    params = SamplingParams(max_tokens=steps + 2, ignore_eos=True, temperature=0.0)
    ids = [engine.add_request(None, p, params) for p in _prompts(batch, context, vocab, rng)]
    while engine.scheduler.waiting:
        engine.step()
    times, contexts = [], []
    for _ in range(steps):
        contexts.append([r.num_tokens for r in engine.scheduler.running])
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0) * 1e3)
    for rid in ids:
        engine.abort(rid)
    i = times.index(statistics.median_low(times))
    return times[i], contexts[i]


def profile(
    engine: LLMEngine, grid: dict, steps: int = 5, seed: int = 0, progress: bool = True
) -> tuple[Entry, FitReport]:
    from tqdm import tqdm

    rng = np.random.default_rng(seed)
    measure_prefill(engine, 1, 16, rng)  # warm-up
    bar = tqdm(total=len(grid["prefill"]) + len(grid["decode"]), unit="point", disable=not progress)
    pre_batches, pre_ms = [], []
    for batch, length in grid["prefill"]:
        bar.set_description(f"prefill {batch}x{length}")
        pre_ms.append(measure_prefill(engine, batch, length, rng, repeats=3))
        pre_batches.append([length] * batch)
        bar.update()
    dec_batches, dec_ms = [], []
    for batch, context in grid["decode"]:
        bar.set_description(f"decode {batch}x{context}")
        ms, contexts = measure_decode(engine, batch, context, steps, rng)
        dec_ms.append(ms)
        dec_batches.append(contexts)
        bar.update()
    bar.close()
    prefill, pre_err = fit_relative(prefill_features(pre_batches), np.array(pre_ms))
    # each grid point is a mean over steps: one point pins its batch size on the curve
    sizes = decode_curve_sizes(dec_batches, min_steps=1.0)
    decode, curve, dec_err = fit_decode_curve(dec_batches, np.array(dec_ms), sizes)
    capacity = engine.blocks.num_blocks * engine.blocks.block_size
    entry = Entry(1, 1, prefill, decode, kv_capacity_tokens=capacity, decode_batch_ms=curve)
    return entry, FitReport(pre_err, dec_err, len(pre_ms), len(dec_ms))


def _neighbour(model: str | None, threads: int, run, stop, ready) -> None:
    """A neighbour engine: 512-token prefills back to back while `run` is set."""
    torch.set_num_threads(threads)
    engine = LLMEngine(EngineConfig(model=model, num_threads=threads, kv_cache_memory_mb=128))
    rng = np.random.default_rng(1)
    ready.set()
    while not stop.is_set():
        if run.wait(0.1):
            measure_prefill(engine, 1, 512, rng)


@contextlib.contextmanager
def _neighbours(n: int, model: str | None, threads: int, running: bool = True):
    """n neighbour engines in their own processes; yields the event that runs or pauses them."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    stop, run = ctx.Event(), ctx.Event()
    if running:
        run.set()
    readies = [ctx.Event() for _ in range(n)]
    procs = [
        ctx.Process(target=_neighbour, args=(model, threads, run, stop, ready)) for ready in readies
    ]
    for p in procs:
        p.start()
    try:
        for ready in readies:
            if not ready.wait(300):
                raise RuntimeError("a neighbour engine did not start within 300 s")
        time.sleep(_SETTLE_S if n and running else 0.0)
        yield run
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()


_SETTLE_S = 2.5  # a paused neighbour finishes the prefill it is in (about 2 s here)


def measure_contention(engine: LLMEngine, run, neighbours: int, rng, rounds: int = 3) -> float:
    """The node contention: how much slower the same steps (a 512-token prefill, a batch-4
    decode) run while the neighbours compute than while they are paused, measured side by side
    and alternating so that drift on a shared machine hits both alike. -> per-neighbour
    slowdown (the simulator's processor-sharing factor), >= 0."""
    ratios = []
    for _ in range(rounds):
        times = {}
        for busy in (False, True):
            (run.set if busy else run.clear)()
            time.sleep(0.3 if busy else _SETTLE_S)
            times[busy] = (
                measure_prefill(engine, 1, 512, rng),
                measure_decode(engine, 4, 128, 5, rng)[0],
            )
        ratios += [b / a for a, b in zip(times[False], times[True], strict=True)]
    run.clear()
    return max(0.0, statistics.median(ratios) - 1.0) / neighbours


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--from-steps", nargs="+", metavar="DIR",
        help="fit to these step-trace directories (one server's replicas each) instead",
    )  # fmt: skip
    parser.add_argument("--base", help="with --from-steps: the profile to take the rest from")
    parser.add_argument("--model", default=None, help="local HF directory (default: embedded)")
    parser.add_argument("--model-name", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-mb", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    parser.add_argument("--co-load", type=int, default=0, help="busy neighbour engines")
    parser.add_argument(
        "--contention-neighbours", type=int, default=1,
        help="neighbour engines for the node-contention measurement (0: skip, contention 0)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.from_steps:
        served_profile(args.from_steps, args.base, args.out)
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    grid = QUICK_GRID if args.quick else FULL_GRID
    budget = max(b * n for b, n in grid["prefill"])
    config = EngineConfig(
        model=args.model,
        num_threads=args.threads,
        kv_cache_memory_mb=args.kv_cache_mb,
        scheduler=SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=64),
    )
    engine = LLMEngine(config)
    with _neighbours(args.co_load, args.model, args.threads):
        entry, report = profile(engine, grid)
    contention, n = 0.0, args.contention_neighbours
    if n:
        logger.info("node contention: %d neighbour engine(s), alternating busy / paused", n)
        with _neighbours(n, args.model, args.threads, running=False) as run:
            contention = measure_contention(engine, run, n, np.random.default_rng(2))
    device = f"{torch.device('cpu').type}-{args.threads}thread"
    if args.co_load:
        device += f"-coload{args.co_load}"
    Profile(args.model_name, device, [entry], contention).save(args.out)
    print(
        f"wrote {args.out}: prefill fit RMS relative error "
        f"{100 * report.prefill_rms_rel_error:.1f}% over {report.num_prefill_points} points, "
        f"decode {100 * report.decode_rms_rel_error:.1f}% over {report.num_decode_points}; "
        f"node contention {contention:.3f} per busy neighbour"
    )


def served_profile(trace_dirs: list[str], base_path: str | None, out: str) -> Profile:
    """Write the profile fitted to the step traces in `trace_dirs` (see the module doc)."""
    from pathlib import Path

    from placement.step_traces import fit_traces, trace_runs

    if base_path is None:
        raise SystemExit("--from-steps needs --base PROFILE (model, KV capacity)")
    base = Profile.load(base_path)
    runs = {d: trace_runs(Path(d)) for d in trace_dirs}  # a configuration's deployments
    missing = [d for d, found in runs.items() if not found]
    if missing:
        raise SystemExit(f"no step traces (*.jsonl) in {', '.join(missing)}")
    fitted = fit_traces([r for found in runs.values() for r in found], base.entry(1, 1))
    if fitted is None:
        raise SystemExit("the traces hold fewer than 3 pure prefill or decode steps")
    fit = fitted.report
    profile = Profile(
        base.model, f"{base.device} (served)", [fitted.entry], fitted.contention, fitted.wander,
        base.serving,  # the host's front end is what it was
    )  # fmt: skip
    profile.save(out)
    print(
        f"wrote {out} from {fit['prefill_steps']} prefill and {fit['decode_steps']} decode "
        f"steps: prefill fit RMS relative error {100 * fit['prefill_rms']:.1f}%, decode "
        f"{100 * fit['decode_rms']:.1f}%; node contention {fitted.contention:.3f} per busy "
        f"neighbour; step wander {fit['step_wander']}"
    )
    return profile


if __name__ == "__main__":
    main()
