"""The host probe (bench.host): /proc/stat arithmetic on hand-made lines, the probe's figures
against a second measurement, and its place in the sweep and the report."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from bench import host
from bench.experiment import RatePoint, Sweep, measure
from bench.metrics import SLO, RequestRecord
from bench.report import analyze, host_section

pytestmark = pytest.mark.unit

# user nice system idle iowait irq softirq steal guest guest_nice
BEFORE = "cpu  1000 10 200 5000 50 5 5 30 400 0"
AFTER = "cpu  1600 10 300 5300 50 5 5 130 700 0"


def test_cpu_times_count_guest_time_once_and_steal_apart():
    t = host.CpuTimes.parse(BEFORE)
    assert (t.busy, t.idle, t.steal) == (1220, 5050, 30)  # guest is inside user already
    assert t.total == 6300
    # an old kernel without the steal column
    assert host.CpuTimes.parse("cpu 1 2 3 4 5 6 7").steal == 0
    with pytest.raises(ValueError, match="aggregate cpu line"):
        host.CpuTimes.parse("cpu0 1 2 3 4 5 6 7 8")


def test_steal_share_is_stolen_ticks_over_all_ticks_of_the_interval():
    before, after = host.CpuTimes.parse(BEFORE), host.CpuTimes.parse(AFTER)
    # +700 busy, +300 idle, +100 steal
    assert host.steal_share(before, after) == pytest.approx(100 / 1100)
    assert host.steal_share(after, before) is None  # no time passed (or a reset counter)
    assert host.steal_share(None, after) is None


def test_read_cpu_times_reads_the_first_line_or_none(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(BEFORE + "\ncpu0 1 2 3 4 5 6 7 8\nintr 1\n")
    assert host.read_cpu_times(stat) == host.CpuTimes.parse(BEFORE)
    assert host.read_cpu_times(tmp_path / "missing") is None
    if Path("/proc/stat").exists():  # Linux: the counters only grow
        first = host.read_cpu_times()
        time.sleep(0.05)
        assert host.steal_share(first, host.read_cpu_times()) is not None


def test_probe_divides_the_bytes_and_flops_by_the_median_time_on_its_threads(monkeypatch):
    threads = torch.get_num_threads()
    seen = []

    def timed(fn, repeats):  # a fixed time, and the threads the probe runs on
        seen.append((torch.get_num_threads(), repeats))
        return 0.004

    monkeypatch.setattr(host, "median_time", timed)
    result = host.probe(threads=1, mb=8)
    assert torch.get_num_threads() == threads
    assert seen == [(1, 5), (1, 5)]
    assert result["copy_gbs"] == pytest.approx(2 * 8 * 2**20 / 0.004 / 1e9)  # read + write
    assert result["matmul_gflops"] == pytest.approx(2 * 1024**3 / 0.004 / 1e9)
    assert host.median_time(lambda: None, 3) < 0.01


def _direct_copy_gbs(src: torch.Tensor, dst: torch.Tensor, repeats: int) -> float:
    """Best of `repeats` single timed copies on one thread, as the probe runs."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best = min(host.median_time(lambda: dst.copy_(src), 1) for _ in range(repeats))
    finally:
        torch.set_num_threads(saved)
    return 2 * src.numel() * 4 / best / 1e9


@pytest.mark.wall_clock  # compares timed copies: niced in the background, starved unevenly
def test_probe_figures_agree_with_a_direct_measurement_and_restore_threads():
    threads = torch.get_num_threads()
    # second path: time one copy of the same size directly on the probe's one thread, before and
    # after it. A shared host's bandwidth changes from second to second (CI saw the probe at 2.2x
    # a direct figure timed only after it, and at 2.6x the best of ten around it while the
    # foreground half of the suite ran beside), so up to three rounds, each judged on its own
    src = torch.ones(64 * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    rounds = []
    for _ in range(3):
        before = _direct_copy_gbs(src, dst, 5)
        result = host.probe(threads=1, mb=64)
        assert torch.get_num_threads() == threads
        direct = max(before, _direct_copy_gbs(src, dst, 5))
        rounds.append((result["copy_gbs"], direct))
        # the probe reports a median, the direct figure the best of ten: same order of magnitude
        if 0.2 * direct < result["copy_gbs"] <= 1.5 * direct:
            break
    else:
        pytest.fail(f"probe vs direct copy GB/s, three rounds: {rounds}")
    assert result["matmul_gflops"] > 0.5  # any CPU of this century: a sanity floor


def test_measure_records_the_probe_and_the_steal_during_the_point():
    slo = SLO(1.0, 0.2)
    state = Sweep([0.5], slo, slo)
    send = lambda rate: ([RequestRecord(0.0, 0.5, 1.4, 10)] * 4, 2.0)  # noqa: E731
    lines = []
    probe = lambda: {"copy_gbs": 12.5, "matmul_gflops": 70.0}  # noqa: E731
    point = measure(send, state, 0.5, lines.append, probe=probe)
    assert point.host["copy_gbs"] == 12.5
    assert "steal_share" in point.host
    assert "host copy 12.5 GB/s" in lines[0]
    assert point.to_json()["host"] == point.host
    # without a probe nothing is measured or written
    plain = measure(send, Sweep([0.5], slo, slo), 0.5, lines.append)
    assert plain.host is None and "host" not in plain.to_json()


def test_report_shows_each_points_bandwidth_and_steal():
    records = [RequestRecord(0.0, 0.5, 1.4, 10)] * 10
    fast = {"copy_gbs": 31.0, "matmul_gflops": 80.0, "steal_share": 0.004}
    slow = {"copy_gbs": 16.2, "matmul_gflops": 72.0, "steal_share": None}
    points = [
        RatePoint(0.1, 10.0, records, 100.0, fast).to_json(),
        RatePoint(0.2, 10.0, records, 200.0, slow).to_json(),
    ]
    meta = {
        "slo_unit": {"ttft_s": 1.0, "tpot_s": 0.2, "source": "given"},
        "grid": {"headline": [1.0, 1.0], "ttft": [1.0], "tpot": [1.0]},
        "target": 0.9,
    }
    configs = {"a": {"description": "a", "colocated": False, "cores": 2, "points": points}}
    analysis = analyze({"meta": meta, "configs": configs})
    curve = analysis["configs"]["a"]["curve"]
    assert [p["host_copy_gbs"] for p in curve] == [31.0, 16.2]
    assert curve[0]["host_steal_pct"] == pytest.approx(0.4)
    section = host_section(analysis)
    assert "| a | 31.0 (0.4) | 16.2 (-) |" in section
    # older reports have no probe: no section
    for p in points:
        del p["host"]
    assert host_section(analyze({"meta": meta, "configs": configs})) == ""
