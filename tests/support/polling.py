"""The one bounded poll the tests use, for state only another process holds (a ready file, a port, an
admin page, a counter in Redis): where the code under test signals an event (a stream, a callback,
a future), tests wait on that instead."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

Condition = Callable[[], bool]
AsyncCondition = Callable[[], bool | Awaitable[bool]]


def _detail(detail: str | Callable[[], str]) -> str:
    return detail() if callable(detail) else detail


def wait_for(
    condition: Condition, timeout_s: float = 10.0, poll_s: float = 0.05, detail: str | Callable[[], str] = ""
) -> float:
    """Block until `condition()` holds; the seconds it took. AssertionError (with `detail`) past the deadline."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s {_detail(detail)}".rstrip())
        time.sleep(poll_s)
    return time.monotonic() - started


async def wait_until(
    condition: AsyncCondition, timeout_s: float = 10.0, poll_s: float = 0.02, detail: str | Callable[[], str] = ""
) -> float:
    """`wait_for` on the event loop; `condition` may be a coroutine function (say, an RPC)."""
    started = time.monotonic()
    while True:
        met = condition()
        if inspect.isawaitable(met):
            met = await met
        if met:
            return time.monotonic() - started
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s {_detail(detail)}".rstrip())
        await asyncio.sleep(poll_s)


def wait_started(
    process: subprocess.Popen[Any],
    ready: Condition,
    *,
    name: str,
    timeout_s: float = 30.0,
    log_tail: Callable[[], str] = lambda: "",
) -> float:
    """`wait_for` a process this test started to be `ready` (its ready file, its admin page): RuntimeError
    with its log as soon as it exits, or once `timeout_s` passes (the caller stops it)."""

    def up() -> bool:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{log_tail()}")
        try:
            return ready()
        except OSError:  # not listening yet
            return False

    try:
        return wait_for(up, timeout_s)
    except AssertionError:
        raise RuntimeError(f"{name} not ready in {timeout_s}s:\n{log_tail()}") from None
