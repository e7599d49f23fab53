"""The KV channel: moves one request's packed KV blocks from a prefill replica to a decode replica.

One interface, block-granular: the sender packs only the request's blocks (kv_blocks.pack_blocks),
the channel moves that buffer, the receiver scatters it into its own cache. What crosses Ray's
control path is a small `KVTransfer` descriptor; the tensor bytes never do.

Transports:
- `object_store`: the packed buffer is put into Ray's object store as a numpy array. On one node
  that is shared memory (plasma) read zero-copy by the receiver; across nodes Ray moves it. Its
  lifetime follows the reference: freed once sender and receiver drop it, so an abandoned
  transfer (client gone between prefill and decode) cannot leak.
Not implemented yet (see README, Status): a mapped-once shared-memory ring and gloo for CPU
replicas on one node, CUDA IPC (CuPy) and NCCL for GPU replicas.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

TRANSPORTS = ("object_store",)


@dataclass(frozen=True)
class KVTransfer:
    """Crosses the Ray boundary with the handoff: where the packed KV is and how big it is."""

    transport: str
    shape: tuple[int, ...]  # (L, 2, n_blocks, bs, Hkv, D)
    dtype: str
    payload: list = field(repr=False)  # [ObjectRef]: nested, so Ray passes it by reference
    send_ms: float = 0.0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=_dtype(self.dtype)).element_size()


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def send(buffer: torch.Tensor, transport: str = "object_store") -> KVTransfer:
    """Publish a packed KV buffer (CPU tensor) and return its descriptor."""
    if transport not in TRANSPORTS:
        raise ValueError(f"unknown KV transport {transport!r}; available: {TRANSPORTS}")
    import ray

    t0 = time.perf_counter()
    # bf16 has no numpy dtype: ship the raw bytes and reinterpret on arrival
    raw = (
        buffer.contiguous().view(torch.uint8).numpy()
        if buffer.dtype == torch.bfloat16
        else (buffer.contiguous().numpy())
    )
    ref = ray.put(raw)
    ms = (time.perf_counter() - t0) * 1e3
    return KVTransfer(transport, tuple(buffer.shape), str(buffer.dtype), [ref], ms)


def receive(transfer: KVTransfer) -> torch.Tensor:
    """-> the packed buffer as a tensor (a zero-copy view of the object store where possible)."""
    import ray

    array = ray.get(transfer.payload[0])
    tensor = torch.from_numpy(np.asarray(array))
    dtype = _dtype(transfer.dtype)
    if tensor.dtype != dtype:
        tensor = tensor.view(dtype)
    return tensor.view(transfer.shape)
