"""The compiled CPU decode-attention kernel (csrc/paged_decode_cpu.cpp), built once per machine.

Built with torch's own extension builder into the splitserve cache (outside git); the set-up
step builds it ahead of time (`python -m kvkernels.cpu_ops`). Where no compiler is available the
engine uses the torch reference path in paged_attention.py, and says so once in the log.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "paged_decode_cpu.cpp"


def _build_dir() -> Path:
    root = os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve")
    path = Path(root) / "torch_extensions" / f"torch{torch.__version__}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def load():
    """-> the extension module, or None when it cannot be built (then the torch path runs)."""
    if os.environ.get("SPLITSERVE_DISABLE_CPU_KERNEL") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load as load_extension

        return load_extension(
            name="splitserve_paged_decode_cpu",
            sources=[str(_SOURCE)],
            build_directory=str(_build_dir()),
            # -fopenmp: ATen's header-inline parallel_for is serial without it
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    except Exception as e:  # no compiler, no ninja, ...: fall back, never fail serving
        logger.warning("CPU decode kernel unavailable (%s); using the torch reference path", e)
        return None


def paged_decode(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None,
) -> torch.Tensor | None:
    """q (Bd, H, D) fp32 -> (Bd, H, D), or None when the kernel does not apply."""
    ext = load()
    if ext is None or q.device.type != "cpu" or q.dtype != torch.float32:
        return None
    return ext.paged_decode(
        q.contiguous(),
        layer_cache[0],
        layer_cache[-1],  # a latent cache's one slot holds keys and values
        block_tables,
        context_lens,
        scale,
        window or 0,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    print("CPU decode kernel:", "built" if load() is not None else "unavailable")
