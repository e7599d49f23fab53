"""deployments/metrics.py's HeldGauges: an idle replica's gauges keep being exported (Ray's
agent drops a gauge series its process did not set within two export intervals; the real
endpoint is checked in tests/test_serve.py)."""

from __future__ import annotations

import time

from deployments.metrics import HeldGauges


class _Gauge:
    """A Ray gauge's stand-in: every value set, with its tags."""

    def __init__(self) -> None:
        self.sets: list[tuple[float, dict]] = []

    def set(self, value: float, tags: dict) -> None:
        self.sets.append((value, tags))


def _until(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_the_last_value_of_each_series_is_set_again_until_a_new_one_comes():
    held = HeldGauges(refresh_s=0.01)
    running, usage = _Gauge(), _Gauge()
    prefill, decode = {"phase": "prefill"}, {"phase": "decode"}
    held.set(running, 3, prefill)
    held.set(running, 1, decode)
    held.set(usage, 0.5, prefill)
    held.set(running, 0, prefill)  # the newest value is the one kept
    _until(lambda: len(running.sets) >= 8 and len(usage.sets) >= 3)
    refreshed = running.sets[-4:]  # refreshes after the last value
    assert set(map(repr, refreshed)) == {repr((0, prefill)), repr((1, decode))}
    assert set(map(repr, usage.sets)) == {repr((0.5, prefill))}
    held.close()


def test_nothing_runs_before_the_first_value():
    """A process that never sets a gauge (a replica's metrics made in a unit test) starts no
    thread."""
    held = HeldGauges(refresh_s=0.01)
    time.sleep(0.05)
    assert held._thread is None
    held.set(_Gauge(), 1, {"phase": "decode"})
    assert held._thread is not None and held._thread.daemon
    held.close()


def test_the_thread_ends_on_close_and_when_its_gauges_are_garbage():
    """A refresh thread outliving its replica would go on running in a process whose Ray may
    be shut down (Ray ends such a process when the thread touches it)."""
    closed, dropped = HeldGauges(refresh_s=0.01), HeldGauges(refresh_s=0.01)
    gauge = _Gauge()
    for held in (closed, dropped):
        held.set(gauge, 1, {"phase": "decode"})
    threads = [closed._thread, dropped._thread]
    closed.close()
    assert not threads[0].is_alive()
    del held, dropped  # the last references
    threads[1].join(timeout=5)
    assert not threads[1].is_alive()


def test_vllms_waiting_requests_count_the_hand_offs_that_wait_for_blocks():
    """A decode replica's hand-offs waiting for free blocks are queued requests to vLLM (its
    decode instances keep them in the waiting queue): splitserve_queued_requests, which
    /metrics serves as vllm:num_requests_waiting, adds them to the engine's own queue."""
    from types import SimpleNamespace

    from deployments.metrics import EngineMetrics

    metrics = EngineMetrics("decode")
    metrics.gauges.refresh_s = 60.0  # no refresh within the test: each set is a new value
    metrics.waiting, metrics.pending_imports, metrics.queued = _Gauge(), _Gauge(), _Gauge()
    stats = SimpleNamespace(
        num_running=4, num_waiting=2, num_waiting_tokens=30, kv_usage=0.9, num_loras=0
    )
    metrics.on_load(stats, pending=3)
    metrics.on_load(SimpleNamespace(**{**vars(stats), "num_waiting": 0}), pending=0)
    decode = {"phase": "decode"}
    assert metrics.waiting.sets == [(2, decode), (0, decode)]
    assert metrics.pending_imports.sets == [(3, decode), (0, decode)]
    assert metrics.queued.sets == [(5, decode), (0, decode)]
    metrics.close()
