"""Token logprobs in OpenAI's two shapes: the completions API's parallel lists and the chat
API's list of token objects. Pure functions over engine.TokenLogprob; the ingress owns them."""

from __future__ import annotations

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
    prompt_ids: list[int], entries: list[TokenLogprob | None], text_of: Callable[[int], str]
) -> dict:
    """The completions `logprobs` lists of an echoed prompt, from offset 0: its first token
    has no logprob (null, as OpenAI gives it); the rest are the engine's prompt logprobs."""
    head = text_of(prompt_ids[0])
    rest = completion_logprobs([e for e in entries[1:] if e is not None], text_of, len(head))
    return {
        "tokens": [head, *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


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
