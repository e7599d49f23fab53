"""Replica choice for the decode deployment: prefer a replica on the prefill replica's node.

KV moves over the intra-node link (shared memory on CPU, NVLink/PCIe on GPU) only when both
replicas share a node. The ingress passes the prefill replica's node id as the `prefill_node_id`
keyword of `DecodeServer.decode`; this router ranks same-node replicas first, then the rest,
and Serve's own queue-length probing picks within a rank.
"""

from __future__ import annotations

from ray.serve.request_router import (
    FIFOMixin,
    PendingRequest,
    RequestRouter,
    RunningReplica,
)


def rank_by_node(replicas: list, node_id: str | None) -> list[list]:
    """Pure: same-node replicas first, then the others; empty ranks dropped."""
    same = [r for r in replicas if node_id is not None and r.node_id == node_id]
    other = [r for r in replicas if r not in same]
    return [rank for rank in (same, other) if rank]


class SameNodeRouter(FIFOMixin, RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        node_id = pending_request.kwargs.get("prefill_node_id") if pending_request else None
        return rank_by_node(candidate_replicas, node_id)
