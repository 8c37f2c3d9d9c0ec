"""Reconciler: items whose lease ran out without a result become due again, so no job is ever stuck."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from services.batch.metrics import LEASES_EXPIRED
from services.batch.store import BatchStore

log = logging.getLogger(__name__)

_BATCH = 10_000


class Reconciler:
    """A lease runs out when the message was lost (a broker that kept nothing across a restart), its
    worker died before committing, or the result write failed. The item goes back to the outbox; if the
    old message is still delivered later, the duplicate finds the item done and writes nothing."""

    def __init__(self, store: BatchStore, interval_s: float, on_due: Callable[[], None]) -> None:
        self._store = store
        self._interval_s = interval_s
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
        expired = 0
        while (count := await self._store.expire_leases(_BATCH)) > 0:
            expired += count
            if count < _BATCH:
                break
        if expired:
            LEASES_EXPIRED.inc(expired)
            log.info("republishing items whose lease expired", extra={"items": expired})
            self._on_due()
        return expired

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.reconcile_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning("reconcile pass failed", extra={"error": f"{type(error).__name__}: {error}"})
