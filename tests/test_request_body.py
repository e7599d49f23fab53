"""app/request_body.py: a request's body read up to the HTTP entries' bound, with starlette's
own Request over an ASGI receive that counts what it was asked for (no server)."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request

from app.protocol import APIError
from app.request_body import MIB, read_body

CHUNK = 64 * 1024


def _request(body: bytes, declared: int | None) -> tuple[Request, list[int]]:
    """A request whose body arrives in CHUNK-sized messages; `declared`: its content-length
    header (None: none, as a chunked upload sends). -> (request, the chunks handed out)."""
    chunks = [body[i : i + CHUNK] for i in range(0, len(body), CHUNK)] or [b""]
    handed: list[int] = []

    async def receive() -> dict:
        i = len(handed)
        handed.append(len(chunks[i]))
        return {"type": "http.request", "body": chunks[i], "more_body": i + 1 < len(chunks)}

    headers = [] if declared is None else [(b"content-length", str(declared).encode())]
    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    return Request(scope, receive), handed


def _read(request: Request, limit_mb: float) -> bytes:
    return asyncio.run(read_body(request, limit_mb))


@pytest.mark.parametrize("declared", [True, False])
def test_a_body_up_to_the_bound_is_read_whole(declared):
    body = bytes(range(256)) * (MIB // 256)  # exactly 1 MiB
    request, handed = _request(body, len(body) if declared else None)
    assert _read(request, 1) == body and sum(handed) == len(body)


def test_a_body_declared_past_the_bound_is_refused_unread():
    body = b"x" * (MIB + 1)
    request, handed = _request(body, len(body))
    with pytest.raises(APIError) as e:
        _read(request, 1)
    assert e.value.status == 413 and handed == []
    assert f"has {MIB + 1} bytes" in e.value.message and "at most 1 MiB" in e.value.message


@pytest.mark.parametrize("declared", [None, 10])  # chunked, or a header that says too little
def test_a_body_sent_past_the_bound_is_refused_at_the_chunk_that_passes_it(declared):
    request, handed = _request(b"x" * (4 * MIB), declared)
    with pytest.raises(APIError) as e:
        _read(request, 0.5)
    assert e.value.status == 413 and "max_request_body_mb" in e.value.message
    assert len(handed) == MIB // 2 // CHUNK + 1  # no more read than the bound and a chunk
