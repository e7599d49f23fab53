"""Multi-worker replicas: tensor x pipeline parallelism with Ray actors and torch.distributed.

The replica keeps one engine and one scheduler; its runner is a `WorkerGroupRunner` that sends
every step's `ModelInput` to tp * pp `ModelWorker` actors (one placement-group bundle each when
the replica runs in one, as Serve's `placement_group_bundles` give it) and returns the logits
of the last stage. The workers form a torch.distributed group (gloo on CPU, NCCL on CUDA):
all-reduce inside a stage's tensor-parallel group, point-to-point sends of activations between
stages. A step's sequences are split into pp micro-batches, so stage s works on micro-batch i+1
while stage s+1 works on micro-batch i.

A worker that dies fails the step that needed it; the runner then reports itself broken
(`check_health`), so Serve replaces the replica, and its workers (the replica's child actors)
go with it.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
from datetime import timedelta
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.draft_model import (
    DraftSteps,
    check_vocabulary,
    draft_model_runner,
    load_draft,
    run_drafts,
)
from engine.kv_handoff import KVPiece, finish_all, open_all
from engine.lora import LoRAError
from engine.model_runner import MemoryShare, ModelInput, ModelRunner, ModelShape
from engine.model_store import resolve_model
from engine.parallel import ParallelLayout, Shard, split_micro_batches
from engine.sharding import decoder
from kvkernels import paged_attention
from kvkernels.kv_blocks import KVLayout
from kvkernels.kv_channel import KVChannel

logger = logging.getLogger(__name__)
_COLLECTIVE_TIMEOUT = timedelta(seconds=120)  # a peer that died mid-step fails us, not hangs us
_START_TIMEOUT_S = 600.0


class ShardRunner(ModelRunner):
    """ModelRunner of one worker: its layers and heads only, pipelined over micro-batches."""

    def __init__(
        self,
        model: torch.nn.Module,
        num_kv_blocks: int,
        block_size: int,
        device: str,
        shard: Shard,
        layout: ParallelLayout,
        tp_group,  # torch.distributed ProcessGroup of this stage's tensor-parallel ranks
        max_model_len: int | None = None,
        kv_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            model,
            num_kv_blocks,
            block_size,
            device,
            shard=shard,
            max_model_len=max_model_len,
            kv_dtype=kv_dtype,
        )
        self.layout = layout
        self.tp_group = tp_group
        self.hidden_size = model.config.get_text_config().hidden_size
        self.first = shard.pp_rank == 0
        self.last = shard.pp_rank == layout.pp - 1
        # the LM head is split by vocabulary: the stage's first rank gathers the logits
        self.returns_logits = self.last and shard.tp_rank == 0
        self.base = decoder(model)  # embeddings, layers, final norm
        rotary = getattr(self.base, "rotary_emb", None)  # OPT has none; Gemma 3's takes a type
        self.rotary_per_type = rotary is not None and (
            "layer_type" in inspect.signature(rotary.forward).parameters
        )

    def _peer(self, pp_rank: int) -> int:  # same tp rank, another stage
        return pp_rank * self.layout.tp + self.shard.tp_rank

    @torch.inference_mode()
    def execute(self, batch: ModelInput) -> torch.Tensor | None:
        import torch.distributed as dist

        counts = [len(s.token_ids) for s in batch.seqs]
        groups = split_micro_batches(counts, self.layout.pp)
        micro = [ModelInput(batch.seqs[g.start : g.stop]) for g in groups]
        sends, logits = [], []
        for mb in micro:
            input_ids, positions, meta, sample_idx = self._prepare(mb)
            if self.first:
                hidden = self._embed(input_ids, positions)
            else:
                hidden = torch.empty(
                    (1, mb.num_tokens, self.hidden_size), dtype=self.dtype, device=self.device
                )
                dist.recv(hidden, src=self._peer(self.shard.pp_rank - 1))
            with self._adapters(mb):  # every tensor-parallel rank has the same adapters
                hidden = self._layers(hidden, positions, meta)
            if self.last:
                logits.append(self._logits(hidden, sample_idx))
            else:  # async: start the next micro-batch while this one travels
                nxt = self._peer(self.shard.pp_rank + 1)
                sends.append(dist.isend(hidden.contiguous(), dst=nxt))
        for work in sends:
            work.wait()
        return torch.cat(logits) if self.returns_logits else None

    # What each family's model adds around its layers, done here as its forward does: Granite
    # scales its embeddings and divides its logits, Gemma 2 / 3 softcap their logits, Gemma 3
    # has a rotary embedding per layer type, OPT adds learned position embeddings and may
    # project its embeddings in and out of its layers' width.

    def _embed(self, input_ids, positions) -> torch.Tensor:
        base = self.base
        hidden = base.embed_tokens(input_ids)
        if getattr(base, "embed_positions", None) is not None:  # OPT
            if base.project_in is not None:
                hidden = base.project_in(hidden)
            return hidden + base.embed_positions(None, 0, position_ids=positions)
        multiplier = getattr(base, "embedding_multiplier", None)  # Granite
        return hidden if multiplier is None else hidden * multiplier

    def _layers(self, hidden, positions, meta):
        base = self.base
        rotary = self._rotary(hidden, positions)
        types = getattr(base.config, "layer_types", None)
        for i, layer in zip(self.shard.layers, base.layers, strict=True):
            extra = {}
            if rotary is not None:  # OPT's layers take none
                extra["position_embeddings"] = (
                    rotary[types[i]] if isinstance(rotary, dict) else rotary
                )
            hidden = layer(
                hidden, attention_mask=None, position_ids=positions, attn_metadata=meta, **extra
            )
        return hidden

    def _rotary(self, hidden, positions):
        """One (cos, sin), or (Gemma 3) one per layer type, as its model computes them; None
        for OPT."""
        rotary = getattr(self.base, "rotary_emb", None)
        if rotary is None:
            return None
        if not self.rotary_per_type:
            return rotary(hidden, position_ids=positions)
        return {t: rotary(hidden, positions, t) for t in set(self.base.config.layer_types)}

    def _logits(self, hidden, sample_idx) -> torch.Tensor:
        base, hidden = self.base, hidden[:, sample_idx]
        for name in ("norm", "final_layer_norm"):  # OPT-350m has neither: its layers do it
            if getattr(base, name, None) is not None:
                hidden = getattr(base, name)(hidden)
        if getattr(base, "project_out", None) is not None:  # OPT-350m
            hidden = base.project_out(hidden)
        logits = self.model.lm_head(hidden)[0]  # (S, V), in the model's dtype as its forward
        if self.layout.tp > 1:
            logits = self._gather_vocabulary(logits)
            if logits is None:
                return None
        config = self.model.config.get_text_config()
        if getattr(config, "logits_scaling", None):  # Granite
            logits = logits / config.logits_scaling
        cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2 / 3
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits.float()

    def _gather_vocabulary(self, logits: torch.Tensor) -> torch.Tensor | None:
        """(S, V / tp) on each rank -> (S, V) on the stage's first rank, None on the others."""
        import torch.distributed as dist

        root = self.layout.stage_ranks(self.shard.pp_rank)[0]
        parts = None
        if self.returns_logits:
            parts = [torch.empty_like(logits) for _ in range(self.layout.tp)]
        dist.gather(logits.contiguous(), parts, dst=root, group=self.tp_group)
        return torch.cat(parts, dim=-1)[:, : self.shape.vocab_size] if parts else None


class ModelWorker:
    """One rank of a replica (made a Ray actor by WorkerGroupRunner)."""

    def __init__(
        self,
        path: str,
        config: EngineConfig,
        layout: ParallelLayout,
        rank: int,
        num_kv_blocks: int | None,  # None: sized by gpu_memory_utilization (allocate)
        kv_transport: str,
    ) -> None:
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.path, self.config, self.layout, self.rank = path, config, layout, rank
        self.num_kv_blocks = num_kv_blocks
        self.kv_transport = kv_transport
        self.runner: ShardRunner | None = None
        self.channel: KVChannel | None = None
        self._draft: torch.nn.Module | None = None  # rank 0's draft model, loaded at start
        self.draft_runner: ModelRunner | None = None  # and its runner, once blocks are known

    def _model_dir(self) -> str:
        """The replica's model directory, or, on another node (a pipeline stage placed
        apart) where it is not, this node's copy of the same model (a Hub model's cache)."""
        if Path(self.path, "config.json").is_file():
            return self.path
        return str(resolve_model(self.config.model, self.config.revision))

    def address(self) -> tuple[str, int]:
        """A free TCP port on this node for the process group's rendezvous (rank 0 only)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def start(self, master: tuple[str, int]) -> None:
        """Join the process group, then load the model and keep this rank's shard."""
        import ray
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM

        from engine.sharding import shard_model

        backend = "nccl" if self.config.device.startswith("cuda") else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{master[0]}:{master[1]}",
            rank=self.rank,
            world_size=self.layout.world_size,
            timeout=_COLLECTIVE_TIMEOUT,
        )
        groups = [dist.new_group(self.layout.stage_ranks(p)) for p in range(self.layout.pp)]
        name = paged_attention.register()
        model = AutoModelForCausalLM.from_pretrained(
            self._model_dir(), dtype=getattr(torch, self.config.dtype), attn_implementation=name
        )
        shard = ModelShape.of(model.config).shards(self.layout)[self.rank]
        tp_group = groups[shard.pp_rank]
        shard_model(model, shard, self.layout.tp, tp_group)
        self._shard = (model, {"shard": shard, "layout": self.layout, "tp_group": tp_group})
        # the draft model, whole, on the first rank's device (before a share is measured)
        self._draft = load_draft(self.config) if self.rank == 0 else None
        if self.num_kv_blocks is not None:  # else gpu_memory_utilization sizes it next
            self.allocate(self.num_kv_blocks)
        node_id = ray.get_runtime_context().get_node_id()
        self.channel = KVChannel(self.kv_transport, node_id)

    def kv_bytes_for_share(self, share: MemoryShare) -> int:
        """The bytes this rank's KV cache may take under gpu_memory_utilization: the largest
        step profiled on a throwaway cache, every rank at once (the step's collectives)."""
        model, shard = self._shard
        c = self.config
        kv_dtype = getattr(torch, c.kv_dtype)
        args = (c.block_size, c.device, c.max_model_len, kv_dtype)
        return ShardRunner.kv_bytes_for_share(model, share, *args, **shard)

    def allocate(self, num_kv_blocks: int) -> None:
        """This rank's runner, with its KV cache of `num_kv_blocks` blocks."""
        model, shard = self._shard
        c = self.config
        self.num_kv_blocks = num_kv_blocks
        self.runner = ShardRunner(
            model, num_kv_blocks, c.block_size, c.device, max_model_len=c.max_model_len,
            kv_dtype=getattr(torch, c.kv_dtype), **shard,
        )  # fmt: skip
        if self._draft is not None:
            self.draft_runner = draft_model_runner(self._draft, c, num_kv_blocks)

    def execute(self, batch: ModelInput) -> torch.Tensor | None:
        return self.runner.execute(batch)

    def draft(self, steps: DraftSteps) -> list[list[int]]:
        return run_drafts(self.draft_runner, steps)

    def pid(self) -> int:
        return os.getpid()

    def load_lora(self, name: str, path: str, slot: int) -> str | None:
        """None, or why this rank cannot load the adapter (its group undoes the others)."""
        try:
            self.runner.load_lora(name, path, slot)
        except (LoRAError, OSError) as e:
            return str(e)
        return None

    def unload_lora(self, name: str) -> None:
        if name in self.runner.lora_slots:
            self.runner.unload_lora(name)

    def send_kv(self, block_ids: list[int], dst: ParallelLayout) -> list[KVPiece]:
        return self.runner.send_kv(block_ids, dst, self.channel)

    def import_kv(self, block_ids: list[int], pieces: list[KVPiece]) -> None:
        parts = open_all(self.channel, pieces)
        self.runner.import_kv(block_ids, parts)
        finish_all(self.channel, pieces)

    def kv_cache_shape(self) -> tuple[int, ...]:
        return tuple(self.runner.kv_cache.shape)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self.channel is not None:
            self.channel.close()
        if dist.is_initialized():
            dist.destroy_process_group()


class WorkerDraft:
    """A parallel replica's draft model as its proposer sees it (engine/draft_model.py): the
    draft whole on the first worker's device, as vLLM's `draft_tensor_parallel_size: 1`
    (a draft is small; split, each of its forwards would wait on the workers' collectives),
    with as many KV blocks as the replica's cache; a step's forwards are one call there."""

    def __init__(self, group: WorkerGroupRunner) -> None:
        self.group = group
        self.shape = group.draft_shape
        self.block_size = group.block_size
        self.num_kv_blocks = group.num_kv_blocks

    def draft(self, steps: DraftSteps) -> list[list[int]]:
        return self.group.draft(steps)


class WorkerGroupFailed(RuntimeError):
    """A worker of this replica died; the replica must be replaced."""


class WorkerGroupRunner:
    """The runner of a replica whose model is split over tp * pp worker actors."""

    opens_own_kv = True  # each worker opens the pieces addressed to it

    def __init__(
        self,
        path: str,
        config: EngineConfig,
        layout: ParallelLayout,
        kv_transport: str = "shm",
        memory_share: MemoryShare | None = None,  # None: the config's (tests give their own)
    ) -> None:
        from transformers import AutoConfig

        from engine.sharding import check_model_type

        self.layout = layout
        model_config = AutoConfig.from_pretrained(path)
        check_model_type(model_config)  # before any worker starts
        self.shape = ModelShape.of(model_config)
        self.shards: list[Shard] = self.shape.shards(layout)  # raises if it cannot split
        self.block_size = config.block_size
        self.kv_dtype = getattr(torch, config.kv_dtype)
        per_block = self.shape.kv_bytes_per_token(self.kv_dtype, layout) * config.block_size
        self.per_block = per_block  # of the worker with the most layers
        self.share = memory_share or config.memory_share
        self.num_kv_blocks: int | None = config.num_kv_blocks
        if self.num_kv_blocks is None and self.share is None:
            self.num_kv_blocks = max(1, config.kv_cache_memory_mb * 2**20 // per_block)
        self.draft_shape = self._draft_shape(config)
        self.failure: str | None = None
        self.lora_slots: dict[str, int] = {}  # the LoRA adapters every worker holds
        self.num_lora_loads = 0
        self._next_lora_slot = 1  # a slot is never reused (engine/lora.py)
        self.workers = self._start(path, config, kv_transport)
        self.draft_runner = WorkerDraft(self) if self.draft_shape else None
        for name, where in config.lora_modules:
            self.load_lora(name, where)
        logger.info(
            "model %s on %d workers (tp=%d, pp=%d): %d KV blocks of %d tokens",
            path, layout.world_size, layout.tp, layout.pp, self.num_kv_blocks, self.block_size,
        )  # fmt: skip

    def _draft_shape(self, config: EngineConfig) -> ModelShape | None:
        """The draft model's shape (None: no draft), its vocabulary checked before any
        worker starts."""
        from transformers import AutoConfig

        spec = config.speculative
        if spec is None or spec.method != "draft_model":
            return None
        shape = ModelShape.of(AutoConfig.from_pretrained(resolve_model(spec.model, spec.revision)))
        check_vocabulary(spec, shape.vocab_size, self.shape.vocab_size)
        return shape

    def _start(self, path: str, config: EngineConfig, kv_transport: str) -> list:
        import ray

        actor = ray.remote(ModelWorker)
        workers = [
            actor.options(**_placement(rank, self.layout, config)).remote(
                path, config, self.layout, rank, self.num_kv_blocks, kv_transport
            )
            for rank in range(self.layout.world_size)
        ]
        try:
            master = ray.get(workers[0].address.remote(), timeout=_START_TIMEOUT_S)
            self._get([w.start.remote(master) for w in workers], timeout=_START_TIMEOUT_S)
            if self.num_kv_blocks is None:
                self.num_kv_blocks = self._size_by_share(workers)
            self.worker_pids = self._get([w.pid.remote() for w in workers])
        except ray.exceptions.GetTimeoutError as e:
            _kill(workers)
            raise RuntimeError(
                f"the {self.layout.world_size} model workers did not start within "
                f"{_START_TIMEOUT_S:.0f} s: not enough resources for "
                f"{self.layout.world_size} x {{'CPU': {config.worker_num_cpus}}}?"
            ) from e
        except ray.exceptions.RayTaskError as e:  # a worker refused its shard of the model
            _kill(workers)  # the others would wait for it in a collective
            if isinstance(e.cause, Exception):
                raise e.cause from e  # e.g. the ValueError naming what does not split
            raise
        except ValueError:  # the share holds no block
            _kill(workers)
            raise
        return workers

    def _size_by_share(self, workers: list) -> int:
        """gpu_memory_utilization's KV blocks: as many as the tightest rank's share holds
        (each rank on its own GPU, each measured there), every rank's cache then allocated."""
        refs = [w.kv_bytes_for_share.remote(self.share) for w in workers]
        budgets = self._get(refs, timeout=_START_TIMEOUT_S)
        # the first rank's cache holds the draft's blocks too (as many, in its bytes)
        per_block = [self.per_block + (self._draft_block_bytes() if r == 0 else 0)
                     for r in range(len(workers))]  # fmt: skip
        num_kv_blocks = min(b // n for b, n in zip(budgets, per_block, strict=True))
        if num_kv_blocks < 1:
            raise ValueError(
                f"gpu_memory_utilization {self.share.share}: a worker's share leaves "
                f"{min(budgets)} bytes for its KV cache, less than one block "
                f"({max(per_block)} bytes); raise it, or lower max_num_batched_tokens"
            )
        self._get([w.allocate.remote(num_kv_blocks) for w in workers], timeout=_START_TIMEOUT_S)
        return num_kv_blocks

    def _draft_block_bytes(self) -> int:
        if self.draft_shape is None:
            return 0
        return self.draft_shape.kv_bytes_per_token(self.kv_dtype) * self.block_size

    # ---- the runner interface (engine/model_runner.py) ----------------------------------------

    @property
    def kv_layout(self) -> KVLayout:
        return self.shape.kv_layout(self.block_size, self.kv_dtype)

    def execute(self, batch: ModelInput) -> torch.Tensor:
        import ray

        ref = ray.put(batch)  # serialized once for all workers
        results = self._get([w.execute.remote(ref) for w in self.workers])
        return results[self.layout.stage_ranks(self.layout.pp - 1)[0]]

    def draft(self, steps: DraftSteps) -> list[list[int]]:
        """A step's draft forwards, on the first worker (where the draft model is)."""
        return self._get([self.workers[0].draft.remote(steps)])[0]

    def send_kv(self, block_ids: list[int], dst: ParallelLayout, _channel=None) -> list[KVPiece]:
        """Each worker publishes its pieces itself (the replica's channel is not used)."""
        per_worker = self._get([w.send_kv.remote(block_ids, dst) for w in self.workers])
        return [piece for pieces in per_worker for piece in pieces]

    def import_kv(self, block_ids: list[int], pieces: list[KVPiece]) -> None:
        self._get(
            [
                w.import_kv.remote(block_ids, [p for p in pieces if p.spec.dst_rank == rank])
                for rank, w in enumerate(self.workers)
            ]
        )

    def load_lora(self, name: str, path: str | Path) -> int:
        """Load a LoRA adapter on every worker, each its slice of its stage's layers, in one
        slot -> the slot; if any worker cannot, none keeps it."""
        slot, self._next_lora_slot = self._next_lora_slot, self._next_lora_slot + 1
        errors = self._get([w.load_lora.remote(name, str(path), slot) for w in self.workers])
        if any(errors):
            self._get([w.unload_lora.remote(name) for w in self.workers])
            raise LoRAError(next(e for e in errors if e))
        self.lora_slots[name] = slot
        self.num_lora_loads += 1
        return slot

    def unload_lora(self, name: str) -> None:
        self._get([w.unload_lora.remote(name) for w in self.workers])
        del self.lora_slots[name]

    def export_blocks(self, block_ids: list[int]) -> torch.Tensor:
        raise NotImplementedError("a multi-worker replica hands KV off with send_kv")

    def check_health(self) -> None:
        if self.failure is not None:
            raise WorkerGroupFailed(self.failure)

    def shutdown(self) -> None:
        _kill(self.workers)

    def _get(self, refs: list, timeout: float | None = None) -> list:
        """Results in order; the first failure raises at once (a survivor may be stuck in a
        collective with the dead worker until its timeout) and breaks the group for good."""
        import ray

        self.check_health()
        pending = list(refs)
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1, timeout=timeout)
                if not ready:
                    raise ray.exceptions.GetTimeoutError("model workers timed out")
                ray.get(ready)
        except ray.exceptions.RayActorError as e:
            self.failure = f"a model worker died: {e}"
            raise WorkerGroupFailed(self.failure) from e
        return ray.get(refs)


def _kill(workers: list) -> None:
    import ray

    for w in workers:
        ray.kill(w)


def _placement(rank: int, layout: ParallelLayout, config: EngineConfig) -> dict:
    """Actor options: bundle 1 + rank of the replica's placement group when it has one (Serve's
    placement_group_bundles put the replica itself in bundle 0)."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options: dict = {"num_cpus": config.worker_num_cpus}
    if config.device.startswith("cuda"):
        options["num_gpus"] = config.worker_num_gpus
    pg = ray.util.get_current_placement_group()
    if pg is None:
        return options
    if len(pg.bundle_specs) < layout.world_size + 1:
        raise ValueError(
            f"the replica's placement group has {len(pg.bundle_specs)} bundles; tp={layout.tp} "
            f"x pp={layout.pp} needs {layout.world_size + 1} (the replica and one per worker)"
        )
    options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=rank + 1
    )
    return options
