from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # alternatives per token, OpenAI's top_logprobs limit
SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed takes


class InvalidRequestError(ValueError):
    """A request the engine refuses; the message names the offending field, `param` too."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # keep `param` when Ray pickles it across processes
        return (type(self), (str(self), self.param))


STRUCTURE_KINDS = ("json", "json_object", "regex", "choice", "grammar", "structural_tag")
JSON_KINDS = ("json", "json_object", "structural_tag")  # the kinds that write JSON


THINKING = ("", "opened", "optional")


@dataclass(frozen=True)
class StructuredOutput:
    """A constraint on the output's form (vLLM's structured outputs): a JSON schema, any JSON
    object, a regular expression, one of a list of strings, a grammar (Lark or GBNF), or
    structural tags (free text in which a trigger starts a tagged JSON value).
    Small and pure, it travels with the request; each engine compiles it (engine/grammar.py).

    spec: the schema as JSON text (json), the expression (regex), a JSON list of the strings
    (choice), the grammar's text (grammar) or the tags as JSON text, {"structures": [{"begin",
    "schema", "end"}, ...], "triggers": [...]} (structural_tag); empty for json_object."""

    kind: str
    spec: str = ""
    # JSON kinds: any whitespace between tokens (vLLM's default); False: none
    any_whitespace: bool = True
    # JSON kinds: a regex the whitespace between tokens matches, in place of either
    whitespace_pattern: str | None = None
    param: str = "structured_outputs"  # the request field it came from, named in errors
    # a reasoning model's think block, free, before the constrained answer (vLLM starts the
    # constraint after the reasoning): "opened" (the output starts inside it, up to its
    # </think>), "optional" (the output may start with a whole <think>...</think>), "" none
    thinking: str = ""
    think_tags: tuple[str, str] = ("<think>", "</think>")  # the block's start and end

    def __post_init__(self) -> None:
        if self.thinking not in THINKING:
            raise InvalidRequestError(
                f"thinking must be one of {THINKING}, got {self.thinking!r}", self.param
            )
        if self.kind not in STRUCTURE_KINDS:
            raise InvalidRequestError(
                f"structured output kind must be one of {', '.join(STRUCTURE_KINDS)}, "
                f"got {self.kind!r}",
                self.param,
            )
        if not isinstance(self.spec, str) or (self.kind != "json_object" and not self.spec):
            raise InvalidRequestError(f"the {self.kind} constraint is empty", self.param)
        if self.whitespace_pattern is not None and self.kind not in JSON_KINDS:
            raise InvalidRequestError(
                f"a whitespace pattern shapes JSON only, not a {self.kind} constraint", self.param
            )

    @property
    def json_options(self) -> dict:
        """llguidance's options for this constraint's JSON (its x-guidance)."""
        if self.whitespace_pattern is not None:
            return {"whitespace_pattern": self.whitespace_pattern}
        return {"whitespace_flexible": self.any_whitespace}


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) disables top-k
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability (0 disables)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # OpenAI's penalties on the output so far: logit -= frequency * count + presence * (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's / transformers': over prompt and output, positive logits / p, negative ones * p
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)
    # vLLM's: only these tokens may be sampled (empty: any)
    allowed_token_ids: tuple[int, ...] = ()
    # vLLM's bad_words, as token ids (engine.limits.bad_words_token_ids): a sequence's last
    # token may not be sampled where the output so far ends with the rest of it
    bad_words_token_ids: tuple[tuple[int, ...], ...] = ()
    # vLLM's: before this many output tokens, EOS and stop_token_ids cannot be sampled and stop
    # strings do not end the request
    min_tokens: int = 0
    # None: no log-probabilities; k >= 0: each output token's log-probability and the k most
    # likely tokens' (of the model's own distribution: before penalties and temperature)
    logprobs: int | None = None
    # None, or k >= 0: the log-probability of every prompt token after the first and the k
    # most likely tokens at its position (vLLM's prompt_logprobs), with the first output
    # Costs a (prompt length x vocabulary) logits matrix in the step that computes the prompt.
    prompt_logprobs: int | None = None
    # Strip stop strings from the output text (OpenAI does); tokens are kept either way.
    include_stop_str_in_output: bool = False
    # Leave special tokens (e.g. an EOS sampled under ignore_eos) out of the text, as vLLM's
    # default does; False writes them as their strings. Tokens are kept either way.
    skip_special_tokens: bool = True
    # the output's form (a JSON schema, a regex, ...): tokens that cannot continue it are
    # masked before the other adjustments, and the request ends when it is complete
    structured_output: StructuredOutput | None = None
    # vLLM's: under the priority scheduling policy a lower value is served first (ties: first
    # come); an engine under first-come-first-served refuses any other value than 0
    priority: int = 0
    # vLLM's: only requests with the same salt (or none) share prefix-cache blocks, so tenants
    # that do not share one cannot tell from their latency what the others sent
    cache_salt: str | None = None
    # the LoRA adapter (the engine's lora_modules name) the request runs with; None: the base
    # model. Its prefix-cache blocks are its adapter's alone (engine/block_manager.py).
    lora: str | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "logit_bias", tuple(tuple(kv) for kv in self.logit_bias))
        object.__setattr__(self, "allowed_token_ids", tuple(self.allowed_token_ids))
        object.__setattr__(
            self, "bad_words_token_ids", tuple(tuple(w) for w in self.bad_words_token_ids)
        )
        self.validate()

    def validate(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError(
                f"max_tokens must be an integer >= 1, got {self.max_tokens!r}", "max_tokens"
            )
        if not 0 <= self.temperature < math.inf:  # NaN fails this too
            raise InvalidRequestError(
                f"temperature must be finite and >= 0, got {self.temperature}", "temperature"
            )
        if not 0 < self.top_p <= 1:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", "top_p")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise InvalidRequestError(
                f"top_k must be -1, 0 or a positive integer, got {self.top_k}", "top_k"
            )
        if not isinstance(self.min_tokens, int) or not 0 <= self.min_tokens <= self.max_tokens:
            raise InvalidRequestError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], "
                f"got {self.min_tokens!r}",
                "min_tokens",
            )
        if self.seed is not None and (
            not isinstance(self.seed, int) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            raise InvalidRequestError(
                f"seed must be an integer in [-2**63, 2**64 - 1], got {self.seed!r}", "seed"
            )
        if not isinstance(self.priority, int):
            raise InvalidRequestError(
                f"priority must be an integer, got {self.priority!r}", "priority"
            )
        if self.cache_salt is not None and (
            not isinstance(self.cache_salt, str) or not self.cache_salt
        ):
            raise InvalidRequestError(
                f"cache_salt must be a non-empty string, got {self.cache_salt!r}", "cache_salt"
            )
        if self.lora is not None and (not isinstance(self.lora, str) or not self.lora):
            raise InvalidRequestError(
                f"lora must be a non-empty adapter name, got {self.lora!r}", "model"
            )
        if not 0.0 <= self.min_p <= 1.0:
            raise InvalidRequestError(f"min_p must be in [0, 1], got {self.min_p}", "min_p")
        if any(not s for s in self.stop):
            raise InvalidRequestError("stop strings must be non-empty", "stop")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}", name)
        if not self.repetition_penalty > 0:
            raise InvalidRequestError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
                "repetition_penalty",
            )
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and (not isinstance(k, int) or not 0 <= k <= MAX_LOGPROBS):
                raise InvalidRequestError(
                    f"{name} must be an integer in [0, {MAX_LOGPROBS}], got {k!r}", name
                )
        for token, bias in self.logit_bias:
            if not isinstance(token, int) or token < 0:
                raise InvalidRequestError(
                    f"logit_bias keys must be token ids (integers >= 0), got {token!r}",
                    "logit_bias",
                )
            if not -100.0 <= bias <= 100.0:
                raise InvalidRequestError(
                    f"logit_bias values must be in [-100, 100], got {bias} for token {token}",
                    "logit_bias",
                )
        self._validate_token_lists()

    def _validate_token_lists(self) -> None:
        """Token ids must be integers >= 0; the engine checks them against its vocabulary."""
        ids = [*self.allowed_token_ids, *(t for w in self.bad_words_token_ids for t in w)]
        if any(not isinstance(t, int) or t < 0 for t in ids):
            raise InvalidRequestError(
                "allowed_token_ids and bad words must be token ids (integers >= 0)",
                "allowed_token_ids" if self.allowed_token_ids else "bad_words",
            )
        if any(not w for w in self.bad_words_token_ids):
            raise InvalidRequestError("a bad word has no tokens", "bad_words")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1

    @property
    def adjusts_logits(self) -> bool:
        """Whether sampling adjusts this request's logits (penalties, bias, min_tokens, allowed
        tokens, bad words), and so must see its tokens so far."""
        return bool(
            self.presence_penalty
            or self.frequency_penalty
            or self.repetition_penalty != 1.0
            or self.logit_bias
            or self.min_tokens
            or self.allowed_token_ids
            or self.bad_words_token_ids
        )

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)
