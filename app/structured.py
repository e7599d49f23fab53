"""The request fields that constrain the output's form, as OpenAI and vLLM name them, and the
one engine StructuredOutput they come to: OpenAI's `response_format` (json_object, json_schema;
vLLM's structural_tag), vLLM's `structured_outputs` object (json, regex, choice, grammar,
json_object, structural_tag) and its older `guided_json`, `guided_regex`, `guided_choice`,
`guided_grammar` and `structural_tag`; and how a JSON constraint's whitespace may go
(`disable_any_whitespace`, `whitespace_pattern` / `guided_whitespace_pattern`). One constraint
per request, as in vLLM. The engine compiles it (engine/grammar.py) and refuses one that does not
compile, naming the field it came from."""

from __future__ import annotations

import json
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.sampling_params import JSON_KINDS, InvalidRequestError, StructuredOutput


class JsonSchema(BaseModel):
    """OpenAI's response_format.json_schema."""

    name: str | None = None
    description: str | None = None
    schema_: dict = Field(alias="schema")
    strict: bool | None = None  # the schema is always followed exactly here


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema", "structural_tag"]
    json_schema: JsonSchema | None = None
    # vLLM's structural_tag: {"begin", "schema", "end"} items and their triggers
    structures: list[dict] | None = None
    triggers: list[str] | None = None
    format: dict | None = None  # xgrammar's later structural tag form: not served

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a json_schema object with its schema")
        if self.type == "structural_tag" and self.format is not None:
            raise ValueError(
                "a structural_tag's 'format' (xgrammar's later form) is not supported: give "
                "its 'structures' and 'triggers'"
            )
        if self.type == "structural_tag" and not (self.structures and self.triggers):
            raise ValueError("type 'structural_tag' needs its 'structures' and 'triggers'")
        return self

    def tags(self) -> str:
        """A structural_tag's spec (the engine StructuredOutput's)."""
        return json.dumps({"structures": self.structures, "triggers": self.triggers})


class StructuredOutputs(BaseModel):
    """vLLM's structured_outputs object; an unknown key is refused (a misspelled constraint
    would otherwise be ignored)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    json_: str | dict | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without whitespace between its tokens
    disable_fallback: bool = False  # vLLM's backend choice: one backend here, nothing to do
    whitespace_pattern: str | None = None  # JSON: the whitespace between tokens, a regex
    structural_tag: str | dict | None = None  # JSON text (vLLM's) or the object


def structured_output(req) -> StructuredOutput | None:
    """The request's one constraint on the output's form, or None. `req`: a completions or chat
    request (app.protocol) carrying these fields."""
    found = _constraints(req)
    if len(found) > 1:
        names = ", ".join(param for param, _, _ in found)
        raise InvalidRequestError(
            f"only one structured output constraint per request, got {names}", found[1][0]
        )
    pattern, pattern_param = _whitespace_pattern(req)
    if pattern is not None and (not found or found[0][1] not in JSON_KINDS):
        raise InvalidRequestError(
            "a whitespace pattern shapes a JSON constraint only", pattern_param
        )
    if not found:
        return None
    param, kind, spec = found[0]
    flexible = not (req.structured_outputs and req.structured_outputs.disable_any_whitespace)
    return StructuredOutput(
        kind, spec, any_whitespace=flexible, whitespace_pattern=pattern, param=param
    )


def _whitespace_pattern(req) -> tuple[str | None, str]:
    """The request's pattern for the whitespace in its JSON (vLLM's two names), and its field."""
    so = req.structured_outputs
    if so is not None and so.whitespace_pattern is not None:
        return so.whitespace_pattern, "structured_outputs.whitespace_pattern"
    return req.guided_whitespace_pattern, "guided_whitespace_pattern"


def _constraints(req) -> list[tuple[str, str, str]]:
    """(request field, kind, spec) of every constraint the request sets."""
    found = []
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        found.append(("response_format", "json_object", ""))
    elif fmt is not None and fmt.type == "json_schema":
        found.append(("response_format", "json", json.dumps(fmt.json_schema.schema_)))
    elif fmt is not None and fmt.type == "structural_tag":
        found.append(("response_format", "structural_tag", fmt.tags()))
    so = req.structured_outputs
    if so is not None:
        for kind, value in (
            ("json", so.json_), ("regex", so.regex), ("choice", so.choice),
            ("grammar", so.grammar), ("json_object", so.json_object or None),
            ("structural_tag", so.structural_tag),
        ):  # fmt: skip
            if value is not None:
                found.append((f"structured_outputs.{kind}", kind, _spec(kind, value)))
    for kind in ("json", "regex", "choice", "grammar"):  # vLLM's older names
        value = getattr(req, f"guided_{kind}")
        if value is not None:
            found.append((f"guided_{kind}", kind, _spec(kind, value)))
    if req.structural_tag is not None:  # vLLM's older top-level field
        tags = _spec("structural_tag", req.structural_tag)
        found.append(("structural_tag", "structural_tag", tags))
    return found


def _spec(kind: str, value) -> str:
    """A constraint's value as StructuredOutput's text."""
    if kind == "json_object":
        return ""
    if kind == "choice" or (kind in ("json", "structural_tag") and not isinstance(value, str)):
        return json.dumps(value)
    return value
