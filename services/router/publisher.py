"""Snapshot publisher: rebuilds the xDS snapshot after table or endpoint changes, coalescing bursts into one."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable

from services.router import metrics
from services.router.xds import XdsSnapshot

log = logging.getLogger(__name__)


def snapshot_version(snapshot: XdsSnapshot) -> str:
    """One name for the whole snapshot, `{revision}.{sha256 of the per-type versions}[:12]`: the same on
    every replica serving the same table and health, like each type's version."""
    digest = hashlib.sha256("\n".join(f"{t}={v}" for t, v in sorted(snapshot.versions.items())).encode())
    return f"{snapshot.revision}.{digest.hexdigest()[:12]}"


class SnapshotPublisher:
    """`request()` marks the snapshot stale; one task rebuilds it `coalesce_s` later, so a registry reset,
    the probes it triggers and a drain arriving together cost one build and one push to every Envoy.

    `ready()` gates publishing: a router that has not loaded a table yet publishes nothing, so Envoys
    connecting to a freshly restarted replica keep their config instead of being handed an empty one.
    `prepare` runs before each build (it probes backends the table just added). A build that raises
    leaves the last good snapshot in place and shows in `check()`.
    """

    def __init__(
        self,
        build: Callable[[], XdsSnapshot],
        publish: Callable[[XdsSnapshot], None],
        *,
        ready: Callable[[], bool] = lambda: True,
        prepare: Callable[[], Awaitable[None]] | None = None,
        coalesce_s: float = 0.005,
    ) -> None:
        self._build = build
        self._publish = publish
        self._ready = ready
        self._prepare = prepare
        self.coalesce_s = coalesce_s
        self.requested = 0  # generation of the latest request
        self.published = 0  # generation the last finished build covered
        self.builds = 0
        self.last_error = ""
        self._task: asyncio.Task[None] | None = None
        self._done = asyncio.Condition()

    def request(self) -> None:
        """Mark the snapshot stale (cheap, synchronous: listeners call it on every change)."""
        self.requested += 1
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run(), name="snapshot-publisher")

    async def flush(self, timeout_s: float = 5.0) -> None:
        """Wait until a snapshot covering every change requested so far is published (or failed to build)."""
        target = self.requested
        async with asyncio.timeout(timeout_s), self._done:
            await self._done.wait_for(lambda: self.published >= target)

    async def _run(self) -> None:
        while self.published < self.requested:
            if self.coalesce_s:
                await asyncio.sleep(self.coalesce_s)
            generation = self.requested
            try:
                if self._prepare is not None:
                    await self._prepare()
                if self._ready():
                    self._build_and_publish()
            except asyncio.CancelledError:
                raise
            except Exception:  # recorded in check() and the log; the last good snapshot stays
                self.last_error = "snapshot build failed; Envoys keep the previous one (see the log)"
                metrics.SNAPSHOT_BUILDS.labels("error").inc()
                log.exception("xDS snapshot build failed; keeping the previous snapshot")
            async with self._done:
                self.published = generation
                self._done.notify_all()

    def _build_and_publish(self) -> None:
        started = time.perf_counter()
        snapshot = self._build()
        self._publish(snapshot)
        took = time.perf_counter() - started
        self.builds += 1
        self.last_error = ""
        metrics.SNAPSHOT_BUILDS.labels("ok").inc()
        metrics.SNAPSHOT_BUILD_SECONDS.observe(took)
        log.info(
            "xDS snapshot published",
            extra={"snapshot_version": snapshot_version(snapshot), "build_ms": round(took * 1e3, 2)},
        )

    async def check(self) -> None:
        """Health component: the latest build failed (Envoys serve the snapshot before it)."""
        if self.last_error:
            raise RuntimeError(self.last_error)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
