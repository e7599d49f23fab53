"""The ingress's API key (vLLM's --api-key) and its open endpoints, through real HTTP semantics
(Starlette's ASGI test client, which is an httpx client) and the official openai client. No Ray:
only routes that call no replica are used."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"


def _client(monkeypatch, key: str | None):
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from app.ingress import Ingress

    args = {}
    if key is not None:
        monkeypatch.setenv("TEST_SPLITSERVE_KEY", key)
        args = {"ingress": {"api_key_env": "TEST_SPLITSERVE_KEY"}}
    ingress = Ingress(args)

    async def endpoint(request):
        return await ingress(request)

    methods = ["GET", "POST"]
    return TestClient(Starlette(routes=[Route("/{path:path}", endpoint, methods=methods)]))


def _openai(http: httpx.Client, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http)


def test_a_configured_key_is_required_except_on_the_open_endpoints(monkeypatch):
    http = _client(monkeypatch, "s3cret")
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ping").status_code == 200
    assert http.get("/version").json()["version"]
    # /metrics is open too (as vLLM's): no Ray here, so no node's page, said as a 503
    monkeypatch.setattr("app.metrics_page.node_endpoints", list)
    r = http.get("/metrics")
    assert r.status_code == 503 and "no live node exports metrics" in r.json()["error"]["message"]
    r = http.get("/v1/models")
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    for wrong in ("s3cre", "s3cret!", "Basic s3cret"):
        r = http.get("/v1/models", headers={"authorization": f"Bearer {wrong}"})
        assert r.status_code == 401, wrong
    for route in ("/tokenize", "/invocations"):  # every route that serves the model needs it
        assert http.post(route, json={"prompt": "Hi"}).status_code == 401, route
    with pytest.raises(openai.AuthenticationError):
        _openai(http, "wrong").models.list()
    assert [m.id for m in _openai(http, "s3cret").models.list()] == [MODEL]
    r = http.post("/tokenize", json={"prompt": "Hi"}, headers={"authorization": "bearer s3cret"})
    assert r.status_code == 200 and r.json()["count"] == 1


def test_without_a_key_any_client_is_served(monkeypatch):
    http = _client(monkeypatch, None)
    assert [m.id for m in _openai(http, "anything").models.list()] == [MODEL]


def test_a_key_variable_that_is_not_set_fails_at_start(monkeypatch):
    from app.ingress import Ingress

    monkeypatch.delenv("TEST_SPLITSERVE_MISSING", raising=False)
    with pytest.raises(ValueError, match="TEST_SPLITSERVE_MISSING"):
        Ingress({"ingress": {"api_key_env": "TEST_SPLITSERVE_MISSING"}})
