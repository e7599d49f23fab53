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
