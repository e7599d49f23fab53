"""Several models behind one OpenAI endpoint, as Ray Serve LLM's `build_openai_app` serves a
list of LLMConfigs: each model is a whole splitserve application of its own (its Ingress, its
prefill and decode, or colocated, deployments; app.builder.build_multi_model_app), and this
router, the HTTP ingress, sends each request to the Ingress of the model its `model` field
names (a served name, or one of that model's LoRA adapters).

The router forwards the request as it came (ForwardedRequest) and relays the Ingress's answer
(ForwardedStart, then the body's chunks), so every model answers exactly as it does alone:
its errors, its streams, its API key. It costs one more hop per request and per stream chunk;
a single model's application has no router. GET /v1/models lists every model's cards,
/health is 200 when every model's is, and the router answers /metrics itself: the whole
application's series, each model's under vLLM's names with its own `model_name`.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from app import metrics_page
from app.config import AppArgs, RouterArgs
from app.cors import Cors
from app.event_stream import EventStream
from app.protocol import APIError, answered
from app.replica_calls import this_process_transport
from app.request_body import read_body
from deployments.cancel_noise import quiet_cancelled_calls
from engine.config import lora_path

_OPEN_PATHS = ("/health", "/ping")
HEALTH_WAIT_S = 5.0  # a model's Ingress that answers no /health in this time is not ready
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request, from the router to a model's Ingress."""

    method: str
    path: str  # without the application's route prefix
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    client: tuple[str, int] | None


@dataclass(frozen=True)
class ForwardedStart:
    """The head of an Ingress's answer to a ForwardedRequest; its body's chunks follow
    (one chunk unless `streaming`)."""

    status: int
    headers: list[tuple[bytes, bytes]]
    streaming: bool


async def forward_request(request: Request, path: str, max_body_mb: float) -> ForwardedRequest:
    client = request.client
    return ForwardedRequest(
        request.method,
        path,
        request.scope.get("query_string", b""),
        list(request.scope.get("headers", [])),
        await read_body(request, max_body_mb),
        (client.host, client.port) if client else None,
    )


def as_request(fwd: ForwardedRequest) -> Request:
    """The starlette Request an Ingress serves for `fwd`."""
    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": fwd.method,
        "scheme": "http",
        "path": fwd.path,
        "raw_path": fwd.path.encode(),
        "root_path": "",
        "query_string": fwd.query,
        "headers": fwd.headers,
        "client": fwd.client,
        "server": None,
    }
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:  # the body was read: what a server says once the client has gone
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": fwd.body, "more_body": False}

    return Request(scope, receive)


async def relay(response: Response) -> AsyncIterator[ForwardedStart | bytes]:
    """An Ingress's response as what crosses back to the router."""
    headers = [(k, v) for k, v in response.raw_headers if k.lower() != b"content-length"]
    streaming = isinstance(response, StreamingResponse)
    yield ForwardedStart(response.status_code, headers, streaming)
    if not streaming:
        yield bytes(response.body)
        return
    async for chunk in response.body_iterator:
        yield chunk.encode() if isinstance(chunk, str) else bytes(chunk)


class ModelRouter:
    def __init__(self, models: list[dict], ingresses: list, router: dict | None = None) -> None:
        self.args = [AppArgs.model_validate(m) for m in models]
        router_args = RouterArgs.model_validate(router or {})
        self.cors = Cors(router_args)
        self.max_body_mb = router_args.max_request_body_mb
        self.ingresses = [this_process_transport(h).options(stream=True) for h in ingresses]
        # /metrics: the whole application's series (each model's with its own model_name)
        self.app_name = self.ingresses[0].app_name
        self.by_name = {}  # a served name or a configured LoRA adapter's -> its model's index
        for i, args in enumerate(self.args):
            for name in (*args.served_names, *args.lora_modules):
                self.by_name[name] = i
        quiet_cancelled_calls()  # as the Ingress does

    async def __call__(self, request: Request) -> Response:
        return await self.cors.around(request, self._answer)  # as the Ingress answers

    async def _answer(self, request: Request) -> Response:
        return await answered(request, self._route)

    async def _route(self, request: Request) -> Response:
        path = request.url.path
        root = request.scope.get("root_path", "")  # the application's route_prefix
        if root and path.startswith(root):
            path = path[len(root) :]
        fwd = await forward_request(request, path, self.max_body_mb)
        if path.rstrip("/") == "/metrics" and request.method == "GET":
            return await metrics_page.answer(self.app_name)
        if path.rstrip("/") in (*_OPEN_PATHS, "/v1/models") and request.method == "GET":
            return await self._every_model(fwd)
        return await self._one_model(self._model_of(fwd), fwd)

    def _model_of(self, fwd: ForwardedRequest) -> int:
        """The index of the model `fwd` names: its body's `model`, or the card asked for; else
        the first model's, which answers what names none (a malformed body: its 400). A body
        that leaves `model` out is the only model's, and a 400 where there are several (Ray
        Serve LLM's router)."""
        name = None
        if fwd.path.rstrip("/") in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            return self._runtime_lora_model()  # vLLM's routes name no base model
        if fwd.path.startswith("/v1/models/"):
            name = fwd.path.removeprefix("/v1/models/")
        elif fwd.body:
            try:
                data = json.loads(fwd.body)
            except ValueError:
                return 0
            if not isinstance(data, dict):
                return 0
            name = data.get("model")
            if name in (None, "") and len(self.args) > 1:
                served = self._served()
                raise APIError(400, f"model is required: this server serves {served}", "model")
        if not name or not isinstance(name, str):
            return 0
        if name in self.by_name:
            return self.by_name[name]
        for i, args in enumerate(self.args):  # an adapter of a model's lora_dir
            if lora_path(args.lora_dir, name) is not None:
                return i
        raise APIError(
            404, f"model {name!r} does not exist; this server serves {self._served()}", "model",
            "not_found_error",
        )  # fmt: skip

    def _served(self) -> str:
        return ", ".join(repr(a.served_name) for a in self.args)

    def _runtime_lora_model(self) -> int:
        """The model that loads adapters at runtime (app.builder allows one)."""
        updating = [i for i, a in enumerate(self.args) if a.allow_runtime_lora_updating]
        return updating[0] if updating else 0

    async def _one_model(self, index: int, fwd: ForwardedRequest) -> Response:
        chunks = self.ingresses[index].forwarded.remote(fwd)
        try:
            start: ForwardedStart = await chunks.__anext__()
        except Exception as e:  # its replica died, or Serve refused the call: not the client's
            logger.warning("%s: %r", self._deployment(index), e)
            raise APIError(
                503, f"model {self.args[index].served_name!r} is unavailable: {type(e).__name__}",
                kind="server_error",
            ) from None  # fmt: skip
        if not start.streaming:
            body = await chunks.__anext__()
            return Response(body, start.status, _headers(start.headers))
        return EventStream(_rest(chunks), start.status, _headers(start.headers))

    def _deployment(self, index: int) -> str:
        return self.ingresses[index].deployment_name

    async def _every_model(self, fwd: ForwardedRequest) -> Response:
        """/health (200 when every model's is) or /v1/models (every model's cards); a model's
        error (its 503, a 401) is the answer."""
        health = fwd.path.startswith(_OPEN_PATHS)
        asked = (
            self._health(i, fwd) if health else self._whole(i, fwd) for i in range(len(self.args))
        )
        answers = await asyncio.gather(*asked)
        failed = [(start, body) for start, body in answers if start.status != 200]
        if failed and not health:
            start, body = failed[0]
            return Response(body, start.status, _headers(start.headers))
        if health:
            messages = [json.loads(body).get("message", "") for _, body in failed]
            if failed:
                return JSONResponse(
                    {"status": "unavailable", "message": "; ".join(messages)}, status_code=503
                )
            return JSONResponse({"status": "ok"})
        cards = [card for _, body in answers for card in json.loads(body)["data"]]
        return JSONResponse({"object": "list", "data": cards})

    async def _health(self, index: int, fwd: ForwardedRequest) -> tuple[ForwardedStart, bytes]:
        """A model's /health; a 503 naming its Ingress where that does not answer in time (no
        replica yet, or a dead one)."""
        try:
            return await asyncio.wait_for(self._whole(index, fwd), HEALTH_WAIT_S)
        except Exception as e:
            why = "no answer" if isinstance(e, TimeoutError) else type(e).__name__
            body = {"status": "unavailable", "message": f"{self._deployment(index)}: {why}"}
            return ForwardedStart(503, [], False), json.dumps(body).encode()

    async def _whole(self, index: int, fwd: ForwardedRequest) -> tuple[ForwardedStart, bytes]:
        chunks = self.ingresses[index].forwarded.remote(fwd)
        start = await chunks.__anext__()
        return start, b"".join([chunk async for chunk in chunks])


async def _rest(chunks) -> AsyncIterator[bytes]:
    """The body's chunks after the head; the Ingress's call is cancelled if the client leaves
    first (its request aborted, its KV freed, as for a client of the model alone)."""
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        chunks.cancel()


def _headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in raw}
