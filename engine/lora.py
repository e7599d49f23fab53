"""LoRA adapters in PEFT's format, served beside the base model: several in one batch.

An adapter adds `scale * B @ A` to some of the decoder's linear layers. The base weights stay
as they are and each layer's output gets `scale * (x @ A^T) @ B^T` added for the tokens of the
requests that use the adapter (what vLLM's punica kernels batch on a GPU): two thin matrix
products of rank r, where merged weights would need a copy of the model per adapter and one
adapter per batch. A request names its adapter (`SamplingParams.lora`); requests of different
adapters and of the base model share one step.

Read from a PEFT directory (`save_pretrained`'s `adapter_config.json` and
`adapter_model.safetensors` or `.bin`). Plain LoRA on the decoder's `nn.Linear` layers is
served; what would change the output if ignored is refused at load with its reason: DoRA,
trained biases, `modules_to_save`, per-module ranks or alphas (`rank_pattern`,
`alpha_pattern`), fan-in-fan-out (Conv1D) layers, adapters on the embedding, the LM head or
parameters, activated LoRA, PEFT's other variants (QA-LoRA, Arrow, ...), and layers that are
not `nn.Linear` (the fused experts of a mixture of experts).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")
# adapter_config.json settings that change what the adapter computes, and the value under
# which this module computes it
_PLAIN = {
    "use_dora": False,
    "fan_in_fan_out": False,
    "bias": "none",
    "lora_bias": False,
    "modules_to_save": None,
    "rank_pattern": {},
    "alpha_pattern": {},
    "layer_replication": None,
    "trainable_token_indices": None,
    "target_parameters": None,
    "alora_invocation_tokens": None,  # activated LoRA: from an invocation sequence on
    "use_qalora": False,
    "use_bdlora": None,
    "arrow_config": None,
    "monteclora_config": None,
    "velora_config": None,
    "kasa_config": None,
}
_NOT_SERVED = ("lm_head", "embed_tokens")  # their inputs are not one row per step token


class LoRAError(ValueError):
    """An adapter that cannot be loaded onto this model, and why."""


@dataclass(frozen=True)
class LoRAAdapter:
    """One adapter's weights: per linear layer's module name, A (r, in) and scale * B (out, r)."""

    name: str
    path: str
    rank: int
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_adapter(name: str, path: str | Path, model: nn.Module) -> LoRAAdapter:
    """Read a PEFT LoRA directory for `model`, in its dtype and on its device."""
    path = Path(path)
    config = _read_config(name, path)
    tensors = _read_weights(name, path)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise LoRAError(f"LoRA adapter {name!r}: weight {key!r} is not a plain LoRA weight")
        parts.setdefault(match["module"], {})[match["part"]] = tensor
    if not parts:
        raise LoRAError(f"LoRA adapter {name!r}: {path} holds no LoRA weights")
    rank = int(config.get("r", 8))
    alpha = float(config.get("lora_alpha", 8))
    scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    param = next(model.parameters())
    layers = {}
    for module_name, ab in sorted(parts.items()):
        a, b = _checked_pair(name, model, module_name, ab, rank)
        layers[module_name] = (
            a.to(param.device, param.dtype),
            (b.float() * scale).to(param.device, param.dtype),
        )
    return LoRAAdapter(name, str(path), rank, layers)


def _read_config(name: str, path: Path) -> dict:
    file = path / "adapter_config.json"
    if not file.is_file():
        raise LoRAError(f"LoRA adapter {name!r}: no adapter_config.json in {path}")
    config = json.loads(file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise LoRAError(f"LoRA adapter {name!r}: peft_type {config['peft_type']!r}, not LORA")
    for key, plain in _PLAIN.items():
        value = config.get(key, plain)
        if value and value != plain:  # unset, empty or the plain value: plain LoRA
            raise LoRAError(f"LoRA adapter {name!r}: {key} = {value!r} is not supported")
    return config


def _read_weights(name: str, path: Path) -> dict[str, torch.Tensor]:
    if (path / "adapter_model.safetensors").is_file():
        from safetensors.torch import load_file

        return load_file(path / "adapter_model.safetensors")
    if (path / "adapter_model.bin").is_file():
        return torch.load(path / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise LoRAError(f"LoRA adapter {name!r}: no adapter_model.safetensors or .bin in {path}")


def _checked_pair(
    name: str, model: nn.Module, module_name: str, ab: dict[str, torch.Tensor], rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"LoRA adapter {name!r}, layer {module_name!r}"
    if set(ab) != {"A", "B"}:
        raise LoRAError(f"{where}: has lora_{next(iter(ab))} without its pair")
    if any(part in _NOT_SERVED for part in module_name.split(".")):
        raise LoRAError(f"{where}: adapters on the embedding or the LM head are not supported")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise LoRAError(f"{where}: the model has no such layer") from None
    if not isinstance(module, nn.Linear):
        raise LoRAError(f"{where}: a {type(module).__name__}, not a linear layer")
    a, b = ab["A"], ab["B"]
    want_a, want_b = (rank, module.in_features), (module.out_features, rank)
    if tuple(a.shape) != want_a or tuple(b.shape) != want_b:
        raise LoRAError(
            f"{where}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, where r = {rank} "
            f"and the layer need {want_a} and {want_b}"
        )
    return a, b


class LoRALayers:
    """The adapters of one model, applied through forward hooks on the layers they adapt.

    Adapter slots count from 1 (0: the base model). Around a forward, `batch` says which
    tokens of the flattened batch use which slot; the hooks do nothing when none does."""

    def __init__(self, model: nn.Module, adapters: list[LoRAAdapter]) -> None:
        self.slots = {adapter.name: slot for slot, adapter in enumerate(adapters, start=1)}
        self.adapters = adapters
        by_layer: dict[str, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {}
        for slot, adapter in enumerate(adapters, start=1):
            for module_name, ab in adapter.layers.items():
                by_layer.setdefault(module_name, {})[slot] = ab
        self._groups: list[tuple[int, torch.Tensor]] = []
        self._num_tokens = 0
        for module_name, weights in by_layer.items():
            model.get_submodule(module_name).register_forward_hook(self._hook(weights))

    @contextlib.contextmanager
    def batch(self, token_slots: list[int]) -> Iterator[None]:
        """For one forward: token_slots[i] is the adapter slot of the batch's token i."""
        self._groups = _groups(token_slots)
        self._num_tokens = len(token_slots)
        try:
            yield
        finally:
            self._groups = []

    def _hook(self, weights: dict[int, tuple[torch.Tensor, torch.Tensor]]):
        def hook(_module, inputs, output: torch.Tensor) -> None:
            if not self._groups:
                return
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            out = output.view(-1, output.shape[-1])  # the Linear's own fresh output
            if x.shape[0] != self._num_tokens:  # a layer that does not see every token
                raise RuntimeError(
                    f"a LoRA layer saw {x.shape[0]} rows for {self._num_tokens} tokens"
                )
            for slot, rows in self._groups:
                ab = weights.get(slot)
                if ab is None:
                    continue
                a, b = ab
                if isinstance(rows, slice):  # a run of tokens: in place, no copies
                    out[rows].addmm_(x[rows] @ a.T, b.T)
                else:
                    rows = rows.to(x.device)
                    out.index_add_(0, rows, (x[rows] @ a.T) @ b.T)

        return hook


_MAX_RUNS = 4  # an adapter's tokens in more runs than this are gathered by index


def _groups(token_slots: list[int]) -> list[tuple[int, slice | torch.Tensor]]:
    """Per adapter slot in use, its tokens: a slice for each run of them (a request's tokens
    are one run), or one index tensor when they are scattered (a decode batch of many
    adapters)."""
    runs: dict[int, list[slice]] = {}
    start = 0
    for i in range(1, len(token_slots) + 1):
        if i == len(token_slots) or token_slots[i] != token_slots[start]:
            if token_slots[start]:
                runs.setdefault(token_slots[start], []).append(slice(start, i))
            start = i
    groups: list[tuple[int, slice | torch.Tensor]] = []
    for slot, slices in runs.items():
        if len(slices) <= _MAX_RUNS:
            groups += [(slot, s) for s in slices]
        else:
            index = [t for s in slices for t in range(s.start, s.stop)]
            groups.append((slot, torch.tensor(index)))
    return groups
