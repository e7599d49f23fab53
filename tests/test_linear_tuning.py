"""engine/linear_tuning.py: the few-rows forward where this host measured it faster, the answer
kept per boot, torch, thread count and shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

from engine import linear_tuning
from kvkernels.few_rows import FewRows

pytestmark = pytest.mark.unit


def _model(hidden: int = 32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Module()
    model.lm_head = torch.nn.Linear(hidden, 500, bias=False)
    model.layers = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(3))
    return model


@pytest.fixture(autouse=True)
def _forget():
    linear_tuning._known.clear()
    yield
    linear_tuning._known.clear()


def test_the_few_rows_forward_must_win_by_the_margin():
    timings = {1: (10.0, 5.0), 2: (10.0, 9.6), 3: (10.0, 12.0), 4: (10.0, 9.4)}
    assert linear_tuning.faster_rows(timings) == {1, 4}
    assert linear_tuning.faster_rows(timings, margin=0.0) == {1, 2, 4}
    assert linear_tuning.faster_rows({}) == frozenset()


@pytest.mark.wall_clock  # times two forwards
@pytest.mark.parametrize("slow", ["plain", "few_rows"])
def test_the_measurement_picks_the_faster_forward(monkeypatch, slow):
    """Each forward timed at every row count up to its kind's limit; the one slowed here by a
    few milliseconds a call loses everywhere."""

    def slowed(forward):
        return lambda *a: time.sleep(5e-3) or forward(*a)

    variants = dict(linear_tuning._VARIANTS)
    variants[slow] = slowed(variants[slow])
    monkeypatch.setattr(linear_tuning, "_VARIANTS", variants)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a core another process holds wait for it
    try:
        rows, report = linear_tuning.measure(_model(), rounds=3)
    finally:
        torch.set_num_threads(threads)
    assert set(report["head"]) == set(linear_tuning.HEAD_ROWS)
    assert set(report["layers"]) == set(linear_tuning.LAYER_ROWS)
    assert all(plain > 0 and few > 0 for kind in report.values() for plain, few in kind.values())
    everywhere = FewRows(frozenset(linear_tuning.HEAD_ROWS), frozenset(linear_tuning.LAYER_ROWS))
    expected = everywhere if slow == "plain" else FewRows(frozenset(), frozenset())
    assert rows == expected, report


def test_a_pass_reads_at_most_its_bytes_on_whole_rows(monkeypatch):
    """A large model's matrices are timed on their first rows: the first matrices whole, then
    as many rows of the next as fit."""
    model = _model()  # layers of 32 x 32 floats: 4 KB each, a row 128 bytes
    monkeypatch.setattr(linear_tuning, "MEASURED_BYTES", 4096 + 1000)
    whole, part = linear_tuning._weights(list(model.layers))
    assert whole.data_ptr() == model.layers[0].weight.data_ptr() and whole.shape == (32, 32)
    assert part.shape == (7, 32) and part.data_ptr() == model.layers[1].weight.data_ptr()
    monkeypatch.setattr(linear_tuning, "MEASURED_BYTES", 100)  # not one row
    assert linear_tuning._weights(list(model.layers)) == []


def test_an_answer_is_kept_and_read_back_not_measured_again(monkeypatch, tmp_path):
    cache = tmp_path / "few_rows.json"
    cache.write_text(json.dumps({"another-boot/torch/threads-1/x": {"head": [], "layers": []}}))
    measured = []

    def measure(model, rounds=linear_tuning.ROUNDS):
        measured.append(torch.get_num_threads())
        return FewRows(frozenset({7, 8}), frozenset()), {"head": {}, "layers": {}}

    monkeypatch.setattr(linear_tuning, "measure", measure)
    model = _model()
    assert linear_tuning.tuned(model, cache) == FewRows(frozenset({7, 8}), frozenset())
    [(key, entry)] = json.loads(cache.read_text()).items()  # the other boot's answer dropped
    assert key.startswith(linear_tuning._boot() + "/")
    assert (entry["head"], entry["layers"]) == ([7, 8], [])
    linear_tuning._known.clear()  # another process: it reads the file
    assert linear_tuning.tuned(model, cache) == FewRows(frozenset({7, 8}), frozenset())
    assert len(measured) == 1
    threads = torch.get_num_threads()
    try:  # another thread count, or other shapes, is another question
        torch.set_num_threads(threads + 1)
        linear_tuning.tuned(model, cache)
    finally:
        torch.set_num_threads(threads)
    linear_tuning.tuned(_model(hidden=16), cache)
    assert measured == [threads, threads + 1, threads]
    assert len(json.loads(cache.read_text())) == 3
    monkeypatch.setattr(linear_tuning, "LAYER_ROWS", range(1, 3))  # another method: asked anew
    linear_tuning.tuned(model, cache)
    assert len(measured) == 4


def test_a_cache_that_cannot_be_written_costs_only_a_measurement(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("")
    rows = linear_tuning.tuned(_model(), blocked / "few_rows.json")
    assert rows.head <= set(linear_tuning.HEAD_ROWS)
    assert "could not keep the few-rows choice" in caplog.text


@pytest.mark.model
def test_the_command_prints_what_the_replicas_will_read(tmp_path):
    """`python -m engine.linear_tuning` (make model) reports the answer kept in the cache, the
    one every replica that starts later reads, and does not measure a second time."""
    from transformers import AutoModelForCausalLM

    from engine import EngineConfig
    from engine.model_store import cache_root, default_model_dir
    from kvkernels.few_rows import candidates

    dtype = getattr(torch, EngineConfig().dtype)  # the engine's, not the checkpoint's
    model = AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=dtype)
    heads, layers = candidates(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        key = linear_tuning._key(heads + layers)
    finally:
        torch.set_num_threads(threads)
    for name in ("models", "torch_extensions"):  # the built model and kernel, not rebuilt
        (tmp_path / name).symlink_to(cache_root() / name)
    stored = {key: {"head": [5], "layers": [2], "ms": {}}}  # no host measures this answer
    cache = tmp_path / linear_tuning.CACHE_FILE
    cache.write_text(json.dumps(stored))
    env = {**os.environ, "SPLITSERVE_CACHE": str(tmp_path)}
    command = [sys.executable, "-m", "engine.linear_tuning", "--threads", "1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "LM head at [5] rows, layers at [2]" in done.stdout
    assert json.loads(cache.read_text()) == stored
