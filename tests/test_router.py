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
