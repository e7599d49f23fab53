"""Attention over a paged KV cache, plugged into transformers' attention-function registry.

The model runs one flattened batch: input_ids (1, T) holds the new tokens of every scheduled
request back to back. Every attention layer calls `paged_attention_forward`, which
1. writes the new keys/values into the cache slots given by `slot_mapping`, and
2. attends each request's queries to its own context: decode queries (one token each) in one
   batched call over their gathered blocks, prefill chunks one request at a time with a causal
   mask that is offset by the tokens already in the cache.

Two score modifiers that some families pass through the registry are honoured on the torch
path (the compiled decode kernel has neither): `softcap` (Gemma 2: scores -> c * tanh(s / c))
and `s_aux` (gpt-oss's attention sinks: one extra logit per head in the softmax's
denominator, with no value).

KV cache layout, per engine (or per pipeline stage / tensor-parallel rank later):
    kv_cache: (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)
so a layer range or a KV-head range of a request's blocks is one slice (see kv_blocks.py). A
latent cache (DeepSeek) has one slot, not 2: its keys are its values (the latent, then the
rotary key part, whose output columns are cut), so the values' slot is `layer_cache[-1]`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kvkernels import cpu_ops
from kvkernels.kv_blocks import as_stored

ATTENTION_NAME = "splitserve_paged"


@dataclass
class PrefillSpan:
    query_start: int  # index of the first query token in the flattened batch
    query_len: int
    context_len: int  # tokens in the cache after this step (cached prefix + query_len)
    block_table: torch.Tensor  # (num_blocks_of_request,) long


@dataclass
class AttentionMetadata:
    kv_cache: torch.Tensor  # (L, 2 or 1 (a latent), num_blocks, block_size, Hkv, D)
    slot_mapping: torch.Tensor  # (T,) long: flat cache slot of each new token
    prefills: list[PrefillSpan]
    decode_token_idx: torch.Tensor  # (Bd,) long: where each decode query sits in the batch
    decode_block_tables: torch.Tensor  # (Bd, max_blocks) long, padded with 0
    decode_valid: torch.Tensor  # (Bd, 1, 1, max_blocks * block_size) bool: slot < context_len
    decode_context_lens: torch.Tensor  # (Bd,) long
    # (2, Bd * max_blocks, bs, Hkv, D) scratch for the decode gather, reused by every layer: a
    # fresh multi-MB tensor per layer costs more in page faults than the copy itself.
    decode_workspace: torch.Tensor | None = None
    use_kernel: bool = True  # False forces the torch reference path (tests compare the two)
    layer_offset: int = 0  # first model layer held by this cache (pipeline stages)
    positions: torch.Tensor | None = None  # (T,) long: each new token's position

    @property
    def num_decodes(self) -> int:
        return int(self.decode_token_idx.numel())


@dataclass(frozen=True)
class ScoreMods:
    """What a layer changes in softmax(q k^T * scale) beyond the mask; None: plain attention."""

    softcap: float | None = None
    sinks: torch.Tensor | None = None  # (H,): each query head's sink logit

    @property
    def plain(self) -> bool:
        return self.softcap is None and self.sinks is None


PLAIN = ScoreMods()


@dataclass(frozen=True)
class Reach:
    """How far back a layer's queries see: every earlier key (None, None), the last `window`
    keys (a sliding window), or the keys of their own `chunk` (Llama 4's chunked local
    attention: positions [q - q % chunk, q])."""

    window: int | None = None
    chunk: int | None = None

    @classmethod
    def of(cls, module: torch.nn.Module, sliding_window: int | None) -> Reach:
        """The layer's: transformers passes the sliding window; a chunked layer is one whose
        config lists it as "chunked_attention"."""
        config = getattr(module, "config", None)
        types = getattr(config, "layer_types", None) or ()
        idx = getattr(module, "layer_idx", None)
        chunked = idx is not None and idx < len(types) and types[idx] == "chunked_attention"
        return cls(sliding_window, config.attention_chunk_size if chunked else None)

    def oldest(self, q_pos: torch.Tensor) -> torch.Tensor | None:
        """Per query position, the first key position it sees; None: position 0."""
        firsts = []
        if self.window is not None:
            firsts.append(q_pos - self.window + 1)
        if self.chunk is not None:
            firsts.append(q_pos - q_pos % self.chunk)
        return torch.stack(firsts).amax(0) if firsts else None

    def all_of(self, n: int) -> bool:
        """Queries at positions 0 .. n - 1 see every earlier key (plain causal attention)."""
        return (self.window is None or self.window >= n) and (self.chunk is None or self.chunk >= n)


EVERYTHING = Reach()


def take_over_query_temperature(model: torch.nn.Module) -> None:
    """Llama 4's layers without a rotary embedding scale their queries by a temperature that
    grows with the position, log1p(floor((p + 1) / floor_scale)) * attn_scale + 1. Its
    attention takes p from the cache's length, as if the batch were one sequence that starts
    there; ours is a flattened batch of many, with no such cache. So it is switched off there
    and applied in `paged_attention_forward`, with each token's own position."""
    for module in model.modules():
        no_rope = not getattr(module, "use_rope", True)
        if no_rope and getattr(module, "attn_temperature_tuning", False):
            module.attn_temperature_tuning = False
            module.splitserve_temperature = (module.floor_scale, module.attn_scale)


def take_over_latent_attention(model: torch.nn.Module) -> None:
    """DeepSeek V2 / V3's multi-head latent attention: transformers caches each token's latent
    (kv_lora_rank dimensions, plus a rotary key part all heads share), then expands it to every
    head's keys and values (`expand_kv`). We cache the latent itself, as one KV head, and
    attend to it with the expansion absorbed, as vLLM's MLA: with kv_b_proj's rows for a head
    split into W_k and W_v, the head's score q_nope . (W_k c) is (q_nope W_k) . c, and its
    output sum_j p_j (W_v c_j) is W_v (sum_j p_j c_j)."""
    for module in model.modules():
        if hasattr(module, "expand_kv") and hasattr(module, "kv_b_proj"):
            module.expand_kv = _latent_as_kv
            module.splitserve_latent = True


def _latent_as_kv(latent: torch.Tensor, k_rot: torch.Tensor):
    """(B, 1, T, rank) and (B, 1, T, rope) -> the keys (both), the values (the latent)."""
    return torch.cat([latent, k_rot], dim=-1), latent


def _absorbed(module: torch.nn.Module, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q (T, H, nope + rope) -> q in the latent's space (T, H, rank + rope), and W_v (H, v,
    rank): this rank's heads' rows of kv_b_proj (tensor parallelism splits them by head)."""
    nope = module.qk_nope_head_dim
    w = module.kv_b_proj.weight.view(q.shape[1], nope + module.v_head_dim, -1)
    q_latent = torch.einsum("thn,hnc->thc", q[..., :nope], w[:, :nope])
    return torch.cat([q_latent, q[..., nope:]], dim=-1), w[:, nope:]


def _tempered(q: torch.Tensor, positions: torch.Tensor, floor_scale: float, attn_scale: float):
    """q (T, H, D) times each token's temperature, in float and back, as Llama 4's attention."""
    scales = torch.log1p(torch.floor((positions.float() + 1.0) / floor_scale)) * attn_scale + 1.0
    return (q * scales[:, None, None]).to(q.dtype)


def explicit_attention(q, k, v, mask, scale: float, mods: ScoreMods, sinks_shape) -> torch.Tensor:
    """softmax over q k^T with `mods` applied, as transformers' eager attention of those
    families computes it; q (..., n, D), k/v (..., C, D), mask broadcast to (..., n, C) (True:
    visible); the sinks are viewed as `sinks_shape`, which broadcasts to (..., n, 1)."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mods.softcap is not None:
        scores = torch.tanh(scores / mods.softcap) * mods.softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if mods.sinks is not None:  # a last column, dropped after the softmax
        sink = mods.sinks.to(scores.dtype).view(sinks_shape).expand(*scores.shape[:-1], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)  # as eager's
    return torch.matmul(probs[..., : k.shape[-2]], v)


def write_kv(
    layer_cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slots: torch.Tensor
):
    """layer_cache (2 or 1, nb, bs, Hkv, D); key/value (T, Hkv, D) in the cache's dtype;
    slots (T,)."""
    hkv, d = key.shape[1], key.shape[2]
    store = as_stored(layer_cache)
    store[0].view(-1, hkv, d).index_copy_(0, slots, as_stored(key))
    if layer_cache.shape[0] == 2:
        store[1].view(-1, hkv, d).index_copy_(0, slots, as_stored(value))


def gather_context(layer_cache: torch.Tensor, block_table: torch.Tensor, context_len: int):
    """-> keys, values (Hkv, context_len, D) of one request."""
    hkv, d = layer_cache.shape[3:]
    k = layer_cache[0].index_select(0, block_table).view(-1, hkv, d)[:context_len]  # (C, Hkv, D)
    if layer_cache.shape[0] == 1:
        return k.transpose(0, 1), k.transpose(0, 1)
    v = layer_cache[1].index_select(0, block_table).view(-1, hkv, d)[:context_len]
    return k.transpose(0, 1), v.transpose(0, 1)


def decode_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    valid: torch.Tensor,
    scale: float,
    workspace: torch.Tensor | None = None,
    mods: ScoreMods = PLAIN,
) -> torch.Tensor:
    """q (Bd, H, D) -> (Bd, H, D), each query over its own blocks; valid (Bd, 1, 1, L)."""
    bd, h, d = q.shape
    hkv = layer_cache.shape[3]
    flat = block_tables.view(-1)
    slots = layer_cache.shape[0]  # a latent's one holds keys and values
    if workspace is None:
        workspace = layer_cache.new_empty((slots, flat.numel(), *layer_cache.shape[2:]))
    for i in range(slots):
        torch.index_select(layer_cache[i], 0, flat, out=workspace[i])
    # (Bd, Hkv, L, D), in the queries' type (an fp8 cache's are widened here)
    k = workspace[0].view(bd, -1, hkv, d).transpose(1, 2).to(q.dtype)
    v = workspace[-1].view(bd, -1, hkv, d).transpose(1, 2).to(q.dtype)
    # The G query heads that share a KV head act as G query rows: no repeat of K/V needed.
    qg = q.view(bd, hkv, h // hkv, d)  # (Bd, Hkv, G, D)
    if mods.plain:
        out = F.scaled_dot_product_attention(qg, k, v, attn_mask=valid, scale=scale)
    else:
        out = explicit_attention(qg, k, v, valid, scale, mods, (1, hkv, h // hkv, 1))
    return out.reshape(bd, h, d)


def _sdpa_heads(q, k, v, scale: float, mask=None, mods: ScoreMods = PLAIN) -> torch.Tensor:
    """q (H, n, D), k/v (Hkv, C, D) -> (H, n, D); mask (n, C), None: causal.

    K/V heads are repeated explicitly and the call is 4-D: CPU SDPA's flash kernel takes neither
    enable_gqa nor 3-D inputs and would fall back to the (2x slower) math path.
    """
    groups = q.shape[0] // k.shape[0]
    if groups > 1:
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    if not mods.plain:
        if mask is None:
            k_pos = torch.arange(k.shape[1], device=q.device)
            mask = causal_mask(k_pos[k.shape[1] - q.shape[1] :], k_pos, EVERYTHING)
        return explicit_attention(q, k, v, mask, scale, mods, (-1, 1, 1))
    causal = mask is None
    out = F.scaled_dot_product_attention(
        q[None], k[None], v[None], attn_mask=mask, is_causal=causal, scale=scale
    )
    return out[0]


def causal_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, reach: Reach) -> torch.Tensor:
    """(n, C) bool: key j is visible to query i, within the layer's reach."""
    mask = k_pos[None, :] <= q_pos[:, None]
    oldest = reach.oldest(q_pos)
    if oldest is not None:
        mask &= k_pos[None, :] >= oldest[:, None]
    return mask


def prefill_attention(
    q: torch.Tensor,
    k_new: torch.Tensor,
    v_new: torch.Tensor,
    layer_cache: torch.Tensor,
    span: PrefillSpan,
    scale: float,
    reach: Reach = EVERYTHING,
    mods: ScoreMods = PLAIN,
) -> torch.Tensor:
    """q (n, H, D), k_new/v_new (n, Hkv, D) of one request -> (n, H, D)."""
    n = q.shape[0]
    qh = q.transpose(0, 1)  # (H, n, D)
    fresh = span.context_len == span.query_len  # nothing cached before this chunk
    if fresh:
        k, v = k_new.transpose(0, 1), v_new.transpose(0, 1)
        if reach.all_of(n):
            return _sdpa_heads(qh, k, v, scale, mods=mods).transpose(0, 1)
    else:
        k, v = gather_context(layer_cache, span.block_table, span.context_len)
        k, v = k.to(q.dtype), v.to(q.dtype)  # an fp8 cache's, widened
    # query i sits at position (context_len - n + i)
    q_pos = torch.arange(span.context_len - n, span.context_len, device=q.device)
    k_pos = torch.arange(span.context_len, device=q.device)
    mask = causal_mask(q_pos, k_pos, reach)
    return _sdpa_heads(qh, k, v, scale, mask, mods).transpose(0, 1)


def paged_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, T, D)
    key: torch.Tensor,  # (1, Hkv, T, D)
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    attn_metadata: AttentionMetadata | None = None,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if attn_metadata is None:
        raise RuntimeError(
            f"{ATTENTION_NAME} attention needs attn_metadata: run the model via ModelRunner "
            f"(an architecture whose model does not pass attention arguments down to "
            f"{type(module).__name__} cannot run on the paged cache)"
        )
    meta = attn_metadata
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    mods = ScoreMods(kwargs.get("softcap"), kwargs.get("s_aux"))
    reach = Reach.of(module, sliding_window)
    q = query[0].transpose(0, 1)  # (T, H, D)
    temperature = getattr(module, "splitserve_temperature", None)
    if temperature is not None:
        q = _tempered(q, meta.positions, *temperature)
    w_v = None
    if getattr(module, "splitserve_latent", False):
        q, w_v = _absorbed(module, q)
    k = key[0].transpose(0, 1)  # (T, Hkv, D)
    v = value[0].transpose(0, 1)
    layer_cache = meta.kv_cache[module.layer_idx - meta.layer_offset]  # (2 or 1, nb, bs, Hkv, D)
    size, v_size = layer_cache.shape[-1], value.shape[-1]
    latent = layer_cache.shape[0] == 1  # its keys are its values: the latent comes first
    if key.shape[-1] != size or v_size > size or (v_size < size and not latent):
        raise ValueError(
            f"{type(module).__name__} gives keys of head size {key.shape[-1]} and values of "
            f"{v_size}; the paged cache holds {size}"
        )
    # converted once to what the cache stores (no-op unless fp8), written, and read back:
    # every path (fresh prefill, chunked, decode) sees the values the cache holds; a latent's
    # values are its keys (the output's columns past the latent, the rotary part's, are cut)
    stored_k = k.to(layer_cache.dtype)
    stored_v = stored_k if latent else v.to(layer_cache.dtype)
    write_kv(layer_cache, stored_k, stored_v, meta.slot_mapping)
    k = stored_k.to(k.dtype)
    v = k if latent else stored_v.to(v.dtype)

    out = torch.empty_like(q)
    if meta.num_decodes:
        idx = meta.decode_token_idx
        out[idx] = _decode(q[idx], layer_cache, meta, scale, reach, mods)
    for span in meta.prefills:
        sl = slice(span.query_start, span.query_start + span.query_len)
        out[sl] = prefill_attention(q[sl], k[sl], v[sl], layer_cache, span, scale, reach, mods)
    out = out[..., :v_size]  # (T, H, D of the values)
    if w_v is not None:  # from the latent to each head's values
        out = torch.einsum("thc,hvc->thv", out, w_v)
    return out.unsqueeze(0), None


def _decode(q, layer_cache, meta: AttentionMetadata, scale: float, reach: Reach, mods):
    """Decode queries (Bd, H, D): the compiled CPU kernel where it applies (plain scores, a
    sliding window or none), else torch."""
    lens = meta.decode_context_lens
    if meta.use_kernel and mods.plain and (reach.chunk is None or int(lens.max()) <= reach.chunk):
        out = cpu_ops.paged_decode(
            q, layer_cache, meta.decode_block_tables, lens, scale, reach.window
        )
        if out is not None:
            return out
    valid = meta.decode_valid
    oldest = reach.oldest(lens - 1)  # (Bd,): each query sits at position context_len - 1
    if oldest is not None:
        slots = torch.arange(valid.shape[-1], device=valid.device)
        valid = valid & (slots[None, :] >= oldest[:, None])[:, None, None, :]
    return decode_attention(
        q, layer_cache, meta.decode_block_tables, valid, scale, meta.decode_workspace, mods
    )


def register() -> str:
    """Register with transformers once; returns the attn_implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, paged_attention_forward)
    return ATTENTION_NAME
