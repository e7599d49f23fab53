"""Decode step time with CUDA graphs vs eager, same engine settings, side by side in one run.

    python -m bench.cuda_graphs [--batches 1,8,32,128,256] [--context 512] [--steps 16]
                                [--rounds 2] [--dtypes float32,bfloat16]

Needs a GPU. For each dtype, two engines on the default model (one with `enforce_eager`), and
for each batch size the median decode step (sampling included, as the engine steps) of
`--context`-token requests, the two engines taking turns for `--rounds` rounds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from bench.engine_throughput import ours_decode_step_s
from engine import EngineConfig, LLMEngine, SchedulerConfig


def engine(dtype: str, max_batch: int, max_len: int, eager: bool) -> LLMEngine:
    config = EngineConfig(
        dtype=dtype,
        device="cuda",
        max_model_len=max_len,  # the graphs captured at load cover tables up to it
        kv_cache_memory_mb=16384,
        scheduler=SchedulerConfig(max_num_seqs=max_batch, max_num_batched_tokens=16384),
        enforce_eager=eager,
    )
    return LLMEngine(config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batches", default="1,8,32,128,256")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for dtype in args.dtypes.split(","):
        max_len = args.context + args.steps + 8
        engines, load_s = {}, {}
        for eager in (True, False):  # the graphs' load includes capturing every one
            start = time.perf_counter()
            engines[eager] = engine(dtype, max(batches), max_len, eager)
            load_s[eager] = time.perf_counter() - start
        print(f"{dtype}: load {load_s[True]:.1f} s eager, {load_s[False]:.1f} s with graphs")
        for batch in batches:
            times: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.rounds):
                for eager, e in engines.items():
                    times[eager].append(ours_decode_step_s(e, batch, args.context, args.steps))
            eager_ms, graph_ms = (statistics.median(times[k]) * 1e3 for k in (True, False))
            rows.append(
                {"dtype": dtype, "batch": batch, "eager_ms": eager_ms, "graph_ms": graph_ms}
            )
            print(json.dumps(rows[-1]), flush=True)
        graphs = engines[False].runner.graphs
        print(f"{dtype}: {len(graphs._graphs)} graphs, {graphs.num_steps} graph steps")
        del engines
        torch.cuda.empty_cache()
    print("| dtype | batch | eager step ms | graph step ms | speed-up |")
    print("|---|---|---|---|---|")
    for r in rows:
        speedup = r["eager_ms"] / r["graph_ms"]
        print(
            f"| {r['dtype']} | {r['batch']} | {r['eager_ms']:.1f} | {r['graph_ms']:.1f} | "
            f"{speedup:.1f}x |"
        )


if __name__ == "__main__":
    main()
