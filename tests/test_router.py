"""Same-node preference of the decode router (pure ranking; replicas are stand-ins)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from app.router import rank_by_node

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Replica:
    name: str
    node_id: str


A1, A2, B1 = Replica("a1", "node-a"), Replica("a2", "node-a"), Replica("b1", "node-b")


def test_same_node_replicas_rank_first():
    assert rank_by_node([B1, A1, A2], "node-a") == [[A1, A2], [B1]]
    assert rank_by_node([B1, A1, A2], "node-b") == [[B1], [A1, A2]]


def test_no_same_node_replica_or_no_hint_falls_back_to_all():
    assert rank_by_node([A1, B1], "node-c") == [[A1, B1]]
    assert rank_by_node([A1, B1], None) == [[A1, B1]]
    assert rank_by_node([], "node-a") == []


def test_only_the_same_node_until_the_wait_is_over():
    # a missed queue-length probe must not send the KV across nodes at once
    assert rank_by_node([B1, A1], "node-a", waited_s=0.2, same_node_wait_s=1.0) == [[A1]]
    assert rank_by_node([B1, A1], "node-a", waited_s=1.0, same_node_wait_s=1.0) == [[A1], [B1]]
    # nothing on the prefill's node: no reason to wait
    assert rank_by_node([A1, B1], "node-c", waited_s=0.0) == [[A1, B1]]


def test_router_retries_with_backoff_and_reads_the_prefill_node():
    import asyncio
    import time
    from types import SimpleNamespace

    from ray.serve._private.request_router.common import RequestRoutingContext

    from app.router import SameNodeRouter

    def pending(age_s: float) -> SimpleNamespace:
        return SimpleNamespace(
            kwargs={"prefill_node_id": "node-b"},
            created_at=time.time() - age_s,
            routing_context=RequestRoutingContext(),
        )

    fresh, old = pending(0.0), pending(5.0)
    choose = SameNodeRouter.choose_replicas  # uses no router state
    assert asyncio.run(choose(None, [A1, B1], fresh)) == [[B1]]
    assert asyncio.run(choose(None, [A1, B1], old)) == [[B1], [A1]]
    # Serve's loop sleeps between retries only when the router says so
    assert fresh.routing_context.should_backoff and old.routing_context.should_backoff
    assert asyncio.run(choose(None, [A1, B1], None)) == [[A1, B1]]
