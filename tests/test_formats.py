"""The completions body with echo and logprobs, from hand-made engine outputs (no model, no Ray):
the prompt's logprobs lead, the first token's null, offsets run over prompt then completion, and
the streamed chunks add up to the final body."""

from __future__ import annotations

import dataclasses

import pytest

from app.formats import ChatFormat, CompletionFormat, Prompt, Shown
from app.logprobs import MIN_LOGPROB
from engine import RequestOutput, TokenLogprob

pytestmark = pytest.mark.unit

TEXTS = {1: "The", 2: " cat", 3: " sat", 4: " on", 5: " mat", 6: "."}
PROMPT = [1, 2, 3]
SCORED = [None, TokenLogprob(2, -2.5, ((4, -1.0),)), TokenLogprob(3, -0.5, ((3, -0.5),))]


def _outputs() -> list[RequestOutput]:
    first = RequestOutput(
        "r", [4], " on", 3, 1, logprobs=[TokenLogprob(4, -0.1, ((4, -0.1),))],
        prompt_logprobs=SCORED,
    )  # fmt: skip
    last = RequestOutput(
        "r", [5], " mat", 3, 2, "length", logprobs=[TokenLogprob(5, float("-inf"), ((6, -0.2),))]
    )
    return [first, last]


ECHO_SCORES = Shown(logprobs=1, echo_scores=True)


def _format(n: int = 1, shown: Shown = ECHO_SCORES) -> CompletionFormat:
    echoed = [Prompt(PROMPT, "The cat sat")]
    return CompletionFormat("cmpl-1", "m", echoed, n, TEXTS.__getitem__, shown)


def test_echo_with_logprobs_leads_with_the_prompt_and_offsets_run_on():
    view = _format()
    for out in _outputs():
        view.add(0, out)
    [choice] = view.final()["choices"]
    assert choice["text"] == "The cat sat on mat"
    lp = choice["logprobs"]
    assert lp["tokens"] == ["The", " cat", " sat", " on", " mat"]
    assert lp["token_logprobs"] == [None, -2.5, -0.5, -0.1, MIN_LOGPROB]
    assert lp["top_logprobs"][:2] == [None, {" on": -1.0, " cat": -2.5}]
    assert lp["top_logprobs"][4] == {".": -0.2, " mat": MIN_LOGPROB}
    assert lp["text_offset"] == [0, 3, 7, 11, 14]


def test_streamed_chunks_add_up_to_the_final_body_for_each_choice():
    view = _format(n=2)
    chunks = {0: [], 1: []}
    for out in _outputs():
        for index in (1, 0):  # interleaved choices keep their own offsets
            view.add(index, out)
            chunks[index].append(view.chunk(index, out)["choices"][0]["logprobs"])
    final = view.final()["choices"]
    for index in (0, 1):
        streamed = chunks[index]
        assert streamed[0]["tokens"][:3] == ["The", " cat", " sat"]  # only the first leads
        assert streamed[1]["tokens"] == [" mat"]
        for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert sum((c[key] for c in streamed), []) == final[index]["logprobs"][key]


def test_echo_without_logprobs_has_none_and_logprobs_without_echo_no_prompt():
    view = CompletionFormat("cmpl-1", "m", [Prompt(PROMPT, "The cat sat")], 1, None, Shown())
    for out in _outputs():
        view.add(0, out)
    assert view.final()["choices"][0]["logprobs"] is None
    plain = CompletionFormat("cmpl-1", "m", [Prompt(PROMPT)], 1, TEXTS.__getitem__, Shown(1))
    for out in _outputs():
        plain.add(0, dataclasses.replace(out, prompt_logprobs=None))  # none asked: none come
    lp = plain.final()["choices"][0]["logprobs"]
    assert lp["tokens"] == [" on", " mat"] and lp["text_offset"] == [0, 3]


def test_a_batch_numbers_choices_prompt_by_prompt_and_counts_each_prompt_once():
    """Two prompts, n=2: choice i * n + j is prompt i's j-th; each echoes its own prompt."""
    prompts = [Prompt(PROMPT, "The cat sat"), Prompt([2, 3], " cat sat")]
    view = CompletionFormat("cmpl-1", "m", prompts, 2, TEXTS.__getitem__, ECHO_SCORES)
    chunks = {}
    for out in _outputs():
        second = (
            out
            if out.prompt_logprobs is None
            else dataclasses.replace(out, prompt_logprobs=[None, SCORED[2]])
        )  # the second prompt's own scores
        for index in (3, 0, 2, 1):
            view.add(index, out if index < 2 else second)
            chunks.setdefault(index, []).append(view.chunk(index, out)["choices"][0])
    body = view.final()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts == ["The cat sat on mat"] * 2 + [" cat sat on mat"] * 2
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 8, "total_tokens": 13}
    for index, streamed in chunks.items():
        assert "".join(c["text"] for c in streamed) == texts[index]
    # the second prompt's scores are its own: its tokens lead, from offset 0
    lp = body["choices"][2]["logprobs"]
    assert lp["tokens"] == [" cat", " sat", " on", " mat"]
    assert lp["token_logprobs"][:3] == [None, -0.5, -0.1]
    assert lp["text_offset"] == [0, 4, 8, 11]


def test_chat_bodies_have_no_echo_and_count_the_prompt_once():
    view = ChatFormat("chatcmpl-1", "m", [Prompt(PROMPT)], 2, None, Shown())
    for out in _outputs():
        for index in (0, 1):
            view.add(index, dataclasses.replace(out, prompt_logprobs=None))
    body = view.final()
    assert [c["message"]["content"] for c in body["choices"]] == [" on mat"] * 2
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_chat_echo_leads_each_choice_with_the_assistants_last_message():
    """vLLM's chat echo: the continued message leads the content, streamed and final, once."""
    view = ChatFormat("chatcmpl-1", "m", [Prompt(PROMPT, "Sure,")], 2, None, Shown())
    chunks = {0: [], 1: []}
    for out in _outputs():
        for index in (0, 1):
            shown = view.add(index, dataclasses.replace(out, prompt_logprobs=None))
            chunks[index].append(view.chunk(index, shown)["choices"][0]["delta"])
    body = view.final()
    assert [c["message"]["content"] for c in body["choices"]] == ["Sure, on mat"] * 2
    for deltas in chunks.values():
        assert deltas[0] == {"role": "assistant", "content": "Sure, on"}
        assert "".join(d["content"] for d in deltas) == "Sure, on mat"
    assert body["usage"]["prompt_tokens"] == 3  # the echo is prompt, not completion


def test_usage_reports_cached_prompt_tokens_once_per_prompt():
    """OpenAI's usage.prompt_tokens_details.cached_tokens, only when the cache served some."""
    view = CompletionFormat("c", "m", [Prompt(PROMPT), Prompt([1, 2])], 2, None, Shown())
    first = _outputs()[0]
    for index, cached in ((0, 2), (1, 2), (2, 0), (3, 1)):  # prompt 0's choices, prompt 1's
        view.add(index, dataclasses.replace(first, num_cached_tokens=cached))
    assert view.usage["prompt_tokens_details"] == {"cached_tokens": 2}  # by first choices
    plain = CompletionFormat("c", "m", [Prompt(PROMPT)], 1, None, Shown())
    plain.add(0, first)
    assert "prompt_tokens_details" not in plain.usage


def test_echo_with_max_tokens_zero_shows_the_prompt_alone():
    """vLLM's echo with max_tokens 0: the engine's one token is neither text, logprobs nor
    usage; the reason is the length limit; streamed = final."""
    view = _format(shown=dataclasses.replace(ECHO_SCORES, generated=False))
    first = _outputs()[0]
    shown = view.add(0, dataclasses.replace(first, finish_reason="stop"))
    chunk = view.chunk(0, shown)["choices"][0]
    [choice] = view.final()["choices"]
    assert choice["text"] == chunk["text"] == "The cat sat"
    assert choice["finish_reason"] == chunk["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == chunk["logprobs"]["tokens"] == ["The", " cat", " sat"]
    assert view.usage["completion_tokens"] == 0


def test_vllm_prompt_logprobs_field_per_choice_and_beside_chat_choices():
    """The prompt's token and its k most likely, keyed by token id, with rank and text; the
    echo's lists keep their own k."""
    scored = [
        None,
        TokenLogprob(2, -2.5, ((4, -1.0), (2, -2.5)), 2),
        TokenLogprob(3, -0.5, ((3, -0.5), (6, -3.0)), 1),
    ]
    first = dataclasses.replace(_outputs()[0], prompt_logprobs=scored)
    view = _format(shown=dataclasses.replace(ECHO_SCORES, prompt_logprobs=2))
    view.add(0, first)
    [choice] = view.final()["choices"]
    assert choice["prompt_logprobs"] == [
        None,
        {
            "2": {"logprob": -2.5, "rank": 2, "decoded_token": " cat"},
            "4": {"logprob": -1.0, "rank": 1, "decoded_token": " on"},
        },
        {
            "3": {"logprob": -0.5, "rank": 1, "decoded_token": " sat"},
            "6": {"logprob": -3.0, "rank": 2, "decoded_token": "."},
        },
    ]
    assert choice["logprobs"]["top_logprobs"][1] == {" on": -1.0, " cat": -2.5}  # k=1 + token
    plain = _format(shown=Shown(prompt_logprobs=0))  # the token alone; no logprobs lists
    plain.add(0, first)
    [choice] = plain.final()["choices"]
    assert choice["logprobs"] is None
    assert [list(p) if p else p for p in choice["prompt_logprobs"]] == [None, ["2"], ["3"]]
    chat = ChatFormat(
        "chatcmpl-1", "m", [Prompt(PROMPT)], 1, TEXTS.__getitem__, Shown(prompt_logprobs=2)
    )
    chat.add(0, first)
    body = chat.final()
    assert body["prompt_logprobs"] == view.final()["choices"][0]["prompt_logprobs"]
    assert "prompt_logprobs" not in body["choices"][0]


def test_joined_outputs_are_one_delta():
    """RequestOutput.then (stream batching): two deltas joined carry both in order; the first's
    own fields stay, the counts and the end are the later's."""
    lp = [TokenLogprob(5, -0.5, ((5, -0.5),), 1), TokenLogprob(6, -1.5, ((7, -0.2),), 2)]
    first = RequestOutput("r", [5], " a", 3, 1, queue_time_s=0.25, prefill_time_s=0.5,
                          num_cached_tokens=2, logprobs=lp[:1])  # fmt: skip
    later = RequestOutput("r", [6], " b", 3, 2, finish_reason="length", logprobs=lp[1:])
    joined = first.then(later)
    assert (joined.new_token_ids, joined.new_text, joined.logprobs) == ([5, 6], " a b", lp)
    assert (joined.queue_time_s, joined.prefill_time_s, joined.num_cached_tokens) == (0.25, 0.5, 2)
    assert (joined.num_output_tokens, joined.finish_reason) == (2, "length")
    assert first.then(dataclasses.replace(later, logprobs=None)).logprobs == lp[:1]
    # each step's text and tokens stay readable (reasoning tokens are counted per step)
    eos = RequestOutput("r", [2], "", 3, 3, finish_reason="stop")
    three = first.then(dataclasses.replace(later, finish_reason=None)).then(eos)
    assert three.pieces == [(" a", 1), (" b", 1), ("", 1)] and first.pieces == [(" a", 1)]
    with pytest.raises(ValueError, match="cannot join"):
        joined.then(later)  # after the end
    with pytest.raises(ValueError, match="cannot join"):
        first.then(dataclasses.replace(later, request_id="other"))
