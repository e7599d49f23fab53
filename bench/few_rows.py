"""Decode step time with the few-rows Linear forward (kvkernels/few_rows.py) vs the plain Linear.

    python -m bench.few_rows [--threads 1] [--context 512] [--batches 1,2,3,4,6,8,16] [--rounds 3]

One engine; for each batch size the requests are prefilled to `--context` tokens, then four
variants alternate, `--rounds` times each, and the median step of each is kept (interleaved, so
drift on a shared machine hits all alike): every Linear plain, the few-rows forward on the LM
head only, on every Linear up to its row limit (what the engine ran until 2026-12-05), and at
the row counts this host's measurement chose (engine/linear_tuning.py: what the engine runs).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from engine import EngineConfig, LLMEngine, SchedulerConfig, linear_tuning
from kvkernels import few_rows
from placement.profiler import measure_decode

HEAD_ONLY = few_rows.FewRows(layers=frozenset())
VARIANTS = {
    "plain": lambda m: few_rows.NOWHERE,
    "head": lambda m: HEAD_ONLY,
    "all": lambda m: few_rows.EVERYWHERE,
    "tuned": linear_tuning.tuned,
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--batches", default="1,2,3,4,6,8,16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    scheduler = SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=64)
    engine = LLMEngine(EngineConfig(num_threads=args.threads, scheduler=scheduler))
    model = engine.runner.model
    rng = np.random.default_rng(0)
    header = "plain Linear ms | few-rows LM head ms | few-rows all ms | tuned ms | plain / tuned"
    print(f"| batch | {header} |")
    print("|---|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, rows in VARIANTS.items():
                few_rows.uninstall(model)
                few_rows.install(model, rows(model))
                times[name].append(measure_decode(engine, batch, args.context, 5, rng)[0])
        ms = [statistics.median(times[n]) for n in VARIANTS]
        cells = " | ".join(f"{t:.1f}" for t in ms)
        print(f"| {batch} | {cells} | {ms[0] / ms[-1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
