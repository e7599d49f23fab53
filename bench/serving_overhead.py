"""Serving overhead: TTFT and TPOT of single requests through HTTP vs the engine alone.

    serve run serve_config.yaml &          # or make serve
    python -m bench.serving_overhead --url http://127.0.0.1:8000 [--requests 8]

Sequential requests (no queueing), random 512-token prompts, 32 forced output tokens. The
engine-alone side runs in this process with the same thread count as the replicas (1), after
the HTTP side, so the two never share the cores.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import httpx
import torch

from bench.engine_throughput import prompts
from engine import EngineConfig, LLMEngine, SamplingParams


def http_request(url: str, model: str, ids: list[int], max_tokens: int) -> tuple[float, float]:
    body = {
        "model": model,
        "prompt": ids,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    times = []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=300) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
    return times[0] - t0, (times[-1] - times[0]) / (len(times) - 1)


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
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
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
        f"| HTTP, disaggregated 1P1D | {h['ttft_ms']:.1f} | {h['tpot_ms']:.1f} |\n"
        f"| engine alone | {e['ttft_ms']:.1f} | {e['tpot_ms']:.1f} |\n"
        f"| overhead | {h['ttft_ms'] - e['ttft_ms']:+.1f} | {h['tpot_ms'] - e['tpot_ms']:+.1f} |"
    )


if __name__ == "__main__":
    main()
