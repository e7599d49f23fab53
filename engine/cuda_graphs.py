"""CUDA graphs of decode steps (vLLM's default on GPUs; `enforce_eager` turns them off).

An eager decode step of a small model is bound by the CPU launching its kernels: on an H200 the
default model's step launched ~1,640 kernels and kept the GPU busy a fifth of the time (README,
*On a GPU*). A graph records one step's launches once and replays them in one call.

A graph has fixed shapes and addresses, so each is captured for a bucket: a batch size (padded
up to one of CAPTURE_SIZES) and a block-table width (padded up to a power of two). Its inputs are
one static (batch, 2 + width) table of token id, position and block table per row, which a step
copies in; the slot mapping, context lengths and attention mask are computed inside the graph.
Padding rows decode token 0 at position 0 into the runner's scratch block, which the block
manager never hands out. The logits go into one buffer shared by all graphs, read right after
each replay; graphs share one memory pool, which is safe because they never run at once.

Every bucket is captured when the replica starts (`capture_all`, as vLLM does), largest first:
the workspace is then allocated once at its largest and each smaller graph reuses the pool's
memory, and no request's step waits on a capture. A bucket that is still missing (a replica
that started with capture off) is captured on its first use.

Only steps of plain decodes run here: one token per sequence, each sampled, no LoRA adapter, on
a runner that holds the whole model (tensor- and pipeline-parallel workers run eagerly). With
`capture=False` the same padded static step runs eagerly: the tests use it on CPUs.
"""

from __future__ import annotations

import bisect
import logging
import time
from dataclasses import dataclass

import torch

from kvkernels.paged_attention import AttentionMetadata

logger = logging.getLogger(__name__)

CAPTURE_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def bucket(sizes: tuple[int, ...], n: int) -> int | None:
    """The smallest size that holds n, or None when none does."""
    i = bisect.bisect_left(sizes, n)
    return sizes[i] if i < len(sizes) else None


def table_widths(max_blocks: int) -> tuple[int, ...]:
    """Powers of two up to the first that holds a sequence's most blocks."""
    widths = [1]
    while widths[-1] < max_blocks:
        widths.append(widths[-1] * 2)
    return tuple(widths)


@dataclass
class _Graph:
    rows: torch.Tensor  # (B, 2 + width) long: token id, position, block table
    graph: torch.cuda.CUDAGraph | None  # None: run eagerly (capture=False)


class DecodeGraphs:
    def __init__(self, runner, max_batch: int, max_blocks: int, capture: bool = True) -> None:
        self.runner = runner
        self.sizes = tuple(s for s in CAPTURE_SIZES if s < max_batch) + (
            bucket(CAPTURE_SIZES, max_batch) or max_batch,
        )
        self.widths = table_widths(max_blocks)
        self.capture = capture
        self.scratch = runner.num_kv_blocks  # the block past those the block manager owns
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._logits: torch.Tensor | None = None  # (max rows, V) float32
        self._workspace = torch.empty(0, dtype=runner.kv_dtype, device=runner.device)
        self.failed = False  # a capture failed: every step runs eagerly from then on
        self.num_steps = 0  # steps run here

    def _width(self, seqs) -> int | None:
        """The table width of a step of plain decodes that a graph can run; None otherwise."""
        plain = all(
            len(s.token_ids) == 1 and s.sample and not s.all_logits and not s.lora for s in seqs
        )
        if self.failed or not plain or not 0 < len(seqs) <= self.sizes[-1]:
            return None
        return bucket(self.widths, max(len(s.block_table) for s in seqs))

    def capture_all(self) -> int:
        """Capture every bucket, largest batch and widest table first -> how many graphs
        there are; 0 when a capture failed (steps then run eagerly)."""
        start = time.perf_counter()
        for size in reversed(self.sizes):
            for width in reversed(self.widths):
                if self._captured(size, width) is None:
                    return 0
        logger.info(
            "captured %d decode graphs in %.1f s", len(self._graphs), time.perf_counter() - start
        )
        return len(self._graphs)

    def _captured(self, size: int, width: int) -> _Graph | None:
        """The bucket's graph, captured now if it is not yet; None when the capture failed."""
        try:
            return self._graph(size, width)
        except Exception as e:  # an op that cannot be captured: serve eagerly, not fail
            logger.warning("CUDA graph capture failed (%s); decode steps run eagerly", e)
            self.failed = True
            self._graphs.clear()
            return None

    def run(self, seqs) -> torch.Tensor | None:
        """-> logits (len(seqs), V) float32 of a step of plain decodes; None for any other
        step, or when its graph could not be captured (the caller runs it eagerly)."""
        n = len(seqs)
        width = self._width(seqs)
        if width is None:
            return None
        entry = self._captured(bucket(self.sizes, n), width)
        if entry is None:
            return None
        rows = [[s.token_ids[0], s.start, *self._padded(s.block_table, width)] for s in seqs]
        rows += [self._padding_row(width)] * (entry.rows.shape[0] - n)
        entry.rows.copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
        if entry.graph is None:
            self._step(entry.rows)
        else:
            entry.graph.replay()
        self.num_steps += 1
        return self._logits[:n].clone()

    def _padded(self, table: list[int], width: int) -> list[int]:
        return table + [self.scratch] * (width - len(table))

    def _padding_row(self, width: int) -> list[int]:
        # token 0 at position 0: its KV goes to the scratch block's first slot
        return [0, 0, *[self.scratch] * width]

    def _graph(self, size: int, width: int) -> _Graph:
        key = (size, width)
        if key not in self._graphs:
            self._reserve(size, width)
            rows = torch.tensor([self._padding_row(width)] * size, device=self.runner.device)
            self._graphs[key] = _Graph(rows, self._record(rows) if self.capture else None)
        return self._graphs[key]

    def _reserve(self, size: int, width: int) -> None:
        """Grow the shared workspace; graphs captured on the old one are dropped (they would
        read freed memory). It grows twofold, so this happens a few times at most."""
        runner = self.runner
        cache = runner.kv_cache
        need = runner.shape.kv_slots * size * width * cache[0, 0, 0].numel()
        if self._workspace.numel() < need:
            self._drop_graphs()
            self._workspace = torch.empty(
                max(need, 2 * self._workspace.numel()), dtype=runner.kv_dtype, device=cache.device
            )
        if self._logits is None:  # (largest batch, vocab): 50 MB for the default model at 256
            self._logits = torch.empty(
                (self.sizes[-1], runner.shape.vocab_size), dtype=torch.float32, device=cache.device
            )

    def _drop_graphs(self) -> None:
        # a pool whose graphs are all gone is freed: later captures need a new one
        self._graphs.clear()
        if self.capture:
            self.pool = torch.cuda.graph_pool_handle()

    def _record(self, rows: torch.Tensor) -> torch.cuda.CUDAGraph:
        # warm up on a side stream first, as torch's docs ask (lazy inits, autotuning)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._step(rows)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        # thread_local: a KV import on another thread may launch work meanwhile
        with torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
            self._step(rows)
        logger.debug(
            "captured a decode graph: batch %d, %d blocks", rows.shape[0], rows.shape[1] - 2
        )
        return graph

    def _step(self, rows: torch.Tensor) -> None:
        """The decode step on the static rows, logits into the shared buffer."""
        runner = self.runner
        size, width = rows.shape[0], rows.shape[1] - 2
        bs = runner.block_size
        positions = rows[:, 1]
        tables = rows[:, 2:].contiguous()
        lens = positions + 1
        block = tables.gather(1, (positions // bs)[:, None])[:, 0]
        slots = torch.arange(width * bs, device=rows.device)
        meta = AttentionMetadata(
            kv_cache=runner.kv_cache,
            slot_mapping=block * bs + positions % bs,
            prefills=[],
            decode_token_idx=torch.arange(size, device=rows.device),
            decode_block_tables=tables,
            decode_valid=(slots[None, :] < lens[:, None])[:, None, None, :],
            decode_context_lens=lens,
            decode_workspace=self._workspace_view(size * width),
            use_kernel=False,
            layer_offset=runner.shard.layers.start,
            positions=positions,
        )
        out = runner.model(
            input_ids=rows[None, :, 0],
            position_ids=positions[None],
            attn_metadata=meta,
            logits_to_keep=torch.arange(size, device=rows.device),
            use_cache=False,
        )
        self._logits[:size].copy_(out.logits[0])

    def _workspace_view(self, num_blocks: int) -> torch.Tensor:
        cache = self.runner.kv_cache
        shape = (cache.shape[1], num_blocks, *cache.shape[3:])
        return self._workspace[: cache.shape[1] * num_blocks * cache[0, 0, 0].numel()].view(shape)
