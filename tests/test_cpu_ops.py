"""The CPU decode kernel's build directory and its loading (kvkernels/cpu_ops.py)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvkernels import cpu_ops

pytestmark = pytest.mark.unit


def test_each_checkout_of_the_source_builds_in_a_directory_of_its_own(tmp_path, monkeypatch):
    """torch's ninja build names the source's path in its commands: two checkouts sharing the
    cache rebuilt the kernel in one directory each time the other ran. A CPU of other
    instruction sets gets its own too."""
    monkeypatch.setenv("SPLITSERVE_CACHE", str(tmp_path))
    here = cpu_ops.build_dir()
    assert here == cpu_ops.build_dir() and here.parents[1] == tmp_path / "torch_extensions"
    copy = tmp_path / "checkout" / cpu_ops._SOURCE.name
    copy.parent.mkdir()
    shutil.copy(cpu_ops._SOURCE, copy)
    monkeypatch.setattr(cpu_ops, "_SOURCE", copy)
    there = cpu_ops.build_dir()
    assert there != here
    copy.write_text(copy.read_text() + "\n// changed\n")
    changed = cpu_ops.build_dir()
    assert changed not in (here, there)
    # nodes of another CPU sharing the home directory: -march=native builds for this one
    monkeypatch.setattr(cpu_ops, "_cpu_flags", lambda: "flags\t\t: fpu")
    assert cpu_ops.build_dir() not in (here, there, changed)


def _built_copy(cache: Path) -> Path:
    """This machine's built kernel, copied to where a process with `cache` looks for it."""
    if cpu_ops.load() is None:
        pytest.skip("no compiler here: the kernel is not built")
    built = cpu_ops.build_dir()
    copy = cache / built.relative_to(built.parents[2])  # torch_extensions/torch<v>/<key>
    shutil.copytree(built, copy)
    return copy


def _load_in_a_new_process(cache: Path) -> subprocess.CompletedProcess:
    code = "from kvkernels import cpu_ops; print(cpu_ops.load() is not None)"
    env = {**os.environ, "SPLITSERVE_CACHE": str(cache)}
    command = [sys.executable, "-c", code]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_a_built_kernel_loads_past_the_lock_of_a_builder_that_was_killed(tmp_path):
    """torch's build step, run by every process that loaded the kernel, waited for good on
    the lock file of a process killed while it held it (a replica stopped as it started)."""
    (_built_copy(tmp_path) / "lock").touch()
    done = _load_in_a_new_process(tmp_path)
    assert done.stdout.strip() == "True", done.stderr


def test_a_build_removes_a_lock_left_long_ago_and_marks_the_directory_built(tmp_path):
    copy = _built_copy(tmp_path)
    (copy / "built").unlink()  # as a build killed before it finished leaves it
    lock, long_ago = copy / "lock", time.time() - 2 * cpu_ops.STALE_LOCK_S
    lock.touch()
    os.utime(lock, (long_ago, long_ago))
    done = _load_in_a_new_process(tmp_path)
    assert done.stdout.strip() == "True", done.stderr
    assert "left by a build that was killed" in done.stderr
    assert (copy / "built").exists() and not lock.exists()


def test_a_built_kernel_that_no_longer_loads_is_built_again(tmp_path):
    """Damaged since it was built: relinked from its object file (ninja would find the library
    itself current), not left to the torch path for good."""
    library = _built_copy(tmp_path) / "splitserve_paged_decode_cpu.so"
    library.write_bytes(b"not a library")
    done = _load_in_a_new_process(tmp_path)
    assert done.stdout.strip() == "True", done.stderr
    assert "did not load" in done.stderr and "rebuilding" in done.stderr
    assert library.read_bytes()[:4] == b"\x7fELF"
