"""The KV channel moves a request's blocks bit-exactly between two processes (CPU)."""

from __future__ import annotations

import pytest
import ray
import torch

from kernels import kv_channel
from kernels.kv_blocks import KVLayout, pack_blocks, unpack_blocks

pytestmark = pytest.mark.serve


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _temp_dir=str(tmp_path_factory.mktemp("ray")),
    )
    yield
    ray.shutdown()


@ray.remote(num_cpus=0)
class _Sender:
    def __init__(self, dtype: str) -> None:
        g = torch.Generator().manual_seed(0)
        self.cache = torch.randn(3, 2, 10, 4, 2, 8, generator=g).to(getattr(torch, dtype))

    def send(self, blocks: list[int]) -> kv_channel.KVTransfer:
        return kv_channel.send(pack_blocks(self.cache, blocks))

    def blocks(self, blocks: list[int]) -> torch.Tensor:
        return self.cache[:, :, blocks].clone()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_blocks_arrive_bit_exact_in_other_slots(cluster, dtype):
    sender = _Sender.remote(dtype)
    src = [7, 2, 5]  # scattered source blocks, in request order
    transfer = ray.get(sender.send.remote(src))
    assert transfer.shape == (3, 2, 3, 4, 2, 8) and transfer.nbytes == transfer.shape[
        0
    ] * 2 * 3 * 4 * 2 * 8 * (4 if dtype == "float32" else 2)
    received = torch.zeros(3, 2, 6, 4, 2, 8, dtype=getattr(torch, dtype))
    dst = [4, 0, 1]
    unpack_blocks(received, dst, kv_channel.receive(transfer))
    expected = ray.get(sender.blocks.remote(src))
    assert torch.equal(received[:, :, dst], expected)
    untouched = [b for b in range(6) if b not in dst]
    assert not received[:, :, untouched].any()


def test_layout_mismatch_is_refused():
    cache = torch.zeros(2, 2, 4, 4, 1, 8)
    with pytest.raises(ValueError, match="does not fit"):
        unpack_blocks(cache, [0, 1], torch.zeros(2, 2, 2, 4, 2, 8))
    assert KVLayout.of_cache(cache) == KVLayout(2, 4, 1, 8, "torch.float32")


def test_unknown_transport_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown KV transport"):
        kv_channel.send(torch.zeros(1), transport="carrier-pigeon")
