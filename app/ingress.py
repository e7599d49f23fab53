"""The OpenAI-compatible HTTP ingress: validates, tokenizes, routes, streams.

Disaggregated flow per request: prefill replica (first token streamed at once) -> KV handed to
a decode replica on the same node where one exists (SameNodeRouter) -> tokens stream back.
Colocated flow: one replica does both. Closing the client connection cancels the handle calls,
which aborts the request on whichever replica holds it, and frees KV published for a decode
replica that none took (app/replica_calls.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hmac
import importlib.metadata
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from app import metrics_page
from app.beam_search import Beam, BeamSearch, BeamSearchParams, Candidates
from app.beam_search import run as run_beam_search
from app.config import AppArgs
from app.cors import Cors
from app.event_stream import EventStream
from app.formats import ChatFormat, CompletionFormat, Prompt
from app.lora_admin import (
    LoadLoRAAdapterRequest,
    UnloadLoRAAdapterRequest,
    load_adapter,
    unload_adapter,
)
from app.model_router import ForwardedRequest, ForwardedStart, as_request, relay
from app.prompts import PromptBuilder
from app.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeChatRequest,
    TokenizeRequest,
    answered,
    parse,
    parse_object,
    validated,
)
from app.readiness import Readiness
from app.replica_calls import ReplicaCalls, this_process_transport, uncancelled
from app.request_body import read_body
from app.responses import (
    ResponseFormat,
    StoreClient,
    chat_request,
    not_stored,
    renamed_params,
    responses_request,
)
from app.responses import sse as responses_sse
from deployments.cancel_noise import quiet_cancelled_calls
from engine import (
    InvalidRequestError,
    RequestFailedError,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
)
from engine.config import lora_dir_adapters, lora_path
from engine.limits import check_lengths, context_window
from engine.model_store import generation_stop_ids, resolve_model, resolve_tokenizer
from engine.sampling_params import SEED_RANGE

if TYPE_CHECKING:
    from deployments.servers import PrefillResult

logger = logging.getLogger(__name__)
try:
    _VERSION = importlib.metadata.version("splitserve")
except importlib.metadata.PackageNotFoundError:  # run from a source tree not pip-installed
    _VERSION = "unknown"
T = TypeVar("T")
# vLLM's runtime LoRA updating routes: the request each takes and what serves it
_LORA_ADMIN = {
    "/v1/load_lora_adapter": (LoadLoRAAdapterRequest, load_adapter),
    "/v1/unload_lora_adapter": (UnloadLoRAAdapterRequest, unload_adapter),
}


class Ingress:
    def __init__(self, args: dict, prefill=None, decode=None, colocated=None, store=None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.args = AppArgs.model_validate(args)
        path = resolve_model(self.args.model, self.args.revision)
        self.model_root = self.args.model or str(path)  # the embedded model: its directory
        where = resolve_tokenizer(self.args.tokenizer, self.args.tokenizer_revision, path)
        tokenizer = AutoTokenizer.from_pretrained(where)
        if self.args.chat_template is not None:  # the server's in place of the model's
            tokenizer.chat_template = self.args.chat_template
        text_config = AutoConfig.from_pretrained(path).get_text_config()
        window = context_window(text_config)
        self.max_model_len = min(self.args.max_model_len or window, window)
        self.prompts = PromptBuilder(tokenizer, text_config.vocab_size, self.max_model_len)
        # what ends a beam search's beam, as the engine stops (EOS and the model's own)
        eos = tokenizer.eos_token_id
        self.eos_ids = (*(() if eos is None else (eos,)), *generation_stop_ids(path, eos))
        # for the sampling fields a request leaves out (vLLM's --generation-config auto)
        self.sampling_defaults = self.args.sampling_defaults(path)
        if self.sampling_defaults:  # a warning: shown in serve run's output, as vLLM's notice
            logger.warning(
                "requests that leave these out get the model's generation-config defaults"
                " (generation_config: vllm for OpenAI's): %s",
                self.sampling_defaults,
            )
        handles = [this_process_transport(h) for h in (prefill, decode, colocated, store)]
        self.prefill, self.decode, self.colocated, store = handles
        called = [h for h in handles if h is not None]
        self.app_name = called[0].app_name if called else ""
        self.readiness = Readiness(self.app_name, [h.deployment_name for h in called])
        self.num_in_flight = 0
        self._kv_capacity: int | None = None  # smallest replica KV cache, fetched once
        self.created = int(time.time())
        from deployments.callers import Caller
        from deployments.loop_lag import LoopLag
        from deployments.metrics import RequestMetrics

        # who this is, in every replica call: a replica ends the calls of a dead ingress
        self.caller = Caller.current()

        slo = self.args.slo
        self.metrics = RequestMetrics(
            None if slo is None else (slo.ttft_ms, slo.tpot_ms), self.args.served_name
        )
        self.loop_lag = LoopLag(self.metrics.on_loop_lag)  # started by the first request
        self.api_key = _api_key(self.args.ingress.api_key_env)
        self.cors = Cors(self.args.ingress)
        # the application's stored responses (a ResponseStoreServer deployment's handle), if
        # it keeps them
        self.responses = None if store is None else StoreClient(store)
        # chat templates and tokenizing run here, off the event loop: a prompt of megabytes
        # tokenizes for seconds (the tokenizer lets go of the GIL), and on the loop it held
        # every stream of this replica that long. One thread, as vLLM's: the tokenizer is
        # never run by two threads at once.
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="tokenizer")
        self._background: set[asyncio.Task] = set()  # detached clean-ups (_detached)
        # a client that leaves is no error with a traceback in the log (cancel_noise.py)
        quiet_cancelled_calls()

    async def __call__(self, request: Request) -> Response:
        return await self.cors.around(request, self._answer)  # a preflight before the key

    async def _answer(self, request: Request) -> Response:
        return await answered(request, self._route)

    async def forwarded(self, fwd: ForwardedRequest) -> AsyncIterator[ForwardedStart | bytes]:
        """A request a multi-model application's ModelRouter forwards (app/model_router.py),
        answered as over HTTP, relayed back: the head, then the body's chunks (the router
        adds the CORS headers)."""
        async for item in relay(await self._answer(as_request(fwd))):
            yield item

    async def _route(self, request: Request) -> Response:
        path, method = request.url.path, request.method
        root = request.scope.get("root_path", "")  # the application's route_prefix
        if root and path.startswith(root):
            path = path[len(root) :]
        path = path.rstrip("/")
        if path in ("/health", "/ping") and method == "GET":
            return await self._health()
        if path == "/version" and method == "GET":
            return JSONResponse({"version": _VERSION})
        if path == "/metrics" and method == "GET":  # vLLM's, open as its is (and Ray's)
            return await metrics_page.answer(self.app_name)
        self._authorize(request)
        if path == "/v1/models" and method == "GET":
            return JSONResponse({"object": "list", "data": self._model_cards()})
        if path.startswith("/v1/models/") and method == "GET":  # the client's models.retrieve
            return JSONResponse(self._model_card(path.removeprefix("/v1/models/")))
        if path in ("/v1/completions", "/v1/chat/completions") and method == "POST":
            chat = path == "/v1/chat/completions"
            req = parse(await self._body(request), _request_class(chat))
            return await self._generate(req, chat, _client_id(request))
        if path == "/invocations" and method == "POST":  # SageMaker's, as vLLM serves it
            data = parse_object(await self._body(request))
            chat = _invocation_is_chat(data)
            req = validated(data, _request_class(chat))
            return await self._generate(req, chat, _client_id(request))
        if path == "/v1/responses" and method == "POST":
            return await self._respond(await self._body(request), _client_id(request))
        if path.startswith("/v1/responses/"):
            rest = path.removeprefix("/v1/responses/")
            return JSONResponse(await self._stored_response(rest, method))
        if path == "/tokenize" and method == "POST":  # vLLM's
            return JSONResponse(await self._off_loop(self._tokenize, await self._body(request)))
        if path == "/detokenize" and method == "POST":
            return JSONResponse(await self._off_loop(self._detokenize, await self._body(request)))
        if path in _LORA_ADMIN and method == "POST" and self.args.allow_runtime_lora_updating:
            return PlainTextResponse(self._lora_admin(path, await self._body(request)))
        raise APIError(404, f"no route {method} {path}", kind="not_found_error")

    async def _body(self, request: Request) -> bytes:
        return await read_body(request, self.args.ingress.max_request_body_mb)

    async def _health(self) -> JSONResponse:
        """200 once every deployment this ingress calls has a running replica, else 503 naming
        what it waits for (app/readiness.py)."""
        unready = await self.readiness.unready()
        if not unready:
            return JSONResponse({"status": "ok"})
        waiting = "; ".join(f"{name}: {why}" for name, why in unready.items())
        return JSONResponse({"status": "unavailable", "message": waiting}, status_code=503)

    def _lora_admin(self, path: str, body: bytes) -> str:
        """vLLM's runtime LoRA updating (app/lora_admin.py) -> its success text."""
        request_cls, act = _LORA_ADMIN[path]
        configured = {*self.args.lora_modules, *self.args.served_names}
        return act(self.args.lora_dir, configured, parse(body, request_cls))

    async def _off_loop(self, fn: Callable[..., T], *args) -> T:
        """fn(*args) on the tokenizer thread."""
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_thread, fn, *args)

    async def _stored_response(self, rest: str, method: str) -> dict:
        """GET (retrieve) or DELETE a stored response; the rest (cancel, input_items) is not
        served."""
        if "/" in rest or method not in ("GET", "DELETE"):
            raise APIError(404, f"no route {method} /v1/responses/{rest}", kind="not_found_error")
        if self.responses is None:
            raise not_stored(rest, "response_id")
        if method == "DELETE":
            return await self.responses.delete(rest)
        return (await self.responses.get(rest)).body

    def _authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        # compare_digest: the time taken says nothing about how much of the key matched
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), self.api_key):
            raise APIError(
                401, "invalid or missing API key (Authorization: Bearer <key>)",
                kind="authentication_error",
            )  # fmt: skip

    async def _capacity(self) -> int:
        """The KV cache of the smallest replica a request passes through (same per deployment)."""
        if self._kv_capacity is None:
            handles = [h for h in (self.prefill, self.decode, self.colocated) if h is not None]
            sizes = [await h.max_request_tokens.remote() for h in handles]
            self._kv_capacity = min(sizes)
        return self._kv_capacity

    def _model_cards(self) -> list[dict]:
        """The base model's card under each of its names, then each LoRA adapter's (vLLM's:
        `root` its directory, `parent` the base model)."""
        adapters = [*self.args.lora_modules, *lora_dir_adapters(self.args.lora_dir)]
        names = (*self.args.served_names, *dict.fromkeys(adapters))
        return [self._model_card(name) for name in names]

    def _model_card(self, name: str) -> dict:
        """The card of the base model under the name `name`, or of the LoRA adapter `name`
        (404 when neither)."""
        base = self.args.served_name
        lora = self._lora(name)
        card = {
            "id": name,
            "object": "model",
            "created": self.created,
            "owned_by": "splitserve",
            "max_model_len": self.max_model_len,
        }
        if lora is not None:
            root = self.args.lora_modules.get(lora) or lora_path(self.args.lora_dir, lora)
            card |= {"root": str(root), "parent": base}
        else:  # vLLM's: the model as configured (a Hub id, a directory), under any served name
            card |= {"root": self.model_root, "parent": None}
        return card

    def _lora(self, name: str | None) -> str | None:
        """The LoRA adapter a request's `model` names; None: the base model (also where the
        request names none, as vLLM answers it); else a 404."""
        if not name or name in self.args.served_names:
            return None
        if name in self.args.lora_modules or lora_path(self.args.lora_dir, name) is not None:
            return name
        adapters = "".join(f", {a!r}" for a in self.args.lora_modules)
        if self.args.lora_dir is not None:
            adapters += f", or an adapter in {self.args.lora_dir}"
        served = ", ".join(repr(n) for n in self.args.served_names)
        raise APIError(
            404,
            f"model {name!r} does not exist; this server serves {served}{adapters}",
            "model",
            "not_found_error",
        )

    # ---- requests ------------------------------------------------------------------------------

    def _prepare(
        self, req: CompletionRequest | ChatCompletionRequest, chat: bool, kv_capacity: int
    ) -> tuple[list[Prompt], SamplingParams]:
        lora = self._lora(req.model)
        if chat:
            req.use_tool_parser(self.args.tool_call_parser)
            req.use_reasoning_parser(self.args.reasoning_parser)
            req.use_template_defaults(self.args.default_chat_template_kwargs)
        # before tokenizing: a batch too large for the queue is refused without that work
        self._admit(req.n, 1 if chat else len(req.prompts))
        prompts = self.prompts.prompts(req, chat)
        if chat:
            max_tokens = req.max_completion_tokens or req.max_tokens
        else:
            max_tokens = req.completion_max_tokens
            # echo with max_tokens 0 (vLLM's): one token is computed, and not shown
            max_tokens = 1 if req.echo_only else max_tokens
        if max_tokens is None:  # no limit: up to the window or the KV cache (a batch's
            room = min(self.max_model_len, kv_capacity)  # longest prompt's), or the
            max_tokens = max(1, room - max(len(p.ids) for p in prompts))  # generation config's
            max_tokens = min(max_tokens, int(self.sampling_defaults.get("max_tokens", max_tokens)))
        for i, prompt in enumerate(prompts):
            self._check_lengths(
                prompt, max_tokens, kv_capacity, chat, i if len(prompts) > 1 else None
            )
        bad_words = self.prompts.bad_words(req.bad_words)
        return prompts, req.sampling_params(max_tokens, bad_words, lora, self.sampling_defaults)

    def _check_lengths(
        self, prompt: Prompt, max_tokens: int, kv_capacity: int, chat: bool, index: int | None
    ) -> None:
        """The engine's limits, with the smallest replica cache on the path; `index`: the
        prompt's place in a batch, named in the error."""
        try:
            check_lengths(len(prompt.ids), max_tokens, self.max_model_len, kv_capacity)
        except InvalidRequestError as e:
            param = "messages" if chat and e.param == "prompt" else e.param
            where = "" if index is None else f"prompt {index}: "
            raise APIError(400, f"{where}{e}", param) from e

    def _tokenize(self, body: bytes) -> dict:
        data = parse_object(body)
        req = validated(data, TokenizeChatRequest if "messages" in data else TokenizeRequest)
        if isinstance(req, TokenizeChatRequest):  # the ids a chat would prefill
            req.use_template_defaults(self.args.default_chat_template_kwargs)
        self._lora(req.model)
        return self.prompts.tokenize(req)

    def _detokenize(self, body: bytes) -> dict:
        req = parse(body, DetokenizeRequest)
        self._lora(req.model)
        return self.prompts.detokenize(req)

    async def _generate(
        self, req: CompletionRequest | ChatCompletionRequest, chat: bool, client_id: str | None
    ) -> Response:
        """client_id: the request's X-Request-Id header, which names the response (vLLM's;
        Serve's proxy returns the header itself)."""
        view, outputs = await self._start(req, chat, client_id)
        if req.stream:
            return EventStream(self._sse(view, outputs, req.include_usage, req.continuous_usage))
        return JSONResponse(await _whole(view, outputs))

    async def _respond(self, body: bytes, client_id: str | None = None) -> Response:
        """OpenAI's Responses API, served as the chat completion it is (app/responses.py)."""
        data = parse_object(body)
        req = responses_request(data)
        prior = None
        if self.responses is not None and req.previous_response_id is not None:
            stored = await self.responses.get(req.previous_response_id, "previous_response_id")
            prior = stored.items
        chat = chat_request(req, data, self.args.reasoning_parser is not None, prior)
        with renamed_params():
            view, outputs = await self._start(chat, True, client_id)
        keep = self.responses is not None and req.store is not False  # OpenAI's default: kept
        response = ResponseFormat(
            req,
            view,
            chat.sampling_value("temperature", self.sampling_defaults),
            chat.sampling_value("top_p", self.sampling_defaults),
            stored=keep,
        )

        async def save(ended: dict) -> None:  # the conversation so far, for its next turn
            await self.responses.put(ended, [*(prior or ()), *req.input_items, *ended["output"]])

        on_done = save if keep else None
        if chat.stream:
            return EventStream(responses_sse(response, outputs, on_done))
        ended = await _whole(response, outputs)
        if on_done is not None:
            await on_done(ended)
        return JSONResponse(ended)

    async def _start(
        self, req: CompletionRequest | ChatCompletionRequest, chat: bool, client_id: str | None
    ) -> tuple[CompletionFormat, AsyncIterator[tuple[int, RequestOutput]]]:
        """Start the request's engine requests; -> its response view and their outputs, the
        first already received (an error a replica raised before is an HTTP status)."""
        arrival = time.perf_counter()  # the metrics' TTFT counts the prompt's building too
        self.loop_lag.ensure_started()
        capacity = await self._capacity()
        prompts, params = await self._off_loop(self._prepare, req, chat, capacity)
        # after _prepare: a chat's constraint depends on the server's parsers, set there
        width = req.beam_search_width()  # None: the choices are sampled
        # vLLM's request_id field, else the X-Request-Id header (Serve's proxy sets one on
        # every request, so the header cannot win as in vLLM)
        client_id = req.request_id or client_id
        base_id = client_id or uuid.uuid4().hex
        request_id = f"{'chatcmpl' if chat else 'cmpl'}-{base_id}"
        # the replicas' ids stay unique when clients reuse an X-Request-Id
        engine_id = request_id if client_id is None else f"{request_id}-{uuid.uuid4().hex[:8]}"
        # one engine request per choice, numbered prompt by prompt; the first output (a
        # prefill) is awaited before any response is started, so an error a replica raises
        # (e.g. beyond its KV cache) still becomes an HTTP status
        if width is not None:
            search = BeamSearchParams(
                width,
                params.max_tokens,
                self._stop_ids(params),
                req.length_penalty,
                params.include_stop_str_in_output,
            )
            outputs = await _primed(
                self._beam_searches(engine_id, prompts, params, search, arrival)
            )
        else:
            many, choices = len(prompts) * req.n > 1, _choice_params(params, req.n)
            streams = [
                self._outputs(
                    f"{engine_id}-{i * req.n + j}" if many else engine_id, p.ids, c, arrival
                )
                for i, p in enumerate(prompts)
                for j, c in enumerate(choices)
            ]
            outputs = await _primed(_merged(streams))
        fmt = ChatFormat if chat else CompletionFormat
        view = fmt(
            request_id,
            # the LoRA adapter's name, or the base model's first (as vLLM answers an alias)
            params.lora or self.args.served_name,
            prompts,
            req.n,
            self.prompts.texts(req),
            req.shown,
        )
        if chat:
            view.tools, view.reasoning = req.tool_calls(), self.args.reasoning_parser
            view.shows_reasoning = req.include_reasoning
        return view, outputs

    def _admit(self, n: int, num_prompts: int = 1) -> None:
        """Bounded queue: refuse what would put more than max_queued_requests in flight (a
        request is n choices for each of its prompts)."""
        limit, count = self.args.ingress.max_queued_requests, n * num_prompts
        if count > limit:
            what = f"n={n}" if num_prompts == 1 else f"{num_prompts} prompts x n={n}"
            raise APIError(
                400,
                f"{what} is more than the {limit} requests this server holds in flight",
                "n" if num_prompts == 1 else "prompt",
            )
        if self.num_in_flight + count > limit:
            raise APIError(
                503,
                "server overloaded: too many requests in flight, retry later",
                kind="overloaded_error",
            )

    async def _sse(
        self,
        view,
        outputs: AsyncIterator[tuple[int, RequestOutput]],
        usage: bool,
        continuous: bool = False,  # the usage so far in every chunk too
    ):
        async with contextlib.aclosing(outputs):
            try:
                async for index, out in outputs:
                    shown = view.add(index, out)
                    chunk = view.chunk(index, shown)
                    if continuous:
                        chunk["usage"] = view.running_usage
                    yield f"data: {json.dumps(chunk)}\n\n"
            except APIError as e:  # after the status was sent: vLLM's error event, then the end
                yield f"data: {json.dumps(e.body)}\n\n"
                yield "data: [DONE]\n\n"
                return
        if usage:
            yield f"data: {json.dumps(view.usage_chunk())}\n\n"
        yield "data: [DONE]\n\n"

    async def _outputs(
        self,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
        arrival: float,
        timed: bool = True,  # False: a beam search's step, which no client sees
    ) -> AsyncIterator[RequestOutput]:
        self.num_in_flight += 1
        calls = ReplicaCalls()
        clock = _Clock(self.metrics, self.args.mode, len(ids), arrival) if timed else _UNTIMED
        try:
            if self.args.mode == "colocated":
                calls.stream = self.colocated.options(stream=True).generate.remote(
                    request_id, ids, params, caller=self.caller
                )
            else:
                prefill = self.prefill.options(stream=True).prefill
                calls.read_prefill(
                    uncancelled(lambda: prefill.remote(request_id, ids, params, caller=self.caller))
                )
                yield clock.seen(_refused(await calls.first()))  # before KV is published
                result = _refused(await calls.prefill_result())
                if result.handoff is None:
                    return
                calls.stream = self.decode.options(stream=True).decode.remote(
                    result.handoff,
                    result.pieces,
                    prefill_node_id=result.node_id,
                    caller=self.caller,
                )
            async for out in calls.stream:
                out = _refused(out)
                calls.taken = True
                yield clock.seen(out)
        except InvalidRequestError as e:  # a replica's refusal
            # raised by _refused, or by a replica and wrapped by Ray (RayTaskError, whose text
            # is the replica's traceback): the client gets the engine's own message
            cause = getattr(e, "cause", e)
            raise APIError(400, str(cause), getattr(cause, "param", None)) from e
        except RequestFailedError as e:  # the engine failed it (and said why): not a retry case
            cause = getattr(e, "cause", e)
            raise APIError(500, str(cause), kind="server_error") from e
        except APIError:
            raise
        except Exception as e:  # a replica failed it (a dead model worker, a lost replica)
            logger.warning("request %s failed in a replica: %r", request_id, e)
            raise APIError(503, _replica_failure(e), kind="server_error") from e
        finally:
            self.num_in_flight -= 1
            # cancels what runs (aborts on disconnect) and frees the KV nobody will take
            freeing = calls.end(self._discard, lambda: self._drop_unread(request_id))
            if freeing is not None:
                self._detached(freeing)

    # ---- beam search (app/beam_search.py) -------------------------------------------------

    def _stop_ids(self, params: SamplingParams) -> frozenset[int]:
        """The tokens that end a beam: the request's stop_token_ids, and unless it ignores
        EOS, the tokenizer's EOS and the model's own (as the engine stops)."""
        eos = () if params.ignore_eos else self.eos_ids
        return frozenset((*params.stop_token_ids, *eos))

    async def _beam_searches(
        self,
        engine_id: str,
        prompts: list[Prompt],
        params: SamplingParams,
        search: BeamSearchParams,
        arrival: float,
    ) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Each prompt's beam search, side by side; its best beams, as choices i * n + j,
        when it ends. Closing this aborts every step still running."""
        searches = [
            self._beam_search(f"{engine_id}-{i}", p.ids, params, search, arrival)
            for i, p in enumerate(prompts)
        ]
        async with contextlib.aclosing(_merged(searches)) as ended:
            async for i, beams in ended:
                for j, out in enumerate(beams):
                    yield i * search.width + j, out

    async def _beam_search(
        self,
        request_id: str,
        ids: list[int],
        params: SamplingParams,
        search: BeamSearchParams,
        arrival: float,
    ) -> AsyncIterator[list[RequestOutput]]:
        """One prompt's beam search: its steps are one-token requests of every running beam
        (the first asks the prompt's logprobs, if the request did)."""
        shown = params.logprobs
        later = dataclasses.replace(
            params,
            max_tokens=1,
            logprobs=max(search.num_candidates, shown or 0),
            prompt_logprobs=None,
            temperature=0.0,  # the step's own token is not used: no draw
            top_p=1.0,
            top_k=0,
            min_p=0.0,
            seed=None,
        )
        opening = dataclasses.replace(later, prompt_logprobs=params.prompt_logprobs)
        first: list[RequestOutput] = []  # the first step's: the prompt's logprobs, cache hits

        async def step(number: int, j: int, beam: Beam) -> Candidates:
            asked = later if number else opening
            beam_id = f"{request_id}-s{number}-{j}"
            out = await self._beam_step(beam_id, ids + list(beam.tokens), asked, arrival)
            if number == 0:
                first.append(out)
            return out.logprobs[0].top

        beams = await run_beam_search(BeamSearch(search, len(ids)), step)
        texts = await self._off_loop(self._beam_texts, beams, search, params)
        outputs = []
        for beam, text in zip(beams, texts, strict=True):
            out = RequestOutput(
                request_id,
                list(beam.tokens),
                text,
                len(ids),
                len(beam.tokens),
                beam.finish_reason or "length",
                num_cached_tokens=first[0].num_cached_tokens,
                logprobs=None
                if shown is None
                else [TokenLogprob(*t) for t in beam.token_logprobs(shown)],
                prompt_logprobs=first[0].prompt_logprobs,
            )
            outputs.append(_Clock(self.metrics, self.args.mode, len(ids), arrival).seen(out))
        yield outputs

    async def _beam_step(
        self, request_id: str, ids: list[int], params: SamplingParams, arrival: float
    ) -> RequestOutput:
        """A one-token request's output: its first holds the token and its logprobs (and
        the prompt's, when asked); the stream is read to its end, as every request's is."""
        stream = self._outputs(request_id, ids, params, arrival, timed=False)
        async with contextlib.aclosing(stream):
            got = [out async for out in stream]
        if not got or not got[0].logprobs:  # not expected: a step returns what it asks
            raise APIError(500, f"beam search step {request_id} returned no logprobs", None,
                           "server_error")  # fmt: skip
        return got[0]

    def _beam_texts(
        self, beams: list[Beam], search: BeamSearchParams, params: SamplingParams
    ) -> list[str]:
        """Each beam's text, without a final stop token it shows (as vLLM's beam search)."""
        decode = self.prompts.tokenizer.decode
        skip = params.skip_special_tokens
        texts = []
        for beam in beams:
            kept_stop = beam.finish_reason == "stop" and search.keep_stop_token
            tokens = beam.tokens[:-1] if kept_stop else beam.tokens
            texts.append(decode(list(tokens), skip_special_tokens=skip))
        return texts

    async def _discard(self, result: PrefillResult) -> None:
        """Free a request's published KV that no decode replica took (app/replica_calls.py)."""
        try:
            await self.decode.discard.remote(result.pieces, prefill_node_id=result.node_id)
        except Exception as e:  # its TTL frees it
            logger.warning("could not discard the KV of %s: %r", result.handoff.request_id, e)

    async def _drop_unread(self, request_id: str) -> None:
        """Every prefill replica frees the KV it published for a request whose prefill call
        was cancelled before its result arrived (app/replica_calls.py): Serve cannot say
        which replica served a call, and this is rare (a client that leaves in its prefill)."""
        try:
            await self.prefill.broadcast("drop_unread", request_id).results_async(
                return_exceptions=True
            )
        except Exception as e:  # its TTL frees it
            logger.warning("could not drop the unread KV of %s: %r", request_id, e)

    def _detached(self, work: Coroutine[Any, Any, None]) -> None:
        """Run `work` on its own task, kept until it ends, and outside the request's context:
        Serve cancels the calls that a cancelled request made and were not yet assigned to a
        replica (its child requests), and these run because the request is being cancelled."""
        task = asyncio.get_running_loop().create_task(work, context=contextvars.Context())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _refused(item: T) -> T:
    """A replica ends a stream it refuses with the InvalidRequestError as an item (see
    deployments/servers.py); raised here, it is the client's 400."""
    if isinstance(item, InvalidRequestError):
        raise item
    return item


class _Untimed:
    def seen(self, out: RequestOutput) -> RequestOutput:
        return out


_UNTIMED = _Untimed()


class _Clock:
    """Times one request as the client sees it: the interval before each output after the
    first as it comes (vLLM's inter-token latency), the rest when the request finishes."""

    def __init__(self, metrics, mode: str, num_prompt_tokens: int, arrival: float) -> None:
        self.metrics, self.mode, self.num_prompt_tokens = metrics, mode, num_prompt_tokens
        self.start = arrival  # time.perf_counter() when the ingress took the request
        self.first: float | None = None
        self.last = 0.0  # when the previous output came, from the start
        self.num_outputs = 0  # relayed from the engine replicas
        self.prefill_s: float | None = None  # as the engine that computed the prompt says

    def seen(self, out: RequestOutput) -> RequestOutput:
        now = time.perf_counter() - self.start
        if self.first is None:
            self.first = now
        else:  # one per output, as vLLM's is one per engine step, however many tokens it has
            self.metrics.on_interval(self.mode, now - self.last)
        self.last = now
        self.num_outputs += 1
        if out.prefill_time_s is not None:
            self.prefill_s = out.prefill_time_s
        if out.finished:
            self.metrics.on_finish(
                self.mode,
                self.first,
                now,
                out.num_output_tokens,
                out.finish_reason,
                self.num_prompt_tokens,
                self.num_outputs,
                self.prefill_s,
            )
        return out


MAX_CLIENT_ID = 256  # characters of an X-Request-Id


def _replica_failure(e: Exception) -> str:
    """A replica's failure as its client reads it: what our replicas raise says why (a stuck
    engine, a dead model worker), in its first line; Ray's own errors (a replica that died)
    by their type alone, as their text is Ray's internals."""
    from ray.exceptions import RayError

    cause = getattr(e, "cause", e)  # a RayTaskError carries the replica's exception
    lines = str(cause).strip().splitlines()
    if isinstance(cause, RuntimeError) and not isinstance(cause, RayError) and lines:
        return f"the request failed in a model replica: {lines[0][:300]}; retry it"
    return f"the request failed in a model replica ({type(e).__name__}); retry it"


def _request_class(chat: bool) -> type[CompletionRequest | ChatCompletionRequest]:
    return ChatCompletionRequest if chat else CompletionRequest


def _invocation_is_chat(data: dict) -> bool:
    """Whether a SageMaker /invocations body is a chat completion (it holds `messages`), not a
    completion (`prompt`), as vLLM tells them apart; a 400 when it holds neither."""
    if "messages" in data or "prompt" in data:
        return "messages" in data
    raise APIError(
        400, "an /invocations body is a chat completion (messages) or a completion (prompt); "
        "this one holds neither",
    )  # fmt: skip


def _client_id(request: Request) -> str | None:
    """The request's X-Request-Id header (vLLM's: it names the response), or None."""
    value = request.headers.get("x-request-id") or None  # empty: as if not sent
    if value is not None and len(value) > MAX_CLIENT_ID:
        raise APIError(400, f"X-Request-Id has more than {MAX_CLIENT_ID} characters")
    return value


def _api_key(env: str | None) -> bytes | None:
    """The key the ingress asks for, read from the environment variable `env` names."""
    if env is None:
        return None
    key = os.environ.get(env)
    if not key:
        raise ValueError(f"ingress.api_key_env: environment variable {env} is not set or empty")
    return key.encode()


async def _whole(view, outputs: AsyncIterator[tuple[int, RequestOutput]]) -> dict:
    """The response body once every output is in."""
    async with contextlib.aclosing(outputs):
        async for index, out in outputs:
            view.add(index, out)
    return view.final()


async def _primed(outputs: AsyncIterator[T]) -> AsyncIterator[T]:
    """Pull the first item now (raising its error here); -> an iterator over all items."""
    try:
        first = await anext(outputs)
    except BaseException:
        await outputs.aclose()  # n > 1: the other choices' requests are aborted too
        raise

    async def chained() -> AsyncIterator[T]:
        async with contextlib.aclosing(outputs):  # closing this closes the request's stream
            yield first
            async for out in outputs:
                yield out

    return chained()


def _choice_params(params: SamplingParams, n: int) -> list[SamplingParams]:
    """A seeded request's choice i draws from seed + i (mod 2**64 past the top of the seed
    range): the choices differ, and repeat."""
    if params.seed is None:
        return [params] * n
    top = SEED_RANGE[1] + 1
    seeds = [params.seed] + [(params.seed + i) % top for i in range(1, n)]
    return [dataclasses.replace(params, seed=seed) for seed in seeds]


async def _merged(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """The choices' outputs as they come, as (choice index, output). Closing this, or a choice
    failing, closes every choice's stream, which aborts the requests still running."""
    if len(streams) == 1:
        async with contextlib.aclosing(streams[0]) as only:
            async for out in only:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out, None))
            queue.put_nowait((index, None, None))
        except Exception as e:  # re-raised by the consumer below
            queue.put_nowait((index, None, e))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            index, out, error = await queue.get()
            if error is not None:
                raise error
            if out is None:
                running -= 1
            else:
                yield index, out
    finally:
        for task in tasks:
            task.cancel()  # a stream cancelled mid-iteration runs its own clean-up
        await asyncio.gather(*tasks, return_exceptions=True)
        for stream in streams:
            await stream.aclose()
