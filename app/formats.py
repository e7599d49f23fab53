"""OpenAI response bodies for one request with n choices per prompt: streamed chunks, the final
body, usage.

A request's choices run as separate engine requests; their outputs arrive interleaved, each
tagged with its choice's index, and each choice keeps its own text, logprobs and finish reason.
A completions batch has several prompts: prompt i's choice j has index i * n + j (OpenAI's order).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from app.logprobs import (
    chat_logprobs,
    completion_logprobs,
    echoed_prompt_logprobs,
    joined,
    vllm_prompt_logprobs,
)
from app.reasoning_parsers import REASONING_PARSERS, count_reasoning_tokens
from app.tool_parsers import Parsed
from app.tools import AutoToolCalls, ToolCalls
from engine import RequestOutput, TokenLogprob


@dataclass(frozen=True)
class Prompt:
    """One prompt of a request: its token ids, and the text that echo puts before its choices."""

    ids: list[int]
    # echo: completions', the prompt as sent or the text of its token ids; chat's (vLLM's),
    # the assistant's last message, which the reply's content continues
    echo: str = ""


@dataclass(frozen=True)
class Shown:
    """What a body carries beside the text, as the request asked."""

    logprobs: int | None = None  # OpenAI's logprobs, with this many alternatives per token
    echo_scores: bool = False  # completions' echo with logprobs: the prompt's tokens lead
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs field, this many alternatives
    generated: bool = True  # False: completions' echo with max_tokens 0, the prompt alone
    token_ids: bool = False  # vLLM's return_token_ids: the prompt's and the output's ids


@dataclass
class _Choice:
    prompt: Prompt
    generated: bool = True  # False: the engine's one token is not shown
    text: list[str] = field(default_factory=list)
    num_tokens: list[int] = field(default_factory=list)  # how many made each piece of text
    token_ids: list[int] = field(default_factory=list)  # the output's
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # with the first output, if asked
    num_output_tokens: int = 0
    num_cached_tokens: int = 0  # of its prompt, taken from the prefix cache
    finish_reason: str | None = None
    streamed_tokens_len: int = 0  # the next chunk's first text_offset (completions)
    tool_parser: object | None = None  # tool_choice "auto", streamed: this choice's parser
    reasoning_parser: object | None = None  # a reasoning model's, streamed
    num_calls: int = 0  # tool calls streamed so far
    num_outputs: int = 0  # outputs add()ed: the first is the first chunk

    def add(self, out: RequestOutput) -> RequestOutput:
        """Keep `out`; -> it as the client sees it (nothing generated for an echo alone)."""
        if not self.generated:
            out = dataclasses.replace(
                out, new_token_ids=[], new_text="", num_output_tokens=0, logprobs=[],
                finish_reason=out.finish_reason and "length",  # max_tokens 0 reached
            )  # fmt: skip
        self.num_outputs += 1
        for text, num_tokens in out.pieces:  # per step, as the engine made them
            self.text.append(text)
            self.num_tokens.append(num_tokens)
        self.token_ids.extend(out.new_token_ids)
        self.logprobs.extend(out.logprobs or ())
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        self.num_output_tokens = out.num_output_tokens
        self.num_cached_tokens = out.num_cached_tokens or self.num_cached_tokens
        self.finish_reason = out.finish_reason or self.finish_reason
        return out


class CompletionFormat:
    object_name = "text_completion"

    def __init__(
        self,
        request_id: str,
        model: str,
        prompts: list[Prompt],
        n: int = 1,
        # token id -> how logprobs name it (TokenTexts); needed when `shown` has logprobs
        token_texts: Callable[[int], str] | None = None,
        shown: Shown = Shown(),
    ) -> None:
        self.id, self.model, self.created = request_id, model, int(time.time())
        self.num_prompt_tokens = sum(len(p.ids) for p in prompts)  # each prompt counts once
        self.choices = [_Choice(p, shown.generated) for p in prompts for _ in range(n)]
        self.n = n
        self.token_texts = token_texts
        self.shown = shown

    def add(self, index: int, out: RequestOutput) -> RequestOutput:
        """Keep a choice's output; -> it as the client sees it, for chunk()."""
        return self.choices[index].add(out)

    def _logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict | None:
        if self.shown.logprobs is None:
            return None
        return completion_logprobs(entries, self.token_texts, offset)

    def _with_prompt(self, choice: _Choice) -> tuple[dict | None, int]:
        """-> the echoed prompt's logprobs (None unless echo with logprobs) and the text offset
        of the completion's first token."""
        if not self.shown.echo_scores or choice.prompt_logprobs is None:
            return None, 0
        scores, k = choice.prompt_logprobs, self.shown.logprobs
        head = echoed_prompt_logprobs(choice.prompt.ids, scores, self.token_texts, k)
        return head, sum(len(t) for t in head["tokens"])

    def _chunk_logprobs(self, choice: _Choice, out: RequestOutput) -> dict | None:
        head = None
        if out.prompt_logprobs is not None:  # the choice's first chunk
            head, choice.streamed_tokens_len = self._with_prompt(choice)
        logprobs = self._logprobs(out.logprobs or [], choice.streamed_tokens_len)
        if logprobs is not None:
            choice.streamed_tokens_len += sum(len(t) for t in logprobs["tokens"])
        return logprobs if head is None or logprobs is None else joined(head, logprobs)

    def _final_logprobs(self, choice: _Choice) -> dict | None:
        head, offset = self._with_prompt(choice)
        logprobs = self._logprobs(choice.logprobs, offset)
        return logprobs if head is None or logprobs is None else joined(head, logprobs)

    def _vllm_prompt_logprobs(self, choice: _Choice) -> dict:
        """{"prompt_logprobs": [...]} when the request asked for vLLM's field, else {}."""
        k = self.shown.prompt_logprobs
        if k is None or choice.prompt_logprobs is None:
            return {}
        return {
            "prompt_logprobs": vllm_prompt_logprobs(choice.prompt_logprobs, self.token_texts, k)
        }

    def _token_ids(self, ids: list[int]) -> dict:
        """vLLM's return_token_ids, when asked: the output's token ids (a chunk's new ones)."""
        return {"token_ids": ids} if self.shown.token_ids else {}

    def _prompt_ids(self, prompt: Prompt, first: bool = True) -> dict:
        """vLLM's return_token_ids, when asked: the prompt's (streamed: in the first chunk)."""
        return {"prompt_token_ids": prompt.ids} if self.shown.token_ids and first else {}

    def _envelope(self, choices: list[dict], object_name: str | None = None) -> dict:
        return {
            "id": self.id,
            "object": object_name or self.object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    @property
    def usage(self) -> dict:
        """The reply's usage: the body's, and the stream's usage chunk."""
        return self.running_usage

    @property
    def running_usage(self) -> dict:
        """The token counts so far, cheap enough for every chunk (continuous_usage_stats)."""
        completion = sum(c.num_output_tokens for c in self.choices)
        usage = {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.num_prompt_tokens + completion,
        }
        # OpenAI's prompt caching field, when the prefix cache served part of a prompt; each
        # prompt counts once (by its first choice, as prompt_tokens does)
        cached = sum(c.num_cached_tokens for c in self.choices[:: self.n])
        if cached:
            usage["prompt_tokens_details"] = {"cached_tokens": cached}
        return usage

    def chunk(self, index: int, out: RequestOutput) -> dict:
        """The SSE chunk of an output already add()ed."""
        choice = self.choices[index]
        first = choice.num_outputs == 1
        return self._envelope(
            [
                {
                    "index": index,
                    "text": choice.prompt.echo + out.new_text if first else out.new_text,
                    "logprobs": self._chunk_logprobs(choice, out),
                    "finish_reason": openai_reason(out.finish_reason),
                    **self._token_ids(out.new_token_ids),
                    **self._prompt_ids(choice.prompt, first),
                }
            ]
        )

    def usage_chunk(self) -> dict:
        return {**self._envelope([]), "usage": self.usage}

    def final(self) -> dict:
        choices = [
            {
                "index": i,
                "text": c.prompt.echo + "".join(c.text),
                "logprobs": self._final_logprobs(c),
                "finish_reason": openai_reason(c.finish_reason),
                **self._vllm_prompt_logprobs(c),
                **self._token_ids(c.token_ids),
                **self._prompt_ids(c.prompt),
            }
            for i, c in enumerate(self.choices)
        ]
        return {**self._envelope(choices), "usage": self.usage}


class ChatFormat(CompletionFormat):
    object_name = "chat.completion.chunk"
    # a forced tool choice: the output is the call's arguments (or a JSON array of calls);
    # "auto": the calls are found in the output by the server's tool-call parser
    tools: ToolCalls | AutoToolCalls | None = None
    # the server's reasoning parser (app.reasoning_parsers), where the output is free text:
    # the model's thinking is split from its answer
    reasoning: str | None = None
    shows_reasoning = True  # vLLM's include_reasoning: false leaves the thinking out

    def _logprobs(self, entries: list[TokenLogprob], offset: int = 0) -> dict | None:
        return None if self.shown.logprobs is None else chat_logprobs(entries, self.token_texts)

    @property
    def usage(self) -> dict:
        usage = self.running_usage
        # as vLLM: only where a reasoning parser reads replies, and not in every chunk of a
        # stream (counting re-reads the reply so far)
        if self.reasoning is not None:
            parser = REASONING_PARSERS[self.reasoning]
            thought = sum(
                count_reasoning_tokens(parser, list(zip(c.text, c.num_tokens, strict=True)))
                for c in self.choices
            )
            usage["completion_tokens_details"] = {"reasoning_tokens": thought}
        return usage

    def _chunk_logprobs(self, choice: _Choice, out: RequestOutput) -> dict | None:
        return self._logprobs(out.logprobs or [])

    def chunk(self, index: int, out: RequestOutput) -> dict:
        choice = self.choices[index]
        first = choice.num_outputs == 1
        text, thought = self._split(choice, out)
        if self._parses_calls:
            delta = self._parsed_delta(choice, text, out.finished, first)
        elif self.tools is not None:
            delta = self._tool_delta(choice, text, first)
        elif first:  # a choice's first chunk names the role and leads with the echo
            delta = {"role": "assistant", "content": choice.prompt.echo + text}
        else:
            delta = {"content": text}
        if thought and self.shows_reasoning:  # before the answer: vLLM's and SGLang's names
            if not delta.get("content"):
                delta.pop("content", None)
            delta = {**delta, "reasoning": thought, "reasoning_content": thought}
        chunk = self._envelope(
            [
                {
                    "index": index,
                    "delta": delta,
                    "logprobs": self._chunk_logprobs(choice, out),
                    "finish_reason": self._reason(out.finish_reason, choice),
                    **self._token_ids(out.new_token_ids),
                }
            ]
        )
        return {**chunk, **self._prompt_ids(choice.prompt, first)}  # beside the choices

    def _split(self, choice: _Choice, out: RequestOutput) -> tuple[str, str]:
        """A streamed output's new text -> (the answer's part, the reasoning's part)."""
        if self.reasoning is None:
            return out.new_text, ""
        if choice.reasoning_parser is None:
            choice.reasoning_parser = REASONING_PARSERS[self.reasoning]()
        split = choice.reasoning_parser.feed(out.new_text)
        if out.finished:
            split += choice.reasoning_parser.end()
        return split.content, split.reasoning

    def _parsed_delta(self, choice: _Choice, text: str, finished: bool, first: bool) -> dict:
        """tool_choice "auto": the text as it comes, less what may be a call; each call whole
        once the parser has seen its end."""
        if choice.tool_parser is None:
            choice.tool_parser = self.tools.new_parser()
        parsed = choice.tool_parser.feed(text)
        if finished:
            parsed += choice.tool_parser.end()
        delta = {"role": "assistant"} if first else {}
        if parsed.content:
            delta["content"] = parsed.content
        calls = self._call_list(parsed, choice)
        if calls:
            delta["tool_calls"] = calls
        return delta

    def _call_list(self, parsed: Parsed, choice: _Choice) -> list[dict]:
        """Streamed calls, numbered on from those streamed before: a new call with its id and
        name, more of a call's arguments under its index alone; without parallel tool calls,
        the first call alone."""
        calls = []
        for call in parsed.calls:
            choice.num_calls += not call.continued
            index = choice.num_calls - 1
            if index and not self.tools.parallel:
                continue
            if call.continued:
                calls.append({"index": index, "function": {"arguments": call.arguments}})
            else:
                calls.append({"index": index, **ToolCalls.call(call.name, call.arguments)})
        return calls

    @property
    def _parses_calls(self) -> bool:
        """The output's calls are read by a parser: "auto"'s, or "required"'s JSON array."""
        return self.tools is not None and self.tools.parsed

    def _tool_delta(self, choice: _Choice, text: str, first: bool) -> dict:
        """A named call streams its arguments as they come, its id and name first. `text`:
        the answer's new text (a reasoning model's thinking comes before it)."""
        delta = {"role": "assistant"} if first else {}
        if not text:
            return delta
        if choice.num_calls == 0:  # the call's id, type and name, with its first arguments
            call, choice.num_calls = self.tools.call(self.tools.name, text), 1
        else:
            call = {"function": {"arguments": text}}
        return {**delta, "tool_calls": [{"index": 0, **call}]}

    def _reason(self, reason: str | None, choice: _Choice, called: bool = False) -> str | None:
        """OpenAI's finish reason: "tool_calls" where the model chose to call (a forced named
        call: "stop", as OpenAI)."""
        if isinstance(self.tools, AutoToolCalls):
            called = called or choice.num_calls > 0
            return "tool_calls" if called and reason == "stop" else openai_reason(reason)
        if self.tools is not None and reason == "stop":
            return self.tools.finish_reason
        return openai_reason(reason)

    def _message(self, choice: _Choice) -> dict:
        generated = "".join(choice.text)
        if self.reasoning is None:
            return self._answer(choice.prompt.echo + generated)
        split = REASONING_PARSERS[self.reasoning]().read(generated)
        thought = split.reasoning or None
        message = self._answer(choice.prompt.echo + split.content)
        if thought and not message["content"]:  # the reply was all thinking
            message["content"] = None
        if not self.shows_reasoning:
            return message
        return {**message, "reasoning": thought, "reasoning_content": thought}

    def _answer(self, text: str) -> dict:
        """The message of a reply's answer: its text, or its tool calls and the text beside."""
        if self._parses_calls:
            parsed = self.tools.new_parser().read(text)
            if not self.tools.parallel:  # the first call alone
                del parsed.calls[1:]
            if not parsed.calls:
                return {"role": "assistant", "content": text}
            content = parsed.content or None
            calls = [ToolCalls.call(c.name, c.arguments) for c in parsed.calls]
            return {"role": "assistant", "content": content, "tool_calls": calls}
        if self.tools is None:
            return {"role": "assistant", "content": text}
        return {"role": "assistant", "content": None, "tool_calls": self.tools.calls(text)}

    def final(self) -> dict:
        choices = []
        for i, c in enumerate(self.choices):
            message = self._message(c)
            called = bool(message.get("tool_calls"))
            choices.append({
                "index": i,
                "message": message,
                "logprobs": self._logprobs(c.logprobs),
                "finish_reason": self._reason(c.finish_reason, c, called),
                **self._token_ids(c.token_ids),
            })  # fmt: skip
        # vLLM's chat body has the one prompt's logprobs and token ids beside the choices
        body = {**self._envelope(choices, "chat.completion"), "usage": self.usage}
        first = self.choices[0]
        return {**body, **self._vllm_prompt_logprobs(first), **self._prompt_ids(first.prompt)}


def openai_reason(reason: str | None) -> str | None:
    return None if reason is None else {"abort": "stop"}.get(reason, reason)
