"""The serving front end's share of a plan: ingress replicas and stream batching.

Every request and every streamed chunk costs CPU outside the engines: the ingress replica
tokenizes, routes and relays it, and Serve's HTTP proxy (one per node; the plan's HeadOnly: one)
parses and writes it. bench/stream_cost.py measures each as a cost per request plus a cost per
chunk; `ServingCost`'s defaults are this machine's (2 cores, 2026-12-04). An ingress replica and
the proxy each run one event loop, on at most one core: past 1 / cost they queue, and every
token behind them waits, however fast the engines are. The engines' plan does not see them, so
this sizes them out of the way at the planned rate: each process busy at most `utilization` of
its core (0.5: a queue's wait is then about one service time, ~1 ms here, far under any TPOT
target).

A decode replica with `stream_batching_interval_ms` I sends a request's tokens at most once per
I, the first and the last at once: a request of L tokens at TPOT t streams
min(L, 2 + (L - 1) t / I) chunks (L without batching). Only batching relieves the proxy; the
ingress either way. So the smallest interval of `INTERVALS_MS` that keeps the proxy under the
limit is taken, then as many ingress replicas as what is left needs. Joining tokens leaves a
request's TPOT (its mean token interval) as it was: the first and last tokens are not held.

The costs hold for the Serve mode they were measured in (deployments/serve_env.py): in the
`haproxy` mode the proxy is HAProxy, its work spread over its threads (`proxy_cores`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from deployments.serve_env import HAPROXY_THREADS, MODES

INTERVALS_MS = (0, 20, 50, 100, 200, 500, 1000)  # the server takes 0..1000


@dataclass(frozen=True)
class ServingCost:
    """CPU milliseconds a request and a streamed chunk cost the ingress and the proxy (a
    profile's optional `serving` section; bench/stream_cost.py fits them on a host)."""

    # this machine's (bench.stream_cost at 32 and 96 tokens, idle CPU taken off, 2026-12-04)
    ingress_request_ms: float = 9.0
    ingress_chunk_ms: float = 1.0
    proxy_request_ms: float = 3.5
    proxy_chunk_ms: float = 0.57
    # the Serve mode they were measured in (deployments/serve_env.py): what the plan's
    # sizing holds for, so Serve must start in it
    serve_mode: str = "default"

    def __post_init__(self) -> None:
        if self.serve_mode not in MODES:
            raise ValueError(
                f"serving cost serve_mode must be one of {MODES}, got {self.serve_mode!r}"
            )
        for name, value in vars(self).items():
            if name != "serve_mode" and not value >= 0:
                raise ValueError(f"serving cost {name} must be >= 0, got {value}")

    @property
    def proxy_cores(self) -> int:
        """The cores the proxy's work spreads over: Serve's proxy is one event loop, HAProxy
        runs its threads."""
        return HAPROXY_THREADS if self.serve_mode == "haproxy" else 1


@dataclass(frozen=True)
class FrontEnd:
    rate_rps: float  # what it was sized for
    ingress_replicas: int
    stream_interval_ms: int
    chunks_per_s: float
    ingress_load: float  # cores' worth of CPU, all ingress replicas together
    proxy_load: float  # share of the proxy's cores (ServingCost.proxy_cores)
    utilization: float
    # the most requests a second of this workload one proxy carries at all (its core busy,
    # the longest interval): past it no engine placement raises goodput on one node
    proxy_ceiling_rps: float

    @property
    def usable_rps(self) -> float:
        """The most requests a second the plan sizes one proxy for: its ceiling at the
        utilization limit."""
        return self.proxy_ceiling_rps * self.utilization

    @property
    def proxy_bound(self) -> bool:
        """Even the longest interval leaves the proxy busier than the limit: one proxy cannot
        carry the rate (more nodes' proxies, behind a load balancer, can)."""
        # a front end sized to the limit exactly (the plan's usable rate) is within it
        return self.proxy_load > self.utilization * (1 + 1e-9)

    def describe(self) -> str:
        batching = (
            f"stream batching {self.stream_interval_ms} ms"
            if self.stream_interval_ms
            else "no stream batching"
        )
        return (
            f"front end for {self.rate_rps:.3g} req/s: {self.ingress_replicas} ingress "
            f"replica(s), {batching}; {self.chunks_per_s:.0f} chunks/s, ingress "
            f"{self.ingress_load:.2f} cores, proxy {self.proxy_load:.0%} of its core(s)"
        )


def chunks_per_request(output_len: int, tpot_ms: float, interval_ms: float) -> float:
    """Streamed chunks of one request of `output_len` tokens at `tpot_ms` a token."""
    if interval_ms <= 0 or output_len <= 2:
        return float(output_len)
    return min(float(output_len), 2 + (output_len - 1) * tpot_ms / interval_ms)


def size_front_end(
    rate_rps: float,
    output_lens: Sequence[int],
    tpot_ms: float,
    cost: ServingCost | None = None,
    utilization: float = 0.5,
) -> FrontEnd:
    """The front end for `rate_rps` requests a second whose output lengths are distributed as
    `output_lens` (a sample) and stream at `tpot_ms` a token."""
    if rate_rps <= 0 or not output_lens or tpot_ms <= 0 or not 0 < utilization <= 1:
        raise ValueError("need rate > 0, output lengths, tpot > 0 and 0 < utilization <= 1")
    cost = cost or ServingCost()

    def chunks_per_s(interval_ms: int) -> float:
        mean = sum(chunks_per_request(n, tpot_ms, interval_ms) for n in output_lens)
        return rate_rps * mean / len(output_lens)

    def proxy_load(interval_ms: int) -> float:
        ms = rate_rps * cost.proxy_request_ms + chunks_per_s(interval_ms) * cost.proxy_chunk_ms
        return ms / 1e3 / cost.proxy_cores

    longest = INTERVALS_MS[-1]
    ceiling = rate_rps / proxy_load(longest) if proxy_load(longest) > 0 else math.inf

    interval = next((i for i in INTERVALS_MS if proxy_load(i) <= utilization), INTERVALS_MS[-1])
    chunks = chunks_per_s(interval)
    ingress = (rate_rps * cost.ingress_request_ms + chunks * cost.ingress_chunk_ms) / 1e3
    return FrontEnd(
        rate_rps=rate_rps,
        ingress_replicas=max(1, math.ceil(ingress / utilization - 1e-9)),
        stream_interval_ms=interval,
        chunks_per_s=chunks,
        ingress_load=ingress,
        proxy_load=proxy_load(interval),
        utilization=utilization,
        proxy_ceiling_rps=ceiling,
    )
