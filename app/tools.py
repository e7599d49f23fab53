"""Function calling, as vLLM serves it. A named `tool_choice` ({"type": "function",
"function": {"name": ...}}) constrains the output to that function's parameters (a JSON
schema), and "required" to a JSON array of one or more calls ({"name", "parameters"}) of the
request's tools; the reply carries them as OpenAI's `tool_calls`.

"auto" (and tools without a tool_choice, which OpenAI reads as "auto") lets the model decide:
the calls are found in its free text by a parser for the model's own format
(app/tool_parsers.py), the app's `tool_call_parser` (vLLM's `--tool-call-parser`); without one
"auto" is refused. "none" leaves the tools out of the prompt, as vLLM does by default.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, Field

from app.tool_parsers import PARSERS, RequiredCallsParser
from engine.sampling_params import InvalidRequestError, StructuredOutput

ANY_OBJECT = {"type": "object"}


class Function(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; none: any JSON object
    strict: bool | None = None  # the schema is always followed exactly here


class Tool(BaseModel):
    type: Literal["function"]
    function: Function


class _Name(BaseModel):
    name: str


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: _Name


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


@dataclass(frozen=True)
class ToolCalls:
    """How a choice's output becomes tool calls: one call of `name`, or (name None) the JSON
    array of calls that "required" constrains it to."""

    name: str | None
    parallel = True  # "required": its schema holds one call without parallel_tool_calls

    @property
    def parsed(self) -> bool:
        """ "required"'s calls are read from its JSON array; a named call's output is its
        arguments."""
        return self.name is None

    @property
    def finish_reason(self) -> str:
        """OpenAI's: "tool_calls" when the model chose to call, "stop" for a named choice."""
        return "stop" if self.name else "tool_calls"

    def new_parser(self):
        """ "required": the calls in its JSON array, streamed as they are written; a named
        call has no parser (its output is the arguments)."""
        return RequiredCallsParser() if self.name is None else None

    def calls(self, text: str) -> list[dict]:
        """A named choice's call: its arguments are the output, cut short by max_tokens or
        not (as OpenAI's and vLLM's; streamed, they went out as they came)."""
        return [self.call(self.name, text)]

    @staticmethod
    def call(name: str, arguments: str) -> dict:
        """One call as OpenAI's message.tool_calls lists it, with a new id."""
        return {
            "id": f"chatcmpl-tool-{uuid.uuid4().hex}",
            "type": "function",
            "function": {"name": name, "arguments": arguments},
        }


@dataclass(frozen=True)
class AutoToolCalls:
    """tool_choice "auto": the calls the model writes in its own format, found by `parser`
    (a name in app.tool_parsers.PARSERS); `schemas`: each tool's parameters (the parsers of
    formats that write values as text type them by it)."""

    parser: str
    schemas: dict[str, dict] = field(default_factory=dict, compare=False)
    parallel: bool = True  # parallel_tool_calls false: the first call alone (vLLM's way)
    parsed = True  # the calls are read from the model's text

    def new_parser(self):
        return PARSERS[self.parser](self.schemas)


def tool_choice(
    req, parser: str | None = None
) -> tuple[StructuredOutput | None, ToolCalls | AutoToolCalls] | None:
    """The constraint (None: the model is free) and the reply's form of a chat request's tool
    choice; None when it calls no tool. `req`: app.protocol.ChatCompletionRequest; `parser`:
    the server's tool-call parser, if any."""
    choice, tools = req.tool_choice, req.tools or []
    if choice is None:
        choice = "auto" if tools else "none"
    if choice == "none":
        return None
    if not tools:
        raise InvalidRequestError("tool_choice needs tools", "tool_choice")
    if choice == "auto":
        if parser is None:
            raise InvalidRequestError(
                'tool_choice "auto" (the default with tools) needs a parser for the model\'s '
                "tool-call format, and this server has none (tool_call_parser in its config); "
                'use "required", a named function or "none"',
                "tool_choice",
            )
        schemas = {t.function.name: t.function.parameters or {} for t in tools}
        return None, AutoToolCalls(parser, schemas, req.parallel_tool_calls is not False)
    if choice == "required":
        schema = _calls_schema(tools, req.parallel_tool_calls is not False)
        return _compact(schema), ToolCalls(None)
    for tool in tools:
        if tool.function.name == choice.function.name:
            return _compact(tool.function.parameters or ANY_OBJECT), ToolCalls(tool.function.name)
    raise InvalidRequestError(
        f"tool_choice names {choice.function.name!r}, which is not among the tools",
        "tool_choice",
    )


def _compact(schema: dict) -> StructuredOutput:
    """Calls are JSON without whitespace between its tokens: code reads them, and a model
    free to add whitespace may spend its tokens on it."""
    return StructuredOutput("json", json.dumps(schema), any_whitespace=False, param="tool_choice")


def _calls_schema(tools: list[Tool], parallel: bool) -> dict:
    """vLLM's schema for "required": an array of {name, parameters} objects, one of the tools
    each; a single call unless parallel_tool_calls."""
    one_of = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [t.function.name]},
                "parameters": t.function.parameters or ANY_OBJECT,
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_of}}
    return schema if parallel else {**schema, "maxItems": 1}
