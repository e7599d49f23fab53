"""Request limits, chat prompts and bad words' tokens, shared by the engine and the HTTP ingress.
Pure: no torch."""

from __future__ import annotations

from engine.sampling_params import InvalidRequestError


def context_window(text_config) -> int:
    """The longest context this engine serves for a model (its transformers text config): its
    position limit. (Llama 4's chunked local attention, once capped at one chunk, is applied
    by the paged attention: kvkernels/paged_attention.py's `Reach`.)"""
    return text_config.max_position_embeddings


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


def check_token_ids(
    ids, vocab_size: int, param: str = "prompt", what: str = "prompt token ids"
) -> None:
    """Raise InvalidRequestError (naming `param`) unless every id in `ids` is in the
    vocabulary."""
    if any(not isinstance(t, int) or not 0 <= t < vocab_size for t in ids):
        raise InvalidRequestError(f"{what} must be integers in [0, {vocab_size})", param)


def chat_token_ids(
    tokenizer,
    messages: list[dict],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool = False,
    add_special_tokens: bool = False,
    template_kwargs: dict | None = None,
    documents: list[dict] | None = None,
    tools: list[dict] | None = None,
) -> list[int]:
    """The model's chat template as token ids: by default with the assistant turn opened.
    continue_final_message leaves the last message open for the model to continue (vLLM's);
    template_kwargs are extra variables of the template; documents (RAG) are passed to
    templates that take them, as transformers and vLLM do; so are tools (function
    definitions). The rendered text is tokenized with
    add_special_tokens (a template writes its own BOS, hence False by default, as
    transformers' and vLLM's chat do). A template that refuses the messages (a template
    error, or the final message not found to continue) is an InvalidRequestError."""
    from jinja2 import TemplateError  # transformers renders chat templates with jinja2

    try:
        text = tokenizer.apply_chat_template(
            messages,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            documents=documents,
            tools=tools,
            **(template_kwargs or {}),
        )
    except (TemplateError, ValueError) as e:
        raise InvalidRequestError(f"the chat template refused the messages: {e}", "messages") from e
    except TypeError as e:  # a template variable that is one of apply_chat_template's own
        raise InvalidRequestError(f"chat template variables: {e}", "chat_template_kwargs") from e
    return tokenizer(text, add_special_tokens=add_special_tokens).input_ids


def bad_words_token_ids(tokenizer, words: list[str]) -> tuple[tuple[int, ...], ...]:
    """vLLM's bad_words as token-id sequences: each word as it is, and again with a leading
    space where that makes it a word of its own (same length, another first token), so the
    word is banned at the start of the text and after a space alike."""
    sequences: list[tuple[int, ...]] = []
    for word in words:
        bare = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
        if not bare:
            raise InvalidRequestError(f"bad word {word!r} has no tokens", "bad_words")
        sequences.append(bare)
        spaced = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
        if len(spaced) == len(bare) and spaced[0] != bare[0]:
            sequences.append(spaced)
    return tuple(sequences)
