"""vLLM's gpu_memory_utilization (engine/kv_memory.py): the profiled step's batch, the KV
cache's bytes from a device's memory, and the whole sizing through ModelRunner.from_pretrained
with the device's memory read by a fake probe (on this CPU: the CUDA reads themselves run in
tests/test_gpu.py on a GPU)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from app.config import AppArgs
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.kv_memory import GIB, NON_TORCH_BYTES, kv_cache_bytes, profile_batch, sampler_bytes
from engine.model_runner import MemoryShare, ModelRunner, ModelShape
from engine.spec_decode import SpeculativeConfig
from tests.conftest import FakeProbe


@pytest.mark.parametrize(
    ("tokens", "seqs", "max_len", "want"),
    [
        (100, 8, 64, [13, 13, 13, 13, 12, 12, 12, 12]),  # spread over max_num_seqs
        (1000, 2, 300, [250] * 4),  # more sequences than seqs where one cannot hold them
        (5, 32, 64, [1] * 5),  # no sequence without a token
        (2048, 1, 8192, [2048]),
    ],
)
def test_the_profiled_step_is_the_largest_the_scheduler_runs(tokens, seqs, max_len, want):
    batch = profile_batch(tokens, seqs, max_len, block_size=16)
    assert [len(s.token_ids) for s in batch.seqs] == want
    assert all(s.sample and s.start == 0 for s in batch.seqs)
    blocks = [b for s in batch.seqs for b in s.block_table]
    assert blocks == list(range(len(blocks)))  # each sequence its own blocks, from block 0
    assert all(len(s.block_table) * 16 >= len(s.token_ids) for s in batch.seqs)


def test_the_kv_cache_takes_what_the_share_leaves():
    total, peak = 80 * GIB, 5 * GIB
    assert kv_cache_bytes(0.5, total, peak, free=70 * GIB) == 40 * GIB - peak - NON_TORCH_BYTES
    with pytest.raises(ValueError, match=r"gpu_memory_utilization 0.05: 4.00 GiB .* raise it"):
        kv_cache_bytes(0.05, total, peak, free=70 * GIB)
    with pytest.raises(ValueError, match=r"would take 66.00 GiB but 30.00 GiB .* is free"):
        kv_cache_bytes(0.9, total, peak, free=30 * GIB)


def test_a_runner_sized_by_share_runs_the_profiled_step_first(default_model_path, monkeypatch):
    steps = []
    eager = ModelRunner._eager
    monkeypatch.setattr(
        ModelRunner, "_eager", lambda self, batch: steps.append(batch) or eager(self, batch)
    )
    probe = FakeProbe(total_bytes=4 * GIB, free_bytes=3 * GIB, peak_bytes=GIB)
    share = MemoryShare(0.5, tokens=96, seqs=4, probe=probe)
    runner = ModelRunner.from_pretrained(
        default_model_path, dtype="float32", device="cpu", block_size=16, num_kv_blocks=None,
        kv_cache_memory_mb=1, memory_share=share,
    )  # fmt: skip
    # the profiled step (96 tokens over 4 sequences) ran between reset and read, before check()
    assert [len(s.token_ids) for s in steps[0].seqs] == [24] * 4
    assert probe.calls == ["reset", "peak"]
    shape = ModelShape.of(runner.model.config)
    throwaway = shape.kv_bytes_per_token(runner.kv_dtype) * 16 * 8  # 4 sequences of 2 blocks
    peak = GIB - throwaway + sampler_bytes(4, shape.vocab_size)
    per_block = shape.kv_bytes_per_token(runner.kv_dtype) * 16
    assert runner.num_kv_blocks == (2 * GIB - peak - NON_TORCH_BYTES) // per_block


def test_a_runner_sized_by_share_serves_the_same_tokens(default_model_path, tokenizer):
    probe = FakeProbe(total_bytes=6 * GIB, free_bytes=6 * GIB, peak_bytes=GIB + GIB // 2)
    sized = ModelRunner.from_pretrained(
        default_model_path, dtype="float32", device="cpu", block_size=16, num_kv_blocks=None,
        kv_cache_memory_mb=1, memory_share=MemoryShare(0.5, tokens=64, seqs=2, probe=probe),
    )  # fmt: skip
    fixed = ModelRunner.from_pretrained(
        default_model_path, dtype="float32", device="cpu", block_size=16, num_kv_blocks=64,
        kv_cache_memory_mb=1,
    )  # fmt: skip
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = ["The capital of France is", "def add(a, b):"]
    tokens = [
        [o.token_ids for o in LLMEngine(EngineConfig(), runner=r, tokenizer=tokenizer).generate(
            prompts, greedy
        )]
        for r in (sized, fixed)
    ]  # fmt: skip
    assert tokens[0] == tokens[1]
    assert sized.num_kv_blocks > 500  # the share's ~0.5 GiB, not kv_cache_memory_mb's 1 MiB


def test_a_draft_models_cache_comes_from_the_same_share(monkeypatch):
    """With a draft model (the default model drafting for itself): the draft is loaded (and on
    the device) before the target's step is measured, so the peak counts its weights, and the
    two caches, as many blocks each, split what the share leaves."""
    import engine.draft_model

    probe = FakeProbe(total_bytes=4 * GIB, free_bytes=4 * GIB, peak_bytes=GIB)
    monkeypatch.setattr(
        EngineConfig, "memory_share", property(lambda _: MemoryShare(0.5, 64, 2, probe))
    )
    load = engine.draft_model.load_model  # the draft's loading alone
    monkeypatch.setattr(
        engine.draft_model, "load_model", lambda *a: probe.calls.append("draft") or load(*a)
    )
    llm = LLMEngine(EngineConfig(speculative=SpeculativeConfig(3, model="default")))
    assert probe.calls == ["draft", "reset", "peak"]
    shape = ModelShape.of(llm.runner.model.config)
    per_block = shape.kv_bytes_per_token(llm.runner.kv_dtype) * 16
    peak = GIB - per_block * 4 + sampler_bytes(2, shape.vocab_size)  # 2 sequences of 2 blocks
    blocks = (2 * GIB - peak - NON_TORCH_BYTES) // (2 * per_block)
    assert llm.runner.num_kv_blocks == llm.proposer.runner.num_kv_blocks == blocks


def test_the_share_is_a_gpu_setting():
    with pytest.raises(ValidationError, match="decode.engine.gpu_memory_utilization sizes a GPU"):
        AppArgs.model_validate({"decode": {"engine": {"gpu_memory_utilization": 0.4}}})
    workers = AppArgs.model_validate(  # each worker of a parallel replica takes the share
        {
            "device": "cuda",
            "prefill": {"engine": {"gpu_memory_utilization": 0.4, "tensor_parallel_size": 2}},
        }
    )
    assert workers.engine_config("prefill").memory_share == MemoryShare(0.4, 2048, 32)
    with pytest.raises(ValidationError, match="less than or equal to 1"):
        AppArgs.model_validate(
            {"device": "cuda", "decode": {"engine": {"gpu_memory_utilization": 1.5}}}
        )
    args = AppArgs.model_validate(
        {"device": "cuda", "decode": {"engine": {"gpu_memory_utilization": 0.45}}}
    )
    config = args.engine_config("decode")
    assert config.memory_share == MemoryShare(0.45, 2048, 32)
    assert args.engine_config("prefill").memory_share is None
    with pytest.raises(ValueError, match="on a CPU it is kv_cache_memory_mb"):
        EngineConfig(gpu_memory_utilization=0.5)
