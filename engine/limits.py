"""Request limits and chat prompts, shared by the engine and the HTTP ingress. Pure: no torch."""

from __future__ import annotations

from engine.sampling_params import InvalidRequestError


def check_lengths(
    num_prompt: int, max_tokens: int, max_model_len: int, kv_capacity: int | None = None
) -> None:
    """Raise InvalidRequestError (with .param) for a request that can never be served."""
    if num_prompt == 0:
        raise InvalidRequestError("prompt is empty", "prompt")
    if num_prompt >= max_model_len:
        raise InvalidRequestError(
            f"prompt has {num_prompt} tokens; the context window is {max_model_len} tokens",
            "prompt",
        )
    if num_prompt + max_tokens > max_model_len:
        raise InvalidRequestError(
            f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context "
            f"window of {max_model_len} tokens",
            "max_tokens",
        )
    if kv_capacity is not None and num_prompt + max_tokens > kv_capacity:
        raise InvalidRequestError(
            f"prompt ({num_prompt} tokens) + max_tokens ({max_tokens}) exceeds the KV cache "
            f"of {kv_capacity} tokens",
            "max_tokens",
        )


def check_token_ids(ids: list[int], vocab_size: int) -> None:
    """Raise InvalidRequestError unless every prompt token id is in the vocabulary."""
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise InvalidRequestError(
            f"prompt token ids must be integers in [0, {vocab_size})", "prompt"
        )


def chat_token_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The model's chat template with the assistant turn opened, as token ids."""
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)
