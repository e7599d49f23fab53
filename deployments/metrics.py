"""Serving metrics through Ray's metrics API: they appear in the Ray dashboard and on each
node's Prometheus endpoint, tagged by Serve with application, deployment and replica.

Latencies are in milliseconds. Each series that vLLM has is also recorded under vLLM's name,
in its units, labelled with the model (Twin): what reads vLLM's series reads ours (Ray Serve
LLM's Grafana dashboard, the API port's /metrics).

Engine gauges are set after every engine step and when the engine goes idle, and set again
with the same values every GAUGE_REFRESH_S: Ray's metrics agent drops a gauge series that its
process has not exported for two export intervals (2 x 10 s), and a process exports a gauge
only when it was set since its last export (both seen with Ray 2.60). Without that, an idle
replica's running requests, queue and KV usage vanished from Prometheus 10-20 s after its last
step (a dashboard showed a gap, not 0).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass

from ray.serve import metrics

from engine import EngineStats, RequestOutput

GAUGE_REFRESH_S = 4.0  # under Ray's metrics export interval (metrics_report_interval_ms)
_LATENCY_MS = [5, 10, 25, 50, 75, 100, 150, 200, 300, 500, 750, 1000, 2000, 5000, 10000, 30000]
_LAG_MS = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 5000]
# vLLM's inter-token bounds (10 ms to 80 s) and finer ones below 50 ms, where decode steps
# and TPOT targets lie: a p99 against a 40 ms target needs a bound near 40 ms
_ITL_MS = [1, 2.5, 5, 10, 15, 20, 25, 30, 40, 50, 75, 100, 150, 200, 300, 400, 500, 750]
_ITL_MS += [1000, 2500, 5000, 7500, 10000, 20000, 40000, 80000]
EXACT_SUM = "_exact_sum"  # the name's end of a histogram's companion counter (Histogram)


def one_two_five(limit: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to `limit` (vLLM's length buckets)."""
    bounds, scale = [], 1
    while True:
        for step in (1, 2, 5):
            if step * scale > limit:
                return bounds
            bounds.append(float(step * scale))
        scale *= 10


# tokens, for every model alike: Ray drops the samples of a histogram whose bounds differ
# from those its node first saw under that name (two models with two context windows)
_LENGTHS = one_two_five(1_000_000)


@dataclass(frozen=True)
class Twin:
    """vLLM's name for one of our series, which is then recorded under it too, for the model
    `model` (vLLM's `model_name` label): so what reads vLLM's series reads ours, Ray Serve
    LLM's Grafana dashboard on Ray's Prometheus (it charts `ray_vllm_*`) as well as the API
    port's /metrics (app/vllm_metrics.py). Ray drops a metric whose name holds vLLM's ':'
    (seen with Ray 2.60), so `vllm:x` is recorded as `vllm_x`, as Ray Serve LLM's engines do."""

    name: str  # vLLM's, without its "vllm:"
    model: str
    ms: bool = False  # ours in milliseconds, vLLM's in seconds
    labels: tuple[tuple[str, str], ...] = ()  # (ours, vLLM's) tag names

    @property
    def ray_name(self) -> str:
        return VLLM_RAY_PREFIX + self.name

    def keys(self, keys: tuple) -> tuple:
        return (*(dict(self.labels).get(k, k) for k in keys), "model_name")

    def value(self, value: float) -> float:
        return value / 1000 if self.ms else value

    def tags(self, tags: dict[str, str] | None) -> dict[str, str]:
        if not self.labels:  # most: ours as they are (this runs with every observation)
            return {**(tags or {}), "model_name": self.model}
        names = dict(self.labels)
        return {names.get(k, k): v for k, v in (tags or {}).items()} | {"model_name": self.model}

    def histogram(self, description: str, boundaries: list[float], tag_keys: tuple) -> Histogram:
        """A histogram under this name, its bounds in vLLM's unit."""
        bounds = [self.value(b) for b in boundaries]
        return Histogram(self.ray_name, description, bounds, self.keys(tag_keys))


VLLM_RAY_PREFIX = "vllm_"  # what a Twin's name is recorded under


class Histogram:
    """A Ray histogram and a counter of its observations' exact sum: Ray (2.60) exports a
    histogram's sum as if each observation were its bucket's midpoint (a prompt of 40 tokens
    counts 35; one past the last bound, twice that bound), so a mean from it, such as a
    dashboard's mean TTFT, is off by up to half a bucket. The API port's /metrics page
    (app/metrics_page.py) shows the counter's sum as the histogram's. With `vllm`, the same
    under vLLM's name (its bounds in its unit)."""

    def __init__(
        self,
        name: str,
        description: str,
        boundaries: list[float],
        tag_keys: tuple = (),
        vllm: Twin | None = None,
    ) -> None:
        self.histogram = metrics.Histogram(name, description, boundaries, tag_keys)
        self.sum = metrics.Counter(name + EXACT_SUM, f"exact sum of {name}", tag_keys)
        self.vllm, self.twin = vllm, None
        if vllm is not None:
            self.twin = vllm.histogram(f"{description} ({name})", boundaries, tag_keys)

    def observe(self, value: float, tags: dict[str, str] | None = None) -> None:
        self.histogram.observe(value, tags)
        if value > 0:  # a Ray counter only goes up, by more than 0
            self.sum.inc(value, tags)
        if self.twin is not None:
            self.twin.observe(self.vllm.value(value), self.vllm.tags(tags))


class _Recorded:
    """A Ray counter or gauge (`kind`); with `vllm`, the same under vLLM's name."""

    def __init__(
        self, kind, name: str, description: str, tag_keys: tuple = (), vllm: Twin | None = None
    ) -> None:
        self.metric = kind(name, description, tag_keys)
        self.vllm, self.twin = vllm, None
        if vllm is not None:
            self.twin = kind(vllm.ray_name, f"{description} ({name})", vllm.keys(tag_keys))

    def _record(self, how: str, value: float, tags: dict[str, str] | None) -> None:
        getattr(self.metric, how)(value, tags)
        if self.twin is not None:
            getattr(self.twin, how)(self.vllm.value(value), self.vllm.tags(tags))


class Counter(_Recorded):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(metrics.Counter, *args, **kwargs)

    def inc(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record("inc", value, tags)


class Gauge(_Recorded):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(metrics.Gauge, *args, **kwargs)

    def set(self, value: float, tags: dict[str, str] | None = None) -> None:
        self._record("set", value, tags)


def _twin(model: str | None):
    """A Twin maker for `model`'s series; for no model (an engine outside an application,
    a unit test's), None for every name: nothing recorded under vLLM's names."""

    def twin(name: str, ms: bool = False, labels: tuple = ()) -> Twin | None:
        return None if model is None else Twin(name, model, ms, labels)

    return twin


class HeldGauges:
    """Sets gauges and keeps setting their last values (module docstring) on a thread of its
    own, every `refresh_s`: an idle engine steps no more, and nothing else would. The thread
    ends on close() or once this object is garbage: a thread left running would go on touching
    Ray (and collecting other threads' garbage) in a process whose Ray was shut down, and Ray
    ends such a process on the spot."""

    def __init__(self, refresh_s: float | None = None) -> None:
        self.refresh_s = _refresh_s() if refresh_s is None else refresh_s
        self._last: dict[tuple, tuple] = {}  # (gauge, tags) -> (gauge, value, tags)
        self._lock = threading.Lock()  # set on the engine thread, refreshed on this one
        self._closed = threading.Event()
        self._thread: threading.Thread | None = None

    def set(self, gauge, value: float, tags: dict[str, str]) -> None:
        gauge.set(value, tags)
        with self._lock:
            self._last[(id(gauge), *sorted(tags.items()))] = (gauge, value, tags)
            if self._thread is None and not self._closed.is_set():
                self._thread = threading.Thread(
                    target=_refresh_while_held,
                    args=(weakref.ref(self), self.refresh_s, self._closed),
                    name="gauge-refresh",
                    daemon=True,
                )
                self._thread.start()

    def refresh(self) -> None:
        with self._lock:
            last = list(self._last.values())
        for gauge, value, tags in last:
            gauge.set(value, tags)

    def close(self) -> None:
        """Stop refreshing (the replica is going away)."""
        self._closed.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    def __del__(self) -> None:
        self._closed.set()


def _refresh_while_held(ref: weakref.ref, interval_s: float, closed: threading.Event) -> None:
    """The refresh thread holds its HeldGauges only while refreshing: a strong reference
    would keep it (and this thread) alive forever."""
    while not closed.wait(interval_s):
        held = ref()
        if held is None:
            return
        held.refresh()
        del held


def _refresh_s() -> float:
    """GAUGE_REFRESH_S, or half of Ray's export interval where that is shorter."""
    try:
        import ray

        return min(GAUGE_REFRESH_S, ray._config.metrics_report_interval_ms() / 2000)
    except Exception:  # Ray's private config moved: the default interval is 10 s
        return GAUGE_REFRESH_S


class EngineMetrics:
    """Per engine replica (prefill, decode or colocated); with `cache` (a setting's label ->
    its value), the replica's KV cache as an info series (vLLM's cache_config_info)."""

    def __init__(
        self, phase: str, cache: dict[str, str] | None = None, model: str | None = None
    ) -> None:
        self.tags = {"phase": phase}
        self.gauges = HeldGauges()
        keys = ("phase",)
        vllm = _twin(model)  # the served name: vLLM's model_name
        if cache is not None:  # 1, its labels saying what the replica's cache is
            info = Gauge(
                "splitserve_kv_cache_config",
                "the KV cache's settings",
                (*keys, *cache),
                vllm("cache_config_info"),
            )
            self.gauges.set(info, 1, {**self.tags, **cache})
        self.running = Gauge(
            "splitserve_running_requests",
            "requests in the running batch",
            keys,
            vllm("num_requests_running"),
        )
        self.waiting = metrics.Gauge(
            "splitserve_waiting_requests", "requests queued for prefill", keys
        )
        self.waiting_tokens = metrics.Gauge(
            "splitserve_waiting_prompt_tokens", "prompt tokens queued for prefill", keys
        )
        self.kv_usage = Gauge(
            "splitserve_kv_block_usage",
            "share of KV blocks in use",
            keys,
            vllm("kv_cache_usage_perc"),
        )
        self.pending_imports = metrics.Gauge(
            "splitserve_pending_kv_imports", "handed-off requests waiting for decode blocks", keys
        )
        # vLLM's num_requests_waiting: its decode instances queue a hand-off that waits for
        # its KV or for blocks with the rest, so an autoscaler written for it sees both
        self.queued = Gauge(
            "splitserve_queued_requests",
            "requests waiting to run: queued for prefill, or handed off and waiting for blocks",
            keys,
            vllm("num_requests_waiting"),
        )
        self.queue_time = Histogram(
            "splitserve_queue_time_ms",
            "arrival at the engine -> first scheduled",
            _LATENCY_MS,
            keys,
            vllm("request_queue_time_seconds", ms=True),
        )
        self.prefill_time = Histogram(
            "splitserve_prefill_time_ms",
            "first scheduled -> first token, on the replica that computed the prompt",
            _LATENCY_MS,
            keys,
            vllm("request_prefill_time_seconds", ms=True),
        )
        self.step_tokens = Histogram(  # how full each step is
            "splitserve_step_tokens",
            "tokens an engine step computed",
            _LENGTHS,
            keys,
            vllm("iteration_tokens_total"),
        )
        self.kv_transfer_ms = Histogram(
            "splitserve_kv_transfer_ms",
            "KV channel time per request (send or receive)",
            _LATENCY_MS,
            keys,
        )
        self.kv_transfer_bytes = metrics.Counter(
            "splitserve_kv_transfer_bytes", "KV bytes moved through the channel", keys
        )
        cached = Counter(
            "splitserve_prefix_cache_hit_tokens",
            "prompt tokens taken from the prefix cache",
            keys,
            vllm("prefix_cache_hits"),
        )
        queried = Counter(  # hits / this is the hit rate
            "splitserve_prefix_cache_queried_tokens",
            "tokens of requests that looked the prefix cache up at their start",
            keys,
            vllm("prefix_cache_queries"),
        )
        preempted = Counter(  # each one costs a recompute
            "splitserve_preemptions",
            "running requests preempted for KV blocks (recomputed later)",
            keys,
            vllm("num_preemptions"),
        )
        self.loras = metrics.Gauge(
            "splitserve_lora_adapters", "LoRA adapters loaded in the replica", keys
        )
        lora_loads = metrics.Counter(  # lora_dir's adapters come and go: a rate here is churn
            "splitserve_lora_loads", "LoRA adapters loaded (at start, or at first use)", keys
        )
        # vLLM's spec_decode_num_draft_tokens / _accepted_tokens: their ratio is the
        # acceptance rate, what speculative decoding gains
        drafts = Counter(
            "splitserve_spec_decode_draft_tokens",
            "speculative draft tokens verified",
            keys,
            vllm("spec_decode_num_draft_tokens"),
        )
        accepted = Counter(
            "splitserve_spec_decode_accepted_tokens",
            "speculative draft tokens kept",
            keys,
            vllm("spec_decode_num_accepted_tokens"),
        )
        # vLLM's spec_decode_num_drafts and _num_accepted_tokens_per_pos: the acceptance at
        # each draft position (kept at it / drafts), which tells what num_speculative_tokens pays
        drafted = Counter(
            "splitserve_spec_decode_drafts",
            "requests' drafts verified (one a request a step)",
            keys,
            vllm("spec_decode_num_drafts"),
        )
        self._per_pos = Counter(
            "splitserve_spec_decode_accepted_tokens_per_pos",
            "speculative draft tokens kept, by their position in the draft (1 = first)",
            (*keys, "position"),
            vllm("spec_decode_num_accepted_tokens_per_pos"),
        )
        self.accepted_per_pos: list[Increase] = []
        self.orphaned_calls = metrics.Counter(  # each one an ingress replica's death cost
            "splitserve_orphaned_calls",
            "calls cancelled because the ingress replica that made them died",
            keys,
        )
        self.unread_dropped = metrics.Counter(  # each a prefill call cancelled as it ended
            "splitserve_kv_unread_dropped",
            "published KV freed because its prefill call was cancelled before its caller read it",
            keys,
        )
        self.cached_tokens, self.preemptions = Increase(cached), Increase(preempted)
        self.queried_tokens = Increase(queried)
        self.lora_loads = Increase(lora_loads)
        self.draft_tokens, self.accepted_tokens = Increase(drafts), Increase(accepted)
        self.drafts = Increase(drafted)

    def on_step(self, outputs: list[RequestOutput], stats: EngineStats) -> None:
        """After each step: what the step did (the gauges: on_load)."""
        for out in outputs:
            if out.queue_time_s is not None:
                self.queue_time.observe(out.queue_time_s * 1e3, self.tags)
            if out.prefill_time_s is not None:
                self.prefill_time.observe(out.prefill_time_s * 1e3, self.tags)
        if stats.num_step_tokens > 0:
            self.step_tokens.observe(stats.num_step_tokens, self.tags)
        self.cached_tokens.update(stats.num_cached_tokens, self.tags)
        self.queried_tokens.update(stats.num_queried_tokens, self.tags)
        self.preemptions.update(stats.num_preemptions, self.tags)
        self.lora_loads.update(stats.num_lora_loads, self.tags)
        self.draft_tokens.update(stats.num_draft_tokens, self.tags)
        self.accepted_tokens.update(stats.num_accepted_tokens, self.tags)
        self.drafts.update(stats.num_drafts, self.tags)
        for i, total in enumerate(stats.num_accepted_per_pos):
            if i == len(self.accepted_per_pos):
                self.accepted_per_pos.append(Increase(self._per_pos))
            self.accepted_per_pos[i].update(total, {**self.tags, "position": str(i + 1)})

    def on_load(self, stats: EngineStats, pending: int) -> None:
        """After each step, and when the engine goes idle: the engine's load now."""
        held = self.gauges
        held.set(self.running, stats.num_running, self.tags)
        held.set(self.waiting, stats.num_waiting, self.tags)
        held.set(self.waiting_tokens, stats.num_waiting_tokens, self.tags)
        held.set(self.kv_usage, stats.kv_usage, self.tags)
        held.set(self.pending_imports, pending, self.tags)
        held.set(self.queued, stats.num_waiting + pending, self.tags)
        held.set(self.loras, stats.num_loras, self.tags)

    def on_transfer(self, ms: float, nbytes: int) -> None:
        self.kv_transfer_ms.observe(ms, self.tags)
        self.kv_transfer_bytes.inc(nbytes, self.tags)

    def on_orphaned(self, calls: int) -> None:
        self.orphaned_calls.inc(calls, self.tags)

    def on_unread_dropped(self) -> None:
        self.unread_dropped.inc(1, self.tags)

    def close(self) -> None:
        self.gauges.close()


class Increase:
    """A counter fed from an engine's total since it started: it takes each increase (a
    Ray counter only goes up, by more than 0)."""

    def __init__(self, counter) -> None:
        self.counter, self.seen = counter, 0

    def update(self, total: int, tags: dict[str, str]) -> None:
        if total > self.seen:
            self.counter.inc(total - self.seen, tags)
            self.seen = total


class RequestMetrics:
    """At the ingress: what the client sees. With the application's SLO (ttft_ms, tpot_ms),
    each finished request is also counted by which targets it met: the share with
    met="both" is goodput's attainment, live."""

    def __init__(self, slo: tuple[float, float] | None = None, model: str | None = None) -> None:
        keys = ("mode",)
        self.slo = slo
        vllm = _twin(model)  # the served name: vLLM's model_name
        # the workload's lengths, as vLLM's request_prompt_tokens and _generation_tokens:
        # what the placement optimizer plans for, seen live
        self.prompt_lens = Histogram(
            "splitserve_request_prompt_tokens",
            "prompt tokens per request",
            _LENGTHS,
            keys,
            vllm("request_prompt_tokens"),
        )
        self.output_lens = Histogram(
            "splitserve_request_generation_tokens",
            "tokens generated per request",
            _LENGTHS,
            keys,
            vllm("request_generation_tokens"),
        )
        self.ttft = Histogram(
            "splitserve_ttft_ms",
            "time to first token",
            _LATENCY_MS,
            keys,
            vllm("time_to_first_token_seconds", ms=True),
        )
        self.tpot = Histogram(  # each request's mean
            "splitserve_tpot_ms",
            "time per output token after the first",
            _LATENCY_MS,
            keys,
            vllm("request_time_per_output_token_seconds", ms=True),
        )
        # as the client sees them, as they come (not at the request's end: a long stream's
        # intervals would all be observed at once then, stalling the event loop); under
        # vLLM's name only, in seconds: observed per streamed chunk, where each Ray metric
        # call (~4 us) is the front end's, a twin in our name would double them
        self._itl = vllm("inter_token_latency_seconds", ms=True)
        self.itl = None
        if self._itl is not None:
            self.itl = self._itl.histogram(
                "time between two outputs relayed for a request (each chunk after the first)",
                _ITL_MS,
                keys,
            )
        self.e2e = Histogram(
            "splitserve_e2e_latency_ms",
            "request latency",
            _LATENCY_MS,
            keys,
            vllm("e2e_request_latency_seconds", ms=True),
        )
        self.decode_time = Histogram(
            "splitserve_decode_time_ms",
            "first token -> last token",
            _LATENCY_MS,
            keys,
            vllm("request_decode_time_seconds", ms=True),
        )
        self.inference_time = Histogram(
            "splitserve_inference_time_ms",
            "first scheduled -> last token: the prefill time, then first token -> last",
            _LATENCY_MS,
            keys,
            vllm("request_inference_time_seconds", ms=True),
        )
        self.requests = Counter(
            "splitserve_requests",
            "finished requests",
            ("mode", "finish"),
            vllm("request_success", labels=(("finish", "finished_reason"),)),
        )
        self.prompt_tokens = Counter(
            "splitserve_prompt_tokens",
            "prompt tokens of finished requests",
            keys,
            vllm("prompt_tokens"),
        )
        self.generation_tokens = Counter(
            "splitserve_generation_tokens",
            "tokens generated for finished requests",
            keys,
            vllm("generation_tokens"),
        )
        self.slo_requests = metrics.Counter(
            "splitserve_slo_requests",
            "finished requests by the latency targets they met (both, ttft, tpot, none)",
            ("mode", "met"),
        )
        # the front end's load: what this replica relays, and how late its event loop runs
        self.outputs = metrics.Counter(
            "splitserve_relayed_outputs",
            "engine outputs relayed for finished requests (one streamed chunk each)",
            keys,
        )
        self.loop_lag = Histogram(
            "splitserve_ingress_loop_lag_ms",
            "how late the ingress's event loop woke for a 100 ms timer (deployments/loop_lag.py)",
            _LAG_MS,
        )

    def on_interval(self, mode: str, seconds: float) -> None:
        """A request's output came `seconds` after its previous one."""
        if self.itl is not None:
            self.itl.observe(seconds, self._itl.tags({"mode": mode}))

    def on_loop_lag(self, ms: float) -> None:
        self.loop_lag.observe(ms)

    def on_finish(
        self,
        mode: str,
        ttft_s: float,
        last_s: float,
        num_tokens: int,
        reason: str,
        num_prompt_tokens: int = 0,
        num_outputs: int = 0,
        prefill_s: float | None = None,
    ) -> None:
        """`prefill_s`: first scheduled -> first token, as the engine that computed the prompt
        timed it (RequestOutput.prefill_time_s), if it said."""
        tags = {"mode": mode}
        tpot_s = (last_s - ttft_s) / (num_tokens - 1) if num_tokens > 1 else 0.0
        self.ttft.observe(ttft_s * 1e3, tags)
        self.e2e.observe(last_s * 1e3, tags)
        self.decode_time.observe((last_s - ttft_s) * 1e3, tags)
        if prefill_s is not None:  # each part on one clock: the engine's, then this one's
            self.inference_time.observe((prefill_s + last_s - ttft_s) * 1e3, tags)
        if num_tokens > 1:
            self.tpot.observe(tpot_s * 1e3, tags)
        self.requests.inc(1, {"mode": mode, "finish": reason})
        self.prompt_lens.observe(num_prompt_tokens, tags)
        self.output_lens.observe(num_tokens, tags)
        if num_prompt_tokens > 0:  # a counter only goes up, by > 0
            self.prompt_tokens.inc(num_prompt_tokens, tags)
        if num_tokens > 0:
            self.generation_tokens.inc(num_tokens, tags)
        if num_outputs > 0:
            self.outputs.inc(num_outputs, tags)
        if self.slo is not None:
            met = slo_met(ttft_s * 1e3, tpot_s * 1e3, reason != "abort", self.slo)
            self.slo_requests.inc(1, {"mode": mode, "met": met})


def slo_met(ttft_ms: float, tpot_ms: float, completed: bool, slo: tuple[float, float]) -> str:
    """Which latency targets a finished request met: "both", "ttft", "tpot" or "none". A
    request the engine ended ("abort") met none; one of a single token has no TPOT to miss
    (as bench/metrics.py counts them)."""
    ttft = completed and ttft_ms <= slo[0]
    tpot = completed and tpot_ms <= slo[1]
    return "both" if ttft and tpot else "ttft" if ttft else "tpot" if tpot else "none"
