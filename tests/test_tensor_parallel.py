"""Tensor and pipeline parallel replicas on a private Ray cluster (gloo on CPU, a tiny Llama):
their outputs equal a single worker's, and the KV hand-off between different layouts works."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from pathlib import Path

import pytest
import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kv_handoff import finish_all, open_all, total_bytes
from engine.lora import LoRAError
from engine.model_runner import ModelInput, SeqInput
from engine.spec_decode import SpeculativeConfig
from engine.workers import WorkerGroupFailed
from kvkernels.kv_channel import KVChannel
from tests.conftest import FakeProbe, drain
from tests.ray_session import until_served

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a land far"]
GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(ray_serve):
    """The session's shared Ray cluster (the worker actors' home): its node id."""
    return ray_serve.node_id


def make(path: str, tp: int = 1, pp: int = 1) -> LLMEngine:
    return LLMEngine(_config(path, tp, pp, num_kv_blocks=64))


def _config(path: str, tp: int = 1, pp: int = 1, num_kv_blocks: int | None = None, **more):
    return EngineConfig(
        model=path,
        tensor_parallel_size=tp,
        pipeline_parallel_size=pp,
        worker_num_cpus=0.5,
        num_threads=1,
        num_kv_blocks=num_kv_blocks,
        **more,
    )


def close(engine: LLMEngine) -> None:
    shutdown = getattr(engine.runner, "shutdown", None)
    if shutdown is not None:
        shutdown()


@pytest.fixture(scope="module")
def single(cluster, tiny_llama_path):
    engine = make(tiny_llama_path)
    yield engine


@pytest.fixture(scope="module")
def reference(single):
    return [c.token_ids for c in single.generate(PROMPTS, GREEDY)]


# One tp=2 and one pp=2 replica for the tests that leave them idle with every block free (each
# asserts it): starting a worker group costs seconds of imports per worker on 2 cores.
@pytest.fixture(scope="module")
def tp2(cluster, tiny_llama_path):
    engine = make(tiny_llama_path, tp=2)
    yield engine
    close(engine)


# of the share's 2 GiB (0.5 of 4), 1 GiB is CUDA's own: ~4 MiB left for the cache
PP2_PEAK = 2**30 - 2**22


@pytest.fixture(scope="module")
def pp2(cluster, tiny_llama_path):
    """Its KV cache sized by gpu_memory_utilization, the workers' devices described by a fake
    (sent to each worker with the share): every test of it runs on a cache so sized."""
    from engine.model_runner import MemoryShare
    from engine.workers import WorkerGroupRunner

    config = _config(tiny_llama_path, pp=2)
    device = FakeProbe(total_bytes=4 * 2**30, free_bytes=4 * 2**30, peak_bytes=PP2_PEAK)
    share = MemoryShare(0.5, tokens=64, seqs=2, probe=device)
    runner = WorkerGroupRunner(tiny_llama_path, config, config.parallel, memory_share=share)
    engine = LLMEngine(config, runner=runner)
    yield engine
    close(engine)


def _batch() -> ModelInput:  # two prefills and a continuation in one flattened step
    return ModelInput(
        [
            SeqInput(list(range(100, 120)), 0, [0, 1], True),
            SeqInput(list(range(300, 305)), 0, [2], True),
        ]
    )


@pytest.mark.parametrize("layout", ["tp2", "pp2", "tp2pp2"])
def test_parallel_replica_matches_one_worker(layout, request, single, reference, tiny_llama_path):
    shared = layout in ("tp2", "pp2")
    engine = request.getfixturevalue(layout) if shared else make(tiny_llama_path, 2, 2)
    try:
        assert engine.runner.num_kv_blocks == 64 or layout == "pp2"  # pp2: by its share
        assert [c.token_ids for c in engine.generate(PROMPTS, GREEDY)] == reference
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
        # a row of logits per prompt token comes back from the last stage too
        scored = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2)
        [got], [want] = engine.generate(PROMPTS[2:], scored), single.generate(PROMPTS[2:], scored)
        assert [lp and lp.top[0][0] for lp in got.prompt_logprobs] == [
            lp and lp.top[0][0] for lp in want.prompt_logprobs
        ]
        torch.testing.assert_close(
            [lp.logprob for lp in got.prompt_logprobs[1:]],
            [lp.logprob for lp in want.prompt_logprobs[1:]],
            rtol=1e-4,
            atol=1e-4,
        )
        # the logits themselves, not only their argmax; the step writes the KV of its blocks
        # before reading them, so what earlier requests left in the caches does not matter
        got = engine.runner.execute(_batch())
        want = single.runner.execute(_batch())
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        # then a speculative decode's verify step: tokens after the cached 20, a row each
        verify = ModelInput([SeqInput(list(range(120, 125)), 20, [0, 1], True, True)])
        got, want = engine.runner.execute(verify), single.runner.execute(verify)
        assert got.shape[0] == 5
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    finally:
        if not shared:
            close(engine)


@pytest.mark.parametrize(
    "kind, tp, pp, changes",
    [
        ("deepseek_v3", 2, 1, {}),
        ("gpt_oss", 2, 1, {}),
        ("granite", 2, 1, {"embedding_multiplier": 3.0}),  # and its logits scaled by 1 / 2
        ("phi3", 2, 1, {"num_key_value_heads": 2, "partial_rotary_factor": 0.5}),  # Phi-4-mini's
        ("llama4", 2, 1, {"no_rope_layers": [1, 0], "interleave_moe_layer_step": 2}),
        ("opt", 2, 1, {"ffn_dim": 96, "word_embed_proj_dim": 32, "do_layer_norm_before": False}),
        ("gemma3", 1, 2, {"final_logit_softcapping": 3.0}),
    ],
)
def test_other_families_split_over_two_workers_match_one_worker(
    kind, tp, pp, changes, cluster, tmp_path, tokenizer
):
    """Tiny models whose layers or whose model's forward differ from Llama's, on two workers:
    DeepSeek V3 (latent attention split by heads; experts in gate and up halves, a shared
    one), gpt-oss (interleaved, biased experts; attention sinks; sliding layers), Granite
    (embeddings and logits scaled), Phi-3 (fused q, k, v and gate, up; a partial rotary
    embedding), Llama 4 (a dense chunked layer, then one of experts and a shared one without
    a rotary embedding, its query temperature growing from position 1), OPT-350m's shape
    (learned positions, embeddings projected in and out, norms after the sublayers), Gemma 3
    at pp2 (a
    rotary embedding per layer type, the second stage's layers typed by their model index;
    logits softcapped). The logits and greedy tokens equal one worker's."""
    path = _tiny(kind, changes, tmp_path, tokenizer)
    one, split = make(path), make(path, tp=tp, pp=pp)
    try:
        want = one.runner.execute(_batch())
        torch.testing.assert_close(split.runner.execute(_batch()), want, rtol=1e-4, atol=1e-4)
        tokens = [c.token_ids for c in one.generate(PROMPTS, GREEDY)]
        assert [c.token_ids for c in split.generate(PROMPTS, GREEDY)] == tokens
    finally:
        close(split)


def _tiny(kind: str, changes: dict, path, tokenizer) -> str:
    """A tiny random model of a family (tests/test_model_runner.py's), saved at path."""
    from tests.test_model_runner import FAMILIES

    config_cls, model_cls, extra = FAMILIES[kind]
    config = config_cls(
        **{**extra, "intermediate_size": 96, "vocab_size": len(tokenizer), **changes},
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_one_kv_head_replicated_over_tp2_serves_and_hands_off_both_ways(
    cluster, tmp_path, tokenizer
):
    """Qwen2 of 4 query heads and one KV head (k and v biased) at tp2: both ranks hold the KV
    head, each keeping its rows of k and v. The logits and greedy tokens equal one worker's,
    and in a hand-off from one worker the head goes to both ranks, while from tp2 only its
    first holder sends it (the other's copy would be the same bytes). Its vocabulary, one row
    more than the tokenizer's, is odd: the second rank's slice of the embedding and the LM
    head ends in a zero row, whose logit is cut after the gather."""
    path = _tiny("qwen2", {"vocab_size": len(tokenizer) + 1}, tmp_path, tokenizer)
    one, split = make(path), make(path, tp=2)
    channel = KVChannel("shm", cluster)
    try:
        logits = one.runner.execute(_batch())
        assert logits.shape[-1] == len(tokenizer) + 1
        torch.testing.assert_close(split.runner.execute(_batch()), logits, rtol=1e-4, atol=1e-4)
        want = [c.token_ids for c in one.generate(PROMPTS, GREEDY)]
        assert [c.token_ids for c in split.generate(PROMPTS, GREEDY)] == want
        tokens, pieces = _handoff(one, split, PROMPTS[1], channel)
        assert tokens == want[1] and sorted(p.spec.dst_rank for p in pieces) == [0, 1]
        tokens, pieces = _handoff(split, one, PROMPTS[2], channel)
        assert tokens == want[2] and [p.spec.src_rank for p in pieces] == [0]
    finally:
        close(split)


def _handoff(prefill: LLMEngine, decode: LLMEngine, prompt: str, channel: KVChannel):
    """prefill -> KV pieces on the channel -> decode; -> (token ids, pieces)."""
    rid = prefill.add_request(None, prompt, GREEDY, prefill_only=True)
    [first] = drain(prefill)[rid]
    handoff = prefill.kv_handoff(rid)
    pieces = prefill.runner.send_kv(list(handoff.block_ids), decode.config.parallel, channel)
    assert prefill.release(rid)
    own = decode.runner.opens_own_kv
    assert decode.import_request(handoff, pieces if own else open_all(channel, pieces))
    if not own:
        finish_all(channel, pieces)
    rest = [t for out in drain(decode)[rid] for t in out.new_token_ids]
    assert prefill.blocks.num_free_blocks == prefill.blocks.num_blocks
    assert decode.blocks.num_free_blocks == decode.blocks.num_blocks
    return first.new_token_ids + rest, pieces


def test_handoff_tp2_prefill_to_pp2_decode(cluster, single, reference, tp2, pp2):
    for prompt, want in zip(PROMPTS, reference, strict=True):
        tokens, pieces = _handoff(tp2, pp2, prompt, KVChannel("shm", cluster))
        assert tokens == want
    # each prefill rank sends only its KV heads, cut by decode stage: half the cache each
    n_blocks = pieces[0].transfer.shape[2]
    cache = single.runner.kv_cache[:, :, :n_blocks]
    whole = cache.numel() * cache.element_size()
    sent = total_bytes(pieces)
    assert len(pieces) == 4 and sent == {0: whole // 2, 1: whole // 2}


def test_handoff_single_prefill_to_tp2_decode(cluster, single, reference, tp2):
    channel = KVChannel("shm", cluster)
    for prompt, want in zip(PROMPTS, reference, strict=True):
        tokens, pieces = _handoff(single, tp2, prompt, channel)
        assert tokens == want
        assert sorted(p.spec.dst_rank for p in pieces) == [0, 1]


def test_tp2_prefill_to_single_decode(cluster, single, reference, tp2):
    tokens, pieces = _handoff(tp2, single, PROMPTS[0], KVChannel("shm", cluster))
    assert tokens == reference[0]
    assert sorted(p.spec.src_rank for p in pieces) == [0, 1]


def test_gpu_memory_utilization_sizes_a_parallel_replica(pp2):
    """vLLM's gpu_memory_utilization on a pipeline-parallel replica (pp2): both stages ran the
    largest step together on throwaway caches, each read its device, and the replica took the
    blocks the tightest worker's share holds (its greedy tokens: the test above)."""
    from engine.kv_memory import GIB, NON_TORCH_BYTES, sampler_bytes

    runner = pp2.runner
    # the profiled step: 2 sequences of 32 tokens on 4 throwaway blocks (taken out of the
    # peak), plus the sampler's rows; each stage holds 2 of the 4 layers
    per_block = runner.per_block
    measured = PP2_PEAK - 4 * per_block + sampler_bytes(2, runner.shape.vocab_size)
    want = (2 * GIB - measured - NON_TORCH_BYTES) // per_block
    assert runner.num_kv_blocks == want > 64
    assert pp2.blocks.num_blocks == want


# ---- a draft model (engine/draft_model.py), whole on the replica's first worker ----------------

DRAFTED = SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def drafted_reference(single) -> list[list[int]]:
    return [c.token_ids for c in single.generate(PROMPTS, DRAFTED)]


def test_a_draft_of_the_targets_weights_on_a_tp2_replica_has_every_draft_kept(
    cluster, tiny_llama_path, single, reference, drafted_reference
):
    """The draft runs on the first worker (the replica holds no draft), one call a step, with
    as many blocks as the replica's cache; the target's own weights as the draft: each greedy
    draft is the token the target draws there, so every one is kept; a request prefilled by
    another replica too, the draft catching its prompt up first."""
    from engine.workers import WorkerDraft

    spec = SpeculativeConfig(3, model=tiny_llama_path)
    engine = LLMEngine(_config(tiny_llama_path, tp=2, num_kv_blocks=64, speculative=spec))
    try:
        assert isinstance(engine.proposer.runner, WorkerDraft)
        assert engine.proposer.blocks.num_blocks == 64
        assert [c.token_ids for c in engine.generate(PROMPTS, DRAFTED)] == drafted_reference
        # 24 tokens after the first, 4 a step: 6 steps of 3 drafts for each prompt
        assert engine.num_draft_tokens == engine.num_accepted_tokens == 3 * 6 * 3
        tokens, _ = _handoff(single, engine, PROMPTS[1], KVChannel("shm", cluster))
        assert tokens == reference[1]
        assert engine.num_draft_tokens == engine.num_accepted_tokens > 3 * 6 * 3
        assert engine.proposer.blocks.num_free_blocks == 64
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    finally:
        close(engine)


def test_a_draft_on_a_pp2_replica_sized_by_gpu_memory_utilization(
    cluster, tiny_llama_path, drafted_reference, tmp_path
):
    """A draft of the target's first layers (it agrees on some tokens) on a pipeline-parallel
    replica whose cache fills each worker's share: the first worker's share holds the draft's
    blocks too (its weights on the device before the step is profiled), so the replica takes
    what that worker holds of both caches; the tokens are the target's alone."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from engine.kv_memory import GIB, NON_TORCH_BYTES, sampler_bytes
    from engine.model_runner import MemoryShare, ModelShape
    from engine.workers import WorkerGroupRunner

    draft = tmp_path / "draft"  # the target's first 3 of 4 layers: a fifth of its drafts kept
    first_layers = AutoModelForCausalLM.from_pretrained(tiny_llama_path, num_hidden_layers=3)
    first_layers.save_pretrained(draft)
    spec = SpeculativeConfig(3, model=str(draft))
    config = _config(tiny_llama_path, pp=2, speculative=spec)
    device = FakeProbe(total_bytes=4 * 2**30, free_bytes=4 * 2**30, peak_bytes=PP2_PEAK)
    share = MemoryShare(0.5, tokens=64, seqs=2, probe=device)
    runner = WorkerGroupRunner(tiny_llama_path, config, config.parallel, memory_share=share)
    engine = LLMEngine(config, runner=runner)
    try:
        measured = PP2_PEAK - 4 * runner.per_block + sampler_bytes(2, runner.shape.vocab_size)
        draft_shape = ModelShape.of(AutoConfig.from_pretrained(draft))
        draft_block = draft_shape.kv_bytes_per_token(torch.float32) * 16
        want = (2 * GIB - measured - NON_TORCH_BYTES) // (runner.per_block + draft_block)
        assert runner.num_kv_blocks == engine.proposer.blocks.num_blocks == want > 64
        assert [c.token_ids for c in engine.generate(PROMPTS, DRAFTED)] == drafted_reference
        assert 0 < engine.num_accepted_tokens < engine.num_draft_tokens
        assert engine.proposer.blocks.num_free_blocks == want
    finally:
        close(engine)


def test_a_draft_of_another_vocabulary_is_refused_before_a_worker_starts(
    tiny_llama_path, tmp_path, monkeypatch
):
    from transformers import LlamaConfig

    from engine.workers import WorkerGroupRunner

    LlamaConfig(hidden_size=32, num_attention_heads=2, vocab_size=1000).save_pretrained(tmp_path)
    spec = SpeculativeConfig(3, model=str(tmp_path))
    monkeypatch.setattr(WorkerGroupRunner, "_start", lambda *_: pytest.fail("workers started"))
    with pytest.raises(ValueError, match="its vocabulary has 1000 tokens, the target's 49152"):
        LLMEngine(_config(tiny_llama_path, tp=2, speculative=spec))


def test_a_dead_worker_fails_requests_and_the_replica(cluster, tiny_llama_path):
    import ray

    from deployments.engine_loop import EngineLoop

    engine = make(tiny_llama_path, tp=2)
    loop = EngineLoop(engine)

    async def run() -> list:
        params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
        outputs = []
        with pytest.raises(RuntimeError, match="engine step failed"):
            async for out in loop.generate("r1", engine.encode(PROMPTS[0]), params):
                outputs.append(out)
                if len(outputs) == 2:
                    ray.kill(engine.runner.workers[1])
        return outputs

    try:
        outputs = asyncio.run(asyncio.wait_for(run(), timeout=120))
        assert 2 <= len(outputs) < 400
        with pytest.raises(WorkerGroupFailed, match="worker died"):
            engine.runner.check_health()
        assert engine.blocks.num_free_blocks == engine.blocks.num_blocks
    finally:
        loop.shutdown()
        close(engine)


def _settled_cpus(timeout_s: float = 15.0) -> float:
    """The cluster's available CPUs once two reads a second apart agree (a run failed when
    an earlier test's workers gave back 0.5 CPU between this test's reads)."""
    import ray

    deadline, last = time.monotonic() + timeout_s, None
    while True:
        now = ray.available_resources().get("CPU", 0.0)
        if now == last or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(1.0)


def test_a_model_a_worker_cannot_split_is_refused_with_its_reason_and_no_worker_left(
    cluster, tmp_path, tokenizer
):
    """An MLP of 97 rows over 2 ranks: the worker's ValueError itself, not Ray's wrapper with
    its remote traceback, and both workers are gone while the error is still held (as Serve
    holds a replica's; its traceback's frames held the workers' handles)."""
    import ray
    from transformers import LlamaConfig, LlamaForCausalLM

    odd = dict(hidden_size=64, intermediate_size=97, num_hidden_layers=2, num_attention_heads=4)
    LlamaForCausalLM(LlamaConfig(**odd, vocab_size=len(tokenizer))).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    free = _settled_cpus()  # not while an earlier test's workers still give theirs back
    with pytest.raises(ValueError, match="cannot split a dimension of 97 over 2 ranks") as held:
        make(str(tmp_path), tp=2)
    deadline = time.monotonic() + 30  # the workers' CPUs come back once they are gone
    while ray.available_resources().get("CPU", 0.0) < free and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0.0) == free
    assert type(held.value) is ValueError


def test_planned_tp_pp_placement_starts_with_serve_and_serves(ray_serve, tiny_llama_path, single):
    """The optimizer, given only multi-worker layouts, emits TP/PP replicas; Serve's own
    schema accepts the file, and the application serves the single engine's greedy output,
    its decode replica verifying a draft model's drafts (on its first worker)."""
    import httpx
    import yaml
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from app.builder import build_app
    from placement.hardware import ModelSpec
    from placement.latency_model import Coefficients, Entry, Profile
    from placement.optimizer import Cluster, Search, optimize
    from placement.plan import serve_config
    from placement.simulator import SLO
    from placement.workload import Workload
    from tests.ray_session import deploy, undeploy

    tp2 = Entry(2, 1, Coefficients(5.0, 0.5, 0.0), Coefficients(10.0, 0.0, 1.0), 10**5)
    pp2 = Entry(1, 2, Coefficients(6.0, 0.6, 0.0), Coefficients(8.0, 0.0, 0.5), 10**5)
    search = Search(
        profile=Profile("tiny-llama", "cpu", [tp2, pp2]),
        workload=Workload(100, input_len=64, output_len=16),
        slo=SLO(ttft_ms=500, tpot_ms=40),
        cluster=Cluster(1, 4),
        kv_bytes_per_token=ModelSpec.from_config(tiny_llama_path, "float32").kv_bytes_per_token,
        max_replicas=1,
    )
    best = optimize(search)[0]
    config = yaml.safe_load(
        yaml.safe_dump(serve_config(best, search, {"model": tiny_llama_path}, threads=1))
    )
    ServeDeploySchema.parse_obj(config)  # Ray Serve's own schema for `serve deploy/run`
    [app] = config["applications"]
    layouts = [
        (
            app["args"][p]["engine"]["tensor_parallel_size"],
            app["args"][p]["engine"]["pipeline_parallel_size"],
        )
        for p in ("prefill", "decode")
        if p in app["args"]
    ] or [(app["args"]["colocated"]["engine"]["tensor_parallel_size"], 1)]
    assert all(tp * pp > 1 for tp, pp in layouts)
    # a dead worker is found by Serve's health check: three failed checks, 1 s apart here;
    # a hung one once the engine has spent 3 s in a step (the tiny model's take milliseconds)
    app["args"]["decode"]["health_check_period_s"] = 1.0
    app["args"]["decode"]["step_timeout_s"] = 3.0
    # and it speculates: a draft model (the target's weights) on its first worker
    draft = {"model": str(tiny_llama_path), "num_speculative_tokens": 3}
    app["args"]["decode"]["engine"]["speculative_config"] = draft
    url = f"{ray_serve.url}/v1/completions"
    deploy({"planned": ("/", build_app(app["args"]))})
    try:
        # served under the name it was configured by, its directory (as vLLM names a model)
        model = str(tiny_llama_path)
        assert httpx.get(f"{ray_serve.url}/v1/models").json()["data"][0]["id"] == model
        body = {"model": model, "prompt": PROMPTS[1], "max_tokens": 12,
                "temperature": 0, "ignore_eos": True}  # fmt: skip
        r = httpx.post(url, json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 12
        [want] = single.generate([PROMPTS[1]], GREEDY)
        assert r.json()["choices"][0]["text"] == want.text
        stats = serve.get_deployment_handle("DecodeServer", "planned").stats.remote().result()
        assert stats["num_draft_tokens"] == stats["num_accepted_tokens"] > 0  # every one kept
        assert stats["num_draft_free_blocks"] == stats["num_draft_kv_blocks"] > 0
        _kill_a_worker_then_recover(ray_serve.url, body)
        _hang_a_worker_then_recover(ray_serve.url, body)
    finally:
        undeploy(["planned"])


def _kill_a_worker_then_recover(base: str, body: dict) -> None:
    """A dead model worker fails the request with an OpenAI error (no hang); the replica's
    health check fails, Serve replaces it with fresh workers, and serving resumes."""
    import os
    import signal

    import httpx
    from ray import serve

    decode = serve.get_deployment_handle("DecodeServer", "planned")
    pids = decode.stats.remote().result()["worker_pids"]
    assert len(pids) == 2  # the planned decode replica runs tp1 x pp2
    os.kill(pids[-1], signal.SIGKILL)  # the last pipeline stage
    time.sleep(1)
    r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
    assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text
    assert "a model worker died" in r.json()["error"]["message"]
    assert _served_again(base, body)["usage"]["completion_tokens"] == 12


def _served_again(base: str, body: dict) -> dict:
    """The completion once Serve's replacement replica serves it (retried on any error)."""
    return until_served(base, waiting=range(400, 600), body=body, timeout_s=180)


def _hang_a_worker_then_recover(base: str, body: dict) -> None:
    """A model worker that hangs (stopped: alive, never answering) leaves the decode replica's
    engine in its step for good: past step_timeout_s the replica fails its health check and
    its request, whose client gets an OpenAI error instead of waiting forever, and Serve
    replaces the replica."""
    import os
    import signal

    import httpx
    from ray import serve

    decode = serve.get_deployment_handle("DecodeServer", "planned")
    stopped = decode.stats.remote().result()["worker_pids"][-1]
    os.kill(stopped, signal.SIGSTOP)
    try:
        start = time.monotonic()
        r = httpx.post(f"{base}/v1/completions", json=body, timeout=120)
        assert r.status_code == 503 and r.json()["error"]["type"] == "server_error", r.text
        assert "past step_timeout_s (3 s)" in r.json()["error"]["message"]  # the reason
        assert time.monotonic() - start < 60  # 3 s + a health check, not a client's timeout
        assert _served_again(base, body)["usage"]["completion_tokens"] == 12
        assert stopped not in decode.stats.remote().result()["worker_pids"]
    finally:
        with contextlib.suppress(ProcessLookupError):  # Ray kills it with the old replica
            os.kill(stopped, signal.SIGKILL)


@pytest.fixture(scope="module")
def tiny_lora(tiny_llama_path, tmp_path_factory) -> str:
    """A LoRA adapter of the tiny Llama on all seven linear layers, written by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(3)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_path)
    layers = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    config = LoraConfig(r=4, lora_alpha=32, target_modules=layers, init_lora_weights=False)
    path = tmp_path_factory.mktemp("tiny-lora")
    get_peft_model(base, config).save_pretrained(path)
    return str(path)


def test_a_lora_adapter_splits_over_workers_as_the_model_does(
    single, reference, tp2, pp2, tiny_lora, tmp_path
):
    """tp2: each rank holds B's rows of its column-parallel layers and A's columns of its
    row-parallel ones (their rank-r products all-reduced); pp2: each stage its own layers'
    part. A batch mixing the adapter with the base model gives one worker's tokens and
    logits. An adapter one stage cannot load is kept by none."""
    from safetensors.torch import load_file, save_file

    turns = ("t", None, "t")
    params = [
        SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, lora=lora) for lora in turns
    ]
    engines = (single, tp2, pp2)
    try:
        for engine in engines:
            engine.runner.load_lora("t", tiny_lora)
        want = [c.token_ids for c in single.generate(PROMPTS, params)]
        assert want[1] == reference[1] and want[0] != reference[0]  # the adapter matters
        for engine in (tp2, pp2):
            assert [c.token_ids for c in engine.generate(PROMPTS, params)] == want
        logits = []
        for engine in engines:
            slot = engine.runner.lora_slots["t"]
            batch = _batch()
            batch = ModelInput([dataclasses.replace(s, lora=slot) for s in batch.seqs[:1]])
            logits.append(engine.runner.execute(batch))
        for got in logits[1:]:
            torch.testing.assert_close(got, logits[0], rtol=1e-4, atol=1e-4)
    finally:
        for engine in engines:
            engine.runner.unload_lora("t")
    # the last stage's layer 3 of the wrong shape: the first stage had loaded it, and drops it
    (tmp_path / "bad").mkdir()
    tensors = load_file(f"{tiny_lora}/adapter_model.safetensors")
    tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 5)
    save_file(tensors, tmp_path / "bad" / "adapter_model.safetensors")
    config = (Path(tiny_lora) / "adapter_config.json").read_text()
    (tmp_path / "bad" / "adapter_config.json").write_text(config)
    with pytest.raises(LoRAError, match=r"layers.3.self_attn.q_proj.*\(4, 5\)"):
        pp2.runner.load_lora("bad", tmp_path / "bad")
    assert pp2.runner.lora_slots == {}
    pp2.runner.load_lora("bad", tiny_lora)  # the name is free again on every worker
    pp2.runner.unload_lora("bad")
    assert all(e.blocks.num_free_blocks == e.blocks.num_blocks for e in engines)
