"""Cross-origin requests (CORS) at the application's HTTP entry, as vLLM's server answers them
(its --allowed-origins, --allowed-methods, --allowed-headers, --allow-credentials; by default
any origin): a browser's preflight (OPTIONS with Origin and Access-Control-Request-Method) is
answered here, before the API key is asked for, and every other answer to a request with an
Origin carries the headers the settings call for. The rules are starlette's CORSMiddleware's,
called on our responses: a Serve deployment's __call__ answers a Request, not an ASGI scope.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from starlette.datastructures import Headers
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message

from app.config import HTTPEntryArgs


class Cors:
    def __init__(self, args: HTTPEntryArgs) -> None:
        self.rules = CORSMiddleware(
            app=None,  # its rules only: the responses are ours
            allow_origins=args.allowed_origins,
            allow_methods=args.allowed_methods,
            allow_headers=args.allowed_headers,
            allow_credentials=args.allow_credentials,
        )

    async def around(
        self, request: Request, answer: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        """A browser's preflight answered here; any other request's `answer` with the CORS
        headers its Origin calls for."""
        preflight = self._preflight(request)
        if preflight is not None:
            return preflight
        return await self._answered(request.headers, await answer(request))

    def _preflight(self, request: Request) -> Response | None:
        """The answer to a browser's preflight (200, or 400 naming what is not allowed);
        None for any other request."""
        headers = request.headers
        if request.method != "OPTIONS" or "origin" not in headers:
            return None
        if "access-control-request-method" not in headers:
            return None
        return self.rules.preflight_response(request_headers=headers)

    async def _answered(self, headers: Headers, response: Response) -> Response:
        """`response` with the CORS headers a request with these `headers` calls for (none
        without an Origin but `Vary: Origin`)."""
        sent: list[Message] = []

        async def keep(message: Message) -> None:
            sent.append(message)

        start = {"type": "http.response.start", "headers": list(response.raw_headers)}
        await self.rules.send(start, keep, request_headers=headers)
        response.raw_headers = sent[0]["headers"]
        return response
