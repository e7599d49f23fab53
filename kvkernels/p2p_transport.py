"""Point-to-point KV transport over a two-rank communicator, pulled by the receiver: NCCL
(CuPy) between GPU caches, gloo (torch.distributed) between CPU caches, on one node or across
nodes (any two processes that reach each other over TCP).

Sender: stages a request's packed blocks in a tensor of its own (device memory for NCCL, host
memory for gloo) under a fresh id; the descriptor (`P2PLocation`) carries the sender's control
address, its key and that id. A control thread accepts receivers (multiprocessing.connection,
authenticated with the sender's random key: only holders of a descriptor get in).

Receiver: `pull(loc)` asks the sender for the id; on a pair's first pull both sides join a
two-rank communicator (sender rank 0, receiver rank 1) that every later pull reuses; the sender
answers with the byte count (or None: reclaimed or dropped), then sends on the communicator
while the receiver receives. `drop(loc)` frees a staged tensor that will never be read (the
request ended before its import); it needs no communicator.

Why pull: a point-to-point send needs the receiving rank at the same moment, and only the
receiver knows when it has cache room for the request. Why a thread per receiver: the sender's
engine keeps stepping while transfers go out (NCCL on its own stream, gloo outside the GIL).

Bounds: staged bytes are capped (a send over the cap returns None and the channel falls back to
the object store, as shm does); staged tensors unread after `ttl_s` are reclaimed.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from multiprocessing.connection import Client, Connection, Listener

import torch

from kvkernels.shm_transport import TransferExpired

_TIMEOUT = timedelta(seconds=60)  # communicator set-up and each transfer


def nccl_available() -> bool:
    """CuPy imports with NCCL and sees a CUDA device."""
    try:
        import cupy
        from cupy.cuda import nccl

        return nccl.available and cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # not installed, no driver, no device
        return False


@dataclass(frozen=True)
class P2PLocation:
    address: tuple[str, int]  # the sender's control listener
    authkey: bytes = field(repr=False)
    transfer_id: int
    nbytes: int


# ---- communicators ----------------------------------------------------------------------------


class _GlooLink:
    """A two-rank gloo process group of its own (not the default group: a replica's tensor
    parallel workers may own that)."""

    def __init__(self, store, rank: int) -> None:
        import torch.distributed as dist

        self._store = store  # the process group keeps using it
        self._group = dist.ProcessGroupGloo(store, rank, 2, _TIMEOUT)
        self._peer = 1 - rank

    def send(self, data: torch.Tensor) -> None:
        self._group.send([data], self._peer, 0).wait()

    def recv(self, data: torch.Tensor) -> None:
        self._group.recv([data], self._peer, 0).wait()

    def close(self) -> None:
        self._group = self._store = None


class Gloo:
    name = "gloo"

    def offer(self, host: str):
        """Sender side: (what the receiver needs to join, how the sender joins)."""
        import torch.distributed as dist

        port = _free_port()
        store = dist.TCPStore(host, port, 2, True, _TIMEOUT, wait_for_workers=False)
        return (host, port), lambda: _GlooLink(store, 0)

    def join(self, info) -> _GlooLink:
        import torch.distributed as dist

        host, port = info
        return _GlooLink(dist.TCPStore(host, port, 2, False, _TIMEOUT), 1)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)


class _NcclLink:
    def __init__(self, unique_id, rank: int, device: int) -> None:
        import cupy
        from cupy.cuda import nccl

        self._device = device
        with cupy.cuda.Device(device):
            self._comm = nccl.NcclCommunicator(2, unique_id, rank)
            self._stream = cupy.cuda.Stream(non_blocking=True)
        self._peer = 1 - rank

    def _run(self, op, data: torch.Tensor) -> None:
        import cupy
        from cupy.cuda import nccl

        with cupy.cuda.Device(self._device):
            op(data.data_ptr(), data.numel(), nccl.NCCL_UINT8, self._peer, self._stream.ptr)
            # the bytes have left before the staged tensor is freed / arrived before the scatter
            self._stream.synchronize()

    def send(self, data: torch.Tensor) -> None:
        self._run(self._comm.send, data)

    def recv(self, data: torch.Tensor) -> None:
        self._run(self._comm.recv, data)

    def close(self) -> None:
        self._comm.destroy()


class Nccl:
    """NCCL between two GPUs (NCCL refuses two ranks on one GPU: use cuda_ipc there)."""

    name = "nccl"

    def __init__(self, device: int) -> None:
        self.device = device

    def offer(self, host: str):
        from cupy.cuda import nccl

        unique_id = nccl.get_unique_id()
        return unique_id, lambda: _NcclLink(unique_id, 0, self.device)

    def join(self, info) -> _NcclLink:
        return _NcclLink(info, 1, self.device)

    def empty(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device=f"cuda:{self.device}")


def _nbytes(data: torch.Tensor) -> int:
    return data.numel() * data.element_size()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _node_ip() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except Exception:  # no Ray here: a local pair
        pass
    return "127.0.0.1"


# ---- sender -----------------------------------------------------------------------------------


class Staged:
    """The sender's staged transfers: pure bookkeeping (ids, byte cap, TTL), no I/O."""

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._items: dict[int, tuple[torch.Tensor, float]] = {}
        self._bytes = 0
        self._ids = itertools.count()
        self._lock = threading.Lock()  # the engine thread stages, control threads take

    def put(self, data: torch.Tensor, now: float) -> int | None:
        nbytes = _nbytes(data)
        with self._lock:
            self._reclaim(now)
            if self._bytes + nbytes > self.max_bytes:
                return None
            transfer_id = next(self._ids)
            self._items[transfer_id] = (data, now)
            self._bytes += nbytes
            return transfer_id

    def take(self, transfer_id: int) -> torch.Tensor | None:
        with self._lock:
            item = self._items.pop(transfer_id, None)
            if item is None:
                return None
            self._bytes -= _nbytes(item[0])
            return item[0]

    def _reclaim(self, now: float) -> None:
        for transfer_id, (_, at) in list(self._items.items()):
            if now - at > self.ttl_s:
                self._bytes -= _nbytes(self._items.pop(transfer_id)[0])

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def nbytes(self) -> int:
        return self._bytes


class P2PSender:
    def __init__(self, backend, max_bytes: int = 1 << 30, ttl_s: float = 300.0) -> None:
        self.backend = backend
        self.staged = Staged(max_bytes, ttl_s)
        self._send_lock = threading.Lock()  # one transfer on the wire at a time
        self._authkey = os.urandom(16)
        self._listener = Listener(("0.0.0.0", 0), authkey=self._authkey)
        self._host = _node_ip()
        self.address = (self._host, self._listener.address[1])
        self._closed = False
        threading.Thread(target=self._accept, name="kv-p2p-accept", daemon=True).start()

    def send(self, data: torch.Tensor) -> P2PLocation | None:
        """Stage `data` (a tensor nobody else writes) until pulled or dropped; None if full."""
        data = data.contiguous().view(-1).view(torch.uint8)
        transfer_id = self.staged.put(data, time.monotonic())
        if transfer_id is None:
            return None
        return P2PLocation(self.address, self._authkey, transfer_id, data.numel())

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn = self._listener.accept()
            except Exception:  # closed, or a client without the key: keep serving the rest
                time.sleep(0.01)  # (and never spin on a persistent error)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: Connection) -> None:
        link = None
        try:
            while True:
                op, transfer_id = conn.recv()
                data = self.staged.take(transfer_id)
                if op == "drop":
                    continue
                if link is None:  # the pair's first pull: both sides join the communicator
                    info, join = self.backend.offer(self._host)
                    conn.send(info)
                    link = join()
                conn.send(None if data is None else data.numel())
                if data is not None:
                    with self._send_lock:
                        link.send(data)
        except Exception:  # the receiver went away (or its end of the link failed)
            pass
        finally:
            conn.close()
            if link is not None:
                link.close()

    def close(self) -> None:
        """Forget every staged transfer and stop accepting receivers."""
        if self._closed:
            return
        self._closed = True
        self.staged.clear()
        # closing a listening socket does not wake a thread blocked in accept(): a connection
        # does (it fails the key check, and the thread sees _closed)
        with contextlib.suppress(OSError):
            socket.create_connection(("127.0.0.1", self.address[1]), timeout=1).close()
        self._listener.close()


# ---- receiver ---------------------------------------------------------------------------------


@dataclass
class _Peer:
    conn: Connection
    lock: threading.Lock  # one request / response (and its transfer) at a time per sender
    link: object | None = None


class P2PReceiver:
    def __init__(self, backend) -> None:
        self.backend = backend
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._lock = threading.Lock()

    def _peer(self, loc: P2PLocation) -> _Peer:
        with self._lock:
            peer = self._peers.get(loc.address)
            if peer is None:
                try:
                    conn = Client(loc.address, authkey=loc.authkey)
                except OSError as e:
                    raise TransferExpired(f"KV sender at {loc.address} is gone: {e}") from e
                peer = self._peers[loc.address] = _Peer(conn, threading.Lock())
            return peer

    def pull(self, loc: P2PLocation) -> torch.Tensor:
        """The staged bytes (uint8, on the backend's device); the sender forgets them."""
        peer = self._peer(loc)
        with peer.lock:
            try:
                peer.conn.send(("pull", loc.transfer_id))
                if peer.link is None:
                    peer.link = self.backend.join(peer.conn.recv())
                nbytes = peer.conn.recv()
                if nbytes is None:
                    raise TransferExpired(
                        f"KV transfer {loc.transfer_id} was reclaimed or dropped by its sender"
                    )
                data = self.backend.empty(nbytes)
                peer.link.recv(data)
                return data
            except TransferExpired:
                raise
            except Exception as e:  # EOF, reset, a failed link: the sender took the bytes
                self._forget(loc.address)
                raise TransferExpired(f"KV transfer from {loc.address} failed: {e}") from e

    def drop(self, loc: P2PLocation) -> None:
        try:
            peer = self._peer(loc)
            with peer.lock:
                peer.conn.send(("drop", loc.transfer_id))
        except (TransferExpired, OSError):
            self._forget(loc.address)  # a sender that is gone holds nothing

    def _forget(self, address: tuple[str, int]) -> None:
        with self._lock:
            peer = self._peers.pop(address, None)
        if peer is not None:
            peer.conn.close()

    def close(self) -> None:
        for address in list(self._peers):
            self._forget(address)
