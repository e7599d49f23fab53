"""A request's body, read up to a bound (the HTTP entries' `max_request_body_mb`).

Starlette reads a body whole, whatever its size: a body of hundreds of MB became a string or
a list of ints many times its size in the replica (a 30 MB list of token ids held the event
loop 1.3 s to parse), so one client could take the replica's memory. A body declaring more
than the bound is refused before any of it is read; one that declares nothing, or less than
it sends, is refused once what arrived passes the bound (413, OpenAI's error body).
"""

from __future__ import annotations

from starlette.requests import Request

from app.protocol import APIError

MIB = 1 << 20


async def read_body(request: Request, limit_mb: float) -> bytes:
    limit = int(limit_mb * MIB)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit_mb)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit_mb, at_least=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit_mb: float, at_least: bool = False) -> APIError:
    what = f"at least {size}" if at_least else f"{size}"
    return APIError(
        413,
        f"the request body has {what} bytes; this server takes at most {limit_mb:g} MiB "
        "(max_request_body_mb)",
    )
