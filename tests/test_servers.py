"""The deployment classes' stream methods on a real engine and engine loop, without Serve or
Ray (the objects are made without their __init__, which joins Ray for metrics and node ids)."""

from __future__ import annotations

import asyncio

import pytest

from deployments.callers import Caller, CallerWatch
from deployments.engine_loop import EngineLoop
from deployments.servers import ColocatedServer, PrefillServer
from engine import InvalidRequestError, SamplingParams, StructuredOutput

pytestmark = pytest.mark.model
BAD = SamplingParams(max_tokens=4, structured_output=StructuredOutput("regex", "("))
OK = SamplingParams(max_tokens=1, temperature=0.0)  # ends at its first token: no hand-off


@pytest.mark.parametrize(
    "server_class, method", [(ColocatedServer, "generate"), (PrefillServer, "prefill")]
)
def test_a_refused_request_ends_its_stream_as_an_item_not_a_raise(
    make_engine, server_class, method
):
    """A regex the replica cannot compile: the stream's one item is the InvalidRequestError
    (raised, Serve logs it with a traceback as a failed request and counts it among the
    replica's errors); the next request is served and every block is free."""
    server = server_class.__new__(server_class)
    server.loop, server.node_id = EngineLoop(make_engine()), "local"
    server.callers = CallerWatch()

    async def items(request_id: str, params: SamplingParams) -> list:
        ids = server.loop.engine.encode("The capital of France is")
        return [item async for item in getattr(server, method)(request_id, ids, params)]

    try:
        [refusal] = asyncio.run(items("bad", BAD))
        assert isinstance(refusal, InvalidRequestError) and "unclosed group" in str(refusal)
        assert refusal.param == "structured_outputs"
        served = asyncio.run(items("ok", OK))
        assert served[0].new_token_ids and not isinstance(served[-1], Exception)
        stats = server.loop.engine.stats
        assert stats.num_free_blocks == stats.num_kv_blocks
    finally:
        server.loop.shutdown()


def test_preemptions_and_cache_hits_reach_their_counters_as_they_happen(make_engine):
    """A replica's counters take the engine's totals step by step: an engine with too few
    blocks for its three requests preempts, and the increments the preemption counter got
    add up to the engine's count (as the prefix-cache hits to its cached tokens)."""
    from deployments.metrics import EngineMetrics

    engine = make_engine(num_kv_blocks=10, block_size=4, enable_prefix_caching=True)
    metrics, got = EngineMetrics("colocated"), {"preemptions": [], "cached_tokens": []}
    for name, increments in got.items():
        getattr(metrics, name).counter = _Recorder(increments)
    prompts = ["The capital of France is", "def fibonacci(n):", "Paris is"]
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=12, temperature=0.0))
    while engine.has_unfinished:
        metrics.on_step(engine.step(), engine.stats)
    assert engine.num_preemptions > 0 and engine.stats.num_cached_tokens > 0
    assert sum(got["preemptions"]) == engine.num_preemptions
    assert sum(got["cached_tokens"]) == engine.stats.num_cached_tokens
    assert all(n > 0 for n in got["preemptions"] + got["cached_tokens"])


def test_speculative_drafts_reach_their_counters_by_position(make_engine):
    """vLLM's spec_decode_num_drafts and _num_accepted_tokens_per_pos: the increments each
    position's counter got (tagged with the position) add up to the engine's counts."""
    from types import SimpleNamespace

    from deployments.metrics import EngineMetrics
    from engine.spec_decode import SpeculativeConfig

    engine = make_engine(speculative=SpeculativeConfig(3, prompt_lookup_min=1))
    metrics, calls = EngineMetrics("decode"), []
    metrics._per_pos = metrics.drafts.counter = SimpleNamespace(
        inc=lambda value, tags: calls.append((tags.get("position"), value))
    )
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(["1, 2, 3, 1, 2, 3, 1, 2,", "a b c a b c a b"]):
        engine.add_request(str(i), prompt, params)
    while engine.has_unfinished:
        metrics.on_step(engine.step(), engine.stats)
    per_pos = engine.stats.num_accepted_per_pos
    assert len(per_pos) == 3 and per_pos[0] > 0 and sum(per_pos) == engine.num_accepted_tokens
    assert list(per_pos) == sorted(per_pos, reverse=True)  # a kept draft follows kept ones
    for position in ("1", "2", "3"):
        got = sum(value for at, value in calls if at == position)
        assert got == per_pos[int(position) - 1]
    assert sum(value for at, value in calls if at is None) == engine.num_drafts >= per_pos[0]


class _Recorder:
    """A Ray counter's stand-in: the increments it was given."""

    def __init__(self, increments: list[int]) -> None:
        self.increments = increments

    def inc(self, value: int, tags: dict) -> None:
        assert tags == {"phase": "colocated"}
        self.increments.append(value)


def test_a_prefill_result_that_never_reached_its_caller_is_freed_by_the_prefill_replica(
    make_engine,
):
    """The ingress cancels a prefill call only before the call's first token has reached it,
    and Serve drops a cancelled call's unread items: a cancel at the result's yield means the
    result went nowhere, so the replica frees the KV it published. A call that had ended
    when the cancel came is freed by the ingress's drop_unread, whether that comes after the
    call's end or before it (then the end frees it). A result read to its end and never
    dropped stays published for its decode replica."""
    from types import SimpleNamespace

    from engine.kv_handoff import discard_all
    from engine.parallel import ParallelLayout
    from kvkernels.kv_channel import KVChannel
    from kvkernels.ref_keeper import HeldRefs

    server = PrefillServer.__new__(PrefillServer)
    server.node_id, server.decode_layout = "local", ParallelLayout()
    server.callers = CallerWatch()
    server.channel = KVChannel("shm")
    dropped_metric: list = []
    server.metrics = SimpleNamespace(
        on_transfer=lambda ms, nbytes: None,
        on_unread_dropped=lambda: dropped_metric.append(1),  # splitserve_kv_unread_dropped
    )
    server._handed = HeldRefs(60.0)
    freed: list = []
    server._unclaimed = freed.append
    server.loop = EngineLoop(make_engine(), on_prefilled=server._on_prefilled)
    ids = server.loop.engine.encode("The capital of France is a city that")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def cancelled_at_the_yield() -> None:
        call = server.prefill("the yield", ids, params)
        assert (await anext(call)).prefilled
        assert (await anext(call)).handoff.request_id == "the yield"
        await call.aclose()
        assert [handoff.request_id for handoff, _ in freed] == ["the yield"]
        discard_all(server.channel, freed[0][1])  # as the real _unclaimed does

    async def dropped_after_the_end() -> None:
        items = [item async for item in server.prefill("ended", ids, params)]
        assert items[-1].handoff.request_id == "ended"
        assert await server.channel.num_kept() == 1  # published, for a decode replica
        assert await server.drop_unread("ended")
        assert await server.channel.num_kept() == 0
        assert not await server.drop_unread("ended")  # freed once
        assert server.num_unread_dropped == 1

    async def dropped_before_the_end() -> None:
        call = server.prefill("ending", ids, params)
        await anext(call), await anext(call)  # the call has its result out, not yet ended
        assert not await server.drop_unread("ending")  # not this replica's to free yet
        assert await server.channel.num_kept() == 1
        assert [item async for item in call] == []  # the end finds the drop remembered
        assert await server.channel.num_kept() == 0
        assert server.num_unread_dropped == 2 and len(dropped_metric) == 2

    async def read_and_kept() -> None:
        items = [item async for item in server.prefill("read", ids, params)]
        assert not await server.drop_unread("another request")
        assert await server.channel.num_kept() == 1 and len(freed) == 1
        discard_all(server.channel, items[-1].pieces)  # as its decode replica would

    try:
        for case in (cancelled_at_the_yield, dropped_after_the_end, dropped_before_the_end):
            asyncio.run(case())
        asyncio.run(read_and_kept())
    finally:
        server.loop.shutdown()
        server.channel.close()


def test_the_calls_of_an_ingress_that_died_are_aborted_and_free_their_blocks(make_engine):
    """Ray neither cancels nor fails a call whose caller died: the replica's watch does, and
    the request is aborted as at a client's disconnect. The live caller's request goes on to
    its last token (a stand-in for Ray's list of live named actors)."""
    dead, alive = Caller("ingress-a"), Caller("ingress-b")
    live = {dead, alive}
    server = ColocatedServer.__new__(ColocatedServer)
    server.loop, server.node_id = EngineLoop(make_engine()), "local"
    server.callers = CallerWatch(lambda: set(live), interval_s=0.02)
    ids = server.loop.engine.encode("The capital of France is")
    params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)

    async def read(request_id: str, caller: Caller, outputs: list) -> None:
        async for out in server.generate(request_id, ids, params, caller):
            outputs.append(out)

    async def run() -> tuple[list, list]:
        got = {"a": [], "b": []}
        calls = [asyncio.ensure_future(read(r, c, got[r])) for r, c in (("a", dead), ("b", alive))]
        while not got["a"]:
            await asyncio.sleep(0.01)
        live.discard(dead)
        with pytest.raises(asyncio.CancelledError):
            await calls[0]
        await calls[1]
        return got["a"], got["b"]

    try:
        a, b = asyncio.run(run())
        assert not a[-1].finished and sum(len(o.new_token_ids) for o in a) < 64
        assert b[-1].finished and sum(len(o.new_token_ids) for o in b) == 64
        stats = asyncio.run(_stats(server))
        assert stats.num_free_blocks == stats.num_kv_blocks and stats.num_running == 0
    finally:
        server.loop.shutdown()


async def _stats(server):
    return await server.loop.call(lambda engine: engine.stats)


@pytest.mark.wall_clock  # 0.1 s of a 0.3 s timeout
def test_a_stuck_step_fails_the_health_check_and_every_request_of_the_replica(make_engine):
    """A step that does not end (a hung model worker, a hung GPU): past step_timeout_s the
    health check fails, and so does each request of the replica (Serve drains a failed
    replica's requests before it stops it, and these would never end). Once the step ends,
    the replica is healthy again and its blocks are free."""
    import dataclasses
    import threading

    engine = make_engine()
    engine.config = dataclasses.replace(engine.config, step_timeout_s=0.3)
    release, step = threading.Event(), engine.step

    def stuck_step():
        release.wait()
        return step()

    engine.step = stuck_step
    server = ColocatedServer.__new__(ColocatedServer)
    server.engine, server.loop, server.node_id = engine, EngineLoop(engine), "local"
    server.callers = CallerWatch()
    ids = engine.encode("The capital of France is")

    async def read(request_id: str) -> list:
        return [out async for out in server.generate(request_id, ids, OK)]

    async def run() -> None:
        calls = [asyncio.ensure_future(read(r)) for r in ("a", "b")]
        await asyncio.sleep(0.1)
        assert 0 < server.loop.busy_s() < 0.3
        await server.check_health()  # busy, not stuck
        await asyncio.sleep(0.3)
        with pytest.raises(
            RuntimeError, match=r"in one step for \d+ s, past step_timeout_s \(0.3 s"
        ):
            await server.check_health()
        for call in calls:
            with pytest.raises(RuntimeError, match="is stuck and is being replaced"):
                await call
        release.set()
        while server.loop.busy_s() > 0:
            await asyncio.sleep(0.01)
        await server.check_health()

    try:
        asyncio.run(asyncio.wait_for(run(), timeout=60))
        stats = asyncio.run(_stats(server))
        assert stats.num_free_blocks == stats.num_kv_blocks and stats.num_running == 0
    finally:
        release.set()
        server.loop.shutdown()
