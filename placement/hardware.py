"""What planning needs to know about a model and a device, without weights or the device itself.

`ModelSpec.from_config` reads a Hugging Face config.json (a model directory or the file itself)
of a family the engine runs: the dense Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite, Gemma 1-3
and OPT, and the mixtures of experts Mixtral, Qwen2-MoE, Qwen3-MoE, gpt-oss, DeepSeek V2 / V3
(with its multi-head latent attention) and Llama 4 (its text model, which is what the engine
loads from a checkpoint of vision and text). It counts
parameters from the shapes, exactly as transformers builds them, so a 70B model can be planned
on a laptop. A mixture of experts has two counts: every parameter (what memory holds and what a
large decode batch reads) and those one token runs through (`active_params`: its FLOPs).
`DEVICES` are data-sheet figures (dense bf16 peak, HBM bandwidth and size, NVLink and network
bandwidth per GPU).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from engine.config import KV_CACHE_DTYPES
from engine.parallel import PARALLEL_MODEL_TYPES, ParallelLayout

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# the engine's kv_cache_dtype: bytes per cached element (every fp8 one a byte); None: the model's
KV_CACHE_BYTES = {name: None if kind is None else 1 for name, kind in KV_CACHE_DTYPES.items()}


@dataclass(frozen=True)
class Experts:
    """The mixture-of-experts MLP of `layers` of the model's layers (the others have the dense
    MLP): `count` gated experts, `per_token` of them run for each token."""

    count: int
    per_token: int
    intermediate_size: int  # of one expert
    layers: int
    shared_intermediate_size: int | None = None  # a shared expert (Qwen2-MoE, DeepSeek)
    shared_gate: bool = False  # Qwen2-MoE's: the shared expert's one-output gate
    biases: bool = False  # gpt-oss: on each expert's projections and on the router

    def widths(self) -> tuple[int, ...]:
        """The intermediate widths tensor parallelism splits: an expert's, a shared one's."""
        shared = self.shared_intermediate_size
        return (self.intermediate_size,) + (() if shared is None else (shared,))

    def expert_params(self, hidden: int) -> int:
        """One routed expert of one layer: gate, up, down (and their biases)."""
        f = self.intermediate_size
        return 3 * hidden * f + (2 * f + hidden) * self.biases

    def layer_params(self, hidden: int, running: int) -> int:
        """One layer's MoE MLP with `running` of its experts (all of them, or one token's)."""
        h, expert = hidden, self.expert_params(hidden)
        router = self.count * (h + self.biases)  # it scores every expert, whichever run
        shared = 0
        if self.shared_intermediate_size is not None:  # gate, up, down (+ its own gate)
            shared = 3 * h * self.shared_intermediate_size + h * self.shared_gate
        return running * expert + router + shared

    @classmethod
    def from_config(cls, kind: str, cfg: dict) -> Experts | None:
        build = {
            "mixtral": cls._every_layer,
            "gpt_oss": cls._every_layer,
            "qwen2_moe": cls._sparse_steps,
            "qwen3_moe": cls._sparse_steps,
            "deepseek_v2": cls._after_dense,
            "deepseek_v3": cls._after_dense,
            "llama4_text": cls._interleaved,
        }.get(kind)
        # hub configs and transformers' own spell the count either way
        count = (
            cfg.get("num_local_experts") or cfg.get("num_experts") or cfg.get("n_routed_experts")
        )
        return build(kind, cfg, count) if build and count else None

    @classmethod
    def _every_layer(cls, kind: str, cfg: dict, count: int) -> Experts:
        return cls(
            count=count,
            per_token=cfg.get("num_experts_per_tok") or cfg["experts_per_token"],
            intermediate_size=cfg["intermediate_size"],
            layers=cfg["num_hidden_layers"],
            biases=kind == "gpt_oss",
        )

    @classmethod
    def _sparse_steps(cls, kind: str, cfg: dict, count: int) -> Experts:
        """Qwen's: the dense MLP in `mlp_only_layers` and off the `decoder_sparse_step`."""
        dense, step = set(cfg.get("mlp_only_layers") or ()), cfg.get("decoder_sparse_step", 1)
        qwen2 = kind == "qwen2_moe"
        return cls(
            count=count,
            per_token=cfg["num_experts_per_tok"],
            intermediate_size=cfg["moe_intermediate_size"],
            layers=sum(
                i not in dense and (i + 1) % step == 0 for i in range(cfg["num_hidden_layers"])
            ),
            shared_intermediate_size=cfg.get("shared_expert_intermediate_size", 5632)
            if qwen2
            else None,
            shared_gate=qwen2,
        )

    @classmethod
    def _interleaved(cls, kind: str, cfg: dict, count: int) -> Experts:
        """Llama 4's: experts and a shared one, all of `intermediate_size`, in `moe_layers`
        (every `interleave_moe_layer_step`-th layer); the dense MLP elsewhere."""
        step, layers = cfg.get("interleave_moe_layer_step", 1), cfg.get("moe_layers")
        if layers is None:  # as its config derives them
            layers = range(step - 1, cfg["num_hidden_layers"], step)
        return cls(
            count=count,
            per_token=cfg["num_experts_per_tok"],
            intermediate_size=cfg["intermediate_size"],
            layers=len(layers),
            shared_intermediate_size=cfg["intermediate_size"],
        )

    @classmethod
    def _after_dense(cls, kind: str, cfg: dict, count: int) -> Experts:
        """DeepSeek's: dense first layers, then experts with shared ones."""
        return cls(
            count=count,
            per_token=cfg["num_experts_per_tok"],
            intermediate_size=cfg["moe_intermediate_size"],
            layers=cfg["num_hidden_layers"] - cfg.get("first_k_dense_replace", 0),
            shared_intermediate_size=cfg["moe_intermediate_size"] * cfg["n_shared_experts"],
        )


@dataclass(frozen=True)
class Latent:
    """DeepSeek V2 / V3's multi-head latent attention: queries through an optional low rank,
    keys and values from one `kv_lora_rank` latent (plus a shared rotary key part)."""

    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cached_head_dim(self) -> int:
        """What the engine caches per token and layer, as one KV head: the latent and the
        rotary key part every head shares."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def params(self, hidden: int, heads: int, bias: bool) -> int:
        h, q, kv = hidden, self.q_lora_rank, self.kv_lora_rank
        query = h * heads * self.qk_head_dim
        if q is not None:  # down to q, its norm, up to the heads
            query = h * q + q * bias + q + q * heads * self.qk_head_dim
        latent = (h + bias) * (kv + self.qk_rope_head_dim) + kv  # with its norm
        expand = kv * heads * (self.qk_nope_head_dim + self.v_head_dim)
        out = heads * self.v_head_dim * h + h * bias
        return query + latent + expand + out

    def replicated_params(self, hidden: int, bias: bool) -> int:
        """Of `params`, what tensor parallelism leaves whole: the projections down to the
        query rank and to the latent, and their norms (every head reads them)."""
        q, kv = self.q_lora_rank, self.kv_lora_rank
        query = 0 if q is None else hidden * q + q * bias + q
        return query + (hidden + bias) * (kv + self.qk_rope_head_dim) + kv

    @classmethod
    def from_config(cls, cfg: dict) -> Latent | None:
        if not cfg.get("kv_lora_rank"):
            return None
        names = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim")
        return cls(*(cfg.get(n) for n in names), cfg["v_head_dim"])


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int  # of the dense MLP
    vocab_size: int
    gated_mlp: bool  # Llama-style gate/up/down (3 matrices) vs OPT's fc1/fc2 (2)
    tied_embeddings: bool
    dtype_bytes: int = 2
    kv_dtype_bytes: int | None = None  # a KV element (kv_cache_dtype fp8: 1); None: dtype's
    learned_positions: int = 0  # OPT: rows of its learned position embedding (else RoPE: 0)
    # the gated families' small parts: biases, norms
    qkv_bias: bool = False  # on q, k and v (Qwen2; and with attention_bias)
    o_bias: bool = False  # on the output projection (attention_bias)
    mlp_bias: bool = False  # on gate, up and down (Llama's and Granite's mlp_bias)
    layer_norms: int = 2  # hidden-size norms per layer (Gemma 2 / 3: four)
    qk_norm: bool = False  # a head-size norm on queries and one on keys (Qwen3, Gemma 3)
    sinks: bool = False  # gpt-oss: one attention-sink logit per head
    experts: Experts | None = None
    latent: Latent | None = None  # DeepSeek's attention (then num_kv_heads, head_dim: cached)
    model_type: str = ""  # config.json's

    @property
    def runs_split(self) -> bool:
        """The engine runs it on tensor / pipeline parallel workers (engine/sharding.py)."""
        return self.model_type in PARALLEL_MODEL_TYPES

    @classmethod
    def from_config(
        cls, path: str | Path, dtype: str = "bfloat16", kv_cache_dtype: str = "auto"
    ) -> ModelSpec:
        spec = cls._from_config(path, dtype)
        return dataclasses.replace(spec, kv_dtype_bytes=KV_CACHE_BYTES[kv_cache_dtype])

    @classmethod
    def _from_config(cls, path: str | Path, dtype: str) -> ModelSpec:
        path = Path(path)
        cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        kind = cfg.get("model_type", "")
        if kind in _VISION_AND_TEXT:  # planned as the text model (see _VISION_AND_TEXT)
            cfg = {"_name_or_path": cfg.get("_name_or_path"), **cfg["text_config"]}
            kind = _VISION_AND_TEXT[kind]
        heads = cfg["num_attention_heads"]
        hidden = cfg["hidden_size"]
        if kind == "opt":
            return cls(
                name=cfg.get("_name_or_path") or "opt",
                num_layers=cfg["num_hidden_layers"],
                hidden_size=hidden,
                num_heads=heads,
                num_kv_heads=heads,
                head_dim=hidden // heads,
                intermediate_size=cfg["ffn_dim"],
                vocab_size=cfg["vocab_size"],
                gated_mlp=False,
                tied_embeddings=True,
                dtype_bytes=_DTYPE_BYTES[dtype],
                learned_positions=cfg["max_position_embeddings"] + 2,  # OPT's offset of 2
                model_type=kind,
            )
        if kind not in _GATED:
            raise ValueError(
                f"planning supports {', '.join(sorted(_GATED))} and opt configs, not {kind!r}"
            )
        family = _GATED[kind]
        attention_bias = bool(cfg.get("attention_bias", family.get("attention_bias", False)))
        latent = Latent.from_config(cfg)
        return cls(
            name=cfg.get("_name_or_path") or kind,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=hidden,
            num_heads=heads,
            # the engine caches a latent-attention model's latent, one KV head all ranks hold
            num_kv_heads=1 if latent else cfg.get("num_key_value_heads") or heads,
            head_dim=latent.cached_head_dim if latent else cfg.get("head_dim") or hidden // heads,
            intermediate_size=cfg[family.get("dense_mlp", "intermediate_size")],
            vocab_size=cfg["vocab_size"],
            gated_mlp=True,
            # Gemma ties its embeddings unless told otherwise; the others only when told
            tied_embeddings=bool(cfg.get("tie_word_embeddings", family.get("tied", False))),
            dtype_bytes=_DTYPE_BYTES[dtype],
            qkv_bias=bool(cfg.get("qkv_bias", family.get("qkv_bias", False))) or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            layer_norms=family.get("layer_norms", 2),
            qk_norm=family.get("qk_norm", False),
            sinks=family.get("sinks", False),
            experts=Experts.from_config(kind, cfg),
            latent=latent,
            model_type=kind,
        )

    @property
    def num_params(self) -> int:
        return self._params(running=self.experts.count if self.experts else 0)

    @property
    def active_params(self) -> int:
        """The parameters one token runs through: a dense model's all; a mixture's top-k."""
        return self._params(running=self.experts.per_token if self.experts else 0)

    def _params(self, running: int) -> int:
        h = self.hidden_size
        moe_layers = self.experts.layers if self.experts else 0
        moe = self.experts.layer_params(h, running) if self.experts else 0
        layers = (
            self.num_layers * self._attention_and_norms()
            + (self.num_layers - moe_layers) * self._dense_mlp()
            + moe_layers * moe
        )
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        final_norm = h if self.gated_mlp else 2 * h
        return layers + embeddings + final_norm + self.learned_positions * h

    def rank_params(self, tp: int, active: bool = False) -> float:
        """The parameters one rank of a `tp` group holds (of the whole model's layers), as the
        engine splits them (engine/sharding.py): the vocabulary in ceil(V / tp) rows, every
        head and MLP row 1 / tp, but whole on every rank what no plan splits (norms, the
        routers, the row-parallel layers' biases, OPT's positions, DeepSeek's latent
        projections) and, past the KV heads, a copy of its KV head's projections. `active`:
        only a token's top-k experts (its FLOPs), not all of them (what memory holds)."""
        experts = self.experts
        running = 0 if experts is None else experts.per_token if active else experts.count
        total = self._params(running)
        tables = 1 if self.tied_embeddings else 2  # embedding (and an untied LM head)
        whole = self._replicated_params(running)
        split = total - whole - tables * self.vocab_size * self.hidden_size
        rows = tables * -(-self.vocab_size // tp) * self.hidden_size
        return split / tp + whole + rows + self._kv_copies(tp)

    def _replicated_params(self, running: int) -> int:
        """What every rank of a tensor-parallel group holds whole (with `running` experts)."""
        h, layers = self.hidden_size, self.num_layers
        if not self.gated_mlp:  # OPT: two LayerNorms (weight, bias), out_proj's and fc2's bias
            return layers * 6 * h + 2 * h + self.learned_positions * h
        per_layer = self.layer_norms * h + 2 * self.head_dim * self.qk_norm + h * self.o_bias
        if self.latent is not None:
            per_layer += self.latent.replicated_params(h, self.o_bias)
        moe_layers, moe = 0, 0
        if self.experts is not None:  # the router, Qwen2-MoE's shared gate, gpt-oss's biases
            e, moe_layers = self.experts, self.experts.layers
            moe = e.count * (h + e.biases) + h * e.shared_gate + running * h * e.biases
        dense_down_bias = (layers - moe_layers) * h * self.mlp_bias
        return layers * per_layer + moe_layers * moe + dense_down_bias + h  # + the final norm

    def _kv_copies(self, tp: int) -> float:
        """Past the KV heads, each rank holds a whole KV head's k and v rows: what that adds
        to 1 / tp of them."""
        if self.latent is not None:
            return 0
        held = ParallelLayout(tp).kv_heads_per_rank(self.num_kv_heads)
        extra = held - self.num_kv_heads / tp
        return self.num_layers * extra * 2 * self.head_dim * (self.hidden_size + self.qkv_bias)

    def _attention_and_norms(self) -> int:
        h, d = self.hidden_size, self.head_dim
        if self.latent is not None:  # and the two RMSNorms
            return self.latent.params(h, self.num_heads, self.o_bias) + self.layer_norms * h
        attention = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2  # q, o, k, v
        if not self.gated_mlp:  # OPT: biases on q, k, v, o and two LayerNorms (weight, bias)
            return attention + 4 * h + 4 * h
        qkv = (self.num_heads + 2 * self.num_kv_heads) * d
        biases = qkv * self.qkv_bias + h * self.o_bias
        norms = self.layer_norms * h + 2 * d * self.qk_norm  # RMSNorm weights
        return attention + biases + norms + self.num_heads * self.sinks

    def _dense_mlp(self) -> int:
        h, f = self.hidden_size, self.intermediate_size
        if not self.gated_mlp:  # OPT's fc1, fc2 with biases
            return 2 * h * f + f + h
        return 3 * h * f + (2 * f + h) * self.mlp_bias

    @property
    def kv_bytes_per_token(self) -> int:
        slots = 1 if self.latent else 2  # a latent is its keys and its values
        element = self.kv_dtype_bytes or self.dtype_bytes
        return self.num_layers * slots * self.num_kv_heads * self.head_dim * element


# checkpoints of vision and text, planned as their text model: the engine loads a Llama 4 one
# as its text model alone; a Gemma 3 one whole on one worker (its vision tower, 0.4B of
# SigLIP, is not counted) and its text model alone on tensor / pipeline parallel workers
_VISION_AND_TEXT = {"llama4": "llama4_text", "gemma3": "gemma3_text"}

# model_type -> how the family differs from Llama's shapes (no key: as Llama)
_GATED: dict[str, dict] = {
    "llama": {},
    "mistral": {},
    "granite": {},
    "phi3": {},  # q/k/v and gate/up fused: the same counts
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qk_norm": True},
    "gemma": {"tied": True},
    "gemma2": {"tied": True, "layer_norms": 4},
    "gemma3_text": {"tied": True, "layer_norms": 4, "qk_norm": True},
    # mixtures of experts (their experts: `Experts.from_config`)
    "mixtral": {},
    "qwen2_moe": {"qkv_bias": True},
    "qwen3_moe": {"qk_norm": True},
    "gpt_oss": {"attention_bias": True, "sinks": True},
    "deepseek_v2": {},  # latent attention: `Latent.from_config`
    "deepseek_v3": {},
    "llama4_text": {"dense_mlp": "intermediate_size_mlp"},  # its experts': intermediate_size
}


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    peak_tflops: float  # dense bf16
    mem_bandwidth_gbs: float
    mem_gb: float
    intra_node_gbs: float  # per GPU, one direction (NVLink)
    inter_node_gbs: float  # per GPU (network)
    gpus_per_node: int = 8


DEVICES = {
    "A100-80GB": DeviceSpec("A100-80GB", 312, 2039, 80, 300, 25),
    "H100-80GB": DeviceSpec("H100-80GB", 989, 3350, 80, 450, 50),
    "H200": DeviceSpec("H200", 989, 4800, 141, 450, 50),
}
