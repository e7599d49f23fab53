"""`make test`'s two parts (tests/split_suite.py, --part in tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import split_suite
from tests.conftest import _foreground, _threads

pytestmark = pytest.mark.unit
ROOT = Path(__file__).parent.parent


class _Item:
    def __init__(self, fixtures: tuple[str, ...] = (), marker: str | None = None) -> None:
        self.fixturenames, self.marker = fixtures, marker

    def get_closest_marker(self, name: str):
        return name if name == self.marker else None


def test_ray_and_wall_clock_tests_are_the_foreground():
    assert _foreground(_Item(("tmp_path", "ray_serve")))
    assert _foreground(_Item(("own_ray_cluster",)))
    assert _foreground(_Item(("make_engine",), marker="wall_clock"))
    assert not _foreground(_Item(("make_engine",), marker="unit"))
    assert not _foreground(_Item())


@pytest.mark.parametrize(
    ("fore", "back", "code"),
    [(0, 0, 0), (1, 0, 1), (0, 1, 1), (2, 0, 2), (5, 0, 0), (0, 5, 0), (5, 1, 1), (5, 5, 5)],
)
def test_one_exit_code_for_both_parts(fore, back, code):
    assert split_suite.exit_code(fore, back) == code


def test_the_background_runs_at_the_lowest_priority_in_a_session_of_its_own():
    probe = "import os; print(os.nice(0), os.getsid(0) == os.getpid())"
    if Path("/proc/self/autogroup").exists():
        probe += "; print(open('/proc/self/autogroup').read().split()[-1])"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        start_new_session=True,
        preexec_fn=split_suite._lowest_priority,
        check=True,
    )
    assert done.stdout.split()[:2] == ["19", "True"]
    assert done.stdout.split()[2:] in ([], ["19"])  # the session's autogroup, niced too


@pytest.mark.wall_clock  # its foreground child would inherit the background's priority
def test_each_part_runs_its_own_tests_and_both_are_reported():
    selected = [
        "tests/test_loop_lag.py",  # wall_clock: the foreground
        "tests/test_host.py::test_steal_share_is_stolen_ticks_over_all_ticks_of_the_interval",
    ]
    command = [sys.executable, "-m", "tests.split_suite", "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(
        [*command, *selected], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    fore, back = done.stdout.split("===== the background part")
    assert "3 passed, 1 deselected" in fore
    assert "1 passed, 3 deselected" in back


def test_the_background_runs_on_one_thread_while_the_foreground_lives(monkeypatch):
    monkeypatch.delenv(split_suite.FOREGROUND_PID, raising=False)
    assert _threads() == 2  # pytest alone, or the foreground part
    monkeypatch.setenv(split_suite.FOREGROUND_PID, str(os.getpid()))
    assert _threads() == 1
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    ended.wait()  # reaped, as the runner reaps its foreground
    monkeypatch.setenv(split_suite.FOREGROUND_PID, str(ended.pid))
    assert _threads() == 2
