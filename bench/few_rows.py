"""Decode step time with the few-rows Linear forward (kvkernels/few_rows.py) vs the plain Linear.

    python -m bench.few_rows [--threads 1] [--context 512] [--batches 1,2,3,4,6,8,16] [--rounds 3]

One engine; for each batch size the requests are prefilled to `--context` tokens, then three
variants alternate, `--rounds` times each, and the median step of each is kept (interleaved, so
drift on a shared machine hits all alike): every Linear plain, the few-rows forward on the LM
head only, and on every Linear (what the engine runs).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from engine import EngineConfig, LLMEngine, SchedulerConfig
from kvkernels import few_rows
from placement.profiler import measure_decode

VARIANTS = {
    "plain": lambda m: few_rows.uninstall(m),
    "head": lambda m: few_rows.uninstall(m) + few_rows.install(m, layers=False),
    "all": lambda m: few_rows.uninstall(m) + few_rows.install(m),
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
    print("| batch | plain Linear ms | few-rows LM head ms | few-rows all ms | plain / all |")
    print("|---|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        times: dict[str, list[float]] = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, switch in VARIANTS.items():
                switch(model)
                times[name].append(measure_decode(engine, batch, args.context, 5, rng)[0])
        plain, head, every = (statistics.median(times[n]) for n in VARIANTS)
        row = f"| {batch} | {plain:.1f} | {head:.1f} | {every:.1f} | {plain / every:.2f}x |"
        print(row, flush=True)
    few_rows.install(model)


if __name__ == "__main__":
    main()
