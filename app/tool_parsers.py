"""Tool calls in a model's free text, for tool_choice "auto": vLLM's tool-call parsers
(`--enable-auto-tool-choice --tool-call-parser NAME`; here the app's `tool_call_parser`).

- `hermes` (Hermes 2 Pro / 3, Qwen2.5 / Qwen3 and models trained on their format): each call is
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`; the last one may be left
  unclosed when the reply ends.
- `llama3_json` (Llama 3.1 / 3.2 / 3.3 JSON tool calling): the reply is one or more
  `{"name": ..., "parameters": {...}}` objects separated by `;`, after an optional
  `<|python_tag|>`; a reply that does not start that way is text.
- `mistral` (Mistral 7B v0.3, Mixtral, Mistral Nemo / Small with the Hugging Face tokenizer):
  `[TOOL_CALLS]` then a JSON array of `{"name": ..., "arguments": {...}}`; text before the
  marker is content.
- `pythonic` (Llama 3.2 with its pythonic template, Llama 4, ToolACE): the reply is a Python
  list of calls with literal keyword arguments, `[get_weather(city="Paris")]`, optionally
  between `<|python_start|>` and `<|python_end|>`.

A reply's content is its text outside the calls (whitespace between and after calls left out).
Streamed, content goes out as it comes except text that may begin a call, which is held until
it is clear; each call goes out whole once its end (or the reply's) is seen. A call that does
not parse (not JSON, no name, arguments not an object) is left as text, so nothing the model
wrote is lost. The same parser reads a whole reply (`read`) and a stream (`feed` ... `end`):
the streamed pieces join to exactly what the whole reply gives.
"""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text of an object


@dataclass
class Parsed:
    content: str = ""
    calls: list[Call] = field(default_factory=list)

    def __iadd__(self, other: Parsed) -> Parsed:
        self.content += other.content
        self.calls.extend(other.calls)
        return self


class _Parser:
    """One reply's parser: `feed` its pieces, then `end`; or `read` it whole."""

    called = False  # a call was found

    def read(self, text: str) -> Parsed:
        out = self.feed(text)
        out += self.end()
        return out

    def feed(self, text: str) -> Parsed:
        raise NotImplementedError

    def end(self) -> Parsed:
        raise NotImplementedError


class HermesParser(_Parser):
    START, END = "<tool_call>", "</tool_call>"

    def __init__(self) -> None:
        self._held = ""  # text not yet given out: a possible start tag, or a call's body
        self._inside = False  # after a start tag
        self._gap = ""  # whitespace after a call: content only if text follows it

    def feed(self, text: str) -> Parsed:
        """The next piece of a streamed reply -> what can be given out now."""
        self._held += text
        out = Parsed()
        while True:
            if self._inside:
                end = self._held.find(self.END)
                if end < 0:
                    return out
                self._close(self._held[:end], out)
                self._held = self._held[end + len(self.END) :]
                continue
            start = self._held.find(self.START)
            if start < 0:  # all but a tail that may begin a start tag is text
                keep = _partial_tail(self._held, self.START)
                self._text(self._held[: len(self._held) - keep], out)
                self._held = self._held[len(self._held) - keep :]
                return out
            self._text(self._held[:start], out)
            self._held, self._inside, self._gap = self._held[start + len(self.START) :], True, ""

    def end(self) -> Parsed:
        """The reply ended: an unclosed last call is read as it is; held text is content."""
        out = Parsed()
        if self._inside:
            self._close(self._held, out, closed=False)
        else:
            self._text(self._held, out)
        self._held, self._inside = "", False
        return out

    def _text(self, text: str, out: Parsed) -> None:
        if self.called and not text.strip():
            self._gap += text
            return
        out.content += self._gap + text
        self._gap = ""

    def _close(self, body: str, out: Parsed, closed: bool = True) -> None:
        self._inside = False
        call = _call(body, "arguments")
        if call is None:  # not a call after all: the model's text, tags and all
            self._text(self.START + body + (self.END if closed else ""), out)
            return
        out.calls.append(call)
        self.called, self._gap = True, ""


class _WholeReplyParser(_Parser):
    """A reply that is either all calls (it starts with `OPEN` or the `TAG` marker) or all
    text: text streams as it comes; calls are read whole at the reply's end."""

    TAG = ""
    OPEN = ""

    def __init__(self) -> None:
        self._held = ""
        self._mode: str | None = None  # "text" or "calls", once the reply's start tells

    def feed(self, text: str) -> Parsed:
        self._held += text
        if self._mode is None:
            head = self._held.lstrip()
            if not head or (_partial_tail(head, self.TAG) == len(head)):
                return Parsed()  # whitespace, or what may still become the tag
            self._mode = "calls" if head.startswith((self.OPEN, self.TAG)) else "text"
        if self._mode == "calls":
            return Parsed()
        out, self._held = Parsed(self._held), ""
        return out

    def end(self) -> Parsed:
        text, self._held = self._held, ""
        if self._mode != "calls":
            return Parsed(text)
        calls = self._calls(text.strip().removeprefix(self.TAG).strip())
        if calls is None:
            return Parsed(text)
        self.called = True
        return Parsed("", calls)

    def _calls(self, text: str) -> list[Call] | None:
        raise NotImplementedError


class Llama3JsonParser(_WholeReplyParser):
    TAG, OPEN = "<|python_tag|>", "{"

    def _calls(self, text: str) -> list[Call] | None:
        return _json_calls(text)


class PythonicParser(_WholeReplyParser):
    """`[get_weather(city="Paris"), get_time()]`: a Python list of calls with literal keyword
    arguments (Llama 3.2 with its pythonic template, Llama 4 between <|python_start|> and
    <|python_end|>, ToolACE); anything else, or a call with an argument that is not a literal,
    is text."""

    TAG, OPEN, END = "<|python_start|>", "[", "<|python_end|>"

    def _calls(self, text: str) -> list[Call] | None:
        try:
            tree = ast.parse(text.removesuffix(self.END).strip(), mode="eval").body
        except (SyntaxError, RecursionError):  # the model's text: anything may come
            return None
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)) or node.args:
                return None
            try:
                arguments = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
            except (ValueError, TypeError, RecursionError):  # not a literal
                return None
            if None in arguments:  # **kwargs
                return None
            calls.append(Call(node.func.id, json.dumps(arguments, ensure_ascii=False)))
        return calls


class MistralParser(_Parser):
    TAG = "[TOOL_CALLS]"

    def __init__(self) -> None:
        self._held = ""
        self._after = False  # past the marker: the calls, read whole at the end

    def feed(self, text: str) -> Parsed:
        self._held += text
        if self._after:
            return Parsed()
        start = self._held.find(self.TAG)
        if start >= 0:
            out, self._held, self._after = Parsed(self._held[:start]), self._held[start:], True
            return out
        keep = _partial_tail(self._held, self.TAG)
        out = Parsed(self._held[: len(self._held) - keep])
        self._held = self._held[len(self._held) - keep :]
        return out

    def end(self) -> Parsed:
        text, self._held = self._held, ""
        if not self._after:
            return Parsed(text)
        try:
            items = json.loads(text.removeprefix(self.TAG))
        except json.JSONDecodeError:
            return Parsed(text)
        items = items if isinstance(items, list) else [items]
        calls = [_as_call(item, ("arguments", "parameters")) for item in items]
        if not calls or None in calls:
            return Parsed(text)
        self.called = True
        return Parsed("", calls)


PARSERS = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
}


def _partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _call(body: str, *argument_keys: str) -> Call | None:
    try:
        item = json.loads(body)
    except json.JSONDecodeError:
        return None
    return _as_call(item, argument_keys)


def _as_call(item, argument_keys: tuple[str, ...]) -> Call | None:
    """{"name": str, <an argument key>: object} -> a Call; anything else None."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        return None
    arguments = next((item[k] for k in argument_keys if k in item), {})
    if not isinstance(arguments, dict):
        return None
    return Call(item["name"], json.dumps(arguments, ensure_ascii=False))


def _json_calls(text: str) -> list[Call] | None:
    """`{...}; {...}` -> the calls; None unless every part is one."""
    decoder, calls, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            item, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return None
        call = _as_call(item, ("parameters", "arguments"))
        if call is None:
            return None
        calls.append(call)
        rest = text[i:].lstrip()
        if rest.startswith(";"):
            rest = rest[1:].lstrip()
        elif rest:
            return None
        i = len(text) - len(rest)
    return calls or None
