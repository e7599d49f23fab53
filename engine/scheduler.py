"""Which tokens of which requests run in the next forward. Pure Python: no torch, no Ray.

Queues and states:
    waiting  (deque, FCFS)  --prefill admitted-->  running (decode batch)
        ^                                             |
        +-------- preempted (recompute: KV freed) ----+
    prefill-only requests leave prefill into `prefilled` (KV held until exported/released).

Two managers, one shape: `schedule_next_batch(...) -> list[ScheduledRequest] | None`.
- Whole-prompt mode (vLLM-style colocation, and the prefill/decode roles of disaggregation):
  a step is either a prefill batch or a decode batch, prefill first.
- Chunked mode (Sarathi-Serve): every running decode, then prefill chunks in the token budget
  that is left, all in one step.
"""

from __future__ import annotations

import bisect
import time
from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.request import Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 2048  # token budget of one step
    max_num_seqs: int = 64  # running (decoding) requests at most
    chunked_prefill: bool = False
    # vLLM's automatic prefix caching: a prompt's leading full blocks computed before (by any
    # request) are reused instead of computed again (engine/block_manager.py)
    enable_prefix_caching: bool = False
    # vLLM's scheduling policy: "fcfs", or "priority": queues ordered by each request's
    # priority (lower first), then arrival; preemption takes the lowest priority first
    policy: str = "fcfs"

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1 or self.max_num_seqs < 1:
            raise ValueError("max_num_batched_tokens and max_num_seqs must be >= 1")
        if self.policy not in ("fcfs", "priority"):
            raise ValueError(f"policy must be 'fcfs' or 'priority', got {self.policy!r}")


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    start: int  # first position computed in this step
    num_tokens: int  # tokens computed in this step, its draft tokens included
    draft: tuple[int, ...] = ()  # speculative tokens computed after its pending one

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def samples(self) -> bool:
        """A step samples a token for a request when it computes its last pending token."""
        return self.end - len(self.draft) == self.request.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[str]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class PrefillManager:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.waiting: deque[Request] = deque()
        self.num_cached_tokens = 0  # prompt tokens scheduled as taken from the prefix cache
        # tokens of the requests scheduled after a look-up in the prefix cache (vLLM's
        # prefix_cache_queries): with num_cached_tokens (its hits), the cache's hit rate
        self.num_queried_tokens = 0

    def schedule_next_batch(
        self, token_budget: int, seq_budget: int
    ) -> list[ScheduledRequest] | None:
        batch: list[ScheduledRequest] = []
        computing: set[bytes] = set()  # with prefix caching: keys of the blocks this step fills
        for request in self.waiting:
            if token_budget <= 0 or seq_budget <= 0:
                break
            looked_up = self._looks_up(request)
            cached = self._take_cached_prefix(request) if looked_up else 0
            if (
                computing
                and cached == request.num_computed_tokens
                and self._follows(request, computing)
            ):
                self._give_back(request, cached)  # next step, the blocks are in the cache
                continue
            num_new = request.num_pending_tokens
            if self.config.chunked_prefill:
                num_new = min(num_new, token_budget)
            # whole prompts only (an oversized prompt still runs alone); then FCFS: no
            # overtaking the head of the queue when its blocks do not fit
            end = request.num_computed_tokens + num_new
            fits = self.config.chunked_prefill or num_new <= token_budget or not batch
            if not fits or not self.blocks.can_allocate(request.request_id, end):
                self._give_back(request, cached)
                break
            self.blocks.allocate(request.request_id, end)
            if request.first_scheduled_time is None:
                request.first_scheduled_time = time.monotonic()
            batch.append(ScheduledRequest(request, request.num_computed_tokens, num_new))
            self.num_cached_tokens += cached
            self.num_queried_tokens += request.num_tokens if looked_up else 0
            if not request.output_token_ids:  # what the client's usage reports
                request.num_cached_tokens = cached
            token_budget -= num_new
            seq_budget -= 1
            if self.config.enable_prefix_caching:
                computing.update(self._prompt_keys(request)[: end // self.blocks.block_size])
        for item in batch:
            if item.samples:  # fully prefilled requests leave the queue
                self.waiting.remove(item.request)
        return batch or None

    def _follows(self, request: Request, computing: set[bytes]) -> bool:
        """Whether requests ahead of this starting one in this step fill at least half of what
        it has left to compute (n choices of one prompt, a burst sharing a long prefix): it then
        waits one step and takes those blocks from the cache rather than computing them again
        beside them. A shorter shared run is computed twice: waiting a step would cost more."""
        if request.wants_prompt_logprobs:
            return False  # it computes every prompt token anyway
        shared = 0
        start = request.num_computed_tokens // self.blocks.block_size
        for key in self._prompt_keys(request)[start:]:
            if key not in computing:
                break
            shared += self.blocks.block_size
        return shared > 0 and 2 * shared >= request.num_pending_tokens

    def _give_back(self, request: Request, cached: int) -> None:
        """Not scheduled now: a starting request lets go of the cached blocks it took (they stay
        cached), uncounted; one partly computed by its own chunks keeps them."""
        if cached == request.num_computed_tokens:
            self.blocks.free(request.request_id)
            request.num_computed_tokens = 0

    def _looks_up(self, request: Request) -> bool:
        """Whether the request's start looks its tokens up in the prefix cache: at its
        (re)start, unless it asks for its prompt's logprobs (it computes them all)."""
        return (
            self.config.enable_prefix_caching
            and not request.num_computed_tokens
            and not request.wants_prompt_logprobs
        )  # (without caching, no hashing of the tokens on every step)

    def _take_cached_prefix(self, request: Request) -> int:
        """Take the cached blocks of the leading tokens of a request that looks them up as
        computed; -> how many tokens. The last token is always computed (its logits sample
        the next token)."""
        keys = self._prompt_keys(request)
        request.num_computed_tokens = self.blocks.take_cached_blocks(request.request_id, keys)
        return request.num_computed_tokens

    def _prompt_keys(self, request: Request) -> list[bytes]:
        """The block keys of all but the request's last token (what a start may take from the
        cache): hashed once per length, not again by each check of a step nor on every step
        the request waits."""
        n = request.num_tokens - 1
        if request.block_keys is None or request.block_keys[0] != n:
            keys = self.blocks.prefix_keys(request.token_ids(0, n), request.prefix_root)
            request.block_keys = (n, keys)
        return request.block_keys[1]


class DecodeManager:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.running: list[Request] = []

    def schedule_next_batch(
        self, token_budget: int, preempt: callable
    ) -> list[ScheduledRequest] | None:
        """One token per running request, oldest first, and its draft tokens (speculative
        decoding) where the budget and the free blocks allow them after a token for each of the
        others; preempts the newest when out of blocks."""
        batch: list[ScheduledRequest] = []
        used, i = 0, 0
        reserve = self._blocks_after() if any(r.spec_token_ids for r in self.running) else []
        while i < len(self.running) and used < token_budget:
            request = self.running[i]
            others = min(len(self.running) - i - 1, token_budget - used - 1)
            draft = request.spec_token_ids[: max(0, token_budget - used - 1 - others)]
            if draft and not self.blocks.can_allocate(
                request.request_id, request.num_tokens + len(draft), reserve[i]
            ):
                draft = []  # drafts never take the blocks the others' next tokens need
            while not self.blocks.can_allocate(request.request_id, request.num_tokens):
                victim = self.running.pop()
                preempt(victim)
                if victim is request:
                    break
            else:
                self.blocks.allocate(request.request_id, request.num_tokens + len(draft))
                start = request.num_computed_tokens
                batch.append(ScheduledRequest(request, start, 1 + len(draft), tuple(draft)))
                used += 1 + len(draft)
                i += 1
        return batch or None

    def _blocks_after(self) -> list[int]:
        """Per running request, the blocks the requests after it need for their next token."""
        need = [self.blocks.num_missing(r.request_id, r.num_tokens) for r in self.running]
        after, total = [], 0
        for n in reversed(need):
            after.append(total)
            total += n
        return after[::-1]


class Scheduler:
    def __init__(self, config: SchedulerConfig, blocks: BlockManager) -> None:
        self.config = config
        self.blocks = blocks
        self.prefill = PrefillManager(config, blocks)
        self.decode = DecodeManager(config, blocks)
        self.prefilled: dict[str, Request] = {}
        self._preempted: list[str] = []

    @property
    def waiting(self) -> deque[Request]:
        return self.prefill.waiting

    @property
    def running(self) -> list[Request]:
        return self.decode.running

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self._enqueue(self.waiting, request)

    def add_running(self, request: Request) -> bool:
        """Admit a request whose KV is already in the cache (imported): straight to decode."""
        if len(self.running) >= self.config.max_num_seqs:
            return False
        request.status = RequestStatus.RUNNING
        self._enqueue(self.running, request)
        return True

    def _enqueue(self, queue: deque[Request] | list[Request], request: Request) -> None:
        """First come first served: at the end. Priority: after every request of a lower or
        equal (priority, arrival), so the head is served first and the tail preempted first."""
        if self.config.policy == "priority":
            bisect.insort_right(queue, request, key=_priority)
        else:
            queue.append(request)

    def schedule(self) -> SchedulerOutput:
        self._preempted = []
        cfg = self.config
        if cfg.chunked_prefill:
            decodes = (
                self.decode.schedule_next_batch(cfg.max_num_batched_tokens, self._preempt) or []
            )
            budget = cfg.max_num_batched_tokens - sum(d.num_tokens for d in decodes)
            seqs = cfg.max_num_seqs - len(self.running)
            prefills = self.prefill.schedule_next_batch(budget, seqs) or []
            batch = decodes + prefills
        else:
            seqs = cfg.max_num_seqs - len(self.running)
            # every running request decodes (there are at most max_num_seqs); drafts fill
            # the token budget
            decode_budget = max(cfg.max_num_batched_tokens, cfg.max_num_seqs)
            batch = self.prefill.schedule_next_batch(cfg.max_num_batched_tokens, seqs) or (
                self.decode.schedule_next_batch(decode_budget, self._preempt) or []
            )
        return SchedulerOutput(batch, self._preempted)

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the KV, requeue at the front; output tokens are kept."""
        self.blocks.free(request.request_id)
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        request.status = RequestStatus.WAITING
        if self.config.policy == "priority":
            self._enqueue(self.waiting, request)  # its arrival puts it ahead of its equals
        else:
            self.waiting.appendleft(request)
        self._preempted.append(request.request_id)

    def postprocess(
        self, output: SchedulerOutput, sampled: dict[str, list[int] | None]
    ) -> list[tuple[Request, list[int]]]:
        """Apply one step's results: `sampled` holds, per request that sampled, its new tokens
        (its kept drafts, then the token drawn after them; None: the draw failed). -> (request,
        the tokens it took) per scheduled request; a stop takes none after it."""
        results = []
        for item in output.scheduled:
            request = item.request
            tokens = (sampled.get(request.request_id) if item.samples else None) or []
            was_waiting = request.status is RequestStatus.WAITING
            taken, stop = self._append_tokens(request, tokens)
            # the drafts' KV is in the cache as far as they were kept
            kept_drafts = min(len(item.draft), len(tokens) - 1, len(taken)) if tokens else 0
            request.num_computed_tokens = item.end - len(item.draft) + kept_drafts
            self.blocks.publish(
                request.request_id,
                request.num_computed_tokens,
                request.token_ids,
                request.prefix_root,
            )
            if item.draft:  # blocks of refused drafts go back
                self.blocks.truncate(request.request_id, request.num_tokens)
            if taken:
                self._after_tokens(request, was_waiting, stop)
            results.append((request, taken))
        return results

    @staticmethod
    def _append_tokens(
        request: Request, tokens: list[int]
    ) -> tuple[list[int], RequestStatus | None]:
        """Append tokens up to the first that stops the request; -> (those, the stop)."""
        for i, token in enumerate(tokens):
            request.output_token_ids.append(token)
            stop = request.check_stop_token(token)
            if stop is not None:
                return tokens[: i + 1], stop
        return tokens, None

    def _after_tokens(
        self, request: Request, was_waiting: bool, stop: RequestStatus | None
    ) -> None:
        if stop is not None:
            self.finish(request, stop)
        elif was_waiting and request.prefill_only:
            request.status = RequestStatus.PREFILLED
            self.prefilled[request.request_id] = request
        elif was_waiting:
            request.status = RequestStatus.RUNNING
            self._enqueue(self.running, request)

    def finish(self, request: Request, status: RequestStatus) -> None:
        """End a request in any state and free its blocks."""
        if request.status is RequestStatus.WAITING and request in self.waiting:
            self.waiting.remove(request)
        elif request.status is RequestStatus.RUNNING and request in self.running:
            self.running.remove(request)
        self.prefilled.pop(request.request_id, None)
        self.blocks.free(request.request_id)
        request.status = status

    def find(self, request_id: str) -> Request | None:
        for queue in (self.running, self.waiting):
            for request in queue:
                if request.request_id == request_id:
                    return request
        return self.prefilled.get(request_id)


def _priority(request: Request) -> tuple[int, float]:
    return request.sampling_params.priority, request.arrival_time
