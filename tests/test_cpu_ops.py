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


@pytest.fixture(scope="module")
def current_build(tmp_path_factory) -> Path:
    """This machine's built kernel, copied and made current for ninja. In a clone at an earlier
    clone's path (CI's) the source is newer than the cache's object file, of the same content
    and so in the same build directory: each test's ninja run would compile it again (~30 s)
    where it means to relink."""
    if cpu_ops.load() is None:
        pytest.skip("no compiler here: the kernel is not built")
    copy = tmp_path_factory.mktemp("kernel") / "build"
    shutil.copytree(cpu_ops.build_dir(), copy)
    # the ninja torch's build runs (found on PATH, as torch looks for it)
    subprocess.run(["ninja", "-C", str(copy)], check=True, capture_output=True, timeout=600)
    return copy


def _built_copy(current_build: Path, cache: Path) -> Path:
    """The built kernel, copied to where a process with `cache` looks for it."""
    built = cpu_ops.build_dir()
    copy = cache / built.relative_to(built.parents[2])  # torch_extensions/torch<v>/<key>
    shutil.copytree(current_build, copy)
    return copy


def _load_in_a_new_process(cache: Path) -> subprocess.CompletedProcess:
    code = "from kvkernels import cpu_ops; print(cpu_ops.load() is not None)"
    env = {**os.environ, "SPLITSERVE_CACHE": str(cache)}
    command = [sys.executable, "-c", code]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)


def test_a_built_kernel_loads_past_the_lock_of_a_builder_that_was_killed(current_build, tmp_path):
    """torch's build step, run by every process that loaded the kernel, waited for good on
    the lock file of a process killed while it held it (a replica stopped as it started)."""
    (_built_copy(current_build, tmp_path) / "lock").touch()
    done = _load_in_a_new_process(tmp_path)
    assert done.stdout.strip() == "True", done.stderr


def test_a_build_removes_a_lock_left_long_ago_and_marks_the_directory_built(
    current_build, tmp_path
):
    copy = _built_copy(current_build, tmp_path)
    (copy / "built").unlink()  # as a build killed before it finished leaves it
    lock, long_ago = copy / "lock", time.time() - 2 * cpu_ops.STALE_LOCK_S
    lock.touch()
    os.utime(lock, (long_ago, long_ago))
    done = _load_in_a_new_process(tmp_path)
    assert done.stdout.strip() == "True", done.stderr
    assert "left by a build that was killed" in done.stderr
    assert (copy / "built").exists() and not lock.exists()


def test_a_built_kernel_that_no_longer_loads_is_built_again(current_build, tmp_path):
    """Damaged since it was built: relinked from its object file (ninja would find the library
    itself current), not left to the torch path for good."""
    library = _built_copy(current_build, tmp_path) / "splitserve_paged_decode_cpu.so"
    library.write_bytes(b"not a library")
    done = _load_in_a_new_process(tmp_path)
    assert done.stdout.strip() == "True", done.stderr
    assert "did not load" in done.stderr and "rebuilding" in done.stderr
    assert library.read_bytes()[:4] == b"\x7fELF"
