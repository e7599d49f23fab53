"""Pack a request's KV blocks into one contiguous buffer and scatter it into another cache.

Block-granular: only the request's blocks move. The buffer layout is the cache layout with the
block axis restricted to the request, (L, 2, n_blocks, block_size, Hkv, D) (a latent cache: 1
slot, not 2), so a layer range
(pipeline stage) or a KV-head range (tensor-parallel rank) is a plain slice of it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVLayout:
    """What a receiver needs to check before scattering a buffer into its cache."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str
    slots: int = 2  # keys and values; 1: a latent that is both

    @classmethod
    def of_cache(cls, kv_cache: torch.Tensor) -> KVLayout:
        num_layers, slots, _, block_size, num_kv_heads, head_dim = kv_cache.shape
        return cls(num_layers, block_size, num_kv_heads, head_dim, str(kv_cache.dtype), slots)


def as_stored(t: torch.Tensor) -> torch.Tensor:
    """A view that index_copy_ takes: fp8's bytes (it has no fp8 kernel on CPU), else t."""
    return t.view(torch.uint8) if t.element_size() == 1 and t.is_floating_point() else t


def pack_blocks(kv_cache: torch.Tensor, block_ids: list[int]) -> torch.Tensor:
    """-> (L, 2, n, bs, Hkv, D) contiguous copy of the given blocks."""
    ids = torch.as_tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    return kv_cache.index_select(2, ids)


def unpack_blocks(kv_cache: torch.Tensor, block_ids: list[int], buffer: torch.Tensor) -> None:
    """Scatter a packed buffer into the given blocks of `kv_cache` (same layout, any device)."""
    expected = (*kv_cache.shape[:2], len(block_ids), *kv_cache.shape[3:])
    if tuple(buffer.shape) != expected:
        raise ValueError(
            f"KV buffer shape {tuple(buffer.shape)} does not fit cache, want {expected}"
        )
    ids = torch.as_tensor(block_ids, dtype=torch.long, device=kv_cache.device)
    buffer = buffer.to(device=kv_cache.device, dtype=kv_cache.dtype)
    as_stored(kv_cache).index_copy_(2, ids, as_stored(buffer))
