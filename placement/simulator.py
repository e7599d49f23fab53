"""Discrete-event simulation of a placement under a workload: per-request TTFT and TPOT.

Instances follow the latency model (placement/latency_model.py; coefficients per pipeline stage):
- prefill: FCFS batches under a token budget; a batch enters the pipeline every stage time and
  finishes after pp stage times; its first tokens exist then, and the KV reaches a decode
  instance `kv_transfer_ms_per_token * prompt tokens` later;
- decode: continuous batching; a request is admitted when its whole KV (prompt + output) fits
  in the free capacity (FIFO, never dropped); a step takes pp*a + b*sum(contexts) + c*batch
  (pp micro-batches in flight), or with the profile's measured `decode_batch_ms` curve in place
  of a + c*batch;
- colocated (the vLLM-style baseline): one queue; a step is a prefill batch when one can be
  admitted (decodes wait: the interference), else a decode step;
- colocated with chunked prefill (Sarathi-Serve): every step runs all running decodes plus
  prompt chunks in what is left of the token budget, FCFS; a chunk of L tokens at offset o costs
  b*L + c*((o+L)^2 - o^2) of the prefill model (its attention over the prefix), the step pays
  the larger fixed cost a once.
Requests go to the instance with the least queued work. Deterministic: the only randomness is
the optional step wander below, drawn from `simulate`'s seed.

Prefix caching (`InstanceSpec.prefix_caching`, as the engine's `enable_prefix_caching`): a
request whose shared prefix (`SimRequest.prefix_len`, `prefix_id`) an earlier step of its
prefill or colocated instance computed takes the prefix's whole blocks from that instance's
cache and computes only the rest, as a chunk at that offset (b*L + c*((o+L)^2 - o^2)). One whose
prefix is being computed right now waits for it when that covers at least half of its prompt
(the engine's same-step sharing), else computes it again. A cached prefix is evicted when, since
its last use, more tokens were computed than the cache has free (LRU over freed blocks); held by
a running request it stays. Running requests of one colocated instance hold one copy of their
cached prefix between them. The decode side imports every request's blocks whole, so decode
instances reserve full contexts as before. With `prefix_affinity` (the server's prefix-aware
router, app/prefix_router.py) a request goes to the least loaded instance that was sent its
prefix before, unless that one has more than `prefix_affinity` requests beyond the least
loaded instance or the prefix is under a tenth of the prompt; else, as without, to the
instance with the least queued work.

Shared node (`Placement.node_contention`, 0 by default): on a CPU every instance computes on
cores of one machine and they slow each other down (memory bandwidth, caches, and the serving
processes that stream their tokens). Modelled as processor sharing: while k instances have a
step in flight, each step advances at 1 / (1 + contention * (k - 1)) of its solo speed; a step
that started alone slows down when a neighbour starts one. GPUs that each instance owns do not
share this way: leave it at 0 there.

Step wander (`Placement.wander`, none by default; placement/wander.py): served steps on a shared
CPU run slow in stretches of seconds. Each instance's step time is multiplied by its own drawn
factor (mean 1), and `simulate_draws` pools several draws so that attainment is their mean.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import Counter, deque
from dataclasses import dataclass, field, replace

import numpy as np

from placement.latency_model import Entry, prefix_attention
from placement.wander import BAND_DRAWS, DRAW_REQUESTS, DRAWS, StepWander, WanderDraw
from placement.workload import SimRequest, Workload

PREFIX_AFFINITY = 4  # the server's default max imbalance (app.config.MAX_IMBALANCE)


@dataclass(frozen=True)
class InstanceSpec:
    entry: Entry
    count: int = 1
    max_batch_tokens: int = 2048
    max_batch_size: int = 128
    chunked_prefill: bool = False  # colocated only: Sarathi-style mixed steps
    prefix_caching: bool = False  # prefill and colocated: reuse computed shared prefixes
    block_size: int = 16  # the engine's KV block: the cache holds whole blocks
    # with prefix_caching: route to an instance sent the prefix before, unless it has more
    # than this many requests beyond the least loaded (None: by load alone)
    prefix_affinity: int | None = None

    @property
    def num_gpus(self) -> int:
        return self.count * self.entry.tp * self.entry.pp


@dataclass(frozen=True)
class Placement:
    prefill: InstanceSpec | None = None
    decode: InstanceSpec | None = None
    colocated: InstanceSpec | None = None
    kv_transfer_ms_per_token: float = 0.0
    node_contention: float = 0.0  # slowdown per other busy instance; all share one node
    wander: StepWander | None = None  # served step times' drift around the model (CPU)

    def __post_init__(self) -> None:
        if (self.colocated is None) == (self.prefill is None or self.decode is None):
            raise ValueError("a placement is either prefill + decode, or colocated")
        if self.node_contention < 0:
            raise ValueError(f"node_contention must be >= 0, got {self.node_contention}")

    @property
    def num_gpus(self) -> int:
        specs = (self.prefill, self.decode, self.colocated)
        return sum(s.num_gpus for s in specs if s is not None)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float
    tpot_ms: float


@dataclass
class _Track:
    req: SimRequest
    first_ms: float = math.inf
    last_ms: float = math.inf
    generated: int = 0
    prefilled: int = 0  # prompt tokens computed (or taken from the prefix cache) so far
    shares: int = 0  # KV tokens of its cached prefix held in common with other requests
    cost: int = 0  # KV tokens charged to it alone while it holds blocks

    @property
    def need(self) -> int:  # KV tokens reserved while decoding
        return self.req.input_len + self.req.output_len

    @property
    def context(self) -> int:
        return self.req.input_len + self.generated


@dataclass(frozen=True)
class Result:
    ttft_ms: float
    tpot_ms: float


class _Sim:
    def __init__(self) -> None:
        self._events: list = []
        self._seq = itertools.count()

    def at(self, t: float, fn, *args) -> None:
        heapq.heappush(self._events, (t, next(self._seq), fn, args))

    def run(self) -> None:
        while self._events:
            t, _, fn, args = heapq.heappop(self._events)
            fn(t, *args)


@dataclass(eq=False)
class _Work:
    owner: object  # the instance whose step this is
    remaining_ms: float  # at solo speed
    fn: object
    args: tuple
    version: int = 0  # completion events of older versions are stale


class _Node:
    """The instances of one machine and their steps in flight: processor sharing with a
    `contention` slowdown per other busy instance, each step scaled by its owner's wander."""

    def __init__(self, sim: _Sim, contention: float, wander: WanderDraw | None = None) -> None:
        self.sim, self.contention, self.wander = sim, contention, wander
        self.works: list[_Work] = []
        self.updated_ms = 0.0

    def run(self, owner, t: float, ms: float, fn, *args) -> None:
        """Call fn(t_done, *args) once `ms` of solo-speed work by `owner` is done."""
        if self.wander is not None:
            ms *= self.wander.factor(owner, t)
        if self.contention == 0:
            self.sim.at(t + ms, fn, *args)
            return
        self._advance(t)
        self.works.append(_Work(owner, ms, fn, args))
        self._reschedule(t)

    def _speed(self) -> float:
        busy = len({id(w.owner) for w in self.works})
        return 1.0 / (1.0 + self.contention * max(busy - 1, 0))

    def _advance(self, t: float) -> None:
        done = (t - self.updated_ms) * self._speed()
        for work in self.works:
            work.remaining_ms -= done
        self.updated_ms = t

    def _reschedule(self, t: float) -> None:
        speed = self._speed()
        for work in self.works:
            work.version += 1
            finish = t + max(work.remaining_ms, 0.0) / speed
            self.sim.at(finish, self._finish, work, work.version)

    def _finish(self, t: float, work: _Work, version: int) -> None:
        if version != work.version:
            return
        self._advance(t)
        self.works.remove(work)
        self._reschedule(t)
        work.fn(t, *work.args)


def _decode_ms(entry: Entry, batch: int, context: int) -> float:
    """A decode step of `batch` requests holding `context` tokens in all."""
    fixed = entry.pp * entry.decode_fixed_ms(batch)
    return fixed + entry.decode.b * context + entry.decode_batch_extra_ms(batch)


class _PrefixCache:
    """One instance's prefix cache, as the engine's block manager keeps it (see the module
    docstring): which shared prefixes are computed, being computed, or were evicted."""

    def __init__(self, spec: InstanceSpec) -> None:
        self.on, self.block_size = spec.prefix_caching, spec.block_size
        self.computed = 0  # tokens put in the cache so far: what pushes older blocks out
        self.last_use: dict[int, int] = {}  # prefix id -> `computed` at its last use
        self.ready_ms: dict[int, float] = {}  # prefix id -> when computed (inf: in flight)
        self.holders: Counter[int] = Counter()  # prefix id -> running requests holding it

    def span(self, req: SimRequest) -> int:
        """Prompt tokens a hit covers: the prefix's whole blocks, never the prompt's last
        token (its logits sample the first output token)."""
        if not self.on:
            return 0
        return min(req.prefix_len, req.input_len - 1) // self.block_size * self.block_size

    def lookup(self, req: SimRequest, t: float, free: int) -> int | None:
        """Cached tokens `req` may start from at t; None while its prefix is in flight.
        `free`: the cache's room that requests do not hold."""
        n, pid = self.span(req), req.prefix_id
        if n == 0 or pid not in self.ready_ms:
            return 0
        if self.ready_ms[pid] > t:
            return None
        if not self.holders[pid] and self.computed - self.last_use[pid] + n > free:
            del self.ready_ms[pid], self.last_use[pid]  # evicted
            return 0
        return n

    def waits(self, req: SimRequest) -> bool:
        """Whether a request whose prefix is in flight waits for it (the engine's rule)."""
        return 2 * self.span(req) >= req.input_len

    def shares(self, req: SimRequest, cached: int) -> int:
        """Tokens of the KV of `req`, starting from `cached`, that are the cache's copy of its
        prefix (0 for a second copy computed beside the one in flight)."""
        if cached or req.prefix_id not in self.ready_ms:
            return self.span(req)
        return 0

    def start(self, req: SimRequest, cached: int) -> None:
        """`req` starts computing its prompt from `cached`: its blocks enter the cache."""
        pid = req.prefix_id
        self.computed += req.input_len - cached
        if self.shares(req, cached):
            self.ready_ms.setdefault(pid, math.inf)  # in flight unless it was a hit
            self.last_use[pid] = self.computed

    def done(self, req: SimRequest, t: float) -> None:
        if self.ready_ms.get(req.prefix_id) == math.inf and self.span(req):
            self.ready_ms[req.prefix_id] = t


def _take_prefill_batch(
    queue: deque,
    spec: InstanceSpec,
    cache: _PrefixCache,
    t: float,
    free: int,
    admit,
    budget: float | None = None,
) -> list[_Track]:
    """FCFS under the token budget (the spec's by default), a request's tokens being those not
    in the prefix cache (`free`: its room that requests do not hold); `admit(track, cached)`
    takes it if it may start now (reserving its KV). A request waiting for its prefix in
    flight is passed over, as the engine does."""
    budget = spec.max_batch_tokens if budget is None else budget
    batch, tokens, passed = [], 0, []
    while queue and len(batch) < spec.max_batch_size:
        head = queue[0]
        cached = cache.lookup(head.req, t, free)
        if cached is None and cache.waits(head.req):
            passed.append(queue.popleft())
            continue
        cached = cached or 0
        pending = head.req.input_len - cached
        if batch and tokens + pending > budget:
            break
        if not admit(head, cached):
            break
        head.prefilled = cached
        cache.start(head.req, cached)
        batch.append(queue.popleft())
        tokens += pending
    queue.extendleft(reversed(passed))
    return batch


def _batch_prefill_ms(entry: Entry, batch: list[_Track]) -> float:
    """One prefill step over the batch's tokens past what each took from the cache."""
    p = entry.prefill
    ms = p.a
    for track in batch:
        n, o = track.req.input_len - track.prefilled, track.prefilled
        ms += p.b * n + p.c * prefix_attention(n, o)
    return ms


class _Decoder:
    """Continuous batching with KV-capacity admission, fed by a FIFO queue; `_step` is the
    instance's policy (decode-only, or colocated)."""

    def __init__(self, node: _Node, spec: InstanceSpec) -> None:
        self.node, self.spec = node, spec
        self.queue: deque[_Track] = deque()
        self.running: list[_Track] = []
        # their contexts' sum, kept as they join, decode and leave: every decode step's time
        # reads it (summed every step, it cost a plan 15-20% of its time)
        self.context = 0
        self.used = 0  # KV tokens held
        self.active = False  # a step is scheduled
        self.cache = _PrefixCache(spec)  # colocated only: a decode instance imports whole KV

    @property
    def load(self) -> int:
        return self.used + sum(q.need for q in self.queue)

    @property
    def num_requests(self) -> int:  # what the server's router counts: requests in flight
        return len(self.queue) + len(self.running)

    def submit(self, t: float, track: _Track) -> None:
        self.queue.append(track)
        if not self.active:
            self._step(t)

    def _step(self, t: float) -> None:
        raise NotImplementedError

    def fits(self, track: _Track) -> bool:
        return (
            self.used + track.need <= self.spec.entry.kv_capacity_tokens
            and len(self.running) < self.spec.max_batch_size
        )

    def admit(self, track: _Track) -> None:
        self.join(track)
        self.charge(track, 0)

    def join(self, track: _Track) -> None:
        """`track` decodes from the next step on (its KV charged already or by the caller)."""
        self.running.append(track)
        self.context += track.context

    def reserves(self, track: _Track, cached: int) -> bool:
        """Whether the KV of `track` (starting from `cached` cache tokens) fits; if so it is
        charged: its own tokens, and its cached prefix unless another running request holds
        that already."""
        shares = self.cache.shares(track.req, cached)
        common = shares if self.cache.holders[track.req.prefix_id] else 0
        if self.used + track.need - common > self.spec.entry.kv_capacity_tokens:
            return False
        self.charge(track, shares)
        return True

    def charge(self, track: _Track, shares: int) -> None:
        track.shares, track.cost = shares, track.need - shares
        self.used += track.cost
        if shares:
            pid = track.req.prefix_id
            self.used += shares if not self.cache.holders[pid] else 0
            self.cache.holders[pid] += 1

    def release(self, track: _Track) -> None:
        self.used -= track.cost
        if track.shares:
            pid = track.req.prefix_id
            self.cache.holders[pid] -= 1
            self.used -= track.shares if not self.cache.holders[pid] else 0

    def decode_step(self, t: float) -> None:
        ms = _decode_ms(self.spec.entry, len(self.running), self.context)
        self.node.run(self, t, ms, self._after_decode)

    def _after_decode(self, t: float) -> None:
        self._count_decodes(t)
        self._step(t)

    def _count_decodes(self, t: float) -> None:
        """Every running request got a token at t; finished ones leave and free their KV."""
        self.context += len(self.running)
        finished = []
        for track in self.running:
            track.generated += 1
            if track.generated >= track.req.output_len:
                track.last_ms = t
                finished.append(track)
        if not finished:
            return
        for track in finished:
            self.release(track)
            self.context -= track.context
        self.running = [r for r in self.running if r.generated < r.req.output_len]


class _DecodeInstance(_Decoder):
    def _step(self, t: float) -> None:
        while self.queue and self.fits(self.queue[0]):
            self.admit(self.queue.popleft())
        self.active = bool(self.running)
        if self.active:
            self.decode_step(t)


def _first_token(track: _Track, t: float) -> bool:
    """Record a prefill's token; True when the request continues to decode."""
    track.first_ms, track.generated = t, 1
    if track.req.output_len <= 1:
        track.last_ms = t
        return False
    return True


class _PrefillInstance:
    def __init__(self, node: _Node, spec: InstanceSpec, handoff) -> None:
        self.node, self.spec, self.handoff = node, spec, handoff
        self.queue: deque[_Track] = deque()
        self.busy = False  # a batch is in the first pipeline stage
        self.inflight = 0  # prompt tokens in the pipeline
        self.inflight_requests = 0
        self.cache = _PrefixCache(spec)

    @property
    def num_requests(self) -> int:
        return len(self.queue) + self.inflight_requests

    @property
    def load(self) -> int:  # prompt tokens queued or being computed
        return sum(q.req.input_len for q in self.queue) + self.inflight

    def submit(self, t: float, track: _Track) -> None:
        self.queue.append(track)
        if not self.busy:
            self._start(t)

    def _start(self, t: float) -> None:
        free = self.spec.entry.kv_capacity_tokens - self.inflight
        batch = _take_prefill_batch(self.queue, self.spec, self.cache, t, free, lambda *_: True)
        self.busy = bool(batch)
        if not batch:
            return
        self.inflight += sum(b.req.input_len for b in batch)
        self.inflight_requests += len(batch)
        stage = _batch_prefill_ms(self.spec.entry, batch)
        # done first: at pp = 1 the next batch, starting at the same time, finds its prefixes
        self.node.run(self, t, self.spec.entry.pp * stage, self._done, batch)
        self.node.run(self, t, stage, self._start)  # the next batch enters the pipeline

    def _done(self, t: float, batch: list[_Track]) -> None:
        self.inflight -= sum(b.req.input_len for b in batch)
        self.inflight_requests -= len(batch)
        for track in batch:
            self.cache.done(track.req, t)
        for track in batch:
            if _first_token(track, t):
                self.handoff(t, track)
        if not self.busy and self.queue:  # requests that waited for a prefix in flight
            self._start(t)


class _ColocatedInstance(_Decoder):
    def _step(self, t: float) -> None:
        def room(track: _Track, cached: int) -> bool:  # KV for the whole request, a batch slot
            return len(self.running) + 1 <= self.spec.max_batch_size and self.reserves(
                track, cached
            )  # held from now on: the router sees this work

        free = self.spec.entry.kv_capacity_tokens - self.used
        batch = _take_prefill_batch(self.queue, self.spec, self.cache, t, free, room)
        self.active = bool(batch or self.running)
        if batch:  # prefill first: running decodes wait for it
            ms = self.spec.entry.pp * _batch_prefill_ms(self.spec.entry, batch)
            self.node.run(self, t, ms, self._prefilled, batch)
        elif self.running:
            self.decode_step(t)

    def _prefilled(self, t: float, batch: list[_Track]) -> None:
        for track in batch:
            self.cache.done(track.req, t)
            if _first_token(track, t):
                self.join(track)  # its KV was reserved when the batch started
            else:
                self.release(track)
        self._step(t)


class _ChunkedInstance(_Decoder):
    def __init__(self, node: _Node, spec: InstanceSpec) -> None:
        super().__init__(node, spec)
        self.prefilling: list[_Track] = []  # admitted (KV reserved), prompt not finished

    def _step(self, t: float) -> None:
        free = self.spec.entry.kv_capacity_tokens - self.used
        _take_prefill_batch(self.queue, self.spec, self.cache, t, free, self._room, math.inf)
        budget = self.spec.max_batch_tokens - len(self.running)
        chunks = []
        for track in self.prefilling:
            if budget <= 0:
                break
            take = min(budget, track.req.input_len - track.prefilled)
            chunks.append((track, take))
            budget -= take
        self.active = bool(chunks or self.running)
        if self.active:
            self.node.run(self, t, self._step_ms(chunks), self._after_step, chunks)

    @property
    def num_requests(self) -> int:
        return super().num_requests + len(self.prefilling)

    def _room(self, track: _Track, cached: int) -> bool:
        """Admits `track` to prefill in chunks if it has a slot and its KV fits."""
        slots = len(self.running) + len(self.prefilling) < self.spec.max_batch_size
        if not (slots and self.reserves(track, cached)):
            return False
        self.prefilling.append(track)
        return True

    def _step_ms(self, chunks: list[tuple[_Track, int]]) -> float:
        entry = self.spec.entry
        p, d = entry.prefill, entry.decode
        # a prefill chunk reads every weight (every expert of a mixture); decodes alone, what
        # their batch is routed to
        decode_a = entry.decode_fixed_ms(len(self.running)) if self.running else 0.0
        ms = entry.pp * max(p.a if chunks else 0.0, decode_a)
        ms += d.b * self.context
        ms += entry.decode_batch_extra_ms(len(self.running)) if self.running else 0.0
        for track, n in chunks:
            o = track.prefilled
            ms += p.b * n + p.c * prefix_attention(n, o)
        return ms

    def _after_step(self, t: float, chunks: list[tuple[_Track, int]]) -> None:
        self._count_decodes(t)
        for track, n in chunks:
            track.prefilled += n
        finished = [tr for tr, _ in chunks if tr.prefilled >= tr.req.input_len]
        self.prefilling = [tr for tr in self.prefilling if tr.prefilled < tr.req.input_len]
        for track in finished:
            self.cache.done(track.req, t)
            if _first_token(track, t):
                self.join(track)
            else:
                self.release(track)
        self._step(t)


def _least_loaded(instances: list):
    return min(instances, key=lambda i: i.load)


class _PromptRouter:
    """Where a prompt goes among prefill (or colocated) instances: by load, or with prefix
    affinity as the server's router (module docstring)."""

    MIN_SHARE = 0.1  # of the prompt, as app/prefix_router.py

    def __init__(self, instances: list, spec: InstanceSpec) -> None:
        self.instances = instances
        on = spec.prefix_caching and spec.prefix_affinity is not None
        self.max_imbalance = spec.prefix_affinity if on else None
        self.sent: dict[int, set[int]] = {}  # prefix id -> indexes of instances sent it

    def submit(self, t: float, track: _Track) -> None:
        k = self._choose(track.req)
        if track.req.prefix_len:
            self.sent.setdefault(track.req.prefix_id, set()).add(k)
        self.instances[k].submit(t, track)

    def _choose(self, req: SimRequest) -> int:
        by_load = min(range(len(self.instances)), key=lambda k: self.instances[k].load)
        span = self.instances[0].cache.span(req)
        holders = self.sent.get(req.prefix_id, set()) if req.prefix_len else set()
        if self.max_imbalance is None or not holders or span < self.MIN_SHARE * req.input_len:
            return by_load
        counts = [i.num_requests for i in self.instances]
        best = min(holders, key=lambda k: counts[k])
        return best if counts[best] - min(counts) <= self.max_imbalance else by_load


def simulate(
    placement: Placement, requests: list[SimRequest], seed: int = 0, pace: bool = False
) -> list[Result]:
    """One run; `seed` draws the step wander (without one the run is the same for any seed),
    with `pace` the machine's pace for the run too (StepWander.draw)."""
    sim = _Sim()
    draw = placement.wander.draw(seed, pace) if placement.wander is not None else None
    node = _Node(sim, placement.node_contention, draw)
    tracks = [_Track(r) for r in requests]
    if placement.colocated is not None:
        spec = placement.colocated
        kind = _ChunkedInstance if spec.chunked_prefill else _ColocatedInstance
        colocated = _PromptRouter([kind(node, spec) for _ in range(spec.count)], spec)
        for track in tracks:
            sim.at(track.req.arrival_ms, colocated.submit, track)
    else:
        decoders = [_DecodeInstance(node, placement.decode) for _ in range(placement.decode.count)]

        def handoff(t: float, track: _Track) -> None:
            arrive = t + placement.kv_transfer_ms_per_token * track.req.input_len
            sim.at(arrive, lambda t2, tr: _least_loaded(decoders).submit(t2, tr), track)

        spec = placement.prefill
        prefills = [_PrefillInstance(node, spec, handoff) for _ in range(spec.count)]
        router = _PromptRouter(prefills, spec)
        for track in tracks:
            sim.at(track.req.arrival_ms, router.submit, track)
    sim.run()
    return [_result(t) for t in tracks]


def _result(track: _Track) -> Result:
    ttft = track.first_ms - track.req.arrival_ms
    if track.req.output_len <= 1 or math.isinf(track.last_ms):
        tpot = 0.0 if track.req.output_len <= 1 else math.inf
    else:
        tpot = (track.last_ms - track.first_ms) / (track.req.output_len - 1)
    return Result(ttft, tpot)


def simulate_draws(
    placement: Placement, requests: list[SimRequest], seed: int = 0, draws: int | None = None
) -> list[Result]:
    """The results of several runs (seeds seed, seed + 1, ...) one after another when the steps
    wander, else of the one run there is: their attainment is the mean over the draws. By
    default enough draws for DRAW_REQUESTS simulated requests, at most DRAWS (a short sweep
    point sees few stretches of the machine's drift; a long one averages over many itself)."""
    if placement.wander is None:
        return simulate(placement, requests, seed)
    n = draws if draws is not None else min(DRAWS, max(1, math.ceil(DRAW_REQUESTS / len(requests))))
    return [r for k in range(n) for r in simulate(placement, requests, seed + k)]


def attainment(results: list[Result], slo: SLO) -> float:
    ok = [r.ttft_ms <= slo.ttft_ms and r.tpot_ms <= slo.tpot_ms for r in results]
    return float(np.mean(ok))


def attainment_band(
    placement: Placement, requests: list[SimRequest], slo: SLO, level: float = 0.9
) -> tuple[float, float]:
    """The range of attainment that `level` of runs of these very requests reach, each run
    its own draw of the step wander and of the machine's pace (BAND_DRAWS runs): what one
    measured run may show if the model is right. One value without wander."""
    seeds = range(BAND_DRAWS if placement.wander is not None else 1)
    per_run = [attainment(simulate(placement, requests, seed, pace=True), slo) for seed in seeds]
    tail = (1 - level) / 2
    low, high = np.quantile(per_run, [tail, 1 - tail])
    return float(low), float(high)


@dataclass(frozen=True)
class GoodputResult:
    rate: float  # requests/s at which attainment >= target
    attainment_at_rate: float
    evaluations: list[tuple[float, float]] = field(default_factory=list)  # (rate, attainment)


def goodput(
    placement: Placement,
    workload: Workload,
    slo: SLO,
    target: float = 0.9,
    seed: int = 0,
    start_rate: float = 0.5,
    iterations: int = 12,
) -> GoodputResult:
    """Highest rate with attainment >= target: doubling to bracket it, then bisection; at most
    the rate the placement completes requests at when they all queue at once (`saturated_rate`).
    Above that rate a queue grows without end, so however loose the SLO, that rate is not
    sustained: a short simulated run would otherwise meet the SLO at any rate."""
    evals: list[tuple[float, float]] = []

    def ok(rate: float) -> bool:
        value = attainment(simulate_draws(placement, workload.sample(rate, seed), seed), slo)
        evals.append((rate, value))
        return value >= target

    low, high = 0.0, start_rate
    while ok(high) and high < 1e6:  # bracket: double until it fails
        low, high = high, high * 2
    for _ in range(iterations):  # bisect; low always meets the target (or is 0)
        mid = (low + high) / 2
        if ok(mid):
            low = mid
        else:
            high = mid
    cap = saturated_rate(placement, workload, seed)
    if low > cap:
        ok(cap)
        low = cap
    at_low = max((a for r, a in evals if r == low), default=0.0)
    return GoodputResult(low, at_low, evals)


def saturated_rate(placement: Placement, workload: Workload, seed: int = 0) -> float:
    """Requests per second the placement completes with the workload's requests all arriving
    at once: its throughput when never idle."""
    burst = [replace(r, arrival_ms=0.0) for r in workload.sample(1.0, seed)]
    ends = [
        r.ttft_ms + r.tpot_ms * max(q.output_len - 1, 0)
        for r, q in zip(simulate(placement, burst, seed), burst, strict=True)
    ]
    done = [e for e in ends if math.isfinite(e)]  # a request that cannot run never ends
    return len(done) / (max(done) / 1e3) if done and max(done) > 0 else math.inf
