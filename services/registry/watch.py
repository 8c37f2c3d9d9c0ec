"""The routing-table watch hub: PostgreSQL LISTEN/NOTIFY in, WatchRoutes streams out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from services.registry.cache import RegistryCache
from services.registry.domain import Route, RouteUpdate
from services.registry.metrics import LISTEN_RECONNECTS, NOTIFY_LAG, ROUTE_UPDATES, WATCHERS
from services.registry.routes import build_route
from services.registry.store import Change, RegistryStore, RoutingSnapshot
from services.runtime.notifications import Listener

log = logging.getLogger(__name__)


class _Signal:
    """Queue markers: send the whole table again, or end the stream."""

    def __init__(self, name: str) -> None:
        self.name = name


RESYNC = _Signal("resync")
CLOSE = _Signal("close")


@dataclass(eq=False)
class _Watcher:
    name: str
    queue: asyncio.Queue[RouteUpdate | _Signal] = field(default_factory=asyncio.Queue)


def routes_from(snapshot: RoutingSnapshot) -> list[Route]:
    return [
        build_route(
            model_id,
            snapshot.versions.get(model_id, []),
            snapshot.policies.get(model_id),
            snapshot.backends,
        )
        for model_id in snapshot.model_ids
    ]


class RouteHub:
    """One LISTEN connection per replica; each notified change is rebuilt once and fanned out.

    Changes are whole routes, never deltas, so a watcher that misses nothing converges, and one
    that may have missed something (its queue overflowed, the LISTEN connection dropped) is simply
    sent the whole table again.
    """

    def __init__(
        self,
        store: RegistryStore,
        *,
        cache: RegistryCache | None = None,
        queue_size: int = 1000,
        reconnect_s: float = 1.0,
    ) -> None:
        self.store = store
        self.cache = cache
        self.queue_size = queue_size
        self.reconnect_s = reconnect_s
        self.revision = 0
        self._watchers: set[_Watcher] = set()
        self._changes: asyncio.Queue[Change | _Signal] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._listener: Listener | None = None

    async def start(self) -> None:
        """LISTEN before serving, so no change committed after start can be missed."""
        self._listener = await self.store.listen()
        self._tasks = [
            asyncio.create_task(self._listen_loop(), name="registry-listen"),
            asyncio.create_task(self._build_loop(), name="registry-route-builder"),
        ]

    async def stop(self) -> None:
        for watcher in list(self._watchers):
            watcher.queue.put_nowait(CLOSE)
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        if self._listener is not None:
            await self._listener.close()
            self._listener = None

    async def full_update(self) -> RouteUpdate:
        snapshot = await self.store.routing_snapshot(None)
        return RouteUpdate(revision=snapshot.revision, routes=tuple(routes_from(snapshot)), reset=True)

    async def watch(self, name: str) -> AsyncIterator[RouteUpdate]:
        """The whole table, then every change; again the whole table whenever changes may have been lost."""
        watcher = _Watcher(name, asyncio.Queue(maxsize=self.queue_size))
        # Registered before the snapshot is read, so a change committing in between is queued, not lost.
        self._watchers.add(watcher)
        WATCHERS.inc()
        log.info("watcher connected", extra={"watcher": name})
        try:
            update = await self.full_update()
            last = update.revision
            yield update
            while True:
                item = await watcher.queue.get()
                if item is CLOSE:
                    return
                if isinstance(item, _Signal):  # RESYNC
                    update = await self.full_update()
                    last = update.revision
                    yield update
                    continue
                # Older than the table already sent: the reset covered it. Equal is resent (harmless):
                # two changes built from the same snapshot carry the same revision but different models.
                if item.revision < last:
                    continue
                last = item.revision
                yield item
        finally:
            self._watchers.discard(watcher)
            WATCHERS.dec()
            log.info("watcher disconnected", extra={"watcher": name})

    def _broadcast(self, item: RouteUpdate | _Signal) -> None:
        for watcher in self._watchers:
            try:
                watcher.queue.put_nowait(item)
            except asyncio.QueueFull:
                # A watcher this far behind gets the whole table instead of a backlog.
                log.warning("watcher fell behind; resending the whole table", extra={"watcher": watcher.name})
                while not watcher.queue.empty():
                    watcher.queue.get_nowait()
                watcher.queue.put_nowait(RESYNC)

    async def _listen_loop(self) -> None:
        while True:
            try:
                if self._listener is None:
                    self._listener = await self.store.listen()
                    # Changes may have committed while we were not listening.
                    self._changes.put_nowait(RESYNC)
                async for notify in self._listener.notifications():
                    try:
                        self._changes.put_nowait(Change.from_payload(notify.payload))
                    except (ValueError, KeyError):
                        log.warning("ignoring a malformed notification", extra={"payload": notify.payload[:200]})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                LISTEN_RECONNECTS.inc()
                log.warning("LISTEN connection lost; reconnecting", extra={"error": f"{type(exc).__name__}: {exc}"})
                if self._listener is not None:
                    with contextlib.suppress(Exception):
                        await self._listener.close()
                    self._listener = None
                await asyncio.sleep(self.reconnect_s)

    async def _build_loop(self) -> None:
        while True:
            first = await self._changes.get()
            batch: list[Change | _Signal] = [first]
            # Coalesce a burst of commits into one snapshot.
            while not self._changes.empty():
                batch.append(self._changes.get_nowait())
            try:
                await self._publish(batch)
            except asyncio.CancelledError:
                raise
            except Exception:
                # The database may be away; the watchers will need the whole table once it is back.
                log.exception("could not rebuild routes after a change")
                self._broadcast(RESYNC)
                await asyncio.sleep(self.reconnect_s)

    async def _publish(self, batch: Sequence[Change | _Signal]) -> None:
        if any(item is RESYNC for item in batch):
            self._broadcast(RESYNC)
            return
        changes = [c for c in batch if isinstance(c, Change)]
        if self.cache is not None:
            # The writing replica invalidated already, unless Redis was out of its reach; every
            # replica repeating it (idempotent tombstones) keeps one partitioned writer from
            # leaving stale entries behind for the others.
            for change in changes:
                if change.all_models:
                    await self.cache.invalidate_all("route", change.revision)
                await self.cache.invalidate(
                    [(kind, m) for m in change.model_ids for kind in ("model", "route")], change.revision
                )
        named = {m for c in changes for m in c.model_ids}
        all_models = any(c.all_models for c in changes)
        snapshot = await self.store.routing_snapshot(None if all_models else sorted(named))
        removed = tuple(sorted(named - set(snapshot.model_ids)))
        update = RouteUpdate(revision=snapshot.revision, routes=tuple(routes_from(snapshot)), removed_model_ids=removed)
        self.revision = max(self.revision, snapshot.revision)
        self._broadcast(update)
        ROUTE_UPDATES.inc()
        now = time.time()
        for change in changes:
            if change.committed_at:
                NOTIFY_LAG.observe(max(0.0, now - change.committed_at))
