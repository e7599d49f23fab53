"""How late an event loop runs what is due: the serving front end's saturation, live.

An ingress replica relays every request and every streamed chunk on one asyncio loop. Once the
loop has more work than its core does, every callback runs late, and every token behind it
waits, however fast the engines are (README, *What streaming a token costs*). A task that asks
to wake every `interval_s` and records how late it woke reads that directly, at the cost of one
wake-up per interval: near 0 ms on a loop with time to spare, growing with its backlog.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LoopLag:
    """Records (through `record`, in ms) how late each of its wake-ups came."""

    def __init__(self, record: Callable[[float], None], interval_s: float = 0.1) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.record, self.interval_s = record, interval_s
        self._task: asyncio.Task | None = None

    def ensure_started(self) -> None:
        """Starts watching the running loop, once (a replica calls it from a request: Serve
        constructs it before its loop runs)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._watch())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = loop.time() + self.interval_s
            await asyncio.sleep(self.interval_s)
            self.record(max(0.0, loop.time() - due) * 1e3)
