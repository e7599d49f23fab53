"""Same-node KV transport through shared-memory segments that are mapped once and reused.

A fresh shared-memory file pays page faults on every use; a segment mapped once does not, so
the sender keeps a small pool of segments and reuses them. Each segment starts with a header:

    [generation: int64][released: int64][data ...]

Sender: pick a free segment, bump `generation` to an odd value while writing, then to the even
value G that the descriptor carries. Receiver: read only while `generation == G` (checked before
and after the read, like a seqlock), then set `released = G`. A segment is free again once
`released == generation`, or after `ttl_s` (a transfer nobody will read: the client left between
prefill and decode); a receiver that comes after such a reclaim sees the generation changed and
fails the request with a clear error instead of reading someone else's KV.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import uuid
from dataclasses import dataclass
from multiprocessing import resource_tracker, shared_memory
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)
_HEADER = 16  # bytes: generation, released
_PREFIX = "splitserve-kv-"  # + owner pid: lets a later sender remove a dead owner's segments


class TransferExpired(RuntimeError):
    """The segment was reclaimed (TTL) or reused before this transfer was read."""


@dataclass(frozen=True)
class ShmLocation:
    segment: str
    generation: int
    node_id: str


def _header(shm: shared_memory.SharedMemory) -> np.ndarray:
    return np.ndarray((2,), dtype=np.int64, buffer=shm.buf[:_HEADER])


def _data(shm: shared_memory.SharedMemory, nbytes: int) -> torch.Tensor:
    return torch.frombuffer(shm.buf[_HEADER : _HEADER + nbytes], dtype=torch.uint8)


def segment_name_prefix() -> str:
    """The names of this process's segments start with it."""
    return f"{_PREFIX}{os.getpid()}-"


def segment_name() -> str:
    """A fresh segment name that records its owner's pid (see remove_orphans)."""
    return f"{segment_name_prefix()}{uuid.uuid4().hex[:8]}"


def begin_write(shm: shared_memory.SharedMemory) -> int:
    """Mark the segment as being written (odd generation); -> the generation to publish."""
    header = _header(shm)
    writing = int(header[0]) + 1 | 1
    header[0] = writing
    return writing + 1


def end_write(shm: shared_memory.SharedMemory, generation: int) -> None:
    """Publish: readers holding `generation` may read from now on."""
    _header(shm)[0] = generation


def is_released(shm: shared_memory.SharedMemory) -> bool:
    generation, released = _header(shm)
    return bool(released == generation)


def reusable(shm: shared_memory.SharedMemory, unread_s: float, ttl_s: float) -> bool:
    """A pooled slot may take a new transfer: its reader released it, or nobody read it for
    `ttl_s` (the client left between prefill and decode; a late reader gets TransferExpired)."""
    if is_released(shm):
        return True
    if unread_s > ttl_s:
        logger.warning("reclaiming KV transfer slot %s unread for %.0f s", shm.name, ttl_s)
        return True
    return False


def remove_orphans(shm_dir: str = "/dev/shm") -> list[str]:
    """Unlink segments whose owner process is gone (a replica killed before its cleanup ran)."""
    removed = []
    for path in Path(shm_dir).glob(f"{_PREFIX}*"):
        pid = int(path.name[len(_PREFIX) :].split("-")[0])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            path.unlink(missing_ok=True)
            removed.append(path.name)
        except PermissionError:  # alive, another user's
            pass
    return removed


class ShmSender:
    def __init__(self, node_id: str, max_segments: int = 16, ttl_s: float = 300.0) -> None:
        self.node_id = node_id
        self.max_segments = max_segments
        self.ttl_s = ttl_s
        self._segments: list[shared_memory.SharedMemory] = []
        self._sent_at: dict[str, float] = {}
        remove_orphans()
        atexit.register(self.close)

    def _is_free(self, shm: shared_memory.SharedMemory, now: float) -> bool:
        return reusable(shm, now - self._sent_at.get(shm.name, now), self.ttl_s)

    def _segment_for(self, nbytes: int) -> shared_memory.SharedMemory | None:
        now = time.monotonic()
        free = [s for s in self._segments if self._is_free(s, now) and s.size >= _HEADER + nbytes]
        if free:
            return min(free, key=lambda s: s.size)
        if len(self._segments) >= self.max_segments:
            return None  # the pool is full of unread transfers: caller falls back
        size = _HEADER + max(nbytes, 4 << 20)
        shm = shared_memory.SharedMemory(name=segment_name(), create=True, size=size)
        _header(shm)[:] = 0
        self._segments.append(shm)
        return shm

    def num_unread(self) -> int:
        """Segments holding a transfer that no receiver has released (nor the TTL reclaimed)."""
        now = time.monotonic()
        return sum(not self._is_free(s, now) for s in self._segments)

    def send(self, buffer: torch.Tensor) -> ShmLocation | None:
        """Copy a CPU tensor into a pooled segment; None when the pool is exhausted."""
        raw = buffer.contiguous().view(torch.uint8).view(-1)
        return self.send_with(raw.numel(), lambda data: data.copy_(raw))

    def send_with(self, nbytes: int, write) -> ShmLocation | None:
        """Let `write(data)` fill `nbytes` of a pooled segment (data: a uint8 view of it)."""
        shm = self._segment_for(nbytes)
        if shm is None:
            return None
        generation = begin_write(shm)
        write(_data(shm, nbytes))
        end_write(shm, generation)
        self._sent_at[shm.name] = time.monotonic()
        return ShmLocation(shm.name, generation, self.node_id)

    def close(self) -> None:
        for shm in self._segments:
            shm.close()
            shm.unlink()
        self._segments = []


class ShmReceiver:
    def __init__(self) -> None:
        self._attached: dict[str, shared_memory.SharedMemory] = {}

    def _attach(self, name: str) -> shared_memory.SharedMemory:
        shm = self._attached.get(name)
        if shm is None:
            shm = shared_memory.SharedMemory(name=name)
            # Python 3.11 registers attached segments too and would unlink the sender's
            # segment when this process exits: the sender owns it (unless this process is
            # the sender, discarding its own transfer: its registration stays)
            if not name.startswith(segment_name_prefix()):
                resource_tracker.unregister(shm._name, "shared_memory")
            self._attached[name] = shm
        return shm

    def view(self, loc: ShmLocation, nbytes: int) -> torch.Tensor:
        """Bytes of a transfer, in place (uint8); valid until release()."""
        shm = self._attach(loc.segment)
        self.check(loc)
        return _data(shm, nbytes)

    def check(self, loc: ShmLocation) -> None:
        if _header(self._attach(loc.segment))[0] != loc.generation:
            raise TransferExpired(
                f"KV transfer in {loc.segment} (generation {loc.generation}) was reclaimed or "
                "reused before it was read"
            )

    def release(self, loc: ShmLocation) -> None:
        header = _header(self._attach(loc.segment))
        if header[0] == loc.generation:
            header[1] = loc.generation
