"""Profile the engine on this device and fit the latency model.

    python -m placement.profiler --out profiles/smollm2-cpu.yaml [--threads 1] [--quick]

Prefill: one step over a batch of prompts for each (batch size, prompt length) in the grid.
Decode: requests prefilled to a context length, then the median of a few decode steps, for each
(batch size, context length). Both fitted by least squares on relative error; the RMS relative
error of each fit is reported next to the profile.

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
    decode_features,
    fit_relative,
    prefill_features,
)

logger = logging.getLogger(__name__)

FULL_GRID = {
    "prefill": [(1, 32), (1, 128), (1, 512), (1, 1024), (2, 256), (4, 128), (4, 512), (8, 64)],
    "decode": [(1, 64), (1, 512), (4, 256), (8, 128), (8, 512), (16, 256), (32, 128), (32, 512)],
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


def measure_prefill(engine: LLMEngine, batch: int, length: int, rng) -> float:
    vocab = engine.runner.shape.vocab_size
    for ids in _prompts(batch, length, vocab, rng):
        engine.add_request(None, ids, SamplingParams(max_tokens=1))
    t0 = time.perf_counter()
    engine.step()  # the budget holds the whole batch: one step
    ms = (time.perf_counter() - t0) * 1e3
    while engine.has_unfinished:
        engine.step()
    return ms


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
        pre_ms.append(measure_prefill(engine, batch, length, rng))
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
    decode, dec_err = fit_relative(decode_features(dec_batches), np.array(dec_ms))
    capacity = engine.blocks.num_blocks * engine.blocks.block_size
    entry = Entry(tp=1, pp=1, prefill=prefill, decode=decode, kv_capacity_tokens=capacity)
    return entry, FitReport(pre_err, dec_err, len(pre_ms), len(dec_ms))


def _busy_prefill(model: str | None, threads: int, stop) -> None:
    """A neighbour engine: 512-token prefills back to back until told to stop."""
    torch.set_num_threads(threads)
    engine = LLMEngine(EngineConfig(model=model, num_threads=threads, kv_cache_memory_mb=128))
    rng = np.random.default_rng(1)
    while not stop.is_set():
        measure_prefill(engine, 1, 512, rng)


@contextlib.contextmanager
def _co_load(n: int, model: str | None, threads: int):
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Event()
    procs = [ctx.Process(target=_busy_prefill, args=(model, threads, stop)) for _ in range(n)]
    for p in procs:
        p.start()
    try:
        if n:
            time.sleep(20)  # the neighbours load their model and reach steady state
        yield
    finally:
        stop.set()
        for p in procs:
            p.join(timeout=60)
            if p.is_alive():
                p.terminate()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default=None, help="local HF directory (default: embedded)")
    parser.add_argument("--model-name", default="smollm2-135m")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--kv-cache-mb", type=int, default=1024)
    parser.add_argument("--quick", action="store_true", help="a small grid (about a minute)")
    parser.add_argument("--co-load", type=int, default=0, help="busy neighbour engines")
    args = parser.parse_args(argv)
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
    with _co_load(args.co_load, args.model, args.threads):
        entry, report = profile(engine, grid)
    device = f"{torch.device('cpu').type}-{args.threads}thread"
    if args.co_load:
        device += f"-coload{args.co_load}"
    Profile(args.model_name, device, [entry]).save(args.out)
    print(
        f"wrote {args.out}: prefill fit RMS relative error "
        f"{100 * report.prefill_rms_rel_error:.1f}% over {report.num_prefill_points} points, "
        f"decode {100 * report.decode_rms_rel_error:.1f}% over {report.num_decode_points}"
    )


if __name__ == "__main__":
    main()
