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
from engine import InvalidRequestError
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
        self._longest_token = longest_token_bytes(tokenizer)

    def prompts(self, req: CompletionRequest | ChatCompletionRequest, chat: bool) -> list[Prompt]:
        """The request's prompts (a chat has one), truncated as it asks."""
        tokenizer = self.tokenizer
        if req.truncate_prompt_tokens is None and self._longest_token is not None:
            param = "messages" if chat else "prompt"
            tokenizer = _SizedTokenizer(tokenizer, self._longest_token, self.max_model_len, param)
        with as_bad_request():  # the sized tokenizer's refusal
            if chat:
                prompts = [Prompt(req.prompt_ids(tokenizer), req.echo_text)]
            else:
                prompts = [self.completion(p, req, tokenizer) for p in req.prompts]
        if req.truncate_prompt_tokens is None:
            return prompts
        return [self.truncated(p, req.truncate_prompt_tokens, chat) for p in prompts]

    def completion(self, prompt: str | list[int], req: CompletionRequest, tokenizer) -> Prompt:
        """A completions prompt, text or token ids; echo repeats it as sent, or as the text of
        its ids."""
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=req.add_special_tokens).input_ids
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


def longest_token_bytes(tokenizer) -> int | None:
    """The most bytes of text one token stands for, where that bounds a text's token count
    from below: byte-level BPE without a normalizer (GPT-2, Llama 3, Qwen, SmolLM, ...), whose
    vocabulary spells each byte as one character and has no unknown token; added tokens match
    their own text. None for other tokenizers: a normalizer may drop text, an unknown token may
    stand for a whole word."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.normalizer is not None:
        return None
    if "ByteLevel" not in repr(backend.pre_tokenizer):
        return None
    added = tokenizer.get_added_vocab()
    spelled = (len(t) for t in tokenizer.get_vocab() if t not in added)
    return max([max(spelled), *(len(t.encode()) for t in added)])


class _SizedTokenizer:
    """The tokenizer, refusing a text that cannot fit the context window before tokenizing it:
    B bytes are at least B / longest tokens. A prompt of megabytes would otherwise tokenize for
    seconds (about 1 s per MB here) to be refused, and prompts behind it would wait."""

    def __init__(self, tokenizer, longest: int, max_model_len: int, param: str) -> None:
        self._tokenizer, self._longest = tokenizer, longest
        self._max_model_len, self._param = max_model_len, param

    def __call__(self, text: str, **kwargs):
        if len(text) >= self._max_model_len:  # shorter texts cannot reach the bound
            size = len(text.encode("utf-8", "surrogatepass"))
            at_least = -(-size // self._longest)
            if at_least >= self._max_model_len:
                raise InvalidRequestError(
                    f"prompt has at least {at_least} tokens ({size} bytes, at most "
                    f"{self._longest} per token); the context window is "
                    f"{self._max_model_len} tokens",
                    self._param,
                )
        return self._tokenizer(text, **kwargs)

    def __getattr__(self, name: str):  # the chat template and the rest: the tokenizer's own
        return getattr(self._tokenizer, name)


def _token_id_text(token_id: int) -> str:
    return f"token_id:{token_id}"
