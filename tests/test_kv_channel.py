"""The KV channel moves a request's blocks bit-exactly between two processes (CPU)."""

from __future__ import annotations

import asyncio
import gc
import os
import time
import weakref
from types import SimpleNamespace

import psutil
import pytest
import ray
import torch

from kvkernels.kv_blocks import KVLayout, pack_blocks, unpack_blocks
from kvkernels.kv_channel import KVChannel, KVTransfer, TransferExpired
from kvkernels.shm_transport import ShmSender, remove_orphans

pytestmark = pytest.mark.serve
SHAPE = (3, 2, 10, 4, 2, 8)  # (L, 2, blocks, bs, Hkv, D)


@pytest.fixture(scope="module")
def cluster(ray_serve):
    """The session's shared Ray cluster: the senders are actors on it."""
    return ray_serve


FP8 = "float8_e4m3fn"


@ray.remote(num_cpus=0)
class _Sender:
    """A cache of each dtype in another process, sending over one channel."""

    def __init__(self, transport: str) -> None:
        g = torch.Generator().manual_seed(0)
        cache = torch.randn(*SHAPE, generator=g)
        self.caches = {d: cache.to(getattr(torch, d)) for d in ("float32", "bfloat16", FP8)}
        self.channel = KVChannel(transport)

    def send(self, blocks: list[int], via: str = "send", dtype: str = "float32"):
        if via == "send_blocks":  # packed straight into the transport
            return self.channel.send_blocks(self.caches[dtype], blocks)
        return self.channel.send(pack_blocks(self.caches[dtype], blocks))

    def blocks(self, blocks: list[int], dtype: str = "float32") -> torch.Tensor:
        return self.caches[dtype][:, :, blocks].clone()

    def block_bytes(self, blocks: list[int], dtype: str) -> torch.Tensor:
        """Their bytes, whatever the dtype (Ray does not unpickle an fp8 tensor)."""
        return self.blocks(blocks, dtype).view(torch.uint8)

    async def num_kept(self) -> int:
        return await self.channel.num_kept()

    def pid(self) -> int:
        return os.getpid()


@pytest.fixture(scope="module")
def pairs(cluster):
    """transport -> (sender actor, receiving channel), made on first use and shared by the
    bit-exact cases: each actor is a process that imports torch (seconds on 2 cores)."""
    made: dict[str, tuple] = {}

    def pair(transport: str) -> tuple:
        if transport not in made:
            made[transport] = (_Sender.remote(transport), KVChannel(transport))
        return made[transport]

    yield pair
    for sender, receiver in made.values():
        receiver.close()
        ray.kill(sender)


@pytest.mark.parametrize("via", ["send", "send_blocks"])
@pytest.mark.parametrize("transport", ["shm", "object_store", "gloo"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", FP8])  # fp8: kv_cache_dtype fp8
def test_blocks_arrive_bit_exact_in_other_slots(pairs, dtype, transport, via):
    sender, receiver = pairs(transport)
    src, dst = [7, 2, 5], [4, 0, 1]  # scattered blocks, in request order
    for _ in range(3):  # segments are reused after release
        transfer = ray.get(sender.send.remote(src, via, dtype))
        assert transfer.transport == transport
        elem = {"float32": 4, "bfloat16": 2, FP8: 1}[dtype]
        assert (
            transfer.shape == (3, 2, 3, 4, 2, 8) and transfer.nbytes == 3 * 2 * 3 * 4 * 2 * 8 * elem
        )
        cache = torch.zeros(3, 2, 6, 4, 2, 8, dtype=getattr(torch, dtype))
        unpack_blocks(cache, dst, receiver.open(transfer))
        receiver.finish(transfer)
        sent = ray.get(sender.block_bytes.remote(src, dtype))
        assert torch.equal(cache[:, :, dst].contiguous().view(torch.uint8), sent)
        assert not cache[:, :, [2, 3, 5]].any()  # untouched blocks stay untouched


def test_shm_segments_are_reused_once_released():
    sender, receiver = KVChannel("shm"), KVChannel("shm")
    try:
        first = sender.send(torch.ones(1000))
        receiver.receive(first)
        second = sender.send(torch.full((1000,), 2.0))
        assert second.payload[0].segment == first.payload[0].segment
        assert torch.equal(receiver.receive(second), torch.full((1000,), 2.0))
        with pytest.raises(TransferExpired):  # the first transfer's bytes are gone
            receiver.open(first)
    finally:
        sender.close()


def test_unread_shm_transfers_count_as_kept_until_read_or_discarded_on_the_node():
    """A segment that holds a transfer nobody released is kept for its reader (the replicas'
    stats show it); any channel on the node can discard it, the sender's own too, and a
    second discard, or one after the reader's finish, changes nothing."""
    sender, receiver = KVChannel("shm"), KVChannel("shm")

    def kept() -> int:
        return asyncio.run(sender.num_kept())

    try:
        read, dropped, left = (sender.send(torch.full((1000,), float(i))) for i in range(3))
        assert kept() == 3
        receiver.receive(read)
        receiver.discard(dropped)
        assert kept() == 1
        sender.discard(left)  # its request left before a decode replica took it
        assert kept() == 0
        for transfer in (read, dropped, left):  # again: nothing changes
            receiver.discard(transfer)
        reused = sender.send(torch.ones(1000))
        receiver.discard(read)  # a stale discard does not release the reused segment
        assert kept() == 1 and torch.equal(receiver.receive(reused), torch.ones(1000))
    finally:
        sender.close()


def test_unread_segment_is_reclaimed_after_ttl_and_reader_gets_a_clear_error():
    channel = KVChannel("shm")
    channel._sender = ShmSender("local", max_segments=1, ttl_s=0.0)
    try:
        stale = channel.send(torch.ones(10))
        fresh = channel.send(torch.zeros(10))  # ttl 0: the unread segment is reclaimed
        assert fresh.transport == "shm" and fresh.payload[0].segment == stale.payload[0].segment
        with pytest.raises(TransferExpired, match="reclaimed or reused"):
            KVChannel("shm").open(stale)
    finally:
        channel.close()


def _wait_for_kept(keeper, n: int) -> None:
    deadline = time.monotonic() + 30
    while ray.get(keeper.num_held.remote()) != n:  # hold and release are fire-and-forget
        assert time.monotonic() < deadline, ray.get(keeper.num_held.remote())
        time.sleep(0.05)


def test_object_store_transfers_are_kept_until_finished_or_discarded(cluster):
    sender = _Sender.remote("object_store")
    receiver = KVChannel("object_store")
    first, second = ray.get([sender.send.remote([1, 2]), sender.send.remote([3])])
    keeper = first.payload[1]
    assert second.payload[1] == keeper  # one keeper per sending channel
    _wait_for_kept(keeper, 2)
    assert torch.equal(receiver.open(first)[:, :, 1], ray.get(sender.blocks.remote([2]))[:, :, 0])
    receiver.finish(first)
    _wait_for_kept(keeper, 1)
    receiver.discard(second)  # dropped before its import
    _wait_for_kept(keeper, 0)


def test_a_discarder_frees_later_without_keeping_the_object_store_ref():
    """What a prefill replica keeps to free a transfer if its caller dies (seconds later) must
    not pin the KV meanwhile: it holds the ref's id and the keeper, not the ref."""

    class Ref:  # an ObjectRef's stand-in
        def hex(self) -> str:
            return "ab12"

    released: list[str] = []
    keeper = SimpleNamespace(release=SimpleNamespace(remote=released.append))
    ref = Ref()
    alive = weakref.ref(ref)
    transfer = KVTransfer("object_store", (1,), "float32", [ref, keeper])
    discard = KVChannel("object_store").discarder(transfer)
    del ref, transfer
    gc.collect()
    assert alive() is None and released == []
    discard()
    assert released == ["ab12"]


def _wait_for_staged(sender, n: int) -> None:
    deadline = time.monotonic() + 30
    while ray.get(sender.num_kept.remote()) != n:  # a drop is fire-and-forget
        assert time.monotonic() < deadline, ray.get(sender.num_kept.remote())
        time.sleep(0.05)


def _wait_for_exit(pid: int) -> None:
    deadline = time.monotonic() + 30
    while psutil.pid_exists(pid):
        assert time.monotonic() < deadline, f"process {pid} still runs"
        time.sleep(0.05)


def test_gloo_transfers_are_pulled_once_and_dropped_on_discard(cluster):
    sender = _Sender.remote("gloo")
    receiver = KVChannel("gloo")
    first, second, third = ray.get([sender.send.remote([1, 2], "send_blocks") for _ in range(3)])
    assert first.payload[0].address == second.payload[0].address  # one sender per channel
    assert ray.get(sender.num_kept.remote()) == 3
    assert torch.equal(receiver.open(first)[:, :, 1], ray.get(sender.blocks.remote([2]))[:, :, 0])
    receiver.finish(first)
    _wait_for_staged(sender, 2)
    with pytest.raises(TransferExpired, match="reclaimed or dropped"):
        receiver.open(first)  # the sender forgot it once it was pulled
    receiver.discard(second)  # dropped before its import: the sender frees it
    _wait_for_staged(sender, 1)
    pid = ray.get(sender.pid.remote())
    ray.kill(sender)  # the sender's process is gone: its staged KV with it
    _wait_for_exit(pid)  # ray.kill returns before the process has ended
    with pytest.raises(TransferExpired):
        receiver.open(third)
    receiver.close()


def test_gloo_pulls_from_two_senders_concurrently(cluster):
    import asyncio

    senders = [_Sender.remote("gloo") for _ in range(2)]
    receiver = KVChannel("gloo")
    transfers = ray.get(
        [s.send.remote([i, 9], "send_blocks", "bfloat16") for i, s in enumerate(senders * 3)]
    )

    async def pull_all():
        return await asyncio.gather(*(receiver.open_async(t) for t in transfers))

    views = asyncio.run(pull_all())
    for i, (sender, view) in enumerate(zip(senders * 3, views, strict=True)):
        assert torch.equal(view, ray.get(sender.blocks.remote([i, 9], "bfloat16")))
    receiver.close()


def test_full_pool_falls_back_to_the_object_store(cluster):
    channel = KVChannel("shm")
    channel._sender = ShmSender("local", max_segments=1, ttl_s=3600)
    try:
        assert channel.send(torch.ones(10)).transport == "shm"  # never read: pool now full
        overflow = channel.send(torch.full((10,), 3.0))
        assert overflow.transport == "object_store"
        assert torch.equal(KVChannel("shm").receive(overflow), torch.full((10,), 3.0))
    finally:
        channel.close()


def test_shm_transfer_from_another_node_is_refused():
    sender = KVChannel("shm", node_id="node-a")
    try:
        transfer = sender.send(torch.ones(4))
        with pytest.raises(ValueError, match="object_store across nodes"):
            KVChannel("shm", node_id="node-b").open(transfer)
    finally:
        sender.close()


def test_layout_mismatch_is_refused():
    cache = torch.zeros(2, 2, 4, 4, 1, 8)
    with pytest.raises(ValueError, match="does not fit"):
        unpack_blocks(cache, [0, 1], torch.zeros(2, 2, 2, 4, 2, 8))
    assert KVLayout.of_cache(cache) == KVLayout(2, 4, 1, 8, "torch.float32")


def test_unknown_transport_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown KV transport"):
        KVChannel("carrier-pigeon")


def test_segments_of_dead_owners_are_removed(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    orphan = tmp_path / f"splitserve-kv-{dead.stdout.strip()}-deadbeef"
    mine = tmp_path / f"splitserve-kv-{os.getpid()}-cafecafe"
    orphan.write_bytes(b"x")
    mine.write_bytes(b"x")
    assert remove_orphans(str(tmp_path)) == [orphan.name]
    assert not orphan.exists() and mine.exists()
