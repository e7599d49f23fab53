"""Speculative decoding: its config, and n-gram (prompt lookup) drafts, as vLLM's `method:
ngram` (a draft model's drafts, `method: draft_model`, are engine/draft_model.py's).

A decoding request whose last n tokens (n from prompt_lookup_max down to prompt_lookup_min)
occurred before in its prompt or output proposes the tokens that followed their latest
occurrence as drafts. One forward then computes its pending token and the drafts, and the
sampler draws a token at each of those positions. The drafts are kept up to the first one that
differs from the draw at its position, and that draw follows them: a step yields between 1
and k + 1 tokens.

The draws are the target model's own, so the output is distributed exactly as without
speculation, greedy or sampled: a draft is a single token (a one-hot proposal), for which
speculative sampling's rule (keep the draft d with probability p(d), else draw from p without
d) is the same as drawing x from p and keeping d when x = d, otherwise taking x. Each position
is drawn with the request's penalties and min_tokens as if the drafts before it were already
its output. Pure Python and numpy: no torch, no Ray.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.request import Request

METHODS = ("ngram", "draft_model")


@dataclass(frozen=True)
class SpeculativeConfig:
    """vLLM's --speculative-config for `method: ngram` and `method: draft_model`. Unset, the
    method is vLLM's guess: draft_model where a `model` is named, else ngram. Unset lookup
    bounds follow vLLM: both unset are 5, one unset takes the other's value."""

    num_speculative_tokens: int
    method: str | None = None
    prompt_lookup_min: int | None = None
    prompt_lookup_max: int | None = None
    # vLLM's: no drafts while more than this many requests decode (a large batch's step is
    # long already, and every draft lengthens it for all); None: drafts at any batch size
    disable_by_batch_size: int | None = None
    # draft_model's: the draft (a directory or Hub id; its vocabulary the target's) and the
    # Hub revision of it
    model: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        if self.method is None:
            object.__setattr__(self, "method", "draft_model" if self.model else "ngram")
        if self.method not in METHODS:
            raise ValueError(f"speculative method must be one of {METHODS}, got {self.method!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError("num_speculative_tokens must be >= 1")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 2:
            raise ValueError("disable_by_batch_size must be >= 2")
        if (self.method == "draft_model") != (self.model is not None):
            raise ValueError("speculative model: method draft_model needs one, ngram takes none")
        if self.method == "ngram":
            self._lookup_bounds()

    def _lookup_bounds(self) -> None:
        low = self.prompt_lookup_min or self.prompt_lookup_max or 5
        high = self.prompt_lookup_max or low
        if not 1 <= low <= high:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {low} and {high}"
            )
        object.__setattr__(self, "prompt_lookup_min", low)
        object.__setattr__(self, "prompt_lookup_max", high)


class NgramProposer:
    """Drafts for each decoding request; keeps each request's tokens as a numpy array that grows
    by what it appended since, so a step costs a vectorized search, not a list conversion."""

    def __init__(self, config: SpeculativeConfig) -> None:
        self.config = config
        self._tokens: dict[str, tuple[np.ndarray, int]] = {}  # request id -> (buffer, length)

    def propose_all(self, items: list[tuple[Request, int]]) -> list[list[int]]:
        """Each (request, limit)'s drafts: at most `limit` of them."""
        return [
            self.propose(r.request_id, r.prompt_token_ids, r.output_token_ids, limit)
            for r, limit in items
        ]

    def propose(
        self, request_id: str, prompt: list[int], output: list[int], limit: int
    ) -> list[int]:
        """At most min(limit, num_speculative_tokens) drafts for the request whose tokens so
        far are prompt + output."""
        limit = min(limit, self.config.num_speculative_tokens)
        if limit <= 0:
            return []
        tokens = self._grown(request_id, prompt, output)
        return ngram_drafts(
            tokens, limit, self.config.prompt_lookup_min, self.config.prompt_lookup_max
        )

    def forget(self, request_id: str) -> None:
        self._tokens.pop(request_id, None)

    def _grown(self, request_id: str, prompt: list[int], output: list[int]) -> np.ndarray:
        total = len(prompt) + len(output)
        buffer, length = self._tokens.get(request_id, (np.empty(0, np.int64), 0))
        if length > total:  # not this request's tokens any more (an id reused): start over
            length = 0
        if total > len(buffer):
            grown = np.empty(max(total, 2 * len(buffer)), np.int64)
            grown[:length] = buffer[:length]
            buffer = grown
        if length < len(prompt):
            buffer[length : len(prompt)] = prompt[length:]
            length = len(prompt)
        buffer[length:total] = output[length - len(prompt) :]
        self._tokens[request_id] = (buffer, total)
        return buffer[:total]


def ngram_drafts(tokens: np.ndarray, k: int, n_min: int, n_max: int) -> list[int]:
    """The up to k tokens that followed the latest earlier occurrence of the longest suffix of
    `tokens` of n_min..n_max tokens that occurred before; [] when none did."""
    size = len(tokens)
    for n in range(min(n_max, size - 1), n_min - 1, -1):
        # windows starting at 0 .. size - n - 1: each is followed by at least one token
        windows = np.lib.stride_tricks.sliding_window_view(tokens[: size - 1], n)
        hits = np.flatnonzero((windows == tokens[size - n :]).all(axis=1))
        if len(hits):
            start = int(hits[-1]) + n
            return tokens[start : start + k].tolist()
    return []
