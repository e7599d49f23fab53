"""The default model's tokenizer is the same whichever transformers converted it, and a model's
generation config ends requests at its own end-of-sequence ids (vLLM's rule)."""

from __future__ import annotations

import json
import shutil

import pytest
from tokenizers import decoders, normalizers

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.model_store import canonical_tokenizer, generation_stop_ids

TEXT = "Héllo wörld ✓ — 漢字\n\t  x. ,y <b>"


@pytest.mark.model
def test_a_tokenizer_converted_as_transformers_5_17_did_is_set_right(default_model_path):
    """transformers 5.17 (the GPU machine's) saved the GGUF's tokenizer with <|im_start|> as
    EOS, space clean-up on and SentencePiece decoder steps: replies on that machine ran past
    <|im_end|>. After canonical_tokenizer it saves as the tokenizer transformers 5.25 built."""
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(default_model_path)
    broken = AutoTokenizer.from_pretrained(default_model_path)
    broken.eos_token = "<|im_start|>"
    broken.clean_up_tokenization_spaces = True
    backend = broken.backend_tokenizer
    backend.normalizer = normalizers.Sequence([])
    backend.decoder = decoders.Sequence(
        [
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Replace("▁", " "),
            decoders.ByteLevel(add_prefix_space=True, trim_offsets=True, use_regex=True),
        ]
    )
    assert broken.eos_token_id == 1
    fixed = canonical_tokenizer(broken)
    assert (
        (fixed.eos_token_id, fixed.pad_token_id)
        == (want.eos_token_id, want.pad_token_id)
        == (
            2,
            2,
        )
    )
    assert fixed.clean_up_tokenization_spaces is False
    saved, ref = (json.loads(t.backend_tokenizer.to_str()) for t in (fixed, want))
    assert saved["decoder"] == ref["decoder"] and saved["normalizer"] is None
    ids = fixed.encode(TEXT)
    assert ids == want.encode(TEXT) and fixed.decode(ids) == TEXT


@pytest.mark.model
def test_the_generation_configs_eos_ids_end_a_request(default_model_path, tmp_path):
    """A copy of the default model whose generation config also names the third greedy token
    an end of sequence (as Llama 3 Instruct's names <|eot_id|>): the request stops there, as
    a stop token id would; ignore_eos runs on, and min_tokens holds it back."""
    model = tmp_path / "model"
    shutil.copytree(default_model_path, model)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    plain = LLMEngine(EngineConfig(model=str(model), kv_cache_memory_mb=64))
    assert plain.model_stop_ids == ()  # its generation config's EOS is the tokenizer's
    [free] = plain.generate(
        ["Count: 1, 2, 3,"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    stop = free.token_ids[2]
    assert stop not in free.token_ids[:2] and 2 not in free.token_ids
    config = json.loads((model / "generation_config.json").read_text())
    config["eos_token_id"] = [2, stop]
    (model / "generation_config.json").write_text(json.dumps(config))
    assert generation_stop_ids(model, 2) == (stop,)

    engine = LLMEngine(EngineConfig(model=str(model), kv_cache_memory_mb=64))
    [out] = engine.generate(["Count: 1, 2, 3,"], params)
    assert out.token_ids == free.token_ids[:3] and out.finish_reason == "stop"
    [ignored] = engine.generate(
        ["Count: 1, 2, 3,"], SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    )
    assert ignored.token_ids == free.token_ids
    held = SamplingParams(max_tokens=10, temperature=0.0, min_tokens=5)
    [late] = engine.generate(["Count: 1, 2, 3,"], held)
    assert len(late.token_ids) >= 5 and stop not in late.token_ids[:5]
