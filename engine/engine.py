"""The engine: requests in, tokens and text out, one `step()` at a time.

`step()` is three calls: `scheduler.schedule()` -> `runner.execute(...)` ->
`scheduler.postprocess(...)`, then sampling results are detokenized and checked for stop
strings. Besides the combined path (`add_request` + `step`, or `generate`), the engine serves
both halves of disaggregation:
- prefill side: `add_request(..., prefill_only=True)`; once its output says `prefilled`, the
  request's KV stays allocated until `export_kv` has copied it and `release` frees it;
- decode side: `import_request(handoff, buffer)` scatters the blocks into this cache and the
  request joins the running batch directly.
The engine is single-threaded: callers serialize `step`, `abort`, `import_request`, etc.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

import torch

from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.detokenizer import DetokenizerState, IncrementalDetokenizer
from engine.draft_model import (
    DraftModelProposer,
    check_vocabulary,
    draft_model_runner,
    load_draft,
)
from engine.grammar import Grammars, advance
from engine.limits import chat_token_ids, check_lengths, check_token_ids
from engine.lora import AdapterCache
from engine.model_runner import (
    MemoryShare,
    ModelInput,
    ModelRunner,
    ModelShape,
    SeqInput,
)
from engine.model_store import generation_stop_ids, resolve_model, resolve_tokenizer
from engine.outputs import (
    Completion,
    EngineStats,
    KVHandoff,
    RequestFailedError,
    RequestOutput,
    StepRecord,
    TokenLogprob,
)
from engine.request import Request, RequestStatus
from engine.sampler import FixedAdjustments, TokenHistory, TokenMasks, sample, token_logprobs
from engine.sampling_params import InvalidRequestError, SamplingParams
from engine.scheduler import ScheduledRequest, Scheduler, SchedulerOutput
from engine.spec_decode import NgramProposer

logger = logging.getLogger(__name__)
PROMPT_LOGPROB_ROWS = 256  # prompt positions per log-softmax (bounds its copy of the logits)


class StepFailed(RuntimeError):
    """A step's forward failed: its requests (`request_ids`) were aborted, the others wait."""

    def __init__(self, request_ids: list[str]) -> None:
        super().__init__(f"engine step failed; aborted {len(request_ids)} requests")
        self.request_ids = request_ids


@dataclass
class _Tracked:
    request: Request
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None
    matcher: object | None = None  # the structured output's llguidance matcher
    fixed: FixedAdjustments | None = None  # made at its first adjusted row (_fixed)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)  # gathered chunk by chunk


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        *,
        runner: ModelRunner | None = None,
        tokenizer=None,
        kv_transport: str = "shm",  # for a multi-worker runner: its workers' KV channels
        draft_runner: ModelRunner | None = None,  # a draft model's; None: loaded if configured
    ) -> None:
        self.config = config = config or EngineConfig()
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        path = None
        if runner is None or tokenizer is None:
            path = resolve_model(config.model, config.revision)
        if tokenizer is None:
            from transformers import AutoTokenizer

            where = resolve_tokenizer(config.tokenizer, config.tokenizer_revision, path)
            tokenizer = AutoTokenizer.from_pretrained(where)
        if runner is None and not config.parallel.is_single:
            from engine.workers import WorkerGroupRunner

            runner = WorkerGroupRunner(str(path), config, config.parallel, kv_transport)
        draft = None
        if runner is None:
            draft = load_draft(config) if draft_runner is None else None
            runner = ModelRunner.from_pretrained(
                path,
                dtype=config.dtype,
                device=config.device,
                block_size=config.block_size,
                num_kv_blocks=config.num_kv_blocks,
                kv_cache_memory_mb=config.kv_cache_memory_mb,
                max_model_len=config.max_model_len,
                kv_dtype=config.kv_dtype,
                lora_modules=dict(config.lora_modules),
                graph_batch=config.graph_batch,
                memory_share=self._memory_share(draft),
            )
        self.tokenizer = tokenizer
        self.runner = runner
        lora_modules = dict(config.lora_modules)
        self.adapters = AdapterCache(runner, lora_modules, config.lora_dir, config.max_loras)
        caching = config.scheduler.enable_prefix_caching
        self.blocks = BlockManager(runner.num_kv_blocks, runner.block_size, caching)
        self.scheduler = Scheduler(config.scheduler, self.blocks)
        self.max_model_len = min(
            config.max_model_len or runner.shape.max_position_embeddings,
            runner.shape.max_position_embeddings,
        )
        self.eos_token_id = tokenizer.eos_token_id
        # vLLM's rule: the generation config's end-of-sequence ids end a request too (Llama 3
        # Instruct's <|eot_id|> beside its tokenizer's <|end_of_text|>)
        self.model_stop_ids = generation_stop_ids(path, self.eos_token_id) if path else ()
        self.grammars = Grammars(tokenizer, runner.shape.vocab_size)
        self._tracked: dict[str, _Tracked] = {}
        self._ids = itertools.count()
        self.num_preemptions = 0
        # speculative decoding (engine/spec_decode.py): drafts verified, drafts kept
        self.proposer = self._proposer(draft_runner, draft)
        self.num_draft_tokens = 0
        self.num_accepted_tokens = 0
        # vLLM's num_drafts and num_accepted_tokens_per_pos: requests' drafts verified, and
        # how often the draft at each position was kept (where acceptance falls off: choose k)
        self.num_drafts = 0
        k = config.speculative.num_speculative_tokens if config.speculative else 0
        self.num_accepted_per_pos = [0] * k
        self.last_step: StepRecord | None = None

    def _memory_share(self, draft: torch.nn.Module | None) -> MemoryShare | None:
        """gpu_memory_utilization's sizing; with a draft model, its cache (as many blocks, in
        its own bytes per block) taken from the same share."""
        share = self.config.memory_share
        if share is None or draft is None:
            return share
        kv_dtype = getattr(torch, self.config.kv_dtype)
        per_block = ModelShape.of(draft.config).kv_bytes_per_token(kv_dtype)
        return dataclasses.replace(share, draft_block_bytes=per_block * self.config.block_size)

    def _proposer(self, draft_runner: ModelRunner | None, draft: torch.nn.Module | None):
        """Speculative decoding's proposer: n-gram lookup, or a draft model (its own runner:
        the given one, or one of the loaded `draft` with the target's settings and as many KV
        blocks)."""
        spec = self.config.speculative
        if spec is None:
            return None
        if spec.method == "ngram":
            return NgramProposer(spec)
        if draft_runner is None:  # a parallel replica's: on its first worker (engine/workers.py)
            draft_runner = getattr(self.runner, "draft_runner", None)
        if draft_runner is None:
            model = draft if draft is not None else load_draft(self.config)
            draft_runner = draft_model_runner(model, self.config, self.runner.num_kv_blocks)
        vocab = self.runner.shape.vocab_size
        check_vocabulary(spec, draft_runner.shape.vocab_size, vocab)
        budget = self.config.scheduler.max_num_batched_tokens
        return DraftModelProposer(spec, draft_runner, vocab, budget)

    # ---- requests in -------------------------------------------------------------------------

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer(prompt).input_ids
        return list(prompt)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return chat_token_ids(self.tokenizer, messages)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError for a request this engine can never serve."""
        vocab = self.runner.shape.vocab_size
        check_token_ids(prompt_ids, vocab)
        if any(t >= vocab for t, _ in params.logit_bias):
            raise InvalidRequestError(
                f"logit_bias keys must be token ids in [0, {vocab})", "logit_bias"
            )
        check_token_ids(params.allowed_token_ids, vocab, "allowed_token_ids", "allowed_token_ids")
        bad_word_ids = (t for w in params.bad_words_token_ids for t in w)
        check_token_ids(bad_word_ids, vocab, "bad_words", "bad words' token ids")
        if params.structured_output is not None:
            self.grammars.check(params.structured_output)
        self._check_lora(params)
        if params.priority and self.config.scheduler.policy != "priority":
            raise InvalidRequestError(
                f"priority {params.priority} needs the priority scheduling policy (this engine "
                "serves first come, first served)",
                "priority",
            )
        capacity = self.blocks.num_blocks * self.blocks.block_size
        check_lengths(len(prompt_ids), params.max_tokens, self.max_model_len, capacity)

    def _check_lora(self, params: SamplingParams) -> None:
        if params.lora is not None:
            self.adapters.check(params.lora)

    def _use_lora(self, params: SamplingParams) -> None:
        """Load the request's adapter if it is not (the engine's thread: between steps)."""
        if params.lora is not None:
            self.adapters.use(params.lora, self._loras_in_use)

    def _loras_in_use(self) -> set[str]:
        return {t.request.sampling_params.lora for t in self._tracked.values()} - {None}

    def add_request(
        self,
        request_id: str | None,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        *,
        prefill_only: bool = False,
    ) -> str:
        params = self._with_model_stops(params or SamplingParams())
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self._tracked:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        prompt_ids = self.encode(prompt)
        self.validate(prompt_ids, params)
        self._use_lora(params)
        request = Request(
            request_id, prompt_ids, params, self.eos_token_id, prefill_only,
            adapter_key=self.adapters.key(params.lora),
        )  # fmt: skip
        state = DetokenizerState.for_prompt(len(prompt_ids))
        self._track(request, state, None)
        self.scheduler.add(request)
        return request_id

    def _with_model_stops(self, params: SamplingParams) -> SamplingParams:
        """params stopping at the model's own end-of-sequence ids too, unless EOS is ignored
        (min_tokens holds them back like EOS: they join stop_token_ids, as in vLLM)."""
        missing = [t for t in self.model_stop_ids if t not in params.stop_token_ids]
        if params.ignore_eos or not missing:
            return params
        return dataclasses.replace(params, stop_token_ids=(*params.stop_token_ids, *missing))

    def _track(self, request: Request, state: DetokenizerState, gen_state: bytes | None) -> None:
        p = request.sampling_params
        generator = None
        if p.seed is not None:
            generator = torch.Generator().manual_seed(p.seed)
            if gen_state is not None:
                generator.set_state(torch.frombuffer(bytearray(gen_state), dtype=torch.uint8))
        detok = IncrementalDetokenizer(
            self.tokenizer, p.stop, p.include_stop_str_in_output, state, p.skip_special_tokens
        )
        matcher = None
        if p.structured_output is not None:
            matcher = self.grammars.matcher(p.structured_output, request.output_token_ids)
        self._tracked[request.request_id] = _Tracked(request, detok, generator, matcher)

    # ---- the step ----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        t0, start_s = time.perf_counter(), time.time()
        self.last_step = None
        self._propose_drafts()
        sched = self.scheduler.schedule()
        self.num_preemptions += len(sched.preempted)
        if sched.is_empty:
            return []
        prefills, offsets, decodes = _step_shape(sched)
        try:
            sampled, logprobs = self._execute(sched)
        except Exception as e:  # the forward itself: this step's requests end, the rest go on
            ids = [item.request.request_id for item in sched.scheduled]
            for request_id in ids:
                self.abort(request_id)
            raise StepFailed(ids) from e
        outputs = []
        for request, tokens in self.scheduler.postprocess(sched, sampled):
            rid = request.request_id
            if rid in sampled and sampled[rid] is None:
                outputs.append(self._fail(request, "its logits held no distribution to draw from"))
            elif tokens:
                outputs.append(self._emit_alone(request, tokens, logprobs.get(rid)))
        duration_ms = (time.perf_counter() - t0) * 1e3
        drafts = sum(len(s.draft) for s in sched.scheduled)
        self.last_step = StepRecord(duration_ms, prefills, decodes, start_s, offsets, drafts)
        return outputs

    def _execute(
        self, sched: SchedulerOutput
    ) -> tuple[dict[str, list[int] | None], dict[str, list[TokenLogprob]]]:
        """-> by request id, its new tokens (kept drafts, then the token drawn after them; None:
        a draw failed) and (where asked for) their logprobs."""
        seqs = [
            SeqInput(
                _step_tokens(s),
                s.start,
                self.blocks.block_table(s.request.request_id),
                s.samples,
                s.request.wants_prompt_logprobs or bool(s.draft),
                self._lora_slot(s.request),
            )
            for s in sched.scheduled
        ]
        logits = self._sampling_rows(sched, seqs, self.runner.execute(ModelInput(seqs)))
        # a row per position that samples: a request's pending token and each of its drafts
        rows = [(s, j) for s in sched.scheduled if s.samples for j in range(1 + len(s.draft))]
        tracked = [self._tracked[s.request.request_id] for s, _ in rows]
        params = [s.request.sampling_params for s, _ in rows]
        masked = tuple(i for i, t in enumerate(tracked) if t.matcher is not None)
        allowed = None
        if masked:
            matchers = [tracked[i].matcher for i in masked]
            allowed = TokenMasks(masked, self.grammars.masks(matchers))
        history = [
            _history(s.request, s.draft[:j], self._fixed(t, logits))
            if p.adjusts_logits or t.matcher is not None
            else None
            for (s, j), p, t in zip(rows, params, tracked, strict=True)
        ]
        tokens = sample(logits, params, [t.generator for t in tracked], history, allowed)
        wanted = [None if t is None else p.logprobs for t, p in zip(tokens, params, strict=True)]
        logprobs = token_logprobs(logits, [t or 0 for t in tokens], wanted)
        sampled, scores, row = {}, {}, 0
        for s in (s for s in sched.scheduled if s.samples):
            n = self._verify(s, tokens[row : row + 1 + len(s.draft)])
            rid = s.request.request_id
            sampled[rid] = None if n is None else tokens[row : row + n]
            if logprobs[row] is not None and n is not None:
                scores[rid] = logprobs[row : row + n]
            row += 1 + len(s.draft)
        return sampled, scores

    @staticmethod
    def _fixed(tracked: _Tracked, logits: torch.Tensor) -> FixedAdjustments:
        """The request's allowed ids and logit bias as tensors, made once and kept."""
        if tracked.fixed is None:
            p = tracked.request.sampling_params
            tracked.fixed = FixedAdjustments.of(p, logits.device, logits.dtype)
        return tracked.fixed

    def _verify(self, item: ScheduledRequest, drawn: list[int | None]) -> int | None:
        """How many of the drawn tokens the request takes: its drafts while each equals the
        draw at its position, then the first draw that differs (or the one after the last
        draft); None when a draw it reaches failed."""
        kept = 0
        while kept < len(item.draft) and drawn[kept] == item.draft[kept]:
            kept += 1
        self.num_draft_tokens += len(item.draft)
        self.num_accepted_tokens += kept
        if item.draft:
            self.num_drafts += 1
            for position in range(kept):
                self.num_accepted_per_pos[position] += 1
        return None if None in drawn[: kept + 1] else kept + 1

    def _propose_drafts(self) -> None:
        """Speculative decoding: each decoding request's drafts for the next step, short enough
        that it cannot pass max_tokens or the context window (structured outputs, whose matcher
        moves one token at a time, decode without)."""
        if self.proposer is None:
            return
        limit = self.proposer.config.disable_by_batch_size
        if limit is not None and len(self.scheduler.running) > limit:
            for request in self.scheduler.running:
                request.spec_token_ids = []
            return
        items = []
        for request in self.scheduler.running:
            params = request.sampling_params
            room = min(
                params.max_tokens - request.num_output_tokens - 1,
                self.max_model_len - request.num_tokens,
            )
            items.append((request, 0 if params.structured_output is not None else room))
        for request, drafts in zip(
            self.scheduler.running, self.proposer.propose_all(items), strict=True
        ):
            request.spec_token_ids = drafts

    def _lora_slot(self, request: Request) -> int:
        lora = request.sampling_params.lora
        return 0 if lora is None else self.runner.lora_slots[lora]

    def _sampling_rows(
        self, sched: SchedulerOutput, seqs: list[SeqInput], logits: torch.Tensor
    ) -> torch.Tensor:
        """Gather the prompt logprobs of the seqs that returned a row per token; -> the rows
        that sample: one per sampling seq, and one more per draft token."""
        if not any(seq.all_logits for seq in seqs):  # the usual step: one row per sampling seq
            return logits
        rows, row = [], 0
        for item, seq in zip(sched.scheduled, seqs, strict=True):
            n = len(seq.token_ids) if seq.all_logits else int(seq.sample)
            if item.draft:  # its pending token's row and its drafts'
                rows.extend(range(row, row + n))
            elif seq.all_logits:
                self._gather_prompt_logprobs(item.request, item.start, logits[row : row + n])
            if seq.sample and not item.draft:
                rows.append(row + n - 1)
            row += n
        return logits[rows]

    def _gather_prompt_logprobs(self, request: Request, start: int, logits: torch.Tensor) -> None:
        """Row j predicts the token at start + j + 1; those inside the prompt are kept."""
        tracked = self._tracked[request.request_id]
        if start == 0:  # a recomputed prefill (preempted before its first token) starts over
            tracked.prompt_logprobs = []
        targets = request.prompt_token_ids[start + 1 : start + 1 + logits.shape[0]]
        k = request.sampling_params.prompt_logprobs
        # a slice of rows at a time: the log-softmax copy of a long prompt's logits is not made
        # whole on top of them
        for i in range(0, len(targets), PROMPT_LOGPROB_ROWS):
            part = targets[i : i + PROMPT_LOGPROB_ROWS]
            rows = logits[i : i + len(part)]
            tracked.prompt_logprobs.extend(token_logprobs(rows, part, [k] * len(part)))

    def _emit_alone(
        self, request: Request, tokens: list[int], logprobs: list[TokenLogprob] | None
    ) -> RequestOutput:
        """_emit for each new token (several: kept drafts), as one output; a failure
        (detokenizing, the grammar's matcher) ends this request only."""
        first = request.num_output_tokens - len(tokens)
        outputs = []
        for i, token in enumerate(tokens):
            try:
                out = self._emit(request, token, logprobs and logprobs[i], first + i + 1)
            except Exception as e:
                why = f"its output token {token} failed ({type(e).__name__})"
                return self._fail(request, why, e)
            outputs.append(out)
            if out.finished:  # a stop string: the tokens after it are not output
                del request.output_token_ids[first + i + 1 :]
                break
        return outputs[0] if len(outputs) == 1 else _joined(outputs)

    def _fail(self, request: Request, why: str, error: Exception | None = None) -> RequestOutput:
        """End a request the engine failed, freeing its blocks; -> its last output. `error`:
        what raised, logged with its traceback."""
        at = request.num_output_tokens
        message = f"the engine failed request {request.request_id} at output token {at}: {why}"
        logger.error("%s", message, exc_info=error)
        self._end(request.request_id, RequestStatus.FINISHED_ABORTED)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[],
            new_text="",
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=request.num_output_tokens,
            finish_reason=RequestStatus.FINISHED_ABORTED.value,
            error=RequestFailedError(message),
        )

    def _emit(
        self, request: Request, token: int, logprob: TokenLogprob | None, num_output: int
    ) -> RequestOutput:
        """The output of the request's output token number `num_output` (`token`)."""
        tracked = self._tracked[request.request_id]
        first_with_prompt = num_output == 1 and request.sampling_params.prompt_logprobs is not None
        params = request.sampling_params
        stopped = False
        # the token that ends a request (EOS, a stop token id) is not written into the text
        # unless include_stop_str_in_output, as vLLM: `skip_special_tokens: false` would
        # otherwise end every reply with the end-of-turn token
        if params.include_stop_str_in_output or not request.is_stop_token(token):
            prompt_and_output = request.prompt_token_ids + request.output_token_ids[:num_output]
            # stop strings count only from min_tokens on (vLLM's rule)
            may_stop = num_output >= params.min_tokens
            stopped = tracked.detokenizer.add_token(prompt_and_output, may_stop)
        error = None
        if tracked.matcher is not None:  # a complete form ends the request: nothing may follow
            done, error = advance(tracked.matcher, token, request.eos_token_id)
            stopped = stopped or done
        # the scheduler ends a request at its step's last token (EOS, max_tokens); a stop
        # string at an earlier one (of kept drafts) ends it there instead
        last = num_output == request.num_output_tokens
        if stopped and not (last and request.status.is_finished):
            status = RequestStatus.FINISHED_ABORTED if error else RequestStatus.FINISHED_STOPPED
            self.scheduler.finish(request, status)
        finished = request.status.is_finished and (last or stopped)
        if finished:
            del self._tracked[request.request_id]
            self._forget_drafts(request.request_id)
        return RequestOutput(
            request_id=request.request_id,
            new_token_ids=[token],
            new_text=tracked.detokenizer.take_new_text(finished),
            num_prompt_tokens=request.num_prompt_tokens,
            num_output_tokens=num_output,
            finish_reason=request.status.value if finished else None,
            prefilled=request.status is RequestStatus.PREFILLED,
            queue_time_s=_queue_time(request) if num_output == 1 else None,
            prefill_time_s=_prefill_time(request) if num_output == 1 else None,
            num_cached_tokens=request.num_cached_tokens if num_output == 1 else None,
            logprobs=None if logprob is None else [logprob],
            prompt_logprobs=[None, *tracked.prompt_logprobs] if first_with_prompt else None,
            error=None if error is None else self._grammar_error(request, error),
        )

    @staticmethod
    def _grammar_error(request: Request, message: str) -> InvalidRequestError:
        structure = request.sampling_params.structured_output
        logger.warning(
            "request %s: its %s parser failed: %s", request.request_id, structure.kind, message
        )
        return InvalidRequestError(
            f"the {structure.kind} constraint failed at output token {request.num_output_tokens}: "
            f"{message}",
            structure.param,
        )

    # ---- abort, stats ------------------------------------------------------------------------

    def abort(self, request_id: str) -> bool:
        """Stop a request in any state (queued, running, prefilled); frees its blocks."""
        return self._end(request_id, RequestStatus.FINISHED_ABORTED)

    def _end(self, request_id: str, status: RequestStatus) -> bool:
        tracked = self._tracked.pop(request_id, None)
        if tracked is None:
            return False
        self._forget_drafts(request_id)
        self.scheduler.finish(tracked.request, status)
        return True

    def _forget_drafts(self, request_id: str) -> None:
        if self.proposer is not None:
            self.proposer.forget(request_id)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    @property
    def stats(self) -> EngineStats:
        drafts = getattr(self.proposer, "blocks", None)  # a draft model's own pool
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            num_prefilled=len(self.scheduler.prefilled),
            num_kv_blocks=self.blocks.num_blocks,
            num_free_blocks=self.blocks.num_free_blocks,
            num_preemptions=self.num_preemptions,
            num_waiting_tokens=sum(r.num_pending_tokens for r in self.scheduler.waiting),
            num_running_tokens=sum(r.num_tokens for r in self.scheduler.running),
            num_cached_tokens=self.scheduler.prefill.num_cached_tokens,
            num_queried_tokens=self.scheduler.prefill.num_queried_tokens,
            num_step_tokens=self.last_step.num_tokens if self.last_step else 0,
            num_loras=len(self.runner.lora_slots),
            num_lora_loads=self.runner.num_lora_loads,
            num_draft_tokens=self.num_draft_tokens,
            num_accepted_tokens=self.num_accepted_tokens,
            num_drafts=self.num_drafts,
            num_accepted_per_pos=tuple(self.num_accepted_per_pos),
            num_draft_kv_blocks=drafts.num_blocks if drafts is not None else 0,
            num_draft_free_blocks=drafts.num_free_blocks if drafts is not None else 0,
        )

    # ---- disaggregation ----------------------------------------------------------------------

    def kv_handoff(self, request_id: str) -> KVHandoff:
        """What a decode engine needs besides the KV blocks (listed in handoff.block_ids)."""
        request = self.scheduler.prefilled.get(request_id)
        if request is None:
            raise KeyError(f"request {request_id!r} is not a prefilled request of this engine")
        tracked = self._tracked[request_id]
        return KVHandoff(
            request_id=request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids),
            sampling_params=request.sampling_params,
            num_computed_tokens=request.num_computed_tokens,
            layout=self.runner.kv_layout,
            block_ids=tuple(self.blocks.block_table(request_id)),
            detokenizer=DetokenizerState(**vars(tracked.detokenizer.state)),
            generator_state=(
                bytes(tracked.generator.get_state().numpy()) if tracked.generator else None
            ),
        )

    def export_kv(self, request_id: str) -> tuple[KVHandoff, torch.Tensor]:
        """-> (handoff, buffer (L, 2, n_blocks, bs, Hkv, D)); the blocks stay allocated."""
        handoff = self.kv_handoff(request_id)
        return handoff, self.runner.export_blocks(list(handoff.block_ids))

    def release(self, request_id: str) -> bool:
        """Free a prefilled request after its KV has been handed off; False if not prefilled."""
        if request_id not in self.scheduler.prefilled:
            return False
        return self._end(request_id, RequestStatus.FINISHED_STOPPED)

    def can_import(self, num_tokens: int) -> bool:
        return (
            len(self.scheduler.running) < self.config.scheduler.max_num_seqs
            # +1: room for the token the first decode step writes
            and self.blocks.blocks_for(num_tokens + 1) <= self.blocks.num_free_blocks
        )

    def import_request(self, handoff: KVHandoff, buffer) -> bool:
        """Continue a request prefilled elsewhere; False (nothing changed) when no room now.

        buffer: the packed KV (L, 2, n, bs, Hkv, D), or a list of KV pieces for
        `runner.import_kv` (opened (piece, view) pairs, or bare pieces when
        `runner.opens_own_kv`)."""
        if handoff.layout != self.runner.kv_layout:
            raise ValueError(f"KV layout {handoff.layout} does not match {self.runner.kv_layout}")
        if handoff.request_id in self._tracked:
            raise InvalidRequestError(f"request id {handoff.request_id!r} is already in use")
        self._use_lora(handoff.sampling_params)
        if not self.can_import(handoff.num_computed_tokens):
            return False
        request = Request(
            handoff.request_id,
            list(handoff.prompt_token_ids),
            handoff.sampling_params,
            self.eos_token_id,
            output_token_ids=list(handoff.output_token_ids),
            num_computed_tokens=handoff.num_computed_tokens,
            adapter_key=self.adapters.key(handoff.sampling_params.lora),
        )
        blocks = self.blocks.allocate(request.request_id, handoff.num_computed_tokens)
        try:
            if isinstance(buffer, torch.Tensor):  # the whole cache of the request, packed
                self.runner.import_blocks(blocks, buffer)
            else:  # KV pieces (engine/kv_handoff.py), opened or for the workers to open
                self.runner.import_kv(blocks, buffer)
        except Exception:
            self.blocks.free(request.request_id)
            raise
        self._track(request, DetokenizerState(**vars(handoff.detokenizer)), handoff.generator_state)
        self.scheduler.add_running(request)
        return True

    # ---- offline convenience -----------------------------------------------------------------

    def generate(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        ids = [self.add_request(None, p, sp) for p, sp in zip(prompts, param_list, strict=True)]
        texts = {i: [] for i in ids}
        tokens = {i: [] for i in ids}
        logprobs: dict[str, list[TokenLogprob]] = {i: [] for i in ids}
        prompt_logprobs: dict[str, list[TokenLogprob | None] | None] = dict.fromkeys(ids)
        reasons: dict[str, str] = {}
        errors: dict[str, Exception] = {}
        while len(reasons) < len(ids):
            for out in self.step():
                texts[out.request_id].append(out.new_text)
                tokens[out.request_id].extend(out.new_token_ids)
                logprobs[out.request_id].extend(out.logprobs or ())
                if out.prompt_logprobs is not None:
                    prompt_logprobs[out.request_id] = out.prompt_logprobs
                if out.error is not None:
                    errors[out.request_id] = out.error
                if out.finished:
                    reasons[out.request_id] = out.finish_reason
        prompts_ids = [self.encode(p) for p in prompts]
        return [
            Completion(
                i,
                pi,
                tokens[i],
                "".join(texts[i]),
                reasons[i],
                logprobs[i] if sp.logprobs is not None else None,
                prompt_logprobs[i],
                errors.get(i),
            )
            for i, pi, sp in zip(ids, prompts_ids, param_list, strict=True)
        ]


def _step_shape(sched: SchedulerOutput) -> tuple[list[int], list[int], list[int]]:
    """(prefill token counts, their offsets in the prompt, decode context lengths) of a
    scheduled step."""
    prefills, offsets, decodes = [], [], []
    for s in sched.scheduled:
        if s.num_tokens == 1 + len(s.draft) and s.request.num_output_tokens > 0:
            decodes.append(s.end - len(s.draft))
        else:
            prefills.append(s.num_tokens)
            offsets.append(s.start)
    return prefills, offsets, decodes


def _step_tokens(item: ScheduledRequest) -> list[int]:
    """The tokens a scheduled request computes: its pending ones, then its drafts."""
    tokens = item.request.token_ids(item.start, item.end - len(item.draft))
    return tokens + list(item.draft) if item.draft else tokens


def _history(request: Request, drafts: tuple[int, ...], fixed: FixedAdjustments) -> TokenHistory:
    """What a row's penalties see: the output so far and, for a draft's row, the drafts before
    it (the output is copied only then: this runs every step for every penalized request)."""
    output = request.output_token_ids + list(drafts) if drafts else request.output_token_ids
    return TokenHistory(request.prompt_token_ids, output, request.eos_token_id, fixed)


def _joined(outputs: list[RequestOutput]) -> RequestOutput:
    """One step's outputs of one request (its kept drafts' and the next token's) as one."""
    first, last = outputs[0], outputs[-1]
    logprobs = [lp for out in outputs for lp in out.logprobs or ()]
    return dataclasses.replace(
        last,
        new_token_ids=[t for out in outputs for t in out.new_token_ids],
        new_text="".join(out.new_text for out in outputs),
        queue_time_s=first.queue_time_s,
        prefill_time_s=first.prefill_time_s,
        num_cached_tokens=first.num_cached_tokens,
        logprobs=logprobs if first.logprobs is not None else None,
        prompt_logprobs=first.prompt_logprobs,
    )


def _prefill_time(request: Request) -> float | None:
    """Its first scheduling -> now, at its first token (a preemption during a chunked prefill
    counts in it, as in vLLM)."""
    if request.first_scheduled_time is None:
        return None
    return time.monotonic() - request.first_scheduled_time


def _queue_time(request: Request) -> float | None:
    if request.first_scheduled_time is None:
        return None
    return request.first_scheduled_time - request.arrival_time
