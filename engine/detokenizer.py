"""Incremental detokenization with stop strings.

Text is decoded over a sliding window of token ids and a piece is released only when it no
longer ends in an incomplete UTF-8 sequence (U+FFFD), so multi-byte characters split across
tokens stream correctly. While stop strings are set, the last (longest stop - 1) characters are
held back, so a client never sees the beginning of a stop string that is then cut.
"""

from __future__ import annotations

from dataclasses import dataclass

_CONTEXT_TOKENS = 5  # prompt tokens decoded with the first output for correct leading spaces


@dataclass
class DetokenizerState:
    """Small and picklable: travels with a request from a prefill replica to a decode replica."""

    prefix_offset: int
    read_offset: int
    output_text: str = ""
    num_emitted: int = 0  # characters of output_text already returned to the caller

    @classmethod
    def for_prompt(cls, num_prompt_tokens: int) -> DetokenizerState:
        return cls(max(0, num_prompt_tokens - _CONTEXT_TOKENS), num_prompt_tokens)


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        stop: tuple[str, ...],
        include_stop: bool,
        state: DetokenizerState,
        skip_special_tokens: bool = True,
    ):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = stop
        self.include_stop = include_stop
        self.state = state
        self.holdback = max((len(s) for s in stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, all_token_ids: list[int], may_stop: bool = True) -> bool:
        """Decode the newest token into output_text; True when a stop string was found (never
        while `may_stop` is False: the text is kept whole)."""
        st = self.state
        prefix = self._decode(all_token_ids[st.prefix_offset : st.read_offset])
        text = self._decode(all_token_ids[st.prefix_offset :])
        if len(text) <= len(prefix) or text.endswith("\ufffd"):
            return False  # incomplete character: wait for the next token
        new_text = text[len(prefix) :]
        st.prefix_offset, st.read_offset = st.read_offset, len(all_token_ids)
        search_from = max(0, len(st.output_text) - self.holdback)
        st.output_text += new_text
        return may_stop and self._truncate_at_stop(search_from)

    def _truncate_at_stop(self, search_from: int) -> bool:
        text = self.state.output_text
        hits = [(i, s) for s in self.stop if (i := text.find(s, search_from)) >= 0]
        if not hits:
            return False
        i, s = min(hits)
        self.state.output_text = text[: i + len(s)] if self.include_stop else text[:i]
        return True

    def take_new_text(self, finished: bool) -> str:
        """Characters not yet returned, minus the stop-string hold-back unless finished."""
        st = self.state
        end = (
            len(st.output_text)
            if finished or not self.stop
            else len(st.output_text) - self.holdback
        )
        if end <= st.num_emitted:
            return ""
        piece = st.output_text[st.num_emitted : end]
        st.num_emitted = end
        return piece
