"""The compiled CPU decode-attention kernel (csrc/paged_decode_cpu.cpp), built once per machine.

Built with torch's own extension builder into the splitserve cache (outside git), in a directory
of this source's and environment's own; the set-up step builds it ahead of time (`python -m
kvkernels.cpu_ops`), and every process after that imports the built module directly. Where no
compiler is available the engine uses the torch reference path in paged_attention.py, and says
so once in the log.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import logging
import os
import platform
import sys
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)
_SOURCE = Path(__file__).parent / "csrc" / "paged_decode_cpu.cpp"


_NAME = "splitserve_paged_decode_cpu"
_LIBRARY = f"{_NAME}.so"  # what torch's build links in the build directory
# -fopenmp: ATen's header-inline parallel_for is serial without it
_CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffast-math")
_LDFLAGS = ("-fopenmp",)
_DONE = "built"  # written into a build directory once its module has loaded
STALE_LOCK_S = 600.0  # a build takes ~30 s: a lock this old was left by a killed builder


def build_dir() -> Path:
    """The kernel's build directory for this source, these flags, this torch and Python and
    this CPU: each checkout and environment sharing the cache gets its own (in one directory,
    torch's ninja build, whose commands name both, rebuilt the kernel each time the other ran,
    over a library that running processes had loaded), and so does each kind of CPU of nodes
    sharing a home directory (-march=native)."""
    # engine.model_store.cache_root's, which kvkernels (below engine) does not import
    root = os.environ.get("SPLITSERVE_CACHE", Path.home() / ".cache" / "splitserve")
    inputs = (str(_SOURCE), _SOURCE.read_text(), *_CFLAGS, *_LDFLAGS, torch.__file__)
    inputs += (sys.version, _cpu_flags())
    key = hashlib.sha256("\n".join(inputs).encode()).hexdigest()[:16]
    path = Path(root) / "torch_extensions" / f"torch{torch.__version__}" / key
    path.mkdir(parents=True, exist_ok=True)
    return path


def _cpu_flags() -> str:
    """The instruction sets -march=native compiles for (Linux's list: x86's flags, Arm's
    features; elsewhere the machine)."""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as info:
        return next((line for line in info if line.startswith(("flags", "Features"))), "")
    return platform.machine()


@functools.cache
def load():
    """-> the extension module, or None when it cannot be built (then the torch path runs)."""
    if os.environ.get("SPLITSERVE_DISABLE_CPU_KERNEL") == "1":
        return None
    try:
        path = build_dir()
        if (path / _DONE).exists():
            try:
                return _import(path)
            except (ImportError, OSError) as e:  # damaged, or deleted, since it was built
                logger.warning("CPU decode kernel: %s did not load (%s); rebuilding", path, e)
                (path / _DONE).unlink(missing_ok=True)
                (path / _LIBRARY).unlink(missing_ok=True)  # else ninja finds it current
        return _build(path)
    except Exception as e:  # no compiler, no ninja, ...: fall back, never fail serving
        logger.warning("CPU decode kernel unavailable (%s); using the torch reference path", e)
        return None


def _import(path: Path):
    """The built module, imported without torch's build step: that step holds a lock file
    while it runs ninja, which a process killed meanwhile leaves behind, and every later
    process waits on for good."""
    spec = importlib.util.spec_from_file_location(_NAME, path / _LIBRARY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(path: Path):
    """torch's build into `path` (one process at a time, by its lock), then marked built."""
    from torch.utils.cpp_extension import load as load_extension

    lock = path / "lock"
    with contextlib.suppress(FileNotFoundError):
        if time.time() - lock.stat().st_mtime > STALE_LOCK_S:
            logger.warning("CPU decode kernel: removing %s, left by a build that was killed", lock)
            lock.unlink()
    module = load_extension(
        name=_NAME,
        sources=[str(_SOURCE)],
        build_directory=str(path),
        extra_cflags=list(_CFLAGS),
        extra_ldflags=list(_LDFLAGS),
        verbose=False,
    )
    (path / _DONE).touch()
    return module


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
