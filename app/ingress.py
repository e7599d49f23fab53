"""The OpenAI-compatible HTTP ingress: validates, tokenizes, routes, streams.

Disaggregated flow per request: prefill replica (first token streamed at once) -> KV handed to
a decode replica on the same node where one exists (SameNodeRouter) -> tokens stream back.
Colocated flow: one replica does both. Closing the client connection cancels the handle calls,
which aborts the request on whichever replica holds it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from app.config import AppArgs
from app.logprobs import TokenTexts, chat_logprobs, completion_logprobs
from app.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse
from engine import InvalidRequestError, RequestOutput, SamplingParams, TokenLogprob
from engine.limits import chat_token_ids, check_lengths
from engine.model_store import resolve_model

logger = logging.getLogger(__name__)


class Ingress:
    def __init__(self, args: dict, prefill=None, decode=None, colocated=None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.args = AppArgs.model_validate(args)
        path = resolve_model(self.args.model)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.token_texts = TokenTexts(self.tokenizer)
        window = AutoConfig.from_pretrained(path).get_text_config().max_position_embeddings
        self.max_model_len = min(self.args.max_model_len or window, window)
        self.prefill, self.decode, self.colocated = prefill, decode, colocated
        self.num_in_flight = 0
        self._kv_capacity: int | None = None  # smallest replica KV cache, fetched once
        self.created = int(time.time())
        from deployments.metrics import RequestMetrics

        self.metrics = RequestMetrics()

    async def __call__(self, request: Request) -> Response:
        try:
            return await self._route(request)
        except APIError as e:
            return e.response()

    async def _route(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        root = request.scope.get("root_path", "")  # the application's route_prefix
        if root and path.startswith(root):
            path = path[len(root) :]
        path = path.rstrip("/")
        if path == "/health" and method == "GET":
            return JSONResponse({"status": "ok"})
        if path == "/v1/models" and method == "GET":
            return JSONResponse({"object": "list", "data": [self._model_card()]})
        if path == "/v1/completions" and method == "POST":
            return await self._generate(await request.body(), chat=False)
        if path == "/v1/chat/completions" and method == "POST":
            return await self._generate(await request.body(), chat=True)
        raise APIError(404, f"no route {method} {path}", kind="not_found_error")

    async def _capacity(self) -> int:
        """The KV cache of the smallest replica a request passes through (same per deployment)."""
        if self._kv_capacity is None:
            handles = [h for h in (self.prefill, self.decode, self.colocated) if h is not None]
            sizes = [await h.max_request_tokens.remote() for h in handles]
            self._kv_capacity = min(sizes)
        return self._kv_capacity

    def _model_card(self) -> dict:
        return {
            "id": self.args.served_model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "splitserve",
            "max_model_len": self.max_model_len,
        }

    # ---- requests ------------------------------------------------------------------------------

    def _prepare(
        self, body: bytes, chat: bool, kv_capacity: int
    ) -> tuple[object, list[int], SamplingParams]:
        req = parse(body, ChatCompletionRequest if chat else CompletionRequest)
        if req.model != self.args.served_model_name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves "
                f"{self.args.served_model_name!r}",
                "model",
                "not_found_error",
            )
        if chat:
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            ids = chat_token_ids(self.tokenizer, messages)
            max_tokens = req.max_completion_tokens or req.max_tokens
        else:
            prompt = req.prompt
            ids = self.tokenizer(prompt).input_ids if isinstance(prompt, str) else list(prompt)
            max_tokens = req.max_tokens if req.max_tokens is not None else 16
        if max_tokens is None:  # chat without a limit: up to the context window
            max_tokens = max(1, self.max_model_len - len(ids))
        try:  # the same limits as the engine, with the smallest replica cache on the path
            check_lengths(len(ids), max_tokens, self.max_model_len, kv_capacity)
        except InvalidRequestError as e:
            param = "messages" if chat and e.param == "prompt" else e.param
            raise APIError(400, str(e), param) from e
        return req, ids, req.sampling_params(max_tokens)

    async def _generate(self, body: bytes, chat: bool) -> Response:
        req, ids, params = self._prepare(body, chat, await self._capacity())
        if self.num_in_flight >= self.args.ingress.max_queued_requests:
            raise APIError(
                503,
                "server overloaded: too many requests in flight, retry later",
                kind="overloaded_error",
            )
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        # The first output (the prefill) is awaited before any response is started, so an
        # error a replica raises (e.g. beyond its KV cache) still becomes an HTTP status.
        outputs = await _primed(self._outputs(request_id, ids, params))
        fmt = _ChatFormat if chat else _CompletionFormat
        texts = None if params.logprobs is None else self.token_texts
        view = fmt(request_id, self.args.served_model_name, len(ids), texts)
        if req.stream:
            return StreamingResponse(
                self._sse(view, outputs, req.include_usage), media_type="text/event-stream"
            )
        async for out in outputs:
            view.add(out)
        return JSONResponse(view.final())

    async def _sse(self, view, outputs: AsyncIterator[RequestOutput], usage: bool):
        async with contextlib.aclosing(outputs):
            async for out in outputs:
                view.add(out)
                yield f"data: {json.dumps(view.chunk(out))}\n\n"
        if usage:
            yield f"data: {json.dumps(view.usage_chunk())}\n\n"
        yield "data: [DONE]\n\n"

    async def _outputs(
        self, request_id: str, ids: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        self.num_in_flight += 1
        stream = prefill = None
        clock = _Clock(self.metrics, self.args.mode)
        try:
            if self.args.mode == "colocated":
                stream = self.colocated.options(stream=True).generate.remote(
                    request_id, ids, params
                )
            else:
                prefill = self.prefill.options(stream=True).prefill.remote(request_id, ids, params)
                yield clock.seen(await anext(prefill))  # first token, before KV is published
                result = await anext(prefill)
                if result.handoff is None:
                    return
                stream = self.decode.options(stream=True).decode.remote(
                    result.handoff, result.pieces, prefill_node_id=result.node_id
                )
            async for out in stream:
                yield clock.seen(out)
        except InvalidRequestError as e:  # raised by a replica
            raise APIError(400, str(e), getattr(e, "param", None)) from e
        except APIError:
            raise
        except Exception as e:  # a replica failed it (a dead model worker, a failed step)
            logger.warning("request %s failed in a replica: %r", request_id, e)
            message = f"the request failed in a model replica ({type(e).__name__}); retry it"
            raise APIError(503, message, kind="server_error") from e
        finally:
            self.num_in_flight -= 1
            for call in (prefill, stream):  # no-op once finished; aborts on disconnect
                if call is not None:
                    call.cancel()


class _Clock:
    """Times one request as the client sees it and records it when it finishes."""

    def __init__(self, metrics, mode: str) -> None:
        self.metrics, self.mode = metrics, mode
        self.start = time.perf_counter()
        self.first: float | None = None

    def seen(self, out: RequestOutput) -> RequestOutput:
        now = time.perf_counter() - self.start
        self.first = now if self.first is None else self.first
        if out.finished:
            self.metrics.on_finish(
                self.mode, self.first, now, out.num_output_tokens, out.finish_reason
            )
        return out


async def _primed(outputs: AsyncIterator[RequestOutput]) -> AsyncIterator[RequestOutput]:
    """Pull the first item now (raising its error here); -> an iterator over all items."""
    first = await anext(outputs)

    async def chained() -> AsyncIterator[RequestOutput]:
        async with contextlib.aclosing(outputs):  # closing this closes the request's stream
            yield first
            async for out in outputs:
                yield out

    return chained()


class _CompletionFormat:
    object_name = "text_completion"

    def __init__(
        self,
        request_id: str,
        model: str,
        num_prompt_tokens: int,
        token_texts: TokenTexts | None = None,  # None: the request asked for no logprobs
    ) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.num_prompt_tokens, self.num_output_tokens = num_prompt_tokens, 0
        self.text, self.finish_reason = [], None
        self.token_texts = token_texts
        self.logprobs: list[TokenLogprob] = []
        self.streamed_tokens_len = 0  # the next chunk's first text_offset

    def add(self, out: RequestOutput) -> None:
        self.text.append(out.new_text)
        self.logprobs.extend(out.logprobs or ())
        self.num_output_tokens = out.num_output_tokens
        self.finish_reason = out.finish_reason or self.finish_reason

    def _logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict | None:
        if self.token_texts is None:
            return None
        return completion_logprobs(entries, self.token_texts, offset)

    def _chunk_logprobs(self, out: RequestOutput) -> dict | None:
        logprobs = self._logprobs(out.logprobs or [], self.streamed_tokens_len)
        if logprobs is not None:
            self.streamed_tokens_len += sum(len(t) for t in logprobs["tokens"])
        return logprobs

    def _envelope(self, choices: list[dict], object_name: str | None = None) -> dict:
        return {
            "id": self.id,
            "object": object_name or self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    @property
    def usage(self) -> dict:
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_output_tokens,
            "total_tokens": self.num_prompt_tokens + self.num_output_tokens,
        }

    def chunk(self, out: RequestOutput) -> dict:
        reason = _openai_reason(out.finish_reason)
        logprobs = self._chunk_logprobs(out)
        return self._envelope(
            [{"index": 0, "text": out.new_text, "logprobs": logprobs, "finish_reason": reason}]
        )

    def usage_chunk(self) -> dict:
        return {**self._envelope([]), "usage": self.usage}

    def final(self) -> dict:
        choice = {
            "index": 0,
            "text": "".join(self.text),
            "logprobs": self._logprobs(self.logprobs),
            "finish_reason": _openai_reason(self.finish_reason),
        }
        return {**self._envelope([choice]), "usage": self.usage}


class _ChatFormat(_CompletionFormat):
    object_name = "chat.completion.chunk"

    def _logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict | None:
        return None if self.token_texts is None else chat_logprobs(entries, self.token_texts)

    def _chunk_logprobs(self, out: RequestOutput) -> dict | None:
        return self._logprobs(out.logprobs or [])

    def chunk(self, out: RequestOutput) -> dict:
        delta = {"content": out.new_text}
        if self.num_output_tokens == out.num_output_tokens and len(self.text) == 1:
            delta["role"] = "assistant"  # the first chunk names the role
        return self._envelope(
            [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": self._chunk_logprobs(out),
                    "finish_reason": _openai_reason(out.finish_reason),
                }
            ]
        )

    def final(self) -> dict:
        message = {"role": "assistant", "content": "".join(self.text)}
        choice = {
            "index": 0,
            "message": message,
            "logprobs": self._logprobs(self.logprobs),
            "finish_reason": _openai_reason(self.finish_reason),
        }
        return {**self._envelope([choice], "chat.completion"), "usage": self.usage}


def _openai_reason(reason: str | None) -> str | None:
    return None if reason is None else {"abort": "stop"}.get(reason, reason)
