"""Stored responses, for the Responses API's `previous_response_id` and `GET` / `DELETE
/v1/responses/{id}` (vLLM's VLLM_ENABLE_RESPONSES_API_STORE, but bounded: the least recently
used response goes first). Each entry keeps the response as returned and its conversation as
Responses input items (earlier turns, this turn's input, its output), which a later request
continues.

One store per application: a Serve deployment of one replica (`ResponseStoreServer`) that
every ingress replica reaches through its handle (app.responses.StoreClient), so a
conversation continues whichever ingress replica takes its next turn. In memory: gone when
that replica restarts. Light: it imports neither torch nor the API's models.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class StoredResponse:
    body: dict  # the response object
    items: list[dict]  # the conversation up to and including this response, as input items


class ResponseStore:
    """The store itself: pure, least recently used out first."""

    def __init__(self, size: int) -> None:
        self.size = size  # the most responses kept
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, body: dict, items: list[dict]) -> None:
        self._kept[body["id"]] = StoredResponse(body, items)
        self._kept.move_to_end(body["id"])
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse | None:
        """The response, now the most recently used; None if not kept."""
        if response_id not in self._kept:
            return None
        self._kept.move_to_end(response_id)
        return self._kept[response_id]

    def delete(self, response_id: str) -> bool:
        """-> whether it was kept."""
        return self._kept.pop(response_id, None) is not None


class ResponseStoreServer:
    """The Serve deployment's class: one ResponseStore. Its methods are coroutines, so Serve
    runs them one at a time on the replica's event loop (sync ones would share threads)."""

    def __init__(self, size: int) -> None:
        self.store = ResponseStore(size)

    async def put(self, body: dict, items: list[dict]) -> None:
        self.store.put(body, items)

    async def get(self, response_id: str) -> StoredResponse | None:
        return self.store.get(response_id)

    async def delete(self, response_id: str) -> bool:
        return self.store.delete(response_id)
