"""The experiment runner end to end: its own private Ray cluster, two configurations deployed
in turn from serve_config.yaml, a short sweep each, the report with the simulator's view."""

from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.serve, pytest.mark.model]

PROFILE = """\
model: smollm2-135m
device: test
entries:
  - tp: 1
    pp: 1
    prefill: {a: 2000.0, b: 1.0, c: 0.0}
    decode: {a: 500.0, b: 0.0, c: 1.0}
    kv_capacity_tokens: 20000
"""


def test_experiment_runs_each_configuration_and_writes_the_report(tmp_path, own_ray_cluster):
    from bench.experiment import main

    profile = tmp_path / "profile.yaml"
    profile.write_text(PROFILE)
    out = tmp_path / "out"
    main(
        [
            "--out", str(out), "--configs", "disagg-1p1d", "coloc-1x2",
            "--rates", "2", "--num-requests", "3", "--bisect", "0",
            "--input-len", "16", "--output-len", "4", "--profile", str(profile),
        ]
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    # SLO unit from the profile: prefill of one 16-token prompt, decode step at context 18
    assert report["meta"]["slo_unit"]["ttft_s"] == pytest.approx(2.016)
    assert report["meta"]["slo_unit"]["tpot_s"] == pytest.approx(0.501)
    for name in ("disagg-1p1d", "coloc-1x2"):
        [point] = report["configs"][name]["points"]
        assert point["rate"] == 2.0 and len(point["records"]) == 3
        assert point["host"]["copy_gbs"] > 0 and point["host"]["matmul_gflops"] > 0
        for _, first, last, n_out, n_prompt, error in point["records"]:
            assert error is None and n_out == 4 and n_prompt == 16 and 0 < first <= last
    analysis = json.loads((out / "analysis.json").read_text())
    for row in analysis["configs"].values():
        assert row["simulated_goodput_rps"] > 0 and row["simulated_curve"]
    grid = report["meta"]["grid"]
    fid = analysis["fidelity_simulated"]  # every configuration at every cell of the map
    assert sum(fid["counts"].values()) == 2 * len(grid["ttft"]) * len(grid["tpot"])
    summary = (out / "summary.md").read_text()
    assert "| disagg-1p1d | 2 |" in summary and "| coloc-1x2 | 2 |" in summary
    assert "against the measurement over the SLO map" in summary
    assert "configurations interleaved rate by rate" in summary
    assert "The host at each measured rate" in summary
    assert (out / "attainment.png").stat().st_size > 0 and (out / "latency.png").exists()
    # every replica traced its steps, filed under its configuration
    for name in ("disagg-1p1d", "coloc-1x2"):
        steps = [
            json.loads(line)
            for path in (out / "steps" / name).rglob("*.jsonl")
            for line in path.read_text().splitlines()
        ]
        assert all(s["duration_ms"] > 0 for s in steps)
        # whole prompts (no chunking here) start at offset 0
        assert all(s["prefill_offsets"] == [0] * len(s["prefill_lens"]) for s in steps)
        assert sum(lens.count(16) for lens in (s["prefill_lens"] for s in steps)) == 3
        # the point's wall-clock window holds its requests' steps (the warm-up's lie before)
        [point] = report["configs"][name]["points"]
        start, end = point["started_s"], point["started_s"] + point["duration_s"]
        assert all(start <= s["start_s"] <= end for s in steps if 16 in s["prefill_lens"])
    assert not (out / "steps" / "current").exists()
    # one rate each, interleaved: one deployment (turn) per configuration, in the given order
    assert [d.name for d in (out / "steps" / "disagg-1p1d").iterdir()] == ["000"]
    assert [d.name for d in (out / "steps" / "coloc-1x2").iterdir()] == ["001"]
