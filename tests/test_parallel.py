"""Layout arithmetic of tensor x pipeline parallel replicas and the KV re-sharding plan."""

from __future__ import annotations

import copy
import itertools

import pytest

from engine.parallel import (
    ParallelLayout,
    PieceSpec,
    check_coverage,
    kv_pieces,
    split_evenly,
    split_micro_batches,
)

L, H, HKV = 30, 12, 4


def test_split_evenly_is_contiguous_and_balanced():
    parts = split_evenly(30, 4)
    assert [len(p) for p in parts] == [8, 8, 7, 7]
    assert [i for p in parts for i in p] == list(range(30))


def test_shards_rank_order_and_ranges():
    shards = ParallelLayout(tp=2, pp=3).shards(L, H, HKV)
    assert [(s.rank, s.pp_rank, s.tp_rank) for s in shards] == [
        (0, 0, 0), (1, 0, 1), (2, 1, 0), (3, 1, 1), (4, 2, 0), (5, 2, 1)
    ]  # fmt: skip
    assert shards[3].layers == range(10, 20)
    assert shards[3].kv_heads == range(2, 4) and shards[3].heads == range(6, 12)
    assert ParallelLayout(2, 3).stage_ranks(1) == [2, 3]


def test_layouts_the_model_cannot_take_are_rejected():
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide"):
        ParallelLayout(tp=3).shards(L, H, HKV)
    with pytest.raises(ValueError, match="exceeds the model's 30 layers"):
        ParallelLayout(pp=31).shards(L, H, HKV)
    with pytest.raises(ValueError):
        ParallelLayout(tp=0)


LAYOUTS = [ParallelLayout(t, p) for t, p in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 3)]]


@pytest.mark.parametrize("kv", [HKV, 2, 1], ids=["kv-split", "kv-replicated-at-tp4", "one-kv"])
@pytest.mark.parametrize("src,dst", list(itertools.product(LAYOUTS, LAYOUTS)))
def test_pieces_tile_every_receiver_exactly_and_send_each_cell_once(src, dst, kv):
    """KV heads split over the tp ranks, or replicated over the ranks that read them when tp
    exceeds them (one: DeepSeek's latent, every rank of a stage holds it): only a head's
    first holder sends it, once to each rank that needs it."""
    dst_shards = dst.shards(L, H, kv)
    pieces = [p for s in src.shards(L, H, kv) for p in kv_pieces(s, dst_shards)]
    for d in dst_shards:  # raises unless exact
        check_coverage(d, [p for p in pieces if p.dst_rank == d.rank])
    # no cell of the cache travels twice to a rank: the whole cache once to each copy of it
    copies = max(dst.tp // kv, 1)
    assert sum(len(p.layers) * len(p.kv_heads) for p in pieces) == L * kv * copies
    holders = range(0, src.tp, max(src.tp // kv, 1))
    assert {p.src_rank % src.tp for p in pieces} == set(holders)


def test_serve_run_checks_a_layout_by_its_kv_heads():
    """The app's check at `serve run` (app/builder.py): tp2 over one KV head (or DeepSeek's
    latent) replicates it; over 3 it cannot, and the error names the field."""
    from app.config import AppArgs

    args = AppArgs.model_validate(
        {"model": "m", "mode": "disaggregated", "decode": {"engine": {"tensor_parallel_size": 2}}}
    )
    args.check_parallel(4, 4, 1)
    with pytest.raises(ValueError, match="decode.engine: tensor_parallel_size 2 must divide"):
        args.check_parallel(4, 6, 3)


@pytest.mark.parametrize("heads, kv, tp", [(12, 1, 4), (12, 2, 4), (32, 4, 8), (64, 8, 16)])
def test_replicated_kv_heads_are_held_by_the_ranks_whose_queries_read_them(heads, kv, tp):
    """tp a multiple of the KV heads: each rank holds one, the one its query heads read (query
    head q reads KV head q // (heads / kv)); the first of its holders is the one that sends."""
    shards = ParallelLayout(tp=tp).shards(L, heads, kv)
    group = heads // kv
    for s in shards:
        assert len(s.kv_heads) == 1 and {q // group for q in s.heads} == set(s.kv_heads)
    assert [s.kv_copy for s in shards] == [t % (tp // kv) for t in range(tp)]
    with pytest.raises(ValueError, match="divide or be a multiple of its 3 KV heads"):
        ParallelLayout(tp=2).shards(L, 6, 3)


def test_reshard_tp2_to_pp2_sends_each_rank_a_quarter():
    src = ParallelLayout(tp=2).shards(L, H, HKV)
    dst = ParallelLayout(pp=2).shards(L, H, HKV)
    pieces = kv_pieces(src[1], dst)  # prefill rank 1 holds KV heads 2..3 of all layers
    assert pieces == [
        PieceSpec(1, 0, range(0, 15), range(2, 4)),
        PieceSpec(1, 1, range(15, 30), range(2, 4)),
    ]


def test_coverage_errors_name_the_problem():
    dst = ParallelLayout(tp=2).shards(L, H, HKV)[0]
    with pytest.raises(ValueError, match="covers 30 of rank 0's 60"):
        check_coverage(dst, [PieceSpec(0, 0, range(0, 30), range(0, 1))])
    with pytest.raises(ValueError, match="does not fit"):
        check_coverage(dst, [PieceSpec(0, 0, range(0, 30), range(0, 3))])


@pytest.mark.parametrize(
    "counts,parts,expected",
    [
        ([1, 1, 1, 1], 2, [range(0, 2), range(2, 4)]),
        ([100, 1, 1, 1], 2, [range(0, 1), range(1, 4)]),
        ([1, 1, 1], 5, [range(0, 1), range(1, 2), range(2, 3)]),
        ([5], 2, [range(0, 1)]),
        ([], 2, []),
        ([3, 3, 3, 3, 3, 3], 3, [range(0, 2), range(2, 4), range(4, 6)]),
    ],
)
def test_micro_batches(counts, parts, expected):
    assert split_micro_batches(counts, parts) == expected


def test_a_qwen3_shard_keeps_its_head_norms_whole_and_splits_the_projections():
    """Qwen3's plan marks q_norm / k_norm "replicated": every rank keeps them (they act on
    one head's dimensions); q/k/v/gate/up keep their rank's rows, o/down their columns."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    whole = Qwen3ForCausalLM(config)
    full = dict(whole.named_parameters())
    model = _sharded(whole, tp=2, rank=1)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    prefix = "model.layers.0."
    assert torch.equal(attn.q_proj.weight, full[prefix + "self_attn.q_proj.weight"][32:])
    assert torch.equal(attn.k_proj.weight, full[prefix + "self_attn.k_proj.weight"][16:])
    assert torch.equal(attn.o_proj.weight, full[prefix + "self_attn.o_proj.weight"][:, 32:])
    assert torch.equal(mlp.down_proj.weight, full[prefix + "mlp.down_proj.weight"][:, 48:])
    assert torch.equal(attn.q_norm.weight, full[prefix + "self_attn.q_norm.weight"])


@pytest.mark.parametrize(
    "kind", ["mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v3", "llama4_text"]
)
def test_a_mixture_of_experts_shard_keeps_a_slice_of_every_expert_and_the_slices_sum_up(kind):
    """Each rank keeps its rows of every expert's gate and up (two halves of one tensor, or
    interleaved and transposed with biases in gpt-oss, or halves transposed in Llama 4) and
    the matching part of down; the router stays whole. The two ranks' MLP outputs, before
    their all-reduces, add up to the whole model's (Qwen2-MoE's gated shared expert and Llama
    4's, split as a dense MLP, included); gpt-oss's ranks keep the attention sinks of their
    own heads."""
    import torch
    import transformers

    config_cls, model_cls = {
        "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM),
        "qwen2_moe": (transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM),
        "qwen3_moe": (transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM),
        "gpt_oss": (transformers.GptOssConfig, transformers.GptOssForCausalLM),
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "llama4_text": (transformers.Llama4TextConfig, transformers.Llama4ForCausalLM),
    }[kind]
    local = ("mixtral", "gpt_oss", "llama4_text")
    count = "num_local_experts" if kind in local else "num_experts"
    # DeepSeek: a dense first layer, then experts and a shared one; small latent ranks
    deepseek = dict(n_routed_experts=4, first_k_dense_replace=1, n_group=1, topk_group=1)
    deepseek.update(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8)
    config = config_cls(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=48,
        shared_expert_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts_per_tok=2,
        **(deepseek if kind == "deepseek_v3" else {count: 4}),
    )
    torch.manual_seed(0)
    whole = model_cls(config).eval()
    for param in whole.parameters():  # biases and sinks too: none left at zero
        param.data.normal_(0, 0.3)
    layer = whole.model.layers[1]
    experts, x = _mlp(layer).experts, torch.randn(1, 5, 32)
    with torch.no_grad():
        expected = _output(_mlp(layer)(x))
    parts = []
    for rank in range(2):
        sharded = _sharded(whole, tp=2, rank=rank).model.layers[1]
        mine, split = slice(24 * rank, 24 * (rank + 1)), _mlp(sharded).experts
        if kind == "gpt_oss":  # (experts, hidden, gate/up pairs); sinks: this rank's 2 heads
            pairs = experts.gate_up_proj[:, :, 48 * rank : 48 * (rank + 1)]
            assert torch.equal(split.gate_up_proj, pairs)
            assert torch.equal(split.down_proj, experts.down_proj[:, mine])
            heads = layer.self_attn.sinks[2 * rank : 2 * (rank + 1)]
            assert torch.equal(sharded.self_attn.sinks, heads)
        elif kind == "llama4_text":  # (experts, hidden, gate then up)
            gate_up = experts.gate_up_proj
            halves = [gate_up[:, :, :48][:, :, mine], gate_up[:, :, 48:][:, :, mine]]
            assert torch.equal(split.gate_up_proj, torch.cat(halves, dim=2))
            assert torch.equal(split.down_proj, experts.down_proj[:, mine])
        else:
            gate_up = experts.gate_up_proj
            halves = [gate_up[:, :48][:, mine], gate_up[:, 48:][:, mine]]
            assert torch.equal(split.gate_up_proj, torch.cat(halves, dim=1))
            assert torch.equal(split.down_proj, experts.down_proj[:, :, mine])
        for module in sharded.modules():  # the all-reduce, done here by adding up
            module._forward_hooks.clear()
        with torch.no_grad():
            parts.append(_output(_mlp(sharded)(x)))
    torch.testing.assert_close(parts[0] + parts[1], expected, rtol=1e-5, atol=1e-5)


def _sharded(whole, tp: int = 1, pp: int = 1, rank: int = 0):
    """A copy of `whole` cut to one worker's shard, with no process group: the all-reduce
    hooks of a tp shard are left on its row-parallel layers."""
    from engine.model_runner import ModelShape
    from engine.sharding import shard_model

    shard = ModelShape.of(whole.config).shards(ParallelLayout(tp, pp))[rank]
    return shard_model(copy.deepcopy(whole), shard, tp, tp_group=None)


def _small(config_cls, **changes):
    """A config of 4 heads of 8, an MLP of 48 rows and 2 layers."""
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    return config_cls(**{**base, "num_attention_heads": 4, "pad_token_id": 0, **changes})


def _mlp(layer):
    return layer.feed_forward if hasattr(layer, "feed_forward") else layer.mlp  # Llama 4's


def _output(mlp_output):
    return mlp_output[0] if isinstance(mlp_output, tuple) else mlp_output  # + router scores


def test_phi3s_fused_projections_keep_each_ranks_part_of_every_section():
    """Phi-3's qkv_proj holds q, k and v one after the other, its gate_up_proj gate then up.
    A rank keeps its heads' rows of each section (a contiguous half would be queries only),
    its attention cuts them by the rank's head counts while the model's config stays whole,
    and the two ranks' MLP outputs, before their all-reduces, add up to the whole model's."""
    import torch
    import transformers

    # 4 heads of 8: q is 32 rows, k and v 16 each
    config = _small(transformers.Phi3Config, num_key_value_heads=2)
    torch.manual_seed(0)
    whole = transformers.Phi3ForCausalLM(config).eval()
    layer, x = whole.model.layers[1], torch.randn(1, 5, 32)
    qkv, gate_up = layer.self_attn.qkv_proj.weight, layer.mlp.gate_up_proj.weight
    with torch.no_grad():
        expected = layer.mlp(x)
    parts = []
    for rank in range(2):
        model = _sharded(whole, tp=2, rank=rank)
        sharded = model.model.layers[1]
        q, k, v = (qkv[start + n * rank : start + n * (rank + 1)] for start, n in _QKV)
        assert torch.equal(sharded.self_attn.qkv_proj.weight, torch.cat([q, k, v]))
        gate, up = gate_up[24 * rank : 24 * (rank + 1)], gate_up[48 + 24 * rank :][:24]
        assert torch.equal(sharded.mlp.gate_up_proj.weight, torch.cat([gate, up]))
        attention = sharded.self_attn.config
        assert (attention.num_attention_heads, attention.num_key_value_heads) == (2, 1)
        assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (4, 2)
        sharded.mlp.down_proj._forward_hooks.clear()  # the all-reduce, done here by adding up
        with torch.no_grad():
            parts.append(sharded.mlp(x))
    torch.testing.assert_close(parts[0] + parts[1], expected, rtol=1e-5, atol=1e-5)


_QKV = ((0, 16), (32, 8), (48, 8))  # (where each section starts, one rank's rows of it)


@pytest.mark.parametrize("kind, kv, tp", [("qwen2", 2, 4), ("phi3", 1, 2)])
def test_ranks_that_share_a_kv_head_each_keep_its_rows_and_their_outputs_sum_up(kind, kv, tp):
    """tp a multiple of the KV heads: each rank keeps the k and v rows (and Qwen2's biases) of
    the KV head its query heads read, from plain projections or Phi-3's fused one, and its
    attention reads it for all of them (transformers' own eager attention repeats it by the
    rank's group size). The ranks' attention outputs, before the all-reduce, add up to the
    whole model's."""
    import torch
    import transformers

    config_cls = {"qwen2": transformers.Qwen2Config, "phi3": transformers.Phi3Config}[kind]
    config = _small(config_cls, num_key_value_heads=kv, attn_implementation="eager")
    torch.manual_seed(0)
    model_cls = {"qwen2": transformers.Qwen2ForCausalLM, "phi3": transformers.Phi3ForCausalLM}
    whole = model_cls[kind](config).eval()
    x, positions = torch.randn(1, 5, 32), torch.arange(5)[None]
    rope = whole.model.rotary_emb(x, positions)
    with torch.no_grad():
        expected = whole.model.layers[0].self_attn(x, rope, None)[0]
    parts = []
    for rank in range(tp):
        attention = _sharded(whole, tp=tp, rank=rank).model.layers[0].self_attn
        assert attention.num_key_value_groups == 4 // tp
        if kind == "qwen2":
            head = slice(8 * (rank * kv // tp), 8 * (rank * kv // tp + 1))  # head_dim 8
            full_bias = whole.model.layers[0].self_attn.k_proj.bias
            assert torch.equal(attention.k_proj.bias, full_bias[head])
        attention.o_proj._forward_hooks.clear()  # the all-reduce, done here by adding up
        with torch.no_grad():
            parts.append(attention(x, rope, None)[0])
    torch.testing.assert_close(sum(parts), expected, rtol=1e-5, atol=1e-5)


def test_a_gemma3_of_vision_and_text_splits_its_text_model_and_leaves_its_vision_out():
    """Gemma 3's checkpoints of vision and text (4B to 27B) load as both; the workers serve
    text: the language model is split by its text config's plan, the vision tower and its
    projector are dropped, and each pipeline stage keeps its part of the text model."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from engine.sharding import decoder

    text = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2)
    text.update(num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    vision = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16)
    config = Gemma3Config(text_config=text, vision_config={**vision, "image_size": 28})
    whole = Gemma3ForConditionalGeneration(config)
    layer = whole.model.language_model.layers[1]
    split = _sharded(whole, tp=2, rank=1)
    assert decoder(split) is split.model.language_model
    mine = split.model.language_model.layers[1]
    assert torch.equal(mine.self_attn.k_proj.weight, layer.self_attn.k_proj.weight[8:])
    assert torch.equal(mine.mlp.down_proj.weight, layer.mlp.down_proj.weight[:, 24:])
    assert split.model.vision_tower is None and split.model.multi_modal_projector is None
    stage = _sharded(whole, pp=2, rank=1)
    assert stage.model.language_model.embed_tokens is None and len(decoder(stage).layers) == 1
    assert stage.model.language_model.norm is not None and stage.lm_head is not None


def test_opts_layout_splits_by_its_own_names_and_keeps_its_embeddings_on_the_first_stage():
    """OPT keeps its layers under model.decoder, names its projections out_proj, fc1 and fc2,
    and views q, k and v by its attention's `num_heads`, which becomes the rank's. A pipeline
    stage keeps what it runs: the first the token and position embeddings and the projection
    in, the last the final norm, the projection out and the LM head."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(
        vocab_size=64,
        hidden_size=32,
        ffn_dim=48,
        word_embed_proj_dim=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=32,
    )
    whole = OPTForCausalLM(config)
    layer = whole.model.decoder.layers[0]
    mine = _sharded(whole, tp=2, rank=1).model.decoder.layers[0]
    assert mine.self_attn.num_heads == 2 and whole.model.decoder.layers[0].self_attn.num_heads == 4
    assert torch.equal(mine.self_attn.v_proj.weight, layer.self_attn.v_proj.weight[16:])
    assert torch.equal(mine.self_attn.v_proj.bias, layer.self_attn.v_proj.bias[16:])
    assert torch.equal(mine.self_attn.out_proj.weight, layer.self_attn.out_proj.weight[:, 16:])
    assert torch.equal(mine.fc1.weight, layer.fc1.weight[24:])
    assert torch.equal(mine.fc2.weight, layer.fc2.weight[:, 24:])
    assert not mine.fc2.bias.any()  # added once, by rank 0, over the all-reduce
    first, last = (_sharded(whole, pp=2, rank=r) for r in range(2))
    kept = ("embed_tokens", "embed_positions", "project_in", "final_layer_norm", "project_out")
    assert [getattr(first.model.decoder, n) is not None for n in kept] == [1, 1, 1, 0, 0]
    assert [getattr(last.model.decoder, n) is not None for n in kept] == [0, 0, 0, 1, 1]
    assert first.lm_head is None and last.lm_head is not None


@pytest.mark.parametrize(
    "config_name, kind", [("CohereConfig", "cohere"), ("Olmo2Config", "olmo2")]
)
def test_families_the_workers_cannot_run_are_refused_by_model_type(config_name, kind):
    """Cohere and OLMo 2 (served on one worker) are not split: refused before any worker
    starts. The families the workers run pass: OPT, with its own layout, Llama 4's checkpoints
    of vision and text, which load as its text model, and Gemma 3's, whose text model is
    split."""
    import transformers

    from engine.sharding import check_model_type

    with pytest.raises(ValueError, match=f"not '{kind}'.*run it with one worker"):
        check_model_type(getattr(transformers, config_name)())
    families = ("LlamaConfig", "Phi3Config", "GraniteConfig", "Gemma2Config", "MixtralConfig")
    more = ("GptOssConfig", "Llama4TextConfig", "Llama4Config", "OPTConfig", "Gemma3Config")
    for name in (*families, *more):
        check_model_type(getattr(transformers, name)())


def test_the_vocabulary_is_split_in_padded_slices_and_tied_embeddings_stay_tied():
    """Embedding and LM head keep a rank's ceil(V / tp) vocabulary rows, the last rank's
    padded with zero rows past V (63 rows over 2 ranks: 32 each, the second's last zero);
    tied, the rank's head is its embedding's slice, one tensor, as in the whole model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.sharding import VocabParallelEmbedding

    config = _small(LlamaConfig, vocab_size=63, tie_word_embeddings=True)
    whole = LlamaForCausalLM(config)
    rows = whole.model.embed_tokens.weight.detach()
    for rank, want in ((0, rows[:32]), (1, torch.cat([rows[32:], torch.zeros(1, 32)]))):
        model = _sharded(whole, tp=2, rank=rank)
        embedding = model.model.embed_tokens
        assert isinstance(embedding, VocabParallelEmbedding) and embedding.start == 32 * rank
        assert torch.equal(embedding.embedding.weight, want)
        assert model.lm_head.weight is embedding.embedding.weight
        assert model.lm_head.out_features == 32
    first, last = _sharded(whole, pp=2, rank=0), _sharded(whole, pp=2, rank=1)
    assert first.lm_head is None and last.model.embed_tokens is None  # pp alone: whole
    assert torch.equal(last.lm_head.weight, rows)
