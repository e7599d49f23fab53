"""Tool-call parsers (app/tool_parsers.py), pure: what a whole reply gives, and a stream cut at
every place (and at random places) joining to exactly that."""

from __future__ import annotations

import json
import random

import pytest

from app.tool_parsers import (
    Call,
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    Parsed,
    PythonicParser,
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
]  # fmt: skip


def test_hermes_streams_text_at_once_and_holds_only_a_possible_tag():
    joined, pieces = _streamed(HermesParser, f"Hi there <tool_call>{WEATHER}</tool_call>", [3, 11])
    assert [p.content for p in pieces[:2]] == ["Hi ", "there "]  # "<" of a tag waited
    assert pieces[2].calls == [PARIS] and joined.content == "Hi there "
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
    ('{"name": "f", "parameters": {}} and more', '{"name": "f", "parameters": {}} and more',
     []),
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
    ('[TOOL_CALLS][{"name": "f"}, 3]', '[TOOL_CALLS][{"name": "f"}, 3]', []),
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


@pytest.mark.parametrize(
    ("parser_class", "text", "content", "calls"),
    [(HermesParser, *c) for c in HERMES_CASES]
    + [(Llama3JsonParser, *c) for c in LLAMA3_JSON_CASES]
    + [(MistralParser, *c) for c in MISTRAL_CASES]
    + [(PythonicParser, *c) for c in PYTHONIC_CASES],
)
def test_each_parser_reads_calls_alike_whole_and_streamed(parser_class, text, content, calls):
    parsed = _every_way(parser_class, text)
    assert (parsed.content, parsed.calls) == (content, calls)
