"""Planning without weights: parameter counts from config.json, roofline coefficients."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GptOssConfig,
    GptOssForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Llama4Config,
    Llama4ForCausalLM,
    Llama4TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from placement.analytic import entry, fits
from placement.hardware import DEVICES, ModelSpec

pytestmark = pytest.mark.unit

LLAMA_13B = {
    "model_type": "llama",
    "hidden_size": 5120,
    "num_hidden_layers": 40,
    "num_attention_heads": 40,
    "num_key_value_heads": 40,
    "intermediate_size": 13824,
    "vocab_size": 32000,
    "tie_word_embeddings": False,
}
LLAMA_70B = {
    **LLAMA_13B,
    "hidden_size": 8192,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "intermediate_size": 28672,
}


def _write(tmp_path, cfg: dict):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def _with(config, **changes):
    config = copy.deepcopy(config)  # transformers' attribute map takes either spelling
    for key, value in changes.items():
        setattr(config, key, value)
    return config


def _numel(model) -> int:
    return sum(p.numel() for p in model.parameters())  # tied weights are counted once


SMALL = dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, vocab_size=300)
MOE_SMALL = {**SMALL, "num_hidden_layers": 4, "num_experts_per_tok": 2}
LATENT = dict(
    intermediate_size=96,
    moe_intermediate_size=32,
    n_routed_experts=4,
    n_shared_experts=2,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=12,
    topk_group=1,
)
# (config, model class, how the config names its expert count); dense layers among the
# mixtures (mlp_only_layers, decoder_sparse_step), a shared expert, biased experts and router
MOE = [
    (
        MixtralConfig(
            **MOE_SMALL, intermediate_size=96, num_key_value_heads=2, num_local_experts=4
        ),
        MixtralForCausalLM,
        "num_local_experts",
    ),
    (
        Qwen2MoeConfig(
            **MOE_SMALL,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=6,
            decoder_sparse_step=2,
            mlp_only_layers=[3],
        ),
        Qwen2MoeForCausalLM,
        "num_experts",
    ),
    (
        Qwen3MoeConfig(
            **MOE_SMALL,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=6,
            mlp_only_layers=[0],
            head_dim=24,
        ),
        Qwen3MoeForCausalLM,
        "num_experts",
    ),
    (
        GptOssConfig(
            **MOE_SMALL,
            intermediate_size=32,
            num_local_experts=4,
            num_key_value_heads=2,
            head_dim=16,
        ),
        GptOssForCausalLM,
        "num_local_experts",
    ),
    # latent attention (queries with and without their low rank; biases), a dense first
    # layer, a shared expert
    (
        DeepseekV2Config(**MOE_SMALL, **LATENT, q_lora_rank=None, num_key_value_heads=4),
        DeepseekV2ForCausalLM,
        "n_routed_experts",
    ),
    (
        DeepseekV3Config(**MOE_SMALL, **LATENT, q_lora_rank=24, attention_bias=True, n_group=2),
        DeepseekV3ForCausalLM,
        "n_routed_experts",
    ),
    # experts and a shared one every second layer, a dense MLP of another size between them
    (
        Llama4TextConfig(
            **MOE_SMALL,
            intermediate_size=32,
            intermediate_size_mlp=96,
            num_local_experts=4,
            num_key_value_heads=2,
            head_dim=16,
            interleave_moe_layer_step=2,
        ),
        Llama4ForCausalLM,
        "num_local_experts",
    ),
]


# one config of each family the planner counts (tied and untied embeddings, biases)
FAMILIES = [
    (
        LlamaConfig(
            **SMALL, intermediate_size=160, num_key_value_heads=2, tie_word_embeddings=True
        ),
        LlamaForCausalLM,
    ),
    (
        LlamaConfig(
            **SMALL, intermediate_size=160, num_key_value_heads=2, tie_word_embeddings=False
        ),
        LlamaForCausalLM,
    ),
    (
        LlamaConfig(**SMALL, intermediate_size=160, attention_bias=True, mlp_bias=True),
        LlamaForCausalLM,
    ),
    (
        OPTConfig(**SMALL, ffn_dim=160, word_embed_proj_dim=64, max_position_embeddings=128),
        OPTForCausalLM,
    ),
    (MistralConfig(**SMALL, intermediate_size=160, num_key_value_heads=2), MistralForCausalLM),
    (GraniteConfig(**SMALL, intermediate_size=160), GraniteForCausalLM),
    (Phi3Config(**SMALL, intermediate_size=160, pad_token_id=0), Phi3ForCausalLM),
    (Qwen2Config(**SMALL, intermediate_size=160, num_key_value_heads=2), Qwen2ForCausalLM),
    (Qwen3Config(**SMALL, intermediate_size=160, head_dim=24), Qwen3ForCausalLM),
    (Qwen3Config(**SMALL, intermediate_size=160, attention_bias=True), Qwen3ForCausalLM),
    (GemmaConfig(**SMALL, intermediate_size=160, head_dim=24), GemmaForCausalLM),
    (Gemma2Config(**SMALL, intermediate_size=160, head_dim=24), Gemma2ForCausalLM),
    (Gemma3TextConfig(**SMALL, intermediate_size=160, head_dim=24), Gemma3ForCausalLM),
    *((c, cls) for c, cls, _ in MOE),
]
FAMILY_IDS = [
    "llama-tied",
    "llama-untied",
    "llama-biases",
    "opt",
    "mistral",
    "granite",
    "phi3",
    "qwen2",
    "qwen3",
    "qwen3-biases",
    "gemma",
    "gemma2",
    "gemma3",
    *(c.model_type for c, _, _ in MOE),
]


@pytest.mark.parametrize(("config", "model_cls"), FAMILIES, ids=FAMILY_IDS)
def test_parameter_count_equals_transformers(tmp_path, config, model_cls):
    with torch.device("meta"):
        model = model_cls(config)
    assert ModelSpec.from_config(_write(tmp_path, config.to_dict())).num_params == _numel(model)


def _shard_numel(config, model_cls, tp: int) -> int:
    """The parameters of rank 0 of `tp` (they are alike) as the engine shards the model: built
    on the meta device and cut by engine/sharding.py."""
    from engine.parallel import ParallelLayout
    from engine.sharding import shard_model

    with torch.device("meta"):
        model = model_cls(config)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    kv = 1 if getattr(config, "kv_lora_rank", None) else kv  # a latent: one KV head
    shard = ParallelLayout(tp).shards(config.num_hidden_layers, heads, kv)[0]
    return _numel(shard_model(model, shard, tp, tp_group=None))


@pytest.mark.parametrize(("config", "model_cls"), FAMILIES, ids=FAMILY_IDS)
def test_a_ranks_parameters_are_what_the_engines_shard_holds(tmp_path, config, model_cls):
    """At tp 2 and 4 (each KV head on two ranks where there are 2) a rank holds what the
    engine's shard holds: 1/tp of the heads and MLP rows, the vocabulary in ceil(V/tp) rows
    (301 rows: padded) and, whole, what no plan splits (norms, routers, row-parallel biases,
    OPT's positions, DeepSeek's latent projections). tp 1 is the whole model."""
    config = _with(config, vocab_size=301)
    spec = ModelSpec.from_config(_write(tmp_path, config.to_dict()))
    assert spec.rank_params(1) == spec.num_params
    for tp in (2, 4):
        assert spec.rank_params(tp) == _shard_numel(config, model_cls, tp), tp
    assert spec.rank_params(4) > spec.num_params / 4


@pytest.mark.parametrize(
    ("config", "model_cls", "count_key"), MOE, ids=[c.model_type for c, _, _ in MOE]
)
def test_a_ranks_active_parameters_are_a_shard_with_only_top_k_experts(
    tmp_path, config, model_cls, count_key
):
    """What a token's FLOPs run through on one rank: the shard of the model built with k
    experts, plus the router's rows for the other experts (whole on every rank)."""
    spec = ModelSpec.from_config(_write(tmp_path, config.to_dict()))
    k = config.num_experts_per_tok
    router_row = config.hidden_size + (model_cls is GptOssForCausalLM)
    unrouted = spec.experts.layers * (spec.experts.count - k) * router_row
    top_k_only = _with(config, **{count_key: k})
    assert spec.rank_params(2, active=True) == _shard_numel(top_k_only, model_cls, 2) + unrouted


@pytest.mark.parametrize(
    ("config", "model_cls", "count_key"), MOE, ids=[c.model_type for c, _, _ in MOE]
)
def test_active_parameters_are_a_model_with_only_top_k_experts_and_the_whole_router(
    tmp_path, config, model_cls, count_key
):
    """A token runs through k experts: the same model built with k experts, plus the router's
    rows for the other experts (it scores all of them)."""
    spec = ModelSpec.from_config(_write(tmp_path, config.to_dict()))
    k, moe_layers = config.num_experts_per_tok, spec.experts.layers
    router_row = config.hidden_size + (model_cls is GptOssForCausalLM)  # gpt-oss: with a bias
    with torch.device("meta"):
        top_k_only = model_cls(_with(config, **{count_key: k}))
    unrouted = moe_layers * (spec.experts.count - k) * router_row
    assert spec.active_params == _numel(top_k_only) + unrouted < spec.num_params
    dense = [(MixtralConfig, 4), (Qwen2MoeConfig, 1), (Qwen3MoeConfig, 3), (GptOssConfig, 4)]
    dense += [(DeepseekV2Config, 3), (DeepseekV3Config, 3), (Llama4TextConfig, 2)]
    assert moe_layers == dict(dense)[type(config)]  # the layers given a mixture


def test_a_llama4_checkpoint_of_vision_and_text_is_planned_as_its_text_model(tmp_path):
    """The engine loads a Llama 4 checkpoint as its text model (Llama4ForCausalLM), so that is
    what is planned: Llama 4 Scout's text model holds 107.8B parameters, 17.2B per token."""
    scout = Llama4TextConfig(
        hidden_size=5120,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=8192,
        intermediate_size_mlp=16384,
        num_local_experts=16,
        num_experts_per_tok=1,
        vocab_size=202048,
    )
    both = Llama4Config(text_config=scout.to_dict()).to_dict()
    spec = ModelSpec.from_config(_write(tmp_path, both))
    with torch.device("meta"):
        text = Llama4ForCausalLM(scout)
    assert spec.model_type == "llama4_text" and spec.num_params == _numel(text)
    assert round(spec.num_params / 1e9, 1) == 107.8 and round(spec.active_params / 1e9, 1) == 17.2
    assert spec.runs_split


def test_a_gemma3_checkpoint_of_vision_and_text_is_planned_as_its_text_model(tmp_path):
    text = Gemma3TextConfig(**SMALL, intermediate_size=160, head_dim=24)
    both = Gemma3Config(text_config=text.to_dict()).to_dict()
    spec = ModelSpec.from_config(_write(tmp_path, both))
    with torch.device("meta"):
        alone = Gemma3ForCausalLM(text)
    assert spec.model_type == "gemma3_text" and spec.num_params == _numel(alone)
    assert spec.runs_split


def test_a_mixture_of_experts_computes_with_its_active_parameters_and_reads_them_all(tmp_path):
    """Mixtral 8x7B on an H200: 46.7B parameters held, 12.9B run per token (transformers'
    counts); prefill's FLOPs follow the 12.9B, decode's weight read the 46.7B, of which the
    routed experts are 45.1B (32 layers x 8 x 3 x 4096 x 14336): a decode step of one request
    reads 2 of the 8, one of many reads them all."""
    mixtral = {
        **LLAMA_13B,
        "model_type": "mixtral",
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "num_local_experts": 8,
        "num_experts_per_tok": 2,
    }
    spec = ModelSpec.from_config(_write(tmp_path, mixtral))
    assert spec.num_params == 46_702_792_704 and spec.active_params == 12_879_925_248
    h200, h100 = DEVICES["H200"], DEVICES["H100-80GB"]
    assert fits(spec, h200, 1, 1) and not fits(spec, h100, 1, 1)  # 93 GB of bf16
    e = entry(spec, h200)
    flops_per_ms, bytes_per_ms = 989e12 * 0.5 / 1e3, 4800e9 * 0.7 / 1e3
    assert e.prefill.b == pytest.approx(2 * spec.active_params / flops_per_ms, rel=1e-12)
    assert e.decode.c == pytest.approx(2 * spec.active_params / flops_per_ms, rel=1e-12)
    assert e.decode.a == pytest.approx(spec.num_params * 2 / bytes_per_ms + 1.0, rel=1e-12)
    routed = 32 * 8 * 3 * 4096 * 14336 * 2 / bytes_per_ms
    assert (e.experts.count, e.experts.per_token) == (8, 2)
    assert e.experts.read_ms == pytest.approx(routed, rel=1e-12)
    assert e.decode_fixed_ms(1) == pytest.approx(e.decode.a - routed * 6 / 8, rel=1e-12)
    assert e.decode_fixed_ms(100) == pytest.approx(e.decode.a, rel=1e-9)
    assert entry(spec, h200, tp=2).experts.read_ms == pytest.approx(routed / 2, rel=1e-12)
    free = 141e9 * 0.9 - spec.num_params * 2
    assert e.kv_capacity_tokens == int(free / spec.kv_bytes_per_token)


def test_a_latent_attention_models_kv_bytes_are_what_the_engine_caches(tmp_path):
    """DeepSeek caches one latent per token and layer (engine.model_runner.ModelShape): 16
    dimensions and 8 rotary ones, whatever the 4 heads, once (it is the keys and the values),
    and whole on every tensor-parallel rank. The planner's KV bytes per token and per GPU are
    the engine's."""
    from engine.model_runner import ModelShape
    from engine.parallel import ParallelLayout

    h100 = DEVICES["H100-80GB"]
    for config in (c for c, _, _ in MOE if c.model_type.startswith("deepseek")):
        spec = ModelSpec.from_config(_write(tmp_path, config.to_dict()))
        engine = ModelShape.of(config)
        assert spec.kv_bytes_per_token == engine.kv_bytes_per_token(torch.bfloat16) == 4 * 24 * 2
        per_rank = engine.kv_bytes_per_token(torch.bfloat16, ParallelLayout(tp=2))
        assert per_rank == spec.kv_bytes_per_token  # a latent is not split
        free = 80e9 * 0.9 - spec.rank_params(2) * 2
        assert entry(spec, h100, tp=2).kv_capacity_tokens == int(free / per_rank)


@pytest.mark.model
def test_default_model_directory_is_planned_from_its_config(default_model_path, paged_model):
    spec = ModelSpec.from_config(default_model_path)
    assert spec.num_params == _numel(paged_model) == 134_515_008
    assert spec.kv_bytes_per_token == 30 * 2 * 3 * 64 * 2  # bf16: 23 KB, as in FACTS.md


def test_13b_on_a100_matches_the_roofline_by_hand(tmp_path):
    spec = ModelSpec.from_config(_write(tmp_path, LLAMA_13B))
    assert spec.num_params == pytest.approx(13.0e9, rel=0.02)
    e = entry(spec, DEVICES["A100-80GB"])
    weights = spec.num_params * 2
    # decode, batch 1: the weights once at 70% of 2039 GB/s, + 1 ms overhead + a 512-token KV read
    by_hand = (
        weights / (2039e9 * 0.7) * 1e3 + 1.0 + 512 * spec.kv_bytes_per_token / (2039e9 * 0.7) * 1e3
    )
    by_hand += 2 * spec.num_params / (312e12 * 0.5) * 1e3
    assert e.decode_ms([512]) == pytest.approx(by_hand, rel=1e-9)
    assert 15 < e.decode_ms([512]) < 30  # ms: the 30-50 ms of MISSION.md is 175B-scale
    # prefill of 512 tokens: 2 * params * 512 FLOPs at 50% of 312 TFLOP/s, about 85 ms
    assert 70 < e.prefill_ms([512]) < 120
    assert e.kv_capacity_tokens == int((80e9 * 0.9 - weights) / spec.kv_bytes_per_token)


def test_parallelism_splits_the_work_and_respects_memory(tmp_path):
    spec = ModelSpec.from_config(_write(tmp_path, LLAMA_70B))
    a100 = DEVICES["A100-80GB"]
    assert not fits(spec, a100, 1, 1)  # 140 GB of bf16 weights
    assert not fits(spec, a100, 3, 1)  # 64 heads do not split in 3
    assert fits(spec, a100, 2, 1) and fits(spec, a100, 1, 2)
    tp2, tp4 = entry(spec, a100, 2, 1), entry(spec, a100, 4, 1)
    assert tp4.decode.a < tp2.decode.a and tp4.prefill.b < tp2.prefill.b
    assert tp4.kv_capacity_tokens > 2 * tp2.kv_capacity_tokens  # less weight per GPU, more KV
    pp2 = entry(spec, a100, 1, 2)
    assert pp2.prefill.c == pytest.approx(
        tp2.prefill.c
    )  # per-stage attention work halves either way
    with pytest.raises(ValueError, match="does not fit"):
        entry(spec, a100, 1, 1)


def test_tensor_parallelism_splits_the_kv_heads_too(tmp_path):
    """A rank holds whole KV heads, as the engine's shards do: 12 query heads over 2 KV heads
    (Qwen2.5-1.5B's) split in 2, or in 4 with each KV head on two ranks, but not in 3, though
    3 divides the query heads. At tp4 a rank caches one KV head: half the model's KV bytes."""
    small = {**LLAMA_13B, "hidden_size": 1536, "num_hidden_layers": 28, "num_attention_heads": 12}
    spec = ModelSpec.from_config(_write(tmp_path, {**small, "num_key_value_heads": 12}))
    gqa = ModelSpec.from_config(_write(tmp_path, {**small, "num_key_value_heads": 2}))
    h100 = DEVICES["H100-80GB"]
    assert [t for t in (1, 2, 3, 4) if fits(spec, h100, t, 1)] == [1, 2, 3, 4]
    assert [t for t in (1, 2, 3, 4) if fits(gqa, h100, t, 1)] == [1, 2, 4]
    tp2, tp4 = entry(gqa, h100, 2, 1), entry(gqa, h100, 4, 1)
    free = 80e9 * 0.9 - gqa.rank_params(4) * gqa.dtype_bytes  # with a KV head's copy
    assert tp4.kv_capacity_tokens == int(free / (gqa.kv_bytes_per_token / 2))
    assert tp4.decode.b == tp2.decode.b  # a rank reads one KV head per token either way


def test_an_fp8_kv_cache_holds_twice_the_tokens_of_bf16_and_reads_half_the_bytes(tmp_path):
    """kv_cache_dtype fp8: a byte per cached element, the weights as they were."""
    path = _write(tmp_path, LLAMA_13B)
    bf16, fp8 = ModelSpec.from_config(path), ModelSpec.from_config(path, kv_cache_dtype="fp8")
    assert fp8.kv_bytes_per_token * 2 == bf16.kv_bytes_per_token == 40 * 2 * 5120 * 2
    assert fp8.num_params == bf16.num_params
    a100 = DEVICES["A100-80GB"]
    wide, narrow = entry(bf16, a100, 2, 1), entry(fp8, a100, 2, 1)
    assert narrow.kv_capacity_tokens in (2 * wide.kv_capacity_tokens + d for d in (0, 1))
    assert narrow.decode.b * 2 == pytest.approx(wide.decode.b)
    assert narrow.decode.a == wide.decode.a


def test_pipeline_stages_that_do_not_divide_the_layers_are_planned_by_the_largest(tmp_path):
    """The engine splits 41 layers in 2 stages as 21 + 20: the entry is the 21-layer stage's,
    the pipeline's bottleneck (its attention term equals a 42-layer model's, exceeds a
    40-layer one's), and its weights and KV are 21/41 of the model's. pp 4 and 8 are listed
    for such a model, 3 and 5 are not (neither divides 41)."""
    from placement.analytic import profile

    h100 = DEVICES["H100-80GB"]
    specs = {
        n: ModelSpec.from_config(_write(tmp_path, {**LLAMA_13B, "num_hidden_layers": n}))
        for n in (40, 41, 42)
    }
    c = {n: entry(spec, h100, 1, 2).prefill.c for n, spec in specs.items()}
    assert c[41] == pytest.approx(c[42]) and c[41] > c[40]
    odd = specs[41]
    weights = odd.num_params * odd.dtype_bytes * 21 / 41
    kv = odd.kv_bytes_per_token * 21 / 41
    assert entry(odd, h100, 1, 2).kv_capacity_tokens == int((80e9 * 0.9 - weights) / kv)
    assert {e.pp for e in profile(odd, h100).entries} == {1, 2, 4, 8, 16}


def test_tensor_parallelism_splits_every_intermediate_width_evenly(tmp_path):
    """Each rank keeps an equal slice of the MLP's rows and of every expert's (the engine
    refuses an uneven split): a dense width of 13,826 splits in 2, not 4; experts of 1,406
    rows beside a dense MLP of 13,824, in 2 only too."""
    dense = ModelSpec.from_config(_write(tmp_path, {**LLAMA_13B, "intermediate_size": 13826}))
    moe = {**LLAMA_13B, "model_type": "qwen3_moe", "moe_intermediate_size": 1406}
    moe.update(num_experts=4, num_experts_per_tok=2)
    experts = ModelSpec.from_config(_write(tmp_path, moe))
    h200 = DEVICES["H200"]
    assert [t for t in (1, 2, 4, 8) if fits(dense, h200, t, 1)] == [1, 2]
    assert [t for t in (1, 2, 4, 8) if fits(experts, h200, t, 1)] == [1, 2]
    assert fits(ModelSpec.from_config(_write(tmp_path, LLAMA_13B)), h200, 8, 1)


def test_unsupported_architecture_is_refused(tmp_path):
    with pytest.raises(
        ValueError, match="planning supports .*qwen3_moe and opt configs, not .gpt2."
    ):
        ModelSpec.from_config(_write(tmp_path, {**LLAMA_13B, "model_type": "gpt2"}))


def test_profile_lists_every_layout_that_fits_and_round_trips(tmp_path):
    from placement.analytic import main
    from placement.latency_model import Profile

    out = tmp_path / "p.yaml"
    main(["--model", str(_write(tmp_path, LLAMA_70B)), "--device", "H100-80GB", "--out", str(out)])
    layouts = {(e.tp, e.pp) for e in Profile.load(out).entries}
    assert (1, 1) not in layouts and (2, 1) in layouts and (8, 1) in layouts and (1, 2) in layouts
    assert all(64 % tp == 0 and 80 % pp == 0 for tp, pp in layouts)
