"""Replica choice for the decode deployment: prefer a replica on the prefill replica's node.

KV moves over the intra-node link (shared memory on CPU, NVLink/PCIe on GPU) only when both
replicas share a node. The ingress passes the prefill replica's node id as the `prefill_node_id`
keyword of `DecodeServer.decode`; this router offers only the same-node replicas for the first
`same_node_wait_s` of a request's routing, then the rest as well, and Serve's own queue-length
probing picks within a rank.

Why a wait and not just a ranking: Serve moves on to the next rank as soon as a rank's
queue-length probes fail, and the first probe's deadline is 0.1 s. A same-node replica that is
busy stepping on a loaded host misses that deadline routinely, which would send the KV across
nodes although the replica has room. Retrying the same node (Serve backs off and lengthens the
deadline) for a bounded time keeps the hand-off local; a replica that is really full still
releases the request to another node after the wait. The wait is `same_node_wait_s` of the
app config: raise it where hosts are overloaded (probes then miss for seconds), lower it where
the network between nodes is fast enough that crossing costs less than waiting.
"""

from __future__ import annotations

import time

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from app.config import SAME_NODE_WAIT_S


def rank_by_node(
    replicas: list, node_id: str | None, waited_s: float = float("inf"),
    same_node_wait_s: float = SAME_NODE_WAIT_S,
) -> list[list]:  # fmt: skip
    """Pure: same-node replicas first, then the others; empty ranks dropped. Until the request
    has waited same_node_wait_s, only the same-node rank (where there is one)."""
    same = [r for r in replicas if node_id is not None and r.node_id == node_id]
    if same and waited_s < same_node_wait_s:
        return [same]
    other = [r for r in replicas if r not in same]
    return [rank for rank in (same, other) if rank]


class MatchingFIFORouter(FIFOMixin, RequestRouter):
    """Serve's FIFOMixin alone hands the replica a routing task found for one request to the
    oldest pending request, which may want another replica: concurrent hand-offs crossed
    nodes although a same-node replica was free (a two-node test run caught it). The mixin's
    matching hook below gives the replica to the request it was chosen for while that one
    still waits, and keeps FIFO only as the fallback. (Serve's default, non-FIFO fulfilment
    left a request unrouted for 120 s in one suite run; FIFOMixin has served every run.)"""

    def _get_pending_request_matching_metadata(self, request_metadata=None):
        # Serve's own exact match (by internal request id, skipping finished futures)
        return self._get_pending_request_matching_internal_request_id(request_metadata)


class SameNodeRouter(MatchingFIFORouter):
    same_node_wait_s = SAME_NODE_WAIT_S

    def initialize_state(self, same_node_wait_s: float = SAME_NODE_WAIT_S, **kwargs) -> None:
        """Serve passes request_router_kwargs here: AppArgs.same_node_wait_s (app/builder.py)."""
        self.same_node_wait_s = same_node_wait_s

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if pending_request is None:
            return rank_by_node(candidate_replicas, None)
        # retries of the same-node rank back off (and lengthen the probe deadline) instead of
        # spinning; Serve reads this flag after the ranks returned here were all tried
        pending_request.routing_context.should_backoff = True
        return rank_by_node(
            candidate_replicas,
            pending_request.kwargs.get("prefill_node_id"),
            time.time() - pending_request.created_at,
            self.same_node_wait_s,
        )
