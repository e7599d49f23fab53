"""Tool-call parsers (app/tool_parsers.py), pure: what a whole reply gives, and a stream cut at
every place (and at random places) joining to exactly that."""

from __future__ import annotations

import functools
import json
import random

import pytest

from app.json_stream import CallsStream
from app.tool_parsers import (
    PARSERS,
    Call,
    DeepSeekV3Parser,
    DeepSeekV31Parser,
    Glm45Parser,
    GraniteParser,
    HermesParser,
    InternLMParser,
    JambaParser,
    KimiK2Parser,
    Llama3JsonParser,
    MiniMaxParser,
    MistralParser,
    Parsed,
    Phi4MiniParser,
    PythonicParser,
    Qwen3CoderParser,
    _typed,
)

pytestmark = pytest.mark.unit

WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
CLOCK = '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}'
PARIS = Call("get_weather", json.dumps({"city": "Paris", "unit": "celsius"}))
TIME = Call("get_time", json.dumps({"timezone": "Europe/Paris"}))


def _streamed(parser_class, text: str, cuts: list[int]) -> tuple[Parsed, list[Parsed]]:
    """The reply fed in pieces cut at `cuts`: (everything joined, the pieces' results)."""
    parser, pieces, start = parser_class(), [], 0
    for cut in [*cuts, len(text)]:
        pieces.append(parser.feed(text[start:cut]))
        start = cut
    pieces.append(parser.end())
    joined = Parsed()
    for piece in pieces:
        joined += piece
    return joined, pieces


def _every_way(parser_class, text: str) -> Parsed:
    """read() of the whole reply, asserted equal to every stream of it: one cut anywhere, one
    character at a time, and random cuts."""
    whole = parser_class().read(text)
    ways = [[k] for k in range(1, len(text))] + [list(range(1, len(text)))]
    rng = random.Random(0)
    ways += [sorted(rng.sample(range(1, len(text)), min(5, len(text) - 1))) for _ in range(30)]
    for cuts in ways:
        assert _streamed(parser_class, text, cuts)[0] == whole, cuts
    return whole


HERMES_CASES = [  # (reply, content, calls)
    ("The capital is Paris.", "The capital is Paris.", []),
    (f"<tool_call>\n{WEATHER}\n</tool_call>", "", [PARIS]),
    # text before the calls is content; whitespace between and after them is not
    (f"Let me check.\n<tool_call>{WEATHER}</tool_call>\n\n<tool_call>{CLOCK}</tool_call>\n",
     "Let me check.\n", [PARIS, TIME]),
    # text after a call is content, with the whitespace that leads to it
    (f"<tool_call>{WEATHER}</tool_call>\nDone.", "\nDone.", [PARIS]),
    # the last call may be left open when the reply ends
    (f"<tool_call>{WEATHER}", "", [PARIS]),
    # not a call: left as the model's text, tags and all
    ("<tool_call>{not json}</tool_call>", "<tool_call>{not json}</tool_call>", []),
    ('<tool_call>{"arguments": {}}</tool_call>', '<tool_call>{"arguments": {}}</tool_call>',
     []),
    ('<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>', []),
    ("<tool_call>{", "<tool_call>{", []),
    # a tail that only looks like the start of a tag is text once the reply ends
    ("Use <tool", "Use <tool", []),
    ("a <b> <tool_calls> c", "a <b> <tool_calls> c", []),
    # no arguments: an empty object; non-ASCII kept as written
    ('<tool_call>{"name": "ping"}</tool_call>', "", [Call("ping", "{}")]),
    ('<tool_call>{"name": "f", "arguments": {"city": "Zürich"}}</tool_call>', "",
     [Call("f", '{"city": "Zürich"}')]),
    # the arguments before the name; written loosely, given as json.dumps writes them
    ('<tool_call>{"arguments":{"n":1E2,"s":"\\u00e9\\ud83d\\ude00\\n"}, "name":"f"}</tool_call>',
     "", [Call("f", '{"n": 100.0, "s": "é😀\\n"}')]),
    # once its name and its arguments' start are read, it is a call (its arguments may
    # already be out): cut short by the reply's end, or gone wrong after its arguments
    ('<tool_call>{"name": "f", "arguments": {"city": "Par', "", [Call("f", '{"city": "Par')]),
    ('<tool_call>{"name": "f", "arguments": {"a": [1, 2]}} and more</tool_call>', "",
     [Call("f", '{"a": [1, 2]}')]),
    ('<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>', "",
     [Call("f", '{"a": ')]),
    ('<tool_call>{"name": "f", "arguments": {"a": "x\\qy"}}</tool_call>', "",
     [Call("f", '{"a": "x')]),
]  # fmt: skip


def test_hermes_streams_text_at_once_and_holds_only_a_possible_tag():
    joined, pieces = _streamed(HermesParser, f"Hi there <tool_call>{WEATHER}</tool_call>", [3, 11])
    assert [p.content for p in pieces[:2]] == ["Hi ", "there "]  # "<" of a tag waited
    assert pieces[2].calls == [PARIS] and joined.content == "Hi there "


def test_hermes_streams_a_calls_arguments_as_they_are_written():
    """The call goes out once its name is whole and its arguments have begun; then each piece
    of the arguments that is certain: a string's characters as they come, a number once it
    ends. The pieces join to the whole call."""
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 12}}'
    cuts = [text.index(s) + len(s) for s in ('"get_we', '"get_weather"', '{"ci', '"Pa', "1")]
    joined, pieces = _streamed(HermesParser, text + "</tool_call>", cuts)
    assert [p.calls for p in pieces] == [
        [], [], [Call("get_weather", '{"ci')],
        [Call("get_weather", 'ty": "Pa', continued=True)],
        [Call("get_weather", 'ris", "days": ', continued=True)],  # "1" may go on
        [Call("get_weather", '12}', continued=True)], [],
    ]  # fmt: skip
    assert joined == Parsed("", [Call("get_weather", '{"city": "Paris", "days": 12}')])
    parser = InternLMParser()  # its arguments' other key
    call = parser.feed('<|action_start|><|plugin|>{"name": "f", "parameters": {"q": "x')
    assert call.calls == [Call("f", '{"q": "x')] and parser.end().calls == []
    parser = HermesParser()
    assert parser.feed("x <tool_ca").content == "x " and parser.end().content == "<tool_ca"


LLAMA3_JSON_CASES = [  # (reply, content, calls)
    ('{"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}', "",
     [PARIS]),
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris", '
     '"unit": "celsius"}}', "", [PARIS]),
    # several, separated by ";"; "arguments" read as well
    (' {"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}} ; '
     '{"name": "get_time", "arguments": {"timezone": "Europe/Paris"}}', "", [PARIS, TIME]),
    ("Paris is sunny.", "Paris is sunny.", []),
    ("  {not json", "  {not json", []),
    # once a call is read it stays one (its arguments may be out): what follows is dropped
    ('{"name": "f", "parameters": {}} and more', "", [Call("f", "{}")]),
    ('{"city": "Paris"}', '{"city": "Paris"}', []),
    ("<|python_ta", "<|python_ta", []),
]  # fmt: skip


def test_llama3_json_streams_text_once_the_reply_is_not_a_call():
    _, pieces = _streamed(Llama3JsonParser, " Paris is sunny.", [1, 4])
    assert [p.content for p in pieces] == ["", " Par", "is is sunny.", ""]


MISTRAL = f"[{WEATHER}, {CLOCK}]"


MISTRAL_CASES = [  # (reply, content, calls)
    ("[TOOL_CALLS]" + MISTRAL, "", [PARIS, TIME]),
    ("Let me look. [TOOL_CALLS] " + MISTRAL + " ", "Let me look. ", [PARIS, TIME]),
    ('[TOOL_CALLS]{"name": "ping"}', "", [Call("ping", "{}")]),
    ("Paris is sunny [TOOL", "Paris is sunny [TOOL", []),
    ("[TOOL_CALLS][{not json", "[TOOL_CALLS][{not json", []),
    ('[TOOL_CALLS][{"name": "f"}, 3]', "", [Call("f", "{}")]),  # the calls before a fault
    ("[TOOL_CALLS][]", "[TOOL_CALLS][]", []),
    ("[1, 2]", "[1, 2]", []),
]  # fmt: skip


PYTHONIC_CASES = [  # (reply, content, calls)
    ('[get_weather(city="Paris", unit="celsius"), get_time(timezone="Europe/Paris")]', "",
     [PARIS, TIME]),
    ('<|python_start|>[get_weather(city="Paris", unit="celsius")]<|python_end|>', "",
     [PARIS]),
    (" [ping()]", "", [Call("ping", "{}")]),
    ("[f(a=[1, 2], b={'k': None}, c=True)]", "",
     [Call("f", '{"a": [1, 2], "b": {"k": null}, "c": true}')]),
    ("Paris is sunny.", "Paris is sunny.", []),
    ("[f(x)]", "[f(x)]", []),  # a positional argument: no name to give it
    ("[f(a=g())]", "[f(a=g())]", []),  # not a literal
    ("[f(**{'a': 1})]", "[f(**{'a': 1})]", []),
    ("[1, 2]", "[1, 2]", []),
    ("[]", "[]", []),
    ("[f(a=", "[f(a=", []),
    ("<|python_sta", "<|python_sta", []),
]  # fmt: skip


INTERNLM_CASES = [  # (reply, content, calls)
    ('Checking.<|action_start|><|plugin|>\n{"name": "get_weather", "parameters": '
     '{"city": "Paris", "unit": "celsius"}}<|action_end|>', "Checking.", [PARIS]),
    ("<|action_start|><|plugin|>{oops}<|action_end|>",
     "<|action_start|><|plugin|>{oops}<|action_end|>", []),
    ("Paris is sunny.<|action_st", "Paris is sunny.<|action_st", []),
]  # fmt: skip
JAMBA_CASES = [
    (f"<tool_calls>[{WEATHER}, {CLOCK}]</tool_calls>", "", [PARIS, TIME]),
    (f"Sure. <tool_calls>{WEATHER}</tool_calls>", "Sure. ", [PARIS]),
    ("<tool_calls>[1]</tool_calls>", "<tool_calls>[1]</tool_calls>", []),
]  # fmt: skip
MINIMAX_CASES = [
    (f"<tool_calls>\n{WEATHER}\n{CLOCK}\n</tool_calls>", "", [PARIS, TIME]),
    (f"<tool_calls>\n{WEATHER}\nnot json\n</tool_calls>", "", [PARIS]),
    ("<tool_calls>\nnot json\n</tool_calls>", "<tool_calls>\nnot json\n</tool_calls>", []),
]  # fmt: skip
GRANITE_CASES = [
    (f"<|tool_call|>[{WEATHER}, {CLOCK}]", "", [PARIS, TIME]),
    (f" [{WEATHER}]", "", [PARIS]),
    ("Paris is sunny.", "Paris is sunny.", []),
    ("<|tool_call|>{not a list}", "<|tool_call|>{not a list}", []),
]  # fmt: skip
PHI4_MINI_CASES = [
    (f"functools[{WEATHER}, {CLOCK}]", "", [PARIS, TIME]),
    (f"Let me see. functools[{WEATHER}]", "Let me see. ", [PARIS]),
    ("The functool", "The functool", []),
]  # fmt: skip
DS_BEGIN, DS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
DS_CALL = "<｜tool▁call▁begin｜>function<｜tool▁sep｜>{}\n```json\n{}\n```<｜tool▁call▁end｜>"
DS_ARGS = '{"city": "Paris", "unit": "celsius"}'
DEEPSEEK_V3_CASES = [
    ("Looking." + DS_BEGIN + DS_CALL.format("get_weather", DS_ARGS)
     + DS_CALL.format("get_time", '{"timezone": "Europe/Paris"}') + DS_END,
     "Looking.", [PARIS, TIME]),
    (DS_BEGIN + DS_CALL.format("get_weather", DS_ARGS), "", [PARIS]),  # unclosed
    (DS_BEGIN + "junk" + DS_END, DS_BEGIN + "junk" + DS_END, []),
    # known once its arguments begin: it stays a call
    (DS_BEGIN + DS_CALL.format("f", "{bad") + DS_END, "", [Call("f", "{")]),
    (DS_BEGIN + DS_CALL.format("f", "bad") + DS_END, DS_BEGIN + DS_CALL.format("f", "bad") + DS_END,
     []),
]  # fmt: skip
DS31_CALL = "<｜tool▁call▁begin｜>{}<｜tool▁sep｜>{}<｜tool▁call▁end｜>"
DEEPSEEK_V31_CASES = [
    (DS_BEGIN + DS31_CALL.format("get_weather", DS_ARGS)
     + DS31_CALL.format("get_time", '{"timezone": "Europe/Paris"}') + DS_END,
     "", [PARIS, TIME]),
    ("Hm." + DS_BEGIN + DS31_CALL.format("get_weather", DS_ARGS) + DS_END + " ",
     "Hm.", [PARIS]),
]  # fmt: skip
KIMI_CALL = "<|tool_call_begin|>functions.{}:{}<|tool_call_argument_begin|>{}<|tool_call_end|>"
KIMI_K2_CASES = [
    ("Let me check.<|tool_calls_section_begin|>" + KIMI_CALL.format("get_weather", 0, DS_ARGS)
     + KIMI_CALL.format("get_time", 1, '{"timezone": "Europe/Paris"}')
     + "<|tool_calls_section_end|>", "Let me check.", [PARIS, TIME]),
    ("<|tool_calls_section_begin|>nothing<|tool_calls_section_end|>",
     "<|tool_calls_section_begin|>nothing<|tool_calls_section_end|>", []),
]  # fmt: skip
SCHEMAS = {
    "get_weather": {"type": "object", "properties": {
        "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"}, "hot": {"type": "boolean"},
        "tags": {"type": "array"}, "at": {"anyOf": [{"type": "null"}, {"type": "number"}]}}},
    "get_time": {"type": "object", "properties": {"timezone": {"type": "string"}}},
}  # fmt: skip
QWEN_WEATHER = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=unit>\ncelsius\n</parameter>\n</function>\n</tool_call>"
)
TYPED = Call("get_weather", json.dumps(
    {"city": "123", "days": 3, "hot": True, "tags": ["a", "b"], "at": 2.5, "note": "x y"}
))  # fmt: skip
QWEN3_CODER_CASES = [
    (f"Let me look.\n{QWEN_WEATHER}", "Let me look.\n", [PARIS]),
    ("<tool_call>\n<function=get_time>\n<parameter=timezone>\nEurope/Paris\n</parameter>\n"
     "</function>\n</tool_call>", "", [TIME]),
    # values typed by the schema: a string stays one even when it looks like a number
    ("<tool_call><function=get_weather><parameter=city>123</parameter><parameter=days>3"
     "</parameter><parameter=hot>true</parameter><parameter=tags>['a', 'b']</parameter>"
     "<parameter=at>2.5</parameter><parameter=note>x y</parameter></function></tool_call>",
     "", [TYPED]),
    ("<tool_call>junk</tool_call>", "<tool_call>junk</tool_call>", []),
    # text on lines of its own: the newline after the open tag and before the close are not
    # the value's; a call cut short keeps what was written; no parameters: {}
    ("<tool_call><function=get_time><parameter=timezone>\n\nEurope\n\nParis\n\n</parameter>"
     "</function></tool_call>", "", [Call("get_time", '{"timezone": "\\nEurope\\n\\nParis\\n"}')]),
    ("<tool_call><function=get_weather><parameter=days>3</parameter><parameter=city>\nPar", "",
     [Call("get_weather", '{"days": 3, "city": "Par')]),
    ("<tool_call><function=ping>\n</function></tool_call>", "", [Call("ping", "{}")]),
    ("<tool_call><function=f>stray<parameter=a>1</parameter></function></tool_call>",
     "<tool_call><function=f>stray<parameter=a>1</parameter></function></tool_call>", []),
]  # fmt: skip
GLM45_CASES = [
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
     "<arg_key>unit</arg_key>\n<arg_value>celsius</arg_value>\n</tool_call>", "", [PARIS]),
    ("Sure.<tool_call>get_weather<arg_key>city</arg_key><arg_value>123</arg_value>"
     "<arg_key>days</arg_key><arg_value>3</arg_value><arg_key>hot</arg_key>"
     "<arg_value>true</arg_value><arg_key>tags</arg_key><arg_value>[\"a\", \"b\"]</arg_value>"
     "<arg_key>at</arg_key><arg_value>2.5</arg_value><arg_key>note</arg_key>"
     "<arg_value>x y</arg_value></tool_call>", "Sure.", [TYPED]),
    ("<tool_call>get_time</tool_call>", "", [Call("get_time", "{}")]),
    ("<tool_call>two words\nmore</tool_call>", "<tool_call>two words\nmore</tool_call>", []),
    # a value without the space around it; cut short, the call keeps what was written
    ("<tool_call>get_time<arg_key>timezone</arg_key><arg_value> \n Europe / Paris \n"
     "</arg_value></tool_call>", "", [Call("get_time", '{"timezone": "Europe / Paris"}')]),
    ("<tool_call>get_weather<arg_key>days</arg_key><arg_value>3</arg_value><arg_key>city"
     "</arg_key><arg_value>Pa", "", [Call("get_weather", '{"days": 3, "city": "Pa')]),
]  # fmt: skip


def _with_schemas(parser_class):
    return functools.partial(parser_class, SCHEMAS)


@pytest.mark.parametrize(
    ("parser_class", "text", "content", "calls"),
    [(HermesParser, *c) for c in HERMES_CASES]
    + [(Llama3JsonParser, *c) for c in LLAMA3_JSON_CASES]
    + [(MistralParser, *c) for c in MISTRAL_CASES]
    + [(PythonicParser, *c) for c in PYTHONIC_CASES]
    + [(InternLMParser, *c) for c in INTERNLM_CASES]
    + [(JambaParser, *c) for c in JAMBA_CASES]
    + [(MiniMaxParser, *c) for c in MINIMAX_CASES]
    + [(GraniteParser, *c) for c in GRANITE_CASES]
    + [(Phi4MiniParser, *c) for c in PHI4_MINI_CASES]
    + [(DeepSeekV3Parser, *c) for c in DEEPSEEK_V3_CASES]
    + [(DeepSeekV31Parser, *c) for c in DEEPSEEK_V31_CASES]
    + [(KimiK2Parser, *c) for c in KIMI_K2_CASES]
    + [(_with_schemas(Qwen3CoderParser), *c) for c in QWEN3_CODER_CASES]
    + [(_with_schemas(Glm45Parser), *c) for c in GLM45_CASES],
)
def test_each_parser_reads_calls_alike_whole_and_streamed(parser_class, text, content, calls):
    parsed = _every_way(parser_class, text)
    assert (parsed.content, parsed.calls) == (content, calls)


@pytest.mark.parametrize(
    ("value", "schema", "typed"),
    [
        ("Paris", {"type": "string"}, "Paris"),
        ("3", {"type": "string"}, "3"),
        ("3", {"type": "integer"}, 3),
        ("3.0", {"type": "number"}, 3),
        ("-0.5", {"type": "number"}, -0.5),
        ("three", {"type": "integer"}, "three"),  # not its type: text
        ("True", {"type": "boolean"}, True),
        ("yes", {"type": "boolean"}, "yes"),
        ('{"a": 1}', {"type": "object"}, {"a": 1}),
        ("{'a': None}", {"type": "object"}, {"a": None}),  # a Python literal
        ("[1, 2", {"type": "array"}, "[1, 2"),
        ("null", {"type": ["string", "null"]}, None),
        ("null", {"type": "string"}, "null"),
        ("None", {"anyOf": [{"type": "integer"}, {"type": "null"}]}, None),
        ("7", {"anyOf": [{"type": "null"}, {"type": "integer"}]}, 7),
        ("7", {"enum": ["7", "8"]}, "7"),  # untyped: text
        ("7", None, "7"),  # a parameter the schema does not name
    ],
)
def test_values_written_as_text_are_typed_by_the_schema(value, schema, typed):
    assert _typed(value, schema) == typed and type(_typed(value, schema)) is type(typed)


def test_every_parser_is_named_and_takes_the_tools_schemas():
    for name, parser_class in PARSERS.items():
        assert parser_class(SCHEMAS).read("plain text") == Parsed("plain text"), name


def test_the_apps_tool_call_parser_is_one_of_them():
    from pydantic import ValidationError

    from app.config import AppArgs

    assert AppArgs.model_validate({"tool_call_parser": "qwen3_coder"}).tool_call_parser
    with pytest.raises(ValidationError, match="tool_call_parser(.|\n)*one of hermes, llama3_json"):
        AppArgs.model_validate({"tool_call_parser": "qwen3"})


W_PARAMS = WEATHER.replace('"arguments"', '"parameters"')
C_PARAMS = CLOCK.replace('"arguments"', '"parameters"')


@pytest.mark.parametrize(
    ("parser_class", "text"),
    [
        (HermesParser, f"<tool_call>{WEATHER}</tool_call>\n<tool_call>{CLOCK}</tool_call>"),
        (InternLMParser, f"<|action_start|><|plugin|>{W_PARAMS}<|action_end|>"
                         f"<|action_start|><|plugin|>{C_PARAMS}<|action_end|>"),
        (JambaParser, f"<tool_calls>[{WEATHER}, {CLOCK}]</tool_calls>"),
        (MiniMaxParser, f"<tool_calls>\n{WEATHER}\n{CLOCK}\n</tool_calls>"),
        (Llama3JsonParser, f"<|python_tag|>{W_PARAMS}; {C_PARAMS}"),
        (GraniteParser, f"<|tool_call|>[{WEATHER}, {CLOCK}]"),
        (MistralParser, f"[TOOL_CALLS][{WEATHER}, {CLOCK}]"),
        (Phi4MiniParser, f"functools[{WEATHER}, {CLOCK}]"),
        (DeepSeekV3Parser, DS_BEGIN + DS_CALL.format("get_weather", DS_ARGS)
                           + DS_CALL.format("get_time", TIME.arguments) + DS_END),
        (DeepSeekV31Parser, DS_BEGIN + DS31_CALL.format("get_weather", DS_ARGS)
                            + DS31_CALL.format("get_time", TIME.arguments) + DS_END),
        (_with_schemas(Qwen3CoderParser), QWEN_WEATHER + QWEN_WEATHER.replace(
            "get_weather", "get_time").replace("city", "timezone").replace("Paris", "Europe/Paris")
            .replace("<parameter=unit>\ncelsius\n</parameter>\n", "")),
        (_with_schemas(Glm45Parser), GLM45_CASES[0][0] + "\n<tool_call>get_time<arg_key>"
         "timezone</arg_key><arg_value>Europe/Paris</arg_value></tool_call>"),
        (KimiK2Parser, "<|tool_calls_section_begin|>" + KIMI_CALL.format("get_weather", 0, DS_ARGS)
                       + KIMI_CALL.format("get_time", 1, TIME.arguments)
                       + "<|tool_calls_section_end|>"),
    ],
)  # fmt: skip
def test_the_json_parsers_stream_each_calls_arguments(parser_class, text):
    """Fed a character at a time, each call goes out with its name, then its arguments in
    pieces (a string's characters as they come), in the order written; joined, they are the
    whole reply's calls."""
    joined, pieces = _streamed(parser_class, text, list(range(1, len(text))))
    calls = [c for p in pieces for c in p.calls]
    assert [c.name for c in calls if not c.continued] == ["get_weather", "get_time"]
    for name in ("get_weather", "get_time"):
        assert sum(c.continued and c.name == name for c in calls) > 5
    assert joined == parser_class().read(text) == Parsed("", [PARIS, TIME])


def _random_value(rng: random.Random, depth: int = 0):
    if depth > 2 or rng.random() < 0.35:
        return rng.choice([0, -2.5, 1e21, 12345678901234567890, True, False, None, "", "x",
                           'q"uo\\te/', "Zürich 😀", "\n\t\u0001\u2028"])  # fmt: skip
    if rng.random() < 0.5:
        return {rng.choice(["a", "é", "k\"ey"]): _random_value(rng, depth + 1)
                for _ in range(rng.randint(0, 3))}  # fmt: skip
    return [_random_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]


def test_a_call_streams_its_arguments_as_json_dumps_writes_them():
    """Random arguments, written by json.dumps every way a model might (ASCII-escaped or not,
    indented or not, the name before or after) and fed in random pieces: the stream's name and
    arguments are json.dumps's of the object, and the arguments only ever grow."""
    rng = random.Random(0)
    for _ in range(300):
        arguments = {k: _random_value(rng) for k in rng.sample("abcd", rng.randint(0, 4))}
        call = {"name": "f", "arguments": arguments}
        if rng.random() < 0.3:
            call = {"arguments": arguments, "other": [1, {"name": "g"}], "name": "f"}
        text = json.dumps(call, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 2]))
        stream, start, seen = CallsStream(("arguments",)), 0, ""
        while start < len(text):
            end = start + rng.randint(1, 8)
            stream.feed(text[start:end])
            start = end
            now = stream.calls[0].arguments if stream.calls else ""
            assert now.startswith(seen)
            seen = now
        [call] = stream.calls
        assert (call.name, call.arguments) == ("f", json.dumps(arguments, ensure_ascii=False))


@pytest.mark.parametrize(
    ("text", "arguments"),
    [
        ('{"name": "f", "arguments": {"a": "x\\q"}}', '{"a": "x'),  # not an escape
        ('{"name": "f", "arguments": {"a": "x\ny"}}', '{"a": "x'),  # a raw control character
        ('{"name": "f", "arguments": {"a" 1}}', '{"a"'),
        ('{"name": "f", "arguments": {"a": 1,}}', '{"a": 1, '),
        ('{"name": "f", "arguments": {"a": [1}}', '{"a": [1'),
        ('{"name": "f", "arguments": {"a": 01}}', '{"a": '),
    ],
)
def test_a_call_stream_stops_where_the_json_goes_wrong(text, arguments):
    stream = CallsStream(("arguments",))
    stream.feed(text)
    [call] = stream.calls
    assert call.name == "f" and call.arguments == arguments and stream.failed
    stream.feed('"}}')  # nothing after the fault is read
    assert call.arguments == arguments


def test_a_call_stream_needs_an_object_with_a_string_name_and_object_arguments():
    for text in ('["f"]', '{"name": 1, "arguments": {}}', '{"name": "f", "arguments": [1]}',
                 '{"name": "", "arguments": {}}', 'x{"name": "f", "arguments": {}}'):  # fmt: skip
        stream = CallsStream(("arguments",))
        stream.feed(text + "}")
        assert not any(c.known for c in stream.calls) and stream.failed, text


def test_a_lone_surrogate_in_the_arguments_stays_escaped():
    """JSON may escape half a surrogate pair alone; as a character it is not UTF-8, so the
    arguments keep it escaped (a whole pair is its one character)."""
    parser = HermesParser()
    text = '<tool_call>{"name": "f", "arguments": {"a": "\\ud83d", "b": "\\ud83d\\ude00"}}'
    [call] = parser.read(text).calls
    assert call.arguments == '{"a": "\\ud83d", "b": "😀"}'
    assert json.loads(call.arguments) == {"a": "\ud83d", "b": "😀"}
    call.arguments.encode("utf-8")


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_json_nested_past_the_recursion_limit_is_the_models_text(name):
    """Python's json gives up on arrays nested past its recursion limit (a RecursionError):
    such a "call" is the model's text, like any that does not parse."""
    deep = "[" * 100_000
    for text in (f"<tool_call>{deep}</tool_call>", deep, f"[TOOL_CALLS]{deep}",
                 f"<tool_calls>{deep}</tool_calls>", f"<|tool_call|>{deep}"):  # fmt: skip
        parsed = PARSERS[name](SCHEMAS).read(text)
        if name == "glm45" and text.startswith("<tool_call>"):  # a call's name is one line
            assert parsed.calls == [Call(deep, "{}")]
            continue
        assert (parsed.content, parsed.calls) == (text, [])
