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
    held.hold("a", ["ref-a"])
    held.hold("b", ["ref-b"])
    assert len(held) == 2
    held.release("a")
    assert len(held) == 1
    held.release("b")
    assert len(held) == 0


def test_a_release_that_arrives_before_its_hold_cancels_it():
    clock = _Clock()
    held = HeldRefs(ttl_s=10, clock=clock)
    held.release("a")  # the reader was faster than the sender's hold call
    held.hold("a", ["ref-a"])
    assert len(held) == 0
    held.hold("a", ["ref-a"])  # the early release cancelled one hold, not every later one
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
