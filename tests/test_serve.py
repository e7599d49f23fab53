"""End to end on a private local Ray cluster and real Serve applications, over real HTTP.

The session's shared cluster and Serve instance (tests/ray_session.py); five applications side
by side (the three modes, disaggregated three times: shm, object-store and gloo KV transport),
each on its own route prefix; the disaggregated ones also carry a feature the others do not (a
Responses store, a reasoning parser, a tool-call parser), so that no more replicas start.
They serve a tiny random Llama with the default model's tokenizer (tests/conftest.py:
serve_model_path): what these tests check is the serving, the engine's text is checked against
transformers in the engine's tests, and a decode step of the default model (~80 ms on one
thread) made up most of this module's time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.ray_session import METRICS_INTERVAL_MS

pytestmark = [pytest.mark.serve, pytest.mark.model]

MODEL = "tiny-llama"  # the name the applications serve serve_model_path under
# KV caches of the default model's 128 MB (2912 tokens): 182 blocks of 16
SMALL = {"num_cpus": 0.5, "engine": {"num_threads": 1, "num_kv_blocks": 182}}
CACHING = {**SMALL, "engine": {**SMALL["engine"], "enable_prefix_caching": True}}
# speculative decoding: n-gram drafts of up to 3 tokens
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_min": 1,
    "prompt_lookup_max": 3,
}
MODES = {
    # KV over shared memory (the default); the prefill replica caches prompt prefixes; the
    # decode replica verifies n-gram drafts; the ingress keeps Responses API responses, and
    # counts requests against targets every request meets
    "disagg": {
        "mode": "disaggregated",
        "prefill": CACHING,
        "decode": {**SMALL, "engine": {**SMALL["engine"], "speculative_config": NGRAM}},
        "ingress": {"responses_store_size": 8, "max_request_body_mb": 1},
        "slo": {"ttft_ms": 600_000, "tpot_ms": 600_000},
    },
    # and a decode cache smaller than the prefill cache (1456 vs 2912 tokens)
    # whose replica sends a request's tokens once per 300 ms (stream batching); two prefill
    # replicas that cache prefixes: prompts go where their prefix went; chat replies read as
    # DeepSeek-R1's: they start inside the model's reasoning
    "disagg_os": {
        "mode": "disaggregated",
        "kv_transport": "object_store",
        "prefill": {**CACHING, "num_replicas": 2},
        "decode": {
            **SMALL,
            "engine": {**SMALL["engine"], "num_kv_blocks": 91},
            "stream_batching_interval_ms": 300,
        },
        "reasoning_parser": "deepseek_r1",
    },
    # the decode replica pulls the KV over a gloo pair from the prefill replica; tool_choice
    # "auto" served with the hermes tool-call parser; LoRA adapters (tests/conftest.py)
    "disagg_gloo": {"mode": "disaggregated", "kv_transport": "gloo", "tool_call_parser": "hermes"},
    # counted against a TPOT target no request of two tokens or more meets; LoRA adapters
    "coloc": {"mode": "colocated", "slo": {"ttft_ms": 600_000, "tpot_ms": 0.001}},
    # chunked prefill: a prompt's rows come from several steps of 8 tokens, beside decodes
    # that verify a draft model's drafts (the served model's own: every greedy one kept;
    # _args names it); served under a second name too
    "chunked": {
        "mode": "colocated",
        "served_model_name": [MODEL, "tiny-alias"],
        "colocated": {
            "engine": {
                "chunked_prefill": True,
                "max_num_batched_tokens": 8,
                "speculative_config": {"num_speculative_tokens": 3},
            }
        },
    },
}
# the apps whose chat replies are the model's answer from the first token
ANSWERING = [name for name, mode in MODES.items() if "reasoning_parser" not in mode]
# the apps that serve LoRA adapters too: colocated configured with them, disaggregated
# loading them from a directory when a request first names one
WITH_LORA = ("disagg_gloo", "coloc")


def _args(mode: dict, model: str, loras: dict | None = None) -> dict:
    args = {"model": model, "served_model_name": MODEL, "prefill": SMALL, "decode": SMALL,
            "colocated": SMALL, **mode, **(loras or {})}  # fmt: skip
    if "colocated" in mode:
        engine = {**SMALL["engine"], **mode["colocated"]["engine"]}
        if "speculative_config" in engine:  # a draft model: the served one
            engine["speculative_config"] = {**engine["speculative_config"], "model": model}
        args["colocated"] = {**SMALL, "engine": engine}
    return args


@pytest.fixture(scope="module")
def server(ray_serve, serve_model_path, serve_loras):
    from app.builder import build_app
    from tests.ray_session import deploy, undeploy

    loras = {
        "coloc": {"lora_modules": serve_loras.adapters},
        "disagg_gloo": {"lora_dir": serve_loras.dir, "allow_runtime_lora_updating": True},
    }
    apps = {
        name: (f"/{name}", build_app(_args(mode, serve_model_path, loras.get(name))))
        for name, mode in MODES.items()
    }
    deploy(apps)
    yield Server(ray_serve.url, ray_serve.metrics_url)
    undeploy(MODES)


class Server(str):
    """The HTTP base URL (a str, as the tests use it), plus the Prometheus endpoint."""

    def __new__(cls, base: str, metrics_url: str):
        obj = super().__new__(cls, base)
        obj.metrics_url = metrics_url
        return obj


def _complete(base: str, mode: str, **body) -> httpx.Response:
    payload = {"model": MODEL, "temperature": 0, **body}
    return httpx.post(f"{base}/{mode}/v1/completions", json=payload, timeout=120)


def _stream(base: str, mode: str, **body):
    payload = {"model": MODEL, "stream": True, **body}
    return httpx.stream("POST", f"{base}/{mode}/v1/completions", json=payload, timeout=120)


PROMPT = "The capital of France is"


def _each(modes, check) -> dict:
    """check(mode) for every app at once, each app's own requests still one at a time: the
    apps' replicas are their own, so every engine sees the batches it would see alone, while
    the two cores serve two apps at a time. Returns mode -> result; raises the first failure."""
    modes = list(modes)
    with ThreadPoolExecutor(len(modes)) as pool:
        futures = {mode: pool.submit(check, mode) for mode in modes}
    return {mode: future.result() for mode, future in futures.items()}


@pytest.fixture(scope="module")
def local_engine(serve_model_path, tokenizer):
    """The served model in this process: what the server's answers are compared with."""
    from engine import EngineConfig, LLMEngine

    return LLMEngine(EngineConfig(model=serve_model_path, num_kv_blocks=64), tokenizer=tokenizer)


@pytest.fixture(scope="module")
def engine_alone(local_engine):
    from engine import SamplingParams

    [out] = local_engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))
    return out


def test_greedy_output_is_identical_in_all_modes_and_to_the_engine(server, engine_alone):
    def check(mode: str) -> None:
        r = _complete(server, mode, prompt=PROMPT, max_tokens=8)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["choices"][0]["text"] == engine_alone.text, mode
        assert body["usage"] == {
            "prompt_tokens": 5,
            "completion_tokens": len(engine_alone.token_ids),
            "total_tokens": 5 + len(engine_alone.token_ids),
        }

    _each(MODES, check)


def test_sagemakers_invocations_route_serves_chat_and_completions(server, engine_alone):
    """POST /invocations (SageMaker's, as vLLM serves it): a body with `messages` is a chat
    completion and one with `prompt` a completion, answered as on their own routes; a body
    with neither is a 400 that names both."""
    url = f"{server}/disagg"
    done = httpx.post(f"{url}/invocations", timeout=120, json={
        "model": MODEL, "prompt": PROMPT, "max_tokens": 8, "temperature": 0})  # fmt: skip
    assert done.status_code == 200, done.text
    assert done.json()["object"] == "text_completion"
    assert done.json()["choices"][0]["text"] == engine_alone.text
    hi = [{"role": "user", "content": "Hi"}]
    chat = {"model": MODEL, "messages": hi, "max_tokens": 6, "temperature": 0}
    answers = [httpx.post(f"{url}{route}", json=chat, timeout=120).json()
               for route in ("/invocations", "/v1/chat/completions")]  # fmt: skip
    assert [a["object"] for a in answers] == ["chat.completion"] * 2
    assert answers[0]["choices"] == answers[1]["choices"]
    neither = httpx.post(f"{url}/invocations", json={"model": MODEL}, timeout=30)
    assert neither.status_code == 400
    assert "(messages)" in neither.json()["error"]["message"]


def test_a_second_served_name_is_the_same_model_answered_by_the_first(server, engine_alone):
    """vLLM's --served-model-name with two names: both listed, either served, responses named
    by the first (chunked serves MODEL and "tiny-alias")."""
    models = httpx.get(f"{server}/chunked/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in models] == [MODEL, "tiny-alias"]
    r = _complete(server, "chunked", model="tiny-alias", prompt=PROMPT, max_tokens=8)
    assert r.status_code == 200, r.text
    assert (r.json()["model"], r.json()["choices"][0]["text"]) == (MODEL, engine_alone.text)
    other = _complete(server, "chunked", model="tiny-other", prompt=PROMPT, max_tokens=2)
    assert other.status_code == 404
    assert f"serves {MODEL!r}, 'tiny-alias'" in other.json()["error"]["message"]


def test_a_request_naming_no_model_is_the_base_models(server, engine_alone):
    """vLLM's and Ray Serve LLM's: `model` left out, null or empty is the base model, named in
    the response by its first served name (curl users and SageMaker's /invocations send
    none)."""
    url = f"{server}/chunked"
    greedy = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    for route, body in (("/v1/completions", greedy), ("/invocations", {**greedy, "model": None})):
        r = httpx.post(f"{url}{route}", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert (r.json()["model"], r.json()["choices"][0]["text"]) == (MODEL, engine_alone.text)
    chat = {"model": "", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json={**chat, "stream": True},
                      timeout=120) as r:  # fmt: skip
        events = [line.removeprefix("data: ") for line in r.iter_lines() if line]
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert {json.loads(e)["model"] for e in events[:-1]} == {MODEL}
    made = httpx.post(f"{url}/v1/responses", json={"input": "Hi", "max_output_tokens": 3},
                      timeout=120)  # fmt: skip
    assert made.status_code == 200 and made.json()["model"] == MODEL, made.text
    assert httpx.post(f"{url}/tokenize", json={"prompt": PROMPT}, timeout=30).json()["count"] == 5


def test_stream_batching_sends_the_engines_tokens_in_fewer_chunks(server, local_engine):
    """disagg_os's decode replica joins a request's tokens per 300 ms: the stream carries the
    engine's text and token ids, in fewer chunks than tokens, and its usage counts them all."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    [expected] = local_engine.generate([PROMPT], params)
    body = {"prompt": PROMPT, "max_tokens": 24, "ignore_eos": True, "temperature": 0}
    with _stream(server, "disagg_os", return_token_ids=True, stream_options={
        "include_usage": True}, **body) as s:  # fmt: skip
        lines = [x for x in s.iter_lines() if x][:-1]  # the last: [DONE]
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines]
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert "".join(c["text"] for c in choices) == expected.text
    assert [t for c in choices for t in c.get("token_ids") or []] == expected.token_ids
    assert 2 <= len(choices) < len(expected.token_ids)
    assert chunks[-1]["usage"]["completion_tokens"] == 24


def test_speculative_decoding_keeps_the_engines_tokens(server, local_engine, tokenizer):
    """The decode replica of `disagg` verifies n-gram drafts, the chunked colocated replica a
    draft model's: greedy, streamed and not, gives the engine's tokens alone, in fewer steps
    than tokens (several tokens in a chunk), and the replicas kept drafts."""
    from engine import SamplingParams

    [one] = tokenizer("1").input_ids
    prompt = [one] * 12
    # n-gram drafts are kept where the output repeats the prompt: a random model's does where
    # the request allows that one token alone
    allowed = {"disagg": {"allowed_token_ids": [one]}, "chunked": {}}
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    expected = {
        mode: local_engine.generate([prompt], dataclasses.replace(params, **fields))[0]
        for mode, fields in allowed.items()
    }

    def check(mode: str) -> None:
        body = {"prompt": prompt, "max_tokens": 24, "ignore_eos": True, "temperature": 0}
        body |= allowed[mode]
        want = expected[mode]
        r = _complete(server, mode, return_token_ids=True, **body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == want.token_ids, mode
        with _stream(server, mode, **body) as s:
            lines = [x for x in s.iter_lines() if x][:-1]  # the last: [DONE]
        chunks = [json.loads(x.removeprefix("data: ")) for x in lines]
        texts = [c["choices"][0]["text"] for c in chunks if c["choices"]]
        assert "".join(texts) == want.text, mode
        assert len(texts) < len(want.token_ids), mode  # several tokens a chunk
        stats = _replica_stats(mode)[-1]  # the decode or colocated replica's
        assert stats["num_accepted_tokens"] > 0, stats

    _each(("disagg", "chunked"), check)


def test_penalties_and_logit_bias_reach_the_engine_in_all_modes(
    server, engine_alone, local_engine, tokenizer
):
    from engine import SamplingParams

    fields = {
        "frequency_penalty": 1.5, "presence_penalty": 0.5, "repetition_penalty": 1.2,
        "min_tokens": 8,
    }  # fmt: skip
    bias = tokenizer(" Lyon").input_ids[0]
    params = SamplingParams(max_tokens=8, temperature=0, logit_bias=((bias, 6.0),), **fields)
    [expected] = local_engine.generate([PROMPT], params)
    assert expected.text != engine_alone.text  # the fields change the greedy output

    def check(mode: str) -> None:  # disaggregated: both sides apply them, across the hand-off
        r = _complete(server, mode, prompt=PROMPT, max_tokens=8, logit_bias={bias: 6}, **fields)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == expected.text, mode

    _each(MODES, check)


def test_vllm_token_constraints_reach_the_engine(server, engine_alone, local_engine, tokenizer):
    """vLLM's bad_words and allowed_token_ids, on both sides of the hand-off, equal to the engine
    alone; return_tokens_as_token_ids names the logprobs' tokens by id."""
    from engine import SamplingParams
    from engine.limits import bad_words_token_ids

    first = engine_alone.token_ids[0]  # the greedy output's first word: banned, or not allowed
    allowed = sorted({*engine_alone.token_ids, *tokenizer(" Lyon").input_ids} - {first})
    greedy = SamplingParams(max_tokens=8, temperature=0)
    word = tokenizer.decode([first]).strip()
    banned = bad_words_token_ids(tokenizer, [word])
    cases = (  # (HTTP fields, the engine's)
        ({"bad_words": [word]}, {"bad_words_token_ids": banned}),
        ({"allowed_token_ids": allowed}, {"allowed_token_ids": tuple(allowed)}),
    )
    wants = [
        local_engine.generate([PROMPT], dataclasses.replace(greedy, **params))[0]
        for _, params in cases
    ]
    for want in wants:
        assert want.text != engine_alone.text and first not in want.token_ids

    def check(mode: str) -> None:
        for (fields, _), want in zip(cases, wants, strict=True):
            r = _complete(server, mode, prompt=PROMPT, max_tokens=8, **fields)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["text"] == want.text, (mode, fields)

    _each(("disagg", "chunked"), check)
    r = _complete(server, "disagg", prompt=PROMPT, max_tokens=3, logprobs=1,
                  return_tokens_as_token_ids=True)  # fmt: skip
    logprobs = r.json()["choices"][0]["logprobs"]
    assert logprobs["tokens"] == [f"token_id:{t}" for t in engine_alone.token_ids[:3]]
    assert all(k.startswith("token_id:") for top in logprobs["top_logprobs"] for k in top)


def test_structured_outputs_in_all_modes_equal_the_engine_alone(server, local_engine, tokenizer):
    """OpenAI's response_format through the official client (chat, streamed and not) and
    vLLM's structured_outputs and guided_choice (completions): the engine alone's constrained
    output in every mode, across the hand-off. The model is random: its JSON is bounded
    (strings, numbers) and without whitespace (vLLM's disable_any_whitespace), which it would
    otherwise write past any max_tokens."""
    import openai

    from engine import SamplingParams
    from engine.limits import chat_token_ids
    from engine.sampling_params import StructuredOutput

    schema = {
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 24},
            "population": {"type": "integer", "maximum": 10**9},
        },
        "required": ["city", "population"],
        "additionalProperties": False,
    }
    compact = {"structured_outputs": {"disable_any_whitespace": True}}
    messages = [{"role": "user", "content": "Name a big city and its population, as JSON."}]
    chat_ids = chat_token_ids(tokenizer, messages)
    greedy = SamplingParams(max_tokens=40, temperature=0)

    def alone(prompt, kind: str, spec: str) -> str:
        structure = StructuredOutput(kind, spec, any_whitespace=False)
        [out] = local_engine.generate(
            [prompt], dataclasses.replace(greedy, structured_output=structure)
        )
        assert out.finish_reason == "stop"
        return out.text

    want_json = alone(chat_ids, "json", json.dumps(schema))
    assert set(json.loads(want_json)) == {"city", "population"}
    city = r" [A-Z][a-z]{1,12}, [A-Z][a-z]{1,12}\."
    want_regex = alone(PROMPT, "regex", city)
    want_choice = alone(PROMPT, "choice", json.dumps(["Lyon", "Marseille"]))
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    # every app; chat whole in one disaggregated and one colocated app, streamed in the others
    # (each way across a hand-off and in one replica)
    streams = dict(zip(ANSWERING, (False, True, False, True), strict=True))

    def check(mode: str) -> None:
        stream = streams[mode]
        client = openai.OpenAI(base_url=f"{server}/{mode}/v1", api_key="unused")
        chat = client.chat.completions.create(
            model=MODEL, messages=messages, temperature=0, max_tokens=40,
            response_format=fmt, stream=stream, extra_body=compact,
        )  # fmt: skip
        if stream:
            assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == want_json
        else:
            assert chat.choices[0].message.content == want_json, mode
            assert chat.choices[0].finish_reason == "stop"
        r = _complete(
            server, mode, prompt=PROMPT, max_tokens=40, structured_outputs={"regex": city}
        )
        assert r.json()["choices"][0]["text"] == want_regex, (mode, r.text)
        r = _complete(
            server, mode, prompt=PROMPT, max_tokens=40, guided_choice=["Lyon", "Marseille"]
        )
        assert r.json()["choices"][0]["text"] == want_choice, (mode, r.text)

    _each(ANSWERING, check)
    # vLLM's structural tag: free text up to the trigger, then its structure (across the
    # hand-off), then free text to max_tokens, as the engine alone writes it; chat's
    # response_format form too. The triggers: the first word of each greedy output
    place = {
        "type": "object",
        "properties": {"country": {"type": "string", "maxLength": 12}},
        "required": ["country"],
        "additionalProperties": False,
    }
    question = [{"role": "user", "content": "Hi!"}]
    prompts = [PROMPT, chat_token_ids(tokenizer, question)]
    firsts = local_engine.generate(prompts, dataclasses.replace(greedy, max_tokens=1))
    triggers = [first.text for first in firsts]
    tags = {
        "structures": [{"begin": word, "schema": place, "end": "."} for word in triggers],
        "triggers": triggers,
    }
    tagged = StructuredOutput("structural_tag", json.dumps(tags), any_whitespace=False)
    want_tags, want_chat_tags = local_engine.generate(
        prompts, dataclasses.replace(greedy, max_tokens=32, structured_output=tagged)
    )
    for want, word in zip((want_tags, want_chat_tags), triggers, strict=True):
        # each wrote the trigger, a structure, free text
        _, end = json.JSONDecoder().raw_decode(rest := want.text.partition(word)[2].lstrip())
        assert rest[end] == "." and rest[end + 1 :], want.text
    tag_fields = {"structural_tag": json.dumps(tags), "disable_any_whitespace": True}

    def tagged_check(mode: str) -> None:
        r = _complete(server, mode, prompt=PROMPT, max_tokens=32, structured_outputs=tag_fields)
        assert r.json()["choices"][0]["text"] == want_tags.text, (mode, r.text)

    _each(("disagg", "chunked"), tagged_check)
    client = openai.OpenAI(base_url=f"{server}/disagg/v1", api_key="unused")
    chat = client.chat.completions.create(
        model=MODEL, messages=question, temperature=0, max_tokens=32,
        response_format={"type": "structural_tag", **tags}, extra_body=compact,
    )  # fmt: skip
    assert chat.choices[0].message.content == want_chat_tags.text
    # vLLM's guided_whitespace_pattern: the JSON's whitespace, as the engine alone has it
    spaced = StructuredOutput("json", json.dumps(schema), whitespace_pattern="[ ]?")
    [want] = local_engine.generate([PROMPT], dataclasses.replace(greedy, structured_output=spaced))
    r = _complete(server, "disagg", prompt=PROMPT, max_tokens=40, guided_json=schema,
                  guided_whitespace_pattern="[ ]?")  # fmt: skip
    assert r.json()["choices"][0]["text"] == want.text and "\n" not in want.text, r.text
    # a parser that gives up at the second token: a 400, or once streaming has begun (here in
    # the decode replica, after the hand-off), an error event and the end of the stream
    # (vLLM's); each in one app, as the parser takes over a second to give up
    huge = "start: /[0-9]/ /a{1000000}/"
    r = _complete(server, "chunked", prompt=PROMPT, guided_grammar=huge)
    assert r.status_code == 400 and r.json()["error"]["param"] == "guided_grammar", r.text
    assert r.json()["error"]["message"].startswith("the grammar constraint failed at output")
    with _stream(server, "disagg", prompt=PROMPT, temperature=0, guided_grammar=huge) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200
    first, error = (json.loads(line.removeprefix("data: ")) for line in lines[:2])
    assert first["choices"][0]["text"].isdigit()
    assert error["error"]["message"].startswith("the grammar constraint failed at output")
    assert "token 2: lexer error" in error["error"]["message"]
    assert lines[2:] == ["data: [DONE]"]
    served = _each(MODES, lambda mode: _complete(server, mode, prompt=PROMPT, max_tokens=2))
    assert all(r.status_code == 200 for r in served.values())  # every replica serves on


def test_forced_tool_calls_through_the_official_client(server, local_engine, tokenizer):
    """A named tool_choice's arguments equal the engine alone's output under that function's
    schema (the prompt rendered with the tools), streamed and not; "required" gives parsed
    calls; "auto" is a 400."""
    import openai

    from engine import SamplingParams
    from engine.limits import chat_token_ids
    from engine.sampling_params import StructuredOutput
    from tests.test_tools import ASK, CLOCK, NAMED, WEATHER

    tools = [WEATHER, CLOCK]
    ids = chat_token_ids(tokenizer, ASK, tools=tools)
    schema = json.dumps(WEATHER["function"]["parameters"])
    structure = StructuredOutput("json", schema, any_whitespace=False)
    params = SamplingParams(max_tokens=60, temperature=0, structured_output=structure)
    [want] = local_engine.generate([ids], params)
    fields = {"model": MODEL, "messages": ASK, "tools": tools}
    fields |= {"temperature": 0, "max_tokens": 60}

    def check(mode: str) -> None:
        client = openai.OpenAI(base_url=f"{server}/{mode}/v1", api_key="unused")
        chat = client.chat.completions.create(**fields, tool_choice=NAMED)
        [call] = chat.choices[0].message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_weather", want.text), mode
        assert chat.choices[0].finish_reason == "stop"
        stream = client.chat.completions.create(**fields, tool_choice=NAMED, stream=True)
        calls = [c.choices[0].delta.tool_calls[0] for c in stream if c.choices[0].delta.tool_calls]
        assert calls[0].function.name == "get_weather" and calls[0].id.startswith("chatcmpl-tool")
        assert "".join(c.function.arguments for c in calls) == want.text
        chat = client.chat.completions.create(**fields, tool_choice="required")
        assert chat.choices[0].finish_reason == "tool_calls"
        required = chat.choices[0].message.tool_calls
        for call in required:
            assert call.function.name in ("get_weather", "get_time")
            assert isinstance(json.loads(call.function.arguments), dict)
        # streamed, each call's id and name come first, then its arguments in pieces
        stream = client.chat.completions.create(**fields, tool_choice="required", stream=True)
        pieces = [p for c in stream for p in c.choices[0].delta.tool_calls or ()]
        joined = [
            "".join(p.function.arguments or "" for p in pieces if p.index == i)
            for i in range(len(required))
        ]
        assert [p.function.name for p in pieces if p.id] == [c.function.name for c in required]
        assert joined == [c.function.arguments for c in required] and len(pieces) > 2 * len(joined)
        with pytest.raises(openai.BadRequestError, match="parser"):
            client.chat.completions.create(**fields)  # tools alone mean "auto"

    _each(("disagg", "coloc"), check)


def test_return_token_ids_through_the_official_client(server, tokenizer):
    """vLLM's return_token_ids: the prompt's ids are the tokenizer's (chat: through its
    template), the output's decode to the text and count as its usage; streamed, the prompt's
    come in the first chunk and the chunks' new ids join to the same output ids. Not asked,
    the body has neither."""
    import openai

    from engine.limits import chat_token_ids

    client = openai.OpenAI(base_url=f"{server}/disagg/v1", api_key="unused")
    fields = {"model": MODEL, "temperature": 0, "max_tokens": 8}
    asked = {**fields, "extra_body": {"return_token_ids": True}}
    prompt, messages = "The capital of France is", [{"role": "user", "content": "Hi!"}]
    done = client.completions.create(prompt=prompt, **asked)
    [choice] = done.choices
    assert choice.prompt_token_ids == tokenizer(prompt).input_ids
    assert tokenizer.decode(choice.token_ids, skip_special_tokens=True) == choice.text
    assert len(choice.token_ids) == done.usage.completion_tokens
    chunks = list(client.completions.create(prompt=prompt, stream=True, **asked))
    prompts = [getattr(c.choices[0], "prompt_token_ids", None) for c in chunks if c.choices]
    assert prompts[0] == choice.prompt_token_ids and not any(prompts[1:])
    assert [i for c in chunks if c.choices for i in c.choices[0].token_ids] == choice.token_ids
    chat = client.chat.completions.create(messages=messages, **asked)
    assert chat.prompt_token_ids == chat_token_ids(tokenizer, messages)
    [choice] = chat.choices
    assert tokenizer.decode(choice.token_ids, skip_special_tokens=True) == choice.message.content
    chunks = list(client.chat.completions.create(messages=messages, stream=True, **asked))
    prompts = [getattr(c, "prompt_token_ids", None) for c in chunks]
    assert prompts[0] == chat.prompt_token_ids and not any(prompts[1:])
    assert [i for c in chunks if c.choices for i in c.choices[0].token_ids] == choice.token_ids
    plain = client.chat.completions.create(messages=messages, **fields)
    assert "prompt_token_ids" not in (plain.model_extra or {})
    assert "token_ids" not in (plain.choices[0].model_extra or {})


def test_auto_tool_calls_through_the_official_client(server):
    """With a tool-call parser (the gloo app: hermes), tools alone mean "auto": a call the model
    writes (made to, by a regex over the exact text) comes back as tool_calls, streamed and
    not, the text before it as content; a reply without a call is plain text."""
    import openai

    from tests.test_tools import ARGS, ASK, CLOCK, HERMES_CALL, WEATHER

    client = openai.OpenAI(base_url=f"{server}/disagg_gloo/v1", api_key="unused")
    fields = {"model": MODEL, "messages": ASK, "tools": [WEATHER, CLOCK]}
    fields |= {"temperature": 0, "max_tokens": 80}
    written = {"structured_outputs": {"regex": re.escape("One moment.\n" + HERMES_CALL)}}
    chat = client.chat.completions.create(**fields, extra_body=written)
    [choice] = chat.choices
    [call] = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", ARGS)
    assert choice.message.content == "One moment.\n" and choice.finish_reason == "tool_calls"
    stream = client.chat.completions.create(**fields, extra_body=written, stream=True)
    content, calls, reasons = "", [], []
    for chunk in stream:
        delta = chunk.choices[0].delta
        content += delta.content or ""
        calls += delta.tool_calls or []
        reasons.append(chunk.choices[0].finish_reason)
    assert content == "One moment.\n" and reasons[-1] == "tool_calls"
    # the arguments stream as the model writes them, after the call's id and name
    assert {c.index for c in calls} == {0} and len(calls) > 2
    assert calls[0].id and calls[0].function.name == "get_weather"
    assert all(c.id is None and c.function.name is None for c in calls[1:])
    assert "".join(c.function.arguments for c in calls) == call.function.arguments
    plain = {"structured_outputs": {"regex": "It is sunny\\."}}
    chat = client.chat.completions.create(**fields, tool_choice="auto", extra_body=plain)
    assert (
        chat.choices[0].message.content == "It is sunny." and not chat.choices[0].message.tool_calls
    )
    assert chat.choices[0].finish_reason == "stop"


def test_prefix_caching_on_the_prefill_replica(server, local_engine, tokenizer):
    """The disaggregated app's prefill replica caches prompt prefixes: a long prompt sent twice
    is mostly taken from the cache the second time (its stats), and both answers equal the
    engine alone's without a cache."""
    from ray import serve

    from engine import SamplingParams

    prompt = "Once upon a time, in a small village by the sea, there lived an old fisherman. " * 3
    [want] = local_engine.generate([prompt], SamplingParams(max_tokens=6, temperature=0))
    prefill = serve.get_deployment_handle("PrefillServer", app_name="disagg")
    before = prefill.stats.remote().result()["num_cached_tokens"]
    usages = []
    for _ in range(2):
        r = _complete(server, "disagg", prompt=prompt, max_tokens=6)
        assert r.json()["choices"][0]["text"] == want.text, r.text
        usages.append(r.json()["usage"])
    cached = prefill.stats.remote().result()["num_cached_tokens"] - before
    n = len(tokenizer(prompt).input_ids)
    assert cached >= (n - 1) // 16 * 16  # the second time: every full block before the last token
    # OpenAI's usage field: absent the first time, the cached tokens the second
    assert "prompt_tokens_details" not in usages[0]
    assert usages[1]["prompt_tokens_details"] == {"cached_tokens": (n - 1) // 16 * 16}
    # vLLM's cache_salt: another tenant's salt misses the cache, then hits its own copy
    for _ in range(2):
        r = _complete(server, "disagg", prompt=prompt, max_tokens=6, cache_salt="tenant-2")
        assert r.json()["choices"][0]["text"] == want.text, r.text
        usages.append(r.json()["usage"])
    assert "prompt_tokens_details" not in usages[2]
    assert usages[3]["prompt_tokens_details"] == usages[1]["prompt_tokens_details"]


def test_prompts_sharing_a_prefix_go_to_the_replica_that_cached_it(server, tokenizer):
    """disagg_os has two prefill replicas that cache prefixes: after the first, every prompt
    sharing its long prefix finds it cached (usage's cached_tokens), where Serve's default
    choice (the less loaded of the two, both idle here) would do so for all five in 1 run of
    32. Prompts of another prefix still find a cache (theirs)."""

    def ask(system: str, k: int) -> dict:
        prompt = f"{system}Question {k}: what is {k} plus {k}?"
        r = _complete(server, "disagg_os", prompt=prompt, max_tokens=2)
        assert r.status_code == 200, r.text
        return r.json()["usage"]

    for system in ("You are a careful assistant. Answer in one short sentence. " * 6,
                   "Reply as a pirate would, in rhyme, and never say no. " * 6):  # fmt: skip
        ids = [tokenizer(f"{system}Question {k}: what is {k} plus {k}?").input_ids for k in (0, 1)]
        shared = next(i for i, (a, b) in enumerate(zip(*ids, strict=False)) if a != b)
        usages = [ask(system, k) for k in range(6)]
        assert "prompt_tokens_details" not in usages[0]
        cached = [u.get("prompt_tokens_details", {}).get("cached_tokens") for u in usages[1:]]
        assert cached == [shared // 16 * 16] * 5, cached


def test_streamed_equals_non_streamed_and_ends_with_done(server, engine_alone):
    def check(mode: str) -> None:
        with _stream(
            server,
            mode,
            prompt=PROMPT,
            max_tokens=8,
            temperature=0,
            stream_options={"include_usage": True},
        ) as r:
            assert r.status_code == 200
            lines = [line for line in r.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        text = "".join(c["choices"][0]["text"] for c in chunks if c["choices"])
        assert text == engine_alone.text
        assert chunks[-1]["usage"]["completion_tokens"] == len(engine_alone.token_ids)
        assert "usage" not in chunks[0]

    _each(MODES, check)


def test_vllm_stream_and_stop_extras(server, engine_alone):
    """continuous_usage_stats: every chunk carries the usage so far; include_stop_str_in_output
    keeps the stop string in the text."""
    usage = {"include_usage": True, "continuous_usage_stats": True}
    with _stream(
        server, "disagg", prompt=PROMPT, max_tokens=8, temperature=0, stream_options=usage
    ) as r:
        lines = [x for x in r.iter_lines() if x][:-1]  # the last: [DONE]
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines]
    counts = [c["usage"]["completion_tokens"] for c in chunks]
    assert counts == sorted(counts) and counts[0] == 1
    assert counts[-1] == counts[-2] == len(engine_alone.token_ids)  # the last: the usage chunk
    assert all(c["usage"]["prompt_tokens"] == 5 for c in chunks)
    stop = engine_alone.text[3:6]
    head = engine_alone.text[: engine_alone.text.index(stop)]
    for keep, want in ((True, head + stop), (False, head)):
        r = _complete(
            server,
            "disagg",
            prompt=PROMPT,
            max_tokens=8,
            stop=stop,
            include_stop_str_in_output=keep,
        )
        assert (
            r.json()["choices"][0]["text"] == want
            and r.json()["choices"][0]["finish_reason"] == "stop"
        )


def test_logprobs_in_all_modes_equal_the_engine_alone(server, local_engine, tokenizer):
    from engine import SamplingParams

    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3)
    [want] = local_engine.generate([PROMPT], params)
    texts = [tokenizer.decode([t]) for t in want.token_ids]

    # disaggregated: the first token's from prefill, the rest from decode
    def check(mode: str) -> dict:
        r = _complete(server, mode, prompt=PROMPT, max_tokens=6, logprobs=3)
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0]["logprobs"]
        assert got["tokens"] == texts, mode
        assert got["token_logprobs"] == pytest.approx([e.logprob for e in want.logprobs], abs=1e-3)
        for top, e in zip(got["top_logprobs"], want.logprobs, strict=True):
            assert list(top) == [tokenizer.decode([i]) for i, _ in e.top]  # greedy: in the top
            assert list(top.values()) == pytest.approx([lp for _, lp in e.top], abs=1e-3)
        assert got["text_offset"] == [sum(map(len, texts[:i])) for i in range(len(texts))]
        return got

    got = _each(MODES, check)["disagg"]
    # streamed: each chunk carries its own tokens' logprobs, offsets continuing
    with _stream(server, "disagg", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    streamed = [c["choices"][0]["logprobs"] for c in chunks]
    assert sum((lp["tokens"] for lp in streamed), []) == got["tokens"]
    assert sum((lp["text_offset"] for lp in streamed), []) == got["text_offset"]
    # without the field, none
    assert (
        _complete(server, "disagg", prompt=PROMPT, max_tokens=2).json()["choices"][0]["logprobs"]
        is None
    )


def test_echo_with_logprobs_scores_the_prompt_in_all_modes(server, local_engine, tokenizer):
    """What evaluation harnesses send (echo, logprobs, max_tokens 1): the prompt's tokens lead
    the logprobs, the first with null, as the engine alone scores them."""
    from engine import SamplingParams

    params = SamplingParams(max_tokens=2, temperature=0, logprobs=2, prompt_logprobs=2)
    [want] = local_engine.generate([PROMPT], params)
    ids = tokenizer(PROMPT).input_ids
    texts = [tokenizer.decode([t]) for t in ids + want.token_ids]
    scores = [None] + [e.logprob for e in want.prompt_logprobs[1:] + want.logprobs]

    def check(mode: str) -> dict:  # chunked: the prompt's rows come from several steps
        r = _complete(server, mode, prompt=PROMPT, max_tokens=2, logprobs=2, echo=True)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        assert choice["text"] == PROMPT + want.text
        got = choice["logprobs"]
        assert got["tokens"] == texts, mode
        assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
        assert got["token_logprobs"][1:] == pytest.approx(scores[1:], abs=1e-3), mode
        assert got["text_offset"] == [sum(map(len, texts[:i])) for i in range(len(texts))]
        # each prompt token's top 2, and the token itself when it is not among them
        prompt_tops = got["top_logprobs"][1 : len(ids)]
        for top, e in zip(prompt_tops, want.prompt_logprobs[1:], strict=True):
            assert set(top) == {tokenizer.decode([i]) for i in [*dict(e.top), e.token_id]}
        assert r.json()["usage"]["prompt_tokens"] == len(ids)
        return got

    got = _each(MODES, check)["disagg"]
    # streamed: the first chunk leads with the prompt's, offsets continue across chunks
    body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0, "logprobs": 2, "echo": True}
    with _stream(server, "disagg", **body) as r:
        lines = [x for x in r.iter_lines() if x][:-1]
    streamed = [json.loads(x.removeprefix("data: "))["choices"][0]["logprobs"] for x in lines]
    assert sum((lp["tokens"] for lp in streamed), []) == got["tokens"]
    assert sum((lp["text_offset"] for lp in streamed), []) == got["text_offset"]


def _assert_vllm_prompt_logprobs(got: list, ids: list[int], want: list) -> None:
    """vLLM's prompt_logprobs body: None first, then per token {id: logprob, rank, text} for
    the token and the engine's top k."""
    assert got[0] is None and len(got) == len(ids)
    for entry, token, w in zip(got[1:], ids[1:], want[1:], strict=True):
        assert set(entry) == {str(token), *(str(i) for i, _ in w.top)}
        mine = entry[str(token)]
        assert mine["logprob"] == pytest.approx(w.logprob, abs=1e-3)
        # the tail of the vocabulary is dense: a far rank may move with rounding
        assert abs(mine["rank"] - w.rank) <= max(0, w.rank // 100)


def test_vllm_prompt_logprobs_field_and_echo_alone(server, local_engine, tokenizer):
    """vLLM's prompt_logprobs field (completions: per choice; chat: beside the choices), and
    echo with max_tokens 0: the prompt and its scores alone."""
    from engine import SamplingParams
    from engine.limits import chat_token_ids

    params = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
    ids = tokenizer(PROMPT).input_ids
    messages = [{"role": "user", "content": "Hi"}]
    chat_ids = chat_token_ids(tokenizer, messages)
    want, want_chat = local_engine.generate([ids, chat_ids], params)
    r = _complete(server, "disagg", prompt=PROMPT, max_tokens=2, prompt_logprobs=2)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["logprobs"] is None  # no logprobs lists were asked
    _assert_vllm_prompt_logprobs(
        r.json()["choices"][0]["prompt_logprobs"], ids, want.prompt_logprobs
    )
    chat = {"model": MODEL, "messages": messages, "max_tokens": 2}
    r = httpx.post(
        f"{server}/chunked/v1/chat/completions", json={**chat, "prompt_logprobs": 2}, timeout=60
    )
    assert r.status_code == 200, r.text
    _assert_vllm_prompt_logprobs(r.json()["prompt_logprobs"], chat_ids, want_chat.prompt_logprobs)
    for mode in ("disagg", "coloc"):
        r = _complete(server, mode, prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
        assert r.status_code == 200, r.text
        [choice] = r.json()["choices"]
        assert choice["text"] == PROMPT and choice["finish_reason"] == "length"
        assert choice["logprobs"]["tokens"] == [tokenizer.decode([t]) for t in ids]
        scores = [e.logprob for e in want.prompt_logprobs[1:]]
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx(scores, abs=1e-3)
        assert r.json()["usage"]["completion_tokens"] == 0
    with _stream(server, "disagg", prompt=PROMPT, max_tokens=0, echo=True) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]" and len(lines) == 2
    assert json.loads(lines[0].removeprefix("data: "))["choices"][0]["text"] == PROMPT


def test_vllm_prompt_options_and_tokenize(server, local_engine, tokenizer):
    """vLLM's continue_final_message with chat echo, truncate_prompt_tokens,
    skip_special_tokens (across the hand-off) and /tokenize, /detokenize, against the engine
    alone on the same ids."""
    from engine import SamplingParams
    from engine.limits import chat_token_ids

    model = MODEL
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Sure, the"}]
    continued = chat_token_ids(
        tokenizer, messages, add_generation_prompt=False, continue_final_message=True
    )
    r = httpx.post(
        f"{server}/disagg/tokenize",
        json={"model": model, "messages": messages, "continue_final_message": True},
    )
    assert r.status_code == 200 and r.json()["tokens"] == continued, r.text
    r = httpx.post(f"{server}/disagg/detokenize", json={"model": model, "tokens": continued[-3:]})
    assert r.json() == {"prompt": tokenizer.decode(continued[-3:])}
    ids = tokenizer(PROMPT).input_ids
    greedy = SamplingParams(max_tokens=6, temperature=0)
    want_chat, want_short = local_engine.generate([continued, ids[-3:]], greedy)
    for mode in ("disagg", "coloc"):
        chat = {"model": model, "messages": messages, "max_tokens": 6, "temperature": 0}
        r = httpx.post(
            f"{server}/{mode}/v1/chat/completions",
            json={**chat, "continue_final_message": True, "echo": True},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == "Sure, the" + want_chat.text
        r = _complete(
            server, mode, prompt=PROMPT, max_tokens=6, truncate_prompt_tokens=3, echo=True
        )
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == tokenizer.decode(ids[-3:]) + want_short.text
        assert r.json()["usage"]["prompt_tokens"] == 3
    # the end-of-turn token written out (a random model writes it where a logit bias makes it
    # likelier): the decode replica detokenizes with the request's flag
    question = [{"role": "user", "content": "What is the capital of France?"}]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    raw = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, skip_special_tokens=False,
                         logit_bias=((end, 6.0),))  # fmt: skip
    [want_raw] = local_engine.generate([chat_token_ids(tokenizer, question)], raw)
    assert "<|im_end|>" in want_raw.text and want_raw.text != "<|im_end|>" * 12
    body = {"model": model, "messages": question, "max_tokens": 12, "temperature": 0}
    r = httpx.post(
        f"{server}/disagg/v1/chat/completions",
        json={**body, "ignore_eos": True, "skip_special_tokens": False, "logit_bias": {end: 6}},
        timeout=60,
    )
    assert r.json()["choices"][0]["message"]["content"] == want_raw.text, r.text
    bad = (
        ({"continue_final_message": True, "add_generation_prompt": True}, "continue_final_message"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),
        ({"chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs"),
    )
    for fields, param in bad:
        r = httpx.post(f"{server}/disagg/v1/chat/completions", json={**body, **fields}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize(
    ("fields", "needle"),
    [({"top_logprobs": 2}, "requires logprobs"), ({"logprobs": True, "top_logprobs": 21}, "20")],
)
def test_chat_top_logprobs_out_of_range_or_without_logprobs_is_refused(server, fields, needle):
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        **fields,
    }
    r = httpx.post(f"{server}/disagg/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs", r.text
    assert needle in r.json()["error"]["message"]


def test_n_choices_in_all_modes(server, engine_alone):
    n_out = len(engine_alone.token_ids)

    def check(mode: str) -> None:  # greedy: every choice is the engine's output
        r = _complete(server, mode, prompt=PROMPT, max_tokens=8, n=3)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [c["index"] for c in body["choices"]] == [0, 1, 2]
        assert [c["text"] for c in body["choices"]] == [engine_alone.text] * 3, mode
        assert body["usage"] == {
            "prompt_tokens": 5, "completion_tokens": 3 * n_out, "total_tokens": 5 + 3 * n_out
        }  # fmt: skip

    _each(MODES, check)
    # seeded: choice i draws from seed + i, so the choices differ and a repeat gives them again
    sampled = {
        "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 11, "n": 2,
        "ignore_eos": True,
    }  # fmt: skip
    texts = [c["text"] for c in _complete(server, "disagg", **sampled).json()["choices"]]
    assert texts[0] != texts[1]
    assert [c["text"] for c in _complete(server, "disagg", **sampled).json()["choices"]] == texts
    single = _complete(server, "disagg", **{**sampled, "n": 1, "seed": 12}).json()
    assert single["choices"][0]["text"] == texts[1]
    # streamed: chunks of both choices, tagged by index; each choice ends once
    with _stream(server, "disagg", **sampled, stream_options={"include_usage": True}) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    streamed, ends = ["", ""], [0, 0]
    for c in chunks[:-1]:
        [choice] = c["choices"]
        streamed[choice["index"]] += choice["text"]
        ends[choice["index"]] += choice["finish_reason"] is not None
    assert streamed == texts and ends == [1, 1]
    assert chunks[-1]["usage"]["completion_tokens"] == 12


BEAMS = {"prompt": PROMPT, "max_tokens": 6, "n": 3, "use_beam_search": True}


def _beam_search_on(model, ids: list[int], params) -> list:
    """app/beam_search.py driven by transformers' logits: what the replicas' steps should
    give (each beam's likeliest next tokens from the model's own log-softmax)."""
    import torch

    from app.beam_search import BeamSearch

    search = BeamSearch(params, len(ids))
    while not search.done:
        steps = []
        for beam in search.running:
            with torch.no_grad():
                logits = model(torch.tensor([ids + list(beam.tokens)])).logits[0, -1]
            top = torch.log_softmax(logits.float(), -1).topk(params.num_candidates)
            steps.append(list(zip(top.indices.tolist(), top.values.tolist(), strict=True)))
        search.advance(steps)
    return search.best()


def test_beam_search_finds_transformers_beams_in_all_modes(
    server, tiny_hf_model, tokenizer, local_engine
):
    """vLLM's use_beam_search, EOS ignored: transformers' own beam search's sequences, best
    first, their tokens' logprobs summing to its scores; a beam of one, the greedy output."""
    import torch

    from engine import SamplingParams

    ids = tokenizer(PROMPT).input_ids
    with torch.no_grad():
        hf = tiny_hf_model.generate(
            torch.tensor([ids]), num_beams=3, num_return_sequences=3, do_sample=False,
            max_new_tokens=6, eos_token_id=None, pad_token_id=0, return_dict_in_generate=True,
            output_scores=True,
        )  # fmt: skip
    want = [s[len(ids) :].tolist() for s in hf.sequences]
    sums = (hf.sequences_scores * 6).tolist()  # its score: the sum / generated length ** 1
    assert len({tuple(w) for w in want}) == 3

    def check(mode: str) -> None:
        r = _complete(server, mode, **BEAMS, ignore_eos=True, logprobs=2, return_token_ids=True)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["token_ids"] for c in choices] == want, mode
        assert [c["text"] for c in choices] == [tokenizer.decode(w) for w in want]
        got = [sum(c["logprobs"]["token_logprobs"]) for c in choices]
        assert got == pytest.approx(sums, abs=2e-3), mode
        assert [c["finish_reason"] for c in choices] == ["length"] * 3
        assert r.json()["usage"]["completion_tokens"] == 18
        # a beam of one is the greedy output
        r = _complete(server, mode, **{**BEAMS, "n": 1}, ignore_eos=True, return_token_ids=True)
        assert r.json()["choices"][0]["token_ids"] == greedy, mode

    [done] = local_engine.generate(
        [PROMPT], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    )
    greedy = done.token_ids
    _each(MODES, check)


def test_beam_search_stops_streams_and_chats(server, tiny_hf_model, tokenizer, serve_model_path):
    """Beams that a stop token ends (EOS, the model's own, stop_token_ids) compete with the
    running ones by length-penalised score, as the search driven by transformers' logits
    ranks them; streamed, each choice comes whole; chat's choices are its prompt's."""
    from pathlib import Path

    from app.beam_search import BeamSearchParams
    from engine.model_store import generation_stop_ids

    ids = tokenizer(PROMPT).input_ids
    [top, *_] = _beam_search_on(tiny_hf_model, ids, BeamSearchParams(3, 6, frozenset()))
    stop = top.tokens[2]  # a token the best beam takes: a beam ends there
    eos = tokenizer.eos_token_id
    stops = frozenset({stop, eos, *generation_stop_ids(Path(serve_model_path), eos)})
    for keep in (False, True):
        want = _beam_search_on(tiny_hf_model, ids, BeamSearchParams(3, 6, stops, 0.5, keep))
        assert {b.finish_reason for b in want} == {"stop", None}  # both kinds compete
        body = {**BEAMS, "stop_token_ids": [stop], "length_penalty": 0.5,
                "include_stop_str_in_output": keep, "return_token_ids": True}  # fmt: skip
        r = _complete(server, "disagg", **body)
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["token_ids"] for c in choices] == [list(b.tokens) for b in want], keep
        reasons = [c["finish_reason"] for c in choices]
        assert reasons == [b.finish_reason or "length" for b in want]
        ended = [b.tokens[:-1] if keep and b.finish_reason else b.tokens for b in want]
        assert [c["text"] for c in choices] == [tokenizer.decode(t) for t in ended]
    with _stream(server, "coloc", **body, stream_options={"include_usage": True}) as s:
        lines = [x for x in s.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(x.removeprefix("data: ")) for x in lines[:-1]]
    streamed = sorted((c["index"], c["text"], c["finish_reason"]) for x in chunks[:-1]
                      for c in x["choices"])  # fmt: skip
    assert streamed == [(i, c["text"], c["finish_reason"]) for i, c in enumerate(choices)]
    assert chunks[-1]["usage"] == r.json()["usage"]
    # chat: the beams of the prompt its template makes
    messages = [{"role": "user", "content": "Name a city."}]
    chat = {"model": MODEL, "messages": messages, "max_tokens": 4, "n": 2, "use_beam_search": True}
    r = httpx.post(f"{server}/disagg/v1/chat/completions", json=chat, timeout=120)
    assert r.status_code == 200, r.text
    asked = {"model": MODEL, "messages": messages}
    prompt = httpx.post(f"{server}/disagg/tokenize", json=asked, timeout=60).json()["tokens"]
    plain = _complete(server, "disagg", **{**chat, "prompt": prompt, "messages": None})
    texts = [c["text"] for c in plain.json()["choices"]]
    assert [c["message"]["content"] for c in r.json()["choices"]] == texts
    # tools the model may call (the server's hermes parser reads the beams), or must call
    # (a constraint, which a beam search does not honour)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    url = f"{server}/disagg_gloo/v1/chat/completions"
    r = httpx.post(url, json={**chat, "tools": tools, "tool_choice": "auto"}, timeout=120)
    assert r.status_code == 200 and len(r.json()["choices"]) == 2, r.text
    r = httpx.post(url, json={**chat, "tools": tools, "tool_choice": "required"}, timeout=60)
    assert r.status_code == 400 and "with use_beam_search" in r.json()["error"]["message"]


def test_a_beam_search_runs_with_the_requests_lora_adapter(server, serve_loras, tokenizer):
    """Every step of a beam search of an adapter's model runs with the adapter: the beams of
    the search driven by PEFT's logits with that adapter (disaggregated, loaded from lora_dir
    at its first request; colocated, configured)."""
    from app.beam_search import BeamSearchParams

    ids = tokenizer(PROMPT).input_ids
    serve_loras.peft.set_adapter("sql")
    want = _beam_search_on(serve_loras.peft, ids, BeamSearchParams(2, 5, frozenset()))
    body = {**BEAMS, "model": "sql", "n": 2, "max_tokens": 5, "ignore_eos": True,
            "return_token_ids": True}  # fmt: skip

    def check(mode: str) -> None:
        r = httpx.post(f"{server}/{mode}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200 and r.json()["model"] == "sql", r.text
        assert [c["token_ids"] for c in r.json()["choices"]] == [list(b.tokens) for b in want]

    _each(WITH_LORA, check)


def test_a_beam_search_whose_client_leaves_stops(server):
    """A client that leaves during a long beam search (non-streamed) ends it: within seconds
    no block is held and no step runs after (the prefill replica's prefix-cache hits, which
    every step adds to, stop growing). Run out, the search takes over a minute here (a step
    of 4 beams ~25 ms at the start)."""
    body = {"model": MODEL, "prompt": "Tell me a long story about the sea. " * 6,
            "max_tokens": 2000, "n": 4, "use_beam_search": True, "ignore_eos": True}  # fmt: skip
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server}/disagg/v1/completions", json=body, timeout=2)

    def cached() -> int:
        return sum(s["num_cached_tokens"] for s in _until_idle("disagg", 5))

    before = cached()
    time.sleep(3)
    assert cached() == before


def test_echo_prepends_the_prompt_to_every_choice(server, engine_alone, tokenizer):
    r = _complete(server, "disagg", prompt=PROMPT, max_tokens=8, echo=True, n=2)
    assert r.status_code == 200, r.text
    assert [c["text"] for c in r.json()["choices"]] == [PROMPT + engine_alone.text] * 2
    assert r.json()["usage"]["completion_tokens"] == 2 * len(engine_alone.token_ids)
    ids = tokenizer(PROMPT).input_ids  # token ids: their text is echoed
    r = _complete(server, "coloc", prompt=ids, max_tokens=8, echo=True)
    assert r.json()["choices"][0]["text"] == tokenizer.decode(ids) + engine_alone.text
    with _stream(server, "disagg", prompt=PROMPT, max_tokens=8, temperature=0, echo=True) as r:
        lines = [x for x in r.iter_lines() if x][:-1]
    texts = [json.loads(x.removeprefix("data: "))["choices"][0]["text"] for x in lines]
    assert texts[0].startswith(PROMPT) and "".join(texts) == PROMPT + engine_alone.text


def test_a_batch_of_prompts_gets_each_prompt_its_own_choices(server, local_engine, tokenizer):
    """prompt as a list (texts, or lists of token ids): prompt i's choice j has index i * n + j,
    each equal to the engine alone on that prompt; usage counts each prompt once."""
    from engine import SamplingParams

    prompts = [PROMPT, "Water boils at", "1, 2, 3,"]
    want = local_engine.generate(prompts, SamplingParams(max_tokens=6, temperature=0))
    lens = [len(tokenizer(p).input_ids) for p in prompts]
    completion = sum(len(w.token_ids) for w in want)

    def check(mode: str) -> None:
        r = _complete(server, mode, prompt=prompts, max_tokens=6, n=2, echo=True)
        assert r.status_code == 200, r.text
        body = r.json()
        assert [c["index"] for c in body["choices"]] == list(range(6))
        texts = [p + w.text for p, w in zip(prompts, want, strict=True) for _ in range(2)]
        assert [c["text"] for c in body["choices"]] == texts, mode
        assert body["usage"] == {
            "prompt_tokens": sum(lens),
            "completion_tokens": 2 * completion,
            "total_tokens": sum(lens) + 2 * completion,
        }

    _each(("disagg", "chunked"), check)
    ids = [tokenizer(p).input_ids for p in prompts]  # a batch of token-id prompts, streamed
    with _stream(server, "coloc", prompt=ids, max_tokens=6, temperature=0) as r:
        lines = [x for x in r.iter_lines() if x]
    assert lines[-1] == "data: [DONE]"
    streamed = ["", "", ""]
    for line in lines[:-1]:
        [choice] = json.loads(line.removeprefix("data: "))["choices"]
        streamed[choice["index"]] += choice["text"]
    assert streamed == [w.text for w in want]
    # one prompt of the batch beyond the context window: refused, named by its place
    r = _complete(server, "disagg", prompt=["Hi", "hi " * 9000], max_tokens=2)
    assert r.status_code == 400 and r.json()["error"]["message"].startswith("prompt 1: ")


def test_official_openai_client_completions_and_chat(server, local_engine, tokenizer):
    import openai

    from engine import SamplingParams
    from engine.limits import chat_token_ids

    question = [{"role": "user", "content": "Say hello."}]
    # a random model ends its turn where a logit bias makes the end-of-turn token likelier
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ending = {str(end): 4}
    greedy = SamplingParams(max_tokens=20, temperature=0)
    [reply] = local_engine.generate(
        [chat_token_ids(tokenizer, question)],
        dataclasses.replace(greedy, logit_bias=((end, 4.0),)),
    )
    assert reply.finish_reason == "stop" and reply.text
    [words] = local_engine.generate([PROMPT], dataclasses.replace(greedy, max_tokens=3))

    client = openai.OpenAI(base_url=f"{server}/disagg/v1", api_key="unused")
    [model] = client.models.list().data
    assert model.id == MODEL
    assert client.models.retrieve(model.id).id == model.id
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.models.retrieve("gpt-4")
    fields = {"model": model.id, "temperature": 0, "max_tokens": 20, "messages": question}
    fields |= {"logit_bias": ending}
    chat = client.chat.completions.create(**fields)
    assert chat.choices[0].message.content == reply.text
    assert chat.choices[0].finish_reason == "stop"
    stream = client.chat.completions.create(**fields, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream) == chat.choices[0].message.content
    )
    comp = client.completions.create(model=model.id, prompt=PROMPT, max_tokens=3, temperature=0)
    assert comp.choices[0].text == words.text
    # logprobs through the client's own types: completions' lists and chat's token objects
    comp = client.completions.create(
        model=model.id, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=2, n=2
    )
    assert [c.index for c in comp.choices] == [0, 1] and comp.usage.completion_tokens == 6
    for choice in comp.choices:
        assert "".join(choice.logprobs.tokens) == choice.text == words.text
        assert all(len(top) == 2 for top in choice.logprobs.top_logprobs)
    # the scoring request of evaluation harnesses: the prompt's logprobs lead, the first null
    scored = client.completions.create(
        model=model.id, prompt=PROMPT, max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    lp = scored.choices[0].logprobs
    first = tokenizer.decode(words.token_ids[:1])
    assert "".join(lp.tokens) == scored.choices[0].text == PROMPT + first
    assert lp.token_logprobs[0] is None and all(v < 0 for v in lp.token_logprobs[1:])
    # ... and a batch of them, as harnesses send it
    batch = client.completions.create(
        model=model.id, prompt=[PROMPT, "Hi"], max_tokens=1, temperature=0, logprobs=1, echo=True
    )
    assert [c.index for c in batch.choices] == [0, 1]
    scores = batch.choices[0].logprobs.token_logprobs
    assert scores[0] is None and scores[1:] == pytest.approx(lp.token_logprobs[1:], abs=1e-4)
    assert batch.choices[1].text.startswith("Hi")
    chat = client.chat.completions.create(**fields, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    # the last token is the end-of-turn token: in the logprobs, not in the message
    assert "".join(t.token for t in content) == reply.text + "<|im_end|>"
    # greedy: each token its top alternative (the model's own logprobs, before the bias), but
    # the end of turn, which the bias made the greedy one
    assert all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].token == t.token for t in content[:-1])
    assert bytes(content[0].bytes).decode() == content[0].token
    stream = client.chat.completions.create(**fields, logprobs=True, stream=True)
    streamed = [
        t
        for c in stream
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.content
    ]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)


def test_the_endpoint_check_passes_and_keeps_the_greedy_texts(server, tmp_path):
    """bench/check_endpoint.py, the README's check of a running server, passes against the
    default mode; the greedy completion it keeps is the one a plain HTTP request gets."""
    from bench import check_endpoint

    greedy = tmp_path / "greedy.json"
    lines = check_endpoint.run(f"{server}/disagg", "unused", greedy=greedy)
    assert lines == [f"OK {name}" for name in check_endpoint.CHECKS]
    kept = json.loads(greedy.read_text())
    r = _complete(server, "disagg", prompt=check_endpoint.PROMPT, **check_endpoint.GREEDY)
    assert kept["completion"] == r.json()["choices"][0]["text"] and kept["chat"]


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
        ({"prompt": "hi", "top_p": 1.5}, 400, "top_p"),
        ({"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ({"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
        ({"max_tokens": 4}, 400, "prompt"),
        ({"prompt": "hi " * 9000}, 400, "context window"),
        ({"prompt": "hi", "max_tokens": 9000}, 400, "context window"),
        ({"prompt": "hi", "n": 0}, 400, "n"),
        ({"prompt": "hi", "n": 129}, 400, "n"),
        ({"prompt": "hi", "seed": 2**64}, 400, "seed"),
        ({"prompt": "hi", "max_tokens": 5000}, 400, "KV cache"),  # checked by the replicas
        ({"prompt": "hi", "max_tokens": 5000, "stream": True}, 400, "KV cache"),
        ({"prompt": "hi", "max_tokens": 2000, "app": "disagg_os"}, 400, "1456 tokens"),
        ({"prompt": "hi", "model": "gpt-4"}, 404, "does not exist"),
        ({"prompt": "hi", "frequency_penalty": 2.5}, 400, "frequency_penalty"),
        ({"prompt": "hi", "repetition_penalty": 0}, 400, "repetition_penalty"),
        ({"prompt": "hi", "logit_bias": {"cat": 1}}, 400, "token ids"),
        ({"prompt": "hi", "logit_bias": {"5": 500}}, 400, "[-100, 100]"),
        ({"prompt": "hi", "logit_bias": {"999999": 1}}, 400, "token ids in [0,"),  # replicas
        ({"prompt": "hi", "min_tokens": 4, "max_tokens": 2}, 400, "min_tokens"),
        ({"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
        ({"prompt": "hi", "min_p": -0.1}, 400, "min_p"),
        ({"prompt": "hi", "best_of": 3}, 400, "best_of"),
        ({"prompt": "hi", "suffix": "!"}, 400, "suffix"),
        ({"prompt": []}, 400, "empty"),
        ({"prompt": [-1], "echo": True}, 400, "token ids must be integers in [0,"),
        ({"prompt": [[5], [2**40]], "echo": True}, 400, "token ids must be"),
        ({"prompt": "hi", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
        ({"prompt": "hi", "prompt_logprobs": 1, "stream": True}, 400, "with stream"),
        ({"prompt": ["hi", [1, 2]]}, 400, "prompt"),
        ({"prompt": ["hi"] * 65, "n": 2}, 400, "65 prompts x n=2"),  # the queue holds 128
        ({"prompt": "hi", "allowed_token_ids": []}, 400, "allowed_token_ids"),
        ({"prompt": "hi", "allowed_token_ids": [5, 999999]}, 400, "[0, 49152)"),  # replicas
        ({"prompt": "hi", "bad_words": [" "]}, 400, "has no tokens"),
        # bounded, unlike vLLM's: each costs the tokenizer thread or every step
        ({"prompt": "hi", "bad_words": ["a"] * 1025}, 400, "bad_words: List should have at most"),
        ({"prompt": "hi", "stop": ["."] * 1025}, 400, "at most 1024 stop strings, got 1025"),
        ({"prompt": "hi", "stop_token_ids": [5] * 1025}, 400, "stop_token_ids: List should"),
        ({"prompt": "hi", "use_beam_search": True, "n": 11}, 400, "beam width) is at most 10"),
        ({"prompt": "hi", "use_beam_search": True, "top_p": 0.5}, 400, "top_p is not supported"),
        ({"prompt": "hi", "use_beam_search": True, "stop": ["."]}, 400, "stop is not supported"),
        (
            {"prompt": "hi", "use_beam_search": True, "response_format": {"type": "json_object"}},
            400,
            "response_format is not supported with use_beam_search",
        ),
        ({"prompt": "hi", "length_penalty": 2}, 400, "only with use_beam_search"),
        ({"prompt": "hi", "guided_regex": "("}, 400, "unclosed group"),  # replicas
        ({"prompt": "hi", "structured_outputs": {"json": {"type": 5}}}, 400, "type must be"),
        ({"prompt": "hi", "guided_choice": ["a"], "guided_regex": "a"}, 400, "only one"),
        ({"prompt": "hi", "structured_outputs": {"regx": "a"}}, 400, "Extra inputs"),
        ({"prompt": "hi", "logits_processors": ["m.P"]}, 400, "logits processors"),
        ({"prompt": "hi", "priority": 1}, 400, "priority"),
        ({"prompt": "hi", "cache_salt": ""}, 400, "cache_salt"),
        ({"prompt": "hi", "prompt_embeds": "AAAA"}, 400, "prompt_embeds"),
        ({"prompt": "hi", "truncate_prompt_tokens": 0}, 400, "truncate_prompt_tokens"),
        ({"prompt": "hi", "truncate_prompt_tokens": 9000}, 400, "context window"),
    ],
)
def test_bad_input_gets_openai_error_and_server_keeps_serving(server, body, status, needle):
    body = dict(body)  # parametrize values are shared: do not mutate them
    app = body.pop("app", "disagg")
    payload = {"model": MODEL, **body}
    r = httpx.post(f"{server}/{app}/v1/completions", json=payload, timeout=60)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["type"]
    assert error["param"]  # every one of these names the offending field
    assert "ray::" not in error["message"] and "Traceback" not in error["message"]  # its own
    assert _complete(server, "disagg", prompt="Hi", max_tokens=1).status_code == 200


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "auto"),
        ({"tool_choice": "required"}, "needs tools"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "only text content parts",
        ),
        (  # was a 500: the parts' texts are joined
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
            "needs a string text",
        ),
    ],
)
def test_chat_features_we_do_not_serve_are_refused_not_ignored(server, fields, needle):
    payload = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 2,
        **fields,
    }
    r = httpx.post(f"{server}/disagg/v1/chat/completions", json=payload, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert needle in error["message"] and error["param"]
    text_parts = {"role": "user", "content": [{"type": "text", "text": "Hi"}]}
    ok = {**payload, "messages": [text_parts], "response_format": {"type": "text"}}
    ok.pop("tools", None), ok.pop("tool_choice", None)
    assert httpx.post(f"{server}/disagg/v1/chat/completions", json=ok, timeout=60).is_success


def test_a_browser_page_may_call_the_api(server):
    """CORS through Serve's proxy (vLLM's defaults): a preflight answered, and answers to a
    page, streamed and not, errors too, say it may read them."""
    page = {"origin": "https://chat.example"}
    preflight = {**page, "access-control-request-method": "POST",
                 "access-control-request-headers": "content-type"}  # fmt: skip
    r = httpx.options(f"{server}/disagg/v1/completions", headers=preflight, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    assert r.headers["access-control-allow-headers"] == "content-type"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    for sent in (body, {**body, "stream": True}, {**body, "max_tokens": -1}):
        r = httpx.post(f"{server}/disagg/v1/completions", json=sent, headers=page, timeout=60)
        assert r.headers.get_list("access-control-allow-origin") == ["*"], r.text
    assert r.status_code == 400


def test_x_request_id_names_the_response_and_may_be_reused(server):
    """vLLM's X-Request-Id: the body's id (Serve's proxy returns the header); two requests in
    flight with the same one are both served (the replicas' ids stay unique). vLLM's
    request_id field does the same."""
    headers = {"X-Request-Id": "client-7"}
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    url = f"{server}/disagg/v1/completions"
    with httpx.stream("POST", url, json={**body, "stream": True}, headers=headers, timeout=60) as s:
        assert s.headers["x-request-id"] == "client-7"
        lines = s.iter_lines()
        first = json.loads(next(line for line in lines if line).removeprefix("data: "))
        r = httpx.post(url, json={**body, "n": 2}, headers=headers, timeout=60)  # while in flight
        rest = [line for line in lines if line]
    assert first["id"] == "cmpl-client-7" and rest[-1] == "data: [DONE]"
    assert r.status_code == 200 and r.json()["id"] == "cmpl-client-7", r.text
    assert r.headers["x-request-id"] == "client-7"
    r = httpx.post(url, json=body, headers={"X-Request-Id": "x" * 257}, timeout=60)
    assert r.status_code == 400 and "X-Request-Id" in r.json()["error"]["message"]
    r = httpx.post(url, json=body, timeout=60)  # without one: a fresh id
    assert r.json()["id"].startswith("cmpl-") and "client-7" not in r.json()["id"]
    # vLLM's request_id field names it too, before the header (which Serve's proxy always
    # sets, so it cannot tell a client's)
    r = httpx.post(url, json={**body, "request_id": "body-3"}, timeout=60)
    assert r.json()["id"] == "cmpl-body-3"
    r = httpx.post(url, json={**body, "request_id": "body-3"}, headers=headers, timeout=60)
    assert r.json()["id"] == "cmpl-body-3"
    r = httpx.post(url, json={**body, "request_id": "x" * 257}, timeout=60)
    assert r.status_code == 400 and "request_id" in r.text


def test_no_value_of_any_field_is_a_server_error(server):
    """Every field of both bodies set to each of a few odd values (what fuzzing 10k requests
    found 500s and failed steps with), eight at a time, so odd requests share steps: a 200 or
    a 4xx, never a 5xx, and nothing left running."""
    import asyncio

    from app.protocol import ChatCompletionRequest, CompletionRequest

    odd = (None, -1, 1e-300, 1e308, "\ud800", {"a": [1]})
    hi = [{"role": "user", "content": "Hi"}]
    bodies = []
    beams = {"use_beam_search": True, "n": 2}  # a beam search's steps take the odd values too
    for route, cls, fields in (
        ("completions", CompletionRequest, {"prompt": "Hi"}),
        ("chat/completions", ChatCompletionRequest, {"messages": hi}),
        ("completions", CompletionRequest, {"prompt": "Hi", **beams}),
        ("chat/completions", ChatCompletionRequest, {"messages": hi, **beams}),
    ):
        base = {"model": MODEL, "max_tokens": 1, **fields}
        for field, info in cls.model_fields.items():
            for value in odd:
                if value is None and info.default is None:
                    continue  # the default (and for max_tokens minutes of decoding)
                bodies.append((route, field, value, json.dumps({**base, field: value})))

    async def send_all() -> list[tuple]:
        lanes = asyncio.Semaphore(8)

        async def one(client, route, field, value, body) -> tuple:
            async with lanes:
                r = await client.post(f"{server}/disagg/v1/{route}", content=body)
            return route, field, value, r.status_code, r.text[:200]

        async with httpx.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(one(client, *b) for b in bodies))

    failed = [answer for answer in asyncio.run(send_all()) if answer[3] >= 500]
    assert not failed and len(bodies) > 800, failed
    stats = _replica_stats("disagg")
    assert all(s["num_free_blocks"] == s["num_kv_blocks"] for s in stats), stats


def test_malformed_json_and_unknown_route(server):
    r = httpx.post(f"{server}/disagg/v1/completions", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    deep = f'{{"model": "{MODEL}", "prompt": '.encode() + b"[" * 100_000
    r = httpx.post(f"{server}/disagg/v1/completions", content=deep, timeout=30)
    assert r.status_code == 400 and "too deeply" in r.json()["error"]["message"]
    # Python's json reads NaN and Infinity; no field may hold them
    model = f'"model": "{MODEL}", "prompt": "hi"'
    for field, needle in (('"temperature": NaN', "NaN"), ('"top_p": -Infinity', "-Infinity"),
                          ('"temperature": 1e999', "out of range")):  # fmt: skip
        r = httpx.post(f"{server}/disagg/v1/completions", content=f"{{{model}, {field}}}")
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
    # an unpaired surrogate escape is no text (the tokenizer raised: a 500); a pair is an emoji
    chat = f'"model": "{MODEL}", "max_tokens": 1, "messages": [{{"role": "user", '
    for content, status in (("Hi \\ud83d", 400), ("Hi \\ud83d\\ude00", 200)):
        body = f'{{{chat}"content": "{content}"}}]}}'
        r = httpx.post(f"{server}/disagg/v1/chat/completions", content=body, timeout=60)
        assert r.status_code == status, r.text
        assert status == 200 or r.json()["error"]["param"] == "messages[0].content"
    assert httpx.get(f"{server}/disagg/v1/nothing", timeout=30).status_code == 404
    # a body past the application's bound (max_request_body_mb: 1) is a 413, sent whole with
    # its length or in chunks without one (read only up to the bound)
    over = f'{{"model": "{MODEL}", "prompt": "'.encode() + b"a" * (1 << 20) + b'"}'
    chunked = (over[i : i + 65536] for i in range(0, len(over), 65536))
    for content in (over, chunked):
        r = httpx.post(f"{server}/disagg/v1/completions", content=content, timeout=60)
        assert r.status_code == 413 and "max_request_body_mb" in r.json()["error"]["message"]
    assert httpx.get(f"{server}/disagg/health", timeout=30).json() == {"status": "ok"}


def test_responses_api_through_the_official_client(server):
    """OpenAI's Responses API answers as the chat completion it is: the same greedy text (with
    instructions as the system message), streamed events that the client's own stream helper
    accumulates to the same response, max_output_tokens -> incomplete; function tools give
    function_call items, and a call's output sent back as input items reads as chat's tool
    messages; what needs stored responses is refused."""
    import openai

    question = [{"role": "user", "content": "What is the capital of France?"}]
    model, limits = MODEL, {"temperature": 0, "extra_body": SHORT_REPLY}

    def answers_as_chat(mode: str):
        client = openai.OpenAI(base_url=f"{server}/{mode}/v1", api_key="unused")
        system = [{"role": "system", "content": "Answer in one word."}]
        chat = client.chat.completions.create(
            model=model, messages=system + question, max_tokens=20, **limits
        )
        assert chat.choices[0].finish_reason == "stop"
        response = client.responses.create(
            model=model, input=question[0]["content"], instructions=system[0]["content"],
            max_output_tokens=20, **limits,
        )  # fmt: skip
        assert response.output_text == chat.choices[0].message.content, mode
        assert response.status == "completed" and response.id.startswith("resp_")
        assert response.usage.input_tokens == chat.usage.prompt_tokens
        assert response.usage.output_tokens == chat.usage.completion_tokens
        return client, response

    parts = {  # each app's share, the apps at once
        "coloc": lambda: _responses_without_a_store(*answers_as_chat("coloc")),
        "disagg": lambda: (answers_as_chat("disagg"), _responses_previous_response_id(server)),
        "disagg_gloo": lambda: _responses_tool_round_trip(server),
    }
    _each(parts, lambda mode: parts[mode]())


# a reply of a few words and a full stop: a random model ends its reply where this grammar
# does (it would write on to max_tokens)
SHORT_REPLY = {"structured_outputs": {"regex": "[A-Za-z ]{1,24}\\."}}


def _responses_without_a_store(client, response) -> None:
    """The coloc app keeps no responses: streamed events and the client's stream helper,
    max_output_tokens -> incomplete, and what needs stored responses refused."""
    import openai

    question = [{"role": "user", "content": "What is the capital of France?"}]
    model, limits = MODEL, {"temperature": 0, "extra_body": SHORT_REPLY}
    events = list(client.responses.create(model=model, input=question, stream=True, **limits))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert events[-1].type == "response.completed" and len(deltas) > 1
    answer = events[-1].response.output_text
    assert "".join(deltas) == answer and answer.endswith(".")
    with client.responses.stream(model=model, input=question, **limits) as stream:
        final = stream.get_final_response()
    assert final.output_text == answer
    cut = client.responses.create(model=model, input=question, max_output_tokens=3, temperature=0)
    assert (cut.status, cut.incomplete_details.reason) == ("incomplete", "max_output_tokens")
    with pytest.raises(openai.NotFoundError, match="stores no responses"):
        client.responses.create(model=model, input="hi", previous_response_id=response.id)
    with pytest.raises(openai.NotFoundError, match="stores no responses"):
        client.responses.retrieve(response.id)
    with pytest.raises(openai.BadRequestError, match="only function tools"):
        client.responses.create(model=model, input="hi", tools=[{"type": "web_search"}])


def _responses_previous_response_id(server: str) -> None:
    """The disagg app keeps responses: a second turn through previous_response_id answers as
    chat does with the whole conversation; a stored response is retrieved and deleted."""
    import openai

    client = openai.OpenAI(base_url=f"{server}/disagg/v1", api_key="unused")
    fields = {"model": MODEL, "temperature": 0, "max_output_tokens": 10}
    first = client.responses.create(**fields, input="My name is Ann. Say hello.")
    assert first.store is True
    # kept by the application's store deployment, which every ingress replica asks
    from ray import serve

    store = serve.get_deployment_handle("ResponseStore", app_name="disagg")
    assert store.get.remote(first.id).result().body["id"] == first.id
    second = client.responses.create(
        **fields, input="What is my name?", previous_response_id=first.id, stream=True
    )
    second = list(second)[-1].response  # response.completed, or incomplete at the limit
    assert second.previous_response_id == first.id
    conversation = [
        {"role": "user", "content": "My name is Ann. Say hello."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    chat = client.chat.completions.create(
        model=fields["model"], messages=conversation, temperature=0, max_tokens=10
    )
    assert second.output_text == chat.choices[0].message.content
    assert second.usage.input_tokens == chat.usage.prompt_tokens
    third = client.responses.create(**fields, input="Thanks.", previous_response_id=second.id)
    assert third.usage.input_tokens > second.usage.input_tokens + second.usage.output_tokens
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError, match="no longer"):
        client.responses.retrieve(first.id)
    unstored = client.responses.create(**fields, input="Hi", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


def _responses_tool_round_trip(server: str) -> None:
    """The gloo app (hermes parser): a call the model writes (made to, by a regex over the exact
    text) is a function_call item; sent back with its output, the reply equals chat's."""
    import openai

    from tests.test_tools import ARGS, ASK, HERMES_CALL, WEATHER

    client = openai.OpenAI(base_url=f"{server}/disagg_gloo/v1", api_key="unused")
    tool = {"type": "function", **WEATHER["function"]}
    written = {"structured_outputs": {"regex": re.escape("One moment.\n" + HERMES_CALL)}}
    fields = {"model": MODEL, "tools": [tool], "temperature": 0}
    response = client.responses.create(**fields, input=ASK, extra_body=written)
    message, call = response.output
    assert message.content[0].text == "One moment.\n"
    assert (call.type, call.name, json.loads(call.arguments)) == (
        "function_call",
        "get_weather",
        ARGS,
    )
    events = list(client.responses.create(**fields, input=ASK, extra_body=written, stream=True))
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [(i.type, getattr(i, "arguments", None)) for i in done] == [
        ("message", None), ("function_call", call.arguments)
    ]  # fmt: skip
    pieces = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(pieces) > 2 and "".join(pieces) == call.arguments
    output = {"type": "function_call_output", "call_id": call.call_id, "output": "18 C, sunny"}
    back = [*ASK, call.model_dump(exclude={"id", "status"}), output]
    reply = client.responses.create(**fields, input=back, max_output_tokens=12)
    calls = [{"id": call.call_id, "type": "function",
              "function": {"name": "get_weather", "arguments": call.arguments}}]  # fmt: skip
    messages = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": calls},
        {"role": "tool", "tool_call_id": call.call_id, "content": "18 C, sunny"},
    ]
    chat = client.chat.completions.create(
        model=fields["model"], messages=messages, tools=[WEATHER], temperature=0, max_tokens=12
    )
    assert reply.output_text == (chat.choices[0].message.content or "")
    assert reply.usage.input_tokens == chat.usage.prompt_tokens


def test_reasoning_parser_splits_the_thinking_from_the_answer(server, tokenizer):
    """The disagg_os app reads chat replies as DeepSeek-R1's: a reply that never closes its
    think block is all reasoning (message.reasoning and reasoning_content; streamed deltas; a
    Responses reasoning item), the same greedy text the plain app answers with; a constraint
    shapes only the answer after the thinking (vLLM's order), so a constrained reply thinks
    freely first."""
    import openai

    question = [{"role": "user", "content": "Say hello."}]
    # the random model ends its turn where a logit bias makes the end-of-turn token likelier
    ending = {"logit_bias": {str(tokenizer.convert_tokens_to_ids("<|im_end|>")): 4}}
    fields = {"model": MODEL, "temperature": 0, "max_tokens": 12, **ending}
    plain = openai.OpenAI(base_url=f"{server}/disagg/v1", api_key="unused")
    text = plain.chat.completions.create(**fields, messages=question).choices[0].message.content
    client = openai.OpenAI(base_url=f"{server}/disagg_os/v1", api_key="unused")
    reply = client.chat.completions.create(**fields, messages=question)
    message = reply.choices[0].message
    assert (message.content, message.reasoning, message.reasoning_content) == (None, text, text)
    # every token is reasoning but the end-of-sequence token that ended it, which has no text
    assert reply.choices[0].finish_reason == "stop"
    thought = reply.usage.completion_tokens - 1
    assert reply.usage.completion_tokens_details.reasoning_tokens == thought
    stream = client.chat.completions.create(**fields, messages=question, stream=True)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == text
    assert not any(d.content for d in deltas)
    response = client.responses.create(
        model=fields["model"], input=question, temperature=0, max_output_tokens=12,
        extra_body=ending,
    )  # fmt: skip
    [item] = response.output
    assert (item.type, item.content[0].text, response.output_text) == ("reasoning", text, "")
    assert response.usage.output_tokens_details.reasoning_tokens == thought
    # the choice constrains the answer only: the thinking runs free (here to max_tokens: this
    # model never closes a think block, and the thinking cannot end the reply)
    choice = {"guided_choice": ["Paris", "Lyon"]}
    forced = client.chat.completions.create(**fields, messages=question, extra_body=choice)
    [choice] = forced.choices
    assert choice.message.content is None and choice.finish_reason == "length"
    assert choice.message.reasoning.startswith(text) and len(choice.message.reasoning) > len(text)


def _replica_stats(app: str) -> list[dict]:
    """Every running replica's stats, prefill's first, then decode's or colocated's."""
    from deployments.serve_status import applications
    from tests.ray_session import every_replica_stats

    deployments = applications()[app].deployments
    return [
        stats
        for deployment in ("PrefillServer", "DecodeServer", "ColocatedServer")
        if deployment in deployments
        for stats in every_replica_stats(app, deployment)
    ]


def test_the_controllers_answer_reads_as_serve_status_says(server):
    """deployments/serve_status.py (what the readiness check, the test helpers and the
    benchmarks poll) says what serve.status() says of every live application: its status and
    each deployment's, and its replicas by state."""
    from ray import serve

    from deployments.serve_status import applications

    for _ in range(10):  # a reading between two equal ones: no replica changed state meanwhile
        before, theirs, after = applications(), serve.status().applications, applications()
        if before == after:
            break
    assert before == after
    assert set(MODES) <= set(theirs) == set(before)
    for name, app in theirs.items():
        ours = before[name]
        assert (ours.status, ours.message) == (app.status.value, app.message), name
        assert ours.status == "RUNNING"
        assert {d: (s.status, s.replica_states) for d, s in ours.deployments.items()} == {
            d: (s.status.value, s.replica_states) for d, s in app.deployments.items()
        }, name
    assert before["disagg_os"].deployments["PrefillServer"].running == 2


def _until_idle(app: str, timeout_s: float) -> list[dict]:
    """Every replica's stats once none holds a block, keeps a KV transfer for a reader that is
    gone (shm slot, object-store object, staged buffer), or has a request running, waiting or
    waiting for its import; fails after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        stats = _replica_stats(app)
        busy = [_not_idle(s) for s in stats]
        if not any(busy):
            return stats
        assert time.monotonic() < deadline, f"{app} not idle in {timeout_s} s: {busy}"
        time.sleep(0.5)


def _not_idle(stats: dict) -> dict:
    """What one replica still holds or runs, by its stats' names (empty when idle)."""
    held = {
        "num_used_blocks": stats["num_kv_blocks"] - stats["num_free_blocks"],
        # a draft model's own pool (the chunked app's colocated replica has one)
        "num_used_draft_blocks": stats["num_draft_kv_blocks"] - stats["num_draft_free_blocks"],
    }
    for name in ("num_kept_kv_transfers", "num_running", "num_waiting", "num_pending_imports"):
        held[name] = stats[name]
    return {name: n for name, n in held.items() if n}


async def _leave_early(
    url: str, model: str, prompt: str, after_chunks: int, after_s: float, n: int
) -> None:
    """A streamed request of `n` choices whose client leaves after `after_chunks` chunks (0:
    after `after_s` seconds, during its prefill)."""
    body = {"model": model, "prompt": prompt, "max_tokens": 32, "stream": True, "n": n}
    async with (
        httpx.AsyncClient(timeout=120) as client,
        client.stream("POST", url, json=body) as r,
    ):
        assert r.status_code == 200
        if after_chunks == 0:
            await asyncio.sleep(after_s)
            return
        chunks = 0
        async for line in r.aiter_lines():
            chunks += line.startswith("data: {")
            if chunks >= after_chunks:
                return  # leaving the block closes the connection


def leaving_early_leaves_nothing(url: str, app: str, model: str) -> None:
    """Clients of `app` (completions of `model` at `url`) leave at their first token, in
    their prefill, or as their decode starts, a few at a time, some with three choices (whose
    prefills end while the first choice's token is on its way); within seconds no replica
    keeps a KV transfer or holds a block, and nothing runs or waits."""
    prompt = "Tell me a long story about the sea. " * 30
    leaving = [(1, 0.0, 1)] * 8 + [(0, 0.1, 1), (0, 0.3, 1), (2, 0.0, 1), (3, 0.0, 1)]
    leaving += [(1, 0.0, 3)] * 4

    async def clients() -> None:
        for batch in (leaving[:6], leaving[6:12], leaving[12:]):
            await asyncio.gather(*(_leave_early(url, model, prompt, *c) for c in batch))

    asyncio.run(clients())
    _until_idle(app, 20)


def test_clients_that_leave_at_the_first_token_leave_no_kv_behind(server):
    """A client that leaves at its first token ends the request around the hand-off: the KV
    that the prefill replica published must not stay behind for nobody (a shared-memory slot,
    an object-store object, a staged gloo buffer, until their TTLs minutes later)."""
    _each(
        ("disagg", "disagg_os", "disagg_gloo"),
        lambda mode: leaving_early_leaves_nothing(f"{server}/{mode}/v1/completions", mode, MODEL),
    )


def test_lora_adapters_are_models_of_their_own(server, serve_loras, tokenizer):
    """A request names an adapter as its model: disaggregated (each replica loading it from
    lora_dir at its first request; the KV and the adapter's name handed to the decode
    replica) and colocated (configured), the greedy tokens are PEFT's with that adapter;
    streamed and not; listed and retrieved as models with the base as parent; an adapter
    the server cannot serve is a 400 with the reason, and the server keeps serving."""
    import openai

    from tests.conftest import peft_greedy

    ids = tokenizer(PROMPT).input_ids
    wants = {lora: peft_greedy(serve_loras.peft, ids, lora, 8) for lora in ("sql", "poet")}

    def check(mode: str) -> None:
        client = openai.OpenAI(base_url=f"{server}/{mode}/v1", api_key="unused")
        models = {m.id: m for m in client.models.list().data}
        assert list(models)[0] == MODEL
        assert set(list(models)[1:]) == {"sql", "poet", *(["dora"] if mode != "coloc" else [])}
        assert models["sql"].parent == MODEL
        assert client.models.retrieve("poet").root == models["poet"].root
        for lora, want in wants.items():
            common = {"model": lora, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
            done = client.completions.create(**common, extra_body={"return_token_ids": True})
            assert done.model == lora and done.choices[0].token_ids == want, mode
            streamed = client.completions.create(**common, stream=True)
            text = "".join(c.choices[0].text for c in streamed if c.choices)
            assert text == done.choices[0].text
        chat = client.chat.completions.create(
            model="sql", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert chat.model == "sql" and chat.usage.completion_tokens == 4

    _each(WITH_LORA, check)
    r = _complete(server, "disagg_gloo", prompt=PROMPT, model="dora")
    assert r.status_code == 400 and "use_dora" in r.json()["error"]["message"]
    # the disaggregated replicas each loaded the two they were asked for, at first use
    for stats in _replica_stats("disagg_gloo"):
        assert stats["num_loras"] == stats["num_lora_loads"] == 2, stats
    r = _complete(server, "disagg", prompt=PROMPT, model="sql")
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    r = _complete(server, "coloc", prompt=PROMPT, model="other")
    assert r.status_code == 404 and "'sql', 'poet'" in r.json()["error"]["message"]


def test_adapters_load_and_unload_at_runtime(server, serve_loras, tokenizer):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter (the disaggregated app with
    lora_dir and allow_runtime_lora_updating): a loaded adapter is a model of its own on the
    prefill and the decode replica, with PEFT's greedy tokens; loaded in place, another
    adapter replaces it; unloaded, its name is a 404 again. Apps without the flag have no
    such routes."""
    from tests.conftest import peft_greedy

    base, ids = f"{server}/disagg_gloo/v1", tokenizer(PROMPT).input_ids

    def greedy(model: str) -> list[int]:
        r = _complete(server, "disagg_gloo", prompt=PROMPT, model=model, max_tokens=8,
                      return_token_ids=True)  # fmt: skip
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    load = {"lora_name": "runtime", "lora_path": serve_loras.adapters["sql"]}
    r = httpx.post(f"{base}/load_lora_adapter", json=load)
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'runtime' added successfully."
    try:
        r = httpx.post(f"{base}/load_lora_adapter", json=load)
        assert r.status_code == 400 and "already been loaded" in r.json()["error"]["message"]
        assert greedy("runtime") == peft_greedy(serve_loras.peft, ids, "sql", 8)
        assert "runtime" in [m["id"] for m in httpx.get(f"{base}/models").json()["data"]]
        inplace = {**load, "lora_path": serve_loras.adapters["poet"], "load_inplace": True}
        assert httpx.post(f"{base}/load_lora_adapter", json=inplace).status_code == 200
        assert greedy("runtime") == peft_greedy(serve_loras.peft, ids, "poet", 8)
    finally:
        r = httpx.post(f"{base}/unload_lora_adapter", json={"lora_name": "runtime"})
    assert (
        r.status_code == 200 and r.text == "Success: LoRA adapter 'runtime' removed successfully."
    )
    r = _complete(server, "disagg_gloo", prompt=PROMPT, model="runtime")
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    # a name no folder can have: the file system's error before (ENAMETOOLONG, a 500)
    r = _complete(server, "disagg_gloo", prompt=PROMPT, model="x" * 300)
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/load_lora_adapter", json={**load, "lora_name": "x" * 300})
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    r = httpx.post(f"{base}/unload_lora_adapter", json={"lora_name": "runtime"})
    assert r.status_code == 404 and "cannot be found" in r.json()["error"]["message"]
    r = httpx.post(f"{base}/unload_lora_adapter", json={"lora_name": "sql"})  # lora_dir's own
    assert r.status_code == 400 and r.json()["error"]["param"] == "lora_name"
    assert httpx.post(f"{server}/coloc/v1/load_lora_adapter", json=load).status_code == 404


def test_client_disconnect_mid_stream_frees_all_blocks(server):
    # 1400 tokens take over a minute here: blocks freed within seconds can only come from the
    # abort (1400: within disagg_os's smaller decode cache); n=3: every choice's request;
    # chunked: the draft model's blocks too (_until_idle)
    modes = (("disagg", 3), ("disagg_os", 1), ("disagg_gloo", 1), ("coloc", 1), ("chunked", 1))
    for mode, n in modes:
        with _stream(
            server, mode, prompt="Count to one thousand:", max_tokens=1400, ignore_eos=True, n=n
        ) as r:
            assert r.status_code == 200
            seen = [0] * n
            for line in r.iter_lines():
                if line:
                    seen[json.loads(line.removeprefix("data: "))["choices"][0]["index"]] += 1
                if min(seen) >= 2:  # every choice is past its first token: decoding
                    busy = _replica_stats(mode)  # still reading: the requests are live
                    break  # leaving the iterator closes the stream: the client is gone
        assert sum(s["num_running"] for s in busy) == n, busy
        if mode == "chunked":  # its decode steps' drafts hold blocks of the draft's pool
            assert any(_not_idle(s).get("num_used_draft_blocks") for s in busy), busy
        stats = _until_idle(mode, 15)
        assert all(s["num_running"] == 0 and s["num_waiting"] == 0 for s in stats)


def test_the_requests_of_a_colocated_apps_dead_ingress_replica_are_aborted(server):
    """Ray does not cancel a dead caller's calls: without the replicas' watch
    (deployments/callers.py) a request whose ingress replica was killed decodes its 2800
    tokens (seconds, even of the tiny model) for nobody. The colocated replica aborts it within
    seconds, and Serve's new ingress replica serves (the disaggregated replicas:
    test_replica_failure.py)."""
    from tests.ray_session import kill_ingress, until_served

    with _stream(
        server, "coloc", prompt="Count to one thousand:", max_tokens=2800, ignore_eos=True
    ) as r:
        chunks, lines = 0, r.iter_lines()
        for line in lines:
            chunks += line.startswith("data: {")
            if chunks == 2:  # decoding
                busy = _replica_stats("coloc")
                kill_ingress("coloc")
                break
        # the client stays until the proxy ends the stream: its leaving must not reach the
        # ingress first (that aborts the request too)
        with pytest.raises(httpx.HTTPError):
            for _ in lines:
                pass
    assert sum(s["num_running"] for s in busy) == 1, busy
    [stats] = _until_idle("coloc", 12)
    assert stats["num_orphaned_calls"] == 1  # ended by the watch, not by its last token
    deadline = time.monotonic() + 120
    # and where an operator sees it: counted in splitserve_orphaned_calls, and the replica's
    # running-requests gauge back at 0 (the last step before the abort counted 1;
    # checked before another request steps the engine)
    wanted = {"splitserve_orphaned_calls": None, "splitserve_running_requests": 0.0}
    while True:
        lines = httpx.get(server.metrics_url, timeout=10).text.splitlines()
        coloc = [line for line in lines if 'application="coloc"' in line]
        if all(
            any(name in line and value in (None, float(line.split()[-1])) for line in coloc)
            for name, value in wanted.items()
        ):
            break
        assert time.monotonic() < deadline, [line for line in coloc if "running" in line]
        time.sleep(1)
    hi = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    until_served(f"{server}/coloc", waiting=(500, 503), body=hi)  # Serve's new ingress replica


# how long after its last set a gauge series stays on the endpoint if nobody sets it again: what
# Ray's metrics agent keeps a series after its last export (two export intervals), + an export
# interval (the test cluster's, tests/ray_session.py: 5.6 s seen), + a margin
GAUGE_GONE_S = 3 * METRICS_INTERVAL_MS / 1000 + 2


def test_metrics_reach_the_prometheus_endpoint(server):
    """Every metric reaches the node's Prometheus endpoint, and the engine gauges stay there
    while the replicas are idle (Ray drops a gauge series that is not set again within two
    export intervals: deployments/metrics.py sets them again)."""
    for mode in MODES:
        assert _complete(server, mode, prompt=PROMPT, max_tokens=4).status_code == 200
    coloc_served = time.monotonic()  # the colocated replica's last step
    for _ in range(2):  # the disaggregated app's prefill replica caches its full blocks
        assert _complete(server, "disagg", prompt=PROMPT * 8, max_tokens=1).status_code == 200
    # the decode replica keeps n-gram drafts of a repetitive prompt
    drafted = {"prompt": "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,", "max_tokens": 24, "ignore_eos": True}
    assert _complete(server, "disagg", **drafted).status_code == 200
    wanted = [
        "splitserve_ttft_ms_bucket",
        "splitserve_tpot_ms_bucket",
        "splitserve_e2e_latency_ms",
        "splitserve_queue_time_ms",
        "splitserve_kv_transfer_ms",
        "splitserve_kv_transfer_bytes",
        "splitserve_running_requests",
        "splitserve_waiting_requests",
        "splitserve_queued_requests",
        "splitserve_kv_block_usage",
        "splitserve_prefix_cache_hit_tokens",
        "splitserve_prefix_cache_queried_tokens",
        "splitserve_request_prompt_tokens_bucket",
        "splitserve_request_generation_tokens_bucket",
        "splitserve_ttft_ms_exact_sum",  # a histogram's exact sum (deployments/metrics.py)
        "splitserve_prefill_time_ms_bucket",
        "splitserve_step_tokens_bucket",
        "splitserve_kv_cache_config",
        "splitserve_decode_time_ms_bucket",
        "vllm_inter_token_latency_seconds_bucket",  # under vLLM's name only
        "splitserve_prompt_tokens",
        "splitserve_generation_tokens",
        "splitserve_lora_adapters",
        "splitserve_lora_loads",
        "splitserve_spec_decode_draft_tokens",
        "splitserve_spec_decode_accepted_tokens",
        "splitserve_spec_decode_drafts",
        "splitserve_spec_decode_accepted_tokens_per_pos",
        'position="1"',  # its tag
        "splitserve_relayed_outputs",
        "splitserve_ingress_loop_lag_ms_bucket",
    ]
    wanted += ['phase="decode"', 'phase="prefill"', 'mode="colocated"']  # and their tags
    # each app's requests against its own targets (the other apps count none)
    slo_series = {("disagg", "both"), ("coloc", "ttft")}
    ours = re.compile("|".join(f'application="{name}"' for name in MODES))
    deadline = time.monotonic() + 60
    while True:  # Ray exports metrics every few seconds, each replica's on its own
        # this module's applications' series: the shared cluster ran others before
        lines = httpx.get(server.metrics_url, timeout=10).text.splitlines()
        text = "\n".join(line for line in lines if ours.search(line))
        counted = {_labels(line, "application", "met") for line in text.splitlines()}
        missing = [name for name in wanted if name not in text] + sorted(slo_series - counted)
        if not missing:
            break
        assert time.monotonic() < deadline, missing
        time.sleep(1)
    # idle until a gauge nobody set again is gone (without the refresh, the coloc gauges were)
    time.sleep(max(0.0, coloc_served + GAUGE_GONE_S + 4 - time.monotonic()))
    lines = httpx.get(server.metrics_url, timeout=10).text.splitlines()
    for gauge in ("splitserve_running_requests", "splitserve_kv_block_usage"):
        assert any(gauge in line and 'application="coloc"' in line for line in lines), gauge


def test_the_api_port_serves_the_applications_metrics(server):
    """GET /metrics on an application's route, as vLLM serves it: the application's series on
    the node's Prometheus endpoint (its own and Serve's), value for value, no other's; and
    each that vLLM has a name for under that name too (app/vllm_metrics.py), in its units."""
    assert _complete(server, "disagg", prompt=PROMPT, max_tokens=2).status_code == 200
    for _ in range(2):  # the prefill replica looks its prefix cache up, and hits
        assert _complete(server, "disagg", prompt=PROMPT * 8, max_tokens=1).status_code == 200
    counted = {
        "ray_splitserve_requests_total",
        "ray_splitserve_ttft_ms_count",
        "ray_splitserve_request_prompt_tokens_count",
        "ray_splitserve_prompt_tokens_total",
        "ray_splitserve_prefix_cache_queried_tokens_total",
        "ray_splitserve_prefix_cache_hit_tokens_total",
        "ray_splitserve_prefill_time_ms_count",
        "ray_splitserve_decode_time_ms_count",
        "ray_splitserve_step_tokens_count",
        "ray_splitserve_waiting_requests",
        "ray_splitserve_pending_kv_imports",
    }
    own, steady, page = _steady_page(server, "disagg", lambda _, s: counted <= {k[0] for k in s})
    assert page.headers["content-type"].startswith("text/plain")
    ours = _series(page.text)
    assert ours.keys() == _series(page.text, "disagg").keys()  # only the application's
    # the node's histogram sums are their buckets' midpoints (Ray's export); the page shows
    # in their place the exact sums counted beside them (deployments.metrics.Histogram)
    exact = {
        (name.replace("_exact_sum_total", "_sum"), labels): value
        for (name, labels), value in steady.items()
        if name.endswith("_exact_sum_total")
    }
    assert {"ray_splitserve_ttft_ms_sum", "ray_splitserve_request_prompt_tokens_sum"} <= {
        name for name, _ in exact
    }
    assert not any("_exact_sum" in name for name, _ in ours)
    assert {k for k in own if "_exact_sum" not in k[0]} <= ours.keys()
    rest = {k: v for k, v in steady.items() if not k[0].endswith(("_sum", "_exact_sum_total"))}
    assert rest.items() <= ours.items()
    assert exact.items() <= ours.items()
    assert any(k[0].startswith("ray_serve_") for k in ours)  # Serve's per-application ones
    theirs = {k: v for k, v in ours.items() if k[0].startswith("vllm:")}
    assert {dict(k[1])["model_name"] for k in theirs} == {MODEL}
    for (name, labels), value in ours.items():
        labels = {**dict(labels), "model_name": MODEL}
        if name.startswith("ray_splitserve_ttft_ms_"):  # milliseconds -> seconds
            name = name.replace("ray_splitserve_ttft_ms", "vllm:time_to_first_token_seconds")
            value = value / 1000 if name.endswith("_sum") else value
            if labels.get("le", "+Inf") != "+Inf":
                labels["le"] = str(float(labels["le"]) / 1000)
        elif name == "ray_splitserve_requests_total":
            name, labels["finished_reason"] = "vllm:request_success_total", labels.pop("finish")
        else:
            continue
        assert theirs[name, tuple(sorted(labels.items()))] == pytest.approx(value)

    def total(name: str) -> float:
        return sum(v for k, v in theirs.items() if k[0] == name)

    # the ingress counts each finished request's prompt once, as vLLM's histogram and counter
    # (the histogram's sum the exact one)
    assert total("vllm:request_prompt_tokens_count") == total("vllm:request_success_total")
    assert total("vllm:request_prompt_tokens_sum") == total("vllm:prompt_tokens_total") > 0
    queried, hits = total("vllm:prefix_cache_queries_total"), total("vllm:prefix_cache_hits_total")
    assert queried >= hits > 0  # PROMPT * 8's second start took its full blocks
    # each finished request's first token and the rest of its stream make up its latency
    # (exact sums); the prefill replica timed its prompts
    e2e = "vllm:e2e_request_latency_seconds"
    assert total(f"{e2e}_count") == total("vllm:request_decode_time_seconds_count")
    assert total("vllm:time_to_first_token_seconds_sum") + total(
        "vllm:request_decode_time_seconds_sum"
    ) == pytest.approx(total(f"{e2e}_sum"), rel=1e-6)
    prefill_times = {
        (dict(k[1])["phase"], k[0].rsplit("_", 1)[1]): v
        for k, v in theirs.items()
        if k[0].startswith("vllm:request_prefill_time_seconds_") and "le" not in dict(k[1])
    }
    assert prefill_times.keys() == {("prefill", "count"), ("prefill", "sum")}
    assert prefill_times["prefill", "sum"] > 0 and prefill_times["prefill", "count"] >= 3
    # each phase's engine steps, each of a token or more (the prefill's: its prompts')
    steps = {
        (dict(k[1])["phase"], k[0].rsplit("_", 1)[1]): v
        for k, v in theirs.items()
        if k[0].startswith("vllm:iteration_tokens_total_") and "le" not in dict(k[1])
    }
    for phase in ("prefill", "decode"):
        assert steps[phase, "sum"] >= steps[phase, "count"] > 0
    assert steps["prefill", "sum"] / steps["prefill", "count"] > 1
    # each replica's KV cache, as vLLM's info series says it (the app's configured blocks)
    caches = {
        dict(k[1])["phase"]: {n: dict(k[1])[n] for n in ("block_size", "num_gpu_blocks")}
        | {"caching": dict(k[1])["enable_prefix_caching"], "value": v}
        for k, v in theirs.items()
        if k[0] == "vllm:cache_config_info"
    }
    assert caches == {
        "prefill": {"block_size": "16", "num_gpu_blocks": "182", "caching": "True", "value": 1},
        "decode": {"block_size": "16", "num_gpu_blocks": "182", "caching": "False", "value": 1},
    }

    # vLLM's waiting requests: each replica's queue and hand-offs waiting for its blocks
    def by_replica(name: str, series: dict) -> dict:
        return {
            (dict(k[1])["phase"], dict(k[1])["replica"]): v
            for k, v in series.items()
            if k[0] == name
        }

    waiting = by_replica("ray_splitserve_waiting_requests", steady)
    pending = by_replica("ray_splitserve_pending_kv_imports", steady)
    assert {phase for phase, _ in waiting} == {"prefill", "decode"}
    assert by_replica("vllm:num_requests_waiting", theirs) == {
        r: waiting[r] + pending[r] for r in waiting
    }


def test_inter_token_and_inference_times_add_up(server):
    """vLLM's inter-token latency, timed at the ingress: one observation per output it relays
    after a request's first, as it comes. Over finished requests, then, the count is the
    outputs relayed less one a request (not the tokens: the decode replica's n-gram drafts put
    several in an output), and the exact sum each request's first token -> last. vLLM's
    inference time, one a request: the prefill replica's prefill time, then that."""
    itl = "ray_vllm_inter_token_latency_seconds"  # recorded under vLLM's name only
    ours = ("requests_total", "relayed_outputs_total", "generation_tokens_total")
    ours += ("decode_time_ms_exact_sum_total", "inference_time_ms_count")
    ours += ("inference_time_ms_exact_sum_total", "prefill_time_ms_count")
    ours += ("prefill_time_ms_exact_sum_total",)
    names = (f"{itl}_count", f"{itl}_exact_sum_total", *(f"ray_splitserve_{n}" for n in ours))

    def totals(series: dict) -> dict[str, float]:
        return {n: sum(v for k, v in series.items() if k[0] == n) for n in names}

    def held(own: dict, steady: dict) -> bool:  # every sample of those series
        return all(k in steady for k in own if k[0] in names)

    twins = ("ray_splitserve_", "ray_vllm_")
    before = {}
    while True:  # the earlier tests' requests all exported: two reads an export apart agree
        last, before = before, totals(_steady_page(server, "disagg", held, twins)[1])
        if before == last:
            break
        time.sleep(2 * METRICS_INTERVAL_MS / 1000)
    drafted = {"prompt": "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,", "max_tokens": 24, "ignore_eos": True}
    assert _complete(server, "disagg", **drafted).status_code == 200
    assert _complete(server, "disagg", prompt=PROMPT, max_tokens=6).status_code == 200
    with _stream(server, "disagg", prompt=PROMPT, max_tokens=8, ignore_eos=True) as r:
        assert r.status_code == 200 and r.read().endswith(b"data: [DONE]\n\n")
    requests = "ray_splitserve_requests_total"

    prefills = "ray_splitserve_prefill_time_ms_count"  # the prefill replica's, exported apart

    def counted(own: dict, steady: dict) -> bool:
        now = totals(steady)
        grew = [now[n] - before[n] for n in (requests, prefills)]
        return held(own, steady) and min(grew) >= 3

    _, steady, page = _steady_page(server, "disagg", counted, twins)
    grew = {n: v - before[n] for n, v in totals(steady).items()}
    outputs = grew["ray_splitserve_relayed_outputs_total"]
    assert grew[f"{itl}_count"] == outputs - grew[requests] > 0
    assert outputs <= grew["ray_splitserve_generation_tokens_total"]
    decode_ms = grew["ray_splitserve_decode_time_ms_exact_sum_total"]
    assert grew[f"{itl}_exact_sum_total"] * 1000 == pytest.approx(decode_ms, rel=1e-6)
    assert grew["ray_splitserve_inference_time_ms_count"] == grew[requests] == grew[prefills]
    assert grew["ray_splitserve_inference_time_ms_exact_sum_total"] == pytest.approx(
        grew["ray_splitserve_prefill_time_ms_exact_sum_total"] + decode_ms, rel=1e-6
    )
    # on the API port under vLLM's own name, the sum the exact one
    theirs = _series(page.text, "disagg")

    def total(name: str) -> float:
        return sum(v for k, v in theirs.items() if k[0] == name)

    assert total("vllm:inter_token_latency_seconds_count") == totals(steady)[f"{itl}_count"]
    assert total("vllm:inter_token_latency_seconds_sum") == pytest.approx(
        totals(steady)[f"{itl}_exact_sum_total"], rel=1e-9
    )


def test_ray_serve_llms_dashboard_finds_our_series(server):
    """Ray's own Grafana dashboard for Ray Serve LLM charts its engines' vLLM series as
    Ray's Prometheus names them (ray_vllm_*), per replica through their WorkerId: each that we
    record is on the node's endpoint, labelled with the model, from a replica of ours."""
    import inspect

    from ray.dashboard.modules.metrics.dashboards import serve_llm_dashboard_panels

    from tests.test_vllm_metrics import VLLM_NAMES

    source = inspect.getsource(serve_llm_dashboard_panels)
    charted = set(re.findall(r"ray_vllm_[a-z0-9_]+", source))

    def ours(name: str) -> bool:
        base = name.removeprefix("ray_vllm_")
        return any(base.removesuffix(end) in VLLM_NAMES for end in ("", *HISTOGRAM_ENDS))

    # a histogram's panels name its base (their code adds _bucket, _sum, _count)
    wanted = {name for name in charted if ours(name)}
    assert len(wanted) >= 16, sorted(charted)  # TTFT, TPOT, e2e, queue, prefill, decode, ...
    wanted = {n if n.endswith(HISTOGRAM_ENDS) or n in GAUGES else f"{n}_count" for n in wanted}
    for _ in range(2):  # the prefill replica looks its prefix cache up, and hits
        assert _complete(server, "disagg", prompt=PROMPT * 8, max_tokens=2).status_code == 200
    deadline = time.monotonic() + 60
    while True:
        samples = _series(httpx.get(server.metrics_url, timeout=10).text, "disagg")
        found = {name for name, _ in samples}
        if wanted <= found:
            break
        assert time.monotonic() < deadline, sorted(wanted - found)
        time.sleep(1)
    replicas = {
        dict(labels)["WorkerId"]
        for name, labels in samples
        if name == "ray_serve_deployment_request_counter_total"
    }
    for name, labels in samples:
        if name in wanted:
            assert dict(labels)["model_name"] == MODEL, name
            assert dict(labels)["WorkerId"] in replicas, name  # the dashboard's join


HISTOGRAM_ENDS = ("_bucket", "_sum", "_count", "_total")
GAUGES = {f"ray_vllm_{n}" for n in ("num_requests_running", "num_requests_waiting")}
GAUGES |= {"ray_vllm_kv_cache_usage_perc"}


def _steady_page(
    server, app: str, done, prefixes: tuple[str, ...] = ("ray_splitserve_",)
) -> tuple[dict, dict, httpx.Response]:
    """The application's GET /metrics page, read between two reads of the node's endpoint,
    once `done(own, steady)`: own, each series named with one of `prefixes` (ours by default)
    that both reads hold (some of Serve's come and go); steady, those of them with the value
    of both (an export between the reads changes some: the loop-lag histogram grows every
    100 ms)."""
    deadline = time.monotonic() + 60
    while True:
        before = _series(httpx.get(server.metrics_url, timeout=10).text, app)
        page = httpx.get(f"{server}/{app}/metrics", timeout=30)
        after = _series(httpx.get(server.metrics_url, timeout=10).text, app)
        assert page.status_code == 200, page.text
        own = {k: v for k, v in after.items() if k[0].startswith(prefixes)}
        own = {k: v for k, v in own.items() if k in before}
        steady = {k: v for k, v in own.items() if before[k] == v}
        if done(own, steady):
            return own, steady, page
        assert time.monotonic() < deadline, sorted({k[0] for k in steady})
        time.sleep(1)


def _series(text: str, app: str | None = None) -> dict[tuple, float]:
    """A Prometheus page's samples (of the application `app` only, if given): (name, sorted
    labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    if app is not None:  # the node's page is megabytes, mostly Ray's own: parse only what
        # may be the app's (each of its samples holds the label as written; the parsed
        # labels still decide)
        needle = f'application="{app}"'
        text = "\n".join(line for line in text.splitlines() if needle in line) + "\n"
    samples = (s for f in text_string_to_metric_families(text) for s in f.samples)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for s in samples
        if app is None or s.labels.get("application") == app
    }


def _labels(line: str, *names: str) -> tuple[str | None, ...]:
    """A Prometheus sample's values of the labels `names` (None where it has none)."""
    found = [re.search(rf'[{{,]{name}="([^"]*)"', line) for name in names]
    return tuple(m and m[1] for m in found)


def test_load_generator_records_every_request_against_the_live_server(server):
    """Sampled requests (vLLM's benchmark flags), sent on their schedule and timed."""
    import argparse
    import asyncio

    from bench.loadgen import add_workload_args, make_requests, run
    from bench.metrics import SLO, summarize

    parser = argparse.ArgumentParser()
    add_workload_args(parser)
    flags = "--input-len 16 --output-len 6 --seed 1 --temperature 0.8 --top-p 0.9 --top-k 40"
    requests = make_requests(parser.parse_args([*flags.split(), "--min-p", "0.05"]), None, 4.0, 4)
    assert requests[0].sampling == {"temperature": 0.8, "top_p": 0.9, "top_k": 40, "min_p": 0.05}
    records, duration = asyncio.run(run(f"{server}/disagg", MODEL, requests, progress=False))
    assert all(r.ok for r in records), [r.error for r in records]
    assert [r.num_output_tokens for r in records] == [6] * 4  # ignore_eos forces the length
    assert all(0 < r.ttft_s < 30 and 0 < r.tpot_s < 5 for r in records)
    starts = [r.arrival_s for r in records]
    gaps = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    expected = [b.arrival_s - a.arrival_s for a, b in zip(requests, requests[1:], strict=False)]
    assert gaps == pytest.approx(expected, abs=0.1)  # sent on the schedule (open loop)
    assert max(expected) > 0.2  # the schedule is spread enough for that tolerance to mean something
    summary = summarize(records, SLO(60, 10), duration)
    assert summary["attainment"] == 1.0 and summary["errors"] == 0


def test_load_generator_reports_http_errors_as_failed_requests(server):
    import asyncio

    from bench.loadgen import LoadRequest, run

    bad = [  # max_tokens 0, a top_p of 0: the server answers 400 (the sampling reaches it)
        LoadRequest(0.0, "hi", 0),
        LoadRequest(0.0, "hi", 4, sampling={"temperature": 1.0, "top_p": 0.0}),
    ]
    records, _ = asyncio.run(run(f"{server}/disagg", MODEL, bad, progress=False))
    assert [r.error[:8] for r in records] == ["HTTP 400"] * 2 and "top_p" in records[1].error
