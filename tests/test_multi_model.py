"""Several models behind one endpoint (app.builder:build_multi_model_app, app/model_router.py),
end to end on the session's Ray cluster over real HTTP: two models (the default model twice,
disaggregated and colocated, with LoRA adapters of their own), each request served by the
model its `model` names, answered as that model answers alone."""

from __future__ import annotations

import time

import httpx
import pytest
from openai import NotFoundError, OpenAI

pytestmark = [pytest.mark.serve, pytest.mark.model]

APP = "multi"
SMALL = {"num_cpus": 0.5, "engine": {"num_threads": 1, "kv_cache_memory_mb": 64}}
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def models(lora_adapters, lora_dir) -> list[dict]:
    return [
        {
            "served_model_name": "smol-pd",
            "prefill": SMALL,
            "decode": SMALL,
            "lora_modules": {"pd-sql": lora_adapters["sql"]},
            "ingress": {"responses_store_size": 8},
        },
        {
            "served_model_name": "smol-co",
            "mode": "colocated",
            "colocated": SMALL,
            "lora_dir": lora_dir,
        },
    ]


@pytest.fixture(scope="module")
def url(ray_serve, models):
    from app.builder import build_multi_model_app
    from tests.ray_session import deploy, undeploy

    deploy({APP: (f"/{APP}", build_multi_model_app({"models": models}))})
    yield f"{ray_serve.url}/{APP}"
    undeploy([APP])


@pytest.fixture(scope="module")
def client(url) -> OpenAI:
    return OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def engine_alone(paged_model, tokenizer):
    from engine import EngineConfig, LLMEngine, SamplingParams
    from engine.model_runner import ModelRunner

    engine = LLMEngine(EngineConfig(), runner=ModelRunner(paged_model, 64, 16), tokenizer=tokenizer)
    [out] = engine.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))
    return out


def test_every_model_and_adapter_is_listed_and_ready(url, client):
    ids = [m.id for m in client.models.list()]
    assert ids == ["smol-pd", "pd-sql", "smol-co", "dora", "poet", "sql"]
    assert client.models.retrieve("poet").model_extra["parent"] == "smol-co"
    health = httpx.get(f"{url}/health", timeout=30)
    assert (health.status_code, health.json()) == (200, {"status": "ok"})


def test_each_model_serves_the_engines_greedy_tokens(client, engine_alone):
    for model in ("smol-pd", "smol-co"):
        whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
        assert (whole.model, whole.choices[0].text) == (model, engine_alone.text)
        assert whole.usage.completion_tokens == len(engine_alone.token_ids)
        stream = client.completions.create(
            model=model, prompt=PROMPT, max_tokens=8, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == engine_alone.text
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
        assert chat.choices[0].finish_reason in ("length", "stop")


def test_the_metrics_page_holds_every_models_series(url, client):
    """/metrics (app/metrics_page.py) names no model: the router answers it with the whole
    application's series, each model's Ingress's among them, and each model's under vLLM's
    names with its own model_name (app/vllm_metrics.py)."""
    from prometheus_client.parser import text_string_to_metric_families

    for model in ("smol-pd", "smol-co"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
    deadline = time.monotonic() + 60
    while True:  # until Ray has exported both Ingresses' first-token times
        page = httpx.get(f"{url}/metrics", timeout=30)
        assert page.status_code == 200, page.text
        samples = [s for f in text_string_to_metric_families(page.text) for s in f.samples]
        counts = {
            (s.labels["deployment"], s.labels.get("model_name")): s.value
            for s in samples
            if s.name in ("ray_splitserve_ttft_ms_count", "vllm:time_to_first_token_seconds_count")
        }
        if len(counts) == 4:
            break
        assert time.monotonic() < deadline, counts
        time.sleep(1)
    assert {s.labels["application"] for s in samples} == {APP}
    # each Ingress's count under both names; vLLM's with the model that Ingress serves
    for model in ("smol-pd", "smol-co"):
        assert counts[f"Ingress:{model}", model] == counts[f"Ingress:{model}", None] >= 1


def test_an_adapter_is_served_by_its_model(client, engine_alone):
    """pd-sql (smol-pd's lora_modules) and sql (smol-co's lora_dir) are one adapter on one
    base model: the same tokens, which are not the base model's."""
    texts = [
        client.completions.create(model=m, prompt=PROMPT, max_tokens=8, temperature=0)
        .choices[0]
        .text
        for m in ("pd-sql", "sql")
    ]
    assert texts[0] == texts[1] != engine_alone.text


def test_a_browser_page_may_call_the_router(url):
    """CORS at the router (vLLM's defaults): a preflight answered, and each answer to a page
    says it may read it once (the model's Ingress, behind the router, adds none)."""
    page = {"origin": "https://chat.example"}
    preflight = {**page, "access-control-request-method": "POST"}
    r = httpx.options(f"{url}/v1/chat/completions", headers=preflight, timeout=30)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "*"
    body = {"model": "smol-co", "prompt": PROMPT, "max_tokens": 2}
    for route, sent in (("completions", body), ("completions", {**body, "model": "nope"})):
        r = httpx.post(f"{url}/v1/{route}", json=sent, headers=page, timeout=60)
        assert r.headers.get_list("access-control-allow-origin") == ["*"], r.status_code
    r = httpx.get(f"{url}/v1/models", headers=page, timeout=30)
    assert r.headers.get_list("access-control-allow-origin") == ["*"]


def test_errors_are_the_models_own(url, client):
    with pytest.raises(NotFoundError, match="model 'nope' does not exist"):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    unnamed = httpx.post(f"{url}/v1/completions", json={"prompt": "x"}, timeout=30)
    assert unnamed.status_code == 400  # Ray Serve LLM's: which model is the client's to say
    assert unnamed.json()["error"]["message"].startswith("model is required: this server serves")
    malformed = httpx.post(f"{url}/v1/completions", content=b"{bad", timeout=30)
    assert malformed.status_code == 400
    assert malformed.json()["error"]["message"].startswith("request body is not valid JSON")
    too_long = httpx.post(
        f"{url}/v1/completions",
        json={"model": "smol-co", "prompt": "hi " * 9000, "max_tokens": 2},
        timeout=60,
    )
    assert too_long.status_code == 400, too_long.text
    assert too_long.json()["error"]["type"] == "invalid_request_error"


def test_a_stored_response_is_found_whichever_model_made_it(url, client):
    made = client.responses.create(model="smol-co", input="Hello", max_output_tokens=6)
    assert client.responses.retrieve(made.id).output_text == made.output_text
    follow = client.responses.create(
        model="smol-pd", input="And?", previous_response_id=made.id, max_output_tokens=4
    )
    assert follow.model == "smol-pd"


def _stats(deployment: str) -> list[dict]:
    from tests.ray_session import every_replica_stats

    return every_replica_stats(APP, deployment)


def test_a_client_that_leaves_mid_stream_leaves_no_blocks(url):
    deployments = {
        "smol-pd": ("PrefillServer:smol-pd", "DecodeServer:smol-pd"),
        "smol-co": ("ColocatedServer:smol-co",),
    }
    for model, names in deployments.items():
        body = {"model": model, "prompt": "Count:", "max_tokens": 1000, "ignore_eos": True,
                "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
            chunks = 0
            for line in r.iter_lines():
                chunks += line.startswith("data: ")
                if chunks == 3:
                    assert sum(s["num_running"] for s in _stats(names[-1])) == 1
                    break  # the client is gone
        deadline = time.monotonic() + 15
        while True:
            stats = [s for name in names for s in _stats(name)]
            if all(
                s["num_free_blocks"] == s["num_kv_blocks"] and s["num_running"] == 0
                and s["num_kept_kv_transfers"] == 0
                for s in stats
            ):  # fmt: skip
                break
            assert time.monotonic() < deadline, (model, stats)
            time.sleep(0.5)


def test_each_name_names_one_model():
    from pydantic import ValidationError

    from app.config import MultiModelArgs

    twice = {"models": [{"served_model_name": "a"}, {"served_model_name": "a"}]}
    with pytest.raises(ValidationError, match="'a' is models\\[0\\]'s name already"):
        MultiModelArgs.model_validate(twice)
    adapter = {"models": [{"served_model_name": "a"}, {"served_model_name": "b",
               "lora_modules": {"a": "/nonexistent"}}]}  # fmt: skip
    with pytest.raises(ValidationError):
        MultiModelArgs.model_validate(adapter)
    apart = MultiModelArgs.model_validate(
        {"models": [{"served_model_name": "org/m"}, {"served_model_name": "m"}]}
    )
    assert apart.deployment_suffixes == [":org--m", ":m"]
