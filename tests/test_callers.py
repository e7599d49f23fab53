"""deployments/callers.py: the calls of a caller that died are cancelled, and only those (a
stand-in for Ray's list of live named actors; with Ray's, an ingress replica is killed in
tests/test_replica_failure.py and tests/test_serve.py)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.callers import Caller, CallerWatch

A, B = Caller("SERVE_REPLICA::app#Ingress#a"), Caller("SERVE_REPLICA::app#Ingress#b")
INTERVAL_S = 0.01


class _Live:
    """Who is alive, and how often the watch asked."""

    def __init__(self, *callers: Caller) -> None:
        self.callers, self.asked, self.fail = set(callers), 0, False

    def __call__(self) -> set[Caller]:
        self.asked += 1
        if self.fail:
            raise ConnectionError("GCS unavailable")
        return set(self.callers)


async def _call(watch: CallerWatch, caller: Caller | None, ended: list) -> None:
    """A replica call that runs until cancelled; `ended` gets how it ended."""
    try:
        with watch.watching(caller):
            await asyncio.sleep(3600)
    except asyncio.CancelledError:
        ended.append(("cancelled", caller))
        raise


async def _settle(rounds: int = 5) -> None:
    """Time for a few checks (to see that something did not happen)."""
    await asyncio.sleep(INTERVAL_S * rounds)


async def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(INTERVAL_S)


def test_the_calls_of_a_caller_that_died_are_cancelled_and_only_those():
    async def run() -> None:
        live, ended, counted = _Live(A, B), [], []
        watch = CallerWatch(live, INTERVAL_S, on_orphaned=counted.append)
        calls = [asyncio.ensure_future(_call(watch, c, ended)) for c in (A, A, B, None)]
        await _settle()
        assert ended == [] and watch.num_watched == 3  # the caller-less call is not watched
        live.callers.discard(A)
        await _until(lambda: len(ended) == 2)
        await _settle()
        assert ended == [("cancelled", A)] * 2 and watch.num_watched == 1
        assert [c.done() for c in calls] == [True, True, False, False]
        assert watch.num_orphaned == 2 and counted == [2]  # the replica's count and metric
        for call in calls[2:]:
            call.cancel()
        await asyncio.gather(*calls, return_exceptions=True)

    asyncio.run(run())


def test_a_failed_check_cancels_nothing_and_the_next_one_still_checks():
    """Ray cannot say who is alive (GCS unavailable): a caller not known dead is alive."""

    async def run() -> None:
        live, ended = _Live(A), []
        watch = CallerWatch(live, INTERVAL_S)
        call = asyncio.ensure_future(_call(watch, A, ended))
        live.fail, live.callers = True, set()
        await _until(lambda: live.asked >= 2)
        assert ended == []
        live.fail = False
        await _until(call.done)
        assert ended == [("cancelled", A)]

    asyncio.run(run())


def test_nothing_is_asked_while_no_call_is_watched():
    """The check runs only while there are calls to watch: an idle replica makes no GCS calls;
    a caller-less call (a driver's, a test's) starts none."""

    async def run() -> None:
        live, ended = _Live(A), []
        watch = CallerWatch(live, INTERVAL_S)
        unwatched = asyncio.ensure_future(_call(watch, None, ended))
        await _settle()
        assert live.asked == 0
        call = asyncio.ensure_future(_call(watch, A, ended))
        await _until(lambda: live.asked > 0)
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        await _settle(10)  # a check under way ends
        asked = live.asked
        await _settle(10)
        assert live.asked == asked and watch.num_watched == 0
        unwatched.cancel()
        await asyncio.gather(unwatched, return_exceptions=True)

    asyncio.run(run())


def test_a_task_that_ended_with_its_generator_still_open_is_forgotten():
    """A call's task can end before its generator is closed (that happens when the generator
    is collected): the watch drops the task instead of checking for it forever."""

    async def run() -> None:
        live = _Live(A)
        watch = CallerWatch(live, INTERVAL_S)

        async def served():
            with watch.watching(A):
                yield 1
                yield 2

        items = served()
        assert await asyncio.ensure_future(anext(items)) == 1  # on a task that then ends
        assert watch.num_watched == 1
        await _until(lambda: watch.num_watched == 0)
        await _settle(10)  # a check under way ends
        asked = live.asked
        await _settle(10)
        assert live.asked == asked
        await items.aclose()

    asyncio.run(run())


def test_what_an_ended_call_left_is_freed_if_its_caller_dies_soon_after():
    """A prefill call's published KV waits for its caller's decode call: freed if that caller
    is found dead by one of the next two checks; after that (the KV taken, or its TTL's),
    forgotten, and the checks stop. A free that raises does not keep the others."""

    async def run() -> None:
        live, freed = _Live(A, B), []
        watch = CallerWatch(live, INTERVAL_S)

        def failing() -> None:
            freed.append("failing")
            raise RuntimeError("segment gone")

        watch.if_dies(A, failing)
        watch.if_dies(A, lambda: freed.append("a"))
        watch.if_dies(B, lambda: freed.append("b"))
        watch.if_dies(None, lambda: freed.append("caller-less"))
        assert watch.num_watched == 3
        live.callers.discard(A)
        await _until(lambda: len(freed) == 2)
        await _until(lambda: watch.num_watched == 0)  # B's expired
        assert freed == ["failing", "a"]
        await _settle(10)  # a check under way ends
        live.callers.discard(B)
        asked = live.asked
        await _settle(10)
        assert freed == ["failing", "a"] and live.asked == asked

    asyncio.run(run())


@pytest.mark.parametrize("initialized", [False, True])
def test_a_process_that_is_not_a_named_actor_is_no_caller(monkeypatch, initialized):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: initialized)
    assert Caller.current() is None  # a driver's runtime context has no actor name
