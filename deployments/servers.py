"""Ray Serve deployment classes. Plain Python classes: app/builder.py alone turns them into
deployments (`serve.deployment(cls, **options).bind(...)`), so they are testable without Serve.

- PrefillServer: prefill-only engine. `prefill()` returns the first token and, unless the request
  already finished, its KV published on the channel; its blocks are freed once published.
- DecodeServer: `decode()` receives a handoff, waits for free blocks, streams the rest.
- ColocatedServer: one engine runs both phases (whole-prompt or chunked prefill): the baseline.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from deployments.autoscaling import load_signals
from deployments.callers import Caller, CallerWatch
from deployments.engine_loop import EngineLoop
from engine import InvalidRequestError, KVHandoff, LLMEngine, RequestOutput, SamplingParams
from engine.config import EngineConfig
from engine.kv_handoff import KVPiece, discard_all, discarder_all, finish_all
from engine.parallel import ParallelLayout
from kvkernels import kv_channel
from kvkernels.ref_keeper import HeldRefs

logger = logging.getLogger(__name__)

# How long a prefill replica remembers the KV of a call that has ended, for the ingress's
# drop_unread: the ingress asks within its RESULT_WAIT_S (60 s, app/replica_calls.py) of the
# call's end, and the broadcast takes its time on a loaded host
HANDED_TTL_S = 120.0


@dataclass(frozen=True)
class PrefillResult:
    """Prefill replica -> ingress -> decode replica."""

    first: RequestOutput
    handoff: KVHandoff | None  # None when the request finished at its first token
    pieces: list[KVPiece] | None  # one per (prefill rank, decode rank) that share KV
    node_id: str


def _step_trace(phase: str):
    """With SPLITSERVE_STEP_TRACE=DIR, every step of this replica is appended to
    DIR/<phase>-<pid>.jsonl (duration, prefill lengths, decode contexts): the in-server step
    times that bench.report fits the latency model to."""
    root = os.environ.get("SPLITSERVE_STEP_TRACE")
    if not root:
        return None
    Path(root).mkdir(parents=True, exist_ok=True)
    return open(Path(root) / f"{phase}-{os.getpid()}.jsonl", "a", buffering=1)  # noqa: SIM115


def _cache_config(engine: LLMEngine, config: EngineConfig) -> dict[str, str]:
    """The replica's KV cache as vLLM's cache_config_info labels it (its blocks, wherever they
    live, under vLLM's name num_gpu_blocks)."""
    return {
        "block_size": str(engine.blocks.block_size),
        "num_gpu_blocks": str(engine.blocks.num_blocks),
        "cache_dtype": config.kv_cache_dtype,
        "enable_prefix_caching": str(config.scheduler.enable_prefix_caching),
    }


def _node_id() -> str:
    try:
        import ray

        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray (unit tests)
        return "local"


class _EngineServer:
    phase = "engine"

    def __init__(
        self,
        engine_config: EngineConfig,
        kv_transport: str = "shm",
        stream_batching_interval_ms: float = 0.0,
    ) -> None:
        from deployments.metrics import EngineMetrics

        self.engine = LLMEngine(engine_config, kv_transport=kv_transport)
        self.metrics = EngineMetrics(
            self.phase,
            _cache_config(self.engine, engine_config),
            engine_config.served_model_name,
        )
        self._signals = load_signals(self.engine.stats, 0, self.engine.blocks.block_size)
        self._trace = _step_trace(self.phase)  # before the loop thread can step
        self.loop = EngineLoop(
            self.engine,
            on_step=self._on_step,
            on_prefilled=self._on_prefilled,
            stream_interval_s=stream_batching_interval_ms / 1e3,
            on_unclaimed=self._unclaimed,
            on_idle=self._on_load,
        )
        self.node_id = _node_id()
        self.channel = kv_channel.KVChannel(kv_transport, self.node_id)
        # ends the calls of an ingress replica that died
        self.callers = CallerWatch(on_orphaned=self.metrics.on_orphaned)

    async def _served(self, stream: AsyncIterator, caller: Caller | None) -> AsyncIterator:
        """What a call yields: the stream's items, cancelled (the request aborted) if `caller`
        dies (deployments/callers.py). A refusal (InvalidRequestError: the request's fault, a
        400) ends it as its last item instead of being raised: Serve would log a raised one
        with a traceback as "Request failed." and count it among the replica's errors; the
        ingress raises it."""
        with self.callers.watching(caller):
            async with contextlib.aclosing(stream) as items:  # a cancel aborts at once
                try:
                    async for item in items:
                        yield item
                except InvalidRequestError as e:
                    yield e

    # the prefill replica publishes the KV of a prefilled request, and frees what nobody took
    _on_prefilled = _unclaimed = None

    def _on_step(self, outputs, stats, pending: int) -> None:  # engine thread
        self.metrics.on_step(outputs, stats)
        if self._trace is not None and self.engine.last_step is not None:
            self._trace.write(json.dumps(vars(self.engine.last_step)) + "\n")
        self._on_load(stats, pending)

    def _on_load(self, stats, pending: int) -> None:  # engine thread: after a step, or idle
        self.metrics.on_load(stats, pending)
        # one reference swap: the event loop reads a whole snapshot, never a half-written one
        self._signals = load_signals(stats, pending, self.engine.blocks.block_size)

    async def record_autoscaling_stats(self) -> dict[str, float]:
        """Serve's custom-metrics hook: this replica's load (deployments/autoscaling.py)."""
        return self._signals

    async def stats(self) -> dict:
        stats = await self.loop.call(lambda e: e.stats)
        return {
            **vars(stats),
            "node_id": self.node_id,
            "pid": os.getpid(),  # the replica's process (its logs, py-spy, a failure drill)
            "num_pending_imports": self.loop.num_pending_imports,
            "num_cross_node_handoffs": getattr(self, "num_cross_node_handoffs", 0),
            "num_kept_kv_transfers": await self.channel.num_kept(),  # sent, not yet released
            "num_orphaned_calls": self.callers.num_orphaned,  # their ingress replica died
            # prefill: results freed because their call was cancelled on their way (drop_unread)
            "num_unread_dropped": getattr(self, "num_unread_dropped", 0),
            "worker_pids": getattr(self.engine.runner, "worker_pids", []),  # TP x PP workers
        }

    async def max_request_tokens(self) -> int:
        """Prompt + output tokens one request may need: this replica's whole KV cache."""
        return self.engine.blocks.num_blocks * self.engine.blocks.block_size

    async def check_health(self) -> None:
        if not self.loop.is_alive:
            raise RuntimeError("engine thread died")
        limit, busy = self.engine.config.step_timeout_s, self.loop.busy_s()
        if limit is not None and busy > limit:
            # Serve drains a failed replica's requests before it stops it, and these would
            # never end: they fail now (503, retry), so the replacement comes at once
            stuck = RuntimeError(
                f"the engine has been in one step for {busy:.0f} s, past step_timeout_s "
                f"({limit:g} s): the replica is stuck and is being replaced"
            )
            self.loop.fail_all(stuck)
            raise stuck
        check = getattr(self.engine.runner, "check_health", None)
        if check is not None:  # a multi-worker replica with a dead worker must be replaced
            check()

    def __del__(self) -> None:
        loop = getattr(self, "loop", None)
        if loop is not None:
            loop.shutdown()
        close_metrics = getattr(getattr(self, "metrics", None), "close", None)
        if close_metrics is not None:  # its gauge thread
            close_metrics()
        shutdown = getattr(getattr(getattr(self, "engine", None), "runner", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
        channel = getattr(self, "channel", None)
        if channel is not None:
            channel.close()  # unlink this replica's shared-memory segments


class PrefillServer(_EngineServer):
    phase = "prefill"
    num_unread_dropped = 0

    def __init__(
        self,
        engine_config: EngineConfig,
        kv_transport: str = "shm",
        decode_layout: ParallelLayout | None = None,
    ) -> None:
        super().__init__(engine_config, kv_transport)
        # the KV is cut into the pieces that each decode rank holds (engine/kv_handoff.py)
        self.decode_layout = decode_layout or ParallelLayout()
        # what frees the KV of each call that ended, by request id, until drop_unread or TTL
        self._handed = HeldRefs(HANDED_TTL_S)

    def _unclaimed(self, published) -> None:
        """A request's published KV that its caller left before taking: nobody will read it,
        so it is freed now rather than held until its TTL (event loop)."""
        handoff, pieces = published
        logger.info("request %s left before its KV hand-off: discarding it", handoff.request_id)
        discard_all(self.channel, pieces)

    async def prefill(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        caller: Caller | None = None,
    ) -> AsyncIterator[RequestOutput | PrefillResult]:
        """Yields the first token as soon as it exists, then the PrefillResult (KV published)."""
        stream = self.loop.generate(request_id, prompt_ids, params, prefill_only=True)
        first = published = None
        try:
            async with contextlib.aclosing(self._served(stream, caller)) as items:
                async for item in items:
                    if isinstance(item, InvalidRequestError):
                        yield item
                        return
                    if isinstance(item, RequestOutput):
                        first = item
                        yield first
                    else:
                        published = item
            if published is None:  # finished at its first token: nothing to hand off
                yield PrefillResult(first, None, None, self.node_id)
                return
            handoff, pieces = published
            self.metrics.on_transfer(
                max(p.transfer.send_ms for p in pieces), sum(p.nbytes for p in pieces)
            )
            yield PrefillResult(first, handoff, pieces, self.node_id)
            # The caller holds the KV now (the ingress frees what it drops), unless it dies
            # before its decode call took it, or it cancelled this call before the result
            # reached it: Serve drops a cancelled call's unread items, so the ingress cannot
            # know, and asks (drop_unread); a cancel that comes at the yield frees it below.
            published = None
            discard = discarder_all(self.channel, pieces)
            self.callers.if_dies(caller, discard)
            if not self._handed.hold(request_id, discard):  # its drop_unread came first
                self._dropped(request_id, discard)
        finally:
            if published is not None:  # cancelled after the publish, before the caller had it
                self._unclaimed(published)

    async def drop_unread(self, request_id: str) -> bool:
        """The ingress cancelled this request's prefill call before its result reached it
        (broadcast to every prefill replica): free the KV, if this replica published it and
        the call has ended; if it has not, its cancel frees it, or its end does (it finds
        this drop remembered). -> whether this replica freed KV now."""
        discard = self._handed.release(request_id)
        if discard is not None:
            self._dropped(request_id, discard)
        return discard is not None

    def _dropped(self, request_id: str, discard) -> None:
        self.num_unread_dropped += 1
        self.metrics.on_unread_dropped()
        logger.info(
            "request %s: its KV hand-off never reached its caller: discarding it", request_id
        )
        discard()

    def _on_prefilled(self, engine: LLMEngine, request_id: str):  # engine thread, after the step
        """Publish the request's KV (cut for the decode layout), then free its blocks."""
        handoff = engine.kv_handoff(request_id)
        pieces = engine.runner.send_kv(list(handoff.block_ids), self.decode_layout, self.channel)
        engine.release(request_id)
        return handoff, pieces


class DecodeServer(_EngineServer):
    phase = "decode"
    num_cross_node_handoffs = 0  # the router prefers a decode replica on the prefill's node

    async def decode(
        self,
        handoff: KVHandoff,
        pieces: list[KVPiece],
        prefill_node_id: str | None = None,
        caller: Caller | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """prefill_node_id is read by app.router.SameNodeRouter to pick this replica."""
        t0 = time.perf_counter()
        if prefill_node_id is not None and prefill_node_id != self.node_id:
            self.num_cross_node_handoffs += 1
        own = self.engine.runner.opens_own_kv  # workers open their pieces themselves
        kv = pieces if own else [(p, await self.channel.open_async(p.transfer)) for p in pieces]

        def imported() -> None:  # engine thread, right after the scatter
            if not own:
                finish_all(self.channel, pieces)
            nbytes = sum(p.nbytes for p in pieces)
            self.metrics.on_transfer((time.perf_counter() - t0) * 1e3, nbytes)

        stream = self.loop.continue_request(
            handoff, kv, on_imported=imported, on_dropped=lambda: discard_all(self.channel, pieces)
        )
        async with contextlib.aclosing(self._served(stream, caller)) as outputs:
            async for out in outputs:
                yield out

    async def discard(self, pieces: list[KVPiece], prefill_node_id: str | None = None) -> None:
        """Free a request's published KV that no decode call will import (the ingress's
        client left during the hand-off). prefill_node_id routes this call as decode's is
        routed: to a replica on the sender's node, where every transport can free it."""
        discard_all(self.channel, pieces)


class ColocatedServer(_EngineServer):
    phase = "colocated"

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        caller: Caller | None = None,
    ) -> AsyncIterator[RequestOutput]:
        stream = self.loop.generate(request_id, prompt_ids, params)
        async with contextlib.aclosing(self._served(stream, caller)) as outputs:
            async for out in outputs:
                yield out
