"""Latency model: closed-form fits, the YAML contract, and a profile of the real engine."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

from placement.latency_model import (
    Coefficients,
    Entry,
    ExpertRead,
    Profile,
    decode_curve_sizes,
    decode_features,
    fit_decode_curve,
    fit_relative,
    fit_shaped,
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
def test_chunks_are_fitted_with_their_prefix_and_one_length_keeps_the_profiles_shape():
    """Chunks of 256 tokens at offsets 0 and 256 (and a 32-token warm-up) determine all three
    coefficients once each chunk's attention over its prefix is a feature; prompts of one
    length do not, and the fit keeps the solo profile's shape, scaled to the times."""
    truth = Coefficients(100.0, 3.0, 0.002)
    batches, offsets = [[256], [256], [32], [256, 32]], [[0], [256], [0], [256, 0]]
    features = prefill_features(batches, offsets)
    times = features @ np.array([truth.a, truth.b, truth.c])
    assert times[1] - times[0] == pytest.approx(truth.c * (512**2 - 2 * 256**2))
    coef, err = fit_shaped(features, times, Coefficients(1.0, 1.0, 1.0))
    np.testing.assert_allclose([coef.a, coef.b, coef.c], [100.0, 3.0, 0.002], rtol=1e-6)
    assert err < 1e-9
    shape = Coefficients(50.0, 2.0, 0.001)
    one_length = prefill_features([[512]] * 3)
    times = np.array([1900.0, 2000.0, 2100.0])
    coef, err = fit_shaped(one_length, times, shape)
    k = coef.a / shape.a  # one factor on every term, the relative least-squares one
    np.testing.assert_allclose([coef.b, coef.c], [2.0 * k, 0.001 * k], rtol=1e-9)
    model = 50.0 + 2.0 * 512 + 0.001 * 512**2
    ratio = model / times
    assert k == pytest.approx(ratio.sum() / (ratio**2).sum())
    assert err == pytest.approx(np.sqrt(np.mean((k * ratio - 1) ** 2)))


CURVE = ((1, 50.0), (2, 55.0), (3, 80.0), (4, 100.0), (8, 135.0))  # a CPU's kernel paths


@pytest.mark.unit
def test_a_measured_decode_curve_replaces_the_line_and_round_trips(tmp_path):
    path = tmp_path / "p.yaml"
    curve = "{1: 50.0, 2: 55.0, 3: 80.0, 4: 100.0, 8: 135.0}"
    path.write_text(CONTRACT + f"    decode_batch_ms: {curve}\n")
    profile = Profile.load(path)
    entry = profile.entry(1, 1)
    assert entry.decode_batch_ms == CURVE
    # b * contexts on top of the curve: at a listed size, between two, beyond the last (+ c each)
    assert entry.decode_ms([300, 700, 0]) == pytest.approx(80.0 + 0.0005 * 1000)
    assert entry.decode_ms([100] * 6) == pytest.approx(117.5 + 0.0005 * 600)
    assert entry.decode_ms([100] * 10) == pytest.approx(135.0 + 2 * 0.03 + 0.0005 * 1000)
    # the batch term over a, for the simulator's steps that also prefill
    assert entry.decode_batch_extra_ms(2) == pytest.approx(55.0 - 15.0)
    assert "decode_batch_ms:\n    1: 50.0" in _round_trip(profile, tmp_path)
    # without one, the file is the issue's contract exactly (no empty key written)
    assert "decode_batch_ms" not in _round_trip(
        Profile.from_dict(yaml.safe_load(CONTRACT)), tmp_path
    )


def _round_trip(profile: Profile, tmp_path) -> str:
    """The profile's YAML, after checking that it loads back equal."""
    profile.save(tmp_path / "again.yaml")
    assert Profile.load(tmp_path / "again.yaml") == profile
    return (tmp_path / "again.yaml").read_text()


@pytest.mark.unit
def test_a_decode_curve_needs_increasing_sizes_and_times_that_are_not_negative():
    line = Coefficients(15.0, 0.0005, 0.03)
    with pytest.raises(ValueError, match="increasing batch sizes"):
        Entry(1, 1, line, line, 1, decode_batch_ms=((2, 50.0), (1, 40.0)))
    with pytest.raises(ValueError, match="increasing batch sizes"):
        Entry(1, 1, line, line, 1, decode_batch_ms=((0, 50.0),))
    with pytest.raises(ValueError, match=">= 0 ms"):
        Entry(1, 1, line, line, 1, decode_batch_ms=((1, -5.0),))
    with pytest.raises(ValueError, match="malformed"):
        Profile.from_dict({"model": "m", "device": "d", "entries": [{
            "tp": 1, "pp": 1, "prefill": vars(line), "decode": vars(line),
            "kv_capacity_tokens": 1, "decode_batch_ms": [50.0, 55.0]}]})  # fmt: skip


@pytest.mark.unit
def test_a_mixtures_decode_step_reads_the_experts_its_batch_is_routed_to(tmp_path):
    """8 experts, top 2, 10 of decode's 15 ms reading them: a step of B requests skips the
    (3/4)^B of them no token is routed to; a long batch reads them all. Round-trips."""
    path = tmp_path / "p.yaml"
    path.write_text(CONTRACT + "    experts: {count: 8, per_token: 2, read_ms: 10.0}\n")
    profile = Profile.load(path)
    entry = profile.entry(1, 1)
    assert entry.experts == ExpertRead(8, 2, 10.0)
    assert entry.decode_ms([100]) == pytest.approx(15.0 - 10.0 * 0.75 + 0.0005 * 100 + 0.03)
    four = 15.0 - 10.0 * 0.75**4 + 0.0005 * 400 + 4 * 0.03
    assert entry.decode_ms([100] * 4) == pytest.approx(four)
    assert entry.decode_fixed_ms(200) == pytest.approx(15.0)
    assert "experts:\n    count: 8\n    per_token: 2\n" in _round_trip(profile, tmp_path)
    assert "experts" not in _round_trip(Profile.from_dict(yaml.safe_load(CONTRACT)), tmp_path)


@pytest.mark.unit
def test_the_experts_read_is_a_part_of_decodes_fixed_time_and_no_measured_curves():
    line = Coefficients(15.0, 0.0005, 0.03)
    with pytest.raises(ValueError, match="part of decode.a"):
        Entry(1, 1, line, line, 1, experts=ExpertRead(8, 2, 20.0))
    with pytest.raises(ValueError, match="holds the experts' reads"):
        Entry(1, 1, line, line, 1, decode_batch_ms=((1, 40.0),), experts=ExpertRead(8, 2, 1.0))
    with pytest.raises(ValueError, match="per_token <= count"):
        ExpertRead(2, 3, 1.0)


@pytest.mark.unit
def test_curve_fit_recovers_a_convex_batch_curve_that_a_line_misses():
    truth = Entry(1, 1, Coefficients(1, 0, 0), Coefficients(15.0, 0.002, 0.0), 1, CURVE)
    rng = np.random.default_rng(0)
    sizes = (1, 2, 3, 4, 5, 6, 8)
    batches = [list(rng.integers(100, 900, size=n)) for n in sizes for _ in range(4)]
    times = np.array([truth.decode_ms(b) for b in batches])
    assert decode_curve_sizes(batches) == sizes
    line, curve, err = fit_decode_curve(batches, times, sizes)
    assert err < 1e-9 and line.b == pytest.approx(0.002, rel=1e-6)
    assert dict(curve)[3] == pytest.approx(80.0) and dict(curve)[6] == pytest.approx(117.5)
    # the straight line through the same steps is what a linear profile would say: far off
    _, line_err = fit_relative(decode_features(batches), times)
    assert line_err > 0.05 and line.a > 0 and line.c > 0
    # sizes no step is near are dropped; under three distinct sizes a line is all there is
    assert decode_curve_sizes([[5]] * 4 + [[5] * 3] * 4 + [[5] * 40] * 4) == (1, 3, 40)
    assert decode_curve_sizes([[5]] * 4 + [[5] * 3] * 4) == ()
    few = [[500], [100, 900], [40], [300, 200]]
    times = np.array([8.0 + 0.01 * sum(b) + 2.0 * len(b) for b in few])
    plain, none, _ = fit_decode_curve(few, times, decode_curve_sizes(few))
    assert none == () and [plain.a, plain.b, plain.c] == pytest.approx([8.0, 0.01, 2.0])


@pytest.mark.unit
def test_fit_never_returns_negative_coefficients():
    batches = [[10], [20], [40], [80]]
    times = np.array([5.0, 5.2, 4.9, 5.1])  # flat: only the constant matters, plus noise
    coef, err = fit_relative(prefill_features(batches), times)
    assert min(coef.a, coef.b, coef.c) >= 0 and coef.a == pytest.approx(5.05, rel=0.05)
    assert err < 0.05


@pytest.mark.wall_clock  # fits timed steps
@pytest.mark.model
def test_profiler_fits_the_real_engine(make_engine):
    from placement.profiler import profile

    engine = make_engine(num_kv_blocks=200, max_num_batched_tokens=1024)
    grid = {
        "prefill": [(1, 16), (1, 128), (2, 64), (4, 32)],
        "decode": [(1, 32), (2, 64), (4, 32), (4, 96)],
    }
    # a second profile where the first was measured while the host was busy for seconds (a
    # fresh clone's run once measured its first points so: every prefill ~190 ms, the fit's
    # intercept 186 ms); a wrong model form fails both
    for _ in range(2):
        entry, report = profile(engine, grid, steps=3)
        # prompt tokens cost time (whether the fit puts it in b or c depends on noise)
        grows = entry.prefill_ms([128]) > 1.5 * entry.prefill_ms([16])
        # a shared CI machine is noisy; a wrong model form would be off by far more than this
        fits = report.prefill_rms_rel_error < 0.5 and report.decode_rms_rel_error < 0.5
        if grows and fits:
            break
    assert grows, entry
    assert fits, report
    assert entry.kv_capacity_tokens == 200 * 16
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


@pytest.mark.unit
def test_a_prefill_point_is_the_median_of_its_repeats(monkeypatch):
    """One stalled step (500 ms among 10-12) does not become the point's time."""
    import placement.profiler as prof

    class Clock:
        now = 0.0

    class Engine:
        class runner:  # the engine's attribute, lower-case
            class shape:
                vocab_size = 100

        has_unfinished = False
        steps = iter([0.010, 0.500, 0.012])

        def add_request(self, *args):
            pass

        def step(self):
            Clock.now += next(self.steps)

    monkeypatch.setattr(prof.time, "perf_counter", lambda: Clock.now)
    rng = np.random.default_rng(0)
    assert prof.measure_prefill(Engine(), 2, 8, rng, repeats=3) == pytest.approx(12.0)
