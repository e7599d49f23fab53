"""A reasoning model's thinking, split from its answer: vLLM's reasoning parsers
(`--reasoning-parser NAME`; here the app's `reasoning_parser`). The reply's reasoning goes to
the chat message's `reasoning` (vLLM's name) and `reasoning_content` (SGLang's and DeepSeek's),
or a Responses `reasoning` item; the rest is its content, which a tool-call parser then reads.

- `qwen3` (Qwen3, QwQ with thinking on): a reply that starts with `<think>` reasons until
  `</think>`; one that does not (thinking off: the template wrote an empty think block) is all
  answer.
- `deepseek_r1` (DeepSeek-R1, Qwen3 Thinking-2507, models whose template opens the think block
  in the prompt): the reply starts inside the reasoning (an optional `<think>` first) and
  answers after `</think>`; a reply that never closes it is all reasoning.
- `glm45` (GLM-4.5 / 4.6): as `qwen3`.
- `mistral` (Magistral): as `qwen3` with `[THINK]` and `[/THINK]`.

Streamed, reasoning and answer go out as they come, only a possible tag held until it is clear;
the pieces join to exactly what the whole reply gives.
"""

from __future__ import annotations

from dataclasses import dataclass

from app.tool_parsers import partial_tail


@dataclass
class Split:
    reasoning: str = ""
    content: str = ""

    def __iadd__(self, other: Split) -> Split:
        self.reasoning += other.reasoning
        self.content += other.content
        return self


class _ThinkParser:
    """One reply's parser: `feed` its pieces, then `end`; or `read` it whole."""

    START, END = "<think>", "</think>"
    OPENED = False  # the reply starts inside the reasoning: the template opened it

    def __init__(self) -> None:
        self._held = ""  # text not yet given out: the reply's start, or a possible end tag
        self._state = "start"  # then "reasoning" and "content", or "content"

    @classmethod
    def think_block(cls) -> tuple[str, tuple[str, str]]:
        """How a constrained reply's grammar starts (engine StructuredOutput's `thinking` and
        `think_tags`): inside the block, or optionally with a whole one."""
        return ("opened" if cls.OPENED else "optional"), (cls.START, cls.END)

    @classmethod
    def span(cls, text: str) -> tuple[int, int]:
        """Where a whole reply's reasoning lies in it, its tags left out: the reasoning `read`
        gives ends where the answer (and the end tag before it, if any) begins."""
        split = cls().read(text)
        before_answer = text[: len(text) - len(split.content)]
        end = len(before_answer) - (len(cls.END) if before_answer.endswith(cls.END) else 0)
        return end - len(split.reasoning), end

    def read(self, text: str) -> Split:
        out = self.feed(text)
        out += self.end()
        return out

    def feed(self, text: str) -> Split:
        self._held += text
        out = Split()
        if self._state == "start" and not self._started():
            return out
        if self._state == "reasoning":
            end = self._held.find(self.END)
            if end < 0:  # all but a tail that may begin the end tag is reasoning
                cut = len(self._held) - partial_tail(self._held, self.END)
                out.reasoning, self._held = self._held[:cut], self._held[cut:]
                return out
            out.reasoning = self._held[:end]
            self._held, self._state = self._held[end + len(self.END) :], "content"
        out.content, self._held = self._held, ""
        return out

    def end(self) -> Split:
        """The reply ended: what is held is reasoning or answer, as the state says."""
        text, self._held = self._held, ""
        reasoning = self._state == "reasoning" or (self._state == "start" and self.OPENED)
        return Split(text, "") if reasoning else Split("", text)

    def _started(self) -> bool:
        """Whether the reply's start tells reasoning from answer (then the state is set)."""
        head = self._held.lstrip()
        if head.startswith(self.START):
            self._held, self._state = head[len(self.START) :], "reasoning"
            return True
        if not head or self.START.startswith(head):  # whitespace, or what may become the tag
            return False
        self._state = "reasoning" if self.OPENED else "content"
        return True


class Qwen3Parser(_ThinkParser):
    OPENED = False


class DeepSeekR1Parser(_ThinkParser):
    OPENED = True


class MagistralParser(_ThinkParser):
    """Magistral: `[THINK]...[/THINK]` at the start of the reply (thinking is optional)."""

    START, END = "[THINK]", "[/THINK]"
    OPENED = False


def count_reasoning_tokens(parser: type[_ThinkParser], pieces: list[tuple[str, int]]) -> int:
    """A reply's reasoning tokens (usage's `reasoning_tokens`) from its pieces as the engine gave
    them: each step's new text and how many tokens made it. A piece counts when its text reaches
    into the reasoning, so the tags' own tokens do not (vLLM's count); tokens whose bytes show no
    text yet (part of a character) count with the piece whose text shows them."""
    start, end = parser.span("".join(text for text, _ in pieces))
    count = waiting = offset = 0
    for text, num_tokens in pieces:
        waiting += num_tokens
        if not text:
            continue
        if offset < end and offset + len(text) > start:
            count += waiting
        waiting, offset = 0, offset + len(text)
    return count


REASONING_PARSERS = {
    "qwen3": Qwen3Parser,
    "deepseek_r1": DeepSeekR1Parser,
    "glm45": Qwen3Parser,  # GLM-4.5 / 4.6: the same <think> block, which may be left out
    "mistral": MagistralParser,
}
