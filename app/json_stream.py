"""A tool call's JSON object read as the model writes it, so that its arguments can stream.

`CallStream` takes the text of one `{"name": ..., "arguments": {...}}` object in pieces. Once
the name's string is whole and the arguments' object has begun, the call is known; from then
on `arguments` grows with the arguments' object as `dumps` writes it (the form a whole
call's arguments are given in), as far as it is certain: a string
as its characters come, a number once it ends. So the pieces a stream gives join to what the
whole object gives, wherever the text was cut.

Text that is not JSON stops the reading where it starts: what was given stays given (a stream
cannot take it back), and the rest is not read.
"""

from __future__ import annotations

import json
import re

_SURROGATE = re.compile("[\ud800-\udfff]")  # left alone after json.loads: lone ones
_WHITESPACE = " \t\n\r"
_SCALAR = set("-+.0123456789eEtruefalsnNaIiy")  # numbers, true / false / null, NaN, Infinity
_ESCAPES = set('"\\/bfnrt')
_HEX = set("0123456789abcdefABCDEF")


class _Lexer:
    """JSON tokens from text fed in pieces: ("{" | "}" | "[" | "]" | ":" | ","), ('"',) at a
    string's start, ("s", decoded text) for each certain piece of it and ('"',) again at its
    end, ("v", canonical text) for a number or literal. `failed` once the text is not JSON."""

    def __init__(self) -> None:
        self.failed = False
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
        if ch in "{}[]:,":
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


class CallStream:
    """One call object, fed in pieces: its `name` once whole, and from when its arguments'
    object begins (`started`), their canonical text `arguments`."""

    def __init__(self, argument_keys: tuple[str, ...]) -> None:
        self.argument_keys = argument_keys
        self._string_is_key = False
        self.name: str | None = None
        self.arguments = ""
        self.started = False
        self._lexer = _Lexer()
        self._stack: list[str] = []  # open containers: "{" or "["
        self._expect = "value"  # what may come next: see _grammar
        self._key: str | None = None  # the call object's key last read
        self._text: str | None = None  # a string being read in the call object
        self._in_arguments = False
        self._failed = False

    def feed(self, text: str) -> None:
        for token in self._lexer.feed(text):
            if self._expect == "done" or self._failed:
                return  # the object is whole, or went wrong: what follows is not read
            if not self._grammar(token[0]):
                self._failed = self._lexer.failed = True
                return
            self._read(token)

    def _read(self, token: tuple[str, ...]) -> None:
        depth = len(self._stack)  # after the token
        if self._in_arguments:
            self.arguments += _canonical(token)
            self._in_arguments = depth > 1  # the arguments' object ends back in the call's
        elif token == ("{",) and depth == 2 and self._key in self.argument_keys:
            self._in_arguments = self.started = True
            self.arguments = "{"
        elif depth == 1 and token[0] == "s":
            self._text = (self._text or "") + token[1]
        elif depth == 1 and token == ('"',) and self._expect != "in_string":  # a string ended
            text, self._text = self._text or "", None
            if self._expect == "colon":
                self._key = text
            elif self._key == "name" and self.name is None:
                self.name = text

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
        elif expect in ("value", "value_or_end") and (self._stack or kind == "{"):
            return self._value(kind)
        else:
            return False
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
        self._expect = "comma" if self._stack else "done"
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
