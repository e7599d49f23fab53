"""The host's condition while a benchmark runs, so a report can tell a slow machine from a slow
configuration.

On a shared virtual machine the pace of the same work moves by 2x over hours (batch-1 decode
steps of 42 to 120 ms on this project's 2-core machines). Decode is memory-bound, and what moves
is mostly the memory bandwidth that other guests on the host leave us, which the guest cannot
see in its own CPU accounting; the hypervisor's steal time (other guests running on our
vCPUs) moves with it but far less. So a probe measures both: a large tensor copy (streaming
bandwidth, what a decode step needs), a matrix multiply (compute, what a prefill needs), and
the steal share of CPU time over an interval from /proc/stat.

    python -m bench.host [--minutes 8] [--window-s 15]

prints the probe and, with --minutes, runs a lone batch-1 decode loop of the default model on one
thread (512-token prompts, 200 tokens each) and prints, per window, the median step beside the
steal share, so one can see whether the machine's pace follows what the hypervisor reports.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

PROC_STAT = Path("/proc/stat")


@dataclass(frozen=True)
class CpuTimes:
    """The aggregate `cpu` line of /proc/stat, in clock ticks."""

    busy: int  # user + nice + system + irq + softirq
    idle: int  # idle + iowait
    steal: int  # time other guests ran on this guest's vCPUs

    @property
    def total(self) -> int:
        return self.busy + self.idle + self.steal

    @classmethod
    def parse(cls, line: str) -> CpuTimes:
        fields = line.split()
        if not fields or fields[0] != "cpu":
            raise ValueError(f"not the aggregate cpu line of /proc/stat: {line!r}")
        # user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
        # already counted in user, and kernels before 2.6.11 have no steal column
        user, nice, system, idle, iowait, irq, softirq, *rest = (int(v) for v in fields[1:])
        return cls(user + nice + system + irq + softirq, idle + iowait, rest[0] if rest else 0)


def read_cpu_times(path: Path = PROC_STAT) -> CpuTimes | None:
    """Now; None where the system has no /proc/stat (macOS)."""
    try:
        return CpuTimes.parse(path.read_text().splitlines()[0])
    except OSError:
        return None


def steal_share(before: CpuTimes | None, after: CpuTimes | None) -> float | None:
    """Share of the interval's CPU time the hypervisor gave to other guests (0..1)."""
    if before is None or after is None or after.total <= before.total:
        return None
    return (after.steal - before.steal) / (after.total - before.total)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth_gbs(mb: int = 512, repeats: int = 5) -> float:
    """(read + write bytes) / time of a large tensor copy: the machine's streaming bandwidth."""
    src = torch.ones(mb * 2**20 // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    return 2 * src.numel() * 4 / median_time(lambda: dst.copy_(src), repeats) / 1e9


def matmul_gflops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    return 2 * n**3 / median_time(lambda: a @ b, repeats) / 1e9


def probe(threads: int = 1, mb: int = 256) -> dict[str, float]:
    """Copy bandwidth and matrix speed on `threads` torch threads (an engine's share), about a
    second in all; run it while the system under test is idle."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {"copy_gbs": copy_bandwidth_gbs(mb), "matmul_gflops": matmul_gflops()}
    finally:
        torch.set_num_threads(saved)


def pace_windows(minutes: float, window_s: int) -> list[tuple[float, float, float | None]]:
    """(window start s, median batch-1 decode step ms, steal share) of a lone decode loop."""
    from engine import EngineConfig, LLMEngine, SamplingParams

    torch.set_num_threads(1)
    engine = LLMEngine(EngineConfig(num_threads=1))
    steps: list[tuple[float, float]] = []  # (wall clock, seconds)
    cpu = [(time.time(), read_cpu_times())]
    stop = threading.Event()

    def sample() -> None:  # /proc/stat once a second, beside the loop
        while not stop.wait(1.0):
            cpu.append((time.time(), read_cpu_times()))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    end = time.time() + 60 * minutes
    while time.time() < end:
        engine.add_request(None, list(range(1000, 1512)), params)
        engine.step()  # the prefill, not timed
        while engine.has_unfinished:
            t0 = time.perf_counter()
            engine.step()
            steps.append((time.time(), time.perf_counter() - t0))
    stop.set()
    sampler.join()
    rows = []
    for (t0, before), (t1, after) in itertools.pairwise(cpu[::window_s]):
        inside = [d for t, d in steps if t0 <= t < t1]
        if inside:
            rows.append(
                (t0 - cpu[0][0], 1e3 * statistics.median(inside), steal_share(before, after))
            )
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=0.0, help="decode-pace loop length")
    parser.add_argument("--window-s", type=int, default=15)
    args = parser.parse_args(argv)
    result = probe()
    print(
        f"copy {result['copy_gbs']:.1f} GB/s, matmul {result['matmul_gflops']:.1f} GFLOP/s "
        "(1 thread)"
    )
    if args.minutes <= 0:
        return
    rows = pace_windows(args.minutes, args.window_s)
    for start, step_ms, steal in rows:
        steal_text = "-" if steal is None else f"{100 * steal:.1f}%"
        print(f"{start:6.0f} s  batch-1 decode step {step_ms:6.1f} ms  steal {steal_text}")
    paired = [(ms, st) for _, ms, st in rows if st is not None]
    if len(paired) > 2:
        import numpy as np

        ms, st = np.array(paired).T
        print(
            f"median step {np.median(ms):.1f} ms (p10 {np.percentile(ms, 10):.1f}, p90 "
            f"{np.percentile(ms, 90):.1f}); steal mean {100 * st.mean():.1f}%, max "
            f"{100 * st.max():.1f}%; correlation {np.corrcoef(ms, st)[0, 1]:.2f}"
        )


if __name__ == "__main__":
    main()
