"""The pulled point-to-point transport: its staging bookkeeping (pure), and a gloo pair in one
process (the receiver in a thread of its own), including the key that guards the sender."""

from __future__ import annotations

import threading
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client

import pytest
import torch

from kvkernels.p2p_transport import Gloo, P2PReceiver, P2PSender, Staged
from kvkernels.shm_transport import TransferExpired


def test_staged_taken_once_within_the_byte_cap():
    staged = Staged(max_bytes=100, ttl_s=10)
    a = staged.put(torch.zeros(40, dtype=torch.uint8), now=0.0)
    b = staged.put(torch.zeros(10, dtype=torch.float32), now=0.0)  # 40 bytes
    assert staged.put(torch.zeros(21, dtype=torch.uint8), now=0.0) is None  # 101 > 100
    assert len(staged) == 2 and staged.nbytes == 80
    assert staged.take(a) is not None and staged.take(a) is None
    assert staged.nbytes == 40
    assert staged.put(torch.zeros(60, dtype=torch.uint8), now=0.0) is not None  # room again
    assert staged.take(b).dtype == torch.float32


def test_staged_unread_after_ttl_is_reclaimed():
    staged = Staged(max_bytes=100, ttl_s=10)
    old = staged.put(torch.zeros(90, dtype=torch.uint8), now=0.0)
    assert staged.put(torch.zeros(20, dtype=torch.uint8), now=5.0) is None  # still held
    fresh = staged.put(torch.zeros(20, dtype=torch.uint8), now=10.5)  # old one reclaimed
    assert fresh is not None and staged.take(old) is None
    assert staged.nbytes == 20


@pytest.fixture
def pair():
    sender, receiver = P2PSender(Gloo(), max_bytes=1 << 20), P2PReceiver(Gloo())
    yield sender, receiver
    receiver.close()
    sender.close()


def test_gloo_pair_moves_bytes_and_reuses_its_link(pair):
    sender, receiver = pair
    payloads = [torch.arange(n, dtype=torch.float32) for n in (1000, 7, 50_000)]
    locs = [sender.send(p) for p in payloads]
    for p, loc in zip(payloads, locs, strict=True):
        assert torch.equal(receiver.pull(loc).view(torch.float32), p)
    assert len(receiver._peers) == 1 and len(sender.staged) == 0


def test_dropped_or_reclaimed_transfers_are_a_clear_error(pair):
    sender, receiver = pair
    kept, dropped = sender.send(torch.ones(8)), sender.send(torch.zeros(8))
    receiver.drop(dropped)
    assert torch.equal(receiver.pull(kept).view(torch.float32), torch.ones(8))
    with pytest.raises(TransferExpired, match="reclaimed or dropped"):
        receiver.pull(dropped)
    assert sender.send(torch.ones(1 << 19)) is None  # 2 MiB over the 1 MiB cap: caller falls back


def test_a_client_without_the_key_is_refused_and_the_sender_keeps_serving(pair):
    sender, receiver = pair
    with pytest.raises(AuthenticationError):
        Client(sender.address, authkey=b"not the key")
    loc = sender.send(torch.full((4,), 2.0))
    got: list[torch.Tensor] = []
    t = threading.Thread(target=lambda: got.append(receiver.pull(loc)))
    t.start()
    t.join(timeout=60)
    assert torch.equal(got[0].view(torch.float32), torch.full((4,), 2.0))


def test_a_closed_sender_is_a_clear_error(pair):
    sender, receiver = pair
    loc = sender.send(torch.ones(4))
    sender.close()
    with pytest.raises(TransferExpired, match="gone"):
        receiver.pull(loc)
