"""What a huge prompt does to the streams already running: their token gaps through HTTP while
the ingress tokenizes a prompt of many megabytes (refused afterwards as too long).

    serve run serve_config.yaml &          # or make serve
    python -m bench.ingress_stall --url http://127.0.0.1:8000 [--mb 5] [--rounds 3]

Each round streams one request of forced output tokens and, once it has a few, sends one
completions request whose prompt is `--mb` megabytes of text; it prints the stream's largest
gap between two tokens and its median gap, and how long the big request took to be refused.
A tokenizer that runs on the ingress's event loop stops every stream of that replica for as
long as it runs; one off the loop does not.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

SENTENCE = "The quick brown fox jumps over the lazy dog. "


async def _stream_gaps(client: httpx.AsyncClient, model: str, tokens: int, started) -> list:
    body = {
        "model": model,
        "prompt": "Count slowly:",
        "max_tokens": tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    times = []
    async with client.stream("POST", "/v1/completions", json=body) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.perf_counter())
                if len(times) == 5:
                    started.set()
    return [b - a for a, b in zip(times, times[1:], strict=False)]


async def _big(client: httpx.AsyncClient, model: str, mb: float, started) -> tuple[int, float]:
    await started.wait()
    prompt = SENTENCE * int(mb * 2**20 / len(SENTENCE))
    t0 = time.perf_counter()
    r = await client.post("/v1/completions", json={"model": model, "prompt": prompt})
    return r.status_code, time.perf_counter() - t0


async def _round(url: str, mb: float, tokens: int) -> dict:
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        started = asyncio.Event()
        gaps, (status, refused_s) = await asyncio.gather(
            _stream_gaps(client, model, tokens, started), _big(client, model, mb, started)
        )
    return {
        "max_gap_ms": max(gaps) * 1e3,
        "median_gap_ms": statistics.median(gaps) * 1e3,
        "big_status": status,
        "big_s": refused_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--mb", type=float, default=5.0, help="the big prompt's size")
    parser.add_argument("--tokens", type=int, default=120, help="the stream's output tokens")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print("| round | stream max gap ms | stream median gap ms | big prompt status | its time s |")
    print("|---|---|---|---|---|")
    for i in range(args.rounds):
        r = asyncio.run(_round(args.url, args.mb, args.tokens))
        print(
            f"| {i + 1} | {r['max_gap_ms']:.0f} | {r['median_gap_ms']:.0f} | {r['big_status']} "
            f"| {r['big_s']:.2f} |"
        )


if __name__ == "__main__":
    main()
