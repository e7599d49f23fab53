"""Open-loop load generator for any OpenAI-compatible server (ours, vLLM, SGLang, ...).

    python -m bench.loadgen --url http://127.0.0.1:8000 --rate 0.5 --num-requests 40 \\
        --input-len 512 --output-len 64 --ttft-ms 8700 --tpot-ms 133 [--cv 1.0]

Requests are sent at their arrival times whatever the server does (open loop: a slow server
builds a queue, as in production), streamed, and timed per request: arrival, first token, last
token, output tokens (from the stream's usage), errors. Bounded in count and in time: requests
still running at the deadline are cancelled and count as failures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

import httpx

from bench.metrics import SLO, RequestRecord, summarize
from placement.workload import Workload


@dataclass(frozen=True)
class LoadRequest:
    arrival_s: float  # offset from the start of the run
    prompt: str | list[int]
    max_tokens: int
    ignore_eos: bool = True


def synthetic(
    workload: Workload, rate: float, seed: int = 0, vocab: int = 49152
) -> list[LoadRequest]:
    """Token-id prompts of the workload's lengths at `rate` (arrivals as in the simulator)."""
    import numpy as np

    rng = np.random.default_rng(seed + 1)
    return [
        LoadRequest(
            r.arrival_ms / 1e3, rng.integers(100, vocab - 100, r.input_len).tolist(), r.output_len
        )
        for r in workload.sample(rate, seed)
    ]


async def _one(client: httpx.AsyncClient, url: str, model: str, req: LoadRequest):
    body = {
        "model": model,
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": 0,
        "ignore_eos": req.ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    arrival = time.perf_counter()  # when it was actually sent (open loop: on schedule)
    first = last = None
    tokens = 0
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code != 200:
                text = (await r.aread()).decode(errors="replace")[:200]
                return RequestRecord(arrival, None, None, 0, error=f"HTTP {r.status_code}: {text}")
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("choices"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += 1
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    except (httpx.HTTPError, asyncio.CancelledError) as e:
        return RequestRecord(arrival, first, last, tokens, error=type(e).__name__)
    return RequestRecord(arrival, first, last, tokens)


async def run(
    url: str,
    model: str,
    requests: list[LoadRequest],
    max_duration_s: float = 600.0,
    progress: bool = True,
) -> tuple[list[RequestRecord], float]:
    """-> (one record per request, wall-clock duration)."""
    from tqdm import tqdm

    bar = tqdm(total=len(requests), disable=not progress, unit="req")
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_duration_s), limits=limits) as client:
        t0 = time.perf_counter()

        async def timed(req: LoadRequest):
            await asyncio.sleep(max(0.0, t0 + req.arrival_s - time.perf_counter()))
            record = await _one(client, url, model, req)
            bar.update()
            return record

        tasks = [asyncio.create_task(timed(r)) for r in requests]
        done, pending = await asyncio.wait(tasks, timeout=max_duration_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        duration = time.perf_counter() - t0
    bar.close()
    records = []
    for task, req in zip(tasks, requests, strict=True):
        if task in done and not task.cancelled():
            records.append(task.result())
        else:
            records.append(RequestRecord(t0 + req.arrival_s, None, None, 0, error="deadline"))
    return records, duration


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct")
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--num-requests", type=int, default=40)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--cv", type=float, default=1.0, help="1 = Poisson; >1 burstier (Gamma)")
    parser.add_argument("--ttft-ms", type=float, required=True)
    parser.add_argument("--tpot-ms", type=float, required=True)
    parser.add_argument("--max-duration-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    workload = Workload(args.num_requests, args.input_len, args.output_len, cv=args.cv)
    requests = synthetic(workload, args.rate, args.seed)
    records, duration = asyncio.run(run(args.url, args.model, requests, args.max_duration_s))
    slo = SLO(args.ttft_ms / 1e3, args.tpot_ms / 1e3)
    print(json.dumps({"rate": args.rate, **summarize(records, slo, duration)}, indent=2))


if __name__ == "__main__":
    main()
