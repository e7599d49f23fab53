"""What prefix caching saves: time to first token of prompts that share a long prefix (a system
prompt, a document, a conversation so far), with and without the cache, side by side.

    python -m bench.prefix_cache [--prefix 1024] [--suffix 32] [--requests 6] [--threads 2]

Two engines, one with `enable_prefix_caching`. Each round sends each engine one request per
distinct suffix (the shared prefix, then `--suffix` tokens of its own), one at a time, taking
turns, and times each from add to first token (its prefill step). The very first request on the
cached engine computes the prefix and is left out; every later one takes it from the cache.
Medians, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from bench.engine_throughput import prompts as random_prompts
from engine import EngineConfig, LLMEngine, SamplingParams, SchedulerConfig

FIRST_TOKEN = SamplingParams(max_tokens=1, temperature=0)


def _ttft_s(engine: LLMEngine, ids: list[int]) -> float:
    t0 = time.perf_counter()
    engine.add_request(None, ids, FIRST_TOKEN)
    while engine.has_unfinished:
        engine.step()
    return time.perf_counter() - t0


def _engine(caching: bool, threads: int) -> LLMEngine:
    scheduler = SchedulerConfig(max_num_batched_tokens=8192, enable_prefix_caching=caching)
    return LLMEngine(
        EngineConfig(num_threads=threads, kv_cache_memory_mb=1024, scheduler=scheduler)
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.prefix_cache")
    parser.add_argument("--prefix", type=int, default=1024)
    parser.add_argument("--suffix", type=int, default=32)
    parser.add_argument("--requests", type=int, default=6, help="suffixes per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    engines = {caching: _engine(caching, args.threads) for caching in (False, True)}
    vocab = engines[False].runner.shape.vocab_size
    [prefix] = random_prompts(1, args.prefix, vocab, seed=7)
    suffixes = random_prompts(args.requests, args.suffix, vocab, seed=8)
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(args.rounds):
        for suffix in suffixes:
            for caching, engine in engines.items():
                times[caching].append(_ttft_s(engine, prefix + suffix))
    times[True].pop(0)  # it filled the cache
    plain, cached = (statistics.median(times[c]) * 1e3 for c in (False, True))
    counts = f"{len(times[False])} and {len(times[True])}"
    print(f"TTFT of a {args.prefix}-token shared prefix + {args.suffix} own tokens, "
          f"{args.threads} threads, medians of {counts} requests")  # fmt: skip
    print("| prefix caching | TTFT ms | ratio |\n|---|---|---|")
    print(f"| off | {plain:.1f} | 1.000 |\n| on | {cached:.1f} | {cached / plain:.3f} |")


if __name__ == "__main__":
    main()
