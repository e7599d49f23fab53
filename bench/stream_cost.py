"""What streaming a token through Serve costs: CPU time per streamed token in the ingress
replica, Serve's HTTP proxy and the client, with and without stream batching, in one run.

    python -m bench.stream_cost [--intervals 0,50] [--requests 16] [--max-tokens 96] [--rounds 3]

Each token a decode replica yields is a Ray object to the ingress, an SSE event the ingress
hands to Serve's proxy, and a write the proxy makes to the client. On a GPU, where a decode step
of a small model takes milliseconds, those per-item costs bound the tokens per second one
ingress and one proxy can carry. `stream_batching_interval_ms` (Ray Serve LLM's name) makes the
decode replica send a request's tokens at most once per interval, joined.

For each interval the default app (serve_config.yaml, disaggregated) is deployed on a private
Ray cluster with that decode setting, and each round sends `--requests` streamed requests at
once (16-token prompts, `--max-tokens` forced tokens). The ingress's, the proxy's and this
process's CPU time (user + system) over a round, divided by the tokens streamed, is the cost
per token; the client's TPOT shows what batching does to the token interval it sees.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

import httpx
import psutil
import yaml

from bench.experiment import Cluster, merge

REPO = Path(__file__).resolve().parent.parent
PROCESSES = {"ingress": f"ServeReplica:{Cluster.APP}:Ingress", "proxy": "ProxyActor"}


def app_args(interval_ms: float) -> dict:
    base = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    return merge(base, {"decode": {"stream_batching_interval_ms": interval_ms}})


def serve_processes() -> dict[str, psutil.Process]:
    """The ingress replica's and the proxy's processes, found by Ray's process titles among
    this process's descendants (the private cluster's; never another cluster's on the host)."""
    found = {}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:  # it ended meanwhile
            continue
        for name, marker in PROCESSES.items():
            if marker in title and "ray::" in title:
                found[name] = proc
    missing = set(PROCESSES) - set(found)
    if missing:
        raise RuntimeError(f"no process found for {sorted(missing)}")
    return found


def cpu_s(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


async def _one(client: httpx.AsyncClient, url: str, max_tokens: int, i: int) -> dict:
    body = {
        "model": "SmolLM2-135M-Instruct",
        "prompt": [100 + i] * 16,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    times, tokens = [], 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices"):
                times.append(time.perf_counter())
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return {"tokens": tokens, "chunks": len(times), "tpot_s": (times[-1] - times[0]) / (tokens - 1)}


async def _round(url: str, requests: int, max_tokens: int) -> list[dict]:
    async with httpx.AsyncClient(timeout=600) as client:
        return await asyncio.gather(*(_one(client, url, max_tokens, i) for i in range(requests)))


def measure(url: str, requests: int, max_tokens: int) -> dict:
    """One round: CPU seconds per process and what the client got."""
    procs = {**serve_processes(), "client": psutil.Process()}
    before = {name: cpu_s(p) for name, p in procs.items()}
    results = asyncio.run(_round(url, requests, max_tokens))
    used = {name: cpu_s(p) - before[name] for name, p in procs.items()}
    return {
        "tokens": sum(r["tokens"] for r in results),
        "chunks": sum(r["chunks"] for r in results),
        "tpot_s": statistics.median(r["tpot_s"] for r in results),
        "cpu_s": used,
    }


def run(intervals: list[float], requests: int, max_tokens: int, rounds: int) -> list[dict]:
    rows = []
    with Cluster() as cluster:
        for interval in intervals:
            cluster.deploy(app_args(interval))
            try:
                measure(cluster.url, 2, 8)  # warm-up
                rounds_ = [measure(cluster.url, requests, max_tokens) for _ in range(rounds)]
            finally:
                cluster.undeploy()
            rows.append(_row(interval, rounds_))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _row(interval: float, rounds: list[dict]) -> dict:
    def per_token_us(name: str) -> float:
        return statistics.median(r["cpu_s"][name] / r["tokens"] * 1e6 for r in rounds)

    return {
        "interval_ms": interval,
        "tokens_per_chunk": statistics.median(r["tokens"] / r["chunks"] for r in rounds),
        **{f"{name}_us_per_token": per_token_us(name) for name in (*PROCESSES, "client")},
        "tpot_ms": statistics.median(r["tpot_s"] for r in rounds) * 1e3,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| interval ms | tokens a chunk | ingress CPU µs/token | proxy CPU µs/token | "
        "client CPU µs/token | client TPOT ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['interval_ms']:g} | {r['tokens_per_chunk']:.1f} | "
            f"{r['ingress_us_per_token']:.0f} | {r['proxy_us_per_token']:.0f} | "
            f"{r['client_us_per_token']:.0f} | {r['tpot_ms']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--intervals", default="0,50", help="stream_batching_interval_ms values")
    parser.add_argument("--requests", type=int, default=16, help="streamed at once, per round")
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2 (a token interval)")
    intervals = [float(x) for x in args.intervals.split(",")]
    print(table(run(intervals, args.requests, args.max_tokens, args.rounds)))


if __name__ == "__main__":
    main()
