"""Replica choice for the deployments that take prompts (prefill, colocated) when their engines
cache prefixes: send a prompt where its prefix was sent before, so that the replica's prefix
cache serves it (Ray Serve LLM's PrefixCacheAffinityRouter, the cache-aware policy of vLLM's
and SGLang's routers).

Serve's default router picks the less loaded of two random replicas: with k replicas a prompt
that shares a long prefix (a system prompt, the earlier turns of a conversation, a document
asked several questions) finds it cached with chance about 1/k, and each replica computes and
holds every popular prefix. Here the router keeps its own record of which prompt blocks it sent
to which replica (`PrefixIndex`: the engine's block keys, so a match is exactly what the
replica's cache may hold, unless evicted since) and ranks the replicas holding the longest
matching run first (`rank_by_prefix`): Serve then probes them and takes one with room, the
others only when none has. Load still wins where the preference would cost more than the cache
saves: a match shorter than `min_share` of the prompt, or a holder with more than
`max_imbalance` requests in flight beyond the least loaded replica (Serve's queue-length
cache), is not preferred.

The prompt is read from the call the ingress makes: the second argument of
`PrefillServer.prefill` and `ColocatedServer.generate` (request id, prompt ids, params).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence

from ray.serve.request_router import PendingRequest, RunningReplica

from app.config import MAX_IMBALANCE
from app.router import MatchingFIFORouter
from engine.block_manager import block_key, chain_root

MIN_SHARE = 0.1  # of the prompt's tokens (Ray Serve LLM's match-rate threshold)
INDEX_BLOCKS = 100_000  # block keys remembered (about 20 MB), least recently used out


class PrefixIndex:
    """Pure: which replicas were sent which prompt blocks, up to `capacity` block keys."""

    def __init__(self, block_size: int = 16, capacity: int = INDEX_BLOCKS) -> None:
        if block_size < 1 or capacity < 1:
            raise ValueError(f"need block_size and capacity >= 1, got {block_size}, {capacity}")
        self.block_size, self.capacity = block_size, capacity
        self._holders: OrderedDict[bytes, set[Hashable]] = OrderedDict()

    def keys(
        self, prompt_ids: Sequence[int], cache_salt: str | None = None, lora: str | None = None
    ) -> list[bytes]:
        """The engine's keys of the prompt's whole blocks before its last token (what a
        request may take from a prefix cache: engine/scheduler.py), from its salt's and
        adapter's root."""
        size, parent, keys = self.block_size, chain_root(cache_salt, lora), []
        for start in range(0, len(prompt_ids) - size, size):
            parent = block_key(parent, list(prompt_ids[start : start + size]))
            keys.append(parent)
        return keys

    def matched_tokens(self, keys: list[bytes]) -> dict[Hashable, int]:
        """Per replica, the leading tokens of the prompt it was sent (0s left out)."""
        depth: dict[Hashable, int] = {}
        for i, key in enumerate(keys):
            holders = self._holders.get(key)
            if not holders:
                break
            advanced = False
            for replica in holders:
                if depth.get(replica, 0) == i:
                    depth[replica] = i + 1
                    advanced = True
            if not advanced:
                break
        return {r: n * self.block_size for r, n in depth.items()}

    def record(self, keys: list[bytes], replica: Hashable) -> None:
        for key in keys:
            self._holders.setdefault(key, set()).add(replica)
            self._holders.move_to_end(key)
        while len(self._holders) > self.capacity:
            self._holders.popitem(last=False)

    def keep_only(self, replicas: set[Hashable]) -> None:
        """Forget replicas that are gone (scaled down, died)."""
        for key in list(self._holders):
            holders = self._holders[key] & replicas
            if holders:
                self._holders[key] = holders
            else:
                del self._holders[key]


def rank_by_prefix(
    replicas: list,
    matched: dict[Hashable, int],
    prompt_len: int,
    queue_lens: dict[Hashable, int | None],
    key=lambda r: r,
    min_share: float = MIN_SHARE,
    max_imbalance: int = MAX_IMBALANCE,
) -> list[list]:
    """Pure: the replicas holding the longest run of the prompt first, then the rest; all in
    one rank (Serve's choice by load) when the match is too short or its holders too busy.
    `key(replica)` names a replica in `matched` and `queue_lens` (None: not known)."""
    best = max((matched.get(key(r), 0) for r in replicas), default=0)
    if best == 0 or best < min_share * prompt_len:
        return [replicas] if replicas else []
    holders = [r for r in replicas if matched.get(key(r), 0) == best]
    known = [n for r in replicas if (n := queue_lens.get(key(r))) is not None]
    held = [n for r in holders if (n := queue_lens.get(key(r))) is not None]
    if known and held and min(held) - min(known) > max_imbalance:
        return [replicas]
    others = [r for r in replicas if r not in holders]
    return [rank for rank in (holders, others) if rank]


class PrefixAffinityRouter(MatchingFIFORouter):
    """Serve's request router for the prompt-taking deployments (app/builder.py)."""

    def initialize_state(
        self,
        block_size: int = 16,
        min_share: float = MIN_SHARE,
        max_imbalance: int = MAX_IMBALANCE,
        **kwargs,
    ) -> None:
        """Serve passes request_router_kwargs here: the phase's block size and thresholds."""
        self.index = PrefixIndex(block_size)
        self.min_share, self.max_imbalance = min_share, max_imbalance

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        """The replica set changed: forget the record of those that are gone."""
        super().update_replicas(replicas)
        self.index.keep_only({r.replica_id for r in replicas})

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        ids = _prompt_ids(pending_request)
        if ids is None:
            return [candidate_replicas]
        matched = self.index.matched_tokens(self.index.keys(ids, *_root(pending_request)))
        cache = self.replica_queue_len_cache
        queue_lens = {r.replica_id: cache.get(r.replica_id) for r in candidate_replicas}
        return rank_by_prefix(
            candidate_replicas,
            matched,
            len(ids),
            queue_lens,
            key=lambda r: r.replica_id,
            min_share=self.min_share,
            max_imbalance=self.max_imbalance,
        )

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        """The chosen replica will hold this prompt's blocks in its cache."""
        ids = _prompt_ids(pending_request)
        if ids is not None:
            self.index.record(self.index.keys(ids, *_root(pending_request)), replica_id)


def _root(pending_request: PendingRequest) -> tuple[str | None, str | None]:
    """The cache salt and LoRA adapter of the request's SamplingParams, its third argument:
    where its prefix-cache keys start."""
    args = pending_request.args
    params = args[2] if len(args) > 2 else None
    return getattr(params, "cache_salt", None), getattr(params, "lora", None)


def _prompt_ids(pending_request: PendingRequest | None) -> list[int] | None:
    if pending_request is None or len(pending_request.args) < 2:
        return None
    ids = pending_request.args[1]
    return ids if isinstance(ids, list) else None
