"""RouterAdminService: what Envoy is told about each backend, drain/undrain through EDS, the table and xDS state."""

# Drains are shared state: with a registry, DrainBackend stores the flag on the registry's Backend and
# waits until this replica's own watch brings it back (so every replica, the one answering included,
# drains from the same source, and a REST call that reached any one replica drains them all). Only a
# router on a static routes file, which has no registry to share through, drains on its own.

from __future__ import annotations

import grpc
from google.protobuf import timestamp_pb2
from servegrid.router.v1 import router_admin_pb2 as pb
from servegrid.router.v1 import router_admin_pb2_grpc as pb_grpc

from services.mesh.names import SUBJECT_HEADER
from services.router.backends import BackendProbes, EndpointState, ProbedBackend
from services.router.publisher import SnapshotPublisher, snapshot_version
from services.router.table import RouteTable
from services.router.watch import RegistryWatcher
from services.router.xds import AdsServer, NackInfo, NodeState
from services.runtime.errors import InvalidArgument, NotFound, Unavailable, relay
from services.runtime.paging import bad_position, decode_page_token, encode_page_token


def _timestamp(epoch_s: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(epoch_s * 1e9))
    return stamp


def endpoint_state(backend: ProbedBackend) -> EndpointState:
    """One state for the whole backend: DRAINING when drained, HEALTHY when Envoy may send it requests for
    at least one of its models (unready ones are listed apart), else UNHEALTHY."""
    states = {backend.state(model) for model in backend.models}
    if EndpointState.DRAINING in states or backend.drained:
        return EndpointState.DRAINING
    return EndpointState.HEALTHY if EndpointState.HEALTHY in states else EndpointState.UNHEALTHY


def backend_status(backend: ProbedBackend) -> pb.BackendStatus:
    # The deprecated load and breaker fields stay unset: Envoy holds those now (its /clusters page).
    return pb.BackendStatus(
        backend_id=backend.backend_id,
        address=backend.spec.address,
        http_address=backend.spec.http_address,
        health=pb.BackendHealth.ValueType(backend.health),
        drained=backend.drained,
        endpoint_state=pb.EndpointState.ValueType(int(endpoint_state(backend))),
        triton_models=sorted({name for name, _ in backend.models}),
        unready_triton_models=sorted({name for name, _ in backend.unready_models()}),
    )


def envoy_node(node: NodeState) -> pb.EnvoyNode:
    return pb.EnvoyNode(
        node_id=node.node_id,
        node_cluster=node.node_cluster,
        acked_versions=dict(node.acked),
        in_sync=node.in_sync,
        connect_time=_timestamp(node.connected_at),
    )


def xds_rejection(nack: NackInfo) -> pb.XdsRejection:
    return pb.XdsRejection(
        node_id=nack.node_id,
        resource_type=nack.type,
        version=nack.version,
        message=nack.message,
        time=_timestamp(nack.at),
    )


def _unknown_backend(backend_id: str) -> NotFound:
    return NotFound(
        f"backend {backend_id!r} is not known to this router (no route names it)",
        reason="BACKEND_NOT_FOUND",
        metadata={"backend_id": backend_id},
    )


class RouterAdmin(pb_grpc.RouterAdminServiceServicer):
    """Thin: reads the probes, table and ADS server; drains through the registry (the probes, on a static
    table) and answers once the snapshot says so."""

    def __init__(
        self,
        table: RouteTable,
        probes: BackendProbes,
        publisher: SnapshotPublisher,
        ads: AdsServer,
        watcher: RegistryWatcher | None,
        drain_timeout_s: float = 10.0,
    ) -> None:
        self.table = table
        self.probes = probes
        self.publisher = publisher
        self.ads = ads
        self.watcher = watcher
        self.drain_timeout_s = drain_timeout_s

    async def ListBackends(
        self, request: pb.ListBackendsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBackendsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must not be negative", field_violations=[("page_size", "negative")])
        query = {"list": "backends"}
        after = decode_page_token(request.page_token, query)
        if after is not None and not isinstance(after, str):
            raise bad_position()
        ids = sorted(b for b in self.probes.backends if after is None or b > after)
        page = ids[: request.page_size] if request.page_size else ids
        next_token = encode_page_token(page[-1], query) if request.page_size and len(ids) > len(page) else ""
        return pb.ListBackendsResponse(
            backends=[backend_status(self.probes.backends[b]) for b in page], next_page_token=next_token
        )

    async def _set_drained(self, backend_id: str, drained: bool, context: grpc.aio.ServicerContext) -> ProbedBackend:
        if self.probes.get(backend_id) is None:
            raise _unknown_backend(backend_id)
        if self.watcher is None:
            self.probes.set_drained(backend_id, drained)
        else:
            await self._store_drained(backend_id, drained, context)
        backend = self.probes.get(backend_id)
        if backend is None:  # the table dropped it meanwhile
            raise _unknown_backend(backend_id)
        # Answer once the EDS snapshot that says so is what every Envoy is being sent.
        await self.publisher.flush()
        return backend

    async def _store_drained(self, backend_id: str, drained: bool, context: grpc.aio.ServicerContext) -> None:
        """Through the registry: store the flag, then wait for this replica's watch to bring it back."""
        assert self.watcher is not None
        subject = [(k, v) for k, v in context.invocation_metadata() or () if k == SUBJECT_HEADER and isinstance(v, str)]
        try:
            await self.watcher.store_drained(backend_id, drained, self.drain_timeout_s, tuple(subject))
        except grpc.aio.AioRpcError as error:
            if error.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise Unavailable(
                    f"the registry, where drains are stored for every router, did not answer: {error.details()}",
                    reason="REGISTRY_UNAVAILABLE",
                    metadata={"backend_id": backend_id},
                ) from error
            await relay(error, context)  # the registry's own answer (NOT_FOUND, INVALID_ARGUMENT, ...)

        def applied() -> bool:
            backend = self.probes.get(backend_id)
            return backend is None or backend.spec.drained == drained

        if not await self.table.wait_for(applied, self.drain_timeout_s):
            state = "drained" if drained else "undrained"
            watch = "connected" if self.watcher.connected else "down"
            raise Unavailable(
                f"backend {backend_id!r} is {state} in the registry, but this router has not received the change "
                f"within {self.drain_timeout_s:g} s (registry watch {watch}); every router applies it when its "
                "watch delivers it",
                reason="DRAIN_NOT_APPLIED",
                metadata={"backend_id": backend_id},
            )

    async def DrainBackend(
        self, request: pb.DrainBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.DrainBackendResponse:
        backend = await self._set_drained(request.backend_id, True, context)
        return pb.DrainBackendResponse(backend=backend_status(backend))

    async def UndrainBackend(
        self, request: pb.UndrainBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.UndrainBackendResponse:
        backend = await self._set_drained(request.backend_id, False, context)
        return pb.UndrainBackendResponse(backend=backend_status(backend))

    async def GetRouteTable(
        self, request: pb.GetRouteTableRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRouteTableResponse:
        reply = pb.GetRouteTableResponse(
            routes=self.table.protos(),
            revision=self.table.revision,
            registry_connected=bool(self.watcher and self.watcher.connected),
            envoys=[envoy_node(node) for node in self.ads.nodes()],
        )
        if self.table.update_time:
            reply.update_time.CopyFrom(_timestamp(self.table.update_time))
        if self.ads.snapshot is not None:
            reply.snapshot_version = snapshot_version(self.ads.snapshot)
        if self.ads.last_rejection is not None:
            reply.last_rejection.CopyFrom(xds_rejection(self.ads.last_rejection))
        return reply
