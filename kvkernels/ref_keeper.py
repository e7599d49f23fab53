"""Keeps object-store KV transfers alive until the receiver is done with them.

An object-store transfer is a `ray.put` by the prefill replica, nested in the PrefillResult
that its streaming `prefill` call yields. Ray can drop such a nested ref's count to zero before
the reader registers as a borrower (ray-project/ray#58080; fix #58082 not merged in Ray 2.60):
the decode replica then fails with ReferenceCountingAssertionError ("already deleted by the
reference counting protocol"), seen once in about 14 cross-node hand-offs of a burst in CI.
So each sender hands its refs to a keeper actor (an ordinary task argument: a borrow Ray tracks
correctly), and the receiver's `finish` / `discard` releases them. A transfer that is never
finished (its request was aborted before the hand-off) is dropped after `ttl_s`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

DEFAULT_TTL_S = 600.0  # longer than any wait between prefill and the decode's import


class HeldRefs:
    """Pure bookkeeping: values held by key until released or older than ttl_s.

    Hold and release come from two processes, so they may arrive in either order; a release
    of a key not held yet is remembered (as long as a held value would be) and cancels the
    hold when it comes. Each says what it decided, for holders whose values free something.
    """

    def __init__(self, ttl_s: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.monotonic):
        self.ttl_s, self._clock = ttl_s, clock
        self._held: dict[str, tuple[float, Any]] = {}
        self._released: dict[str, float] = {}

    def hold(self, key: str, value: Any) -> bool:
        """-> False when the key's release came first: the value is not held."""
        now = self._expire()
        if self._released.pop(key, None) is not None:
            return False
        self._held[key] = (now, value)
        return True

    def release(self, key: str) -> Any:
        """-> the value held under key, or None (none yet: the release is remembered)."""
        now = self._expire()
        entry = self._held.pop(key, None)
        if entry is None:
            self._released[key] = now
            return None
        return entry[1]

    def __len__(self) -> int:
        self._expire()
        return len(self._held)

    def _expire(self) -> float:
        now = self._clock()
        for table in (self._held, self._released):
            while table:  # insertion order is time order: the oldest entry comes first
                key, entry = next(iter(table.items()))
                if now - _since(entry) <= self.ttl_s:
                    break
                del table[key]
        return now


def _since(entry: tuple[float, Any] | float) -> float:
    return entry[0] if isinstance(entry, tuple) else entry


class RefKeeper:
    """The actor (one per sending channel, on its node, no CPU) that holds the borrows."""

    def __init__(self, ttl_s: float = DEFAULT_TTL_S) -> None:
        self._refs = HeldRefs(ttl_s)

    def hold(self, key: str, refs: list) -> None:
        self._refs.hold(key, refs)  # the list keeps the ObjectRef (a borrow) alive

    def release(self, key: str) -> None:
        self._refs.release(key)

    def num_held(self) -> int:
        return len(self._refs)


def start_keeper(ttl_s: float = DEFAULT_TTL_S):
    """A RefKeeper actor on this node, owned by (and dying with) the calling process."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    keeper = ray.remote(RefKeeper).options(
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True),
    )
    return keeper.remote(ttl_s)
