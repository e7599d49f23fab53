"""How the ingress turns a request into prompt token ids (no Ray; the default model's tokenizer):
the chat template's options (vLLM's add_generation_prompt, continue_final_message,
chat_template_kwargs, add_special_tokens), truncate_prompt_tokens, the default chat length, and
vLLM's /tokenize and /detokenize. Each is checked against transformers' own tokenizer."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import threading

import pytest

from app.protocol import (
    MAX_BAD_WORDS,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    parse,
)
from engine import InvalidRequestError
from engine.limits import bad_words_token_ids, chat_token_ids

pytestmark = pytest.mark.model

MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Hi"}]
CONTINUED = [*HI, {"role": "assistant", "content": "Sure, the"}]


@pytest.fixture(scope="module")
def ingress():
    from app.ingress import Ingress

    return Ingress({})  # the default app's args; no replicas are called here


@pytest.fixture
def own_tokenizer(default_model_path):
    """A tokenizer of the default model this test may change (the session's is shared)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def _prepare(ingress, body: dict, chat: bool = False, kv_capacity: int = 100_000):
    raw = json.dumps({"model": MODEL, **body}).encode()
    req = parse(raw, ChatCompletionRequest if chat else CompletionRequest)
    return ingress._prepare(req, chat, kv_capacity)


def _refused(call, *args) -> APIError:
    with pytest.raises(APIError) as e:
        call(*args)
    assert e.value.status == 400 and e.value.param, e.value.message
    return e.value


def test_an_unpaired_surrogate_escape_is_refused_naming_its_field(ingress, tokenizer):
    """json.dumps escapes what is not ASCII: an emoji as a surrogate pair, which reaches the
    tokenizer whole; half a pair is no character (the tokenizer would raise: a 500)."""
    emoji = "Hi \U0001f600"
    [prompt], _ = _prepare(ingress, {"prompt": emoji})
    assert prompt.ids == tokenizer(emoji).input_ids
    cases = (  # (body, chat, the field named)
        ({"prompt": "Hi \ud83d"}, False, "prompt"),
        ({"prompt": ["ok", "\ude00"]}, False, "prompt[1]"),
        ({"messages": [*HI, {"role": "user", "content": "\ud800"}]}, True, "messages[1].content"),
        ({"prompt": "Hi", "stop": {"\udfff": 1}}, False, "stop"),  # a key: its object's path
    )
    for body, chat, field in cases:
        error = _refused(_prepare, ingress, body, chat)
        assert error.param == field and "unpaired UTF-16 surrogate" in error.message


def test_chat_ids_equal_transformers_tokenizing_the_template(tokenizer):
    opened = {"add_generation_prompt": True}
    continued = {"add_generation_prompt": False, "continue_final_message": True}
    for messages, kwargs in ((HI, opened), (CONTINUED, continued)):
        want = tokenizer.apply_chat_template(messages, tokenize=True, **kwargs)["input_ids"]
        assert chat_token_ids(tokenizer, messages, **kwargs) == list(want)


def test_continue_final_message_leaves_the_assistants_message_open(ingress, tokenizer):
    [prompt], _ = _prepare(ingress, {"messages": CONTINUED, "continue_final_message": True}, True)
    assert tokenizer.decode(prompt.ids).endswith("<|im_start|>assistant\nSure, the")
    assert prompt.echo == ""  # echo not asked
    [echoed], _ = _prepare(
        ingress, {"messages": CONTINUED, "continue_final_message": True, "echo": True}, True
    )
    assert echoed == dataclasses.replace(prompt, echo="Sure, the")
    # without it: the message is closed and a new assistant turn opened
    [closed], _ = _prepare(ingress, {"messages": CONTINUED}, True)
    assert tokenizer.decode(closed.ids).endswith("Sure, the<|im_end|>\n<|im_start|>assistant\n")
    [unopened], _ = _prepare(ingress, {"messages": HI, "add_generation_prompt": False}, True)
    assert tokenizer.decode(unopened.ids).endswith("Hi<|im_end|>\n")
    # echo repeats only an assistant's message
    [user_last], _ = _prepare(ingress, {"messages": HI, "echo": True}, True)
    assert user_last.echo == ""
    both = {"messages": CONTINUED, "continue_final_message": True, "add_generation_prompt": True}
    error = _refused(_prepare, ingress, both, True)
    assert error.param == "continue_final_message"


def test_template_variables_reach_the_template_and_its_errors_are_400s(own_tokenizer):
    own_tokenizer.chat_template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}{% if greeting %} {{ greeting }}"
        "{% endif %}{% if fail %}{{ raise_exception('refused: ' ~ fail) }}{% endif %}"
    )
    ids = chat_token_ids(own_tokenizer, HI, template_kwargs={"greeting": "there"})
    assert ids == own_tokenizer("Hi there", add_special_tokens=False).input_ids
    with pytest.raises(InvalidRequestError, match="refused: yes") as e:
        chat_token_ids(own_tokenizer, HI, template_kwargs={"fail": "yes"})
    assert e.value.param == "messages"
    own_tokenizer.chat_template = (
        "{% for m in messages %}{{ m.content }}{% endfor %}"
        "{% for d in documents or [] %} [{{ d.title }}: {{ d.text }}]{% endfor %}"
    )
    docs = [{"title": "A", "text": "alpha"}, {"title": "B", "text": "beta"}]
    ids = chat_token_ids(own_tokenizer, HI, documents=docs)
    assert own_tokenizer.decode(ids) == "Hi [A: alpha] [B: beta]"
    # a variable that is one of apply_chat_template's own arguments
    with pytest.raises(InvalidRequestError) as e:
        chat_token_ids(own_tokenizer, HI, template_kwargs={"tokenize": True})
    assert e.value.param == "chat_template_kwargs"


def test_add_special_tokens_reaches_the_tokenizer(own_tokenizer):
    from tokenizers.processors import TemplateProcessing

    # the default model adds no BOS; give this copy one, as Llama's tokenizer has
    own_tokenizer.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    plain = own_tokenizer("Hi", add_special_tokens=False).input_ids
    assert chat_token_ids(own_tokenizer, HI)[0] != 0  # chat: the template's own tokens only
    assert chat_token_ids(own_tokenizer, HI, add_special_tokens=True)[0] == 0
    from app.prompts import PromptBuilder

    builder = PromptBuilder(own_tokenizer, len(own_tokenizer), 8192)
    for flag, want in ((True, [0, *plain]), (False, plain)):
        req = CompletionRequest(model=MODEL, prompt="Hi", add_special_tokens=flag)
        assert builder.completion("Hi", req, own_tokenizer).ids == want


def test_truncate_prompt_tokens_keeps_the_last_tokens(ingress, tokenizer):
    text = "The capital of France is"
    ids = tokenizer(text).input_ids
    [prompt], _ = _prepare(ingress, {"prompt": text, "truncate_prompt_tokens": 2, "echo": True})
    assert prompt.ids == ids[-2:] and prompt.echo == tokenizer.decode(ids[-2:])
    batch = {"prompt": [ids, tokenizer("Hi").input_ids], "truncate_prompt_tokens": 3}
    assert [p.ids for p in _prepare(ingress, batch)[0]] == [ids[-3:], tokenizer("Hi").input_ids]
    # -1: the context window's worth, which a short prompt fits whole
    [whole], _ = _prepare(ingress, {"prompt": text, "truncate_prompt_tokens": -1, "echo": True})
    assert whole.ids == ids and whole.echo == text
    chat = {"messages": CONTINUED, "echo": True, "continue_final_message": True}
    [short], _ = _prepare(ingress, {**chat, "truncate_prompt_tokens": 4}, True)
    assert short.ids == _prepare(ingress, chat, True)[0][0].ids[-4:]
    assert short.echo == "Sure, the"  # the message continued, not the tokens kept
    for keep in (0, -2, ingress.max_model_len + 1):
        error = _refused(_prepare, ingress, {"prompt": text, "truncate_prompt_tokens": keep})
        assert error.param == "truncate_prompt_tokens"


def test_chat_without_max_tokens_runs_to_the_window_or_the_cache(ingress):
    [prompt], params = _prepare(ingress, {"messages": HI}, True, kv_capacity=1000)
    assert params.max_tokens == 1000 - len(prompt.ids)
    _, params = _prepare(ingress, {"messages": HI}, True, kv_capacity=10**6)
    assert params.max_tokens == ingress.max_model_len - len(prompt.ids)
    _, params = _prepare(ingress, {"messages": HI, "skip_special_tokens": False}, True)
    assert params.skip_special_tokens is False


def test_a_completion_with_max_tokens_null_runs_to_the_window_or_the_cache(ingress):
    """OpenAI's 16 where max_tokens is left out; null sent, no limit, as vLLM reads it (a
    batch: as far as its longest prompt can go)."""
    body = {"prompt": "Once upon a time"}
    assert _prepare(ingress, body, False)[1].max_tokens == 16
    [prompt], params = _prepare(ingress, {**body, "max_tokens": None}, False, kv_capacity=1000)
    assert params.max_tokens == 1000 - len(prompt.ids)
    batch = {"prompt": ["Hi", "Once upon a time, in a land far away"], "max_tokens": None}
    prompts, params = _prepare(ingress, batch, False, kv_capacity=10**6)
    assert params.max_tokens == ingress.max_model_len - max(len(p.ids) for p in prompts)
    assert len(prompts[1].ids) > len(prompts[0].ids)
    assert _prepare(ingress, {**body, "max_tokens": 5}, False)[1].max_tokens == 5


def test_tokenize_text_and_chat_and_detokenize(ingress, tokenizer):
    def tokenize(body: dict) -> dict:
        return ingress._tokenize(json.dumps(body).encode())

    ids = tokenizer("Hello world").input_ids
    out = tokenize({"model": MODEL, "prompt": "Hello world", "return_token_strs": True})
    assert out == {
        "count": len(ids),
        "max_model_len": ingress.max_model_len,
        "tokens": ids,
        "token_strs": tokenizer.convert_ids_to_tokens(ids),
    }
    # messages: the ids a chat completion would prefill
    chat = tokenize({"messages": CONTINUED, "continue_final_message": True})
    assert chat["tokens"] == chat_token_ids(tokenizer, CONTINUED, add_generation_prompt=False,
                                             continue_final_message=True)  # fmt: skip
    assert chat["token_strs"] is None
    assert ingress._detokenize(json.dumps({"tokens": ids}).encode()) == {"prompt": "Hello world"}
    error = _refused(ingress._detokenize, b'{"tokens": [5, 49152]}')
    assert error.param == "tokens" and "[0, 49152)" in error.message
    assert _refused(ingress._tokenize, b'{"prompt": 5}').param == "prompt"
    with pytest.raises(APIError) as e:
        tokenize({"model": "gpt-4", "prompt": "Hi"})
    assert e.value.status == 404


def _http_request(path: str, body: dict):
    """A Starlette request as Serve's proxy hands it to the ingress."""
    from starlette.requests import Request

    raw = json.dumps(body).encode()

    async def receive() -> dict:
        return {"type": "http.request", "body": raw, "more_body": False}

    scope = {"type": "http", "method": "POST", "path": path, "headers": [], "query_string": b""}
    return Request(scope, receive)


def test_prompts_are_built_and_tokenized_off_the_event_loop(ingress, monkeypatch):
    """The chat template and the tokenizer run on the ingress's tokenizer thread, for
    completions, chat and /tokenize: on the event loop, a prompt of megabytes held every stream
    of the replica for as long as it tokenized (seconds; bench/ingress_stall.py)."""
    seen = []

    def on_thread(method):
        def recorded(*args):
            seen.append((method.__name__, threading.current_thread().name))
            return method(*args)

        return recorded

    for name in ("prompts", "tokenize"):
        monkeypatch.setattr(ingress.prompts, name, on_thread(getattr(ingress.prompts, name)))
    monkeypatch.setattr(ingress, "_kv_capacity", 100_000)

    async def calls() -> None:
        tokenized = await ingress._route(_http_request("/tokenize", {"prompt": "Hi"}))
        assert json.loads(tokenized.body)["count"] == 1
        for path, body in (
            ("/v1/completions", {"prompt": "Hi"}),
            ("/v1/chat/completions", {"messages": HI}),
        ):
            with pytest.raises(APIError) as e:  # no replicas here: the 503 after the prompt
                await ingress._route(_http_request(path, {"model": MODEL, **body}))
            assert e.value.status == 503

    asyncio.run(calls())
    assert [name for name, _ in seen] == ["tokenize", "prompts", "prompts"]
    assert all(thread.startswith("tokenizer") for _, thread in seen), seen


def test_no_token_stands_for_more_text_than_the_longest(tokenizer):
    """The bound behind refusing huge prompts untokenized: each token of a byte-level BPE
    stands for at most `longest` bytes, so B bytes are at least B / longest tokens. Checked on
    texts made of the longest tokens themselves, whitespace runs, special tokens and
    multi-byte characters."""
    from app.prompts import longest_token_bytes

    longest = longest_token_bytes(tokenizer)
    vocab = tokenizer.get_vocab()
    widest = sorted(vocab, key=len)[-50:]  # the tokens that spell the most bytes
    texts = [
        tokenizer.convert_tokens_to_string(widest) * 3,
        " " * 5000 + "\n" * 300 + "\t" * 1000,
        "<|im_start|>" * 400 + "<|endoftext|>" * 300,
        "北京是中国的首都。🙂🚀 ☃" * 200,
    ]
    for text in texts:
        size = len(text.encode())
        assert len(tokenizer(text).input_ids) >= -(-size // longest), text[:40]
    # the bound is tight for the widest token: one token for its own text
    assert len(tokenizer(tokenizer.convert_tokens_to_string(widest[-1:])).input_ids) == 1
    assert max(len(tokenizer.convert_tokens_to_string([t]).encode()) for t in widest) == longest


def test_a_prompt_too_big_for_the_window_is_refused_before_tokenizing(ingress, monkeypatch):
    """A prompt of more than (window - 1) x longest bytes cannot fit: a 400 at once, without
    the seconds its tokenizing would take; one byte less is tokenized (and refused by its real
    token count); with truncate_prompt_tokens any size is tokenized and cut."""
    from app.prompts import longest_token_bytes

    calls = []
    real = ingress.prompts.tokenizer

    class Spy:  # counts the tokenizer's runs
        def __call__(self, text, **kwargs):
            calls.append(len(text))
            return real(text, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(ingress.prompts, "tokenizer", Spy())
    window, longest = ingress.max_model_len, longest_token_bytes(real)
    over = "a" * ((window - 1) * longest + 1)  # at least `window` tokens
    error = _refused(_prepare, ingress, {"prompt": over})
    assert error.param == "prompt" and f"at least {window} tokens" in error.message
    chat = {"messages": [{"role": "user", "content": over}]}  # the template adds its own
    error = _refused(_prepare, ingress, chat, True)
    assert error.param == "messages" and f"at least {window + 1} tokens" in error.message
    assert calls == []
    error = _refused(_prepare, ingress, {"prompt": over[1:]})  # tokenized: its own count
    assert calls == [len(over) - 1] and f"the context window is {window}" in error.message
    assert "at least" not in error.message
    [prompt], _ = _prepare(ingress, {"prompt": over, "truncate_prompt_tokens": 10})
    assert len(prompt.ids) == 10 and calls[-1] == len(over)


def test_bad_words_are_tokenized_bare_and_after_a_space(ingress, tokenizer):
    def ids(text: str) -> tuple[int, ...]:
        return tuple(tokenizer.encode(text, add_special_tokens=False))

    want = (ids("daughter"), ids(" daughter"), ids("Elara"), ids(" Elara"))
    assert bad_words_token_ids(tokenizer, ["daughter", " Elara"]) == want
    _, params = _prepare(ingress, {"prompt": "Hi", "bad_words": ["daughter", " Elara"]})
    assert params.bad_words_token_ids == want
    for word in ("", "   "):
        error = _refused(_prepare, ingress, {"prompt": "Hi", "bad_words": [word]})
        assert error.param == "bad_words"


def test_bad_words_are_bounded_before_the_tokenizer_sees_them(ingress, monkeypatch):
    """Each bad word costs the ingress's one tokenizer thread two encodes, which every request
    behind it waits for: at most MAX_BAD_WORDS words of 256 characters are taken; more is a
    400 naming the field (or the word) and no encode at all."""
    encoded = []
    real = ingress.prompts.tokenizer

    class Spy:
        def encode(self, text, **kwargs):
            encoded.append(text)
            return real.encode(text, **kwargs)

        def __call__(self, text, **kwargs):  # the prompt's
            return real(text, **kwargs)

        def __getattr__(self, name):
            return getattr(real, name)

    monkeypatch.setattr(ingress.prompts, "tokenizer", Spy())
    most = [f"w{i}" for i in range(MAX_BAD_WORDS - 1)] + ["x" * 256]
    _, params = _prepare(ingress, {"prompt": "Hi", "bad_words": most})
    assert len(encoded) == 2 * MAX_BAD_WORDS and params.bad_words_token_ids
    encoded.clear()
    error = _refused(_prepare, ingress, {"prompt": "Hi", "bad_words": [*most, "one more"]})
    assert error.param == "bad_words" and f"at most {MAX_BAD_WORDS} items" in error.message
    error = _refused(_prepare, ingress, {"prompt": "Hi", "bad_words": ["ok", "x" * 257]})
    assert error.param == "bad_words.1" and "at most 256 characters" in error.message
    assert encoded == []


def test_return_tokens_as_token_ids_names_tokens_by_id(ingress):
    for flag, want in ((False, " Paris"), (True, "token_id:7042")):
        req = CompletionRequest(model=MODEL, prompt="Hi", return_tokens_as_token_ids=flag)
        assert ingress.prompts.texts(req)(7042) == want


def test_the_servers_chat_template_and_default_template_variables(tmp_path):
    """vLLM's --chat-template (a file, read where the config is loaded, or the text) and
    --default-chat-template-kwargs, which a request's own variables override."""
    from pydantic import ValidationError

    from app.config import AppArgs
    from app.ingress import Ingress

    template = "{% for m in messages %}<{{ m.role }}|{{ m.content }}|{{ mood }}>{% endfor %}"
    path = tmp_path / "template.jinja"
    path.write_text(template)
    assert AppArgs.model_validate({"chat_template": str(path)}).chat_template == template
    with pytest.raises(ValidationError, match="neither a file nor a Jinja template"):
        AppArgs.model_validate({"chat_template": str(tmp_path / "missing.jinja")})
    served = Ingress({"chat_template": str(path), "default_chat_template_kwargs": {"mood": "calm"}})
    tokenizer = served.prompts.tokenizer
    [prompt], _ = _prepare(served, {"messages": HI}, True)
    assert tokenizer.decode(prompt.ids) == "<user|Hi|calm>"
    [prompt], _ = _prepare(served, {"messages": HI, "chat_template_kwargs": {"mood": "glad"}}, True)
    assert tokenizer.decode(prompt.ids) == "<user|Hi|glad>"
    tokenized = served._tokenize(json.dumps({"messages": HI}).encode())
    assert tokenizer.decode(tokenized["tokens"]) == "<user|Hi|calm>"
