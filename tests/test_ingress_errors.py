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
