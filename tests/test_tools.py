"""Function calling with a forced tool choice (app/tools.py): the constraint a named or
"required" tool_choice sets, the tools and earlier calls reaching the chat template, the
reply's tool_calls (final and streamed) built from the engine's constrained output, and the
refused forms. The engine of the Serve tests' tiny random model (tests/conftest.py:
serve_model_path), no Ray: what is checked here is the calls' constraint, template and parsing,
and the texts are forced or bounded."""

from __future__ import annotations

import json
import re

import pytest

from app.formats import ChatFormat, Prompt
from app.protocol import APIError, ChatCompletionRequest, parse
from app.tool_parsers import Parsed
from app.tools import ToolCalls
from engine import SamplingParams
from engine.limits import chat_token_ids

pytestmark = pytest.mark.model

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city now",
        "parameters": {
            "type": "object",
            "properties": {
                # bounded: a small (or random) model's string can run on past any max_tokens
                "city": {"type": "string", "maxLength": 24},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"timezone": {"type": "string", "maxLength": 30}},
            "required": ["timezone"],
            "additionalProperties": False,
        },
    },
}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def _request(**fields) -> ChatCompletionRequest:
    body = {"model": "m", "messages": ASK, "tools": [WEATHER, CLOCK], "temperature": 0, **fields}
    return parse(json.dumps(body).encode(), ChatCompletionRequest)


def _reply(engine, req: ChatCompletionRequest, max_tokens: int = 60):
    """The engine's output for the request and its final and streamed bodies."""
    ids = req.prompt_ids(engine.tokenizer)
    params = req.sampling_params(max_tokens)
    engine.add_request("r", ids, params)
    outs = []
    while engine.has_unfinished:
        outs += engine.step()
    views = []
    for _ in range(2):  # one for the final body, one for the chunks
        view = ChatFormat("chatcmpl-x", "m", [Prompt(ids)], 1, None, req.shown)
        view.tools = req.tool_calls()
        views.append(view)
    for out in outs:
        views[0].add(0, out)
    chunks = [views[1].chunk(0, views[1].add(0, out)) for out in outs]
    return params, "".join(o.new_text for o in outs), views[0].final(), chunks


def test_a_named_tool_choice_writes_that_functions_arguments(make_tiny_engine):
    engine = make_tiny_engine()
    req = _request(tool_choice=NAMED)
    params, text, body, chunks = _reply(engine, req)
    structure = params.structured_output
    assert (structure.kind, structure.param, structure.any_whitespace) == (
        "json",
        "tool_choice",
        False,
    )
    assert json.loads(structure.spec) == WEATHER["function"]["parameters"]
    # the same engine, asked for that schema directly, writes the same arguments
    [direct] = engine.generate(
        [req.prompt_ids(engine.tokenizer)],
        SamplingParams(max_tokens=60, temperature=0, structured_output=structure),
    )
    assert text == direct.text
    arguments = json.loads(text)
    assert set(arguments) == {"city", "unit"} and arguments["unit"] in ("celsius", "fahrenheit")
    [choice] = body["choices"]
    assert choice["finish_reason"] == "stop"  # OpenAI's for a named choice
    assert choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert call["function"] == {"name": "get_weather", "arguments": text}
    # streamed: the id and name first, then the arguments piece by piece
    deltas = [c["choices"][0]["delta"] for c in chunks]
    first = deltas[0]["tool_calls"][0]
    assert first["index"] == 0 and first["function"]["name"] == "get_weather"
    assert deltas[0]["role"] == "assistant" and first["id"].startswith("chatcmpl-tool-")
    streamed = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas)
    assert streamed == text and all("name" not in d["tool_calls"][0] for d in deltas[1:])


@pytest.mark.parametrize("parallel", [None, False])
def test_required_writes_a_list_of_calls(make_tiny_engine, parallel):
    engine = make_tiny_engine()
    req = _request(tool_choice="required", parallel_tool_calls=parallel)
    params, text, body, chunks = _reply(engine, req, max_tokens=80)
    schema = json.loads(params.structured_output.spec)
    assert schema["type"] == "array" and schema["minItems"] == 1
    assert ("maxItems" in schema) == (parallel is False)
    bare = {"type": "function", "function": {"name": "f"}}  # no parameters: any JSON object
    named = _request(tools=[bare], tool_choice={"type": "function", "function": {"name": "f"}})
    assert json.loads(named.sampling_params(4).structured_output.spec) == {"type": "object"}
    names = [o["properties"]["name"]["enum"] for o in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    items = json.loads(text)
    [choice] = body["choices"]
    assert choice["finish_reason"] == "tool_calls"
    calls = choice["message"]["tool_calls"]
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        (i["name"], i["parameters"]) for i in items
    ]
    # streamed: each call's id and name first, then its arguments in pieces as written
    pieces = [c for chunk in chunks for c in chunk["choices"][0]["delta"].get("tool_calls", ())]
    heads = [c for c in pieces if "id" in c]
    assert [(c["index"], c["function"]["name"]) for c in heads] == [
        (i, c["function"]["name"]) for i, c in enumerate(calls)
    ]
    for i, call in enumerate(calls):
        mine = [c["function"]["arguments"] for c in pieces if c["index"] == i]
        assert len(mine) > 1 and "".join(mine) == call["function"]["arguments"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_calls_cut_short(make_tiny_engine):
    """Cut by max_tokens: "required"'s output before a call began is text; a named call keeps
    the arguments written (OpenAI's and vLLM's way), final and streamed alike."""
    _, text, body, chunks = _reply(
        make_tiny_engine(), _request(tool_choice="required"), max_tokens=4
    )
    [choice] = body["choices"]
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"]
    assert choice["message"]["content"] == text
    assert chunks[-1]["choices"][0]["delta"]["content"] == text
    _, text, body, chunks = _reply(make_tiny_engine(), _request(tool_choice=NAMED), max_tokens=4)
    [choice] = body["choices"]
    [call] = choice["message"]["tool_calls"]
    assert choice["finish_reason"] == "length" and call["function"]["arguments"] == text
    pieces = [c["choices"][0]["delta"].get("tool_calls", [{}])[0] for c in chunks]
    assert "".join(p.get("function", {}).get("arguments", "") for p in pieces) == text


def test_tools_and_earlier_calls_reach_the_template(own_tokenizer):
    own_tokenizer.chat_template = (
        "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}|{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}<{{ c.function.name }}>{% endfor %}"
        "{% if m.tool_call_id %}#{{ m.tool_call_id }}{% endif %}{% endfor %}"
    )
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    history = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "18 C", "tool_call_id": "c1"},
    ]
    text = "[get_weather][get_time]|user:What is the weather in Paris?|assistant:<get_weather>"
    text += "|tool:18 C#c1"
    for choice, shown in ((NAMED, text), ("none", text[len("[get_weather][get_time]") :])):
        req = _request(messages=history, tool_choice=choice)
        ids = req.prompt_ids(own_tokenizer)
        assert own_tokenizer.decode(ids) == shown  # "none": the tools stay out, as in vLLM
    assert ids == chat_token_ids(own_tokenizer, history)


@pytest.mark.parametrize(
    ("fields", "param", "needle"),
    [
        ({}, "tool_choice", '"auto"'),  # tools without a tool_choice: OpenAI's "auto"
        ({"tool_choice": "auto"}, "tool_choice", "parser"),
        (
            {"tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tool_choice": "required", "tools": None}, "tool_choice", "needs tools"),
        (
            {"tool_choice": NAMED, "response_format": {"type": "json_object"}},
            "response_format",
            "one",
        ),
        ({"tool_choice": NAMED, "guided_regex": "a"}, "guided_regex", "forced tool_choice"),
        ({"tool_choice": NAMED, "echo": True}, "echo", "tool calls"),
        ({"tool_choice": "auto", "tools": None}, "tool_choice", "needs tools"),
        ({"tool_choice": "maybe"}, "tool_choice", "tool_choice"),
        ({"functions": [{"name": "f"}]}, "functions", "use tools"),
        ({"tools": [{"type": "code", "function": {"name": "f"}}]}, "tools.0.type", "function"),
    ],
)
def test_refused_tool_requests(fields, param, needle):
    with pytest.raises(APIError) as e:
        _request(**fields).sampling_params(8)
    assert (e.value.status, e.value.param) == (400, param) and needle in e.value.message


def test_auto_with_a_parser_refuses_echo_and_keeps_the_tools_in_the_prompt(own_tokenizer):
    req = _request(tool_choice="auto", echo=True)
    req.use_tool_parser("hermes")
    with pytest.raises(APIError, match="echo cannot be combined with tool calls"):
        req.sampling_params(8)
    own_tokenizer.chat_template = "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}"
    for fields in ({"tool_choice": "auto"}, {}):  # tools alone mean "auto"
        req = _request(**fields)
        req.use_tool_parser("hermes")
        assert own_tokenizer.decode(req.prompt_ids(own_tokenizer)) == "[get_weather][get_time]"


ARGS = {"city": "Paris", "unit": "celsius"}
HERMES_CALL = f"<tool_call>{json.dumps({'name': 'get_weather', 'arguments': ARGS})}</tool_call>"
LLAMA_CALL = json.dumps({"name": "get_weather", "parameters": ARGS})
MISTRAL_CALL = "[TOOL_CALLS]" + json.dumps([{"name": "get_weather", "arguments": ARGS}])


@pytest.mark.parametrize(
    ("parser", "written", "content"),
    [
        ("hermes", "Checking.\n" + HERMES_CALL, "Checking.\n"),
        ("llama3_json", LLAMA_CALL, None),
        ("mistral", "Sure. " + MISTRAL_CALL, "Sure. "),
        ("pythonic", 'get_weather(city="Paris", unit="celsius")'.join("[]"), None),
        ("qwen3_coder", "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
         "</parameter>\n<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>",
         None),
        ("kimi_k2", "On it.<|tool_calls_section_begin|><|tool_call_begin|>functions.get_weather:0"
         f"<|tool_call_argument_begin|>{json.dumps(ARGS)}<|tool_call_end|>"
         "<|tool_calls_section_end|>", "On it."),
    ],
)  # fmt: skip
def test_auto_finds_the_calls_the_model_writes(make_tiny_engine, parser, written, content):
    """The model made to write a call in the parser's format (a regex over the exact text):
    the reply's tool_calls hold it, final and streamed, with the text before it as content and
    finish_reason tool_calls; the call's text never reaches the client as content."""
    req = _request(tool_choice="auto", structured_outputs={"regex": re.escape(written)})
    req.use_tool_parser(parser)
    params, text, body, chunks = _reply(make_tiny_engine(), req, max_tokens=80)
    assert text == written and params.skip_special_tokens is False  # the markers are kept
    [choice] = body["choices"]
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": json.dumps(ARGS)}
    assert call["type"] == "function" and call["id"].startswith("chatcmpl-tool-")
    assert choice["message"]["content"] == content and choice["finish_reason"] == "tool_calls"
    deltas = [c["choices"][0]["delta"] for c in chunks]
    head, *more = [c for d in deltas for c in d.get("tool_calls", ())]
    assert head["index"] == 0 and head["type"] == "function"
    assert head["id"].startswith("chatcmpl-tool-")
    # the arguments stream as the model writes them (pythonic's calls come whole): later
    # pieces name only the index
    assert all(c == {"index": 0, "function": {"arguments": c["function"]["arguments"]}}
               for c in more)  # fmt: skip
    assert (len(more) > 2) == (parser != "pythonic")
    arguments = head["function"]["arguments"] + "".join(c["function"]["arguments"] for c in more)
    assert {"name": head["function"]["name"], "arguments": arguments} == call["function"]
    assert "".join(d.get("content", "") for d in deltas) == (content or "")
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_without_parallel_tool_calls_gives_the_first_call_alone(make_tiny_engine):
    """parallel_tool_calls false (vLLM's way): of the two calls the model writes, the reply
    holds the first, final and streamed; the second reaches the client neither as a call nor
    as text."""
    clock = json.dumps({"name": "get_time", "arguments": {"timezone": "UTC"}})
    written = HERMES_CALL + f"\n<tool_call>{clock}</tool_call>"
    for parallel in (True, False):
        req = _request(tool_choice="auto", structured_outputs={"regex": re.escape(written)},
                       parallel_tool_calls=parallel)  # fmt: skip
        req.use_tool_parser("hermes")
        _, text, body, chunks = _reply(make_tiny_engine(), req, max_tokens=120)
        assert text == written
        message = body["choices"][0]["message"]
        names = [c["function"]["name"] for c in message["tool_calls"]]
        assert names == (["get_weather", "get_time"] if parallel else ["get_weather"])
        deltas = [c["choices"][0]["delta"] for c in chunks]
        streamed = [c for d in deltas for c in d.get("tool_calls", ())]
        assert [c["function"]["name"] for c in streamed if "id" in c] == names
        assert {c["index"] for c in streamed} == set(range(len(names)))
        assert not message["content"] and not "".join(d.get("content", "") for d in deltas)
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_auto_without_a_call_is_plain_text(make_tiny_engine):
    req = _request(tool_choice="auto", structured_outputs={"regex": "Sunny in Paris\\."})
    req.use_tool_parser("hermes")
    _, text, body, chunks = _reply(make_tiny_engine(), req)
    [choice] = body["choices"]
    assert (
        choice["message"]
        == {"role": "assistant", "content": "Sunny in Paris."}
        == {
            "role": "assistant",
            "content": text,
        }
    )
    assert choice["finish_reason"] == "stop" == chunks[-1]["choices"][0]["finish_reason"]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text


@pytest.fixture
def own_tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def test_required_output_nested_past_the_recursion_limit_is_not_a_call():
    """Output JSON nested past Python's recursion limit reads as output that is not whole
    JSON (the reply is its text), not as an error."""
    deep = "[" * 100_000
    assert ToolCalls(None).new_parser().read(deep) == Parsed(deep)
