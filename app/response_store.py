"""Responses kept by one ingress replica, for the Responses API's `previous_response_id` and
`GET` / `DELETE /v1/responses/{id}` (vLLM's VLLM_ENABLE_RESPONSES_API_STORE, but bounded: the
least recently used response goes first). Each entry keeps the response as returned and its
conversation as Responses input items (earlier turns, this turn's input, its output), which a
later request continues. Per replica, in memory: a response is found only by the replica that
made it (the default config has one ingress replica) and is gone when the replica restarts."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from app.protocol import APIError


@dataclass(frozen=True)
class StoredResponse:
    body: dict  # the response object
    items: list[dict]  # the conversation up to and including this response, as input items


class ResponseStore:
    def __init__(self, size: int) -> None:
        self.size = size  # the most responses kept; 0: none
        self._kept: OrderedDict[str, StoredResponse] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.size > 0

    def __len__(self) -> int:
        return len(self._kept)

    def put(self, body: dict, items: list[dict]) -> None:
        self._kept[body["id"]] = StoredResponse(body, items)
        self._kept.move_to_end(body["id"])
        while len(self._kept) > self.size:
            self._kept.popitem(last=False)

    def get(self, response_id: str, param: str = "response_id") -> StoredResponse:
        """The response, now the most recently used; a 404 naming `param` if not kept."""
        if response_id not in self._kept:
            raise not_stored(response_id, param, self.enabled)
        self._kept.move_to_end(response_id)
        return self._kept[response_id]

    def delete(self, response_id: str) -> dict:
        self.get(response_id)
        del self._kept[response_id]
        return {"id": response_id, "object": "response", "deleted": True}


def not_stored(response_id: str, param: str, stores: bool = False) -> APIError:
    why = (
        "it was not stored here, or no longer is"
        if stores
        else "this server stores no responses (ingress.responses_store_size)"
    )
    return APIError(
        404,
        f"response {response_id!r} not found: {why}; send the conversation's items in input "
        "instead",
        param,
        "not_found_error",
    )
