"""Prefill and decode scale on their own signals, through Ray Serve's autoscaling hooks.

Replicas report raw load with `record_autoscaling_stats` (load_signals below); Serve averages
each metric per replica over `look_back_period_s` and hands it to a custom policy, run by the
Serve controller, which turns it into a replica count with the placement profile's latency
model (prefill and decode coefficients, as in placement/latency_model.py):
- prefill: Q queued prompt tokens (summed over replicas) predict the wait of a new arrival when
  spread over k replicas: a * ceil(Q / (k * budget)) + b * Q / k + c * (Q / k) * min(Q / k,
  budget). The policy asks for the fewest replicas whose prediction is within `headroom` x the
  TTFT target.
- decode: B running requests with C context tokens over all replicas predict a step of
  a + b * C / k + c * B / k on k replicas; the policy asks for the fewest replicas whose step is
  within `headroom` x the TPOT target and whose KV use is within `kv_target` of capacity.
  Handed-off requests waiting for KV room (pending imports) ask for one more replica.
Down-scaling uses a lower bar (`down_margin` x the up bar; for decode, x the part of the bar
above the fixed step cost a) so the count does not flap; Serve
applies min/max replicas, delays and scaling factors around the policy. Pure functions first,
Serve glue last; the signals and decisions are exported as gauges for the dashboard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

PREFILL_SIGNALS = ("queued_prompt_tokens",)
DECODE_SIGNALS = (
    "running_requests",
    "context_tokens",
    "kv_used_tokens",
    "kv_capacity_tokens",
    "pending_imports",
)


@dataclass(frozen=True)
class Latency:
    """One phase's step-time coefficients (ms, ms/token, and ms/token^2 or ms/request)."""

    a: float
    b: float
    c: float


def load_signals(stats, pending_imports: int, block_size: int) -> dict[str, float]:
    """What a replica reports (from its EngineStats after a step)."""
    return {
        "queued_prompt_tokens": float(stats.num_waiting_tokens),
        "running_requests": float(stats.num_running),
        "context_tokens": float(stats.num_running_tokens),
        "kv_used_tokens": float(stats.num_used_blocks * block_size),
        "kv_capacity_tokens": float(stats.num_kv_blocks * block_size),
        "pending_imports": float(pending_imports),
    }


def predicted_prefill_wait_ms(queued: float, k: int, lat: Latency, budget: int) -> float:
    if queued <= 0:
        return 0.0
    per = queued / k
    return lat.a * math.ceil(per / budget) + lat.b * per + lat.c * per * min(per, budget)


def prefill_replicas(
    queued: float,
    current: int,
    lat: Latency,
    ttft_target_ms: float,
    budget: int = 2048,
    headroom: float = 0.5,
    down_margin: float = 0.5,
    max_replicas: int = 64,
) -> int:
    """Desired prefill replicas for `queued` prompt tokens (0 when idle: Serve's min applies)."""
    if queued <= 0:
        return 0
    bar = headroom * ttft_target_ms

    def fewest(limit: float) -> int:
        for k in range(1, max_replicas + 1):
            if predicted_prefill_wait_ms(queued, k, lat, budget) <= limit:
                return k
        return max_replicas

    up = fewest(bar)
    return up if up > current else min(current, fewest(down_margin * bar))


def predicted_decode_step_ms(running: float, context: float, k: int, lat: Latency) -> float:
    return lat.a + lat.b * context / k + lat.c * running / k


def decode_replicas(
    signals: dict[str, float],
    current: int,
    lat: Latency,
    tpot_target_ms: float,
    headroom: float = 0.8,
    kv_target: float = 0.8,
    down_margin: float = 0.7,
    max_replicas: int = 64,
) -> int:
    """Desired decode replicas for the summed decode signals (0 when idle)."""
    running, context = signals["running_requests"], signals["context_tokens"]
    kv_used, pending = signals["kv_used_tokens"], signals["pending_imports"]
    capacity = signals["kv_capacity_tokens"] / max(current, 1)  # per replica
    if running <= 0 and pending <= 0:
        return 0

    def fewest(margin: float) -> int:
        # the margin applies to the step's load above its fixed cost a, which no replica
        # count removes (a bar on the whole step would make scale-down unreachable near a)
        budget = headroom * tpot_target_ms - lat.a
        for k in range(1, max_replicas + 1):
            load = predicted_decode_step_ms(running, context, k, lat) - lat.a
            step_ok = load <= margin * budget
            if step_ok and kv_used / k <= margin * kv_target * capacity:
                return k
        return max_replicas

    up = max(fewest(1.0), current + 1 if pending > 0 else 0)
    return up if up > current else min(current, fewest(down_margin))


def _summed(ctx, names: tuple[str, ...]) -> dict[str, float]:
    """Per-replica averages from Serve, summed over the running replicas."""
    metrics = ctx.aggregated_metrics or {}
    return {name: float(sum(metrics.get(name, {}).values())) for name in names}


class _Policy:
    """Serve custom autoscaling policy: called with an AutoscalingContext every control-loop
    tick, in the Serve controller; exports its inputs and decision as gauges."""

    signals: tuple[str, ...] = ()

    def __init__(self) -> None:
        from ray.util import metrics

        self._desired = metrics.Gauge(
            "splitserve_autoscale_desired_replicas",
            "replicas the splitserve policy asks for",
            tag_keys=("deployment",),
        )
        self._current = metrics.Gauge(
            "splitserve_autoscale_current_replicas",
            "running replicas seen by the splitserve policy",
            tag_keys=("deployment",),
        )
        self._signal = metrics.Gauge(
            "splitserve_autoscale_signal",
            "the load signals behind the decision, summed over replicas",
            tag_keys=("deployment", "signal"),
        )

    def __call__(self, ctx) -> tuple[int, dict]:
        signals = _summed(ctx, self.signals)
        desired, derived = self.decide(signals, ctx.current_num_replicas)
        tags = {"deployment": ctx.deployment_name}
        self._desired.set(desired, tags)
        self._current.set(ctx.current_num_replicas, tags)
        for name, value in {**signals, **derived}.items():
            self._signal.set(value, {**tags, "signal": name})
        return desired, {}

    def decide(self, signals: dict[str, float], current: int) -> tuple[int, dict[str, float]]:
        raise NotImplementedError


class PrefillPolicy(_Policy):
    signals = PREFILL_SIGNALS

    def __init__(
        self,
        ttft_target_ms: float,
        latency: dict,
        max_batch_tokens: int = 2048,
        headroom: float = 0.5,
    ) -> None:
        super().__init__()
        self.target, self.lat = ttft_target_ms, Latency(**latency)
        self.budget, self.headroom = max_batch_tokens, headroom

    def decide(self, signals: dict[str, float], current: int) -> tuple[int, dict[str, float]]:
        queued = signals["queued_prompt_tokens"]
        desired = prefill_replicas(
            queued, current, self.lat, self.target, self.budget, self.headroom
        )
        wait = predicted_prefill_wait_ms(queued, max(current, 1), self.lat, self.budget)
        return desired, {"predicted_queue_wait_ms": wait}


class DecodePolicy(_Policy):
    signals = DECODE_SIGNALS

    def __init__(
        self,
        tpot_target_ms: float,
        latency: dict,
        headroom: float = 0.8,
        kv_target: float = 0.8,
    ) -> None:
        super().__init__()
        self.target, self.lat = tpot_target_ms, Latency(**latency)
        self.headroom, self.kv_target = headroom, kv_target

    def decide(self, signals: dict[str, float], current: int) -> tuple[int, dict[str, float]]:
        desired = decode_replicas(
            signals, current, self.lat, self.target, self.headroom, self.kv_target
        )
        step = predicted_decode_step_ms(
            signals["running_requests"], signals["context_tokens"], max(current, 1), self.lat
        )
        return desired, {"predicted_step_ms": step}
