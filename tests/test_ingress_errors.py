"""What the ingress answers for a failure of its own (a bug, not a refusal of the request):
OpenAI's error body with a 500, the traceback in the log and not in the answer, and the
ingress serving on. No Ray: Starlette's ASGI test client (tests/test_auth.py)."""

from __future__ import annotations

import logging

import openai
import pytest

from tests.test_auth import _client, _openai

pytestmark = pytest.mark.model


def test_an_unexpected_error_is_a_500_with_openais_error_body(monkeypatch, caplog):
    """Before, Starlette's plain-text 500 ("Internal Server Error"), which the openai client
    reports without a message; the exception's text (a server path, say) stays in the log."""
    http = _client(monkeypatch, None)

    def broken(self, body: bytes) -> dict:
        raise OSError("[Errno 36] File name too long: '/srv/adapters/xxxx'")

    monkeypatch.setattr("app.ingress.Ingress._tokenize", broken)
    with caplog.at_level(logging.ERROR, logger="app.protocol"):
        r = http.post("/tokenize", json={"prompt": "Hi"})
    assert r.status_code == 500
    error = r.json()["error"]
    assert error["type"] == "server_error" and "server's log" in error["message"]
    assert "/srv/adapters" not in r.text
    assert "POST /tokenize failed" in caplog.text and "File name too long" in caplog.text
    with pytest.raises(openai.InternalServerError, match="internal server error"):
        _openai(http, "any").post("/../tokenize", body={"prompt": "Hi"}, cast_to=object)
    assert [m.id for m in _openai(http, "any").models.list()]  # still serving


def test_a_client_that_leaves_while_sending_its_body_is_no_error(monkeypatch, caplog):
    """Starlette's ClientDisconnect, raised by the body's read, is a 499 (nobody reads it)
    with nothing logged as a failure; the ingress's own read, through its ASGI entry."""
    import asyncio

    from starlette.requests import Request

    from app.ingress import Ingress

    ingress = Ingress({})
    sent = [{"type": "http.request", "body": b'{"model": "x", "pro', "more_body": True}]

    async def receive() -> dict:
        return sent.pop(0) if sent else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": []}
    with caplog.at_level(logging.INFO):
        response = asyncio.run(ingress(Request(scope, receive)))
    assert response.status_code == 499 and not sent
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
