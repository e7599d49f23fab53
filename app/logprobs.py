"""Token logprobs in OpenAI's two shapes: the completions API's parallel lists and the chat
API's list of token objects. Pure functions over engine.TokenLogprob; the ingress owns them."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from engine.outputs import TokenLogprob

# JSON has no -inf; a token the model gives no chance at all is reported as this (vLLM's value)
MIN_LOGPROB = -9999.0


class TokenTexts:
    """Token id -> its text on its own, decoded once per id."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


def _finite(logprob: float) -> float:
    return max(logprob, MIN_LOGPROB)


def completion_logprobs(
    entries: list[TokenLogprob], text_of: Callable[[int], str], offset: int = 0
) -> dict:
    """The legacy completions `logprobs` object; `offset`: the text length already sent (a
    stream's earlier chunks), where this chunk's first token starts."""
    tokens = [text_of(e.token_id) for e in entries]
    offsets = []
    for text in tokens:
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": [_finite(e.logprob) for e in entries],
        # the k most likely and, as OpenAI does, the sampled token when it is not among them
        "top_logprobs": [
            {text_of(i): _finite(lp) for i, lp in (*e.top, (e.token_id, e.logprob))}
            for e in entries
        ],
        "text_offset": offsets,
    }


def echoed_prompt_logprobs(
    prompt_ids: list[int],
    entries: list[TokenLogprob | None],
    text_of: Callable[[int], str],
    k: int,
) -> dict:
    """The completions `logprobs` lists of an echoed prompt, from offset 0, with k alternatives
    per token: its first token has no logprob (null, as OpenAI gives it); the rest are the
    engine's prompt logprobs."""
    head = text_of(prompt_ids[0])
    scored = [dataclasses.replace(e, top=e.top[:k]) for e in entries[1:] if e is not None]
    rest = completion_logprobs(scored, text_of, len(head))
    return {
        "tokens": [head, *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


def vllm_prompt_logprobs(
    entries: list[TokenLogprob | None], text_of: Callable[[int], str], k: int
) -> list[dict | None]:
    """vLLM's `prompt_logprobs` field: per prompt token, None for the first, else {token id:
    {logprob, rank, decoded_token}} for the prompt's token and the k most likely."""
    out: list[dict | None] = []
    for e in entries:
        if e is None:
            out.append(None)
            continue
        ranked = [(e.token_id, e.logprob, e.rank)]
        ranked += [(i, lp, place) for place, (i, lp) in enumerate(e.top[:k], 1) if i != e.token_id]
        out.append(
            {
                str(i): {"logprob": _finite(lp), "rank": rank, "decoded_token": text_of(i)}
                for i, lp, rank in ranked
            }
        )
    return out


def joined(first: dict, then: dict) -> dict:
    """Two completions `logprobs` objects, one after the other."""
    return {key: first[key] + then[key] for key in first}


def _chat_token(token_id: int, logprob: float, text_of: Callable[[int], str]) -> dict:
    text = text_of(token_id)
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprob], text_of: Callable[[int], str]) -> dict:
    """The chat `logprobs` object: one entry per token with its top_logprobs."""
    content = [
        {
            **_chat_token(e.token_id, e.logprob, text_of),
            "top_logprobs": [_chat_token(i, lp, text_of) for i, lp in e.top],
        }
        for e in entries
    ]
    return {"content": content, "refusal": None}
