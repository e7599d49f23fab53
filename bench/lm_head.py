"""Decode step time with the few-rows LM head (kernels/lm_head.py) vs the plain Linear.

    python -m bench.lm_head [--threads 1] [--context 512] [--batches 1,2,3,4,6,8,16] [--rounds 3]

One engine; for each batch size the requests are prefilled to `--context` tokens, then the two
heads alternate, `--rounds` times each, and the median step of each is kept (interleaved, so
drift on a shared machine hits both alike).
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
import torch

from engine import EngineConfig, LLMEngine, SchedulerConfig
from kernels.lm_head import FewRowsHead
from placement.profiler import measure_decode


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
    fast = model.lm_head
    if not isinstance(fast, FewRowsHead):
        raise SystemExit("the engine did not install the few-rows head (not on CPU?)")
    heads = {"linear": fast.linear, "few_rows": fast}
    rng = np.random.default_rng(0)
    print("| batch | Linear ms | few-rows head ms | ratio |\n|---|---|---|---|")
    for batch in map(int, args.batches.split(",")):
        times: dict[str, list[float]] = {name: [] for name in heads}
        for _ in range(args.rounds):
            for name, head in heads.items():
                model.lm_head = head
                times[name].append(measure_decode(engine, batch, args.context, 5, rng)[0])
        slow, quick = (statistics.median(times[n]) for n in heads)
        print(f"| {batch} | {slow:.1f} | {quick:.1f} | {slow / quick:.2f}x |", flush=True)
    model.lm_head = fast


if __name__ == "__main__":
    main()
