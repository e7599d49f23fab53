"""Who holds what in a tensor x pipeline parallel replica: pure arithmetic, no torch, no Ray.

A replica with layout (tp, pp) runs tp * pp workers; global rank = pp_rank * tp + tp_rank, so
the tp ranks of one pipeline stage are consecutive (one placement-group bundle each, the TP group
packed on one node). Stage `p` holds a contiguous layer range (the first `L % pp` stages hold one
layer more); tp rank `t` holds the t-th equal slice of the attention heads and of the KV heads.

When tp exceeds the KV heads (a multiple of them, as vLLM requires), each KV head is replicated
on tp / num_kv_heads consecutive ranks: the ones whose query heads read it (Qwen3-30B-A3B's 4 KV
heads at tp8, a Gemma of one). The first of them is its holder (`kv_copy` 0), which sends it in
a hand-off; the others hold copies. A model whose KV is one latent every query head reads
(DeepSeek's multi-head latent attention) is the case of one KV head: every rank holds it.

The KV hand-off between a prefill replica and a decode replica of different layouts is planned
here: `kv_pieces` lists, for one sending rank, which (layer range x KV-head range) each receiving
rank needs from it, so every rank sends and receives only its own part of the cache.
"""

from __future__ import annotations

from dataclasses import dataclass

# model types whose tensor / pipeline parallel workers the engine runs (engine/sharding.py): the
# families whose model forward is embed -> rotary -> layers -> norm -> lm_head, and OPT's
PARALLEL_MODEL_TYPES = (
    "opt",
    *("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "gemma", "gemma2", "gemma3_text"),
    "gemma3",  # of vision and text: its text model is split, its vision tower left out
    *("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v2", "deepseek_v3"),  # MoE
    # Llama 4: its checkpoints (vision and text) load as the text model (Llama4ForCausalLM)
    *("llama4_text", "llama4"),
)


@dataclass(frozen=True)
class Shard:
    """One worker's part of the model and of the KV cache."""

    rank: int
    tp_rank: int
    pp_rank: int
    layers: range  # model layer indices held by this stage
    kv_heads: range  # KV heads held by this tp rank
    heads: range  # attention (query) heads held by this tp rank
    kv_copy: int = 0  # > 0: another rank of the stage holds the same KV heads (replicated)


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tensor and pipeline parallel sizes must be >= 1, got {self}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    def check(self, num_layers: int, num_heads: int, num_kv_heads: int) -> None:
        """Raise ValueError when the model cannot be split this way."""
        if num_heads % self.tp or (num_kv_heads % self.tp and self.tp % num_kv_heads):
            raise ValueError(
                f"tensor_parallel_size {self.tp} must divide the model's {num_heads} attention "
                f"heads, and divide or be a multiple of its {num_kv_heads} KV heads"
            )
        if self.pp > num_layers:
            raise ValueError(
                f"pipeline_parallel_size {self.pp} exceeds the model's {num_layers} layers"
            )

    def shards(self, num_layers: int, num_heads: int, num_kv_heads: int) -> list[Shard]:
        self.check(num_layers, num_heads, num_kv_heads)
        stages = split_evenly(num_layers, self.pp)
        heads, kv_heads = num_heads // self.tp, self.kv_heads_per_rank(num_kv_heads)
        copies = max(self.tp // num_kv_heads, 1)  # consecutive ranks holding each KV head
        return [
            Shard(
                rank=p * self.tp + t,
                tp_rank=t,
                pp_rank=p,
                layers=stages[p],
                kv_heads=range(t // copies * kv_heads, (t // copies + 1) * kv_heads),
                heads=range(t * heads, (t + 1) * heads),
                kv_copy=t % copies,
            )
            for p in range(self.pp)
            for t in range(self.tp)
        ]

    def kv_heads_per_rank(self, num_kv_heads: int) -> int:
        """1 / tp of them, or one replicated where tp exceeds them."""
        return max(num_kv_heads // self.tp, 1)

    def stage_ranks(self, pp_rank: int) -> list[int]:
        """The global ranks of one pipeline stage: its tensor-parallel group."""
        return [pp_rank * self.tp + t for t in range(self.tp)]


def split_evenly(n: int, parts: int) -> list[range]:
    """n items in `parts` contiguous ranges; the first n % parts ranges get one more."""
    size, extra = divmod(n, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (1 if i < extra else 0))
    return [range(bounds[i], bounds[i + 1]) for i in range(parts)]


@dataclass(frozen=True)
class PieceSpec:
    """A rectangle of the KV cache (layers x KV heads, all of a request's blocks) that one
    sending rank ships to one receiving rank."""

    src_rank: int
    dst_rank: int
    layers: range
    kv_heads: range


def _overlap(a: range, b: range) -> range:
    return range(max(a.start, b.start), min(a.stop, b.stop))


def kv_pieces(src: Shard, dst_shards: list[Shard]) -> list[PieceSpec]:
    """What `src` sends: for each receiving shard, the part of its cache that `src` holds
    (replicated KV heads: their first holder sends them, the others hold copies)."""
    if src.kv_copy:
        return []
    pieces = []
    for dst in dst_shards:
        layers, heads = _overlap(src.layers, dst.layers), _overlap(src.kv_heads, dst.kv_heads)
        if len(layers) and len(heads):
            pieces.append(PieceSpec(src.rank, dst.rank, layers, heads))
    return pieces


def check_coverage(dst: Shard, pieces: list[PieceSpec]) -> None:
    """Raise ValueError unless `pieces` tile dst's (layers x KV heads) exactly once."""
    covered: set[tuple[int, int]] = set()
    for p in pieces:
        cells = {(layer, head) for layer in p.layers for head in p.kv_heads}
        outside = {c for c in cells if c[0] not in dst.layers or c[1] not in dst.kv_heads}
        if outside or cells & covered:
            raise ValueError(
                f"KV piece from rank {p.src_rank} (layers {p.layers}, KV heads {p.kv_heads}) "
                f"does not fit rank {dst.rank}'s part of the cache"
            )
        covered |= cells
    if len(covered) != len(dst.layers) * len(dst.kv_heads):
        raise ValueError(
            f"KV hand-off covers {len(covered)} of rank {dst.rank}'s "
            f"{len(dst.layers) * len(dst.kv_heads)} (layer, KV head) cells: the prefill "
            "replica was told a different decode layout"
        )


def split_micro_batches(token_counts: list[int], parts: int) -> list[range]:
    """Contiguous groups of sequences with about equal token counts (pipeline micro-batches);
    empty groups are dropped, so there are min(parts, len(token_counts)) of them."""
    parts = min(parts, len(token_counts))
    if parts <= 1:
        return [range(len(token_counts))] if token_counts else []
    total = sum(token_counts)
    groups, start, acc = [], 0, 0
    for i, n in enumerate(token_counts):
        acc += n
        remaining_seqs = len(token_counts) - i - 1
        remaining_groups = parts - len(groups) - 1
        # close a group at its share of the tokens, keeping one sequence per later group
        if remaining_groups and (
            acc >= total * (len(groups) + 1) / parts or remaining_seqs == remaining_groups
        ):
            groups.append(range(start, i + 1))
            start = i + 1
    groups.append(range(start, len(token_counts)))
    return groups
