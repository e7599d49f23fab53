"""The ingress's handling of n choices and batched prompts, without Ray: the prompt forms, the
bounded queue's check, the choices' seeds, and the merge of their output streams (stand-in
streams; no model)."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from ray.exceptions import RayTaskError

from app.config import AppArgs
from app.ingress import Ingress, _choice_params, _merged, _primed
from app.protocol import APIError, CompletionRequest
from engine import InvalidRequestError, RequestFailedError, SamplingParams

pytestmark = pytest.mark.unit


def _ingress(in_flight: int, limit: int = 4) -> SimpleNamespace:
    args = AppArgs.model_validate({"ingress": {"max_queued_requests": limit}})
    return SimpleNamespace(args=args, num_in_flight=in_flight)


def test_admit_refuses_n_beyond_the_queue_and_overload():
    Ingress._admit(_ingress(0), 4)  # exactly the limit fits
    with pytest.raises(APIError) as e:
        Ingress._admit(_ingress(0), 5)
    assert (e.value.status, e.value.param) == (400, "n")
    with pytest.raises(APIError) as e:
        Ingress._admit(_ingress(2), 3)
    assert e.value.status == 503 and e.value.kind == "overloaded_error"


def test_admit_counts_every_prompt_of_a_batch():
    Ingress._admit(_ingress(0), 2, 2)
    with pytest.raises(APIError) as e:
        Ingress._admit(_ingress(0), 2, 3)  # 6 requests
    assert (e.value.status, e.value.param) == (400, "prompt")
    assert "3 prompts x n=2" in e.value.message


@pytest.mark.parametrize(
    "prompt, prompts",
    [
        ("hi", ["hi"]),
        ([1, 2], [[1, 2]]),  # token ids: one prompt
        (["a", "b"], ["a", "b"]),
        ([[1], [2, 3]], [[1], [2, 3]]),
        ([], [[]]),  # an empty prompt, refused by the length check
    ],
)
def test_completion_prompt_forms(prompt, prompts):
    assert CompletionRequest(model="m", prompt=prompt).prompts == prompts


@pytest.mark.parametrize("prompt", [[1, "a"], ["a", [1]], [[1], "a"], 5, [[["a"]]]])
def test_mixed_prompt_forms_are_refused(prompt):
    with pytest.raises(ValueError, match="prompt"):
        CompletionRequest(model="m", prompt=prompt)


def test_seeded_choices_draw_from_consecutive_seeds():
    seeded = SamplingParams(temperature=1.0, seed=5)
    assert [p.seed for p in _choice_params(seeded, 3)] == [5, 6, 7]
    top = SamplingParams(temperature=1.0, seed=2**64 - 2)  # past the range's top: wraps
    assert [p.seed for p in _choice_params(top, 3)] == [2**64 - 2, 2**64 - 1, 0]
    unseeded = SamplingParams(temperature=1.0)
    assert _choice_params(unseeded, 2) == [unseeded, unseeded]


class _Stream:
    """An async generator stand-in that records whether it was closed before its end."""

    def __init__(self, items: list, delay: float = 0.0, fail: Exception | None = None):
        self.items, self.delay, self.fail = items, delay, fail
        self.closed_early = False

    async def run(self):
        try:
            for item in self.items:
                await asyncio.sleep(self.delay)
                yield item
            if self.fail is not None:
                raise self.fail
        except (GeneratorExit, asyncio.CancelledError):
            self.closed_early = True
            raise


def _collect(streams: list[_Stream], take: int | None = None) -> list:
    async def go():
        merged = await _primed(_merged([s.run() for s in streams]))
        got = []
        async for item in merged:
            got.append(item)
            if take is not None and len(got) == take:
                await merged.aclose()  # the client went away
                break
        return got

    return asyncio.run(go())


def test_merged_tags_each_output_with_its_choice_and_keeps_each_choice_in_order():
    a, b = _Stream(["a1", "a2", "a3"], 0.01), _Stream(["b1", "b2"], 0.015)
    got = _collect([a, b])
    assert sorted(got) == [(0, "a1"), (0, "a2"), (0, "a3"), (1, "b1"), (1, "b2")]
    assert [o for i, o in got if i == 0] == ["a1", "a2", "a3"]
    assert [o for i, o in got if i == 1] == ["b1", "b2"]
    assert {i for i, _ in got[:2]} == {0, 1}  # interleaved as they come, not one after another
    assert not a.closed_early and not b.closed_early


def test_one_choice_failing_fails_the_request_and_closes_the_others():
    slow = _Stream(["s1", "s2", "s3", "s4"], 0.05)
    failing = _Stream(["f1"], 0.01, fail=APIError(503, "replica died"))
    with pytest.raises(APIError, match="replica died"):
        _collect([slow, failing])
    assert slow.closed_early  # its request is aborted, not left running


def test_closing_the_merged_stream_closes_every_choice():
    a, b = _Stream(["a"] * 50, 0.01), _Stream(["b"] * 50, 0.01)
    assert len(_collect([a, b], take=3)) == 3
    assert a.closed_early and b.closed_early


def test_a_single_choice_is_passed_through_and_closed_with_the_request():
    only = _Stream(["x"] * 10)
    assert _collect([only], take=2) == [(0, "x"), (0, "x")]
    assert only.closed_early


class _FailingHandle:
    """A deployment handle stand-in whose streamed call raises `error` at once (or, with
    `as_item`, yields it: a replica's refusal)."""

    def __init__(self, error: Exception, as_item: bool = False) -> None:
        self.error, self.as_item = error, as_item

    def options(self, stream: bool) -> _FailingHandle:
        return self

    @property
    def generate(self) -> _FailingHandle:
        return self

    prefill = generate

    def remote(self, *args, **kwargs) -> _FailingHandle:
        return self

    def __aiter__(self) -> _FailingHandle:
        return self

    async def __anext__(self):
        if self.as_item:
            return self.error
        raise self.error

    def cancel(self) -> None:
        pass


def _relaying(args: AppArgs, **handles) -> SimpleNamespace:
    """What Ingress._outputs reads of its ingress, with the replicas' handles given."""
    ingress = SimpleNamespace(
        args=args, num_in_flight=0, metrics=None, _background=set(), caller=None
    )
    ingress._discard = lambda result: Ingress._discard(ingress, result)
    ingress._detached = lambda work: Ingress._detached(ingress, work)
    vars(ingress).update(handles)
    return ingress


@pytest.mark.parametrize(
    "cause, status, text",
    [
        (InvalidRequestError("bad grammar", "response_format"), 400, "bad grammar"),
        (RequestFailedError("the engine failed request r at output token 3"), 500, "token 3"),
        (RuntimeError("engine step failed"), 503, "model replica: engine step failed; retry it"),
        # the first line of our replicas' own failures; Ray's or anything else by type alone
        (RuntimeError("stuck\nmore of it"), 503, "model replica: stuck; retry it"),
        (ValueError("a detail"), 503, "model replica (RayTaskError(ValueError)); retry it"),
    ],
)
def test_a_replicas_error_reaches_the_client_as_its_status(cause, status, text):
    """As Ray delivers it (RayTaskError, also an instance of the cause's class): the engine's
    refusal a 400, a request the engine failed a 500 with its message, anything else a 503."""
    error = RayTaskError("generate", "Traceback ...", cause).as_instanceof_cause()
    ingress = _relaying(AppArgs(mode="colocated"), colocated=_FailingHandle(error))

    async def first():
        return await anext(Ingress._outputs(ingress, "r", [1, 2], SamplingParams(), 0.0))

    with pytest.raises(APIError) as e:
        asyncio.run(first())
    assert e.value.status == status and text in e.value.message
    assert "Traceback" not in e.value.message and ingress.num_in_flight == 0


@pytest.mark.parametrize("mode", ["colocated", "disaggregated"])
def test_a_refusal_a_replica_yields_is_the_clients_400(mode):
    """Replicas end a refused request's stream with the InvalidRequestError as an item (Serve
    would log a raised one as a failure): the ingress raises it as the 400 it is."""
    refusal = _FailingHandle(InvalidRequestError("unclosed group", "guided_regex"), as_item=True)
    ingress = _relaying(AppArgs(mode=mode), colocated=refusal, prefill=refusal)

    async def first():
        return await anext(Ingress._outputs(ingress, "r", [1, 2], SamplingParams(), 0.0))

    with pytest.raises(APIError) as e:
        asyncio.run(first())
    assert (e.value.status, e.value.param, e.value.message) == (
        400,
        "guided_regex",
        "unclosed group",
    )


def test_scheduling_policy_reaches_every_engine_and_priority_the_params():
    args = AppArgs(scheduling_policy="priority")
    assert {args.engine_config(p).scheduler.policy for p in ("prefill", "decode")} == {"priority"}
    assert AppArgs().engine_config("colocated").scheduler.policy == "fcfs"
    req = CompletionRequest(model="m", prompt="hi", priority=-2, cache_salt="t")
    assert req.sampling_params(4).priority == -2 and req.sampling_params(4).cache_salt == "t"
    with pytest.raises(ValueError, match="scheduling_policy"):
        AppArgs(scheduling_policy="lottery")


def test_the_clock_reports_every_relayed_output_with_the_finished_request(monkeypatch):
    """The ingress's per-request clock counts the engine outputs it relayed (the front end's
    chunks, splitserve_relayed_outputs) and hands them to the metrics once, at the end; the
    interval before each output after the first (vLLM's inter-token latency) as it comes."""
    import app.ingress
    from app.ingress import _Clock
    from engine import RequestOutput

    finished, intervals = [], []

    class Metrics:
        def on_finish(self, *args) -> None:
            finished.append(args)

        def on_interval(self, mode: str, seconds: float) -> None:
            intervals.append((mode, seconds, len(finished)))

    now = iter([10.25, 10.5, 11.0])  # when each output comes (perf_counter)
    monkeypatch.setattr(app.ingress, "time", SimpleNamespace(perf_counter=lambda: next(now)))
    clock = _Clock(Metrics(), "disaggregated", num_prompt_tokens=5, arrival=10.0)
    # 3 outputs, 7 tokens in all; the first says how long the engine took to its token
    for tokens, total, reason in (([6, 7], 2, None), ([1, 2, 3], 5, None), ([4, 5], 7, "length")):
        prefill = 0.125 if total == 2 else None
        clock.seen(RequestOutput("r", tokens, "x", 5, total, reason, prefill_time_s=prefill))
    [(mode, ttft, last, num_tokens, reason, prompt, outputs, prefill)] = finished
    assert (mode, num_tokens, reason, prompt, outputs) == ("disaggregated", 7, "length", 5, 3)
    assert (ttft, last, prefill) == (0.25, 1.0, 0.125)
    # one an output after the first, however many tokens it holds, each before the finish
    assert intervals == [("disaggregated", 0.25, 0), ("disaggregated", 0.5, 0)]
