"""The KV hand-off between replicas of any parallel layouts, one rectangle at a time.

Each sending rank publishes on the KV channel, for each receiving rank, only the (layer range x
KV-head range) of the request's blocks that both hold (engine/parallel.py plans the pieces);
each receiving rank opens the pieces addressed to it and scatters them into its own cache. No
rank ever holds the whole cache of a request unless its layout says it does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.parallel import PieceSpec, Shard, check_coverage, kv_pieces
from kvkernels.kv_blocks import unpack_blocks
from kvkernels.kv_channel import KVChannel, KVTransfer


@dataclass(frozen=True)
class KVPiece:
    """Crosses the Ray boundary with the handoff: one rectangle of a request's KV and where
    the channel put its bytes."""

    spec: PieceSpec
    transfer: KVTransfer

    @property
    def nbytes(self) -> int:
        return self.transfer.nbytes


def _region(kv_cache: torch.Tensor, holder: Shard, spec: PieceSpec) -> torch.Tensor:
    """The view of `holder`'s cache (L, 2, nb, bs, Hkv, D) that the piece covers."""
    layers = slice(spec.layers.start - holder.layers.start, spec.layers.stop - holder.layers.start)
    heads = slice(
        spec.kv_heads.start - holder.kv_heads.start, spec.kv_heads.stop - holder.kv_heads.start
    )
    return kv_cache[layers, :, :, :, heads]


def send_pieces(
    channel: KVChannel,
    kv_cache: torch.Tensor,
    block_ids: list[int],
    src: Shard,
    dst_shards: list[Shard],
) -> list[KVPiece]:
    return [
        KVPiece(spec, channel.send_blocks(_region(kv_cache, src, spec), block_ids))
        for spec in kv_pieces(src, dst_shards)
    ]


def scatter_pieces(
    kv_cache: torch.Tensor,
    block_ids: list[int],
    dst: Shard,
    parts: list[tuple[KVPiece, torch.Tensor]],
) -> None:
    """Write opened pieces (piece, packed view) into dst's cache; they must tile it exactly."""
    check_coverage(dst, [piece.spec for piece, _ in parts])
    for piece, view in parts:
        unpack_blocks(_region(kv_cache, dst, piece.spec), block_ids, view)


def total_bytes(pieces: list[KVPiece]) -> dict[int, int]:
    """Bytes sent per sending rank."""
    sent: dict[int, int] = {}
    for p in pieces:
        sent[p.spec.src_rank] = sent.get(p.spec.src_rank, 0) + p.nbytes
    return sent


def discard_all(channel: KVChannel, pieces: list[KVPiece]) -> None:
    for p in pieces:
        channel.discard(p.transfer)


def discarder_all(channel: KVChannel, pieces: list[KVPiece]) -> Callable[[], None]:
    """discard_all, to call later, without keeping the KV alive meanwhile (KVChannel.discarder)."""
    discards = [channel.discarder(p.transfer) for p in pieces]

    def discard() -> None:
        for each in discards:
            each()

    return discard


def finish_all(channel: KVChannel, pieces: list[KVPiece]) -> None:
    for p in pieces:
        channel.finish(p.transfer)


def open_all(channel: KVChannel, pieces: list[KVPiece]) -> list[tuple[KVPiece, torch.Tensor]]:
    return [(p, channel.open(p.transfer)) for p in pieces]
