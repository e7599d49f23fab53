"""A request that leaves a sampling field out gets the model's generation-config default, as
vLLM's `--generation-config auto` gives it (else OpenAI's): read from generation_config.json,
replaced or added to by `override_generation_config`, or off with `generation_config: vllm`."""

from __future__ import annotations

import json

import pydantic
import pytest

from app.config import AppArgs
from app.protocol import ChatCompletionRequest, CompletionRequest, parse
from engine.model_store import generation_sampling_defaults

# Qwen2.5-Instruct's generation config, with a max_new_tokens
QWEN_LIKE = {
    "bos_token_id": 1,
    "eos_token_id": 2,
    "do_sample": True,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_new_tokens": 77,
}
WANT = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05, "max_tokens": 77}


def _generation_dir(tmp_path, config: dict):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "generation_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.fixture
def qwen_like_model(tmp_path, default_model_path):
    """The default model's files, with QWEN_LIKE for its generation config."""
    model = tmp_path / "model"
    model.mkdir()
    for f in default_model_path.iterdir():
        if f.name != "generation_config.json":
            (model / f.name).symlink_to(f)
    return _generation_dir(model, QWEN_LIKE)


def test_the_defaults_a_generation_config_sets_by_request_field(tmp_path):
    assert generation_sampling_defaults(_generation_dir(tmp_path / "q", QWEN_LIKE)) == WANT
    # token ids and HF-only switches (do_sample) are no sampling defaults
    plain = _generation_dir(tmp_path / "p", {"eos_token_id": 2, "do_sample": True})
    assert generation_sampling_defaults(plain) == {}
    assert generation_sampling_defaults(tmp_path / "none") == {}  # no generation_config.json


def test_auto_vllm_a_directory_and_overrides(tmp_path):
    model = _generation_dir(tmp_path / "model", QWEN_LIKE)
    other = _generation_dir(tmp_path / "other", {"temperature": 0.3})
    assert AppArgs().sampling_defaults(model) == WANT  # auto: the model's
    assert AppArgs(generation_config="vllm").sampling_defaults(model) == {}
    assert AppArgs(generation_config=str(other)).sampling_defaults(model) == {"temperature": 0.3}
    overridden = AppArgs(override_generation_config={"temperature": 0.1, "min_p": 0.05})
    assert overridden.sampling_defaults(model) == {**WANT, "temperature": 0.1, "min_p": 0.05}
    off = AppArgs(generation_config="vllm", override_generation_config={"max_new_tokens": 9})
    assert off.sampling_defaults(model) == {"max_tokens": 9}  # vLLM applies overrides alone too


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"override_generation_config": {"temprature": 0.5}}, "temprature"),
        ({"generation_config": "/no/such/dir"}, "/no/such/dir"),
    ],
)
def test_a_wrong_generation_setting_is_refused_naming_it(fields, needle):
    with pytest.raises(pydantic.ValidationError, match=needle):
        AppArgs(**fields)


@pytest.mark.parametrize("chat", [False, True])
def test_a_request_field_left_out_or_null_takes_the_default_and_one_sent_wins(chat):
    messages = {"messages": [{"role": "user", "content": "Hi"}]} if chat else {"prompt": "Hi"}
    kind = ChatCompletionRequest if chat else CompletionRequest

    def params(**fields):
        req = parse(json.dumps({"model": "m", **messages, **fields}).encode(), kind)
        return req.sampling_params(8, defaults=WANT)

    left_out = params()
    got = (left_out.temperature, left_out.top_p, left_out.top_k, left_out.repetition_penalty)
    assert got == (0.7, 0.8, 20, 1.05) and left_out.min_p == 0.0
    assert params(temperature=None).temperature == 0.7  # null: as if left out
    sent = params(temperature=0, top_p=1.0, top_k=0, repetition_penalty=1.0, min_p=0.1)
    assert (sent.temperature, sent.top_p, sent.top_k, sent.repetition_penalty) == (0, 1, 0, 1)
    assert sent.min_p == 0.1
    no_defaults = parse(json.dumps({"model": "m", **messages}).encode(), kind).sampling_params(8)
    assert (no_defaults.temperature, no_defaults.top_p, no_defaults.top_k) == (1.0, 1.0, 0)


@pytest.mark.model
def test_the_ingress_serves_the_models_defaults(qwen_like_model):
    """Through the ingress's own preparation of a request (what its replicas are sent): the
    model's defaults, and its max_new_tokens bounds a chat reply left without a limit."""
    from app.ingress import Ingress

    name = str(qwen_like_model)
    ingress = Ingress({"model": name})

    def params(served, **body):
        chat = "messages" in body
        raw = json.dumps({"model": name, **body}).encode()
        req = parse(raw, ChatCompletionRequest if chat else CompletionRequest)
        return served._prepare(req, chat, 100_000)[1]

    hi = [{"role": "user", "content": "Hi"}]
    got = params(ingress, messages=hi)
    assert (got.temperature, got.top_k, got.max_tokens) == (0.7, 20, 77)
    got = params(ingress, messages=hi, max_tokens=200, temperature=0)
    assert (got.temperature, got.top_k, got.max_tokens) == (0, 20, 200)
    got = params(ingress, prompt="Hi")
    assert (got.top_p, got.max_tokens) == (0.8, 16)  # completions: OpenAI's 16, as vLLM's
    plain = params(Ingress({"model": name, "generation_config": "vllm"}), messages=hi)
    assert (plain.temperature, plain.top_k) == (1.0, 0) and plain.max_tokens > 77
