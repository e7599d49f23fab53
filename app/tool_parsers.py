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
- `internlm` (InternLM2 / 2.5), `jamba` (Jamba 1.5 / 1.6), `minimax` (MiniMax-M1), `granite`
  (Granite 3.x), `phi4_mini_json` (Phi-4-mini), `deepseek_v3` (DeepSeek-V3 / R1),
  `deepseek_v31` (DeepSeek-V3.1), `kimi_k2` (Kimi K2): JSON calls between each model's
  markers (see each class).
- `qwen3_coder` (Qwen3-Coder: `<function=NAME><parameter=KEY>VALUE</parameter></function>`
  in `<tool_call>`) and `glm45` (GLM-4.5 / 4.6: `NAME<arg_key>KEY</arg_key><arg_value>VALUE
  </arg_value>` in `<tool_call>`) write each value as text; it is typed by the parameter's
  JSON schema in the request's tools, as vLLM does (a string stays text, "3" for an integer
  is 3, ...).

A reply's content is its text outside the calls (whitespace between and after calls left out).
Streamed, content goes out as it comes except text that may begin a call, which is held until
it is clear. A call's arguments stream as the model writes them, as vLLM's parsers do: the
call (its id and name) goes out once its name is whole and its arguments have begun, then the
arguments in pieces, as `json.dumps` writes them (JSON arguments through app/json_stream.py;
a text value its schema keeps as text as it comes, another once whole). From there it is a
call, even if the model's text goes wrong after (what went out cannot be taken back; the rest
of it is dropped) or the reply is cut short. `pythonic` gives each call whole once the reply
ends (a Python literal is read whole). A call that does not parse before that point (not
JSON, no name, arguments not an object) is left as text, so nothing the model wrote is lost.
The same parser reads a whole reply (`read`) and a stream (`feed` ... `end`): the streamed
pieces join to exactly what the whole reply gives.
"""

from __future__ import annotations

import ast
import contextlib
import json
import re
from dataclasses import dataclass, field, replace

from app.json_stream import CallsStream, dumps

# what reading the model's text as JSON may raise: anything may come, nested however deep
_NOT_JSON = (json.JSONDecodeError, RecursionError)
_ARRAY_KEYS = ("arguments", "parameters")  # a call's arguments in an array of calls


@dataclass(frozen=True)
class Call:
    name: str
    arguments: str  # JSON text of an object
    continued: bool = False  # streamed: more of the last call's arguments


@dataclass
class Parsed:
    content: str = ""
    calls: list[Call] = field(default_factory=list)

    def __iadd__(self, other: Parsed) -> Parsed:
        """Joins a stream's pieces: a call's continued arguments join the call."""
        self.content += other.content
        for call in other.calls:
            if call.continued and self.calls:
                last = self.calls[-1]
                self.calls[-1] = replace(last, arguments=last.arguments + call.arguments)
            else:
                self.calls.append(call)
        return self


class _Streamed:
    """The calls of a part of the reply that is JSON calls (a parser's `_new_stream`), read
    as that part grows, and what of them has been given out."""

    def __init__(self, stream: CallsStream) -> None:
        self.stream = stream
        self._read = 0  # how much of the part the stream has read
        self._sent: list[int] = []  # per call given out, its arguments given so far

    @property
    def given(self) -> bool:
        return bool(self._sent)

    def read(self, text: str, out: Parsed) -> None:
        """`text`: the part so far (it only grows) -> out: the calls, once known, then more
        of their arguments as they come."""
        self.stream.feed(text[self._read :])
        self._read = len(text)
        for i, call in enumerate(self.stream.calls):
            if not call.known:
                break
            if i == len(self._sent):
                out.calls.append(Call(call.name, call.arguments))
                self._sent.append(len(call.arguments))
            elif len(call.arguments) > self._sent[i]:
                more = call.arguments[self._sent[i] :]
                out.calls.append(Call(call.name, more, continued=True))
                self._sent[i] = len(call.arguments)


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

    _streamed: _Streamed | None = None  # the calls being read

    def _new_stream(self) -> CallsStream | None:
        """A reader of the format's JSON calls, whose arguments then stream; None: the calls
        are given whole."""
        return None

    def _read_calls(self, part: str, out: Parsed, final: bool = False) -> bool:
        """Stream the calls of `part`, the reply's calls so far (it only grows; `final`: all
        of them); whether any has been given out."""
        if self._streamed is None:
            stream = self._new_stream()
            if stream is None:
                return False
            self._streamed = _Streamed(stream)
        self._streamed.read(part, out)
        return self._streamed.given


class _TaggedParser(_Parser):
    """Calls between a `START` and an `END` tag, anywhere in the reply; `_calls` reads what
    is between them (one call or several). The last call may be left unclosed."""

    START = END = ""

    def __init__(self, schemas: dict[str, dict] | None = None) -> None:
        self.schemas = schemas or {}  # function name -> its parameters' JSON schema
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
                if end < 0:  # the body so far, less what may begin the end tag
                    tail = partial_tail(self._held, self.END)
                    self._read_calls(self._held[: len(self._held) - tail], out)
                    return out
                self._close(self._held[:end], out)
                self._held = self._held[end + len(self.END) :]
                continue
            start = self._held.find(self.START)
            if start < 0:  # all but a tail that may begin a start tag is text
                keep = partial_tail(self._held, self.START)
                self._text(self._held[: len(self._held) - keep], out)
                self._held = self._held[len(self._held) - keep :]
                return out
            self._text(self._held[:start], out)
            self._held, self._inside, self._gap = self._held[start + len(self.START) :], True, ""
            self._begin_body()

    def end(self) -> Parsed:
        """The reply ended: an unclosed last call is read as it is; held text is content."""
        out = Parsed()
        if self._inside:
            self._close(self._held, out, closed=False)
        else:
            self._text(self._held, out)
        self._held, self._inside = "", False
        return out

    def _begin_body(self) -> None:
        self._streamed = None  # a new body's calls

    def _text(self, text: str, out: Parsed) -> None:
        if self.called and not text.strip():
            self._gap += text
            return
        out.content += self._gap + text
        self._gap = ""

    def _close(self, body: str, out: Parsed, closed: bool = True) -> None:
        self._inside = False
        if self._read_calls(body, out, final=True):  # given out as calls: they stay calls
            self.called, self._gap = True, ""
            return
        calls = self._calls(body)
        if not calls:  # not a call after all: the model's text, tags and all
            self._text(self.START + body + (self.END if closed else ""), out)
            return
        out.calls.extend(calls)
        self.called, self._gap = True, ""

    def _calls(self, body: str) -> list[Call] | None:
        raise NotImplementedError


class HermesParser(_TaggedParser):
    START, END = "<tool_call>", "</tool_call>"

    def _new_stream(self) -> CallsStream:
        return CallsStream(("arguments",))

    def _calls(self, body: str) -> list[Call] | None:
        call = _call(body, "arguments")
        return None if call is None else [call]


class InternLMParser(_TaggedParser):
    """InternLM2 / 2.5: `<|action_start|><|plugin|>{"name", "parameters"}<|action_end|>`."""

    START, END = "<|action_start|><|plugin|>", "<|action_end|>"

    def _new_stream(self) -> CallsStream:
        return CallsStream(("parameters", "arguments"))

    def _calls(self, body: str) -> list[Call] | None:
        call = _call(body, "parameters", "arguments")
        return None if call is None else [call]


class JambaParser(_TaggedParser):
    """Jamba 1.5 / 1.6: `<tool_calls>[{"name", "arguments"}, ...]</tool_calls>`."""

    START, END = "<tool_calls>", "</tool_calls>"

    def _new_stream(self) -> CallsStream:
        return CallsStream(_ARRAY_KEYS, array=True)

    def _calls(self, body: str) -> list[Call] | None:
        return _array_calls(body, single=True)


class MiniMaxParser(_TaggedParser):
    """MiniMax-M1: `<tool_calls>` then one `{"name", "arguments"}` object per line."""

    START, END = "<tool_calls>", "</tool_calls>"

    def _new_stream(self) -> CallsStream:
        return CallsStream(("arguments",), many=True)

    def _calls(self, body: str) -> list[Call] | None:
        lines = [line for line in body.splitlines() if line.strip()]
        calls = [_call(line, "arguments") for line in lines]
        return None if None in calls else calls


class _SectionParser(_TaggedParser):
    """A section of calls, each matched whole by `CALL` (a regex with the groups name and
    arguments, JSON text); a section with anything else in it is text. Streamed, a call is
    known once `HEAD` (its start, to where its arguments begin) is read, and its arguments
    stream until `CALL_END`."""

    CALL: re.Pattern
    HEAD: re.Pattern
    CALL_END = ""

    def _begin_body(self) -> None:
        self._next = 0  # where the next call may start
        self._reading: tuple[_Streamed, str, int] | None = None  # reader, prefix, start
        self._given = False

    def _read_calls(self, part: str, out: Parsed, final: bool = False) -> bool:
        """Each call's arguments read as a call object's, `{"name": NAME, "arguments": ...`."""
        while True:
            if self._reading is None:
                head = self.HEAD.match(part, len(part) - len(part[self._next :].lstrip()))
                if head is None:
                    return self._given
                name = json.dumps(self._name(head["name"]))
                reader = _Streamed(CallsStream(("arguments",)))
                self._reading = (reader, f'{{"name": {name}, "arguments": ', head.end())
            reader, prefix, start = self._reading
            end = part.find(self.CALL_END, start)
            stop = end if end >= 0 else len(part) - partial_tail(part, self.CALL_END)
            reader.read(prefix + part[start:stop], out)
            self._given = self._given or reader.given
            if end < 0:
                return self._given
            self._next, self._reading = end + len(self.CALL_END), None

    def _calls(self, body: str) -> list[Call] | None:
        if self.CALL.sub("", body).strip():  # something besides calls
            return None
        calls = [self._match(m) for m in self.CALL.finditer(body)]
        return None if None in calls else calls

    def _match(self, match: re.Match) -> Call | None:
        try:
            arguments = json.loads(match["arguments"])
        except _NOT_JSON:
            return None
        return _as_call({"name": self._name(match["name"]), "arguments": arguments}, ("arguments",))

    def _name(self, written: str) -> str:
        return written.strip()


class DeepSeekV3Parser(_SectionParser):
    """DeepSeek-V3 / R1: `<｜tool▁calls▁begin｜>` then per call `<｜tool▁call▁begin｜>function
    <｜tool▁sep｜>NAME` and the arguments in a ```json block, `<｜tool▁call▁end｜>`."""

    START, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
    CALL = re.compile(
        r"<｜tool▁call▁begin｜>[^<]*<｜tool▁sep｜>(?P<name>[^\n]*)\n```json\n"
        r"(?P<arguments>.*?)\n```\s*<｜tool▁call▁end｜>",
        re.DOTALL,
    )
    HEAD = re.compile(r"<｜tool▁call▁begin｜>[^<]*<｜tool▁sep｜>(?P<name>[^\n]*)\n```json\n")
    CALL_END = "<｜tool▁call▁end｜>"


class DeepSeekV31Parser(_SectionParser):
    """DeepSeek-V3.1: per call `<｜tool▁call▁begin｜>NAME<｜tool▁sep｜>{arguments}
    <｜tool▁call▁end｜>` in the same section."""

    START, END = DeepSeekV3Parser.START, DeepSeekV3Parser.END
    CALL = re.compile(
        r"<｜tool▁call▁begin｜>(?P<name>.*?)<｜tool▁sep｜>(?P<arguments>.*?)<｜tool▁call▁end｜>",
        re.DOTALL,
    )
    HEAD = re.compile(r"<｜tool▁call▁begin｜>(?P<name>.*?)<｜tool▁sep｜>", re.DOTALL)
    CALL_END = "<｜tool▁call▁end｜>"


class KimiK2Parser(_SectionParser):
    """Kimi K2: `<|tool_calls_section_begin|>`, per call `<|tool_call_begin|>functions.NAME:I
    <|tool_call_argument_begin|>{arguments}<|tool_call_end|>`."""

    START, END = "<|tool_calls_section_begin|>", "<|tool_calls_section_end|>"
    CALL = re.compile(
        r"<\|tool_call_begin\|>(?P<name>.*?)<\|tool_call_argument_begin\|>(?P<arguments>.*?)"
        r"<\|tool_call_end\|>",
        re.DOTALL,
    )
    HEAD = re.compile(
        r"<\|tool_call_begin\|>(?P<name>.*?)<\|tool_call_argument_begin\|>", re.DOTALL
    )
    CALL_END = "<|tool_call_end|>"

    def _name(self, written: str) -> str:
        # the call's id, "functions.get_weather:0": the name is between the dot and the colon
        return written.strip().split(":")[0].split(".")[-1]


class _TextParametersParser(_TaggedParser):
    """A call written as its name, then each parameter as a key and a text value, typed by
    the function's schema (vLLM's rules). Streamed, the call is known at its first parameter
    (or its end); a value its schema keeps as text streams as it is written, another goes out
    once whole (its type is read from all of it)."""

    HEAD: re.Pattern  # the function's name (group 1), to its first parameter
    KEY: re.Pattern  # a parameter's key (group 1), to its value
    VALUE_END = ""
    CLOSE: re.Pattern | None = None  # the function's end; None: the body's

    def _begin_body(self) -> None:
        self._function: str | None = None  # the call's name, once read
        self._at = 0  # how far the body is read
        self._value: tuple[object, bool] | None = None  # the value being read: schema, as text
        self._value_sent = 0  # of it (as text), how much is given out
        self._keys = 0  # parameters begun
        self._done = False  # the function's end read
        self._given = False

    def _value_text(self, raw: str, whole: bool) -> str:
        """A value's text from what is written of it (`whole`: all of it), as far as certain."""
        raise NotImplementedError

    def _read_calls(self, part: str, out: Parsed, final: bool = False) -> bool:
        if self._function is None:
            head = self.HEAD.match(part)
            if head is None:
                return False
            self._function, self._at = head[1].strip(), head.end()
        while not self._done and self._step(part, out):
            pass
        if final and self.CLOSE is None and self._given and self._value is None:
            self._more("}", out)
        return self._given

    def _more(self, text: str, out: Parsed) -> None:
        """Give out more of the call: the first piece with its name."""
        if text:
            out += Parsed("", [Call(self._function or "", text, continued=self._given)])
            self._given = True

    def _step(self, part: str, out: Parsed) -> bool:
        """Read on from `_at`; whether a parameter or the function ended or began."""
        if self._value is not None:
            return self._read_value(part, out)
        key = self.KEY.match(part, self._at)
        if key is not None:
            properties = (self.schemas.get(self._function or "") or {}).get("properties") or {}
            schema = properties.get(key[1].strip())
            text = _always_text(schema)
            lead = ", " if self._keys else "{"
            self._more(lead + dumps(key[1].strip()) + ": " + '"' * text, out)
            self._value, self._value_sent, self._at = (schema, text), 0, key.end()
            self._keys += 1
            return True
        if self.CLOSE is not None and self.CLOSE.match(part, self._at):
            self._more("}" if self._keys else "{}", out)
            self._done = True
            return True
        return False  # more to come, or not a parameter: the rest is not read

    def _read_value(self, part: str, out: Parsed) -> bool:
        """A value as it comes, if its schema keeps it as text; else once whole."""
        schema, text = self._value
        end = part.find(self.VALUE_END, self._at)
        if end < 0:
            if text:  # all but a possible close tag
                raw = part[self._at : len(part) - partial_tail(part, self.VALUE_END)]
                self._give_text(self._value_text(raw, whole=False), out)
            return False
        value = self._value_text(part[self._at : end], whole=True)
        if text:
            self._give_text(value, out)
            self._more('"', out)
        else:
            self._more(dumps(_typed(value, schema)), out)
        self._value, self._at = None, end + len(self.VALUE_END)
        return True

    def _give_text(self, value: str, out: Parsed) -> None:
        self._more(dumps(value[self._value_sent :])[1:-1], out)
        self._value_sent = max(self._value_sent, len(value))


class Qwen3CoderParser(_TextParametersParser):
    """Qwen3-Coder: `<tool_call><function=NAME><parameter=KEY>VALUE</parameter>...</function>
    </tool_call>`."""

    START, END = "<tool_call>", "</tool_call>"
    FUNCTION = re.compile(r"\s*<function=([^>\n]+)>(.*?)</function>\s*", re.DOTALL)
    PARAMETER = re.compile(r"<parameter=([^>\n]+)>(.*?)</parameter>", re.DOTALL)
    HEAD, KEY = re.compile(r"\s*<function=([^>\n]+)>"), re.compile(r"\s*<parameter=([^>\n]+)>")
    VALUE_END, CLOSE = "</parameter>", re.compile(r"\s*</function>")

    def _calls(self, body: str) -> list[Call] | None:
        function = self.FUNCTION.fullmatch(body)
        if function is None:
            return None
        name, params = function[1].strip(), function[2]
        if self.PARAMETER.sub("", params).strip():
            return None
        values = {k.strip(): _strip_newline(v) for k, v in self.PARAMETER.findall(params)}
        return [_typed_call(name, values, self.schemas.get(name))]

    def _value_text(self, raw: str, whole: bool) -> str:
        """The value less a newline after the open tag and one before the close (one that
        may be the last is held)."""
        if whole:
            return _strip_newline(raw)
        value = raw.removeprefix("\n")
        return value[: len(value) - value.endswith("\n")]


class Glm45Parser(_TextParametersParser):
    """GLM-4.5 / 4.6: `<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...
    </tool_call>` (newlines between)."""

    START, END = "<tool_call>", "</tool_call>"
    PAIR = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.DOTALL)
    HEAD = re.compile(r"\s*([^\s<][^<\n]*?)\s*(?=<arg_key>)")
    KEY = re.compile(r"\s*<arg_key>(.*?)</arg_key>\s*<arg_value>", re.DOTALL)
    VALUE_END = "</arg_value>"

    def _calls(self, body: str) -> list[Call] | None:
        name, _, pairs = body.partition("<arg_key>")
        name, pairs = name.strip(), "<arg_key>" + pairs if pairs else ""
        if not name or "\n" in name or "<" in name or self.PAIR.sub("", pairs).strip():
            return None
        values = {k.strip(): v.strip() for k, v in self.PAIR.findall(pairs)}
        return [_typed_call(name, values, self.schemas.get(name))]

    def _value_text(self, raw: str, whole: bool) -> str:
        """The value less the whitespace around it (what may yet be followed is held)."""
        return raw.strip()


class _WholeReplyParser(_Parser):
    """A reply that is either all calls (it starts with `OPEN` or the `TAG` marker) or all
    text: text streams as it comes; calls are read whole at the reply's end."""

    TAG = ""
    OPEN = ""

    def __init__(self, schemas: dict[str, dict] | None = None) -> None:
        self._held = ""
        self._mode: str | None = None  # "text" or "calls", once the reply's start tells

    def feed(self, text: str) -> Parsed:
        self._held += text
        if self._mode is None:
            head = self._held.lstrip()
            if not head or (partial_tail(head, self.TAG) == len(head)):
                return Parsed()  # whitespace, or what may still become the tag
            self._mode = "calls" if head.startswith((self.OPEN, self.TAG)) else "text"
        if self._mode == "calls":
            out = Parsed()
            self._read_calls(self._held.lstrip().removeprefix(self.TAG), out)
            return out
        out, self._held = Parsed(self._held), ""
        return out

    def end(self) -> Parsed:
        text, self._held, out = self._held, "", Parsed()
        if self._mode != "calls":
            return Parsed(text)
        if self._read_calls(text.lstrip().removeprefix(self.TAG), out):
            self.called = True  # given out as calls: they stay calls
            return out
        calls = self._calls(text.strip().removeprefix(self.TAG).strip())
        if calls is None:
            return Parsed(text)
        self.called = True
        return Parsed("", calls)

    def _calls(self, text: str) -> list[Call] | None:
        raise NotImplementedError


class Llama3JsonParser(_WholeReplyParser):
    TAG, OPEN = "<|python_tag|>", "{"

    def _new_stream(self) -> CallsStream:
        return CallsStream(("parameters", "arguments"), many=True, separator=";")

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
            calls.append(Call(node.func.id, dumps(arguments)))
        return calls


class _ArrayReplyParser(_WholeReplyParser):
    """A reply that is a JSON array of call objects (after `TAG`, if any)."""

    OPEN = "["
    KEYS = _ARRAY_KEYS  # a call's arguments under one of these

    def _new_stream(self) -> CallsStream:
        return CallsStream(self.KEYS, objects=False, array=True)

    def _calls(self, text: str) -> list[Call] | None:
        return _array_calls(text, single=False)


class GraniteParser(_ArrayReplyParser):
    """Granite 3.x: `<|tool_call|>` and a JSON array of `{"name", "arguments"}`."""

    TAG = "<|tool_call|>"


class RequiredCallsParser(_ArrayReplyParser):
    """tool_choice "required": the output its schema constrains, a JSON array of
    `{"name", "parameters"}` (app/tools.py; vLLM's form); not a model's own format."""

    KEYS = ("parameters",)


class MistralParser(_Parser):
    """Text, then `TAG` and a JSON array of calls (or one call object)."""

    TAG = "[TOOL_CALLS]"

    def __init__(self, schemas: dict[str, dict] | None = None) -> None:
        self._held = ""
        self._after = False  # past the marker: the calls, read whole at the end

    def feed(self, text: str) -> Parsed:
        self._held += text
        out = Parsed()
        if not self._after:
            start = self._held.find(self.TAG)
            if start < 0:
                cut = len(self._held) - partial_tail(self._held, self.TAG)
                out.content, self._held = self._held[:cut], self._held[cut:]
                return out
            out.content, self._held, self._after = self._held[:start], self._held[start:], True
        self._read_calls(self._held.removeprefix(self.TAG), out)
        return out

    def _new_stream(self) -> CallsStream:
        return CallsStream(_ARRAY_KEYS, array=True)

    def end(self) -> Parsed:
        text, self._held, out = self._held, "", Parsed()
        if not self._after:
            return Parsed(text)
        if self._read_calls(text.removeprefix(self.TAG), out):
            self.called = True  # given out as calls: they stay calls
            return out
        calls = _array_calls(text.removeprefix(self.TAG), single=True)
        if calls is None:
            return Parsed(text)
        self.called = True
        return Parsed("", calls)


class Phi4MiniParser(MistralParser):
    """Phi-4-mini: `functools` and a JSON array of `{"name", "arguments"}`."""

    TAG = "functools"


PARSERS = {
    "hermes": HermesParser,
    "llama3_json": Llama3JsonParser,
    "mistral": MistralParser,
    "pythonic": PythonicParser,
    "internlm": InternLMParser,
    "jamba": JambaParser,
    "minimax": MiniMaxParser,
    "granite": GraniteParser,
    "phi4_mini_json": Phi4MiniParser,
    "deepseek_v3": DeepSeekV3Parser,
    "deepseek_v31": DeepSeekV31Parser,
    "kimi_k2": KimiK2Parser,
    "qwen3_coder": Qwen3CoderParser,
    "glm45": Glm45Parser,
}


def partial_tail(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def _call(body: str, *argument_keys: str) -> Call | None:
    try:
        item = json.loads(body)
    except _NOT_JSON:
        return None
    return _as_call(item, argument_keys)


def _as_call(item, argument_keys: tuple[str, ...]) -> Call | None:
    """{"name": str, <an argument key>: object} -> a Call; anything else None."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"]:
        return None
    arguments = next((item[k] for k in argument_keys if k in item), {})
    if not isinstance(arguments, dict):
        return None
    return Call(item["name"], dumps(arguments))


def _array_calls(text: str, single: bool) -> list[Call] | None:
    """A JSON array of call objects (`single`: or one call object) -> the calls; None unless
    every item is one."""
    try:
        items = json.loads(text)
    except _NOT_JSON:
        return None
    if not isinstance(items, list):
        if not single:
            return None
        items = [items]
    return _all_calls(items)


def _all_calls(items: list) -> list[Call] | None:
    """A list of call objects -> the calls; None unless every item is one."""
    calls = [_as_call(item, _ARRAY_KEYS) for item in items]
    return None if not calls or None in calls else calls


def _strip_newline(value: str) -> str:
    """A value written on its own lines: the newline after the open tag and before the close."""
    value = value[1:] if value.startswith("\n") else value
    return value[:-1] if value.endswith("\n") else value


def _typed_call(name: str, values: dict[str, str], schema: dict | None) -> Call:
    properties = (schema or {}).get("properties") or {}
    arguments = {k: _typed(v, properties.get(k)) for k, v in values.items()}
    return Call(name, dumps(arguments))


def _typed(value: str, schema) -> object:
    """A value the model wrote as text, as its parameter's JSON schema types it (vLLM's
    rules): strings as written; integers, numbers, booleans and null read as such; objects,
    arrays and untyped values as JSON or a Python literal. A parameter the schema does not
    name, or a value that does not read as its type, stays text."""
    if not isinstance(schema, dict):
        return value
    kinds = _schema_types(schema)
    if "null" in kinds and value.lower() in ("null", "none"):
        return None
    if not kinds or kinds[0] == "string":
        return value
    kind = kinds[0]
    with contextlib.suppress(ValueError):
        if kind == "integer":
            return int(value)
        if kind == "number":
            number = float(value)
            return int(number) if number.is_integer() else number
    if kind == "boolean":
        return {"true": True, "false": False}.get(value.strip().lower(), value)
    if kind in ("integer", "number"):
        return value
    try:
        return json.loads(value)
    except _NOT_JSON:
        pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError, RecursionError):  # the model's text
        return value


def _always_text(schema) -> bool:
    """Whether `_typed` keeps any value of this schema as the text written."""
    if not isinstance(schema, dict):
        return True
    kinds = _schema_types(schema)
    return "null" not in kinds and (not kinds or kinds[0] == "string")


def _schema_types(schema: dict) -> list[str]:
    """A schema's types, the first non-null one first: "type" (a name or a list) or anyOf's."""
    kind = schema.get("type")
    kinds = kind if isinstance(kind, list) else [kind] if kind else []
    kinds += [o["type"] for o in schema.get("anyOf", ()) if isinstance(o, dict) and "type" in o]
    kinds = [str(k).lower() for k in kinds if isinstance(k, str)]
    return sorted(kinds, key=lambda k: k == "null")


def _json_calls(text: str) -> list[Call] | None:
    """`{...}; {...}` -> the calls; None unless every part is one."""
    decoder, calls, i = json.JSONDecoder(), [], 0
    while i < len(text):
        try:
            item, i = decoder.raw_decode(text, i)
        except _NOT_JSON:
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
