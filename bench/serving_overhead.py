"""Serving overhead: TTFT and TPOT through HTTP vs the engine alone.

    serve run serve_config.yaml &          # or make serve
    python -m bench.serving_overhead --url http://127.0.0.1:8000 [--requests 8]
    python -m bench.serving_overhead --batches 1,2,4,6 --max-tokens 256 [--rounds 3]

Sequential requests (no queueing), random 512-token prompts, 32 forced output tokens. The
engine-alone side runs in this process with the same thread count as the replicas (1), after
the HTTP side, so the two never share the cores.

With --batches, each N sends N requests at once and compares the token interval while all N
decode together (after the last one's first token, before the first one's last token: the
prefill side is idle then) with the engine alone stepping the same N requests: what serving
costs per decode step as the batch grows (each token is one streamed item per request). The
engine-alone side runs between the HTTP batches, while the server's engines are idle.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import httpx
import torch

from bench.engine_throughput import prompts
from bench.loadgen import served_model
from engine import EngineConfig, LLMEngine, SamplingParams


def _body(model: str, ids: list[int], max_tokens: int) -> dict:
    return {
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }


def http_request(url: str, model: str, ids: list[int], max_tokens: int) -> tuple[float, float]:
    async def run() -> tuple[float, list[float]]:
        # the clock starts once the client exists: building one (its TLS context, 15-25 ms
        # here) is the client's cost, not the server's, and a client builds it once
        async with httpx.AsyncClient() as client:
            t0 = time.perf_counter()
            return t0, await _stream_times(client, url, _body(model, ids, max_tokens))

    t0, times = asyncio.run(run())
    return times[0] - t0, (times[-1] - times[0]) / (len(times) - 1)


async def _stream_times(client: httpx.AsyncClient, url: str, body: dict) -> list[float]:
    times = []
    async with client.stream("POST", f"{url}/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
    return times


def http_batch(url: str, model: str, batch: list[list[int]], max_tokens: int) -> float | None:
    """Median token interval (s) while every request of the batch is decoding."""
    bodies = [_body(model, ids, max_tokens) for ids in batch]

    async def run() -> list[list[float]]:
        async with httpx.AsyncClient() as client:
            return await asyncio.gather(*(_stream_times(client, url, b) for b in bodies))

    streams = asyncio.run(run())
    start, end = max(t[0] for t in streams), min(t[-1] for t in streams)
    gaps = [
        b - a for t in streams for a, b in zip(t, t[1:], strict=False) if a >= start and b <= end
    ]
    return statistics.median(gaps) if gaps else None  # None: they never decoded together


def engine_batch(engine: LLMEngine, batch: list[list[int]], max_tokens: int) -> float:
    """Median step interval (s) while every request of the batch is decoding."""
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    for ids in batch:
        engine.add_request(None, ids, params)
    stamps = []
    while engine.has_unfinished:
        outputs = engine.step()
        step = engine.last_step
        if len(outputs) == len(batch) and step is not None and not step.prefill_lens:
            stamps.append(time.perf_counter())
    return statistics.median(b - a for a, b in zip(stamps, stamps[1:], strict=False))


def engine_request(engine: LLMEngine, ids: list[int], max_tokens: int) -> tuple[float, float]:
    params = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0)
    t0 = time.perf_counter()
    engine.add_request(None, ids, params)
    times = []
    while engine.has_unfinished:
        if engine.step():
            times.append(time.perf_counter())
    return times[0] - t0, (times[-1] - times[0]) / (len(times) - 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", help="the served name; default: the first /v1/models lists")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", help="comma-separated batch sizes: the concurrent mode")
    parser.add_argument("--rounds", type=int, default=3, help="with --batches")
    args = parser.parse_args(argv)
    args.model = args.model or served_model(args.url)
    if args.batches:
        return batched(args)
    ids = prompts(args.requests + 1, args.context, 49152, seed=3)
    http = [http_request(args.url, args.model, p, args.max_tokens) for p in ids]
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(num_threads=args.threads, kv_cache_memory_mb=256))
    alone = [engine_request(engine, p, args.max_tokens) for p in ids]
    rows = {}
    for name, samples in (("http", http[1:]), ("engine", alone[1:])):  # first = warm-up
        rows[name] = {
            "ttft_ms": statistics.median(s[0] for s in samples) * 1e3,
            "tpot_ms": statistics.median(s[1] for s in samples) * 1e3,
        }
    print(json.dumps(rows, indent=2))
    h, e = rows["http"], rows["engine"]
    print(
        f"| path | TTFT ms | TPOT ms |\n|---|---|---|\n"
        f"| HTTP ({args.url}) | {h['ttft_ms']:.1f} | {h['tpot_ms']:.1f} |\n"
        f"| engine alone | {e['ttft_ms']:.1f} | {e['tpot_ms']:.1f} |\n"
        f"| overhead | {h['ttft_ms'] - e['ttft_ms']:+.1f} | {h['tpot_ms'] - e['tpot_ms']:+.1f} |"
    )


def batched(args: argparse.Namespace) -> None:
    """Rounds alternate HTTP and engine alone per batch size (drift hits both alike)."""
    sizes = [int(n) for n in args.batches.split(",")]
    batches = [prompts(n, args.context, 49152, seed=n) for n in sizes]
    torch.set_num_threads(args.threads)
    engine = LLMEngine(EngineConfig(num_threads=args.threads, kv_cache_memory_mb=1024))
    http_batch(args.url, args.model, batches[0][:1], 8)  # warm-up
    engine_batch(engine, batches[0][:1], 8)
    http: dict[int, list[float]] = {n: [] for n in sizes}
    alone: dict[int, list[float]] = {n: [] for n in sizes}
    for _ in range(args.rounds):
        for n, batch in zip(sizes, batches, strict=True):
            interval = http_batch(args.url, args.model, batch, args.max_tokens)
            if interval is None:
                print(f"{n} requests never decoded together: raise --max-tokens", flush=True)
                continue
            http[n].append(interval)
            alone[n].append(engine_batch(engine, batch, args.max_tokens))
    print("| requests decoding | HTTP, disaggregated ms | engine alone ms | overhead ms |")
    print("|---|---|---|---|")
    for n in (n for n in sizes if http[n]):
        h, e = statistics.median(http[n]) * 1e3, statistics.median(alone[n]) * 1e3
        print(f"| {n} | {h:.1f} | {e:.1f} | {h - e:+.1f} |", flush=True)


if __name__ == "__main__":
    main()
