"""deployments/cancel_noise.py with real asyncio loops and asyncio's own handler: a cancelled
Ray call's exception that nobody retrieved (a client that left) is one debug line, on any loop
of the process; any other unretrieved exception is still logged as an error with its
traceback."""

from __future__ import annotations

import asyncio
import gc
import logging

import pytest
from ray.exceptions import TaskCancelledError

from deployments.cancel_noise import CancelledCallFilter, quiet_cancelled_calls

pytestmark = pytest.mark.unit


def _unretrieved(loop: asyncio.AbstractEventLoop, error: BaseException) -> None:
    """A future that ends with `error` and is dropped unread: asyncio reports it as it goes."""
    future = loop.create_future()
    future.set_exception(error)
    del future
    gc.collect()


async def _raises(error: BaseException) -> None:
    raise error


def _unawaited_task(loop: asyncio.AbstractEventLoop, error: BaseException) -> None:
    """A task that raised `error` and that nobody awaits, as Serve's request task on a cancel."""
    task = loop.create_task(_raises(error))
    loop.run_until_complete(asyncio.sleep(0))
    assert task.done()
    del task
    gc.collect()


@pytest.fixture
def quiet():
    """Two loops (a replica's main loop and its request loop) with the filter installed."""
    asyncio_logger = logging.getLogger("asyncio")
    before = list(asyncio_logger.filters)
    loops = [asyncio.new_event_loop() for _ in range(2)]
    quiet_cancelled_calls()
    yield loops
    for loop in loops:
        loop.close()
    asyncio_logger.filters[:] = before


@pytest.mark.parametrize("report", [_unretrieved, _unawaited_task])
def test_a_cancelled_call_is_one_debug_line_and_other_errors_are_still_logged(
    quiet, caplog, report
):
    for loop in quiet:
        with caplog.at_level(logging.DEBUG):
            caplog.clear()
            report(loop, TaskCancelledError())
            cancels = [(r.name, r.levelno) for r in caplog.records]
            caplog.clear()
            report(loop, RuntimeError("a real failure"))
            errors = list(caplog.records)
        assert cancels == [("deployments.cancel_noise", logging.DEBUG)]
        [error] = errors
        assert error.name == "asyncio" and error.levelno == logging.ERROR
        assert "never retrieved" in error.getMessage()
        assert isinstance(error.exc_info[1], RuntimeError)  # its traceback goes with it


def test_installed_once_and_other_asyncio_records_pass(quiet, caplog):
    quiet_cancelled_calls()  # each ingress replica calls it: one filter per process
    filters = logging.getLogger("asyncio").filters
    assert sum(isinstance(f, CancelledCallFilter) for f in filters) == 1
    with caplog.at_level(logging.DEBUG, logger="asyncio"):
        logging.getLogger("asyncio").error("Executing %s took 0.5 seconds", "<Handle>")
        try:
            raise TaskCancelledError()
        except TaskCancelledError:  # a cancel that is not an unretrieved one: reported
            logging.getLogger("asyncio").exception("Exception in callback")
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == [
        "Executing <Handle> took 0.5 seconds",
        "Exception in callback",
    ]
