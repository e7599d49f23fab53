"""Drive a synchronous LLMEngine from asyncio: one engine thread, commands in, outputs out.

The engine is single-threaded and its steps block for up to a second (a long prefill), so it
runs on its own thread. The replica's event loop never touches the engine: it appends commands
(add, abort, import, export) to a thread-safe queue and wakes the engine thread, which applies
them between steps. Each request's outputs come back through its own asyncio.Queue. The thread
sleeps on an Event when there is nothing to do (no polling).

Imports that do not fit yet (no free blocks) stay queued in FIFO order and are retried after
every step, so a handed-off request waits on the decode side instead of being dropped.

`on_prefilled` (the prefill replica's KV publish) runs on the engine thread right after the step
that prefilled a request, before the next step: a command queued from the event loop would
wait for the whole next prefill step (over a second here), and the decode side with it. What it
publishes is the stream's last item; if the consumer leaves before taking it (the client is
gone), `on_unclaimed` gets it, so that the KV it published is not kept for nobody.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
import math
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine import LLMEngine, RequestOutput, SamplingParams, StepFailed

logger = logging.getLogger(__name__)


@dataclass
class _Stream:
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop

    def put(self, item: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        on_step: Callable[[list, object, int], None] | None = None,
        on_prefilled: Callable[[LLMEngine, str], Any] | None = None,
        stream_interval_s: float = 0.0,
        on_unclaimed: Callable[[Any], None] | None = None,
        on_idle: Callable[[object, int], None] | None = None,
    ) -> None:
        self.engine = engine
        # a request's stream yields at most one item per interval, its outputs meanwhile
        # joined (Ray Serve LLM's stream batching): each item costs a Ray object, an SSE event
        # and the proxy's write; 0: each as it comes, those already waiting joined
        self.stream_interval_s = stream_interval_s
        self._on_step = on_step  # (outputs, stats, pending imports), on the engine thread
        # (engine, request id) -> what the request's stream yields after its prefilled output
        self._on_prefilled = on_prefilled
        # what on_prefilled returned for a request whose consumer left before taking it, on
        # the event loop (after the request's abort: nothing more is published for it)
        self._on_unclaimed = on_unclaimed
        # (stats, pending imports), on the engine thread, once each time it goes idle: the
        # last step's stats are stale when aborts (a disconnect, a dead ingress) or a failed
        # step emptied it, and its gauges and load signals would say so until the next step
        self._on_idle = on_idle
        self._idle_reported = False  # False at start: the empty engine is reported too
        self._commands: collections.deque[Callable[[], None]] = collections.deque()
        self._pending_imports: collections.deque[tuple] = collections.deque()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._busy_since: float | None = None  # when the thread's current iteration began
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    # ---- called from the event loop -----------------------------------------------------------

    def _stream(self, request_id: str) -> _Stream:
        stream = _Stream(asyncio.Queue(), asyncio.get_running_loop())
        self._streams[request_id] = stream
        return stream

    def _submit(self, command: Callable[[], None]) -> None:
        self._commands.append(command)
        self._wake.set()

    async def generate(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        prefill_only: bool = False,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request until it finishes (or, prefill-only, until it is prefilled).

        Validation errors are raised here; closing the iterator early aborts the request.
        """
        await self._validate(prompt_ids, params)
        stream = self._stream(request_id)

        def add() -> None:
            try:
                self.engine.add_request(request_id, prompt_ids, params, prefill_only=prefill_only)
            except Exception as e:  # reaches the caller; the engine keeps serving
                stream.put(e)

        self._submit(add)
        # aclosing: an early close of this stream must reach _drain now (it aborts), not at GC
        async with contextlib.aclosing(self._drain(request_id, stream)) as outputs:
            async for out in outputs:
                yield out

    async def continue_request(
        self,
        handoff,
        buffer,
        on_imported: Callable[[], None] | None = None,
        on_dropped: Callable[[], None] | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Decode a request prefilled elsewhere; waits (FIFO) until this engine has room.

        on_imported runs on the engine thread right after the blocks were scattered (it may
        raise to fail the request); on_dropped runs if the request never gets imported.
        """
        try:  # one that can never fit here must fail now, not wait for blocks forever
            await self._validate(handoff.prompt_token_ids, handoff.sampling_params)
        except Exception:
            if on_dropped is not None:
                on_dropped()
            raise
        stream = self._stream(handoff.request_id)
        pending = _PendingImport(handoff, buffer, stream, on_imported, on_dropped)
        self._submit(lambda: self._queue_import(pending))
        async with contextlib.aclosing(self._drain(handoff.request_id, stream)) as outputs:
            async for out in outputs:
                yield out

    async def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """engine.validate, on a thread of its own where it compiles a structured output: the
        largest take seconds (engine/grammar.py), and on the event loop every stream of the
        replica would wait that long (the rest takes microseconds there)."""
        if params.structured_output is None:
            self.engine.validate(prompt_ids, params)
        else:
            await asyncio.to_thread(self.engine.validate, prompt_ids, params)

    async def _drain(self, request_id: str, stream: _Stream) -> AsyncIterator[RequestOutput]:
        done = False
        held = None  # taken from the queue while joining outputs, not joinable: the next item
        sent = -math.inf  # when the last item was yielded (the event loop's clock)
        try:
            while not done:
                item = held if held is not None else await stream.queue.get()
                if isinstance(item, Exception):
                    raise item
                item, held = await self._joined(stream, item, sent + self.stream_interval_s)
                if not isinstance(item, RequestOutput):  # on_prefilled's result: the last item
                    done = True
                else:  # with on_prefilled, a prefilled request still has its result to come
                    done = item.finished or (item.prefilled and self._on_prefilled is None)
                yield item
                sent = asyncio.get_running_loop().time()
        finally:
            self._streams.pop(request_id, None)
            if not done:  # the consumer went away (disconnect, cancel, error): free the blocks
                self.abort(request_id, stream)

    @staticmethod
    async def _joined(stream: _Stream, item: Any, until: float) -> tuple[Any, Any]:
        """-> (item and the outputs after it that are queued now or arrive before `until`,
        joined; the next item if one that cannot be joined was taken, else None). A finished
        output, a prefilled one or an error ends the joining: those go out at once."""
        loop = asyncio.get_running_loop()
        while isinstance(item, RequestOutput) and not item.finished and not item.prefilled:
            if not stream.queue.empty():
                later = stream.queue.get_nowait()
            elif (wait := until - loop.time()) > 0:
                try:  # not wait_for: on 3.11 it drops a cancel that comes with the output
                    async with asyncio.timeout(wait):
                        later = await stream.queue.get()
                except TimeoutError:
                    break
            else:
                break
            if not isinstance(later, RequestOutput):
                return item, later
            item = item.then(later)
        return item, None

    def abort(self, request_id: str, left: _Stream | None = None) -> None:
        """Abort the request on the engine thread; `left`: its stream, which nobody reads any
        more: what the request published into it before the abort goes to on_unclaimed."""

        def cancel() -> None:
            for pending in [p for p in self._pending_imports if p.request_id == request_id]:
                self._pending_imports.remove(pending)
                pending.dropped()
            self.engine.abort(request_id)
            if left is not None and self._on_unclaimed is not None:
                # queued after every item the engine thread put in the stream before now
                left.loop.call_soon_threadsafe(self._claim_leftovers, left)

        self._submit(cancel)

    def _claim_leftovers(self, stream: _Stream) -> None:
        while not stream.queue.empty():
            item = stream.queue.get_nowait()
            if not isinstance(item, RequestOutput | Exception):  # on_prefilled's result
                self._on_unclaimed(item)

    async def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run fn(engine) on the engine thread between steps; returns its result."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def run() -> None:
            try:
                result = fn(self.engine)
            except Exception as e:
                loop.call_soon_threadsafe(_set_exception, future, e)
            else:
                loop.call_soon_threadsafe(_set_result, future, result)

        self._submit(run)
        return await future

    def busy_s(self) -> float:
        """How long the engine thread has been in its current iteration (commands, imports,
        a step); 0 while it waits for work. A hung step shows here, not in is_alive."""
        since = self._busy_since
        return 0.0 if since is None else time.monotonic() - since

    def fail_all(self, error: Exception) -> None:
        """End every request's stream with `error` (event loop): the engine thread is stuck
        and will not; each stream's abort waits for it in the command queue."""
        for stream in list(self._streams.values()):
            stream.queue.put_nowait(error)

    def shutdown(self) -> None:
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=10)

    # ---- the engine thread --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopped:
            self._busy_since = time.monotonic()
            while self._commands:
                self._commands.popleft()()
            self._admit_imports()
            if not self.engine.has_unfinished:
                self._report_idle()
                self._busy_since = None
                self._wake.wait()
                self._wake.clear()
                continue
            self._idle_reported = False
            try:
                outputs = self.engine.step()
            except StepFailed as e:  # its requests alone: those waiting go on
                logger.exception("engine step failed; its requests were aborted")
                self._fail(e.request_ids)
                continue
            except Exception:  # the engine's state is unknown: fail everything, never the loop
                logger.exception("engine step failed; aborting every request")
                self._fail(list(self._streams))
                continue
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is not None:
                    # the engine ended it on an error (its structured output's parser failed)
                    stream.put(out if out.error is None else out.error)
                    if out.prefilled and self._on_prefilled is not None:
                        stream.put(self._publish(out.request_id))
            if self._on_step is not None:
                self._on_step(outputs, self.engine.stats, len(self._pending_imports))

    def _report_idle(self) -> None:
        if not self._idle_reported and self._on_idle is not None:
            self._on_idle(self.engine.stats, len(self._pending_imports))
        self._idle_reported = True

    def _publish(self, request_id: str) -> Any:
        try:
            return self._on_prefilled(self.engine, request_id)
        except Exception as e:  # fails this request alone; its blocks go back
            logger.exception("publishing the KV of %s failed", request_id)
            self.engine.abort(request_id)
            return e

    def _queue_import(self, pending: _PendingImport) -> None:
        """FIFO; under the priority policy, behind every import of a lower or equal priority."""
        if self.engine.config.scheduler.policy == "priority":
            bisect.insort_right(self._pending_imports, pending, key=_import_priority)
        else:
            self._pending_imports.append(pending)

    def _admit_imports(self) -> None:
        while self._pending_imports:
            pending = self._pending_imports[0]
            try:
                admitted = self.engine.import_request(pending.handoff, pending.buffer)
                if admitted and pending.on_imported is not None:
                    pending.on_imported()
            except Exception as e:  # bad handoff, or its KV changed underneath: fail it alone
                self._pending_imports.popleft()
                self.engine.abort(pending.request_id)
                pending.dropped()
                pending.stream.put(e)
                continue
            if not admitted:
                return  # FIFO: later imports wait behind the first
            self._pending_imports.popleft()

    def _fail(self, request_ids: list[str]) -> None:
        # a RuntimeError, not the engine's RequestFailedError: the ingress answers 503 (retry),
        # as a failed step is the replica's state (a dead worker), not the request's
        error = RuntimeError("engine step failed (the replica's log has why); request aborted")
        for request_id in request_ids:
            self.engine.abort(request_id)
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put(error)

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def num_pending_imports(self) -> int:
        return len(self._pending_imports)


@dataclass
class _PendingImport:
    handoff: Any
    buffer: Any
    stream: _Stream
    on_imported: Callable[[], None] | None
    on_dropped: Callable[[], None] | None

    @property
    def request_id(self) -> str:
        return self.handoff.request_id

    def dropped(self) -> None:
        if self.on_dropped is not None:
            self.on_dropped()


def _set_result(future: asyncio.Future, value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _set_exception(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)


def _import_priority(pending: _PendingImport) -> int:
    return pending.handoff.sampling_params.priority
