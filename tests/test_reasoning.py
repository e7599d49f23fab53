"""Reasoning parsers (app/reasoning_parsers.py) and the replies they shape, pure: the thinking
split from the answer whole and streamed cut at every place, then in chat messages and deltas
(beside tool calls) and in a Responses reasoning item."""

from __future__ import annotations

import json
import random

import pytest

from app.formats import ChatFormat, Prompt, Shown
from app.reasoning_parsers import (
    DeepSeekR1Parser,
    MagistralParser,
    Qwen3Parser,
    Split,
    count_reasoning_tokens,
)
from app.tools import AutoToolCalls, ToolCalls
from engine import RequestOutput

pytestmark = pytest.mark.unit


def _streamed(parser_class, text: str, cuts: list[int]) -> Split:
    parser, joined, start = parser_class(), Split(), 0
    for cut in [*cuts, len(text)]:
        joined += parser.feed(text[start:cut])
        start = cut
    joined += parser.end()
    return joined


CASES = [  # (parser, reply, reasoning, content)
    (Qwen3Parser, "<think>\nParis is in France.\n</think>\n\nParis.", "\nParis is in France.\n",
     "\n\nParis."),
    (Qwen3Parser, "  <think>a</think>b", "a", "b"),
    (Qwen3Parser, "Paris.", "", "Paris."),  # thinking off: all answer
    (Qwen3Parser, "<think>cut short", "cut short", ""),
    (Qwen3Parser, "<thin", "", "<thin"),  # looked like the tag, was not
    (Qwen3Parser, "a <think>b</think>", "", "a <think>b</think>"),  # not at the start
    (Qwen3Parser, "<think></think>x", "", "x"),
    (Qwen3Parser, "<think>a</thin", "a</thin", ""),
    (DeepSeekR1Parser, "Let me think.\n</think>\n\nParis.", "Let me think.\n", "\n\nParis."),
    (DeepSeekR1Parser, "<think>\nHm.</think>Paris.", "\nHm.", "Paris."),
    (DeepSeekR1Parser, "never closed", "never closed", ""),
    (DeepSeekR1Parser, " ", " ", ""),
    (DeepSeekR1Parser, "a</think>b</think>c", "a", "b</think>c"),
    (MagistralParser, "[THINK]Hm.[/THINK]Paris.", "Hm.", "Paris."),
    (MagistralParser, "Paris. [THINK]", "", "Paris. [THINK]"),
]  # fmt: skip


@pytest.mark.parametrize(("parser_class", "text", "reasoning", "content"), CASES)
def test_thinking_is_split_alike_whole_and_streamed(parser_class, text, reasoning, content):
    whole = parser_class().read(text)
    assert (whole.reasoning, whole.content) == (reasoning, content)
    ways = [[k] for k in range(1, len(text))] + [list(range(1, len(text)))]
    rng = random.Random(0)
    ways += [sorted(rng.sample(range(1, len(text)), min(4, len(text) - 1))) for _ in range(20)]
    for cuts in ways:
        assert _streamed(parser_class, text, cuts) == whole, cuts


@pytest.mark.parametrize(("parser_class", "text", "reasoning", "content"), CASES)
def test_the_reasoning_s_span_is_where_read_finds_it(parser_class, text, reasoning, content):
    start, end = parser_class.span(text)
    assert text[start:end] == reasoning
    assert start == end or text[end:].endswith(content)  # the answer follows the reasoning


TOKEN_CASES = [  # (parser, the reply's pieces as (text, tokens), its reasoning tokens)
    # one token per tag: the tags' own tokens do not count
    (Qwen3Parser, [("<think>", 1), ("Let", 1), (" me", 1), ("</think>", 1), ("Hi", 1)], 2),
    # tags written in several tokens: none of them counts either
    (Qwen3Parser, [("<", 1), ("think", 1), (">", 1), ("Hm", 1), ("</", 1), ("think", 1),
                   (">", 1), ("x", 1)], 1),
    # a token with reasoning and the end tag's start is reasoning
    (Qwen3Parser, [("<think>", 1), ("ok.</", 1), ("think>", 1), ("Paris", 1)], 1),
    # bytes of one character in two tokens: both count, with the text they end in
    (Qwen3Parser, [("<think>", 1), ("", 1), ("é", 1), ("</think>", 1)], 2),
    (Qwen3Parser, [("Paris", 1), (".", 1)], 0),  # thinking off
    (Qwen3Parser, [("<think>", 1), ("</think>", 1), ("x", 1)], 0),  # an empty block
    (DeepSeekR1Parser, [("Hm", 1), (",", 1), (" so", 1)], 3),  # never closed: all reasoning
    (DeepSeekR1Parser, [("Hm", 1), ("</think>", 1), ("A", 1), ("", 1)], 1),  # the end's EOS
    (DeepSeekR1Parser, [("<think>Hm", 2), (" ok</think>A", 3)], 5),  # a piece of many tokens
    (MagistralParser, [("[THINK]", 1), ("a", 1), ("b", 1), ("[/THINK]", 1), ("c", 1)], 2),
]  # fmt: skip


@pytest.mark.parametrize(("parser_class", "pieces", "expected"), TOKEN_CASES)
def test_reasoning_tokens_are_the_tokens_of_the_reasoning_less_its_tags(
    parser_class, pieces, expected
):
    assert count_reasoning_tokens(parser_class, pieces) == expected


def test_chat_usage_counts_reasoning_tokens_streamed_as_whole():
    """usage.completion_tokens_details.reasoning_tokens (vLLM's, OpenAI's), only where a
    reasoning parser reads the replies; each of n choices counts its own."""
    texts = ["<think>", "Paris", " is", " in", " France.", "</think>", "\n", "Paris."]
    cases = (  # (parser, reply, its reasoning tokens whole and cut after three pieces)
        ("qwen3", texts, 4, 2),
        ("deepseek_r1", texts, 4, 2),  # the optional start tag, then as qwen3
        ("deepseek_r1", texts[1:], 4, 3),  # opened by the template
        ("qwen3", texts[1:], 0, 0),  # thinking off
        (None, texts, None, None),
    )
    for reasoning, reply, whole, cut in cases:
        view = ChatFormat("chatcmpl-1", "m", [Prompt([1])], 2, None, Shown())
        view.reasoning = reasoning
        for index, pieces in ((0, reply), (1, reply[:3])):
            for out in _outputs(pieces):
                view.add(index, out)
        usage = view.final()["usage"]
        assert usage["completion_tokens"] == len(reply) + 3
        assert view.usage_chunk()["usage"] == usage  # what the stream's last chunk says
        if reasoning is None:
            assert "completion_tokens_details" not in usage
        else:
            assert usage["completion_tokens_details"] == {"reasoning_tokens": whole + cut}


def test_joined_outputs_count_the_reasoning_tokens_of_their_steps():
    """A decode replica that batches its stream (stream_batching_interval_ms) joins steps'
    outputs: the tags' tokens and the end's EOS still do not count as reasoning."""
    texts = ["<think>", "Paris", " is", "</think>", "\n", "Paris.", ""]  # the last: EOS
    counts = []
    for groups in ([[o] for o in _outputs(texts)], [_outputs(texts)[:3], _outputs(texts)[3:]]):
        view = ChatFormat("chatcmpl-1", "m", [Prompt([1])], 1, None, Shown())
        view.reasoning = "qwen3"
        for group in groups:
            joined = group[0]
            for out in group[1:]:
                joined = joined.then(out)
            view.add(0, joined)
        counts.append(view.final()["usage"]["completion_tokens_details"]["reasoning_tokens"])
    assert counts == [2, 2]


def test_reasoning_streams_as_it_comes_holding_only_a_possible_tag():
    parser = Qwen3Parser()
    assert parser.feed("<thi") == Split()  # may be the start tag
    assert parser.feed("nk>Hm") == Split("Hm")
    assert parser.feed(" ok</th") == Split(" ok")  # "</th" may end it
    assert parser.feed("ink>Par") == Split("", "Par")
    assert parser.end() == Split()


def _outputs(texts: list[str]) -> list[RequestOutput]:
    last = len(texts) - 1
    return [
        RequestOutput("r", [1], t, 3, i + 1, "stop" if i == last else None)
        for i, t in enumerate(texts)
    ]


def _chat(
    texts: list[str], reasoning: str | None, tools=None, shows: bool = True
) -> tuple[dict, list[dict]]:
    """The final message and the streamed deltas of a reply in pieces; `shows`: vLLM's
    include_reasoning."""
    whole = ChatFormat("chatcmpl-1", "m", [Prompt([1])], 1, None, Shown())
    streamed = ChatFormat("chatcmpl-1", "m", [Prompt([1])], 1, None, Shown())
    deltas = []
    for view in (whole, streamed):
        view.tools, view.reasoning, view.shows_reasoning = tools, reasoning, shows
    for out in _outputs(texts):
        whole.add(0, out)
        streamed.add(0, out)
        deltas.append(streamed.chunk(0, out)["choices"][0]["delta"])
    return whole.final()["choices"][0], deltas


def test_include_reasoning_false_leaves_the_thinking_out():
    """vLLM's include_reasoning false: the same answer, with no reasoning in the message or
    the deltas; a reply that was all thinking has no content."""
    texts = ["<think>", "Paris is in", " France.</think>", "\n\nParis."]
    shown, _ = _chat(texts, "qwen3")
    choice, deltas = _chat(texts, "qwen3", shows=False)
    assert choice["message"] == {"role": "assistant", "content": shown["message"]["content"]}
    assert not any("reasoning" in d or "reasoning_content" in d for d in deltas)
    assert "".join(d.get("content", "") for d in deltas) == "\n\nParis."
    assert _chat(["<think>all", " thought"], "qwen3", shows=False)[0]["message"] == {
        "role": "assistant",
        "content": None,
    }


def test_chat_replies_carry_the_reasoning_apart_from_the_answer():
    choice, deltas = _chat(["<think>", "Paris is in", " France.</think>", "\n\nParis."], "qwen3")
    message = choice["message"]
    assert message["content"] == "\n\nParis."
    assert message["reasoning"] == message["reasoning_content"] == "Paris is in France."
    assert "".join(d.get("reasoning", "") for d in deltas) == message["reasoning"]
    assert "".join(d.get("content", "") for d in deltas) == message["content"]
    assert all(d.get("reasoning") == d.get("reasoning_content") for d in deltas)
    assert deltas[1] == {"reasoning": "Paris is in", "reasoning_content": "Paris is in"}
    # no parser: the tags are the answer's text; a reply that is all thinking has no content
    assert _chat(["<think>a</think>b"], None)[0]["message"] == {
        "role": "assistant", "content": "<think>a</think>b"
    }  # fmt: skip
    message = _chat(["Hm, let me", " see"], "deepseek_r1")[0]["message"]
    assert (message["content"], message["reasoning"]) == (None, "Hm, let me see")
    message = _chat(["Paris."], "qwen3")[0]["message"]
    assert (message["content"], message["reasoning"]) == ("Paris.", None)


def test_a_tool_call_after_the_reasoning_is_found_in_the_answer():
    call = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    texts = ["<think>Need the ", "weather.</think>", "\n", call[:20], call[20:]]
    choice, deltas = _chat(texts, "qwen3", AutoToolCalls("hermes"))
    message = choice["message"]
    assert message["reasoning"] == "Need the weather." and choice["finish_reason"] == "tool_calls"
    [tool_call] = message["tool_calls"]
    assert json.loads(tool_call["function"]["arguments"]) == {"city": "Paris"}
    assert message["content"] == "\n"
    streamed = [c for d in deltas for c in d.get("tool_calls", ())]
    assert [c["function"] for c in streamed] == [tool_call["function"]]
    # a <tool_call> inside the thinking is not a call
    choice, _ = _chat(["<think>", call, "</think>No call."], "qwen3", AutoToolCalls("hermes"))
    assert choice["message"]["reasoning"] == call and "tool_calls" not in choice["message"]


def test_a_forced_call_after_the_reasoning_is_the_answer():
    """With a reasoning parser a constraint shapes the answer after the thinking (engine
    side: tests/test_structured_output.py); the forced call is read from the answer alone."""
    texts = ["<think>Need", " it.</think>", '{"city":', '"Paris"}']
    choice, deltas = _chat(texts, "qwen3", ToolCalls("get_weather"))
    message = choice["message"]
    assert message["reasoning"] == "Need it." and message["content"] is None
    [call] = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}
    streamed = [c for d in deltas for c in d.get("tool_calls", ())]
    assert streamed[0]["function"]["name"] == "get_weather" and "id" in streamed[0]
    assert all("id" not in c for c in streamed[1:])
    assert "".join(c["function"]["arguments"] for c in streamed) == '{"city":"Paris"}'
    required = ["<think>Hm.</think>", '[{"name":"get_weather",', '"parameters":{"city":"Lyon"}}]']
    choice, deltas = _chat(required, "qwen3", ToolCalls(None))
    [call] = choice["message"]["tool_calls"]
    assert json.loads(call["function"]["arguments"]) == {"city": "Lyon"}
    assert [len(d.get("tool_calls", ())) for d in deltas] == [0, 0, 1]


def test_an_earlier_turns_reasoning_reaches_the_template():
    """Sent back under either name, the thinking is the template's reasoning_content (what
    Qwen3's, DeepSeek-R1's and GLM's templates read)."""
    from app.protocol import ChatMessage

    for name in ("reasoning", "reasoning_content"):
        message = ChatMessage(role="assistant", content="Paris.", **{name: "Hm."})
        assert message.for_template() == {
            "role": "assistant", "content": "Paris.", "reasoning_content": "Hm."
        }  # fmt: skip
    assert "reasoning_content" not in ChatMessage(role="user", content="x").for_template()
