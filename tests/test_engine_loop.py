"""EngineLoop: the engine on its own thread, driven from asyncio (no Ray)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from deployments.engine_loop import EngineLoop, _Stream
from engine import InvalidRequestError, RequestOutput, SamplingParams, StructuredOutput, grammar

pytestmark = pytest.mark.model
GREEDY = SamplingParams(max_tokens=6, temperature=0.0)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=120))


async def collect(stream) -> list:
    return [out async for out in stream]


def test_streams_the_same_tokens_as_the_engine(make_engine):
    expected = make_engine().generate(["The capital of France is"], GREEDY)[0].token_ids
    loop = EngineLoop(make_engine())
    try:
        prompt = loop.engine.encode("The capital of France is")
        outs = run(collect(loop.generate("a", prompt, GREEDY)))
        assert [t for o in outs for t in o.new_token_ids] == expected
        assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    finally:
        loop.shutdown()


def _leave_mid_stream(make_engine, leave, **loop_args) -> None:
    """Start a long stream, let `leave(stream)` walk away from it, then: the request was
    aborted (the abort is queued on the engine thread before the stats call) and every block
    came back."""
    loop = EngineLoop(make_engine(), **loop_args)
    params = SamplingParams(max_tokens=500, ignore_eos=True)

    async def go() -> None:
        await leave(loop.generate("long", loop.engine.encode("Count:"), params))
        stats = await loop.call(lambda e: e.stats)
        assert stats.num_running == 0 and stats.num_waiting == 0
        assert stats.num_free_blocks == stats.num_kv_blocks

    try:
        run(go())
    finally:
        loop.shutdown()


def test_closing_the_stream_early_aborts_and_frees_blocks(make_engine):
    async def leave_after_two(stream) -> None:
        await anext(stream)
        await anext(stream)
        await stream.aclose()  # the consumer leaves mid-stream

    _leave_mid_stream(make_engine, leave_after_two)


def test_a_failed_step_fails_its_requests_and_the_waiting_go_on(make_engine):
    """The forward raises once: the request it ran gets the error, the one queued behind it
    (max_num_seqs=1) runs after it and streams what it streams alone."""
    expected = make_engine().generate(["The capital of France is"], GREEDY)[0].token_ids
    loop = EngineLoop(make_engine(max_num_seqs=1))
    execute = loop.engine.runner.execute
    calls = []

    def fails_once(model_input):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the forward failed")
        return execute(model_input)

    loop.engine.runner.execute = fails_once
    prompt = loop.engine.encode("The capital of France is")

    async def both() -> list:
        streams = [collect(loop.generate(rid, prompt, GREEDY)) for rid in ("first", "second")]
        return await asyncio.gather(*streams, return_exceptions=True)

    try:
        first, second = run(both())
        assert isinstance(first, RuntimeError) and "engine step failed" in str(first)
        assert [t for o in second for t in o.new_token_ids] == expected
        stats = run(loop.call(lambda e: e.stats))
        assert stats.num_free_blocks == stats.num_kv_blocks
    finally:
        loop.shutdown()


def _prefilled(prefill, priorities: dict[str, int]) -> list:
    """Prefill a request per id (with its priority) -> their (handoff, KV buffer)s, in order."""
    handoffs = []
    for rid, priority in priorities.items():
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, priority=priority)
        prefill.add_request(rid, "one two three four five six seven", params, prefill_only=True)
        while rid not in prefill.scheduler.prefilled:
            prefill.step()
        handoffs.append(prefill.export_kv(rid))
    return handoffs


def _import_all(decode: EngineLoop, handoffs: list) -> tuple[list, list[str]]:
    """Continue every hand-off on `decode` at once -> (each one's outputs, import order)."""
    imported = []

    async def together() -> list:
        streams = [
            decode.continue_request(h, b, on_imported=lambda r=h.request_id: imported.append(r))
            for h, b in handoffs
        ]
        return await asyncio.gather(*(collect(s) for s in streams))

    return run(together()), imported


def test_imports_wait_for_blocks_in_order_then_run(make_engine):
    prefill = make_engine(block_size=4)
    decode = EngineLoop(make_engine(num_kv_blocks=4, block_size=4))  # room for one request
    try:
        (first, second), imported = _import_all(
            decode, _prefilled(prefill, dict.fromkeys(["first", "second"], 0))
        )
        assert imported == ["first", "second"]  # FIFO: the second waited for the first's blocks
        assert first[-1].finished and second[-1].finished
        assert decode.engine.blocks.num_free_blocks == 4
    finally:
        decode.shutdown()


def test_handoff_that_can_never_fit_is_refused_at_once(make_engine):
    prefill = make_engine(block_size=4)
    decode = EngineLoop(make_engine(num_kv_blocks=2, block_size=4))  # 8 tokens in all
    prefill.add_request(
        "big", "one two three four five six seven", SamplingParams(max_tokens=8), prefill_only=True
    )
    while "big" not in prefill.scheduler.prefilled:
        prefill.step()
    dropped = []

    async def attempt() -> None:
        handoff, buffer = prefill.export_kv("big")
        stream = decode.continue_request(handoff, buffer, on_dropped=lambda: dropped.append(1))
        await collect(stream)

    try:
        with pytest.raises(InvalidRequestError, match="KV cache"):
            run(attempt())
        assert dropped == [1] and decode.num_pending_imports == 0
    finally:
        decode.shutdown()


def test_prefilled_requests_publish_on_the_engine_thread(make_engine):
    """The publish hook runs on the engine thread right after the step that prefilled the
    request (it is still prefilled there, no command queue in between); its result, or its
    error, ends the request's stream, and the blocks go back either way."""
    import threading

    seen: list[tuple[str, bool]] = []

    def publish(engine, request_id: str):
        seen.append((threading.current_thread().name, request_id in engine.scheduler.prefilled))
        if request_id == "bad":
            raise RuntimeError("channel full")
        handoff = engine.kv_handoff(request_id)
        engine.release(request_id)
        return handoff

    loop = EngineLoop(make_engine(), on_prefilled=publish)
    prompt = loop.engine.encode("The capital of France is a city that")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def both() -> None:
        items = await collect(loop.generate("good", prompt, params, True))
        assert items[0].prefilled and items[1].request_id == "good"  # output, then handoff
        assert items[1].num_computed_tokens == len(prompt)
        with pytest.raises(RuntimeError, match="channel full"):
            await collect(loop.generate("bad", prompt, params, True))
        stats = await loop.call(lambda e: e.stats)
        assert stats.num_free_blocks == stats.num_kv_blocks and stats.num_prefilled == 0

    try:
        run(both())
        assert seen == [("engine-loop", True), ("engine-loop", True)]
    finally:
        loop.shutdown()


def test_a_publish_that_nobody_took_goes_to_on_unclaimed(make_engine):
    """The consumer leaves after the first token, before the published KV: what was published
    goes to on_unclaimed (once, after the request's abort); a stream read to its end gives
    on_unclaimed nothing."""

    def publish(engine, request_id: str):
        engine.release(request_id)
        return ("published", request_id)

    unclaimed: list = []
    loop = EngineLoop(make_engine(), on_prefilled=publish, on_unclaimed=unclaimed.append)
    prompt = loop.engine.encode("The capital of France is a city that")
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def go() -> None:
        assert (await collect(loop.generate("read", prompt, params, True)))[1] == (
            "published",
            "read",
        )
        stream = loop.generate("left", prompt, params, True)
        assert (await anext(stream)).prefilled
        # the publish ran right after the step that made the first token: it waits queued
        await stream.aclose()
        stats = await loop.call(lambda e: e.stats)  # after the abort, on the engine thread
        await asyncio.sleep(0)  # the leftovers are claimed on the event loop after it
        assert stats.num_free_blocks == stats.num_kv_blocks and stats.num_running == 0

    try:
        run(go())
        assert unclaimed == [("published", "left")]
    finally:
        loop.shutdown()


@pytest.mark.parametrize("policy", ["fcfs", "priority"])
def test_waiting_imports_follow_the_scheduling_policy(make_engine, policy):
    """Room for one request at a time: under the priority policy the waiting imports go by
    priority (lower first), under fcfs by arrival."""
    prefill = make_engine(block_size=4, policy=policy)
    decode = EngineLoop(make_engine(num_kv_blocks=4, block_size=4, policy=policy))
    urgent = policy == "priority"
    priorities = {"first": -5, "second": 5, "third": 0} if urgent else dict.fromkeys("abc", 0)
    try:
        _, imported = _import_all(decode, _prefilled(prefill, priorities))
        assert imported == (["first", "third", "second"] if urgent else ["a", "b", "c"])
        assert decode.engine.blocks.num_free_blocks == 4
    finally:
        decode.shutdown()


def test_priority_needs_the_priority_policy(make_engine):
    with pytest.raises(InvalidRequestError, match="priority scheduling policy") as e:
        make_engine().add_request("p", "hi", SamplingParams(priority=1))
    assert e.value.param == "priority"
    engine = make_engine(policy="priority")
    engine.add_request("low", "hi", SamplingParams(max_tokens=2, priority=3))
    engine.add_request("high", "hi", SamplingParams(max_tokens=2, priority=-3))
    assert [r.request_id for r in engine.scheduler.waiting] == ["high", "low"]


LOGPROBS = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=2)


def _joined_equals(outs, alone) -> None:
    """outs, joined into fewer items, carry alone's tokens, text and logprobs in order."""
    for field in ("new_token_ids", "logprobs"):
        assert [x for o in outs for x in getattr(o, field)] == [
            x for o in alone for x in getattr(o, field)
        ]
    assert "".join(o.new_text for o in outs) == "".join(o.new_text for o in alone)
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert outs[-1].num_output_tokens == alone[-1].num_output_tokens == 12
    assert outs[0].queue_time_s is not None and outs[0].num_cached_tokens is not None


@pytest.mark.wall_clock  # steps within each 0.15 s interval
def test_stream_batching_sends_a_requests_tokens_once_per_interval(make_engine):
    """stream_interval_s (Ray Serve LLM's stream_batching_interval_ms): the first output goes
    out at once, the later ones joined per interval, the finished one as soon as it exists;
    tokens, text and logprobs are those of the unbatched stream."""
    prompt = make_engine().encode("The capital of France is")
    alone_loop = EngineLoop(make_engine())
    loop = EngineLoop(make_engine(), stream_interval_s=0.15)

    async def timed(stream) -> list:
        return [(asyncio.get_running_loop().time(), out) async for out in stream]

    try:
        alone = run(collect(alone_loop.generate("a", prompt, LOGPROBS)))
        timed_outs = run(timed(loop.generate("b", prompt, LOGPROBS)))
    finally:
        alone_loop.shutdown()
        loop.shutdown()
    outs = [out for _, out in timed_outs]
    assert len(alone) == 12 and 2 <= len(outs) < 12
    _joined_equals(outs, alone)
    assert len(outs[0].new_token_ids) == 1  # the first token is not held back
    gaps = [b - a for (a, _), (b, _) in zip(timed_outs, timed_outs[1:], strict=False)]
    assert all(gap >= 0.14 for gap in gaps[:-1])  # the last goes out when it finishes


@pytest.mark.wall_clock  # steps during a 1 s wait
def test_outputs_waiting_for_a_slow_consumer_are_sent_joined(make_engine):
    """Without an interval, outputs that queued while the consumer was away go out as one."""
    loop = EngineLoop(make_engine())
    prompt = loop.engine.encode("The capital of France is")

    async def slow() -> list:
        outs = []
        async for out in loop.generate("slow", prompt, LOGPROBS):
            outs.append(out)
            if len(outs) == 1:
                await asyncio.sleep(1.0)  # the engine steps on meanwhile
        return outs

    try:
        alone = run(collect(loop.generate("alone", prompt, LOGPROBS)))
        outs = run(slow())
    finally:
        loop.shutdown()
    assert len(alone) == 12 and len(outs) < 12
    _joined_equals(outs, alone)


def test_a_stream_cancelled_while_joining_outputs_aborts_and_frees_blocks(make_engine):
    """Serve cancels a disconnected client's call wherever it waits: here inside the interval
    in which the stream joins outputs. The request is aborted and its blocks come back."""

    async def cancel_mid_join(stream) -> None:
        first = await anext(stream)  # out at once; the next waits out the interval
        assert len(first.new_token_ids) >= 1
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.5)  # the engine steps on; the stream is joining its outputs
        assert not pending.done()
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await stream.aclose()

    _leave_mid_stream(make_engine, cancel_mid_join, stream_interval_s=10.0)


def test_a_cancel_that_comes_with_an_output_is_not_lost():
    """The cancel of a disconnected client's call can reach the stream in the same turn of
    the event loop as the output it waits for (seen in CI): it must still end the stream
    (which then aborts the request), and the output stays queued for the leftovers' claim.
    Python 3.11's asyncio.wait_for returned the output and dropped the cancel."""

    async def go() -> None:
        loop = asyncio.get_running_loop()
        stream = _Stream(asyncio.Queue(), loop)
        first = RequestOutput("r", [1], "a", 1, 1)
        joining = asyncio.ensure_future(EngineLoop._joined(stream, first, loop.time() + 5))
        await asyncio.sleep(0)  # it waits on the queue now
        stream.queue.put_nowait(RequestOutput("r", [2], "b", 1, 2))
        joining.cancel()  # before the loop turns: both reach the waiting task together
        with pytest.raises(asyncio.CancelledError):
            await joining
        assert stream.queue.get_nowait().new_token_ids == [2]

    run(go())


def test_going_idle_reports_the_engines_load_once(make_engine):
    """The last step's stats still count the requests that an abort (a disconnect, a dead
    ingress) then removed, and an idle engine steps no more: going idle is reported once,
    with the stats of now (the replica's gauges and autoscaling signals); at start too."""
    steps, idle = [], []
    loop = EngineLoop(
        make_engine(),
        on_step=lambda outputs, stats, pending: steps.append(stats.num_running),
        on_idle=lambda stats, pending: idle.append(
            (stats.num_running, stats.num_free_blocks == stats.num_kv_blocks, pending)
        ),
    )
    params = SamplingParams(max_tokens=500, ignore_eos=True)

    async def until(condition) -> None:
        while not condition():
            await asyncio.sleep(0.01)

    async def go() -> None:
        await until(lambda: len(idle) == 1)  # the empty engine, at start
        stream = loop.generate("long", loop.engine.encode("Count:"), params)
        await anext(stream)
        await anext(stream)
        await stream.aclose()  # aborted
        await until(lambda: len(idle) == 2)
        assert steps[-1] == 1  # what the last step reported: one running
        for _ in range(3):  # commands while idle report nothing more
            await loop.call(lambda e: e.stats)
        await asyncio.sleep(0.05)

    try:
        run(go())
        assert idle == [(0, True, 0), (0, True, 0)]
    finally:
        loop.shutdown()


def test_a_constraint_compiles_off_the_event_loop_and_the_engine_thread(make_engine, monkeypatch):
    """The largest constraints compile for seconds (engine/grammar.py): on the replica's event
    loop every stream stalls that long, on the engine thread every step. A constrained
    request's stream, prefilled here and continued on a decode loop, compiles its constraint
    once per engine on neither thread, and streams what the engine alone does."""
    digits = SamplingParams(
        max_tokens=6, temperature=0.0, structured_output=StructuredOutput("regex", "[0-9]{4}")
    )
    prompt = "The year is"
    expected = make_engine().generate([prompt], digits)[0].token_ids
    prefill = EngineLoop(make_engine())
    decode = EngineLoop(make_engine())
    threads = []

    def recording(structure, grammar_text=grammar.grammar_text):  # what each compile calls
        threads.append(threading.current_thread())
        return grammar_text(structure)

    monkeypatch.setattr(grammar, "grammar_text", recording)

    async def both() -> tuple[list, list]:
        loop_thread = threading.current_thread()
        prefilled = await collect(
            prefill.generate("a", prefill.engine.encode(prompt), digits, prefill_only=True)
        )
        handoff, buffer = await prefill.call(lambda e: e.export_kv("a"))
        decoded = await collect(decode.continue_request(handoff, buffer))
        return prefilled + decoded, [loop_thread, prefill._thread, decode._thread]

    try:
        outs, busy = run(both())
        assert [t for o in outs for t in o.new_token_ids] == expected
        assert len(threads) == 2  # once on each engine, the engine's own check a cache hit
        assert not set(threads) & set(busy)
    finally:
        prefill.shutdown()
        decode.shutdown()
