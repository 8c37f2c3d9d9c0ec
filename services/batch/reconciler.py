"""Reconciler: items whose lease ran out without a result become due again, so no job is ever stuck."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from google.rpc import code_pb2

from services.batch.metrics import LEASES_EXPIRED
from services.batch.settings import BatchSettings
from services.batch.store import BatchStore, Outcomes
from services.batch.worker import record_outcomes

log = logging.getLogger(__name__)

_BATCH = 10_000
_WORKER_LOST = "a worker took the item and stopped before recording a result (lease expired)"


class Reconciler:
    """A lease runs out when the message was lost (a broker that kept nothing across a restart), its
    worker died before committing, or the result write failed. An item a worker had taken counts the
    expiry as one attempt: it goes back after the retry backoff or, out of attempts, fails for good into
    the dead-letter topic. One never taken (a lost message, no worker up) goes back at once, uncounted.
    If the old message is still delivered later, the duplicate finds the item done
    or already retried and writes nothing twice."""

    def __init__(self, store: BatchStore, settings: BatchSettings, on_due: Callable[[], None]) -> None:
        self._store = store
        self._settings = settings
        self._interval_s = settings.reconcile_interval_s
        self._on_due = on_due
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="batch-reconciler")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def reconcile_once(self) -> int:
        lost, crashed = await self._store.expire_leases(_BATCH)
        for job_id, indices in crashed.items():
            outcomes = Outcomes(transient=[(index, code_pb2.UNAVAILABLE, _WORKER_LOST) for index in indices])
            await record_outcomes(self._store, self._settings, job_id, outcomes)
        count = lost + sum(len(indices) for indices in crashed.values())
        if count:
            LEASES_EXPIRED.inc(count)
            log.info(
                "republishing items whose lease expired", extra={"items": count, "taken_by_a_worker": count - lost}
            )
            self._on_due()
        return count

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("reconcile pass failed", extra={"error": f"{type(error).__name__}: {error}"})
