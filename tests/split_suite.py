"""`make test`: the suite as two pytest processes side by side on the machine's cores.

The foreground part holds the tests that need the CPU when they ask for it: those on Ray
clusters (replicas starting, health checks, scaling delays, whose timings are tuned for a
machine that runs nothing else) and those marked `wall_clock`. Those leave the cores idle about
a fifth of their time (waits that are what they test). The background part, every other test,
runs beside them at the lowest priority, so it takes only what the foreground leaves, on one
torch thread while the foreground runs (two threads of one op on cores the foreground holds wait
at the op's end for whichever was descheduled) and on two once it has finished.

Usage: python -m tests.split_suite [pytest arguments]  (both parts get the same arguments)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

# pytest's exit codes: stopped by Ctrl-C; a part that selects nothing (`-k` matched the other)
INTERRUPTED, NO_TESTS = 2, 5
# the background part's tests run on one thread while this process lives (tests/conftest.py)
FOREGROUND_PID = "SPLIT_SUITE_FOREGROUND_PID"


def _lowest_priority() -> None:
    """In the background child, after its setsid: its session is an autogroup of its own,
    which Linux (CONFIG_SCHED_AUTOGROUP) weighs against the other sessions as one task; nice
    alone would only rank it inside its own session's group."""
    try:
        with open("/proc/self/autogroup", "w") as group:
            group.write("19")
    except OSError:  # no autogroups here: plain nice is all there is
        pass
    os.nice(19)


def exit_code(fore: int, back: int) -> int:
    """One code for both parts: a failure wins; a part that selected nothing does not count."""
    ran = [code for code in (fore, back) if code != NO_TESTS]
    return next((code for code in ran if code != 0), 0) if ran else NO_TESTS


def _wait(process: subprocess.Popen, on_interrupt=lambda: None) -> int:
    while True:
        try:
            return process.wait()
        except KeyboardInterrupt:  # the foreground child got it too: let it shut Ray down
            on_interrupt()


def _interrupt(process: subprocess.Popen) -> None:
    """Ctrl-C reaches only the terminal's session: pass it on to the background's."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGINT)


def main(args: list[str]) -> int:
    pytest = [sys.executable, "-m", "pytest", *args]
    with tempfile.TemporaryFile("w+") as log:
        foreground = subprocess.Popen([*pytest, "--part=fore"])
        back = subprocess.Popen(
            [*pytest, "--part=back"],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_lowest_priority,
            env={**os.environ, FOREGROUND_PID: str(foreground.pid)},
        )
        fore = INTERRUPTED
        try:
            fore = _wait(foreground)
        finally:
            if fore == INTERRUPTED:
                _interrupt(back)
            back_code = _wait(back, on_interrupt=lambda: _interrupt(back))
        log.seek(0)
        print("\n===== the background part (tests/split_suite.py) =====", flush=True)
        sys.stdout.write(log.read())
    return exit_code(fore, back_code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
