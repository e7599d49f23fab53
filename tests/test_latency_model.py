"""Latency model: closed-form fits, the YAML contract, and a profile of the real engine."""

from __future__ import annotations

import numpy as np
import pytest

from placement.latency_model import (
    Coefficients,
    Entry,
    Profile,
    decode_features,
    fit_relative,
    prefill_features,
)

CONTRACT = """
model: smollm2-135m            # free text
device: cpu-1thread            # free text
entries:
  - tp: 1
    pp: 1
    prefill: {a: 12.0, b: 0.08, c: 5.0e-6}      # ms, ms/token, ms/token^2
    decode: {a: 15.0, b: 0.0005, c: 0.03}        # ms, ms/context-token, ms/request
    kv_capacity_tokens: 50000
"""


@pytest.mark.unit
def test_the_issue_yaml_loads_and_round_trips(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(CONTRACT)
    profile = Profile.load(path)
    entry = profile.entry(1, 1)
    assert entry.prefill == Coefficients(12.0, 0.08, 5.0e-6)
    assert entry.kv_capacity_tokens == 50000
    # closed form: 12 + 0.08 * 612 + 5e-6 * (512^2 + 100^2)
    assert entry.prefill_ms([512, 100]) == pytest.approx(12 + 0.08 * 612 + 5e-6 * (512**2 + 100**2))
    assert entry.decode_ms([300, 700]) == pytest.approx(15 + 0.0005 * 1000 + 0.03 * 2)
    profile.save(tmp_path / "again.yaml")
    assert Profile.load(tmp_path / "again.yaml") == profile
    with pytest.raises(KeyError, match="tp=2"):
        profile.entry(2, 1)
    assert profile.node_contention == 0.0  # optional: absent means instances do not interfere
    path.write_text(CONTRACT + "node_contention: 0.18\n")
    assert Profile.load(path).node_contention == 0.18


@pytest.mark.unit
def test_malformed_profiles_are_refused(tmp_path):
    with pytest.raises(ValueError, match="malformed"):
        Profile.from_dict({"model": "m", "device": "d", "entries": [{"tp": 1}]})
    with pytest.raises(ValueError, match=">= 0"):
        Coefficients(1.0, -0.1, 0.0)
    with pytest.raises(ValueError, match="node_contention"):
        Profile("m", "d", [], node_contention=-0.5)


@pytest.mark.unit
def test_relative_fit_recovers_exact_coefficients():
    batches = [[32], [128], [512], [1024], [256, 256], [128] * 4, [64] * 8]
    truth = Entry(1, 1, Coefficients(12.0, 0.08, 5e-6), Coefficients(15.0, 5e-4, 0.03), 1)
    times = np.array([truth.prefill_ms(b) for b in batches])
    coef, err = fit_relative(prefill_features(batches), times)
    assert err < 1e-9
    np.testing.assert_allclose([coef.a, coef.b, coef.c], [12.0, 0.08, 5e-6], rtol=1e-6)
    dec = [[64], [512, 512], [100] * 8, [300] * 16, [50] * 32]
    coef, err = fit_relative(decode_features(dec), np.array([truth.decode_ms(b) for b in dec]))
    np.testing.assert_allclose([coef.a, coef.b, coef.c], [15.0, 5e-4, 0.03], rtol=1e-6)


@pytest.mark.unit
def test_fit_never_returns_negative_coefficients():
    batches = [[10], [20], [40], [80]]
    times = np.array([5.0, 5.2, 4.9, 5.1])  # flat: only the constant matters, plus noise
    coef, err = fit_relative(prefill_features(batches), times)
    assert min(coef.a, coef.b, coef.c) >= 0 and coef.a == pytest.approx(5.05, rel=0.05)
    assert err < 0.05


@pytest.mark.model
def test_profiler_fits_the_real_engine(make_engine):
    from placement.profiler import profile

    engine = make_engine(num_kv_blocks=200, max_num_batched_tokens=1024)
    grid = {
        "prefill": [(1, 16), (1, 128), (2, 64), (4, 32)],
        "decode": [(1, 32), (2, 64), (4, 32), (4, 96)],
    }
    entry, report = profile(engine, grid, steps=3)
    assert entry.kv_capacity_tokens == 200 * 16
    # prompt tokens cost time (whether the fit puts it in b or c depends on noise)
    assert entry.prefill_ms([128]) > 1.5 * entry.prefill_ms([16])
    # a shared CI machine is noisy; a wrong model form would be off by far more than this
    assert report.prefill_rms_rel_error < 0.5 and report.decode_rms_rel_error < 0.5
    assert engine.blocks.num_free_blocks == 200 and not engine.has_unfinished


@pytest.mark.unit
def test_contention_measurement_compares_busy_and_paused_steps(monkeypatch):
    """Steps 1.4x slower while 2 neighbours run -> 0.2 per neighbour; the neighbours are
    paused again afterwards."""
    import placement.profiler as prof

    class Run:
        busy = False

        def set(self):
            self.busy = True

        def clear(self):
            self.busy = False

    run = Run()
    monkeypatch.setattr(prof, "_SETTLE_S", 0.0)
    monkeypatch.setattr(prof.time, "sleep", lambda s: None)
    monkeypatch.setattr(prof, "measure_prefill", lambda *a: 1400.0 if run.busy else 1000.0)
    monkeypatch.setattr(prof, "measure_decode", lambda *a: (70.0 if run.busy else 50.0, [1]))
    assert prof.measure_contention(None, run, 2, None) == pytest.approx(0.2)
    assert not run.busy
