"""Tool calls in JSON read as the model writes them, so that their arguments can stream.

`CallsStream` takes the text of call objects, `{"name": ..., "arguments": {...}}` (one, an
array of them, or several in a row, as a parser's format has them), in pieces. Once a call's
name is whole and its arguments' object has begun, the call is known; from then on its
`arguments` grow with the arguments' object as `dumps` writes it (the form a whole call's
arguments are given in), as far as it is certain: a string as its characters come, a number
once it ends. So the pieces a stream gives join to what the whole text gives, wherever it was
cut.

Text that is not JSON, or an item that is not a call, stops the reading where it starts: what
was given stays given (a stream cannot take it back), and the rest is not read.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

_SURROGATE = re.compile("[\ud800-\udfff]")  # left alone after json.loads: lone ones
_WHITESPACE = " \t\n\r"
_SCALAR = set("-+.0123456789eEtruefalsnNaIiy")  # numbers, true / false / null, NaN, Infinity
_ESCAPES = set('"\\/bfnrt')
_HEX = set("0123456789abcdefABCDEF")


class _Lexer:
    """JSON tokens from text fed in pieces: ("{" | "}" | "[" | "]" | ":" | ","), ('"',) at a
    string's start, ("s", decoded text) for each certain piece of it and ('"',) again at its
    end, ("v", canonical text) for a number or literal. `failed` once the text is not JSON."""

    def __init__(self, punctuation: str = "") -> None:
        self.failed = False
        self._punctuation = "{}[]:," + punctuation  # a format's own (llama3_json's ";")
        self._string = False  # inside a string
        self._raw = ""  # a string's text not yet decoded (whole escapes), or a scalar's
        self._escape = ""  # an escape being read, from its backslash
        self._high = False  # the string's raw text ends with a high surrogate's escape

    def feed(self, text: str) -> list[tuple[str, ...]]:
        tokens: list[tuple[str, ...]] = []
        for ch in text:
            if self.failed:
                break
            if self._string:
                self._string_char(ch, tokens)
            else:
                self._token_char(ch, tokens)
        if self._string:  # also where it failed: the same pieces wherever the text was cut
            # a low surrogate's escape may follow a high one: they decode to one character
            self._flush(tokens, len(self._raw) - 6 * self._high)
        return tokens

    def _token_char(self, ch: str, tokens: list) -> None:
        if ch in _SCALAR:
            self._raw += ch
            return
        if self._raw:  # a scalar ends here
            self._scalar(tokens)
        if self.failed:
            return
        if ch in self._punctuation:
            tokens.append((ch,))
        elif ch == '"':
            self._string = True
            tokens.append(('"',))
        elif ch not in _WHITESPACE:
            self.failed = True

    def _scalar(self, tokens: list) -> None:
        try:
            value = json.loads(self._raw)
        except json.JSONDecodeError:
            self.failed = True
            return
        self._raw = ""
        tokens.append(("v", json.dumps(value)))

    def _string_char(self, ch: str, tokens: list) -> None:
        if ch < " ":  # a raw control character: json.loads refuses it
            self.failed = True
        elif self._escape:
            self._escape_char(ch)
        elif ch == "\\":
            self._escape = ch
        elif ch == '"':
            self._flush(tokens, len(self._raw))
            self._string = self._high = False
            tokens.append(('"',))
        else:
            self._raw += ch
            self._high = False

    def _escape_char(self, ch: str) -> None:
        unicode = self._escape[1:2] == "u"
        if not (ch in _HEX if unicode else ch in _ESCAPES or ch == "u"):
            self.failed = True
            return
        self._escape += ch
        if len(self._escape) == (6 if self._escape[1] == "u" else 2):  # whole
            self._high = len(self._escape) == 6 and 0xD800 <= int(self._escape[2:], 16) < 0xDC00
            self._raw += self._escape
            self._escape = ""

    def _flush(self, tokens: list, cut: int) -> None:
        """Decode the string's raw text up to `cut`."""
        if cut > 0:
            tokens.append(("s", json.loads(f'"{self._raw[:cut]}"')))
            self._raw = self._raw[cut:]


@dataclass
class StreamedCall:
    name: str | None = None  # once its string is whole
    arguments: str = ""  # as `dumps` writes them, as far as certain
    started: bool = False  # its arguments' object has begun
    ended: bool = False  # its object is whole

    @property
    def known(self) -> bool:
        """It is a call: named, and its arguments begun (or it ended without any: {})."""
        return bool(self.name) and (self.started or self.ended)


class CallsStream:
    """Tool calls written as JSON call objects, `{"name": ..., <an argument key>: {...}}`, fed
    in pieces: `calls` as they are read. What a parser's format allows: bare call objects
    (`objects`), an array of them (`array`), more than one top-level value (`many`), with
    `separator` between them. An item that is not a call (no name, arguments not an object)
    stops the reading there."""

    def __init__(
        self,
        argument_keys: tuple[str, ...],
        *,
        objects: bool = True,
        array: bool = False,
        many: bool = False,
        separator: str = "",
    ) -> None:
        self.argument_keys, self.calls = argument_keys, []
        self.objects, self.array, self.many, self.separator = objects, array, many, separator
        self._failed = False
        self._lexer = _Lexer(separator)
        self._stack: list[str] = []  # open containers: "{" or "["
        self._expect = "value"  # what may come next: see _grammar
        self._depth = 0  # the open call object's (len(_stack) inside it); 0: none open
        self._key: str | None = None  # the call object's key last read
        self._text: str | None = None  # a string being read in the call object
        self._string_is_key = False
        self._in_arguments = False

    @property
    def failed(self) -> bool:
        """The text went wrong (not JSON, or not calls) where the reading stopped."""
        return self._failed or self._lexer.failed

    @property
    def _call(self) -> StreamedCall:
        return self.calls[-1]

    def feed(self, text: str) -> None:
        for token in self._lexer.feed(text):
            if self._expect == "done" or self._failed:
                return  # the last value is whole, or it went wrong: what follows is not read
            if not (self._grammar(token[0]) and self._read(token)):
                self._failed = True
                return

    def _read(self, token: tuple[str, ...]) -> bool:
        """Take a token the grammar allows; False: the item is not a call."""
        depth, kind = len(self._stack), token[0]
        if self._in_arguments:
            self._call.arguments += _canonical(token)
            self._in_arguments = depth > self._depth  # they end back in the call object
        elif kind == "{" and depth == (2 if self._stack[0] == "[" else 1):  # a call opens
            self.calls.append(StreamedCall())
            self._depth, self._key = depth, None
        elif not self._depth:
            return True
        elif depth < self._depth:  # the call object closed
            self._call.ended, self._depth = True, 0
            if not self._call.started:  # no arguments: an empty object
                self._call.arguments = "{}"
            return self._call.known
        elif depth == self._depth + 1 and kind in "{[" or depth == self._depth and kind == "v":
            return self._call_value(kind)
        elif depth == self._depth and kind in ("s", '"'):
            return self._string_token(token)
        return True

    def _call_value(self, kind: str) -> bool:
        """A value of the call object's key that is no string: the arguments' object begins;
        a name or arguments of another kind are not a call's."""
        if self._key == "name":
            return False
        if self._key in self.argument_keys and not self._call.started:
            if kind != "{":
                return False
            self._in_arguments = self._call.started = True
            self._call.arguments = "{"
        return True

    def _string_token(self, token: tuple[str, ...]) -> bool:
        """A string in the call object: a key, the name, or (not a call) the arguments."""
        if token[0] == "s":
            self._text = (self._text or "") + token[1]
            return True
        if self._expect == "in_string":  # it opened
            self._text = ""
            return True
        text, self._text = self._text or "", None  # it closed
        if self._expect == "colon":
            self._key = text
        elif self._key == "name":
            self._call.name = self._call.name or text
        elif self._key in self.argument_keys and not self._call.started:
            return False
        return True

    def _grammar(self, kind: str) -> bool:
        """Whether a token of `kind` may come next; if so, what may follow it."""
        expect = self._expect
        if kind == "s":
            return expect == "in_string"
        if expect == "in_string":  # the string's closing quote
            self._expect = "colon" if self._string_is_key else "comma"
        elif expect == "colon" and kind == ":":
            self._expect = "value"
        elif expect == "comma" and kind == ",":
            self._expect = "key" if self._stack[-1] == "{" else "value"
        elif expect in ("comma", "key_or_end", "value_or_end") and kind in "}]":
            return self._close(kind)
        elif expect in ("key", "key_or_end") and kind == '"':
            self._expect, self._string_is_key = "in_string", True
        elif expect == "separator" and kind == self.separator:
            self._expect = "value"
        elif expect in ("value", "value_or_end") and self._may_open(kind):
            return self._value(kind)
        else:
            return False
        return True

    def _may_open(self, kind: str) -> bool:
        """At the top level, a call object or an array of them; in that array, call objects;
        in a call, any value."""
        if not self._stack:
            return kind == "{" and self.objects or kind == "[" and self.array
        if self._stack == ["["]:
            return kind == "{"
        return True

    def _value(self, kind: str) -> bool:
        if kind in "{[":
            self._stack.append(kind)
            self._expect = "key_or_end" if kind == "{" else "value_or_end"
        elif kind == '"':
            self._expect, self._string_is_key = "in_string", False
        elif kind == "v":
            self._expect = "comma"
        else:
            return False
        return True

    def _close(self, kind: str) -> bool:
        if {"}": "{", "]": "["}[kind] != self._stack[-1]:
            return False
        self._stack.pop()
        if self._stack:
            self._expect = "comma"
        elif not self.many:
            self._expect = "done"
        else:
            self._expect = "separator" if self.separator else "value"
        return True


def dumps(value: object) -> str:
    """json.dumps's text without ASCII escapes (ensure_ascii off), as vLLM gives arguments;
    but a lone surrogate (JSON may escape one) escaped, as it is not UTF-8."""
    return _SURROGATE.sub(lambda m: f"\\u{ord(m[0]):04x}", json.dumps(value, ensure_ascii=False))


def _canonical(token: tuple[str, ...]) -> str:
    """A token as `dumps` writes it (json.dumps's default separators)."""
    kind = token[0]
    if kind == "s":
        return dumps(token[1])[1:-1]
    if kind == "v":
        return token[1]
    return {":": ": ", ",": ", "}.get(kind, kind)
