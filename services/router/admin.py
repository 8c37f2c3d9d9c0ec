"""RouterAdminService: backend health and load, drain/undrain, and the routing table this replica holds."""

from __future__ import annotations

import time

import grpc
from google.protobuf import timestamp_pb2
from servegrid.router.v1 import router_admin_pb2 as pb
from servegrid.router.v1 import router_admin_pb2_grpc as pb_grpc

from services.router.backends import Backend, BackendPool
from services.router.table import RouteTable
from services.router.watch import RegistryWatcher
from services.runtime.errors import InvalidArgument, NotFound


def _timestamp(epoch_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(epoch_s * 1e9))
    return stamp


def backend_status(backend: Backend) -> pb.BackendStatus:
    status = pb.BackendStatus(
        backend_id=backend.backend_id,
        address=backend.address,
        health=pb.BackendHealth.ValueType(backend.health),
        breaker_state=pb.BreakerState.ValueType(int(backend.breaker.state)),
        drained=backend.drained,
        in_flight=backend.in_flight,
        ewma_latency_ms=backend.cost_s * 1e3,
        requests_total=backend.requests_total,
        failures_total=backend.failures_total,
        triton_models=sorted({name for name, _ in backend.models}),
    )
    now = time.monotonic()
    if backend.ejected_until > now:
        # ejected_until is on the monotonic clock; the API speaks wall-clock time.
        status.ejected_until.CopyFrom(_timestamp(time.time() + backend.ejected_until - now))
    return status


class RouterAdmin(pb_grpc.RouterAdminServiceServicer):
    """Thin: reads and steers the BackendPool and RouteTable."""

    def __init__(self, table: RouteTable, pool: BackendPool, watcher: RegistryWatcher | None) -> None:
        self.table = table
        self.pool = pool
        self.watcher = watcher

    async def ListBackends(
        self, request: pb.ListBackendsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBackendsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative", field_violations=[("page_size", "negative")])
        ids = sorted(b for b in self.pool.backends if b > request.page_token)
        page = ids[: request.page_size] if request.page_size else ids
        next_token = page[-1] if request.page_size and len(ids) > len(page) else ""
        return pb.ListBackendsResponse(
            backends=[backend_status(self.pool.backends[b]) for b in page], next_page_token=next_token
        )

    def _backend(self, backend_id: str) -> Backend:
        backend = self.pool.get(backend_id)
        if backend is None:
            raise NotFound(
                f"backend {backend_id!r} is not known to this router",
                reason="BACKEND_NOT_FOUND",
                metadata={"backend_id": backend_id},
            )
        return backend

    async def DrainBackend(
        self, request: pb.DrainBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.DrainBackendResponse:
        backend = self._backend(request.backend_id)
        backend.drained = True
        return pb.DrainBackendResponse(backend=backend_status(backend))

    async def UndrainBackend(
        self, request: pb.UndrainBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.UndrainBackendResponse:
        backend = self._backend(request.backend_id)
        backend.drained = False
        return pb.UndrainBackendResponse(backend=backend_status(backend))

    async def GetRouteTable(
        self, request: pb.GetRouteTableRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRouteTableResponse:
        reply = pb.GetRouteTableResponse(
            routes=self.table.protos(),
            revision=self.table.revision,
            registry_connected=bool(self.watcher and self.watcher.connected),
        )
        if self.table.update_time:
            reply.update_time.CopyFrom(_timestamp(self.table.update_time))
        return reply
