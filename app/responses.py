"""OpenAI's Responses API (`POST /v1/responses`) on top of chat completions: a request's
`input` items, `instructions`, function `tools`, `text.format` and the rest become a chat
completion request (so the chat template, the tool-call parser, structured outputs and every
check apply as they do to chat), and the chat reply becomes a Response: its output items (a
message, function calls), its status and usage, and, streamed, OpenAI's typed events
(response.created ... response.completed, each with a sequence_number).

Stateless by default, as vLLM: `store` is accepted and nothing is kept (the response says
`store: false`), so `previous_response_id` is a 404; with the ingress's responses_store_size,
the application keeps that many responses (app/response_store.py) for previous_response_id
and GET / DELETE /v1/responses/{id}. `background` is a 400. Fields that would
change the output and are not served (built-in tools, `reasoning`, `truncation: auto`,
`max_tool_calls`, reusable prompts, conversations) are refused rather than ignored.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from app.formats import ChatFormat
from app.protocol import APIError, ChatCompletionRequest, validated
from app.response_store import StoredResponse
from engine import RequestOutput
from engine.sampling_params import MAX_LOGPROBS

# what include asks for to get each output token's logprobs (top_logprobs: alternatives)
LOGPROBS_INCLUDE = "message.output_text.logprobs"
# vLLM's sampling fields a Responses request may carry, passed to the chat request as they are
SAMPLING_EXTRAS = (
    "top_k", "min_p", "min_tokens", "seed", "stop", "stop_token_ids", "ignore_eos",
    "include_stop_str_in_output", "presence_penalty", "frequency_penalty",
    "repetition_penalty", "logit_bias", "skip_special_tokens", "allowed_token_ids",
    "bad_words", "structured_outputs", "priority", "chat_template_kwargs", "cache_salt",
)  # fmt: skip
# chat's name of a field -> the Responses request's, for errors
_PARAMS = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format": "text.format",
}


class ResponsesRequest(BaseModel):
    """The fields of a Responses request that are served (or refused by name); others are
    ignored, as chat's are (e.g. service_tier, prompt_cache_key, safety_identifier)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None  # left out: the base model, as in a chat completion
    input: str | list[dict] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    include: list[str] | None = None
    stream: bool = False
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool | None = None
    text: dict | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None  # accepted; nothing is stored
    previous_response_id: str | None = None
    background: bool | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict | None = None
    max_tool_calls: int | None = None
    prompt: dict | None = None
    conversation: str | dict | None = None

    def check_served(self, reasons: bool = False) -> None:
        """Refuse what this server cannot do, naming the field; `reasons`: the server splits
        a reasoning model's thinking (its reasoning_parser)."""
        refused = {
            "background": (self.background, " (it needs stored responses)"),
            "conversation": (self.conversation, " (it needs stored responses)"),
            "truncation": (self.truncation == "auto", ' "auto": prompts are never cut'),
            "reasoning": (
                _set(self.reasoning) and not reasons,
                " (this server has no reasoning_parser: its model is not served as one that "
                "reasons)",
            ),
            "max_tool_calls": (self.max_tool_calls is not None, ""),
            "prompt": (self.prompt, " (stored prompt templates)"),
        }
        for name, (value, why) in refused.items():
            if value:
                raise APIError(400, f"{name} is not supported{why}", name)

    def chat_data(self, reasons: bool = False, prior: list[dict] = ()) -> dict:
        """The chat completion request this one is, as its JSON object; `prior`: the earlier
        turns' items (previous_response_id's conversation)."""
        self.check_served(reasons)
        data = {
            "model": self.model,
            "messages": self._messages(prior),
            "max_completion_tokens": self.max_output_tokens,
            "stream": self.stream,
        }
        for name in ("temperature", "top_p", "parallel_tool_calls"):
            if getattr(self, name) is not None:
                data[name] = getattr(self, name)
        if self.tools is not None:
            data["tools"] = [_chat_tool(t, i) for i, t in enumerate(self.tools)]
        if self.tool_choice is not None:
            data["tool_choice"] = _chat_tool_choice(self.tool_choice)
        if LOGPROBS_INCLUDE in (self.include or ()):
            data["logprobs"], data["top_logprobs"] = True, self.top_logprobs or 0
        if (self.reasoning or {}).get("effort") is not None:
            data["reasoning_effort"] = self.reasoning["effort"]
        response_format = _response_format((self.text or {}).get("format"))
        if response_format is not None:
            data["response_format"] = response_format
        return data

    @property
    def input_items(self) -> list[dict]:
        """This turn's input as items (a text is one user message)."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return self.input

    def _messages(self, prior: list[dict] = ()) -> list[dict]:
        # the instructions are this request's own: a previous response's do not carry over
        messages = [] if self.instructions is None else [_message("system", self.instructions)]
        for i, item in enumerate(prior):
            _add_item(messages, item, f"previous_response_id.{i}")
        for i, item in enumerate(self.input_items):
            _add_item(messages, item, f"input.{i}")
        return _with_thoughts(messages)


def _set(options: dict | None) -> bool:
    """Whether an options object sets anything (clients send {"effort": null} for none)."""
    return any(v is not None for v in (options or {}).values())


def responses_request(data: dict) -> ResponsesRequest:
    """The Responses request in `data` (a request body); a 400 naming the field otherwise."""
    return validated(data, ResponsesRequest)


def chat_request(
    req: ResponsesRequest, data: dict, reasons: bool = False, prior: list[dict] | None = None
) -> ChatCompletionRequest:
    """-> the chat request `req` is; the body's (`data`'s) vLLM sampling fields pass through
    as they are. `reasons`: the server splits a reasoning model's thinking; `prior`: the items
    of the stored conversation that req's previous_response_id continues (None: the server
    stores no responses, so that is a 404)."""
    if req.previous_response_id is not None and prior is None:
        raise not_stored(req.previous_response_id, "previous_response_id")
    chat = req.chat_data(reasons, prior or [])
    chat.update({k: data[k] for k in SAMPLING_EXTRAS if k in data})
    with renamed_params():
        return validated(chat, ChatCompletionRequest)


def renamed(error: APIError) -> APIError:
    """`error` naming the Responses request's field where it names chat's."""
    head, dot, rest = (error.param or "").partition(".")
    if head in _PARAMS:
        new = _PARAMS[head] + dot + rest
        error.message = error.message.replace(error.param, new, 1)
        error.param = new
    return error


@contextlib.contextmanager
def renamed_params() -> Iterator[None]:
    """An APIError raised inside names the Responses request's field, not chat's."""
    try:
        yield
    except APIError as e:
        raise renamed(e) from e.__cause__


_THOUGHT = "reasoning item"  # a place holder among the messages, never a chat role


def _with_thoughts(messages: list[dict]) -> list[dict]:
    """Reasoning items become the reasoning_content of the assistant message that follows
    them (the templates of reasoning models show it in a tool-calling turn)."""
    out, thought = [], None
    for message in messages:
        if message["role"] == _THOUGHT:
            thought = message["content"]
            continue
        if message["role"] == "assistant" and thought:
            message = {**message, "reasoning_content": thought}
        thought = None
        out.append(message)
    return out


def _message(role: str, text: str) -> dict:
    return {"role": role, "content": text}


def _add_item(messages: list[dict], item: dict, where: str) -> None:
    """Append one input item to the chat messages: a message, a function call (joined to the
    assistant message before it) or a call's output."""
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise APIError(400, f"{where}.role: must be user, system, developer or assistant, "
                           f"got {role!r}", f"{where}.role")  # fmt: skip
        messages.append(_message(role, _text(item.get("content"), f"{where}.content")))
    elif kind == "function_call":
        call = {
            "id": _field(item, "call_id", where),
            "type": "function",
            "function": {
                "name": _field(item, "name", where), "arguments": _field(item, "arguments", where)
            },
        }  # fmt: skip
        last = messages[-1] if messages else None
        if last is None or last["role"] != "assistant":
            last = {"role": "assistant", "content": ""}
            messages.append(last)
        last.setdefault("tool_calls", []).append(call)
    elif kind == "reasoning":  # an earlier turn's thinking: its next assistant message's
        parts = item.get("content") or item.get("summary") or []
        text = "".join(p.get("text", "") for p in parts if isinstance(p, dict))
        messages.append({"role": _THOUGHT, "content": text})
    elif kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _text(output, f"{where}.output")
        messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", where),
                         "content": text})  # fmt: skip
    else:
        raise APIError(
            400,
            f"{where}.type: {kind!r} items are not supported (message, function_call, "
            "function_call_output, reasoning)",
            f"{where}.type",
        )


def _field(item: dict, name: str, where: str) -> str:
    value = item.get(name)
    if not isinstance(value, str):
        raise APIError(400, f"{where}.{name}: a string is required", f"{where}.{name}")
    return value


def _text(content, where: str) -> str:
    """A message's text: a string, or its text parts (input_text, output_text) joined."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise APIError(400, f"{where}: a string or a list of content parts is required", where)
    texts = []
    for i, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text") or not isinstance(
            part.get("text"), str
        ):
            raise APIError(400, f"{where}.{i}: only text content parts are supported, got "
                           f"{kind!r}", f"{where}.{i}")  # fmt: skip
        texts.append(part["text"])
    return "".join(texts)


def _chat_tool(tool: dict, i: int) -> dict:
    """A Responses function tool ({type, name, parameters, ...}) as chat's."""
    if tool.get("type") != "function":
        raise APIError(
            400, f"tools.{i}.type: only function tools are supported, got {tool.get('type')!r}",
            f"tools.{i}.type",
        )  # fmt: skip
    keys = ("name", "description", "parameters", "strict")
    return {"type": "function", "function": {k: tool[k] for k in keys if k in tool}}


def _chat_tool_choice(choice: str | dict) -> str | dict:
    if isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise APIError(
        400, 'tool_choice: "none", "auto", "required" or {"type": "function", "name": ...}',
        "tool_choice",
    )  # fmt: skip


def _response_format(fmt: dict | None) -> dict | None:
    """text.format ({type: text | json_object | json_schema, name, schema, strict}) as chat's
    response_format."""
    if fmt is not None and not isinstance(fmt, dict):
        raise APIError(400, 'text.format must be an object such as {"type": "text"}', "text.format")
    if fmt is None or fmt.get("type") == "text":
        return None
    if fmt.get("type") == "json_schema":
        keys = ("name", "description", "schema", "strict")
        return {"type": "json_schema", "json_schema": {k: fmt[k] for k in keys if k in fmt}}
    return fmt  # json_object, or a type chat's validation refuses by name


class ResponseFormat:
    """A Response, whole or as its stream of events, built from a chat completion's outputs
    (one choice): its text becomes a message item, its tool calls function_call items."""

    def __init__(
        self,
        req: ResponsesRequest,
        chat: ChatFormat,
        temperature: float,
        top_p: float,
        stored: bool = False,
    ) -> None:
        """`stored`: the response is kept once it has ended (then it is `ended`), and says
        `store: true`."""
        self.req, self.chat, self.stored = req, chat, stored
        self.ended: dict | None = None  # the response once it has completed or is incomplete
        self.sampling = {"temperature": temperature, "top_p": top_p}
        self.id = "resp_" + chat.id.removeprefix("chatcmpl-")
        self.sequence_number = 0
        self.items: list[dict] = []  # streamed: the items ended so far
        self.open: dict | None = None  # streamed: the item being written

    def add(self, index: int, out: RequestOutput) -> RequestOutput:
        return self.chat.add(index, out)

    # ---- the whole response ----------------------------------------------------------------

    def final(self) -> dict:
        choice = self.chat.final()["choices"][0]
        message, items = choice["message"], []
        status = _item_status(choice["finish_reason"])
        if message.get("reasoning"):
            part = {"type": "reasoning_text", "text": message["reasoning"]}
            answered = message.get("content") or message.get("tool_calls")
            done = "completed" if answered else status  # else the reasoning was cut short
            items.append({**self._reasoning_item(0), "status": done, "content": [part]})
        if message.get("content"):
            logprobs = (choice["logprobs"] or {}).get("content")
            part = _output_text(message["content"], logprobs)
            items.append({**self._message_item(len(items)), "status": status, "content": [part]})
        for call in message.get("tool_calls") or ():
            item = {**self._call_item(call, len(items)), "status": "completed"}
            items.append({**item, "arguments": call["function"]["arguments"]})
        return self._done(self.body(items, choice["finish_reason"]))

    def body(self, output: list[dict], finish_reason: str | None = None) -> dict:
        """The Response object; `finish_reason`: chat's (None: still running)."""
        status, incomplete = "in_progress" if finish_reason is None else "completed", None
        if finish_reason == "length":
            status, incomplete = "incomplete", {"reason": "max_output_tokens"}
        req = self.req
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.chat.created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.chat.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "reasoning": None,
            "store": self.stored,
            **self.sampling,
            "text": req.text or {"format": {"type": "text"}},
            "tool_choice": req.tool_choice or ("auto" if req.tools else "none"),
            "tools": req.tools or [],
            "top_logprobs": req.top_logprobs,
            "truncation": "disabled",
            "usage": None if finish_reason is None else self._usage(),
            "user": req.user,
            "metadata": req.metadata or {},
        }

    def _done(self, body: dict) -> dict:
        self.ended = body
        return body

    def _usage(self) -> dict:
        usage = self.chat.usage
        cached = usage.get("prompt_tokens_details", {}).get("cached_tokens", 0)
        thought = usage.get("completion_tokens_details", {}).get("reasoning_tokens", 0)
        return {
            "input_tokens": usage["prompt_tokens"],
            # cache_write_tokens: the engine does not count what a prompt adds to its cache
            "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": usage["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": thought},
            "total_tokens": usage["total_tokens"],
        }

    def _message_item(self, index: int) -> dict:
        return {"id": f"msg_{self._tail}_{index}", "type": "message", "status": "in_progress",
                "role": "assistant", "content": []}  # fmt: skip

    def _reasoning_item(self, index: int) -> dict:
        return {"id": f"rs_{self._tail}_{index}", "type": "reasoning", "status": "in_progress",
                "summary": [], "content": []}  # fmt: skip

    def _call_item(self, call: dict, index: int) -> dict:
        return {"id": f"fc_{self._tail}_{index}", "type": "function_call",
                "status": "in_progress", "call_id": call["id"],
                "name": call["function"]["name"], "arguments": ""}  # fmt: skip

    @property
    def _tail(self) -> str:
        return self.id.removeprefix("resp_")

    # ---- streamed ------------------------------------------------------------------------------

    def opening(self) -> list[str]:
        """The events before any output."""
        body = self.body([])
        return [self._event("response.created", response=body),
                self._event("response.in_progress", response=body)]  # fmt: skip

    def events(self, index: int, out: RequestOutput) -> list[str]:
        """The events of an output already add()ed: chat's chunk as items and deltas."""
        choice = self.chat.chunk(index, out)["choices"][0]
        delta, events = choice["delta"], []
        if delta.get("reasoning"):
            events += self._thought(delta["reasoning"])
        if delta.get("content"):
            events += self._text(delta["content"], (choice["logprobs"] or {}).get("content"))
        for call in delta.get("tool_calls") or ():
            events += self._call(call)
        if choice["finish_reason"] is not None:
            events += self._end_item(_item_status(choice["finish_reason"]))
            body = self.body(self.items, choice["finish_reason"])
            done = "response.incomplete" if body["status"] == "incomplete" else "response.completed"
            events.append(self._event(done, response=self._done(body)))
        return events

    def failed(self, error: APIError) -> list[str]:
        """The events ending a stream that failed after it started."""
        code = "server_error" if error.status >= 500 else "invalid_prompt"
        body = {**self.body(self.items), "status": "failed",
                "error": {"code": code, "message": error.message}}  # fmt: skip
        return [
            self._event("error", code=code, message=error.message, param=error.param),
            self._event("response.failed", response=body),
        ]

    def _text(self, text: str, logprobs: list | None) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != "message":
            events += self._end_item()
            self.open = self._message_item(len(self.items))
            events.append(self._item_event("response.output_item.added"))
            self.open["content"].append(_output_text("", [] if logprobs is not None else None))
            events.append(self._part_event("response.content_part.added"))
        part = self.open["content"][0]
        part["text"] += text
        if logprobs is not None:
            part["logprobs"] += logprobs
        return [*events, self._in_item("response.output_text.delta", content_index=0,
                                       delta=text, logprobs=logprobs or [])]  # fmt: skip

    def _thought(self, text: str) -> list[str]:
        events = []
        if self.open is None or self.open["type"] != "reasoning":
            events += self._end_item()
            self.open = self._reasoning_item(len(self.items))
            events.append(self._item_event("response.output_item.added"))
            self.open["content"].append({"type": "reasoning_text", "text": ""})
        self.open["content"][0]["text"] += text
        return [*events, self._in_item("response.reasoning_text.delta", content_index=0,
                                       delta=text)]  # fmt: skip

    def _call(self, call: dict) -> list[str]:
        events = []
        if "id" in call:  # a new call: its id and name come first
            events += self._end_item()
            self.open = self._call_item(call, len(self.items))
            events.append(self._item_event("response.output_item.added"))
        arguments = call["function"].get("arguments", "")
        self.open["arguments"] += arguments
        if arguments:
            events.append(self._in_item("response.function_call_arguments.delta", delta=arguments))
        return events

    def _end_item(self, status: str = "completed") -> list[str]:
        """The events that end the item being written, if any; `status`: a message's."""
        item = self.open
        if item is None:
            return []
        if item["type"] == "reasoning":
            text = item["content"][0]["text"]
            events = [self._in_item("response.reasoning_text.done", content_index=0, text=text)]
        elif item["type"] == "message":
            part = item["content"][0]
            events = [
                self._in_item("response.output_text.done", content_index=0, text=part["text"],
                              logprobs=part.get("logprobs", [])),
                self._part_event("response.content_part.done"),
            ]  # fmt: skip
        else:
            events = [self._in_item("response.function_call_arguments.done", name=item["name"],
                                    arguments=item["arguments"])]  # fmt: skip
        item["status"] = "completed" if item["type"] == "function_call" else status
        events.append(self._item_event("response.output_item.done"))
        self.items.append(item)
        self.open = None
        return events

    def _item_event(self, kind: str) -> str:
        return self._event(kind, output_index=len(self.items), item=self.open)

    def _part_event(self, kind: str) -> str:
        return self._in_item(kind, content_index=0, part=self.open["content"][0])

    def _in_item(self, kind: str, **fields) -> str:
        """An event about the item being written."""
        return self._event(kind, item_id=self.open["id"], output_index=len(self.items), **fields)

    def _event(self, kind: str, **fields) -> str:
        # written at once: later changes to the open item do not reach events already made
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"


def _item_status(finish_reason: str | None) -> str:
    """A message's status: cut by max_output_tokens, "incomplete" (as OpenAI)."""
    return "incomplete" if finish_reason == "length" else "completed"


def _output_text(text: str, logprobs: list | None) -> dict:
    part = {"type": "output_text", "text": text, "annotations": []}
    return part if logprobs is None else {**part, "logprobs": logprobs}


async def sse(
    view: ResponseFormat,
    outputs: AsyncIterator,
    on_done: Callable[[dict], Awaitable[None]] | None = None,
) -> AsyncIterator[str]:
    """The SSE stream of a Response from `outputs` ((choice index, RequestOutput) pairs),
    closed with the stream (the client leaving aborts the request). `on_done` (storing the
    response) is awaited before the last event: a client's next turn finds it."""
    for event in view.opening():
        yield event
    async with contextlib.aclosing(outputs):
        try:
            async for index, out in outputs:
                view.add(index, out)
                events = view.events(index, out)
                if view.ended is not None and on_done is not None:
                    await on_done(view.ended)
                for event in events:
                    yield event
        except APIError as e:  # after the status was sent: OpenAI's error and failed events
            for event in view.failed(renamed(e)):
                yield event


class StoreClient:
    """An ingress replica's side of the store: requests' errors (404 naming the field) and a
    store that cannot be reached (503)."""

    def __init__(self, handle) -> None:
        self.handle = handle  # the ResponseStoreServer deployment's

    async def put(self, body: dict, items: list[dict]) -> None:
        await self._call("put", body, items)

    async def get(self, response_id: str, param: str = "response_id") -> StoredResponse:
        stored = await self._call("get", response_id)
        if stored is None:
            raise not_stored(response_id, param, stores=True)
        return stored

    async def delete(self, response_id: str) -> dict:
        if not await self._call("delete", response_id):
            raise not_stored(response_id, "response_id", stores=True)
        return {"id": response_id, "object": "response", "deleted": True}

    async def _call(self, method: str, *args):
        from ray.exceptions import RayError
        from ray.serve.exceptions import RayServeException

        try:
            return await getattr(self.handle, method).remote(*args)
        except (RayError, RayServeException) as e:  # its replica gone: Serve starts another
            message = f"the response store is unavailable: {e}"
            raise APIError(503, message, kind="server_error") from e


def not_stored(response_id: str, param: str, stores: bool = False) -> APIError:
    why = (
        "it was not stored, or no longer is"
        if stores
        else "this server stores no responses (ingress.responses_store_size)"
    )
    return APIError(
        404,
        f"response {response_id!r} not found: {why}; send the conversation's items in input "
        "instead",
        param,
        "not_found_error",
    )
