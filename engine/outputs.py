"""Objects that leave the engine: step outputs, completions, the prefill->decode handoff."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from engine.detokenizer import DetokenizerState
from engine.sampling_params import SamplingParams
from kvkernels.kv_blocks import KVLayout


class RequestFailedError(RuntimeError):
    """The engine failed one request (its draw, its detokenizing) and ended it; the others of
    its step went on. A server fault, not the request's: the ingress answers 500."""


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability, its rank and the top alternatives, as (token id, logprob)
    most likely first. Of the model's own distribution, before penalties, bias, temperature and
    truncation (vLLM's default `raw_logprobs`), so it says what the model thought."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()
    rank: int | None = None  # 1: the most likely token (vLLM's Logprob.rank); None: not known


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request (a delta, as streamed)."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    prefilled: bool = False  # a prefill-only request now waits for export
    queue_time_s: float | None = None  # on a request's first output here: arrival -> scheduled
    # on its first token's output: scheduled -> first token (vLLM's prefill interval)
    prefill_time_s: float | None = None
    num_cached_tokens: int | None = None  # on its first output: prompt tokens from the cache
    logprobs: list[TokenLogprob] | None = None  # one per new token, when the request asked
    # with the first output, when the request asked: one per prompt token, None for the first
    prompt_logprobs: list[TokenLogprob | None] | None = None
    # why the engine ended the request itself ("abort"): its structured output's parser failed
    # (InvalidRequestError), or the engine failed it (RequestFailedError)
    error: Exception | None = None
    # outputs joined into this one (stream batching): each one's (text length, tokens), so
    # the ingress can still count per step what a step's text was; empty: one step's
    joined: tuple[tuple[int, int], ...] = ()

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def pieces(self) -> list[tuple[str, int]]:
        """(text, tokens) of each step this output holds, as the steps made them."""
        if not self.joined:
            return [(self.new_text, len(self.new_token_ids))]
        out, at = [], 0
        for length, tokens in self.joined:
            out.append((self.new_text[at : at + length], tokens))
            at += length
        return out

    def then(self, later: RequestOutput) -> RequestOutput:
        """This delta and the next one of the same request, as one (a stream that sends its
        tokens in fewer items). The first output's own fields (queue and prefill time,
        cached tokens, prompt logprobs) come from this one; the counts and the end from `later`."""
        if later.request_id != self.request_id or self.finished or self.prefilled:
            raise ValueError(f"cannot join output of {later.request_id!r} after {self!r}")
        logprobs = None
        if self.logprobs is not None or later.logprobs is not None:
            logprobs = (self.logprobs or []) + (later.logprobs or [])
        return dataclasses.replace(
            later,
            new_token_ids=self.new_token_ids + later.new_token_ids,
            new_text=self.new_text + later.new_text,
            queue_time_s=_first(self.queue_time_s, later.queue_time_s),
            prefill_time_s=_first(self.prefill_time_s, later.prefill_time_s),
            num_cached_tokens=_first(self.num_cached_tokens, later.num_cached_tokens),
            logprobs=logprobs,
            prompt_logprobs=_first(self.prompt_logprobs, later.prompt_logprobs),
            joined=tuple((len(t), n) for t, n in self.pieces + later.pieces),
        )


def _first(a, b):
    return a if a is not None else b


@dataclass(frozen=True)
class Completion:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    finish_reason: str
    logprobs: list[TokenLogprob] | None = None  # one per token, when the request asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # as in RequestOutput
    # why the engine ended it (finish_reason "abort"): RequestFailedError, or the grammar's
    # InvalidRequestError; the batch's other completions are still returned
    error: Exception | None = None


@dataclass(frozen=True)
class KVHandoff:
    """Everything a decode engine needs to continue a request, except the KV buffer itself."""

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    sampling_params: SamplingParams
    num_computed_tokens: int  # tokens whose KV is in the buffer
    layout: KVLayout
    block_ids: tuple[int, ...]  # sender's blocks, in order (for transports that read in place)
    detokenizer: DetokenizerState
    generator_state: bytes | None = None  # seeded sampling continues where prefill left off

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    num_prefilled: int
    num_kv_blocks: int
    num_free_blocks: int
    num_preemptions: int
    num_waiting_tokens: int = 0  # prompt tokens of waiting requests not computed yet
    num_running_tokens: int = 0  # context tokens of the running batch (decode step cost)
    num_cached_tokens: int = 0  # prompt tokens taken from the prefix cache, since start
    num_queried_tokens: int = 0  # tokens of requests that looked the cache up, since start
    num_step_tokens: int = 0  # tokens the last step computed (0: it computed none)
    num_loras: int = 0  # LoRA adapters loaded now
    num_lora_loads: int = 0  # LoRA adapters loaded since start (lora_dir's: at first use)
    # speculative decoding, since start: draft tokens verified, and those kept; requests'
    # drafts verified, and the drafts kept at each position (1st, 2nd, ...)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_drafts: int = 0
    num_accepted_per_pos: tuple[int, ...] = ()
    # a draft model's own KV pool (engine/draft_model.py; 0 and 0 without one)
    num_draft_kv_blocks: int = 0
    num_draft_free_blocks: int = 0

    @property
    def num_used_blocks(self) -> int:
        return self.num_kv_blocks - self.num_free_blocks

    @property
    def kv_usage(self) -> float:
        return self.num_used_blocks / self.num_kv_blocks


@dataclass(frozen=True)
class StepRecord:
    """What one engine step computed and how long it took (the latency model's inputs)."""

    duration_ms: float
    prefill_lens: list[int]  # tokens computed per prefill (or chunk) in the step
    decode_contexts: list[int]  # context length per decode in the step
    start_s: float = 0.0  # time.time() at the step's start: gaps between steps are overhead
    # prompt tokens already computed before each prefill (0) or chunk (its offset): a chunk's
    # attention runs over that prefix too, so the latency model needs it
    prefill_offsets: list[int] = field(default_factory=list)
    # speculative decoding: draft tokens verified in the step. Such a step's decodes compute
    # several tokens each, so it fits neither the prefill nor the decode step model.
    draft_tokens: int = 0

    @property
    def num_tokens(self) -> int:
        """Tokens the step computed: prompts' (or chunks'), one per decode, and drafts."""
        return sum(self.prefill_lens) + len(self.decode_contexts) + self.draft_tokens
