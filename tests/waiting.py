"""Waiting in tests without sleeping for a fixed time: a condition is looked at again until it
holds or a generous failure deadline passes. Simulator state changes in the simulator's own
thread, so there is no asyncio.Event to wait on."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

#: Failure deadline for anything a test waits for over a pty: generous for a loaded CI
#: machine; a passing test waits only as long as the exchange takes.
WAIT_S = 10.0
#: How often the condition is looked at again.
STEP_S = 0.002
#: How long ``stop_task`` waits for a cancelled task before cancelling it again.
CANCEL_WAIT_S = 0.05


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(STEP_S)


async def stop_task(task: asyncio.Task[None], timeout_s: float = WAIT_S) -> None:
    """Cancel a supervisor task, wait for it, and surface any error it died of.

    Cancels again while it runs on: on Python 3.11 ``asyncio.wait_for`` (inside a bus
    request) drops a cancellation that arrives just as the request completes.
    """
    async with asyncio.timeout(timeout_s):
        while not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
    with contextlib.suppress(asyncio.CancelledError):
        error = task.exception()
        if error is not None:
            raise AssertionError(f"{task.get_name()} failed") from error
