"""What prefix caching saves: time to first token of prompts that share a long prefix (a system
prompt, a document, a conversation so far), with and without the cache, side by side.

    python -m bench.prefix_cache [--prefix 1024] [--suffix 32] [--requests 6] [--threads 2]
                                 [--choices 4]

Two engines, one with `enable_prefix_caching`. Each round sends each engine one request per
distinct suffix (the shared prefix, then `--suffix` tokens of its own), one at a time, taking
turns, and times each from add to first token (its prefill step). The very first request on the
cached engine computes the prefix and is left out; every later one takes it from the cache.
Medians, and their ratio.

Then n choices of one prompt (`--choices`, the OpenAI `n`): each round adds that many copies of a
new prompt at once to each engine in turn and times each copy's first token. Without the cache
the step computes the prompt n times; with it, the first copy computes it and the others take
its blocks a step later.
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


def _together_s(engine: LLMEngine, ids: list[int], n: int) -> list[float]:
    """n copies of a prompt added at once -> each one's time to first token."""
    t0 = time.perf_counter()
    for _ in range(n):
        engine.add_request(None, ids, FIRST_TOKEN)
    firsts: dict[str, float] = {}
    while engine.has_unfinished:
        for out in engine.step():
            firsts.setdefault(out.request_id, time.perf_counter() - t0)
    return list(firsts.values())


def _choices_table(engines: dict[bool, LLMEngine], length: int, n: int, rounds: int) -> None:
    vocab = engines[False].runner.shape.vocab_size
    times: dict[bool, list[float]] = {False: [], True: []}
    lasts: dict[bool, list[float]] = {False: [], True: []}
    for ids in random_prompts(rounds, length, vocab, seed=9):  # a new prompt each round
        for caching, engine in engines.items():
            ttfts = _together_s(engine, ids, n)
            times[caching] += ttfts
            lasts[caching].append(max(ttfts))
    print(f"\n{n} copies of a {length}-token prompt added at once, medians of {rounds} rounds")
    print("| prefix caching | TTFT ms (median copy) | last copy's TTFT ms | ratio |")
    print("|---|---|---|---|")
    base = statistics.median(lasts[False])
    for caching in (False, True):
        median, last = statistics.median(times[caching]), statistics.median(lasts[caching])
        print(f"| {'on' if caching else 'off'} | {median * 1e3:.1f} | {last * 1e3:.1f} | "
              f"{last / base:.3f} |")  # fmt: skip


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
    parser.add_argument("--choices", type=int, default=4, help="copies added at once; 0 skips")
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
    if args.choices:
        _choices_table(engines, args.prefix + args.suffix, args.choices, args.rounds)


if __name__ == "__main__":
    main()
