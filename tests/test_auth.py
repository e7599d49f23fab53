"""The ingress's API key (vLLM's --api-key), its open endpoints and its answers to browsers
(CORS, vLLM's --allowed-origins and the rest), through real HTTP semantics (Starlette's ASGI
test client, which is an httpx client) and the official openai client. No Ray: only routes that
call no replica are used."""

from __future__ import annotations

import httpx
import openai
import pytest

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"


def _client(monkeypatch, key: str | None, **ingress):
    from starlette.applications import Starlette
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from app.ingress import Ingress

    if key is not None:
        monkeypatch.setenv("TEST_SPLITSERVE_KEY", key)
        ingress["api_key_env"] = "TEST_SPLITSERVE_KEY"
    app = Ingress({"ingress": ingress})

    async def endpoint(request):
        return await app(request)

    methods = ["GET", "POST", "OPTIONS"]
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


PAGE = "https://chat.example"
PREFLIGHT = {
    "origin": PAGE,
    "access-control-request-method": "POST",
    "access-control-request-headers": "authorization, content-type",
}


def test_a_browsers_preflight_is_answered_before_the_key_is_asked(monkeypatch):
    """vLLM's defaults: any origin, method and header; the preflight carries no key."""
    http = _client(monkeypatch, "s3cret")
    r = http.options("/v1/chat/completions", headers=PREFLIGHT)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == "*"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert r.headers["access-control-allow-headers"] == "authorization, content-type"
    # every answer to a page says it may read it, the 401 too (a browser shows its reason)
    r = http.get("/v1/models", headers={"origin": PAGE})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
    r = http.get("/v1/models", headers={"origin": PAGE, "authorization": "Bearer s3cret"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    r = http.post("/tokenize", json={"prompt": "Hi"}, headers={"origin": PAGE})
    assert r.status_code == 401 and r.headers["access-control-allow-origin"] == "*"
    # no Origin (not a browser's cross-origin call): no CORS headers; an OPTIONS that is no
    # preflight is a route like any other (none)
    r = http.get("/health")
    assert "access-control-allow-origin" not in r.headers
    r = http.options("/v1/models", headers={"origin": PAGE})
    assert r.status_code == 401


def test_only_the_configured_origins_may_call_with_credentials(monkeypatch):
    http = _client(
        monkeypatch,
        None,
        allowed_origins=[PAGE],
        allowed_methods=["GET", "POST"],
        allowed_headers=["authorization", "content-type"],
        allow_credentials=True,
    )
    r = http.options("/v1/completions", headers=PREFLIGHT)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == PAGE  # named, as credentials ask
    assert r.headers["access-control-allow-credentials"] == "true"
    other = {**PREFLIGHT, "origin": "https://evil.example"}
    r = http.options("/v1/completions", headers=other)
    assert r.status_code == 400 and "origin" in r.text
    r = http.options(
        "/v1/completions", headers={**PREFLIGHT, "access-control-request-method": "PUT"}
    )
    assert r.status_code == 400 and "method" in r.text
    r = http.get("/v1/models", headers={"origin": PAGE})
    assert r.headers["access-control-allow-origin"] == PAGE
    assert "Origin" in r.headers["vary"]
    r = http.get("/v1/models", headers={"origin": "https://evil.example"})
    assert r.status_code == 200  # served (CORS binds browsers), and says nothing it may read
    assert "access-control-allow-origin" not in r.headers


def test_the_cors_settings_are_validated():
    from app.config import AppArgs

    with pytest.raises(ValueError, match="allow_credentials"):
        AppArgs.model_validate({"ingress": {"allow_credentials": "perhaps"}})
    with pytest.raises(ValueError, match="allowed_origins"):
        AppArgs.model_validate({"ingress": {"allowed_origins": "*"}})
