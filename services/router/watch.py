"""The router's registry client: WatchRoutes keeps the routing table in step (and survives outages), and
operator drains are stored there, where every replica reads them back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

import grpc
from google.protobuf import field_mask_pb2
from servegrid.registry.v1 import registry_pb2, registry_pb2_grpc

from services.router import metrics
from services.router.table import RouteTable
from services.runtime.channels import open_channel
from services.runtime.tls import CertFiles

log = logging.getLogger(__name__)


class RegistryWatcher:
    """Streams the table from the registry: `reset` replaces it, later messages upsert and remove.

    When the stream breaks the table stays as it was (the last-known routes keep serving) and the
    watcher reconnects with exponential backoff and jitter; the next `reset` resynchronises.
    """

    def __init__(
        self,
        address: str,
        table: RouteTable,
        *,
        watcher: str = "router",
        backoff_initial_s: float = 0.1,
        backoff_max_s: float = 5.0,
        tls: CertFiles | None = None,
    ) -> None:
        self.address = address
        self.tls = tls
        self.table = table
        self.watcher = watcher
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.connected = False
        self.messages = 0
        self._channel: grpc.aio.Channel | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._channel = open_channel(
            self.address,
            tls=self.tls,
            peer="registry",
            options=[("grpc.max_receive_message_length", 64 * 1024 * 1024)],
        )
        self._task = asyncio.get_running_loop().create_task(self._run(), name="registry-watch")

    async def _run(self) -> None:
        assert self._channel is not None
        stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        delay = self.backoff_initial_s
        while True:
            try:
                stream = stub.WatchRoutes(registry_pb2.WatchRoutesRequest(watcher=self.watcher))
                async for message in stream:
                    if not self.connected:
                        log.info("registry watch connected", extra={"registry": self.address})
                    self._set_connected(True)
                    delay = self.backoff_initial_s
                    self.table.apply_watch(message)
                    self.messages += 1
                    metrics.TABLE_REVISION.set(self.table.revision)
                log.warning("registry closed the route stream", extra={"registry": self.address})
            except asyncio.CancelledError:
                raise
            except grpc.aio.AioRpcError as error:
                if self.connected:
                    log.warning(
                        "registry watch lost: %s; serving the last-known table",
                        error.code().name,
                        extra={"registry": self.address, "revision": self.table.revision},
                    )
            except Exception:  # a bad message must not end watching
                log.exception("registry watch failed")
            self._set_connected(False)
            await asyncio.sleep(random.uniform(delay / 2, delay))  # nosec B311
            delay = min(self.backoff_max_s, delay * 2)

    async def store_drained(
        self, backend_id: str, drained: bool, timeout_s: float, metadata: tuple[tuple[str, str], ...] = ()
    ) -> registry_pb2.Backend:
        """Set the registry's drain flag of a backend (UpdateBackend, mask `drained`); its routes then
        come back to every replica's watch. Raises the registry's grpc.aio.AioRpcError."""
        if self._channel is None:
            raise RuntimeError("the registry watcher is not started")
        request = registry_pb2.UpdateBackendRequest(
            backend=registry_pb2.Backend(backend_id=backend_id, drained=drained),
            update_mask=field_mask_pb2.FieldMask(paths=["drained"]),
        )
        stub = registry_pb2_grpc.RegistryServiceStub(self._channel)
        reply = await stub.UpdateBackend(request, timeout=timeout_s, metadata=metadata or None)
        return reply.backend

    def _set_connected(self, connected: bool) -> None:
        self.connected = connected
        metrics.REGISTRY_CONNECTED.set(1 if connected else 0)

    async def check(self) -> None:
        """Health component (optional): a registry outage is reported, the router keeps serving."""
        if not self.connected:
            raise RuntimeError(f"not connected to the registry at {self.address}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._channel is not None:
            await self._channel.close()
