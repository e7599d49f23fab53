"""One engine request's calls to the engine replicas, and what ending them must free.

A disaggregated request makes two streamed calls: the prefill replica's (the first token, then
the KV it published for a decode replica) and the decode replica's (the other tokens). However
the request ends (finished, failed, or its client gone), the calls still running are cancelled,
which aborts the request on the replica that holds it, and published KV that no decode replica
took is freed: otherwise it stays where it was published (a shared-memory slot, the object
store, a staged buffer) until its TTL, minutes later, and a burst of clients that leave at
their first token fills the sender's pool with KV nobody will read.

The KV is the decode replica's once it has sent an output (it imported the KV before its first
step). Until then the ingress frees it through the decode deployment (`discard`, routed to a
replica on the sender's node, where every transport can free it); a discard after the decode
replica's own finish or drop changes nothing.

The prefill call is started apart from the request (`uncancelled`) and read by a task of its
own: Ray cancels the calls that a cancelled request made, and a cancelled call's items that
were not read yet are lost, the published result with them. So this cancels the prefill call
itself, where that is right: one whose first token has reached the request is not cancelled:
its result is read to the end and then freed. One whose first token has not is cancelled
(aborting its prefill), and a cancel cannot tell whether the call had published its result
already: a cancel that reaches the call still running frees it there; for one that had ended
(its items on their way to a loaded ingress: seen in CI), the ingress asks every prefill
replica to drop what it published for the request (`DropUnread`, after the read failed).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

# the prefill replica publishes right after the step that made the first token: milliseconds,
# unless its event loop is stalled; a result not read by then is left to its TTL
RESULT_WAIT_S = 60.0

Discard = Callable[[Any], Coroutine[Any, Any, None]]  # frees a PrefillResult's KV
DropUnread = Callable[[], Coroutine[Any, Any, None]]  # the prefill replicas free a lost one


@dataclass
class ReplicaCalls:
    """The calls of one engine request (Serve's streaming responses) and how far they got."""

    prefill: Any = None  # the prefill call: its first token, then its PrefillResult
    stream: Any = None  # the call whose outputs are the rest: decode's (or colocated's)
    result: Any = None  # the PrefillResult, once the request read it
    taken: bool = False  # the decode replica sent an output: it holds the KV now
    _first: asyncio.Future | None = None
    _reading: asyncio.Task | None = None  # -> the PrefillResult (None after a refusal)

    def read_prefill(self, prefill) -> None:
        """Start reading the prefill call on a task of its own."""
        self.prefill = prefill
        self._first = asyncio.get_running_loop().create_future()
        self._reading = asyncio.ensure_future(self._read())
        for future in (self._first, self._reading):  # a failure that nobody waits for
            future.add_done_callback(_retrieved)

    async def first(self) -> Any:
        """The prefill call's first item (its first token, or a refusal)."""
        return await asyncio.shield(self._first)

    async def prefill_result(self) -> Any:
        self.result = await asyncio.shield(self._reading)
        return self.result

    async def _read(self) -> Any:
        try:
            first = await anext(self.prefill)
        except asyncio.CancelledError:  # the call was cancelled
            self._first.cancel()
            raise
        except Exception as e:
            self._first.set_exception(e)
            raise
        self._first.set_result(first)
        if isinstance(first, Exception):  # a refusal: nothing follows
            return None
        return await anext(self.prefill)

    def end(self, discard: Discard, drop_unread: DropUnread) -> Coroutine[Any, Any, None] | None:
        """Cancel what still runs; -> what frees KV that no decode replica took (to run apart
        from the request, whose own task may be cancelled), or None."""
        if self.stream is not None:
            self.stream.cancel()
        if self._reading is not None and self.result is None:  # the request left first
            if not self._first.done():  # prefilling still: abort it
                self.prefill.cancel()
            return self._free_when_read(discard, drop_unread)
        return discard(self.result) if self._untaken(self.result) else None

    async def _free_when_read(self, discard: Discard, drop_unread: DropUnread) -> None:
        try:
            result = await asyncio.wait_for(asyncio.shield(self._reading), RESULT_WAIT_S)
        except Exception:  # none came (failed, or stalled): cancelled, it publishes nothing more
            self.prefill.cancel()
            await drop_unread()
            return
        except asyncio.CancelledError:  # the read was (its call cancelled), or this task was
            if not self._reading.cancelled():
                raise
            await drop_unread()  # what the call published before the cancel, if anything
            return
        if self._untaken(result):
            await discard(result)

    def _untaken(self, result: Any) -> bool:
        """A PrefillResult with KV to hand off that no decode replica has taken."""
        return getattr(result, "handoff", None) is not None and not self.taken


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def uncancelled(start: Callable[[], T]) -> T:
    """start() (a Serve handle call) made so that cancelling the current request does not
    cancel the call: outside the context that ties it to the request's Ray task (as Serve's
    own long-poll client starts its calls), and with the request's Serve context (its id, for
    the logs) less what makes Serve cancel the request's calls with it: the internal id under
    which it keeps them (the gRPC calls of the `throughput` and `haproxy` modes always) and
    the flag that asks it to."""
    from ray.serve import context as serve_context  # Ray Serve 2.60's request context

    current = serve_context._get_serve_request_context()

    def apart() -> T:
        kept = dataclasses.replace(
            current, _internal_request_id="", cancel_on_parent_request_cancel=False
        )
        serve_context._serve_request_context.set(kept)
        return start()

    return contextvars.Context().run(apart)


def this_process_transport(handle):
    """`handle` calling its deployment as this replica's Serve settings say: by gRPC in Serve's
    high-throughput mode (deployments/serve_env.py), else by Ray actor calls. A handle carries
    the setting of the process that built the application (its options are pickled with it),
    which need not be the cluster's: a driver started before the mode was set, say. Serve's
    private constant and option (`_by_reference`; Ray is pinned to 2.60, see pyproject)."""
    if handle is None:
        return None
    from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT

    return handle.options(_by_reference=not RAY_SERVE_USE_GRPC_BY_DEFAULT)
