"""Runs a transformers model definition on the paged KV cache, one flattened batch per call.

The model comes from transformers (any architecture whose attention goes through the
attention-function registry and takes `position_ids`: Llama, Qwen2, Mistral, OPT, ...); only
the attention is ours. The runner owns the weights and the KV cache; it knows nothing of
requests or scheduling: it takes a `ModelInput` (plain lists, cheap to send to a worker
process later) and returns the logits of the positions that sample.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine import kv_handoff, linear_tuning
from engine.cuda_graphs import DecodeGraphs
from engine.kv_handoff import KVPiece
from engine.limits import context_window
from engine.lora import LoRALayers, load_adapter
from engine.parallel import ParallelLayout, Shard
from engine.rope import fix_longrope
from kvkernels import cpu_ops, few_rows, paged_attention
from kvkernels.kv_blocks import KVLayout, pack_blocks, unpack_blocks
from kvkernels.kv_channel import KVChannel
from kvkernels.paged_attention import AttentionMetadata, PrefillSpan

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SeqInput:
    token_ids: list[int]  # the tokens computed in this step
    start: int  # position of token_ids[0]
    block_table: list[int]  # all blocks of the request, covering start + len(token_ids)
    sample: bool  # return logits for the last token
    # return logits for every token of the step (prompt logprobs), the last one included
    all_logits: bool = False
    lora: int = 0  # the runner's slot of the request's LoRA adapter; 0: the base model


@dataclass(frozen=True)
class ModelInput:
    seqs: list[SeqInput]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.seqs)


@dataclass(frozen=True)
class MemoryShare:
    """vLLM's gpu_memory_utilization for one engine: `share` of its GPU's memory, its largest
    step `tokens` prompt tokens over `seqs` sequences (the scheduler's limits); `probe` reads
    the device's memory (None: CUDA's; engine/kv_memory.py). `draft_block_bytes`: what a draft
    model's KV cache takes for each block of this one (it has as many), from the same share."""

    share: float
    tokens: int
    seqs: int
    probe: Any = None
    draft_block_bytes: int = 0


def load_model(path: str | Path, dtype: str) -> torch.nn.Module:
    """The Hugging Face model at `path` in `dtype`, on our paged attention, on the CPU."""
    from transformers import AutoModelForCausalLM

    name = paged_attention.register()
    return AutoModelForCausalLM.from_pretrained(
        path, dtype=getattr(torch, dtype), attn_implementation=name
    )


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int  # the longest context served exactly (limits.context_window)
    latent: bool = False  # one KV "head": DeepSeek's latent and its rotary key part

    @property
    def kv_slots(self) -> int:
        """Keys and values, or a latent that is both (kvkernels/paged_attention.py)."""
        return 1 if self.latent else 2

    @classmethod
    def of(cls, config) -> ModelShape:
        c = config.get_text_config()
        heads, latent = c.num_attention_heads, _latent(c)
        return cls(
            num_layers=c.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=1 if latent else getattr(c, "num_key_value_heads", None) or heads,
            head_dim=_kv_head_size(c),
            vocab_size=c.vocab_size,
            max_position_embeddings=context_window(c),
            latent=latent,
        )

    def kv_bytes_per_token(self, dtype: torch.dtype, layout: ParallelLayout | None = None) -> int:
        """KV bytes per token of the whole model, or of one worker's shard (its largest
        pipeline stage and 1/tp of the KV heads, or one replicated head) under `layout`."""
        elem = torch.empty((), dtype=dtype).element_size()
        layers, kv_heads = self.num_layers, self.num_kv_heads
        if layout is not None:
            layers = -(-layers // layout.pp)
            kv_heads = layout.kv_heads_per_rank(kv_heads)  # a latent: whole on every rank
        return layers * self.kv_slots * kv_heads * self.head_dim * elem

    def shards(self, layout: ParallelLayout) -> list[Shard]:
        return layout.shards(self.num_layers, self.num_heads, self.num_kv_heads)

    def kv_layout(self, block_size: int, dtype: torch.dtype) -> KVLayout:
        """The whole model's KV layout, whatever the replica's parallel layout."""
        heads, size = self.num_kv_heads, self.head_dim
        return KVLayout(self.num_layers, block_size, heads, size, str(dtype), self.kv_slots)


def _kv_head_size(text_config) -> int:
    """The head size the paged cache holds. Multi-head latent attention (DeepSeek V2 / V3)
    caches, as vLLM, one latent per token that every head reads: kv_lora_rank dimensions and
    the rotary key part (kvkernels/paged_attention.py); their config's head_dim is the rotary
    part only."""
    c = text_config
    if _latent(c):
        return c.kv_lora_rank + c.qk_rope_head_dim
    return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads


def _latent(text_config) -> bool:
    return bool(getattr(text_config, "qk_nope_head_dim", None)) and bool(
        getattr(text_config, "v_head_dim", None)
    )


class ModelRunner:
    opens_own_kv = False  # the caller opens KV transfers and passes views (import_kv)

    def __init__(
        self,
        model: torch.nn.Module,
        num_kv_blocks: int,
        block_size: int,
        device: str = "cpu",
        use_kernel: bool = True,
        shard: Shard | None = None,
        max_model_len: int | None = None,  # the engine's; None: the model's context window
        kv_dtype: torch.dtype | None = None,  # the cache's; None: the model's (fp8: a byte)
        lora_modules: dict[str, str] | None = None,  # LoRA adapter name -> PEFT directory
        # decode steps of up to this many sequences replay CUDA graphs (engine/cuda_graphs.py);
        # 0: every step runs eagerly. capture_graphs=False runs their padded step eagerly.
        graph_batch: int = 0,
        capture_graphs: bool = True,
    ) -> None:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device}: this machine has no CUDA device torch can use")
        self.dtype = next(model.parameters()).dtype
        self.kv_dtype = kv_dtype or self.dtype
        # the compiled CPU decode kernel when it is built; the torch path otherwise
        self.use_kernel = use_kernel and device == "cpu" and cpu_ops.load() is not None
        self.model = model.to(device).eval()
        self.shape = ModelShape.of(model.config)
        window = self.shape.max_position_embeddings
        fix_longrope(self.model, min(max_model_len or window, window))
        paged_attention.take_over_query_temperature(self.model)
        paged_attention.take_over_latent_attention(self.model)
        if device == "cpu":  # decode batches: the Linear forward this host runs them fastest
            rows = linear_tuning.tuned(self.model, linear_tuning.cache_file())
            few_rows.install(self.model, rows)
        self.device = torch.device(device)
        self.block_size = block_size
        # a worker of a parallel replica holds a layer range and a KV-head range; else all
        self.shard = shard or self.shape.shards(ParallelLayout())[0]
        # with graphs, one block past num_kv_blocks takes their padding rows' KV
        scratch = 1 if graph_batch else 0
        self.kv_cache = torch.zeros(
            (
                len(self.shard.layers),
                self.shape.kv_slots,
                num_kv_blocks + scratch,
                block_size,
                len(self.shard.kv_heads),
                self.shape.head_dim,
            ),
            dtype=self.kv_dtype,
            device=self.device,
        )  # (L, 2 or 1, nb, bs, Hkv, D)
        self._num_blocks = num_kv_blocks
        self._workspace = torch.empty(0, dtype=self.kv_dtype, device=self.device)
        self.graphs = None
        if graph_batch:
            longest = min(max_model_len or window, window)
            self.graphs = DecodeGraphs(
                self, graph_batch, -(-longest // block_size), capture=capture_graphs
            )
        self.loras = LoRALayers(self.model)
        self.num_lora_loads = 0
        for name, where in (lora_modules or {}).items():
            self.load_lora(name, where)

    @property
    def lora_slots(self) -> dict[str, int]:
        """The loaded LoRA adapters' slots by name (SeqInput.lora)."""
        return self.loras.slots

    def load_lora(self, name: str, path: str | Path, slot: int | None = None) -> int:
        """Load the PEFT LoRA adapter at `path` as `name` (between forwards) in `slot` (None:
        the next) -> its slot."""
        slot = self.loras.add(load_adapter(name, path, self.model), slot)
        self.num_lora_loads += 1
        return slot

    def unload_lora(self, name: str) -> None:
        self.loras.remove(name)

    @classmethod
    def from_pretrained(cls, path: str | Path, *, dtype: str, **options) -> ModelRunner:
        """The model at `path` loaded in `dtype` (load_model), its runner made by from_model."""
        return cls.from_model(load_model(path, dtype), **options)

    @classmethod
    def from_model(
        cls,
        model: torch.nn.Module,
        *,
        device: str,
        block_size: int,
        num_kv_blocks: int | None,
        kv_cache_memory_mb: int,
        max_model_len: int | None = None,
        kv_dtype: str | None = None,  # None: the model's
        lora_modules: dict[str, str] | None = None,
        graph_batch: int = 0,
        memory_share: MemoryShare | None = None,
    ) -> ModelRunner:
        """A runner of a loaded model, its KV cache sized, checked and its graphs captured."""
        cache = getattr(torch, kv_dtype) if kv_dtype else model.dtype
        per_block = ModelShape.of(model.config).kv_bytes_per_token(cache) * block_size
        if num_kv_blocks is None and memory_share is not None:
            runner_args = (block_size, device, max_model_len, cache)
            kv_bytes = cls.kv_bytes_for_share(model, memory_share, *runner_args)
            # a draft model's cache takes its bytes for each of these blocks, from the same share
            num_kv_blocks = kv_bytes // (per_block + memory_share.draft_block_bytes)
        if num_kv_blocks is None:
            num_kv_blocks = max(1, kv_cache_memory_mb * 2**20 // per_block)
        path = model.config.name_or_path
        logger.info("model %s: %d KV blocks of %d tokens", path, num_kv_blocks, block_size)
        runner = cls(
            model,
            num_kv_blocks,
            block_size,
            device,
            max_model_len=max_model_len,
            kv_dtype=cache,
            lora_modules=lora_modules,
            graph_batch=graph_batch,
        )
        runner.check()
        runner.capture_decode_graphs()
        return runner

    @classmethod
    @torch.inference_mode()
    def kv_bytes_for_share(
        cls, model, share: MemoryShare, block_size: int, device: str, max_len, kv_dtype, **shard
    ) -> int:
        """The KV cache's bytes for `share` of the device's memory (engine/kv_memory.py): the
        largest step run on a throwaway cache (the model moved to the device with it) and
        torch's peak read. `shard`: a worker's (engine/workers.py: ShardRunner's shard, layout
        and group), whose step every rank of its replica runs at once."""
        from engine import kv_memory

        probe = share.probe or kv_memory.CudaProbe(torch.device(device))
        window = ModelShape.of(model.config).max_position_embeddings
        longest = min(max_len or window, window)
        batch = kv_memory.profile_batch(share.tokens, share.seqs, longest, block_size)
        blocks = sum(len(seq.block_table) for seq in batch.seqs)
        probe.reset_peak()
        runner = cls(
            model, blocks, block_size, device, max_model_len=max_len, kv_dtype=kv_dtype, **shard
        )
        runner.execute(batch)  # eager: a throwaway runner captures no graphs
        throwaway = runner.kv_cache.numel() * runner.kv_cache.element_size()
        del runner
        peak = probe.peak() - throwaway
        peak += kv_memory.sampler_bytes(len(batch.seqs), ModelShape.of(model.config).vocab_size)
        kv_bytes = kv_memory.kv_cache_bytes(share.share, probe.total(), peak, probe.free())
        logger.info(
            "gpu_memory_utilization %s: %.2f GiB for the KV cache (weights and the largest step:"
            " %.2f GiB)",
            share.share,
            kv_bytes / kv_memory.GIB,
            peak / kv_memory.GIB,
        )
        return kv_bytes

    def check(self) -> None:
        """Run one token through the model on block 0, then clear the block: an architecture
        the paged attention cannot run fails here, at load, with its reason (not at the first
        request of a started replica)."""
        self._eager(ModelInput([SeqInput([0], 0, [0], True)]))
        self.kv_cache[:, :, 0].zero_()

    @torch.inference_mode()
    def capture_decode_graphs(self) -> int:
        """Capture every decode step's CUDA graph now, at load, rather than on each bucket's
        first step -> how many there are (0: none, the steps run eagerly)."""
        return self.graphs.capture_all() if self.graphs is not None else 0

    @property
    def num_kv_blocks(self) -> int:
        return self._num_blocks

    @property
    def kv_layout(self) -> KVLayout:
        return self.shape.kv_layout(self.block_size, self.kv_dtype)

    @torch.inference_mode()
    def execute(self, batch: ModelInput) -> torch.Tensor:
        """-> logits (rows, vocab), float32, in the order of batch.seqs: one row per sampling
        seq, or one per token for a seq that asks for all its logits."""
        if self.graphs is not None and (logits := self.graphs.run(batch.seqs)) is not None:
            return logits
        return self._eager(batch)

    @torch.inference_mode()
    def _eager(self, batch: ModelInput) -> torch.Tensor:
        input_ids, positions, meta, sample_idx = self._prepare(batch)
        with self._adapters(batch):
            out = self.model(
                input_ids=input_ids,
                position_ids=positions,
                attn_metadata=meta,
                logits_to_keep=sample_idx,
                use_cache=False,
            )
        return out.logits[0].float()  # (S, V)

    def _adapters(self, batch: ModelInput) -> contextlib.AbstractContextManager:
        """The LoRA adapters of the batch's tokens, for one forward."""
        if not any(seq.lora for seq in batch.seqs):
            return contextlib.nullcontext()
        return self.loras.batch([seq.lora for seq in batch.seqs for _ in seq.token_ids])

    def _prepare(self, batch: ModelInput):
        dev, bs = self.device, self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        sample_idx: list[int] = []
        prefills: list[PrefillSpan] = []
        dec_idx: list[int] = []
        dec_tables: list[list[int]] = []
        dec_lens: list[int] = []
        for seq in batch.seqs:
            n, begin = len(seq.token_ids), len(ids)
            ids.extend(seq.token_ids)
            pos.extend(range(seq.start, seq.start + n))
            slots.extend(
                seq.block_table[p // bs] * bs + p % bs for p in range(seq.start, seq.start + n)
            )
            if seq.all_logits:
                sample_idx.extend(range(begin, begin + n))
            elif seq.sample:
                sample_idx.append(begin + n - 1)
            if n == 1:
                dec_idx.append(begin)
                dec_tables.append(seq.block_table)
                dec_lens.append(seq.start + 1)
            else:
                table = torch.tensor(seq.block_table, dtype=torch.long, device=dev)
                prefills.append(PrefillSpan(begin, n, seq.start + n, table))
        max_blocks = max((len(t) for t in dec_tables), default=0)
        padded = [t + [0] * (max_blocks - len(t)) for t in dec_tables]
        lens = torch.tensor(dec_lens, dtype=torch.long, device=dev)
        valid = torch.arange(max_blocks * bs, device=dev)[None, :] < lens[:, None]  # (Bd, L)
        meta = AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=dev),
            prefills=prefills,
            decode_token_idx=torch.tensor(dec_idx, dtype=torch.long, device=dev),
            decode_block_tables=torch.tensor(padded, dtype=torch.long, device=dev).reshape(
                len(padded), max_blocks
            ),
            decode_valid=valid[:, None, None, :],
            decode_context_lens=lens,
            decode_workspace=None
            if self.use_kernel
            else self._decode_workspace(len(padded) * max_blocks),
            use_kernel=self.use_kernel,
            layer_offset=self.shard.layers.start,
            positions=torch.tensor(pos, dtype=torch.long, device=dev),
        )
        input_ids = torch.tensor([ids], dtype=torch.long, device=dev)  # (1, T)
        positions = meta.positions[None]  # (1, T)
        return input_ids, positions, meta, torch.tensor(sample_idx, dtype=torch.long, device=dev)

    def _decode_workspace(self, num_blocks: int) -> torch.Tensor:
        """(slots, num_blocks, bs, Hkv, D) view of a buffer that only grows (AttentionMetadata)."""
        slots = self.shape.kv_slots
        shape = (slots, num_blocks, *self.kv_cache.shape[3:])
        numel = slots * num_blocks * self.kv_cache[0, 0, 0].numel()
        if self._workspace.numel() < numel:
            self._workspace = torch.empty(numel, dtype=self.kv_dtype, device=self.device)
        return self._workspace[:numel].view(shape)

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        return pack_blocks(self.kv_cache, block_ids)

    def import_blocks(self, block_ids: list[int], buffer: torch.Tensor) -> None:
        unpack_blocks(self.kv_cache, block_ids, buffer)

    def send_kv(
        self, block_ids: list[int], dst: ParallelLayout, channel: KVChannel
    ) -> list[KVPiece]:
        """Publish a request's blocks on the channel, cut into the pieces that each rank of
        a decode replica with layout `dst` needs."""
        dst_shards = self.shape.shards(dst)
        return kv_handoff.send_pieces(channel, self.kv_cache, block_ids, self.shard, dst_shards)

    def import_kv(self, block_ids: list[int], parts: list[tuple[KVPiece, torch.Tensor]]) -> None:
        """Scatter opened pieces (piece, view) that together cover this cache."""
        kv_handoff.scatter_pieces(self.kv_cache, block_ids, self.shard, parts)
