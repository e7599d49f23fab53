"""A streamed HTTP response whose client may leave at any moment, as Serve delivers that."""

from __future__ import annotations

from ray.exceptions import TaskCancelledError
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send


class EventStream(StreamingResponse):
    """A StreamingResponse (server-sent events unless told) that takes Serve's cancelled
    `receive` as the client's disconnect.

    In a Serve replica, `receive` asks the proxy for the client's next message. When the
    client leaves, the proxy cancels the request, and that call may raise Ray's
    TaskCancelledError instead of answering http.disconnect; Starlette's disconnect listener
    then fails the request, which Serve logs as "Request failed" with a traceback, though the
    stream ended as it should (3 of 287 clients that left mid-stream in a mixed load,
    2026-12-07; deployments/cancel_noise.py quiets the same cancel where nobody reads it).
    Read as a disconnect, the stream is cancelled and its generator closed, as
    for any client that leaves."""

    def __init__(self, content, status_code: int = 200, headers=None, media_type=None) -> None:
        super().__init__(content, status_code, headers, media_type or "text/event-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, _disconnect_when_cancelled(receive), send)


def _disconnect_when_cancelled(receive: Receive) -> Receive:
    async def receive_or_disconnect() -> Message:
        try:
            return await receive()
        except TaskCancelledError:
            return {"type": "http.disconnect"}

    return receive_or_disconnect
