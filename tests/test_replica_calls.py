"""ReplicaCalls (app/replica_calls.py): what the end of a request cancels and which published KV
it frees, with fake Serve calls (streams whose items come when the test lets them)."""

from __future__ import annotations

import asyncio
import contextvars
from dataclasses import dataclass

import pytest

from app import replica_calls
from app.replica_calls import ReplicaCalls, uncancelled

pytestmark = pytest.mark.unit


class FakeCall:
    """A streamed Serve call: its items come one by one as release() lets them; after cancel()
    none comes (a read waiting for one fails)."""

    def __init__(self, *items, cancelled_as: type[BaseException] = RuntimeError) -> None:
        self.items = list(items)
        self.released = asyncio.Semaphore(0)
        self.cancelled = False
        self.cancelled_as = cancelled_as  # what a read of a cancelled call raises

    def release(self, n: int = 1) -> None:
        for _ in range(n):
            self.released.release()

    def __aiter__(self):
        return self

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        await self.released.acquire()
        if self.cancelled:
            raise self.cancelled_as("the call was cancelled")
        return self.items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True
        self.release(len(self.items) + 1)


@dataclass
class Result:  # the part of a PrefillResult that ReplicaCalls reads
    handoff: object | None


FIRST = "first token"


class Freed(list):
    """The discard function: records what it was asked to free."""

    async def __call__(self, result) -> None:
        self.append(result)


class Dropped:
    """The drop_unread function: counts the requests to every prefill replica to drop the
    result of a call that was cancelled or failed before it was read."""

    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self) -> None:
        self.calls += 1


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=10))


async def _read_both(calls: ReplicaCalls, prefill: FakeCall):
    calls.read_prefill(prefill)
    prefill.release(2)
    assert await calls.first() == FIRST
    return await calls.prefill_result()


def test_kv_that_the_decode_replica_took_is_not_freed_by_the_ingress():
    async def go():
        calls, freed, dropped, result = ReplicaCalls(), Freed(), Dropped(), Result("handoff")
        assert await _read_both(calls, FakeCall(FIRST, result)) is result
        calls.stream, calls.taken = FakeCall("token"), True
        assert calls.end(freed, dropped) is None
        assert calls.stream.cancelled and freed == [] and dropped.calls == 0

    run(go())


def test_kv_that_no_decode_replica_took_is_freed():
    """The request ended while its decode call was being made (the client left, or the call
    failed before its first output): the decode call is cancelled and the KV freed."""

    async def go():
        calls, freed, dropped, result = ReplicaCalls(), Freed(), Dropped(), Result("handoff")
        await _read_both(calls, FakeCall(FIRST, result))
        calls.stream = FakeCall("token")
        await calls.end(freed, dropped)
        assert calls.stream.cancelled and freed == [result] and dropped.calls == 0

    run(go())


def test_a_request_that_finished_at_its_first_token_has_nothing_to_free():
    async def go():
        calls, freed, dropped = ReplicaCalls(), Freed(), Dropped()
        await _read_both(calls, FakeCall(FIRST, Result(None)))
        assert calls.end(freed, dropped) is None and freed == [] and dropped.calls == 0

    run(go())


def test_a_request_cancelled_before_its_result_came_frees_the_result_when_it_comes():
    """The client left at the first token: the request's wait for the result is cancelled,
    yet the prefill call is not (its result would be lost); the result is read on and
    freed once it comes."""

    async def go():
        calls, freed, dropped, result = ReplicaCalls(), Freed(), Dropped(), Result("handoff")
        prefill = FakeCall(FIRST, result)
        calls.read_prefill(prefill)
        prefill.release()
        assert await calls.first() == FIRST
        waiting = asyncio.ensure_future(calls.prefill_result())
        await asyncio.sleep(0)
        waiting.cancel()  # the request's task is cancelled while it waits for the result
        with pytest.raises(asyncio.CancelledError):
            await waiting
        freeing = asyncio.ensure_future(calls.end(freed, dropped))
        await asyncio.sleep(0.01)
        assert not prefill.cancelled and freed == []  # still waiting for the result
        prefill.release()
        await freeing
        assert freed == [result] and not prefill.cancelled and dropped.calls == 0

    run(go())


def test_a_request_that_leaves_during_its_prefill_cancels_it():
    """No first token yet: the prefill call is cancelled (the prefill replica aborts the
    request and frees what it published itself); nothing comes to free here, and the
    prefill replicas are asked to drop the result, in case the call had ended already
    (its items on their way: a cancel drops them)."""

    async def go():
        calls, freed, dropped = ReplicaCalls(), Freed(), Dropped()
        prefill = FakeCall(FIRST, Result("handoff"))
        calls.read_prefill(prefill)
        await calls.end(freed, dropped)
        assert prefill.cancelled and freed == [] and dropped.calls == 1

    run(go())


def test_a_prefill_call_cancelled_by_serve_ends_the_freeing_quietly():
    """Serve may cancel the call itself (a read of it then raises CancelledError, as Serve's
    streaming responses do): nothing came, so nothing is freed here; the prefill replicas
    are asked to drop the result, and the clean-up ends."""

    async def go():
        calls, freed, dropped = ReplicaCalls(), Freed(), Dropped()
        prefill = FakeCall(FIRST, Result("handoff"), cancelled_as=asyncio.CancelledError)
        calls.read_prefill(prefill)
        prefill.release()
        await calls.first()
        prefill.cancel()
        await calls.end(freed, dropped)
        assert freed == [] and dropped.calls == 1

    run(go())


def test_a_result_that_never_comes_is_given_up(monkeypatch):
    monkeypatch.setattr(replica_calls, "RESULT_WAIT_S", 0.05)

    async def go():
        calls, freed, dropped = ReplicaCalls(), Freed(), Dropped()
        prefill = FakeCall(FIRST, Result("handoff"))
        calls.read_prefill(prefill)
        prefill.release()
        await calls.first()
        await calls.end(freed, dropped)  # the result is never released
        assert prefill.cancelled and freed == [] and dropped.calls == 1

    run(go())


def test_a_refused_request_has_nothing_to_free():
    async def go():
        calls, freed, dropped = ReplicaCalls(), Freed(), Dropped()
        refusal = ValueError("max_tokens is too large")
        prefill = FakeCall(refusal)
        calls.read_prefill(prefill)
        prefill.release()
        assert await calls.first() is refusal
        await calls.end(freed, dropped)
        assert freed == [] and dropped.calls == 0

    run(go())


def test_uncancelled_calls_start_outside_the_request_context_with_its_serve_request_id():
    """What ties a call to the request's Ray task is a context variable (Ray cancels such
    calls with the request): outside it, with the request's Serve context kept for its id,
    less its internal id and marked not to cancel the call."""
    from ray.serve import context as serve_context

    tied = contextvars.ContextVar("tied", default=None)

    def inside_a_request():
        tied.set("the request's task")
        serve_context._serve_request_context.set(
            serve_context._RequestContext(
                request_id="req-1",
                _internal_request_id="internal-1",
                app_name="app",
                cancel_on_parent_request_cancel=True,
            )
        )
        return uncancelled(lambda: (tied.get(), serve_context._get_serve_request_context()))

    seen, request = contextvars.Context().run(inside_a_request)
    assert seen is None
    assert request.request_id == "req-1" and request.app_name == "app"
    assert request.cancel_on_parent_request_cancel is False
    assert request._internal_request_id == ""  # Serve keeps a request's calls under it
