"""What planning needs to know about a model and a device, without weights or the device itself.

`ModelSpec.from_config` reads a Hugging Face config.json (a model directory or the file itself;
the dense families the engine runs: Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite, Gemma 1-3,
and OPT) and counts parameters from the shapes, exactly as transformers builds them, so a 70B
model can be planned on a laptop. `DEVICES` are data-sheet figures (dense bf16 peak, HBM
bandwidth and size, NVLink and network bandwidth per GPU).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from engine.parallel import PARALLEL_MODEL_TYPES

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    gated_mlp: bool  # Llama-style gate/up/down (3 matrices) vs OPT's fc1/fc2 (2)
    tied_embeddings: bool
    dtype_bytes: int = 2
    learned_positions: int = 0  # OPT: rows of its learned position embedding (else RoPE: 0)
    # the gated families' small parts: biases, norms
    qkv_bias: bool = False  # on q, k and v (Qwen2; and with attention_bias)
    o_bias: bool = False  # on the output projection (attention_bias)
    mlp_bias: bool = False  # on gate, up and down (Llama's and Granite's mlp_bias)
    layer_norms: int = 2  # hidden-size norms per layer (Gemma 2 / 3: four)
    qk_norm: bool = False  # a head-size norm on queries and one on keys (Qwen3, Gemma 3)
    model_type: str = ""  # config.json's

    @property
    def runs_split(self) -> bool:
        """The engine runs it on tensor / pipeline parallel workers (engine/sharding.py)."""
        return self.model_type in PARALLEL_MODEL_TYPES

    @classmethod
    def from_config(cls, path: str | Path, dtype: str = "bfloat16") -> ModelSpec:
        path = Path(path)
        cfg = json.loads((path / "config.json" if path.is_dir() else path).read_text())
        kind = cfg.get("model_type", "")
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
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            name=cfg.get("_name_or_path") or kind,
            num_layers=cfg["num_hidden_layers"],
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or hidden // heads,
            intermediate_size=cfg["intermediate_size"],
            vocab_size=cfg["vocab_size"],
            gated_mlp=True,
            # Gemma ties its embeddings unless told otherwise; the others only when told
            tied_embeddings=bool(cfg.get("tie_word_embeddings", family.get("tied", False))),
            dtype_bytes=_DTYPE_BYTES[dtype],
            qkv_bias=family.get("qkv_bias", False) or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            layer_norms=family.get("layer_norms", 2),
            qk_norm=family.get("qk_norm", False),
            model_type=kind,
        )

    @property
    def params_per_layer(self) -> int:
        h, d, f = self.hidden_size, self.head_dim, self.intermediate_size
        attention = h * self.num_heads * d * 2 + h * self.num_kv_heads * d * 2  # q, o, k, v
        if self.gated_mlp:  # RMSNorm weights; biases and head-size norms where the family has
            qkv = (self.num_heads + 2 * self.num_kv_heads) * d
            biases = qkv * self.qkv_bias + h * self.o_bias + (2 * f + h) * self.mlp_bias
            norms = self.layer_norms * h + 2 * d * self.qk_norm
            return attention + 3 * h * f + biases + norms
        # OPT: biases on q, k, v, o, fc1, fc2 and two LayerNorms with weight and bias
        return attention + 2 * h * f + 4 * h + f + h + 4 * h

    @property
    def num_params(self) -> int:
        h = self.hidden_size
        embeddings = self.vocab_size * h * (1 if self.tied_embeddings else 2)
        final_norm = h if self.gated_mlp else 2 * h
        positions = self.learned_positions * h
        return self.num_layers * self.params_per_layer + embeddings + final_norm + positions

    @property
    def kv_bytes_per_token(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim * self.dtype_bytes


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
