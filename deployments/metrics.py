"""Serving metrics through Ray's metrics API: they appear in the Ray dashboard and on each
node's Prometheus endpoint, tagged by Serve with application, deployment and replica.

Latencies are in milliseconds. Engine gauges are refreshed after every engine step.
"""

from __future__ import annotations

from ray.serve import metrics

from engine import EngineStats, RequestOutput

_LATENCY_MS = [5, 10, 25, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 30000]


class EngineMetrics:
    """Per engine replica (prefill, decode or colocated)."""

    def __init__(self, phase: str) -> None:
        self.tags = {"phase": phase}
        keys = ("phase",)
        self.running = metrics.Gauge(
            "splitserve_running_requests", "requests in the running batch", keys
        )
        self.waiting = metrics.Gauge(
            "splitserve_waiting_requests", "requests queued for prefill", keys
        )
        self.waiting_tokens = metrics.Gauge(
            "splitserve_waiting_prompt_tokens", "prompt tokens queued for prefill", keys
        )
        self.kv_usage = metrics.Gauge(
            "splitserve_kv_block_usage", "share of KV blocks in use", keys
        )
        self.pending_imports = metrics.Gauge(
            "splitserve_pending_kv_imports", "handed-off requests waiting for decode blocks", keys
        )
        self.queue_time = metrics.Histogram(
            "splitserve_queue_time_ms",
            "arrival at the engine -> first scheduled",
            _LATENCY_MS,
            keys,
        )
        self.kv_transfer_ms = metrics.Histogram(
            "splitserve_kv_transfer_ms",
            "KV channel time per request (send or receive)",
            _LATENCY_MS,
            keys,
        )
        self.kv_transfer_bytes = metrics.Counter(
            "splitserve_kv_transfer_bytes", "KV bytes moved through the channel", keys
        )
        self.cached_tokens = metrics.Counter(
            "splitserve_prefix_cache_hit_tokens", "prompt tokens taken from the prefix cache", keys
        )
        self._cached_seen = 0  # the engine counts since start; the counter takes the increase

    def on_step(self, outputs: list[RequestOutput], stats: EngineStats, pending: int) -> None:
        self.running.set(stats.num_running, self.tags)
        self.waiting.set(stats.num_waiting, self.tags)
        self.waiting_tokens.set(stats.num_waiting_tokens, self.tags)
        self.kv_usage.set(stats.kv_usage, self.tags)
        self.pending_imports.set(pending, self.tags)
        for out in outputs:
            if out.queue_time_s is not None:
                self.queue_time.observe(out.queue_time_s * 1e3, self.tags)
        if stats.num_cached_tokens > self._cached_seen:  # a counter only goes up, by > 0
            self.cached_tokens.inc(stats.num_cached_tokens - self._cached_seen, self.tags)
            self._cached_seen = stats.num_cached_tokens

    def on_transfer(self, ms: float, nbytes: int) -> None:
        self.kv_transfer_ms.observe(ms, self.tags)
        self.kv_transfer_bytes.inc(nbytes, self.tags)


class RequestMetrics:
    """At the ingress: what the client sees."""

    def __init__(self) -> None:
        keys = ("mode",)
        self.ttft = metrics.Histogram(
            "splitserve_ttft_ms", "time to first token", _LATENCY_MS, keys
        )
        self.tpot = metrics.Histogram(
            "splitserve_tpot_ms", "time per output token after the first", _LATENCY_MS, keys
        )
        self.e2e = metrics.Histogram(
            "splitserve_e2e_latency_ms", "request latency", _LATENCY_MS, keys
        )
        self.requests = metrics.Counter(
            "splitserve_requests", "finished requests", ("mode", "finish")
        )

    def on_finish(self, mode: str, ttft_s: float, last_s: float, num_tokens: int, reason: str):
        tags = {"mode": mode}
        self.ttft.observe(ttft_s * 1e3, tags)
        self.e2e.observe(last_s * 1e3, tags)
        if num_tokens > 1:
            self.tpot.observe((last_s - ttft_s) / (num_tokens - 1) * 1e3, tags)
        self.requests.inc(1, {"mode": mode, "finish": reason})
