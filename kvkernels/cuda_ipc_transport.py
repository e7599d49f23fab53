"""Same-node GPU KV transport: pooled device buffers shared through CUDA IPC handles (CuPy).

The sender keeps a small pool of device buffers, each its own cudaMalloc (CuPy `Memory`), so
each is the base of an allocation as cudaIpcGetMemHandle requires; it gathers a request's
blocks straight into one and the descriptor carries that buffer's IPC handle. The receiver
opens each handle once (opening costs far more than a transfer; mappings stay open for the
process's life) and scatters from the mapped buffer into its own cache: same GPU, or a peer GPU
of the node (cudaIpcMemLazyEnablePeerAccess).

Reuse is guarded as in shm_transport: every device buffer has a 16-byte host shared-memory
header with the generation and the receiver's release, so reuse, TTL reclaim and expired reads
behave as there, and the check reads host memory, never the GPU. Ordering: the sender syncs its
stream after the gather, before it publishes the generation; the receiver syncs after its
scatter, before it releases the buffer.

CUDA IPC works between processes only (a handle cannot be reopened in the process that
exported it); two Ray actors are two processes. Needs CuPy (`pip install -e ".[gpu]"`).
"""

from __future__ import annotations

import atexit
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import torch

from kvkernels.shm_transport import (
    _HEADER,
    ShmLocation,
    ShmReceiver,
    begin_write,
    end_write,
    remove_orphans,
    reusable,
    segment_name,
)


def available() -> bool:
    """CuPy imports and sees a CUDA device."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # not installed, no driver, no device
        return False


@dataclass(frozen=True)
class CudaIpcLocation:
    header: ShmLocation  # generation / release, in host shared memory
    handle: bytes  # cudaIpcMemHandle_t of the device buffer
    capacity: int  # bytes of the device buffer


def _as_tensor(ptr: int, nbytes: int, owner) -> torch.Tensor:
    """A uint8 torch view of device memory at `ptr` (DLPack through CuPy, no copy)."""
    import cupy

    memory = cupy.cuda.UnownedMemory(ptr, nbytes, owner)
    array = cupy.ndarray((nbytes,), dtype=cupy.uint8, memptr=cupy.cuda.MemoryPointer(memory, 0))
    return torch.from_dlpack(array)


class _Buffer:
    def __init__(self, nbytes: int, device: int) -> None:
        import cupy

        with cupy.cuda.Device(device):
            self.memory = cupy.cuda.Memory(nbytes)  # a plain cudaMalloc, IPC-exportable
        self.capacity, self.device = nbytes, device
        self.handle = bytes(cupy.cuda.runtime.ipcGetMemHandle(self.memory.ptr))
        self.header = shared_memory.SharedMemory(name=segment_name(), create=True, size=_HEADER)
        self.header.buf[:_HEADER] = bytes(_HEADER)
        self.sent_at = 0.0

    def data(self, nbytes: int) -> torch.Tensor:
        return _as_tensor(self.memory.ptr, nbytes, self.memory)


class CudaIpcSender:
    def __init__(self, node_id: str, max_buffers: int = 8, ttl_s: float = 300.0) -> None:
        self.node_id = node_id
        self.max_buffers = max_buffers
        self.ttl_s = ttl_s
        self._buffers: list[_Buffer] = []
        remove_orphans()
        atexit.register(self.close)

    def _buffer_for(self, nbytes: int, device: int) -> _Buffer | None:
        now = time.monotonic()
        free = [
            b
            for b in self._buffers
            if b.device == device and b.capacity >= nbytes
            and reusable(b.header, now - b.sent_at, self.ttl_s)
        ]  # fmt: skip
        if free:
            return min(free, key=lambda b: b.capacity)
        if len(self._buffers) >= self.max_buffers:
            return None  # every buffer holds an unread transfer: the caller falls back
        buf = _Buffer(max(nbytes, 4 << 20), device)
        self._buffers.append(buf)
        return buf

    def num_unread(self) -> int:
        """Buffers holding a transfer that no receiver has released (nor the TTL reclaimed)."""
        now = time.monotonic()
        return sum(not reusable(b.header, now - b.sent_at, self.ttl_s) for b in self._buffers)

    def send_with(self, nbytes: int, device: int, write) -> CudaIpcLocation | None:
        """Let `write(data)` fill `nbytes` of a pooled device buffer (data: uint8 on `device`)."""
        buf = self._buffer_for(nbytes, device)
        if buf is None:
            return None
        generation = begin_write(buf.header)
        write(buf.data(nbytes))
        torch.cuda.current_stream(device).synchronize()  # the bytes exist before we say so
        end_write(buf.header, generation)
        buf.sent_at = time.monotonic()
        header = ShmLocation(buf.header.name, generation, self.node_id)
        return CudaIpcLocation(header, buf.handle, buf.capacity)

    def close(self) -> None:
        for buf in self._buffers:
            buf.header.close()
            buf.header.unlink()
            buf.memory = None
        self._buffers = []


class CudaIpcReceiver:
    def __init__(self) -> None:
        self._headers = ShmReceiver()
        self._mapped: dict[bytes, int] = {}  # handle -> device pointer in this process

    def _pointer(self, loc: CudaIpcLocation) -> int:
        ptr = self._mapped.get(loc.handle)
        if ptr is None:
            import cupy

            # CuPy's default flag: cudaIpcMemLazyEnablePeerAccess (a peer GPU may open it)
            ptr = cupy.cuda.runtime.ipcOpenMemHandle(loc.handle)
            self._mapped[loc.handle] = ptr
        return ptr

    def view(self, loc: CudaIpcLocation, nbytes: int) -> torch.Tensor:
        """The transfer's bytes in place (uint8, on this process's current device)."""
        self._headers.check(loc.header)
        return _as_tensor(self._pointer(loc), nbytes, None)

    def check(self, loc: CudaIpcLocation) -> None:
        self._headers.check(loc.header)

    def release(self, loc: CudaIpcLocation) -> None:
        torch.cuda.current_stream().synchronize()  # the scatter has read the bytes
        self._headers.release(loc.header)

    def close(self) -> None:
        import cupy

        for ptr in self._mapped.values():
            cupy.cuda.runtime.ipcCloseMemHandle(ptr)
        self._mapped = {}
