"""Our paged runner's logits equal transformers' own forward, for tiny random configs per family."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import (
    DeepseekV2Config,
    DeepseekV2ForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GptOssConfig,
    GptOssForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
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
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    StableLmConfig,
)

from engine.limits import context_window
from engine.model_runner import ModelInput, ModelRunner, ModelShape, SeqInput
from engine.rope import fix_longrope
from kvkernels import cpu_ops, paged_attention

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=3, num_attention_heads=4)
DEEPSEEK = dict(  # the shapes DeepSeek V2 and V3 share
    intermediate_size=96,
    moe_intermediate_size=32,
    n_routed_experts=4,
    num_experts_per_tok=2,
    first_k_dense_replace=1,
    kv_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=16,
    v_head_dim=16,
    num_key_value_heads=4,
)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, dict(intermediate_size=96, num_key_value_heads=2)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(intermediate_size=96, num_key_value_heads=1)),
    # a window shorter than the sequences, so the sliding-window path is exercised
    "mistral": (
        MistralConfig,
        MistralForCausalLM,
        dict(intermediate_size=96, num_key_value_heads=2, sliding_window=5),
    ),
    "opt": (OPTConfig, OPTForCausalLM, dict(ffn_dim=96, word_embed_proj_dim=64)),
    # q/k norms
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(intermediate_size=96, num_key_value_heads=2)),
    # fused qkv and gate/up projections
    "phi3": (Phi3Config, Phi3ForCausalLM, dict(intermediate_size=96, pad_token_id=0)),
    # scaled embeddings, residuals, attention and logits
    "granite": (
        GraniteConfig,
        GraniteForCausalLM,
        dict(intermediate_size=96, attention_multiplier=0.3, logits_scaling=2.0),
    ),
    # score softcapping tight enough to bend every score (Gemma 2 ships 50), sliding layers
    # between global ones, a query scale that is not 1/sqrt(D)
    "gemma2": (
        Gemma2Config,
        Gemma2ForCausalLM,
        dict(
            intermediate_size=96,
            head_dim=16,
            sliding_window=5,
            attn_logit_softcapping=0.05,
            query_pre_attn_scalar=1,
        ),
    ),
    "gemma3": (
        Gemma3TextConfig,
        Gemma3ForCausalLM,
        dict(intermediate_size=96, head_dim=16, sliding_window=5, sliding_window_pattern=2),
    ),
    # mixtures of experts
    "mixtral": (
        MixtralConfig,
        MixtralForCausalLM,
        dict(intermediate_size=96, num_key_value_heads=2, num_local_experts=4),
    ),
    "qwen3_moe": (
        Qwen3MoeConfig,
        Qwen3MoeForCausalLM,
        dict(
            intermediate_size=96,
            num_key_value_heads=2,
            moe_intermediate_size=32,
            num_experts=4,
            num_experts_per_tok=2,
        ),
    ),
    # a router that is a Linear with its own forward, experts, chunked local attention (chunks
    # of 5 tokens: the prompts, their chunked prefills and decodes cross chunk boundaries)
    "llama4": (
        Llama4TextConfig,
        Llama4ForCausalLM,
        dict(
            intermediate_size=96,
            intermediate_size_mlp=96,
            num_key_value_heads=2,
            head_dim=16,
            num_local_experts=2,
            attention_chunk_size=5,
            # its second layer has no rotary embedding, and there a query's temperature
            # grows with its position: from position 1 at this floor scale, not 8,191
            no_rope_layers=[1, 0, 1],
            floor_scale=2,
            attn_scale=0.5,
        ),
    ),
    # multi-head latent attention: keys of 16 + 8 (rotary) dimensions, values of 16; a dense
    # first layer, then experts with a shared one and grouped routing
    "deepseek_v3": (
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
        dict(**DEEPSEEK, q_lora_rank=16, n_group=2, topk_group=1),
    ),
    # the same attention, its own experts (DeepSeek V2 / V2-Lite), queries without a low rank
    "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM, dict(**DEEPSEEK, q_lora_rank=None)),
    # attention sinks (one softmax logit per head with no value), sliding layers, experts
    "gpt_oss": (
        GptOssConfig,
        GptOssForCausalLM,
        dict(
            head_dim=16,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=5,
        ),
    ),
}
BLOCK = 4


def build(family: str, dtype=torch.float32, use_kernel: bool = True, kv_dtype=None):
    """transformers' eager model and our runner of the same weights; with `kv_dtype` (fp8)
    the reference's eager attention reads keys and values rounded to it, as our cache holds
    them."""
    cfg_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    attention = "eager" if kv_dtype is None else _rounding_eager(kv_dtype)
    ref = model_cls(cfg_cls(**COMMON, **extra, attn_implementation=attention)).to(dtype).eval()
    ours = model_cls(cfg_cls(**COMMON, **extra, attn_implementation=paged_attention.register()))
    ours.load_state_dict(ref.state_dict())
    runner = ModelRunner(
        ours.to(dtype), num_kv_blocks=64, block_size=BLOCK, use_kernel=use_kernel, kv_dtype=kv_dtype
    )
    return ref, runner


def _rounding_eager(kv_dtype: torch.dtype) -> str:
    """Register, under a name, the family's own eager attention over keys and values rounded
    to `kv_dtype` and back."""
    import sys

    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    def attention(module, query, key, value, *args, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        key, value = key.to(kv_dtype).to(key.dtype), value.to(kv_dtype).to(value.dtype)
        return eager(module, query, key, value, *args, **kwargs)

    name = f"eager_{kv_dtype}".replace("torch.", "")
    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, eager_mask)  # else a custom name gets no mask at all
    return name


def ref_last_logits(ref, tokens: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return ref(torch.tensor([tokens])).logits[0, -1].float()


class Seq:
    """A request driven by hand: its tokens, its block table, what is already cached."""

    def __init__(self, first_block: int, tokens: list[int]):
        self.tokens = tokens
        self.table = list(range(first_block, first_block + 16))
        self.cached = 0

    def chunk(self, n: int | None = None) -> SeqInput:
        end = len(self.tokens) if n is None else self.cached + n
        seq = SeqInput(self.tokens[self.cached : end], self.cached, self.table, True)
        self.cached = end
        return seq


# decode attention runs either in the compiled CPU kernel or in the torch reference path
PATHS = pytest.mark.parametrize("use_kernel", [True, False], ids=["kernel", "torch"])


@PATHS
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefill_and_decode_logits_match_transformers(family, use_kernel):
    ref, runner = build(family, use_kernel=use_kernel)
    assert runner.use_kernel == (use_kernel and cpu_ops.load() is not None)
    _prefill_then_decode(ref, runner)


@PATHS
@pytest.mark.parametrize(
    "family, kv_dtype",
    [
        ("llama", torch.float8_e4m3fn),
        ("llama", torch.float8_e5m2),
        ("mistral", torch.float8_e4m3fn),  # a sliding window
        ("gemma2", torch.float8_e4m3fn),  # softcapped scores, sliding layers
        ("gpt_oss", torch.float8_e4m3fn),  # attention sinks
    ],
)
def test_an_fp8_cache_matches_attention_over_keys_and_values_rounded_to_fp8(
    family, kv_dtype, use_kernel
):
    """kv_cache_dtype fp8: a byte per key and value element, and every path reads what the
    cache holds (the prompt's own fresh keys too). The logits of prefills, decodes and a
    chunked prefill follow transformers' own eager attention over keys and values rounded to
    that type and back, and not the unrounded one. Not to 1e-4: a key that the two compute a
    float32 ulp apart (batched differently) may round to neighbouring fp8 values (one such in
    gemma2's chunked prefill moves a logit by 1.6e-3). Decodes on the compiled kernel, which
    widens the bytes itself, and on the torch path."""
    ref, runner = build(family, use_kernel=use_kernel, kv_dtype=kv_dtype)
    assert runner.kv_cache.dtype == kv_dtype
    _prefill_then_decode(ref, runner, atol=5e-3)
    unrounded, _ = build(family)
    g = torch.Generator().manual_seed(2)
    long = Seq(48, torch.randint(0, VOCAB, (11,), generator=g).tolist())
    runner.execute(ModelInput([SeqInput(long.chunk(6).token_ids, 0, long.table, False)]))
    [logits] = runner.execute(ModelInput([long.chunk()]))
    rounded_error = (logits - ref_last_logits(ref, long.tokens)).abs()
    assert rounded_error.max() < 5e-3
    unrounded_error = (logits - ref_last_logits(unrounded, long.tokens)).abs()
    assert rounded_error.mean() < 0.2 * unrounded_error.mean()


@pytest.mark.parametrize("kv_dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_the_decode_kernel_widens_every_fp8_value_as_torch_does(kv_dtype):
    """One cached token: each head's output is its value row, so a row holding every finite
    fp8 code comes back as torch widens it (e4m3fn's two NaN codes and e5m2's infinities and
    NaNs left out: rounding never writes them, e4m3fn saturates at 448)."""
    if cpu_ops.load() is None:
        pytest.skip("no compiled CPU kernel here")
    codes = torch.arange(256, dtype=torch.uint8).view(kv_dtype)
    finite = codes[torch.isfinite(codes.float())]
    cache = torch.zeros(2, 1, 1, 1, len(finite), dtype=kv_dtype)  # (kv, block, slot, Hkv, D)
    cache[1, 0, 0, 0].view(torch.uint8).copy_(finite.view(torch.uint8))
    q = torch.ones(1, 2, len(finite))
    one = torch.ones(1, dtype=torch.long)
    out = cpu_ops.paged_decode(q, cache, torch.zeros(1, 1, dtype=torch.long), one, 1.0, None)
    assert torch.equal(out[0], finite.float().expand(2, -1))


def _prefill_then_decode(ref, runner, atol: float = 1e-4) -> None:
    g = torch.Generator().manual_seed(1)
    seqs = [
        Seq(0, torch.randint(0, VOCAB, (13,), generator=g).tolist()),
        Seq(16, torch.randint(0, VOCAB, (6,), generator=g).tolist()),
        Seq(32, torch.randint(0, VOCAB, (1,), generator=g).tolist()),
    ]
    # step 1: three prefills of different lengths in one flattened batch (one is 1 token long)
    logits = runner.execute(ModelInput([s.chunk() for s in seqs]))
    for i, s in enumerate(seqs):
        torch.testing.assert_close(logits[i], ref_last_logits(ref, s.tokens), atol=atol, rtol=1e-4)
    # steps 2-5: batched decodes, each feeding back the greedy token of the reference
    for _ in range(4):
        for i, s in enumerate(seqs):
            s.tokens.append(int(logits[i].argmax()))
        logits = runner.execute(ModelInput([s.chunk() for s in seqs]))
        for i, s in enumerate(seqs):
            expected = ref_last_logits(ref, s.tokens)
            torch.testing.assert_close(logits[i], expected, atol=atol, rtol=1e-4)


@PATHS
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_chunked_prefill_mixed_with_decode_matches(family, use_kernel):
    ref, runner = build(family, use_kernel=use_kernel)
    g = torch.Generator().manual_seed(2)
    long = Seq(0, torch.randint(0, VOCAB, (17,), generator=g).tolist())
    short = Seq(16, torch.randint(0, VOCAB, (4,), generator=g).tolist())
    logits = runner.execute(ModelInput([short.chunk()]))
    chunks = [6, 7, 4]  # chunk boundaries not aligned to blocks
    for n in chunks:
        short.tokens.append(int(logits[0].argmax()))
        batch = [short.chunk(), long.chunk(n)]
        if long.cached < len(long.tokens):
            batch[1] = SeqInput(batch[1].token_ids, batch[1].start, long.table, sample=False)
        logits = runner.execute(ModelInput(batch))
        torch.testing.assert_close(
            logits[0], ref_last_logits(ref, short.tokens), atol=1e-4, rtol=1e-4
        )
    assert logits.shape[0] == 2  # the last chunk samples
    torch.testing.assert_close(logits[1], ref_last_logits(ref, long.tokens), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_oss"])  # SDPA, softcap, sinks
def test_bfloat16_runs_close_to_reference(family):
    ref, runner = build(family, torch.bfloat16)
    tokens = list(range(1, 12))
    logits = runner.execute(ModelInput([SeqInput(tokens, 0, [0, 1, 2], True)]))
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], ref_last_logits(ref, tokens), atol=0.05, rtol=0.05)


@pytest.mark.parametrize(
    "config, match",
    [
        # its model does not pass the attention arguments down
        (StableLmConfig(**COMMON, intermediate_size=96), "cannot run on the paged cache"),
    ],
    ids=["stablelm"],
)
def test_an_architecture_the_paged_cache_cannot_run_fails_at_load(tmp_path, config, match):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    kw = dict(dtype="float32", device="cpu", block_size=BLOCK, kv_cache_memory_mb=1)
    with pytest.raises((ValueError, RuntimeError), match=match):
        ModelRunner.from_pretrained(tmp_path, num_kv_blocks=8, **kw)


def test_load_clears_the_block_its_check_used(tmp_path):
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**COMMON, intermediate_size=96)).save_pretrained(tmp_path)
    kw = dict(dtype="float32", device="cpu", block_size=BLOCK, kv_cache_memory_mb=1)
    runner = ModelRunner.from_pretrained(tmp_path, num_kv_blocks=8, **kw)
    assert not runner.kv_cache.any()


# Phi-3's LongRoPE with a limit of 8 positions: short factors below it, long ones past it
LONGROPE = dict(
    intermediate_size=96,
    pad_token_id=0,
    max_position_embeddings=64,
    original_max_position_embeddings=8,
    rope_scaling={
        "rope_type": "longrope",
        "short_factor": [1.0] * 8,
        "long_factor": [2.0 + i for i in range(8)],
    },
)


def test_longrope_uses_one_set_of_frequencies_for_the_servers_life():
    """transformers picks LongRoPE's long factors for a call whose largest position passes the
    limit, so over a flattened batch one long request would turn a short one's queries long
    against its keys cached short. The runner picks once, as vLLM: the long set (the one
    transformers computes past the limit) when its context window passes the limit, the short
    one when max_model_len does not. With it, a short request batched with one that grows past
    the limit equals transformers' forward of each whole sequence with that same set."""
    torch.manual_seed(0)
    ref = Phi3ForCausalLM(Phi3Config(**COMMON, **LONGROPE, attn_implementation="eager")).eval()
    paged = Phi3Config(**COMMON, **LONGROPE, attn_implementation=paged_attention.register())
    ours, capped = Phi3ForCausalLM(paged), Phi3ForCausalLM(paged)
    ours.load_state_dict(ref.state_dict())
    probe = copy.deepcopy(ref.model.rotary_emb)  # transformers' own, after a call past 8
    probe(torch.zeros(1, 9, 64), torch.arange(9)[None])
    runner = ModelRunner(ours, num_kv_blocks=64, block_size=BLOCK)
    assert torch.equal(ours.model.rotary_emb.inv_freq, probe.inv_freq)
    ModelRunner(capped, num_kv_blocks=8, block_size=BLOCK, max_model_len=8)
    short_set = capped.model.rotary_emb
    assert torch.equal(short_set.inv_freq, short_set.original_inv_freq)
    fix_longrope(ref, 64)  # the reference recomputes each sequence whole, with the same set
    g = torch.Generator().manual_seed(3)
    short = Seq(0, torch.randint(0, VOCAB, (2,), generator=g).tolist())
    grows = Seq(16, torch.randint(0, VOCAB, (6,), generator=g).tolist())
    logits = runner.execute(ModelInput([short.chunk(), grows.chunk()]))
    for _ in range(5):  # positions 6 .. 10 for the one, 2 .. 6 for the other
        for i, s in enumerate((short, grows)):
            torch.testing.assert_close(
                logits[i], ref_last_logits(ref, s.tokens), atol=1e-4, rtol=1e-4
            )
            s.tokens.append(int(logits[i].argmax()))
        logits = runner.execute(ModelInput([short.chunk(), grows.chunk()]))


def test_llama4s_context_is_its_position_limit_not_one_chunk():
    """The paged attention applies Llama 4's chunked local attention (the FAMILIES tests
    cross chunk boundaries), so its whole position range is served."""
    llama4 = Llama4TextConfig(attention_chunk_size=8192, max_position_embeddings=131072)
    assert context_window(llama4) == ModelShape.of(llama4).max_position_embeddings == 131072
    assert context_window(LlamaConfig(max_position_embeddings=4096)) == 4096


def test_attention_without_metadata_is_a_clear_error():
    _, runner = build("llama")
    with pytest.raises(RuntimeError, match="attn_metadata"):
        runner.model(input_ids=torch.tensor([[1, 2]]))


@pytest.mark.parametrize("bias", [False, True])
def test_few_rows_forward_equals_the_linear_forward(bias):
    """Both orientations, on either side of each row limit, 2-D and 3-D inputs, with and
    without a bias; the module, its weight and its hooks survive the switch."""
    from kvkernels.few_rows import EVERYWHERE, HEAD_MAX_ROWS, install, uninstall

    torch.manual_seed(0)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(64, 1000, bias=bias)
    model.proj = torch.nn.Linear(64, 96, bias=bias)
    calls = []
    model.proj.register_forward_hook(lambda _m, _i, out: calls.append(out.shape))
    weight = model.lm_head.weight
    xs = [torch.randn(1, r, 64) for r in (1, 2, 3, 4, HEAD_MAX_ROWS, HEAD_MAX_ROWS + 1, 20)]
    xs.append(torch.randn(3, 64))
    linears = (model.lm_head, model.proj)
    expected = [[F.linear(x, m.weight, m.bias) for x in xs] for m in linears]
    assert install(model) == 2 and install(model) == 0  # once per Linear
    for linear, wants in zip(linears, expected, strict=True):
        for x, want in zip(xs, wants, strict=True):
            torch.testing.assert_close(linear(x), want, rtol=1e-5, atol=1e-5)
    assert len(calls) == len(xs)  # the hook ran on every call, few rows or not
    assert isinstance(model.lm_head, torch.nn.Linear) and model.lm_head.weight is weight
    assert model.lm_head.forward.rows == EVERYWHERE.head
    assert model.proj.forward.rows == EVERYWHERE.layers
    assert uninstall(model) == 2 and "forward" not in model.proj.__dict__


def test_few_rows_takes_only_the_row_counts_it_is_given(monkeypatch):
    """A host's choice (engine/linear_tuning.py) may leave gaps: those row counts, and any
    Linear given none, run F.linear."""
    from kvkernels import few_rows

    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(64, 1000)
    model.proj = torch.nn.Linear(64, 96)
    taken = []
    original = few_rows.few_rows_linear
    monkeypatch.setattr(
        few_rows, "few_rows_linear", lambda x, *a: taken.append(len(x)) or original(x, *a)
    )
    assert (
        few_rows.install(model, few_rows.FewRows(head=frozenset({2, 5}), layers=frozenset())) == 1
    )
    assert "forward" not in model.proj.__dict__
    for r in range(1, 7):
        x = torch.randn(r, 64)
        torch.testing.assert_close(
            model.lm_head(x),
            F.linear(x, model.lm_head.weight, model.lm_head.bias),
            rtol=1e-5,
            atol=1e-5,
        )
    assert taken == [2, 5]


def test_few_rows_leaves_a_linear_with_its_own_forward_alone():
    """Llama 4's router is a Linear whose forward returns (scores, logits)."""
    from kvkernels.few_rows import install

    class Router(torch.nn.Linear):
        def forward(self, x):
            return super().forward(x), x

    model = torch.nn.Module()
    model.router = Router(8, 4)
    assert install(model) == 0 and isinstance(model.router(torch.ones(1, 8)), tuple)


def test_few_rows_leaves_non_float32_layers_alone():
    from kvkernels.few_rows import install

    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(8, 16).to(torch.bfloat16)
    model.proj = torch.nn.Linear(8, 8).to(torch.bfloat16)
    assert install(model) == 1 and "forward" not in model.proj.__dict__


def test_runner_installs_this_hosts_choice_on_cpu(monkeypatch, tmp_path):
    """The runner asks engine.linear_tuning for this host's row counts (kept in the cache)."""
    from engine import linear_tuning
    from kvkernels.few_rows import FewRows

    choice = FewRows(head=frozenset({1, 3}), layers=frozenset({2}))
    asked = []
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    monkeypatch.setattr(linear_tuning, "tuned", lambda m, cache: asked.append(cache) or choice)
    _, runner = build("llama")
    assert asked == [tmp_path / linear_tuning.CACHE_FILE]
    head = runner.model.lm_head
    layers = [m for m in runner.model.modules() if isinstance(m, torch.nn.Linear) and m is not head]
    assert head.forward.rows == choice.head
    assert layers and all(m.forward.rows == choice.layers for m in layers)
