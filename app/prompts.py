"""The tokenizer's side of a request, for the ingress: prompt token ids (completions' texts and
token ids, the chat template), vLLM's truncate_prompt_tokens and bad_words, how logprobs name
tokens, and the bodies of /tokenize and /detokenize. No Ray and no replicas: tokenizer work
only, refused input as APIError (400)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from app.formats import Prompt
from app.logprobs import TokenTexts
from app.protocol import APIError, as_bad_request
from engine.limits import bad_words_token_ids, check_token_ids

if TYPE_CHECKING:  # annotations only; the ingress parses the bodies
    from app.protocol import (
        ChatCompletionRequest,
        CompletionRequest,
        DetokenizeRequest,
        TokenizeChatRequest,
        TokenizeRequest,
    )


class PromptBuilder:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size  # the model's, which the engine checks too
        self.max_model_len = max_model_len
        self.token_texts = TokenTexts(tokenizer)

    def prompts(self, req: CompletionRequest | ChatCompletionRequest, chat: bool) -> list[Prompt]:
        """The request's prompts (a chat has one), truncated as it asks."""
        if chat:
            prompts = [Prompt(req.prompt_ids(self.tokenizer), req.echo_text)]
        else:
            prompts = [self.completion(p, req) for p in req.prompts]
        if req.truncate_prompt_tokens is None:
            return prompts
        return [self.truncated(p, req.truncate_prompt_tokens, chat) for p in prompts]

    def completion(self, prompt: str | list[int], req: CompletionRequest) -> Prompt:
        """A completions prompt, text or token ids; echo repeats it as sent, or as the text of
        its ids."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=req.add_special_tokens).input_ids
            return Prompt(ids, prompt if req.echo else "")
        ids = list(prompt)
        self.check_ids(ids)  # before echo decodes them (out of range, decode raises)
        return Prompt(ids, self.tokenizer.decode(ids) if req.echo else "")

    def check_ids(
        self, ids: list[int], param: str = "prompt", what: str = "prompt token ids"
    ) -> None:
        """The engine's check of token ids, as a 400 naming `param`."""
        with as_bad_request():
            check_token_ids(ids, self.vocab_size, param, what)

    def truncated(self, prompt: Prompt, keep: int, chat: bool) -> Prompt:
        """vLLM's truncate_prompt_tokens: the prompt's last `keep` tokens (-1: the context
        window's worth). A completions echo then shows the text of the tokens kept; a chat
        echo (the assistant's last message) stays as it is."""
        if keep > self.max_model_len:
            raise APIError(
                400,
                f"truncate_prompt_tokens ({keep}) is more than the context window of "
                f"{self.max_model_len} tokens",
                "truncate_prompt_tokens",
            )
        keep = self.max_model_len if keep == -1 else keep
        if len(prompt.ids) <= keep:
            return prompt
        ids = prompt.ids[-keep:]
        echo = prompt.echo if chat or not prompt.echo else self.tokenizer.decode(ids)
        return Prompt(ids, echo)

    def bad_words(self, words: list[str] | None) -> tuple[tuple[int, ...], ...]:
        with as_bad_request():
            return bad_words_token_ids(self.tokenizer, words or [])

    def texts(self, req: CompletionRequest | ChatCompletionRequest) -> Callable[[int], str]:
        """How logprobs name tokens: by their text, or (vLLM's return_tokens_as_token_ids) as
        "token_id:N", which survives tokens that are not text of their own."""
        return _token_id_text if req.return_tokens_as_token_ids else self.token_texts

    def tokenize(self, req: TokenizeRequest | TokenizeChatRequest) -> dict:
        """vLLM's /tokenize body."""
        ids = req.prompt_ids(self.tokenizer)
        strs = self.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
        return {
            "count": len(ids),
            "max_model_len": self.max_model_len,
            "tokens": ids,
            "token_strs": strs,
        }

    def detokenize(self, req: DetokenizeRequest) -> dict:
        """vLLM's /detokenize body."""
        self.check_ids(req.tokens, "tokens", "tokens")
        return {"prompt": self.tokenizer.decode(req.tokens)}


def _token_id_text(token_id: int) -> str:
    return f"token_id:{token_id}"
