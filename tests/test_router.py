"""Same-node preference of the decode router: the ranking (pure; replicas are stand-ins) and
which pending request gets a chosen replica (Serve's fulfilment over stand-in requests)."""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
from ray.serve.request_router import RequestRouter

from app.router import SameNodeRouter, rank_by_node

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
    router = SimpleNamespace()  # choose_replicas reads only same_node_wait_s of the router
    SameNodeRouter.initialize_state(router)  # Serve calls it with request_router_kwargs
    choose = SameNodeRouter.choose_replicas
    assert asyncio.run(choose(router, [A1, B1], fresh)) == [[B1]]
    assert asyncio.run(choose(router, [A1, B1], old)) == [[B1], [A1]]
    # Serve's loop sleeps between retries only when the router says so
    assert fresh.routing_context.should_backoff and old.routing_context.should_backoff
    assert asyncio.run(choose(router, [A1, B1], None)) == [[A1, B1]]
    # a longer configured wait keeps even the 5 s old request on its prefill's node
    SameNodeRouter.initialize_state(router, same_node_wait_s=10.0)
    assert asyncio.run(choose(router, [A1, B1], old)) == [[B1]]


def test_the_configured_wait_reaches_the_decode_router():
    from app.builder import build_app
    from app.config import SAME_NODE_WAIT_S

    def router_config(args: dict):
        ingress = build_app(args)._bound_deployment  # Ingress.bind(plain, prefill=, decode=)
        decode = ingress.init_kwargs["decode"]._bound_deployment
        assert decode.name == "DecodeServer"
        return decode._deployment_config.request_router_config

    default = router_config({})
    assert default.request_router_kwargs == {"same_node_wait_s": SAME_NODE_WAIT_S}
    assert default.request_router_class.endswith("SameNodeRouter")
    assert router_config({"same_node_wait_s": 4.5}).request_router_kwargs == {
        "same_node_wait_s": 4.5
    }


def _pending(internal_id: str) -> SimpleNamespace:
    return SimpleNamespace(
        metadata=SimpleNamespace(internal_request_id=internal_id), future=Future()
    )


def _fifo_router(pending: list) -> SimpleNamespace:
    """The state Serve's FIFOMixin fulfilment reads, with SameNodeRouter's matching hook."""
    router = SimpleNamespace(
        _pending_requests_to_fulfill=deque(pending),
        _pending_requests_by_id={p.metadata.internal_request_id: p for p in pending},
        _record_queue_wait_time=lambda p: None,
        _cancel_routing_task_for_pending_request=lambda p: None,
    )
    router._remove_pending_request_from_indices = lambda p: router._pending_requests_by_id.pop(
        p.metadata.internal_request_id, None
    )
    router._get_pending_request_matching_internal_request_id = lambda md: (
        RequestRouter._get_pending_request_matching_internal_request_id(router, md)
    )
    router._get_pending_request_matching_metadata = lambda md: (
        SameNodeRouter._get_pending_request_matching_metadata(router, md)
    )
    return router


def test_a_replica_goes_to_the_request_it_was_chosen_for():
    """Serve's FIFO fulfilment, through SameNodeRouter's hook: the replica found for the younger
    request (by its prefill's node) is not handed to the older one from another node."""
    older, younger = _pending("older"), _pending("younger")
    router = _fifo_router([older, younger])
    SameNodeRouter._fulfill_next_pending_request(router, "replica-b", younger.metadata)
    assert younger.future.result(timeout=0) == "replica-b" and not older.future.done()
    # a request no longer waiting (e.g. cancelled): FIFO fallback, the oldest waiting one
    gone = _pending("gone")
    SameNodeRouter._fulfill_next_pending_request(router, "replica-a", gone.metadata)
    assert older.future.result(timeout=0) == "replica-a"
