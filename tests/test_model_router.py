"""The ModelRouter's own logic (app/model_router.py) with fake Ingress handles: which model a
request goes to, what it answers for every model (/v1/models, /health), and a model whose
Ingress fails or does not answer. End to end on Serve: tests/test_multi_model.py."""

from __future__ import annotations

import asyncio
import json

import pytest

from app import model_router
from app.model_router import ForwardedRequest, ForwardedStart, ModelRouter, as_request


@pytest.fixture
def models(tmp_path) -> list[dict]:
    """Model b loads adapters from a directory holding one, "poet"."""
    (tmp_path / "poet").mkdir()
    (tmp_path / "poet" / "adapter_config.json").write_text("{}")
    b = {"served_model_name": "b", "lora_dir": str(tmp_path), "allow_runtime_lora_updating": True}
    return [{"served_model_name": "a"}, b]


class FakeCall:
    """A streamed handle call: its items, or its exception, or never an answer."""

    def __init__(self, items) -> None:
        self.items = items
        self.cancelled = False

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self.items == "hang":
            await asyncio.sleep(3600)
        if isinstance(self.items, Exception):
            raise self.items
        if not self.items:
            raise StopAsyncIteration
        return self.items.pop(0)

    def cancel(self) -> None:
        self.cancelled = True


class FakeIngress:
    """A model's Ingress handle answering `answer(fwd)` -> items (or an exception, "hang")."""

    def __init__(self, name: str, answer) -> None:
        self.deployment_name, self.answer = name, answer
        self.app_name = "multi"
        self.forwarded = self  # handle.forwarded.remote(fwd)
        self.asked: list[ForwardedRequest] = []

    def options(self, **_):
        return self

    def remote(self, fwd: ForwardedRequest) -> FakeCall:
        self.asked.append(fwd)
        return FakeCall(self.answer(fwd))


def _json(status: int, body: dict) -> list:
    return [ForwardedStart(status, [(b"content-type", b"application/json")], False),
            json.dumps(body).encode()]  # fmt: skip


def _card_answer(name: str):
    def answer(fwd: ForwardedRequest):
        if fwd.path == "/v1/models":
            return _json(200, {"object": "list", "data": [{"id": name}]})
        if fwd.path == "/health":
            return _json(200, {"status": "ok"})
        return _json(200, {"served_by": name, "path": fwd.path})

    return answer


def _router(
    models: list[dict], answers=None, args: dict | None = None
) -> tuple[ModelRouter, list[FakeIngress]]:
    answers = answers or [_card_answer("a"), _card_answer("b")]
    fakes = [
        FakeIngress(f"Ingress:{m['served_model_name']}", a)
        for m, a in zip(models, answers, strict=True)
    ]
    return ModelRouter(models, fakes, args), fakes


def _call(router: ModelRouter, method: str, path: str, body: bytes = b""):
    request = as_request(ForwardedRequest(method, path, b"", [], body, None))
    return asyncio.run(router(request))


@pytest.mark.parametrize(
    ("path", "body", "served_by"),
    [
        ("/v1/completions", {"model": "b", "prompt": "x"}, "b"),
        ("/v1/chat/completions", {"model": "a", "messages": []}, "a"),
        ("/v1/completions", {"model": 7}, "a"),  # not a name: the first's (its own 400)
        ("/tokenize", {"model": "b", "prompt": "x"}, "b"),
        ("/v1/completions", {"model": "poet", "prompt": "x"}, "b"),  # in b's lora_dir
        ("/v1/models/b", None, "b"),
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/p"}, "b"),  # updating one
        ("/v1/responses/resp_1", None, "a"),  # one store for all models
    ],
)
def test_a_request_goes_to_the_model_it_names(models, path, body, served_by):
    router, _ = _router(models)
    method = "POST" if body is not None else "GET"
    response = _call(router, method, path, json.dumps(body).encode() if body else b"")
    assert json.loads(response.body) == {"served_by": served_by, "path": path}


def test_the_router_answers_metrics_itself(models, monkeypatch):
    """/metrics asks no model's Ingress: the router reads the whole application's page itself
    (each model's series labelled with its model_name where they have vLLM's names)."""
    from app import metrics_page

    asked = []

    async def scrape(app_name):
        asked.append(app_name)
        return "# the page\n"

    monkeypatch.setattr(metrics_page, "scrape", scrape)
    router, fakes = _router(models)
    response = _call(router, "GET", "/metrics")
    assert response.status_code == 200 and asked == ["multi"]
    assert response.body.decode() == "# the page\n"
    assert not any(f.asked for f in fakes)


def test_a_body_that_is_not_json_goes_to_the_first_model(models):
    router, fakes = _router(models)
    _call(router, "POST", "/v1/completions", b"{bad")
    assert [len(f.asked) for f in fakes] == [1, 0]


def test_a_body_past_the_routers_bound_is_a_413_forwarded_nowhere(models):
    router, fakes = _router(models, args={"max_request_body_mb": 0.001})  # 1048 bytes
    body = json.dumps({"model": "b", "prompt": "x" * 1100}).encode()
    response = _call(router, "POST", "/v1/completions", body)
    assert response.status_code == 413 and not any(f.asked for f in fakes)
    assert "max_request_body_mb" in json.loads(response.body)["error"]["message"]
    response = _call(router, "POST", "/v1/completions", body[:1000] + b'"}')
    assert response.status_code == 200 and [len(f.asked) for f in fakes] == [0, 1]


def test_an_unknown_model_is_a_404_naming_the_served_ones(models):
    router, fakes = _router(models)
    response = _call(router, "POST", "/v1/completions", b'{"model": "c"}')
    assert response.status_code == 404
    error = json.loads(response.body)["error"]
    assert error["message"] == "model 'c' does not exist; this server serves 'a', 'b'"
    assert (error["type"], error["param"]) == ("not_found_error", "model")
    assert not any(f.asked for f in fakes)


@pytest.mark.parametrize("body", [{"prompt": "x"}, {"model": None}, {"model": ""}])
def test_a_body_naming_no_model_is_the_only_models_and_a_400_among_several(models, body):
    """Ray Serve LLM's router: the one model answers what names none; with several, which
    one is the client's to say."""
    router, fakes = _router(models)
    response = _call(router, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert response.status_code == 400
    error = json.loads(response.body)["error"]
    assert error["message"] == "model is required: this server serves 'a', 'b'"
    assert error["param"] == "model"
    assert not any(f.asked for f in fakes)
    alone, [fake] = _router(models[1:], [_card_answer("b")])
    response = _call(alone, "POST", "/v1/chat/completions", json.dumps(body).encode())
    assert json.loads(response.body)["served_by"] == "b" and len(fake.asked) == 1


def test_models_and_health_ask_every_model(models):
    router, _ = _router(models)
    cards = json.loads(_call(router, "GET", "/v1/models").body)
    assert cards == {"object": "list", "data": [{"id": "a"}, {"id": "b"}]}
    health = _call(router, "GET", "/health")
    assert (health.status_code, json.loads(health.body)) == (200, {"status": "ok"})


def test_a_models_refusal_is_the_answer(models):
    def locked(fwd):
        return _json(401, {"error": {"message": "invalid API key"}})

    router, _ = _router(models, [_card_answer("a"), locked])
    response = _call(router, "GET", "/v1/models")
    assert response.status_code == 401 and b"invalid API key" in response.body


def test_health_is_503_naming_a_model_not_ready_or_not_answering(models, monkeypatch):
    monkeypatch.setattr(model_router, "HEALTH_WAIT_S", 0.2)

    def starting(fwd):
        return _json(503, {"status": "unavailable", "message": "DecodeServer:b: UPDATING"})

    router, _ = _router(models, [lambda fwd: "hang", starting])
    response = _call(router, "GET", "/health")
    assert response.status_code == 503
    assert json.loads(response.body)["message"] == (
        "Ingress:a: no answer; DecodeServer:b: UPDATING"
    )
    router, _ = _router(models, [_card_answer("a"), lambda fwd: RuntimeError("actor died")])
    assert "Ingress:b: RuntimeError" in json.loads(_call(router, "GET", "/health").body)["message"]


def test_a_model_whose_ingress_fails_is_a_503(models):
    router, _ = _router(models, [_card_answer("a"), lambda fwd: RuntimeError("actor died")])
    response = _call(router, "POST", "/v1/completions", b'{"model": "b"}')
    assert response.status_code == 503
    error = json.loads(response.body)["error"]
    assert error["message"] == "model 'b' is unavailable: RuntimeError"
    assert error["type"] == "server_error"


def test_a_stream_is_relayed_and_its_call_cancelled_when_done(models):
    def streaming(fwd):
        head = ForwardedStart(200, [(b"content-type", b"text/event-stream")], True)
        return [head, b"data: 1\n\n", b"data: [DONE]\n\n"]

    router, fakes = _router(models, [streaming, _card_answer("b")])
    calls = []
    fakes[0].remote = lambda fwd, remote=fakes[0].remote: calls.append(remote(fwd)) or calls[-1]

    async def read() -> bytes:
        request = as_request(ForwardedRequest("POST", "/v1/completions", b"", [],
                                              b'{"model": "a"}', None))  # fmt: skip
        response = await router(request)
        assert response.headers["content-type"] == "text/event-stream"
        return b"".join([chunk async for chunk in response.body_iterator])

    assert asyncio.run(read()) == b"data: 1\n\ndata: [DONE]\n\n"
    assert calls[0].cancelled
