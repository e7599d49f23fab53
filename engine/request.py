from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from functools import cached_property

from engine.block_manager import chain_root
from engine.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # queued for (re)prefill
    RUNNING = "running"  # in the decode batch
    PREFILLED = "prefilled"  # prefill-only request done; holds its KV until exported and released
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (self.FINISHED_STOPPED, self.FINISHED_LENGTH, self.FINISHED_ABORTED)


@dataclass(eq=False)
class Request:
    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_id: int | None = None
    prefill_only: bool = False
    arrival_time: float = field(default_factory=time.monotonic)
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0  # tokens whose KV is in this engine's cache
    status: RequestStatus = RequestStatus.WAITING
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    num_cached_tokens: int = 0  # prompt tokens its first prefill took from the prefix cache
    # (length, the prefix-cache keys of its first `length` tokens' full blocks), kept by the
    # scheduler so that a waiting prompt is hashed once
    block_keys: tuple[int, list[bytes]] | None = None
    # speculative decoding: draft tokens to verify with its next decode (engine/spec_decode.py)
    spec_token_ids: list[int] = field(default_factory=list)
    # what its LoRA adapter's KV is keyed by (the engine's AdapterCache.key); None: its name
    adapter_key: str | None = None

    @cached_property
    def prefix_root(self) -> bytes:
        """Where its prefix-cache keys start: its cache salt's and adapter's
        (engine/block_manager.py)."""
        lora = self.adapter_key or self.sampling_params.lora
        return chain_root(self.sampling_params.cache_salt, lora)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_pending_tokens(self) -> int:
        """Tokens whose KV is not computed yet: the prompt before prefill, 1 while decoding."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def wants_prompt_logprobs(self) -> bool:
        """Its prompt's logprobs are still to be computed: they come from the prefill that
        leads to the first output token (a prefill recomputed after a preemption past it is
        not asked again), and every prompt token then needs its logits."""
        return self.sampling_params.prompt_logprobs is not None and not self.output_token_ids

    def token_ids(self, start: int, end: int) -> list[int]:
        """Its tokens [start, end), copying only those (a decode step asks for its last)."""
        prompt, n = self.prompt_token_ids, len(self.prompt_token_ids)
        if end <= n:
            return prompt[start:end]
        if start >= n:
            return self.output_token_ids[start - n : end - n]
        return prompt[start:] + self.output_token_ids[: end - n]

    def is_stop_token(self, token_id: int) -> bool:
        """Whether `token_id` ends the request by itself (EOS unless ignored, a stop token id)."""
        params = self.sampling_params
        eos = not params.ignore_eos and token_id == self.eos_token_id
        return eos or token_id in params.stop_token_ids

    def check_stop_token(self, token_id: int) -> RequestStatus | None:
        """Token-level stop conditions after `token_id` has been appended."""
        if self.is_stop_token(token_id):
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.sampling_params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None
