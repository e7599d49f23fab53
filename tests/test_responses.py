"""OpenAI's Responses API (app/responses.py) without a model or Ray: a request becomes the
chat completion it is (messages, tools, format, logprobs), unserved fields are refused by name,
and hand-made engine outputs become a Response and its stream of events, both checked against
the openai package's own types and its stream accumulator (a second reading of the events)."""

from __future__ import annotations

import asyncio
import json
import types

import pytest
from openai import omit
from openai.lib.streaming.responses._responses import ResponseStreamState
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from app.formats import ChatFormat, Prompt
from app.protocol import APIError
from app.response_store import ResponseStore, ResponseStoreServer
from app.responses import (
    ResponseFormat,
    StoreClient,
    chat_request,
    renamed,
    responses_request,
    sse,
)
from app.tools import AutoToolCalls, ToolCalls
from engine import RequestOutput, TokenLogprob

pytestmark = pytest.mark.unit

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
EVENT = TypeAdapter(ResponseStreamEvent)


def _chat(prior=None, reasons=False, **fields):
    data = {"model": "m", "input": "hi", **fields}
    req = responses_request(data)
    return req, chat_request(req, data, reasons, prior)


def test_input_items_become_the_chat_messages():
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "Weather in "},
                                     {"type": "input_text", "text": "Paris?"}]},
        {"type": "message", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me look."}]},
        {"type": "function_call", "call_id": "c1", "name": "get_weather",
         "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "c2", "name": "get_weather",
         "arguments": '{"city": "Lyon"}'},
        {"type": "function_call_output", "call_id": "c1", "output": "18C"},
        {"type": "function_call_output", "call_id": "c2",
         "output": [{"type": "input_text", "text": "20C"}]},
        {"role": "developer", "content": "Answer in French."},
    ]  # fmt: skip
    _, chat = _chat(input=items, instructions="Be brief.")
    calls = [
        {"id": f"c{i}", "type": "function",
         "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}
        for i, city in ((1, "Paris"), (2, "Lyon"))
    ]  # fmt: skip
    assert [m.for_template() for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": calls},  # joined
        {"role": "tool", "content": "18C", "tool_call_id": "c1"},
        {"role": "tool", "content": "20C", "tool_call_id": "c2"},
        {"role": "developer", "content": "Answer in French."},
    ]
    # a call with no assistant message before it opens one
    _, chat = _chat(input=items[2:3])
    assert chat.messages[0].for_template() == {
        "role": "assistant",
        "content": "",
        "tool_calls": calls[:1],
    }


def test_fields_become_chats():
    fmt = {"type": "json_schema", "name": "city", "schema": {"type": "object"}, "strict": True}
    req, chat = _chat(
        max_output_tokens=7, temperature=0.5, top_p=0.9, tools=[WEATHER],
        tool_choice={"type": "function", "name": "get_weather"}, parallel_tool_calls=False,
        include=["message.output_text.logprobs"], top_logprobs=3, top_k=5, seed=11,
        text={"format": fmt}, store=True, metadata={"a": "b"},
        n=4, max_tokens=2, messages=[{"role": "user", "content": "x"}],  # chat's: not taken
    )  # fmt: skip
    assert (chat.max_completion_tokens, chat.temperature, chat.top_p) == (7, 0.5, 0.9)
    assert (chat.top_k, chat.seed, chat.num_logprobs) == (5, 11, 3)
    assert (chat.n, chat.max_tokens, chat.messages[0].text()) == (1, None, "hi")
    assert chat.tools[0].function.name == "get_weather"
    assert chat.tools[0].function.parameters == WEATHER["parameters"]
    assert chat.tool_choice.function.name == "get_weather"
    assert chat.parallel_tool_calls is False
    assert chat.response_format.json_schema.schema_ == {"type": "object"}
    assert _chat(text={"format": fmt})[1].structure().kind == "json"
    # logprobs only when include asks for them
    assert _chat(top_logprobs=3)[1].num_logprobs is None
    assert _chat(text={"format": {"type": "text"}})[1].response_format is None
    assert _chat(text={"format": {"type": "json_object"}})[1].structure().kind == "json_object"
    assert _chat(reasoning={"effort": None})[1]  # an empty reasoning object is nothing asked


@pytest.mark.parametrize(
    "fields, status, param",
    [
        ({"previous_response_id": "resp_1"}, 404, "previous_response_id"),
        ({"background": True}, 400, "background"),
        ({"conversation": "conv_1"}, 400, "conversation"),
        ({"reasoning": {"effort": "high"}}, 400, "reasoning"),
        ({"truncation": "auto"}, 400, "truncation"),
        ({"max_tool_calls": 2}, 400, "max_tool_calls"),
        ({"prompt": {"id": "pmpt_1"}}, 400, "prompt"),
        ({"tools": [{"type": "web_search"}]}, 400, "tools.0.type"),
        ({"tool_choice": {"type": "allowed_tools"}}, 400, "tool_choice"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, 400,
         "input.0.content.0"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, 400, "input.0.type"),
        ({"input": [{"role": "tool", "content": "x"}]}, 400, "input.0.role"),
        ({"input": [{"type": "function_call", "name": "f"}]}, 400, "input.0.call_id"),
        ({"input": []}, 400, "input"),
        ({"text": {"format": {"type": "xml"}}}, 400, "text.format.type"),
        ({"text": {"format": "json"}}, 400, "text.format"),  # not an object: was a 500
        ({"temperature": "hot"}, 400, "temperature"),
        ({"tool_choice": "required"}, 400, "tool_choice"),  # no tools (chat's check)
    ],
)  # fmt: skip
def test_refused_requests_name_their_field(fields, status, param):
    with pytest.raises(APIError) as e:
        req, chat = _chat(**fields)
        chat.tool_calls()  # checked where the ingress first asks
    assert (e.value.status, e.value.param) == (status, param)
    assert param.split(".")[0] in e.value.message or status == 404


TEXTS = {1: "The", 2: " cat", 3: "<tool_call>", 4: "</tool_call>", 5: "{", 6: "}"}


def _outputs(texts: list[str], reason: str = "stop") -> list[RequestOutput]:
    outs = []
    for i, text in enumerate(texts):
        last = i == len(texts) - 1
        lp = [TokenLogprob(1 + i % 2, -0.5, ((2, -0.25),))]
        reason_now = reason if last else None
        outs.append(RequestOutput("r", [1 + i % 2], text, 3, i + 1, reason_now, logprobs=lp))
    return outs


def _view(tools=None, thinks=None, **fields) -> ResponseFormat:
    req, chat = _chat(**fields)
    view = ChatFormat("chatcmpl-x1", "m", [Prompt([1, 2, 3])], 1, TEXTS.__getitem__, chat.shown)
    view.tools, view.reasoning = tools, thinks
    return ResponseFormat(req, view, chat.temperature, chat.top_p)


def _final(outs, **kwargs) -> dict:
    view = _view(**kwargs)
    for out in outs:
        view.add(0, out)
    return view.final()


def _streamed(outs, **kwargs) -> list[dict]:
    view = _view(**kwargs)
    events = view.opening()
    for out in outs:
        view.add(0, out)
        events += view.events(0, out)
    payloads = []
    for event in events:
        head, data = event.removesuffix("\n\n").split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert head == f"event: {payload['type']}"
        payloads.append(payload)
    return payloads


def _without_call_ids(output: list[dict]) -> list[dict]:
    return [{k: v for k, v in item.items() if k != "call_id"} for item in output]


CALL = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
CASES = {
    "text": (["The", " cat", " sat"], "stop", {}),
    "text with logprobs": (
        ["The", " cat"], "stop", {"include": ["message.output_text.logprobs"], "top_logprobs": 1}
    ),
    "cut by max_output_tokens": (["The", " cat"], "length", {"max_output_tokens": 2}),
    "named call": (['{"city"', ': "Paris"}'], "stop",
                   {"tools": ToolCalls("get_weather")}),
    "required calls": (['[{"name": "get_weather", ', '"parameters": {"city": "Lyon"}}]'], "stop",
                       {"tools": ToolCalls(None)}),
    "auto: text, then a call": (["Let me see. ", "<tool_call>", CALL, "</tool_call>"], "stop",
                                {"tools": AutoToolCalls("hermes")}),
    "reasoning, then text": (["<think>Hm", ", Paris.</think>", "Paris", "."], "stop",
                             {"thinks": "qwen3"}),
    "reasoning, then a call": (["<think>Weather.</think>", "<tool_call>", CALL, "</tool_call>"],
                               "stop", {"thinks": "qwen3", "tools": AutoToolCalls("hermes")}),
    "reasoning cut short": (["<think>Hm", ", Paris"], "length", {"thinks": "qwen3"}),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_a_streamed_response_ends_as_the_whole_one(case):
    texts, reason, fields = CASES[case]
    whole = _final(_outputs(texts, reason), **fields)
    events = _streamed(_outputs(texts, reason), **fields)
    Response.model_validate(whole)  # the openai package's own types
    state = ResponseStreamState(input_tools=[], text_format=omit)  # its stream accumulator
    for payload in events:
        state.handle_event(EVENT.validate_python(payload))  # raises on a broken sequence
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert [e["type"] for e in events[:2]] == ["response.created", "response.in_progress"]
    done = events[-1]["response"]
    assert events[-1]["type"] == f"response.{done['status']}"
    assert done["status"] == ("incomplete" if reason == "length" else "completed")
    assert _without_call_ids(done["output"]) == _without_call_ids(whole["output"])
    assert done["usage"] == whole["usage"]
    for i, item in enumerate(done["output"]):  # the deltas add up to each item
        deltas = [e["delta"] for e in events if e.get("output_index") == i and "delta" in e]
        part = item["arguments"] if item["type"] == "function_call" else item["content"][0]["text"]
        assert "".join(deltas) == part
        added = next(e for e in events if e["type"] == "response.output_item.added"
                     and e["output_index"] == i)  # fmt: skip
        assert added["item"]["id"] == item["id"] and added["item"]["status"] == "in_progress"
        assert added["item"].get("call_id") == item.get("call_id")


def test_the_whole_response():
    body = _final(_outputs(["The", " cat"], "stop"), include=["message.output_text.logprobs"],
                  top_logprobs=1, instructions="Be brief.", metadata={"k": "v"})  # fmt: skip
    response = Response.model_validate(body)
    assert response.output_text == "The cat" and response.status == "completed"
    assert (body["instructions"], body["metadata"], body["store"]) == (
        "Be brief.",
        {"k": "v"},
        False,
    )
    [item] = body["output"]
    assert item["id"] == "msg_x1_0" and body["id"] == "resp_x1"
    assert [lp["token"] for lp in item["content"][0]["logprobs"]] == ["The", " cat"]
    assert item["content"][0]["logprobs"][0]["top_logprobs"][0]["token"] == " cat"
    usage = body["usage"]
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (3, 2, 5)
    # without include: no logprobs; cut short: incomplete, with its reason
    body = _final(_outputs(["The", " cat"], "length"))
    assert "logprobs" not in body["output"][0]["content"][0]
    assert body["status"] == "incomplete" == body["output"][0]["status"]
    assert body["incomplete_details"] == {"reason": "max_output_tokens"}


def test_auto_calls_are_function_call_items_after_the_text():
    texts = ["Let me see. ", "<tool_call>", CALL, "</tool_call>"]
    body = _final(_outputs(texts), tools=AutoToolCalls("hermes"))
    message, call = body["output"]
    assert message["content"][0]["text"] == "Let me see. "
    assert (call["type"], call["name"], json.loads(call["arguments"])) == (
        "function_call", "get_weather", {"city": "Paris"}
    )  # fmt: skip
    assert call["id"] == "fc_x1_1" and call["call_id"].startswith("chatcmpl-tool-")


def test_reasoning_is_an_item_before_the_answer():
    body = _final(_outputs(["<think>Hm.</think>", "Paris."]), thinks="qwen3")
    reasoning, message = body["output"]
    assert reasoning == {
        "id": "rs_x1_0",
        "type": "reasoning",
        "status": "completed",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "Hm."}],
    }
    assert message["id"] == "msg_x1_1" and Response.model_validate(body).output_text == "Paris."
    # the thinking's tokens, less its tags'
    outs = _outputs(["<think>", "Hm", ".", "</think>", "Paris."])
    assert _final(outs, thinks="qwen3")["usage"]["output_tokens_details"] == {"reasoning_tokens": 2}
    assert _final(outs)["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}
    # asked for, with a reasoning parser: passed to the template; without one, refused
    _, chat = _chat(reasoning={"effort": "low"}, reasons=True)
    assert chat.template_kwargs() == {"reasoning_effort": "low"}
    # an earlier turn's reasoning item is the thinking of the assistant message after it
    thought = {"type": "reasoning", "id": "rs_1", "summary": [],
               "content": [{"type": "reasoning_text", "text": "Hm."}]}  # fmt: skip
    call = {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}
    items = [{"role": "user", "content": "x"}, thought, call, thought]
    messages = [m.for_template() for m in _chat(input=items)[1].messages]
    assert [m["role"] for m in messages] == ["user", "assistant"]  # the last one: no message
    assert messages[1]["reasoning_content"] == "Hm." and messages[1]["tool_calls"]


def test_a_stream_failing_after_it_started_ends_with_failed():
    view = _view()
    view.opening()
    out = _outputs(["The", " cat"])[0]
    view.add(0, out)
    view.events(0, out)
    error = APIError(400, "max_completion_tokens: too many", "max_completion_tokens")
    events = [json.loads(e.split("data: ")[1]) for e in view.failed(renamed(error))]
    assert [e["type"] for e in events] == ["error", "response.failed"]
    assert events[0]["param"] == "max_output_tokens"  # the Responses request's name
    assert events[0]["message"] == "max_output_tokens: too many"
    assert events[0]["sequence_number"] == 5  # after created, in_progress, added, part, delta
    assert events[1]["response"]["status"] == "failed"
    assert events[1]["response"]["error"]["code"] == "invalid_prompt"
    for payload in events:
        EVENT.validate_python(payload)


def test_the_store_keeps_the_latest_responses_and_their_conversations():
    store = ResponseStore(2)
    for n in (1, 2, 3):
        store.put({"id": f"resp_{n}"}, [{"n": n}])
    assert store.get("resp_1") is None  # the least recently used went first
    store.get("resp_2")  # now the most recently used
    store.put({"id": "resp_4"}, [])
    assert store.get("resp_2").items == [{"n": 2}] and len(store) == 2
    assert store.get("resp_3") is None
    assert store.delete("resp_2") and not store.delete("resp_2")


class _Handle:
    """A deployment handle's shape (`handle.method.remote(...)`, awaited) over the store's
    deployment class in this process; or one whose replica is gone."""

    def __init__(self, server: ResponseStoreServer | None) -> None:
        self.server = server

    def __getattr__(self, name: str):
        async def gone(*args):
            from ray.exceptions import RayActorError

            raise RayActorError()

        method = gone if self.server is None else getattr(self.server, name)
        return types.SimpleNamespace(remote=method)


def test_the_ingress_side_of_the_store_names_what_it_cannot_find():
    async def run():
        client = StoreClient(_Handle(ResponseStoreServer(4)))
        await client.put({"id": "resp_1"}, [{"n": 1}])
        assert (await client.get("resp_1")).items == [{"n": 1}]
        assert await client.delete("resp_1") == {
            "id": "resp_1", "object": "response", "deleted": True
        }  # fmt: skip
        with pytest.raises(APIError) as e:
            await client.get("resp_1", "previous_response_id")
        assert (e.value.status, e.value.param) == (404, "previous_response_id")
        assert "no longer" in e.value.message
        with pytest.raises(APIError) as e:
            await client.delete("resp_1")
        assert (e.value.status, e.value.param) == (404, "response_id")
        with pytest.raises(APIError) as e:
            await StoreClient(_Handle(None)).get("resp_1")
        assert (e.value.status, e.value.kind) == (503, "server_error")

    asyncio.run(run())


def test_a_response_continues_the_stored_conversation():
    """previous_response_id: the stored turns' items, then this input; the earlier
    instructions do not carry over; the finished response is the one to store."""
    store = ResponseStore(4)
    req, chat = _chat(input="My name is Ann.", instructions="Be brief.")
    assert [m.role for m in chat.messages] == ["system", "user"]
    view = ChatFormat("chatcmpl-a1", "m", [Prompt([1])], 1, None, chat.shown)
    response = ResponseFormat(req, view, 1.0, 1.0, stored=True)
    for out in _outputs(["Hi", " Ann."]):
        response.add(0, out)
    body = response.final()
    assert response.ended == body and body["store"] is True
    store.put(body, [*req.input_items, *body["output"]])
    prior = store.get("resp_a1").items
    req, chat = _chat(input="What is my name?", previous_response_id="resp_a1", prior=prior)
    assert [(m.role, m.text()) for m in chat.messages] == [
        ("user", "My name is Ann."), ("assistant", "Hi Ann."), ("user", "What is my name?")
    ]  # fmt: skip
    assert req.previous_response_id == "resp_a1"
    # streamed: stored before its last event (the client's next turn finds it), with the
    # items the client saw
    view = ChatFormat("chatcmpl-a2", "m", [Prompt([1])], 1, None, chat.shown)
    response = ResponseFormat(req, view, 1.0, 1.0, stored=True)
    sent, kept = [], []

    async def outputs():
        for out in _outputs(["Ann", "."]):
            yield 0, out

    async def on_done(ended: dict) -> None:
        kept.append((ended, len(sent)))

    async def stream():
        async for event in sse(response, outputs(), on_done):
            sent.append(event)

    asyncio.run(stream())
    [(done, before)] = kept
    assert done["output"][0]["content"][0]["text"] == "Ann." and done["previous_response_id"]
    assert before < len(sent) and "response.completed" in sent[-1]
    assert all("response.completed" not in event for event in sent[:before])
