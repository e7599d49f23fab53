"""HeldRefs: the bookkeeping that keeps object-store KV transfers alive until released."""

from __future__ import annotations

from kvkernels.ref_keeper import HeldRefs


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_held_until_released():
    held = HeldRefs(ttl_s=10)
    assert held.hold("a", ["ref-a"]) and held.hold("b", ["ref-b"])
    assert len(held) == 2
    assert held.release("a") == ["ref-a"]
    assert len(held) == 1
    assert held.release("b") == ["ref-b"]
    assert len(held) == 0
    assert held.release("b") is None  # released already: nothing to give back


def test_a_release_that_arrives_before_its_hold_cancels_it():
    clock = _Clock()
    held = HeldRefs(ttl_s=10, clock=clock)
    assert held.release("a") is None  # the reader was faster than the sender's hold call
    assert not held.hold("a", ["ref-a"])  # not held: the holder frees it itself
    assert len(held) == 0
    assert held.hold("a", ["ref-a"])  # the early release cancelled one hold, not every later one
    assert len(held) == 1


def test_unreleased_values_and_early_releases_expire_after_the_ttl():
    clock = _Clock()
    held = HeldRefs(ttl_s=10, clock=clock)
    held.hold("old", 1)
    held.release("never-held")
    clock.now = 6.0
    held.hold("new", 2)
    assert len(held) == 2
    clock.now = 10.5  # "old" is 10.5 s old, "new" 4.5 s
    assert len(held) == 1
    held.hold("never-held", 3)  # its early release expired with the TTL: this hold stands
    assert len(held) == 2
    clock.now = 30.0
    assert len(held) == 0
