"""The KV channel: moves one request's packed KV blocks from a prefill replica to a decode replica.

One interface, block-granular: the sender packs only the request's blocks (kv_blocks.pack_blocks),
the channel moves that buffer, the receiver scatters it into its own cache. What crosses Ray's
control path is a small `KVTransfer` descriptor; the tensor bytes never do.

Transports:
- `shm` (same node, CPU): pooled shared-memory segments mapped once and reused (see
  shm_transport.py); the receiver scatters straight from the mapped segment. When the pool is
  full of unread transfers, a send falls back to the object store.
- `object_store` (any node): the packed buffer goes into Ray's object store as a numpy array;
  on one node that is plasma shared memory read zero-copy; across nodes Ray moves it. The
  sender's RefKeeper actor holds the ref until the receiver's finish / discard (a nested ref in
  a streaming yield can be freed early by Ray: ref_keeper.py), or for its TTL; then reference
  counting frees it. GPU caches are copied to the host first.
- `cuda_ipc` (same node, GPU caches): pooled device buffers shared by CUDA IPC handles
  (cuda_ipc_transport.py, CuPy); the receiver scatters device to device, on the same GPU or a
  peer GPU. When the pool is full of unread transfers, a send falls back to the object store.
- `gloo` (CPU caches, any nodes) and `nccl` (GPU caches on two GPUs, any nodes; CuPy's NCCL):
  the sender stages the packed blocks and the receiver pulls them over a two-rank communicator
  of the pair (p2p_transport.py): across nodes the bytes go straight between the two
  processes, not through Ray's object store. When the staging cap is reached, a send falls
  back to the object store.

Receiver protocol: `view = channel.open(t)`, scatter `view` into the cache, then
`channel.finish(t)` (raises TransferExpired if the bytes changed underneath); or
`channel.discard(t)` when the request is dropped before its import. Discarding needs no
receiver of its own: any channel on the sender's node may discard a transfer (the sender's
too, when its request ended before the hand-off reached a decode replica), and a second
discard, or one after the finish, changes nothing.
"""

from __future__ import annotations

import asyncio
import functools
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from kvkernels import cuda_ipc_transport, p2p_transport, ref_keeper
from kvkernels.kv_blocks import pack_blocks
from kvkernels.shm_transport import ShmLocation, ShmReceiver, ShmSender, TransferExpired

TRANSPORTS = ("shm", "object_store", "cuda_ipc", "gloo", "nccl")
_PULLED = ("gloo", "nccl")  # the receiver pulls over the pair's communicator
__all__ = ["TRANSPORTS", "KVChannel", "KVTransfer", "TransferExpired"]


@dataclass(frozen=True)
class KVTransfer:
    """Crosses the Ray boundary with the handoff: where the packed KV is and how big it is."""

    transport: str
    shape: tuple[int, ...]  # (L, 2, n_blocks, bs, Hkv, D)
    dtype: str
    # [ObjectRef, RefKeeper handle] (nested: passed by reference), [ShmLocation],
    # [CudaIpcLocation] or [P2PLocation]
    payload: list = field(repr=False)
    send_ms: float = 0.0

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * torch.empty((), dtype=_dtype(self.dtype)).element_size()


_NOT_NUMPY = (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2)


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.removeprefix("torch."))


def _as_packed(raw: torch.Tensor, transfer: KVTransfer) -> torch.Tensor:
    """Reinterpret raw bytes (or a same-dtype array) as the packed KV tensor."""
    dtype = _dtype(transfer.dtype)
    if raw.dtype != dtype:
        raw = raw.view(dtype)
    return raw.view(transfer.shape)


class KVChannel:
    """One per replica; the sending side and the receiving side of every transport."""

    def __init__(self, transport: str = "object_store", node_id: str = "local") -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown KV transport {transport!r}; available: {TRANSPORTS}")
        if transport == "cuda_ipc" and not cuda_ipc_transport.available():
            raise ValueError(
                "kv_transport cuda_ipc needs CuPy and a CUDA device (pip install -e '.[gpu]')"
            )
        if transport == "nccl" and not p2p_transport.nccl_available():
            raise ValueError(
                "kv_transport nccl needs CuPy with NCCL and a CUDA device (pip install -e '.[gpu]')"
            )
        self.transport = transport
        self.node_id = node_id
        self._sender: ShmSender | None = None
        self._receiver = ShmReceiver()
        self._gpu_sender: cuda_ipc_transport.CudaIpcSender | None = None
        self._gpu_receiver: cuda_ipc_transport.CudaIpcReceiver | None = None
        self._keeper = None  # RefKeeper actor, started with the first object-store send
        self._p2p_sender: p2p_transport.P2PSender | None = None
        self._p2p_receiver: p2p_transport.P2PReceiver | None = None

    # ---- sender -------------------------------------------------------------------------------

    def send(self, buffer: torch.Tensor) -> KVTransfer:
        t0 = time.perf_counter()
        shape, dtype = tuple(buffer.shape), str(buffer.dtype)
        if self.transport == "shm":
            self._sender = self._sender or ShmSender(self.node_id)
            loc = self._sender.send(buffer)
            if loc is not None:
                return KVTransfer("shm", shape, dtype, [loc], _ms_since(t0))
        if self.transport in _PULLED:
            staged = self._staged(buffer.clone(), t0)  # the caller may reuse its buffer
            if staged is not None:
                return staged
        if self.transport == "cuda_ipc" and buffer.is_cuda:
            raw = buffer.contiguous().view(torch.uint8).view(-1)
            loc = self._gpu().send_with(raw.numel(), buffer.device.index, lambda d: d.copy_(raw))
            if loc is not None:
                return KVTransfer("cuda_ipc", shape, dtype, [loc], _ms_since(t0))
        return self._via_object_store(buffer, t0)

    def _via_object_store(self, buffer: torch.Tensor, t0: float) -> KVTransfer:
        import ray

        # bf16 and fp8 have no numpy dtype: ship raw bytes and reinterpret on arrival
        raw = buffer.contiguous().cpu()
        array = raw.view(torch.uint8).numpy() if raw.dtype in _NOT_NUMPY else raw.numpy()
        ref = ray.put(array)
        shape, dtype = tuple(buffer.shape), str(buffer.dtype)
        return KVTransfer("object_store", shape, dtype, [ref, self._hold(ref)], _ms_since(t0))

    async def num_kept(self) -> int:
        """Transfers this sender still holds for a receiver: pooled shm segments and CUDA IPC
        buffers not released yet, object-store refs in its keeper, staged point-to-point
        transfers. Each is freed by the receiver's finish or discard, else by its TTL."""
        pooled = sum(end.num_unread() for end in (self._sender, self._gpu_sender) if end)
        staged = 0 if self._p2p_sender is None else len(self._p2p_sender.staged)
        held = 0 if self._keeper is None else await self._keeper.num_held.remote()
        return pooled + staged + held

    def _staged(self, packed: torch.Tensor, t0: float) -> KVTransfer | None:
        """Hold `packed` (a tensor nobody else writes) for the receiver's pull; None when the
        staging cap is reached or the tensor is on the other kind of device."""
        if packed.is_cuda != (self.transport == "nccl"):
            return None
        if packed.is_cuda:  # the gather ran on torch's stream; NCCL sends from its own
            torch.cuda.current_stream(packed.device).synchronize()
        if self._p2p_sender is None:
            self._p2p_sender = p2p_transport.P2PSender(_backend(self.transport, packed.device))
        loc = self._p2p_sender.send(packed)
        if loc is None:
            return None
        shape, dtype = tuple(packed.shape), str(packed.dtype)
        return KVTransfer(self.transport, shape, dtype, [loc], _ms_since(t0))

    def _hold(self, ref):
        """Hand `ref` to this channel's keeper until the receiver releases it; -> the keeper."""
        self._keeper = self._keeper or ref_keeper.start_keeper()
        self._keeper.hold.remote(ref.hex(), [ref])  # in a list: passed as a ref, not its value
        return self._keeper

    def send_blocks(self, kv_cache: torch.Tensor, block_ids: list[int]) -> KVTransfer:
        """Pack a request's blocks of `kv_cache` straight into the transport: for shm, the
        gather writes into the shared segment, so the KV is copied once, not twice."""
        if self.transport == "cuda_ipc" and kv_cache.is_cuda:
            return self._send_blocks_gpu(kv_cache, block_ids)
        if self.transport in _PULLED:  # the gather's output is staged as it is
            t0 = time.perf_counter()
            packed = pack_blocks(kv_cache, block_ids)
            return self._staged(packed, t0) or self._via_object_store(packed, t0)
        if self.transport != "shm" or kv_cache.is_cuda:
            return self.send(pack_blocks(kv_cache, block_ids))
        t0 = time.perf_counter()
        shape = (*kv_cache.shape[:2], len(block_ids), *kv_cache.shape[3:])
        nbytes = int(np.prod(shape)) * kv_cache.element_size()
        ids = torch.as_tensor(block_ids, dtype=torch.long)

        def gather(data: torch.Tensor) -> None:
            torch.index_select(kv_cache, 2, ids, out=data.view(kv_cache.dtype).view(shape))

        self._sender = self._sender or ShmSender(self.node_id)
        loc = self._sender.send_with(nbytes, gather)
        if loc is None:  # pool full of unread transfers
            return self.send(pack_blocks(kv_cache, block_ids))
        return KVTransfer("shm", shape, str(kv_cache.dtype), [loc], _ms_since(t0))

    def _gpu(self) -> cuda_ipc_transport.CudaIpcSender:
        self._gpu_sender = self._gpu_sender or cuda_ipc_transport.CudaIpcSender(self.node_id)
        return self._gpu_sender

    def _send_blocks_gpu(self, kv_cache: torch.Tensor, block_ids: list[int]) -> KVTransfer:
        """The gather writes straight into a pooled device buffer shared by CUDA IPC."""
        t0 = time.perf_counter()
        shape = (*kv_cache.shape[:2], len(block_ids), *kv_cache.shape[3:])
        nbytes = int(np.prod(shape)) * kv_cache.element_size()
        ids = torch.as_tensor(block_ids, dtype=torch.long, device=kv_cache.device)

        def gather(data: torch.Tensor) -> None:
            torch.index_select(kv_cache, 2, ids, out=data.view(kv_cache.dtype).view(shape))

        loc = self._gpu().send_with(nbytes, kv_cache.device.index, gather)
        if loc is None:  # pool full of unread transfers
            return self.send(pack_blocks(kv_cache, block_ids).cpu())
        return KVTransfer("cuda_ipc", shape, str(kv_cache.dtype), [loc], _ms_since(t0))

    # ---- receiver -----------------------------------------------------------------------------

    def open(self, transfer: KVTransfer) -> torch.Tensor:
        """The packed KV (L, 2, n, bs, Hkv, D) as a read-only view; valid until finish/discard."""
        if transfer.transport == "shm":
            loc: ShmLocation = transfer.payload[0]
            if loc.node_id != self.node_id:
                raise ValueError(
                    f"shm KV transfer from node {loc.node_id} cannot be read on node "
                    f"{self.node_id}; use kv_transport: object_store across nodes"
                )
            return _as_packed(self._receiver.view(loc, transfer.nbytes), transfer)
        if transfer.transport in _PULLED:
            return _as_packed(self._puller(transfer.transport).pull(transfer.payload[0]), transfer)
        if transfer.transport == "cuda_ipc":
            self._gpu_receiver = self._gpu_receiver or cuda_ipc_transport.CudaIpcReceiver()
            return _as_packed(
                self._gpu_receiver.view(transfer.payload[0], transfer.nbytes), transfer
            )
        import ray

        return self._wrap(ray.get(transfer.payload[0]), transfer)

    async def open_async(self, transfer: KVTransfer) -> torch.Tensor:
        """open() for async callers: an object-store fetch is awaited, not blocked on."""
        if transfer.transport == "object_store":
            return self._wrap(await transfer.payload[0], transfer)
        if transfer.transport in _PULLED:  # a blocking receive: off the event loop
            return await asyncio.to_thread(self.open, transfer)
        return self.open(transfer)

    def _puller(self, transport: str) -> p2p_transport.P2PReceiver:
        if self._p2p_receiver is None:
            self._p2p_receiver = p2p_transport.P2PReceiver(_backend(transport, None))
        return self._p2p_receiver

    @staticmethod
    def _wrap(array, transfer: KVTransfer) -> torch.Tensor:
        with warnings.catch_warnings():  # the object-store array is read-only; we only read it
            warnings.simplefilter("ignore", UserWarning)
            return _as_packed(torch.from_numpy(np.asarray(array)), transfer)

    def finish(self, transfer: KVTransfer) -> None:
        """After the scatter: raise TransferExpired if the bytes were reused meanwhile; release."""
        if transfer.transport == "shm":
            loc = transfer.payload[0]
            self._receiver.check(loc)
            self._receiver.release(loc)
        elif transfer.transport == "cuda_ipc" and self._gpu_receiver is not None:
            self._gpu_receiver.check(transfer.payload[0])
            self._gpu_receiver.release(transfer.payload[0])
        elif transfer.transport == "object_store":
            _release_kept(transfer)
        # pulled transports: the bytes are this process's own since open()

    def discard(self, transfer: KVTransfer) -> None:
        """Free a transfer that will not be read (its request ended before the import)."""
        if transfer.transport == "shm":
            self._receiver.release(transfer.payload[0])
        elif transfer.transport == "cuda_ipc":
            # releasing needs only the host header: no device mapping to open for a drop
            self._receiver.release(transfer.payload[0].header)
        elif transfer.transport in _PULLED:
            self._puller(transfer.transport).drop(transfer.payload[0])
        else:
            _release_kept(transfer)

    def discarder(self, transfer: KVTransfer) -> Callable[[], None]:
        """discard(transfer), to call later, holding only where the transfer is: a held
        object-store ref would keep its object (the KV) alive as long as the callable."""
        if transfer.transport == "object_store":
            return _keeper_release(transfer)
        return functools.partial(self.discard, transfer)

    def receive(self, transfer: KVTransfer) -> torch.Tensor:
        """A private copy of the packed KV (open + copy + finish), for callers without a cache."""
        copy = self.open(transfer).clone()
        self.finish(transfer)
        return copy

    def close(self) -> None:
        ends = (self._sender, self._gpu_sender, self._gpu_receiver)
        for end in (*ends, self._p2p_sender, self._p2p_receiver):
            if end is not None:
                end.close()


def _backend(transport: str, device: torch.device | None):
    """The pair's communicator kind; a receiver's NCCL end lives on its current device."""
    if transport == "nccl":
        index = device.index if device is not None else None
        return p2p_transport.Nccl(torch.cuda.current_device() if index is None else index)
    return p2p_transport.Gloo()


def _release_kept(transfer: KVTransfer) -> None:
    if transfer.transport == "object_store":
        _keeper_release(transfer)()


def _keeper_release(transfer: KVTransfer) -> Callable[[], None]:
    """Releases an object-store transfer's ref from its keeper; holds the ref's id, not it."""
    key, keeper = transfer.payload[0].hex(), transfer.payload[1]
    return lambda: keeper.release.remote(key)  # fire and forget: the keeper drops its borrow


def _ms_since(t0: float) -> float:
    return (time.perf_counter() - t0) * 1e3
