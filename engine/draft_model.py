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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.block_manager import BlockManager, chain_root
from engine.model_runner import ModelInput, ModelRunner, SeqInput
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
    drafts: list[int]


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
        live = rows
        while live:
            logits = self.runner.execute(ModelInput([self._input(row) for row in live]))
            drafting = [row for row in live if row.limit]
            tokens = torch.argmax(logits[:, : self.vocab_size], dim=-1).tolist()
            for row, token in zip(drafting, tokens, strict=True):
                row.drafts.append(token)
            live = [row for row in drafting if len(row.drafts) < row.limit]
        for row in rows:
            self._drafted[row.request.request_id] = _Drafted(row.end, row.drafts)
        by_id = {row.request.request_id: row.drafts for row in rows}
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
        return _Row(request, limit, start, end, [])

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
        table = self.blocks.block_table(row.request.request_id)
        if not row.drafts:  # what the cache lacks, up to the request's last token or a part
            tokens = row.request.token_ids(row.start, row.end)
            return SeqInput(tokens, row.start, table, row.limit > 0)
        at = row.request.num_tokens + len(row.drafts) - 1  # the last draft's position
        return SeqInput([row.drafts[-1]], at, table, True)
