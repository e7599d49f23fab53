from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from engine.parallel import ParallelLayout
from engine.scheduler import SchedulerConfig
from engine.spec_decode import SpeculativeConfig

_DTYPES = ("float32", "bfloat16", "float16")
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")
# the KV cache's element type, as vLLM's --kv-cache-dtype names it: "auto" is the model's
KV_CACHE_DTYPES = {
    "auto": None,
    "fp8": "float8_e4m3fn",
    "fp8_e4m3": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}


# vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S default: longer in one step, an engine is stuck
DEFAULT_STEP_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class EngineConfig:
    # local HF directory or Hugging Face Hub repository id; None = the embedded default model
    model: str | None = None
    revision: str | None = None  # a Hub model's branch, tag or commit; None: main
    # vLLM's --served-model-name (its first): the model_name label of the replica's metrics
    # under vLLM's names (deployments/metrics.py); None: none recorded under them
    served_model_name: str | None = None
    # vLLM's --tokenizer / --tokenizer-revision: a directory or Hub id; None: the model's
    tokenizer: str | None = None
    tokenizer_revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    block_size: int = 16
    num_kv_blocks: int | None = None  # None: sized from kv_cache_memory_mb
    kv_cache_memory_mb: int = 1024
    # vLLM's --gpu-memory-utilization: with device cuda, the share of the GPU's memory the
    # engine may hold, its KV cache sized to fill it (engine/kv_memory.py) in place of
    # kv_cache_memory_mb; num_kv_blocks still wins
    gpu_memory_utilization: float | None = None
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES: fp8 stores keys and values in a byte each
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    num_threads: int | None = None  # torch intra-op threads; None leaves torch's default
    # above 1: the model runs on tp * pp Ray actors (engine/workers.py), one CPU share each;
    # kv_cache_memory_mb is then per worker
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    worker_num_cpus: float = 1.0
    worker_num_gpus: float = 1.0  # with device cuda; a fraction shares a GPU
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    # vLLM's --lora-modules: (name, PEFT directory) of each LoRA adapter a request may name
    # (engine/lora.py); a multi-worker replica's workers each hold their slice of it
    lora_modules: tuple[tuple[str, str], ...] = ()
    # a directory of LoRA adapters, one per subdirectory, named by it: each loaded when a
    # request first names it; at most max_loras of them stay loaded (engine/lora.py)
    lora_dir: str | None = None
    max_loras: int = 8
    # vLLM's --speculative-config: decoding requests verify n-gram drafts (engine/spec_decode.py)
    # or a draft model's (engine/draft_model.py: its KV cache as many blocks as the target's)
    speculative: SpeculativeConfig | None = None
    # vLLM's --enforce-eager: on a GPU, decode steps of a single-worker replica replay CUDA
    # graphs (engine/cuda_graphs.py) unless this is set; CPUs always run eagerly
    enforce_eager: bool = False
    # vLLM's VLLM_ENGINE_ITERATION_TIMEOUT_S: a replica whose engine loop has spent longer in
    # one iteration (a step, a hand-off's import) is stuck (a hung model worker or GPU); its
    # health check fails it and its requests (deployments/servers.py). None: never
    step_timeout_s: float | None = DEFAULT_STEP_TIMEOUT_S

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {tuple(KV_CACHE_DTYPES)}, "
                f"got {self.kv_cache_dtype!r}"
            )
        if self.block_size < 1 or (self.num_kv_blocks is not None and self.num_kv_blocks < 1):
            raise ValueError("block_size and num_kv_blocks must be >= 1")
        if self.kv_cache_memory_mb < 1:
            raise ValueError("kv_cache_memory_mb must be >= 1")
        self._check_memory_share()
        if self.worker_num_cpus <= 0:
            raise ValueError("worker_num_cpus must be > 0")
        if self.worker_num_gpus < 0:
            raise ValueError("worker_num_gpus must be >= 0")
        if self.step_timeout_s is not None and self.step_timeout_s <= 0:
            raise ValueError("step_timeout_s must be > 0 (or None: no limit)")
        if self.max_loras < 1:
            raise ValueError("max_loras must be >= 1")
        names = [name for name, _ in self.lora_modules]
        if len(set(names)) != len(names):
            raise ValueError(f"lora_modules: adapter names repeat: {names}")

    def _check_memory_share(self) -> None:
        share = self.gpu_memory_utilization
        if share is None:
            return
        if not 0 < share <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {share}")
        if not self.device.startswith("cuda"):
            raise ValueError(
                "gpu_memory_utilization sizes a GPU's KV cache; on a CPU it is kv_cache_memory_mb"
            )

    @property
    def kv_dtype(self) -> str:
        """The torch dtype name the KV cache holds."""
        return KV_CACHE_DTYPES[self.kv_cache_dtype] or self.dtype

    @property
    def memory_share(self):
        """gpu_memory_utilization's sizing (model_runner.MemoryShare), or None."""
        if self.gpu_memory_utilization is None:
            return None
        from engine.model_runner import MemoryShare

        limits = self.scheduler
        return MemoryShare(
            self.gpu_memory_utilization, limits.max_num_batched_tokens, limits.max_num_seqs
        )

    @property
    def parallel(self) -> ParallelLayout:
        return ParallelLayout(self.tensor_parallel_size, self.pipeline_parallel_size)

    @property
    def graph_batch(self) -> int:
        """The largest decode batch that replays a CUDA graph; 0: none does."""
        return self.draft_graph_batch if self.parallel.is_single else 0

    @property
    def draft_graph_batch(self) -> int:
        """The same for a draft model's forwards: the draft is whole on one device (a
        parallel replica's first worker's), so it replays graphs where the target's
        workers, whose steps span devices, run eagerly."""
        gpu = self.device.startswith("cuda")
        return self.scheduler.max_num_seqs if gpu and not self.enforce_eager else 0


def check_device(device: str) -> str:
    """The device, or ValueError: the engine runs on "cpu" or "cuda" ("cuda:N")."""
    if not _DEVICE.fullmatch(device):
        raise ValueError(f"device must be cpu or cuda (cuda:N), got {device!r}")
    return device


NAME_MAX = 255  # the bytes of one file name on Linux's file systems


def is_folder_name(name: str) -> bool:
    """Whether `name` can name one folder: not empty, "." or "..", no "/" or NUL, at most
    NAME_MAX bytes. A client's adapter name past these reached the file system, whose error
    (a name too long, an embedded NUL) was a 500 where no such adapter is a 404."""
    try:
        encoded = os.fsencode(name)
    except UnicodeEncodeError:  # a lone surrogate, which JSON can carry
        return False
    return (
        0 < len(encoded) <= NAME_MAX
        and name not in (".", "..")
        and b"/" not in encoded
        and b"\0" not in encoded
    )


def lora_path(lora_dir: str | Path | None, name: str) -> Path | None:
    """The directory of adapter `name` in `lora_dir` (a subdirectory holding PEFT's
    adapter_config.json), or None: no such adapter, or a name that is not one folder's."""
    if lora_dir is None or not is_folder_name(name):
        return None
    path = Path(lora_dir) / name
    return path if (path / "adapter_config.json").is_file() else None


def lora_dir_adapters(lora_dir: str | Path | None) -> list[str]:
    """The names of the adapters in `lora_dir`, sorted."""
    if lora_dir is None:
        return []
    return sorted(p.parent.name for p in Path(lora_dir).glob("*/adapter_config.json"))
