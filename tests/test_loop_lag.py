"""The ingress's event-loop lag monitor (deployments/loop_lag.py) on a real asyncio loop."""

from __future__ import annotations

import asyncio
import statistics
import time

import pytest

from deployments.loop_lag import LoopLag

# the lag of a loop is wall-clock time: a loop starved of the CPU lags
pytestmark = [pytest.mark.unit, pytest.mark.wall_clock]


def test_a_blocked_loop_shows_as_lag_and_an_idle_one_does_not():
    lags: list[float] = []

    async def scenario() -> tuple[list[float], list[float]]:
        monitor = LoopLag(lags.append, interval_s=0.01)
        monitor.ensure_started()
        monitor.ensure_started()  # once: a second call starts no second watcher
        await asyncio.sleep(0.3)
        idle = list(lags)
        time.sleep(0.25)  # a callback that holds the loop, as a backlog of chunks does
        await asyncio.sleep(0.05)
        monitor.stop()
        return idle, lags[len(idle) :]

    idle, after = asyncio.run(scenario())
    assert len(idle) >= 5  # a wake-up per interval, each recorded
    assert statistics.median(idle) < 100  # ms; generous for a busy host
    assert max(after) >= 200  # the 250 ms hold, less the 10 ms the timer was due anyway
    assert all(lag >= 0 for lag in idle + after)


def test_a_stopped_monitor_records_nothing_more_and_may_start_again():
    lags: list[float] = []

    async def scenario() -> int:
        monitor = LoopLag(lags.append, interval_s=0.01)
        monitor.ensure_started()
        await asyncio.sleep(0.05)
        monitor.stop()
        stopped_at = len(lags)
        await asyncio.sleep(0.05)
        assert len(lags) == stopped_at
        monitor.ensure_started()
        await asyncio.sleep(0.05)
        monitor.stop()
        return stopped_at

    stopped_at = asyncio.run(scenario())
    assert 0 < stopped_at < len(lags)


def test_a_non_positive_interval_is_refused():
    with pytest.raises(ValueError, match="interval_s"):
        LoopLag(lambda ms: None, interval_s=0)
