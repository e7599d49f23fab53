"""app.event_stream: a Serve `receive` cancelled under a streaming response is the client's
disconnect, against Starlette's own StreamingResponse, which fails the request on it."""

from __future__ import annotations

import asyncio

import pytest
from ray.exceptions import TaskCancelledError
from starlette.responses import StreamingResponse

from app.event_stream import EventStream

pytestmark = pytest.mark.unit

# Serve's replicas give responses an ASGI 2.x scope: Starlette listens for the disconnect
SCOPE = {"type": "http", "asgi": {"spec_version": "2.0"}}


def _stream(cls):
    """A response streaming until cancelled, whose generator records that it was closed, and
    a receive that raises as Serve's does once the proxy cancels the request."""
    closed, sent = [], []

    async def events():
        try:
            while True:
                yield "data: x\n\n"
                await asyncio.sleep(0.01)
        finally:
            closed.append(True)

    async def receive():
        await asyncio.sleep(0.05)  # a few events go out first
        raise TaskCancelledError()

    async def send(message):
        sent.append(message)

    response = cls(events()) if cls is EventStream else cls(events(), media_type="text/plain")
    return response, receive, send, closed, sent


def test_a_cancelled_receive_ends_the_stream_as_a_disconnect():
    response, receive, send, closed, sent = _stream(EventStream)
    asyncio.run(asyncio.wait_for(response(SCOPE, receive, send), 5))
    assert closed == [True]  # the generator's finally ran: its requests are aborted there
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")
    assert sum(m.get("body") == b"data: x\n\n" for m in sent) >= 2


def test_starlettes_own_response_fails_the_request_on_it():
    response, receive, send, closed, _ = _stream(StreamingResponse)
    with pytest.raises(TaskCancelledError):
        asyncio.run(asyncio.wait_for(response(SCOPE, receive, send), 5))
    assert closed == [True]


def test_a_disconnect_message_and_other_errors_pass_as_they_are():
    async def run(raised):
        response, _, send, closed, _ = _stream(EventStream)

        async def receive():
            await asyncio.sleep(0.02)
            if raised is None:
                return {"type": "http.disconnect"}
            raise raised

        await asyncio.wait_for(response(SCOPE, receive, send), 5)
        return closed

    assert asyncio.run(run(None)) == [True]
    with pytest.raises(ConnectionError):
        asyncio.run(run(ConnectionError("proxy gone")))
