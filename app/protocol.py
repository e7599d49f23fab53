"""OpenAI request bodies (the fields we serve) and OpenAI-style error responses."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping
from functools import cached_property
from types import MappingProxyType
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
)
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from app.formats import Shown
from app.reasoning_parsers import REASONING_PARSERS
from app.structured import ResponseFormat, StructuredOutputs, structured_output
from app.tools import AutoToolCalls, Tool, ToolCalls, ToolChoice, tool_choice
from engine import InvalidRequestError, SamplingParams
from engine.limits import chat_token_ids
from engine.sampling_params import MAX_LOGPROBS, StructuredOutput

MAX_CHOICES = 128  # OpenAI's limit on n
# a request's bad_words: at most 1024, of 256 characters each (at most ~0.3 s to tokenize)
MAX_BAD_WORDS = 1024
MAX_STOPS = 1024  # stop strings, and stop_token_ids: 0.1-0.2 ms of a step at most
BadWord = Annotated[str, Field(max_length=256)]


logger = logging.getLogger(__name__)
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left before its answer


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind

    @property
    def body(self) -> dict:
        error = {"message": self.message, "type": self.kind, "param": self.param}
        return {"error": {**error, "code": self.status}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body, status_code=self.status)


async def answered(request: Request, route: Callable[[Request], Awaitable[Response]]) -> Response:
    """route(request), its APIError as OpenAI's error body, and any other exception (a bug) as
    a 500 with that body too (Starlette's is plain text, which the openai client reports
    without a message), logged with its traceback and its text kept out of the answer (a
    server path, say)."""
    try:
        return await route(request)
    except APIError as e:
        return e.response()
    except ClientDisconnect:  # left while sending its body: no one to answer, nothing failed
        return Response(status_code=CLIENT_CLOSED_REQUEST)
    except Exception:
        logger.exception("%s %s failed", request.method, request.url.path)
        message = "internal server error; its traceback is in the server's log"
        return APIError(500, message, kind="server_error").response()


@contextlib.contextmanager
def as_bad_request() -> Iterator[None]:
    """An InvalidRequestError (the engine's refusal, naming its field) raised inside becomes
    a 400 with the same message and param."""
    try:
        yield
    except InvalidRequestError as e:
        raise APIError(400, str(e), e.param) from e


def from_validation_error(e: ValidationError) -> APIError:
    first = e.errors()[0]
    param = ".".join(str(p) for p in first["loc"] if not _union_member(p)) or None
    msg = first["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own checks
    return APIError(400, f"{param}: {msg}" if param else msg, param)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _union_member(part: str | int) -> bool:
    """Whether a part of an error's location is pydantic's tag for a union's member (a type:
    `str`, `list[int]`, `literal['none','auto']`, a model's class name), not a field name
    (ours are snake_case) or a list index."""
    if isinstance(part, int):
        return False
    return part in _TYPE_TAGS or not part.isidentifier() or part[:1].isupper()


def _or(value: float | None, default: float) -> float:
    """A field sent as null means its default (some clients send every field)."""
    return default if value is None else value


# what a request that leaves a sampling field out gets, unless the model's generation config
# says otherwise (app/config.py's generation_config; OpenAI's defaults, top_k off)
SAMPLING_DEFAULTS = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 0,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
}
_NO_DEFAULTS: Mapping[str, float] = MappingProxyType({})


def _refused(*fields: str, why: str = "is not supported", allowed: tuple = ()):
    """A validator refusing any set value of `fields` but `allowed`: honouring them would change
    the output, so they are not silently ignored."""

    def check(cls, value, info):
        if value and value not in allowed:
            raise ValueError(f"{info.field_name} {why}")
        return value

    return field_validator(*fields)(classmethod(check))


# a beam search's steps ask for 2 x n logprobs (app/beam_search.py)
MAX_BEAMS = MAX_LOGPROBS // 2
# the fields a beam search does not honour, and the values that ask nothing of it: its beams
# are ranked by the model's own logprobs (before temperature, as vLLM's raw logprobs are), so
# temperature and seed change nothing and are taken
_BEAM_NEUTRAL = {
    "top_p": (None, 1.0),
    "top_k": (None, 0, -1),
    "min_p": (None, 0.0),
    "min_tokens": (None, 0),
    "stop": (None, "", []),
    "presence_penalty": (None, 0.0),
    "frequency_penalty": (None, 0.0),
    "repetition_penalty": (None, 1.0),
    "logit_bias": (None, {}),
    "allowed_token_ids": (None,),
    "bad_words": (None, []),
}


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: usage so far in every chunk


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # vLLM's and Ray Serve LLM's: left out (or empty), the base model
    model: str | None = None
    max_tokens: int | None = Field(None)
    # None (left out or null): the model's generation-config default, else SAMPLING_DEFAULTS
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    min_tokens: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices, each its own request to the replicas
    seed: int | None = None
    # bounded (vLLM's are not): each decode step looks for every stop string in the new text
    # and every stop id (1M stop strings made every step of the replica's batch 2.2x longer)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOPS)
    include_stop_str_in_output: bool = False  # vLLM's: the text keeps the stop string
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM's: each prompt token's logprob and this many alternatives', in the body's
    # prompt_logprobs (completions: per choice; chat: beside the choices)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    # vLLM's: keep only each prompt's last k tokens (-1: as many as the context window holds)
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    skip_special_tokens: bool = True  # vLLM's: False writes special tokens into the text
    allowed_token_ids: list[int] | None = Field(None, min_length=1)  # vLLM's: only these
    # vLLM's: words the output may not contain, bounded (vLLM's are not): the ingress's one
    # tokenizer thread encodes each twice (~50 us a word; 300k words held every request
    # behind them 13 s), and each decode step matches every one against the output
    bad_words: list[BadWord] | None = Field(None, max_length=MAX_BAD_WORDS)
    return_tokens_as_token_ids: bool = False  # vLLM's: logprobs name tokens "token_id:N"
    # vLLM's: the body carries the prompt's and the output's token ids (streamed: the prompt's
    # in a choice's first chunk, each chunk's new ones)
    return_token_ids: bool = False
    # the output's form (app/structured.py): OpenAI's, vLLM's, and vLLM's older names
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    structural_tag: str | dict | None = None
    guided_whitespace_pattern: str | None = None  # JSON: the whitespace between tokens
    # vLLM's: lower first under the app's scheduling_policy "priority" (else only 0 is served)
    priority: int = 0
    # vLLM's: prefix-cache blocks are shared only among requests with the same salt (or none)
    cache_salt: str | None = Field(None, min_length=1)
    # vLLM's: names the response, before the X-Request-Id header (app/ingress.py)
    request_id: str | None = Field(None, max_length=256)  # empty: as if not sent
    # vLLM's: the n choices are the best beams of a beam search of width n (app/beam_search.py)
    use_beam_search: bool = False
    length_penalty: float = 1.0  # vLLM's: beams rank by cum. logprob / length ** this
    # fields that would change the output if honoured: refused rather than silently ignored
    best_of: int | None = None
    logits_processors: list | None = None

    _one_candidate = _refused("best_of", why="is not supported above 1", allowed=(1,))
    _no_processors = _refused(
        "logits_processors", why="(custom logits processors) is not supported"
    )

    @field_validator("prompt_logprobs")
    @classmethod
    def _prompt_logprobs_whole(cls, value, info):
        if value is not None and info.data.get("stream"):
            raise ValueError("is not supported with stream (as in vLLM)")
        return value

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, value):
        if isinstance(value, list) and len(value) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(value)}")
        return value

    @field_validator("truncate_prompt_tokens")
    @classmethod
    def _keeps_a_token(cls, value):
        if value == 0:
            raise ValueError("must be -1 (the context window) or >= 1")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _token_ids(cls, value):
        for key in value or {}:
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
        return value

    def sampling_params(
        self,
        max_tokens: int,
        bad_words_token_ids: tuple[tuple[int, ...], ...] = (),
        lora: str | None = None,
        defaults: Mapping[str, float] = _NO_DEFAULTS,
    ) -> SamplingParams:
        """The engine's parameters; `bad_words_token_ids`: this request's bad_words, tokenized
        by the caller (engine.limits.bad_words_token_ids); `lora`: the LoRA adapter its
        `model` names (the ingress knows them), None: the base model; `defaults`: the
        model's sampling defaults (engine.model_store.generation_sampling_defaults) for the
        fields the request leaves out."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or ())
        with as_bad_request():
            return SamplingParams(
                max_tokens=max_tokens,
                temperature=self.sampling_value("temperature", defaults),
                top_p=self.sampling_value("top_p", defaults),
                top_k=int(self.sampling_value("top_k", defaults)),
                min_p=self.sampling_value("min_p", defaults),
                min_tokens=self.min_tokens or 0,
                seed=self.seed,
                stop=tuple(stop),
                stop_token_ids=tuple(self.stop_token_ids or ()),
                include_stop_str_in_output=self.include_stop_str_in_output,
                ignore_eos=self.ignore_eos,
                presence_penalty=_or(self.presence_penalty, 0.0),
                frequency_penalty=_or(self.frequency_penalty, 0.0),
                repetition_penalty=self.sampling_value("repetition_penalty", defaults),
                logit_bias=tuple((int(k), v) for k, v in (self.logit_bias or {}).items()),
                logprobs=self.num_logprobs,
                prompt_logprobs=self.num_prompt_logprobs,
                skip_special_tokens=self.skips_special_tokens,
                allowed_token_ids=tuple(self.allowed_token_ids or ()),
                bad_words_token_ids=bad_words_token_ids,
                structured_output=self.structure(),
                priority=self.priority,
                cache_salt=self.cache_salt,
                lora=lora,
            )

    def beam_search_width(self) -> int | None:
        """The beam width, n, of a request with use_beam_search (None: it samples), refusing
        what a beam search would not honour (vLLM's ignores these; a client would not see it)."""
        if not self.use_beam_search:
            if self.length_penalty != 1.0:
                raise APIError(
                    400, "length_penalty applies only with use_beam_search", "length_penalty"
                )
            return None
        if self.n > MAX_BEAMS:
            raise APIError(
                400, f"n (the beam width) is at most {MAX_BEAMS} with use_beam_search", "n"
            )
        for name, neutral in _BEAM_NEUTRAL.items():
            if getattr(self, name) not in neutral:
                raise APIError(400, f"{name} is not supported with use_beam_search", name)
        with as_bad_request():
            structure = self.structure()
        if structure is not None:
            what = structure.param
            raise APIError(400, f"{what} is not supported with use_beam_search", what)
        return self.n

    def sampling_value(self, name: str, defaults: Mapping[str, float]) -> float:
        """The request's `name` field; left out: the model's default, else OpenAI's."""
        value = getattr(self, name)
        return value if value is not None else defaults.get(name, SAMPLING_DEFAULTS[name])

    def structure(self) -> StructuredOutput | None:
        """The one constraint on the output's form, if any (app/structured.py)."""
        return structured_output(self)

    @property
    def skips_special_tokens(self) -> bool:
        return self.skip_special_tokens

    @property
    def num_logprobs(self) -> int | None:
        """Alternatives per token to return with each token's logprob; None: no logprobs."""
        raise NotImplementedError

    @property
    def num_prompt_logprobs(self) -> int | None:
        """The same for each prompt token; None: none."""
        return self.prompt_logprobs

    @property
    def shown(self) -> Shown:
        """What the response body carries beside the text."""
        return Shown(
            logprobs=self.num_logprobs,
            prompt_logprobs=self.prompt_logprobs,
            token_ids=self.return_token_ids,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's continuous_usage_stats; like vLLM, only with include_usage."""
        return self.include_usage and self.stream_options.continuous_usage_stats


class CompletionRequest(_Sampling):
    # one prompt (text or token ids) or a batch of them, as OpenAI takes it
    prompt: str | list[int] | list[str] | list[list[int]]
    # the sampled token's logprob and this many alternatives' (OpenAI allows 5, vLLM 20)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's: the tokenizer's BOS etc. around a text prompt
    prompt_embeds: str | list | None = None

    _no_embeds = _refused("prompt_embeds", why="is not supported (prompts are text or token ids)")

    _no_suffix = _refused("suffix", why="(insertion) is not supported")

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompts, each text or token ids; a batch's choices are numbered prompt by
        prompt (prompt i's choice j has index i * n + j)."""
        batch = (
            isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int)
        )
        return list(self.prompt) if batch else [self.prompt]

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        # echo with logprobs scores the prompt too (what evaluation harnesses ask for); the
        # engine computes the most alternatives either use asks for
        asked = [self.prompt_logprobs, self.logprobs if self.echo else None]
        return max((k for k in asked if k is not None), default=None)

    @property
    def shown(self) -> Shown:
        return Shown(
            logprobs=self.logprobs,
            echo_scores=self.echo and self.logprobs is not None,
            prompt_logprobs=self.prompt_logprobs,
            generated=not self.echo_only,
            token_ids=self.return_token_ids,
        )

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0: the prompt (and its scores) alone, nothing generated."""
        return self.echo and self.max_tokens == 0

    @property
    def completion_max_tokens(self) -> int | None:
        """OpenAI's default of 16 where max_tokens is left out; sent as null, no limit (None:
        up to the context window), as vLLM reads it."""
        if self.max_tokens is None and "max_tokens" not in self.model_fields_set:
            return 16
        return self.max_tokens


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict] | None = None
    # the conversation's earlier calls and their results, for the chat template
    tool_calls: list[dict] | None = None  # an assistant's
    tool_call_id: str | None = None  # a tool result's
    name: str | None = None
    # an assistant's thinking (a reply's, sent back), which reasoning models' templates show
    # in a tool-calling turn; vLLM's name and SGLang's
    reasoning: str | None = None
    reasoning_content: str | None = None

    @field_validator("content")
    @classmethod
    def _text_only(cls, value):
        for part in value if isinstance(value, list) else ():
            if part.get("type") != "text":
                raise ValueError(f"only text content parts are supported, got {part.get('type')!r}")
            if not isinstance(part.get("text"), str):
                raise ValueError(f"a text content part needs a string text, got {part!r:.80}")
        return value

    def text(self) -> str:
        if isinstance(self.content, list):  # [{"type": "text", "text": ...}, ...]
            return "".join(p["text"] for p in self.content)
        return self.content or ""

    def for_template(self) -> dict:
        extra = ("tool_calls", "tool_call_id", "name")
        message = {
            "role": self.role,
            "content": self.text(),
            **{k: getattr(self, k) for k in extra if getattr(self, k) is not None},
        }
        thought = self.reasoning_content or self.reasoning
        # the templates (Qwen3, DeepSeek-R1, GLM-4.5) read it as reasoning_content
        return message if thought is None else {**message, "reasoning_content": thought}


class ChatPrompt(BaseModel):
    """The chat template's inputs, as vLLM takes them (chat completions and /tokenize)."""

    messages: list[ChatMessage] = Field(min_length=1)
    # open the assistant's turn after the messages (unset: unless continue_final_message)
    add_generation_prompt: bool | None = None
    continue_final_message: bool = False  # leave the last message open, to be continued
    add_special_tokens: bool = False  # the template writes its own BOS
    chat_template_kwargs: dict | None = None  # extra variables of the template
    documents: list[dict[str, str]] | None = None  # for templates that take them (RAG)
    tools: list[Tool] | None = None  # the functions the model may call, for the template
    chat_template: str | None = None

    _model_template = _refused(
        "chat_template", why="is not taken from requests (the model's is used)"
    )

    @field_validator("continue_final_message")
    @classmethod
    def _one_open_turn(cls, value, info):
        if value and info.data.get("add_generation_prompt"):
            raise ValueError("cannot be true with add_generation_prompt true")
        return value

    @property
    def opens_turn(self) -> bool:
        """add_generation_prompt, by default true unless the last message is continued."""
        if self.add_generation_prompt is None:
            return not self.continue_final_message
        return self.add_generation_prompt

    # the server's default_chat_template_kwargs (AppArgs), set by the ingress before use
    _template_defaults: dict | None = PrivateAttr(None)

    def use_template_defaults(self, defaults: dict | None) -> None:
        self._template_defaults = defaults

    def template_kwargs(self) -> dict | None:
        """The template's extra variables: the server's defaults, then the request's."""
        own = self._own_template_kwargs()
        if not self._template_defaults:
            return own
        return {**self._template_defaults, **(own or {})}

    def _own_template_kwargs(self) -> dict | None:
        return self.chat_template_kwargs

    def template_tools(self) -> list[dict] | None:
        """The tools the template shows the model."""
        return [t.model_dump(exclude_none=True) for t in self.tools] if self.tools else None

    def prompt_ids(self, tokenizer) -> list[int]:
        messages = [m.for_template() for m in self.messages]
        with as_bad_request():
            return chat_token_ids(
                tokenizer,
                messages,
                add_generation_prompt=self.opens_turn,
                continue_final_message=self.continue_final_message,
                add_special_tokens=self.add_special_tokens,
                template_kwargs=self.template_kwargs(),
                documents=self.documents,
                tools=self.template_tools(),
            )


class ChatCompletionRequest(ChatPrompt, _Sampling):
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    functions: list | None = None
    function_call: str | dict | None = None
    tool_choice: ToolChoice | None = None  # app/tools.py: named, "required", "auto", "none"
    parallel_tool_calls: bool | None = None  # "required": more than one call (the default)
    # vLLM's: a last message from the assistant leads the reply's content (with
    # continue_final_message, the whole message)
    echo: bool = False
    # OpenAI's: how hard a reasoning model thinks; passed to the chat template (vLLM's way),
    # which may use it or not
    reasoning_effort: str | None = None
    # vLLM's: false leaves a reasoning model's thinking out of the reply (it is still counted)
    include_reasoning: bool = True

    _no_functions = _refused(
        "functions", "function_call", why="(the deprecated form) is not supported: use tools"
    )

    # the server's tool-call and reasoning parsers (AppArgs), set by the ingress before use
    _tool_parser: str | None = PrivateAttr(None)
    _reasoning_parser: str | None = PrivateAttr(None)

    def use_tool_parser(self, name: str | None) -> None:
        self._tool_parser = name

    def use_reasoning_parser(self, name: str | None) -> None:
        self._reasoning_parser = name

    @cached_property
    def tool_use(self) -> tuple[StructuredOutput | None, ToolCalls | AutoToolCalls] | None:
        """tool_choice(self): the constraint (None: "auto") and the reply's form of the tool
        calls, or None; worked out once: the prompt, the constraint and the reply all ask."""
        return tool_choice(self, self._tool_parser)

    def tool_calls(self) -> ToolCalls | AutoToolCalls | None:
        """How the reply shows the output's tool calls; None: as text."""
        with as_bad_request():
            use = self.tool_use
        return None if use is None else use[1]

    def _own_template_kwargs(self) -> dict | None:
        if self.reasoning_effort is None:
            return self.chat_template_kwargs
        return {"reasoning_effort": self.reasoning_effort, **(self.chat_template_kwargs or {})}

    def template_tools(self) -> list[dict] | None:
        # tool_choice "none" keeps the tools out of the prompt (vLLM's default)
        return super().template_tools() if self.tool_calls() else None

    @property
    def skips_special_tokens(self) -> bool:
        # a model's call markers may be special tokens (Hermes' <tool_call>, Llama's
        # <|python_tag|>): the parser must see them (vLLM's parsers ask the same)
        auto = isinstance(self.tool_calls(), AutoToolCalls)
        return self.skip_special_tokens and not auto

    def structure(self) -> StructuredOutput | None:
        structure = self._constraint()
        if structure is None or self._reasoning_parser is None:
            return structure
        # a reasoning model thinks freely first; the constraint shapes its answer (vLLM's way)
        thinking, tags = REASONING_PARSERS[self._reasoning_parser].think_block()
        return dataclasses.replace(structure, thinking=thinking, think_tags=tags)

    def _constraint(self) -> StructuredOutput | None:
        other = structured_output(self)
        use = self.tool_use
        if use is None:
            return other
        if self.echo:
            raise InvalidRequestError("echo cannot be combined with tool calls", "echo")
        if use[0] is None:  # "auto": the model's own text, which a constraint may shape
            return other
        if other is not None:
            raise InvalidRequestError(
                f"{other.param} cannot be combined with a forced tool_choice (one structured "
                "output constraint per request)",
                other.param,
            )
        return use[0]

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs_need_logprobs(cls, value, info):
        if value and not info.data.get("logprobs"):
            raise ValueError("requires logprobs: true")
        return value

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def echo_text(self) -> str:
        last = self.messages[-1]
        return last.text() if self.echo and last.role == "assistant" else ""


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize of a text prompt."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False

    def prompt_ids(self, tokenizer) -> list[int]:
        return tokenizer(self.prompt, add_special_tokens=self.add_special_tokens).input_ids


class TokenizeChatRequest(ChatPrompt):
    """vLLM's /tokenize of chat messages (the ids a chat completion would prefill)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    return_token_strs: bool = False


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    tokens: list[int]


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _no_constant(name: str):
    raise ValueError(f"{name} is not a JSON value")


# a \uD800-\uDFFF escape: half of a pair (an escaped emoji) or, alone, no character at all
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")


def parse_object(body: bytes) -> dict:
    """A request body as a JSON object, or a 400."""
    try:  # NaN and Infinity are not JSON (Python's json reads them): no field may hold them
        data = json.loads(body, parse_float=_finite, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise APIError(400, f"request body is not valid JSON: {e}") from e
    except RecursionError as e:  # arrays or objects nested past Python's recursion limit
        raise APIError(400, "request body nests arrays or objects too deeply to read") from e
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object")
    # Python's json reads an unpaired surrogate escape into a str that no tokenizer, grammar
    # or UTF-8 encoder takes; only a body with such escapes is walked
    if _SURROGATE_ESCAPE.search(body) and (where := _lone_surrogate(data, "")) is not None:
        field = where or "a key"
        message = f"{field} holds an unpaired UTF-16 surrogate escape, which is not a character"
        raise APIError(400, f"request body is not valid JSON text: {message}", where or None)
    return data


def _lone_surrogate(value, path: str) -> str | None:
    """The path of the first string (or key: reported as its object's path) that holds an
    unpaired surrogate, else None."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            inner = f"{path}.{key}" if path else key
            if _lone_surrogate(key, path) is not None:
                return path
            if (found := _lone_surrogate(item, inner)) is not None:
                return found
    if isinstance(value, list):
        for i, item in enumerate(value):
            if (found := _lone_surrogate(item, f"{path}[{i}]")) is not None:
                return found
    return None


def validated(data: dict, cls: type[BaseModel]) -> BaseModel:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from e


def parse(body: bytes, cls: type[BaseModel]) -> BaseModel:
    return validated(parse_object(body), cls)
