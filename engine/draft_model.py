"""Speculative decoding with a draft model, as vLLM's `--speculative-config` with a `model`
(`method: draft_model`): a smaller model of the target's vocabulary proposes k tokens for every
decoding request at once, greedily, one batched forward per token; the target verifies them as
it verifies n-gram drafts (engine/engine.py `_verify`), so the output is the target's own,
greedy or sampled (a greedy draft is a one-hot proposal: engine/spec_decode.py).

The draft has its own paged KV cache and block pool (engine/block_manager.py), as many blocks
as the target's, so drafting never takes a block the target needs; a request the draft's pool
cannot fit goes without drafts. Per request the proposer remembers how far the draft's cache
holds the request's tokens: its drafts' KV stays valid as far as the target kept them, so a step
feeds the draft only what is new (one or two tokens). A request it has not seen (new, or
prefilled on another replica) is caught up in the same forward, its prompt's full blocks taken
from the draft's own prefix cache where an earlier request computed them; the tokens a step
catches up are bounded by the target's batch token budget, a longer catch-up taking several
steps before the request drafts.

The forwards themselves (`run_drafts`) run where the draft's weights and cache are: in this
process for a single-worker replica, on the first model worker of a tensor- or
pipeline-parallel one (engine/workers.py; the draft whole on that worker's device, as vLLM's
`draft_tensor_parallel_size: 1`), one call a step carrying the step's `DraftSteps`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial

import torch

from engine.block_manager import BlockManager, chain_root
from engine.config import EngineConfig
from engine.model_runner import ModelInput, ModelRunner, SeqInput, load_model
from engine.model_store import resolve_model
from engine.request import Request
from engine.spec_decode import SpeculativeConfig


@dataclass
class _Drafted:
    """What the draft's cache holds of a request: its first `base` tokens, then the drafts it
    proposed from there but the last (each draft was the input of the next one's forward)."""

    base: int
    drafts: list[int]

    def valid(self, request: Request) -> int:
        """How many of the request's tokens the cache holds now: the base, and the drafts the
        target kept (the request's tokens after the base, as far as they equal the drafts)."""
        kept = 0
        for draft in self.drafts[:-1]:
            at = self.base + kept
            if at >= request.num_tokens or request.token_ids(at, at + 1) != [draft]:
                break
            kept += 1
        return self.base + kept


@dataclass
class _Row:
    request: Request
    limit: int  # drafts it takes this step (0: it only catches up, part of what it lacks)
    start: int  # its first position this step: what the cache holds of it
    end: int  # the position after the last of its tokens fed this step


class DraftModelProposer:
    def __init__(
        self, config: SpeculativeConfig, runner: ModelRunner, vocab_size: int, max_tokens: int
    ) -> None:
        self.config = config
        self.runner = runner
        self.vocab_size = vocab_size  # the target's: a draft is a token it can verify
        # the tokens a step's first forward may catch up (the target's batch token budget), so
        # that requests arriving together do not make one draft forward of all their prompts
        self.max_tokens = max_tokens
        self.blocks = BlockManager(runner.num_kv_blocks, runner.block_size, enable_caching=True)
        self._drafted: dict[str, _Drafted] = {}
        self.window = runner.shape.max_position_embeddings  # the draft's own context window
        # where the forwards run: a parallel replica's worker (engine/workers.py WorkerDraft)
        # or this process
        self._run = getattr(runner, "draft", None) or partial(run_drafts, runner)

    def propose_all(self, items: list[tuple[Request, int]]) -> list[list[int]]:
        """Each (request, limit)'s drafts: at most `limit` of them; a request that is not among
        `items` (it finished, or left the decode batch) is forgotten."""
        self._forget_others({r.request_id for r, _ in items})
        rows, budget = [], self.max_tokens
        for request, limit in items:
            row = self._row(request, limit, budget)
            if row is not None:
                rows.append(row)
                budget -= row.end - row.start
        first, limits = [self._input(row) for row in rows], [row.limit for row in rows]
        proposed = self._run(DraftSteps(first, limits, self.vocab_size)) if rows else []
        by_id = {}
        for row, drafts in zip(rows, proposed, strict=True):
            self._drafted[row.request.request_id] = _Drafted(row.end, drafts)
            by_id[row.request.request_id] = drafts
        return [by_id.get(r.request_id, []) for r, _ in items]

    def forget(self, request_id: str) -> None:
        self._drafted.pop(request_id, None)
        self.blocks.free(request_id)

    def _forget_others(self, running: set[str]) -> None:
        for request_id in [rid for rid in self._drafted if rid not in running]:
            self.forget(request_id)

    def _row(self, request: Request, limit: int, budget: int) -> _Row | None:
        """The request's row of this step, its blocks allocated: its drafts, or where what the
        cache lacks exceeds the `budget` of tokens left, a part of that alone; None: nothing
        now (no room for a draft, no budget left, the draft's window or pool is full)."""
        rid, total = request.request_id, request.num_tokens
        limit = min(limit, self.config.num_speculative_tokens, self.window - total + 1)
        if limit <= 0 or budget <= 0:
            return None
        start = self._cached(request)
        end, need = total, total + limit - 1  # the forwards write every draft but the last
        if total - start > budget:
            end = need = start + budget
            limit = 0
        if not self.blocks.can_allocate(rid, need):
            self.forget(rid)  # its blocks go back for the others; it starts over later
            return None
        self.blocks.allocate(rid, need)
        return _Row(request, limit, start, end)

    def _cached(self, request: Request) -> int:
        """How many of the request's tokens the draft's cache holds (at most all but the last:
        its forward gives the first draft), taking its prefix from the draft's prefix cache
        for a request it has not seen; what it holds is published for the requests after."""
        rid = request.request_id
        root = chain_root(request.sampling_params.cache_salt)  # the draft has no adapters
        drafted = self._drafted.get(rid)
        if drafted is not None and self.blocks.owns(rid):
            held = drafted.valid(request)
        else:
            self.blocks.free(rid)
            held = self.blocks.take_cached_prefix(rid, request.prompt_token_ids, root)
        held = min(held, request.num_tokens - 1)
        self.blocks.publish(rid, held, request.token_ids, root)
        return held

    def _input(self, row: _Row) -> SeqInput:
        """The row's first forward: what the cache lacks, up to the request's last token (or
        a part of it, where it only catches up)."""
        table = self.blocks.block_table(row.request.request_id)
        tokens = row.request.token_ids(row.start, row.end)
        return SeqInput(tokens, row.start, table, row.limit > 0)


def load_draft(config: EngineConfig) -> torch.nn.Module | None:
    """The configured draft model, loaded (None: none is); on the device already where
    gpu_memory_utilization sizes the caches, so that its weights count in the share."""
    spec = config.speculative
    if spec is None or spec.method != "draft_model":
        return None
    model = load_model(resolve_model(spec.model, spec.revision), config.dtype)
    return model.to(config.device) if config.memory_share else model


def draft_model_runner(
    model: torch.nn.Module, config: EngineConfig, num_kv_blocks: int
) -> ModelRunner:
    """The draft's runner: the target's device, block size and KV dtype, and as many blocks
    as the target's cache (on top of it)."""
    return ModelRunner.from_model(
        model,
        device=config.device,
        block_size=config.block_size,
        num_kv_blocks=num_kv_blocks,
        kv_cache_memory_mb=0,
        kv_dtype=config.kv_dtype,
        graph_batch=config.draft_graph_batch,
    )


def check_vocabulary(config: SpeculativeConfig, draft_vocab: int, target_vocab: int) -> None:
    """ValueError unless the draft proposes tokens the target has: the same vocabulary."""
    if draft_vocab != target_vocab:
        raise ValueError(
            f"speculative model {config.model}: its vocabulary has {draft_vocab} tokens, the "
            f"target's {target_vocab}; a draft model shares the target's tokenizer"
        )


@dataclass(frozen=True)
class DraftSteps:
    """A step's draft forwards, for where the draft runs: each row's first input (what the
    draft's cache lacks of it) and how many drafts it takes (0: it only catches up). Each
    forward after the first feeds every row still drafting its last draft, at the next
    position, in the same blocks; the drafts are the argmax over the target's vocabulary."""

    first: list[SeqInput]
    limits: list[int]
    vocab_size: int


def run_drafts(runner: ModelRunner, steps: DraftSteps) -> list[list[int]]:
    """Each row's drafts: one batched forward per draft position, greedy."""
    drafts: list[list[int]] = [[] for _ in steps.first]
    inputs = list(steps.first)
    live = list(range(len(inputs)))
    while live:
        logits = runner.execute(ModelInput([inputs[i] for i in live]))
        drafting = [i for i in live if steps.limits[i]]
        tokens = torch.argmax(logits[:, : steps.vocab_size], dim=-1).tolist()
        for i, token in zip(drafting, tokens, strict=True):
            drafts[i].append(token)
            fed = inputs[i]  # the next forward: this draft, after what was fed
            inputs[i] = replace(fed, token_ids=[token], start=fed.start + len(fed.token_ids))
        live = [i for i in drafting if len(drafts[i]) < steps.limits[i]]
    return drafts
