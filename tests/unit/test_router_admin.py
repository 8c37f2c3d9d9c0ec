"""RouterAdminService: ListBackends shows what Envoy is told, drains reach the snapshot before the reply, xDS state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from servegrid.registry.v1 import registry_pb2 as rpb
from servegrid.router.v1 import router_admin_pb2 as apb
from servegrid.router.v1 import router_admin_pb2_grpc as apb_grpc

from services.router.publisher import snapshot_version
from services.router.server import Router, build_router
from services.router.xds import TYPE_ENDPOINT
from services.runtime.errors import status_details
from tests.support.polling import wait_until
from tests.support.router_harness import (
    FakeProbeClients,
    FakeRegistry,
    endpoint_name,
    fake_snapshot,
    route,
    snapshot_states,
    unit_settings,
    write_routes,
)

A, B = ("a", "10.0.0.1:8001", "10.0.0.1:8000"), ("b", "10.0.0.2:8001")
HEALTHY, UNHEALTHY, DRAINING = 1, 2, 3  # Envoy's HealthStatus numbers, as the fake snapshot carries them


@pytest.fixture
def clients() -> FakeProbeClients:
    clients = FakeProbeClients()
    clients(B[1]).models[("digits", "")] = False  # b has affine loaded, not digits
    return clients


@pytest.fixture
async def router(tmp_path: Path, clients: FakeProbeClients) -> AsyncIterator[Router]:
    routes = [route("m", [(1, "affine", 100, [A, B])]), route("d", [(1, "digits", 100, [A, B])])]
    settings = unit_settings(routes_file=write_routes(tmp_path / "routes.json", routes, revision=4))
    built = build_router(settings, build_snapshot=fake_snapshot, probe_clients=clients)
    await built.app.start()
    yield built
    await built.app.stop()


@pytest.fixture
async def admin(router: Router) -> AsyncIterator[apb_grpc.RouterAdminServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.app.port}") as channel:
        yield apb_grpc.RouterAdminServiceStub(channel)


async def test_list_backends_is_what_envoy_is_told(admin: apb_grpc.RouterAdminServiceStub) -> None:
    listed = await admin.ListBackends(apb.ListBackendsRequest())
    a, b = listed.backends
    assert (a.backend_id, a.address, a.http_address) == ("a", A[1], A[2])
    assert a.health == apb.BACKEND_HEALTH_HEALTHY and a.endpoint_state == apb.ENDPOINT_STATE_HEALTHY
    assert list(a.triton_models) == ["affine", "digits"] and not a.unready_triton_models
    assert b.endpoint_state == apb.ENDPOINT_STATE_HEALTHY and list(b.unready_triton_models) == ["digits"]
    assert not a.HasField("ejected_until") and a.requests_total == 0  # deprecated: Envoy holds those now

    first = await admin.ListBackends(apb.ListBackendsRequest(page_size=1))
    assert [x.backend_id for x in first.backends] == ["a"] and first.next_page_token
    rest = await admin.ListBackends(apb.ListBackendsRequest(page_size=1, page_token=first.next_page_token))
    assert [x.backend_id for x in rest.backends] == ["b"] and not rest.next_page_token
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.ListBackends(apb.ListBackendsRequest(page_size=-1))
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_drain_is_in_the_snapshot_when_the_call_returns(
    router: Router, admin: apb_grpc.RouterAdminServiceStub
) -> None:
    assert router.ads.snapshot is not None
    assert snapshot_states(router.ads.snapshot)[endpoint_name("b", "digits", "")] == UNHEALTHY
    drained = await admin.DrainBackend(apb.DrainBackendRequest(backend_id="a"))
    assert drained.backend.drained and drained.backend.endpoint_state == apb.ENDPOINT_STATE_DRAINING
    states = snapshot_states(router.ads.snapshot)
    assert states[endpoint_name("a", "affine", "")] == DRAINING and states[endpoint_name("a", "digits", "")] == DRAINING
    assert states[endpoint_name("b", "affine", "")] == HEALTHY

    undrained = await admin.UndrainBackend(apb.UndrainBackendRequest(backend_id="a"))
    assert not undrained.backend.drained and undrained.backend.endpoint_state == apb.ENDPOINT_STATE_HEALTHY
    assert snapshot_states(router.ads.snapshot)[endpoint_name("a", "affine", "")] == HEALTHY

    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await admin.DrainBackend(apb.DrainBackendRequest(backend_id="nope"))
    assert caught.value.code() is grpc.StatusCode.NOT_FOUND
    _, info = status_details(caught.value.trailing_metadata())
    assert info is not None and info.reason == "BACKEND_NOT_FOUND"


async def test_route_table_reports_the_snapshot_each_envoy_acked_and_the_last_rejection(
    router: Router, admin: apb_grpc.RouterAdminServiceStub
) -> None:
    requests: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

    async def outgoing() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            yield await requests.get()

    node = base_pb2.Node(id="envoy-1", cluster="servegrid-envoy")
    names = [endpoint_name("a", "affine", "")]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.app.port}") as channel:
        stream = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(outgoing())
        await requests.put(discovery_pb2.DiscoveryRequest(node=node, type_url=TYPE_ENDPOINT, resource_names=names))
        response = await stream.read()
        assert isinstance(response, discovery_pb2.DiscoveryResponse)
        await requests.put(
            discovery_pb2.DiscoveryRequest(
                type_url=TYPE_ENDPOINT,
                resource_names=names,
                version_info=response.version_info,
                response_nonce=response.nonce,
            )
        )
        await router.ads.wait_acked({TYPE_ENDPOINT: response.version_info}, timeout_s=5)
        table = await admin.GetRouteTable(apb.GetRouteTableRequest())
        assert router.ads.snapshot is not None
        assert table.revision == 4 and table.snapshot_version == snapshot_version(router.ads.snapshot)
        assert [r.model_id for r in table.routes] == ["d", "m"]
        (envoy,) = table.envoys
        assert (envoy.node_id, envoy.node_cluster) == ("envoy-1", "servegrid-envoy")
        assert envoy.acked_versions["endpoints"] == response.version_info and envoy.connect_time.seconds > 0
        assert not table.HasField("last_rejection")

        await admin.DrainBackend(apb.DrainBackendRequest(backend_id="a"))  # a new EDS version is pushed
        pushed = await stream.read()
        assert isinstance(pushed, discovery_pb2.DiscoveryResponse) and pushed.version_info != response.version_info
        await requests.put(
            discovery_pb2.DiscoveryRequest(
                type_url=TYPE_ENDPOINT,
                resource_names=names,
                version_info=response.version_info,
                response_nonce=pushed.nonce,
                error_detail=status_pb2.Status(code=3, message="bad endpoint"),
            )
        )
        await wait_until(lambda: router.ads.last_rejection is not None, timeout_s=5)
        table = await admin.GetRouteTable(apb.GetRouteTableRequest())
        rejection = table.last_rejection
        assert (rejection.node_id, rejection.resource_type, rejection.version) == (
            "envoy-1",
            "endpoints",
            pushed.version_info,
        )
        assert rejection.message == "bad endpoint"
        # The NACK shows in health, but the router keeps serving xDS (an optional component).
        await wait_until(lambda: router.app.health.components["xds"].ok is False, timeout_s=5)
        assert router.app.health.serving
        stream.cancel()


# --- drains shared through the registry -------------------------------------------------------


class DrainingRegistry(FakeRegistry):
    """The harness's WatchRoutes registry plus UpdateBackend for the drain flag, as the real one stores it:
    the flag lands on every RouteBackend of that id, and the change goes to every watcher."""

    def __init__(self, routes: list[rpb.Route]) -> None:
        super().__init__(routes)
        self.updates: list[tuple[rpb.UpdateBackendRequest, str]] = []
        self.server = grpc.aio.server()

    async def UpdateBackend(self, request: rpb.UpdateBackendRequest, context: grpc.aio.ServicerContext) -> Any:
        subject = dict(context.invocation_metadata() or ()).get("x-servegrid-subject", "")
        self.updates.append((request, str(subject)))
        changed = []
        for stored in self.routes:
            copy = rpb.Route()
            copy.CopyFrom(stored)
            for version in copy.versions:
                for backend in version.backends:
                    if backend.backend_id == request.backend.backend_id:
                        backend.drained = request.backend.drained
            changed.append(copy)
        self.push(changed)
        return rpb.UpdateBackendResponse(backend=rpb.Backend(backend_id=request.backend.backend_id))

    async def start(self, port: int = 0) -> DrainingRegistry:
        handler = grpc.method_handlers_generic_handler(
            "servegrid.registry.v1.RegistryService",
            {
                "WatchRoutes": grpc.unary_stream_rpc_method_handler(
                    self.WatchRoutes,
                    request_deserializer=rpb.WatchRoutesRequest.FromString,
                    response_serializer=rpb.WatchRoutesResponse.SerializeToString,
                ),
                "UpdateBackend": grpc.unary_unary_rpc_method_handler(
                    self.UpdateBackend,
                    request_deserializer=rpb.UpdateBackendRequest.FromString,
                    response_serializer=rpb.UpdateBackendResponse.SerializeToString,
                ),
            },
        )
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port(f"127.0.0.1:{port}")
        await self.server.start()
        return self

    async def stop(self) -> None:
        await self.server.stop(None)


@pytest.fixture
async def registry() -> AsyncIterator[DrainingRegistry]:
    found = await DrainingRegistry([route("m", [(1, "affine", 100, [A, B])])]).start()
    yield found
    await found.stop()


@pytest.fixture
async def replicas(registry: DrainingRegistry, clients: FakeProbeClients) -> AsyncIterator[list[Router]]:
    """Two router replicas watching one registry, as the chart runs them."""
    built = []
    for name in ("router-0", "router-1"):
        settings = unit_settings(registry_address=f"127.0.0.1:{registry.port}", watcher_name=name, drain_timeout_s=5.0)
        router = build_router(settings, build_snapshot=fake_snapshot, probe_clients=clients)
        await router.app.start()
        built.append(router)
    await wait_until(lambda: all(r.table.loaded for r in built), timeout_s=5)
    yield built
    for router in built:
        await router.app.stop()


def served_as(router: Router, backend_id: str) -> int | None:
    """What the replica's current snapshot tells Envoy about the backend's affine endpoint."""
    snapshot = router.ads.snapshot
    return None if snapshot is None else snapshot_states(snapshot)[endpoint_name(backend_id, "affine", "")]


async def test_a_drain_through_one_replica_drains_every_replica(
    registry: DrainingRegistry, replicas: list[Router]
) -> None:
    first, second = replicas
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.app.port}") as channel:
        admin = apb_grpc.RouterAdminServiceStub(channel)
        drained = await admin.DrainBackend(
            apb.DrainBackendRequest(backend_id="a"), metadata=[("x-servegrid-subject", "ops@example.com")]
        )
        assert drained.backend.drained and drained.backend.endpoint_state == apb.ENDPOINT_STATE_DRAINING
        # Stored in the registry (with who asked), and in the answering replica's snapshot when the call returns.
        request, subject = registry.updates[-1]
        assert request.update_mask.paths == ["drained"] and request.backend.drained and subject == "ops@example.com"
        assert first.ads.snapshot is not None
        assert snapshot_states(first.ads.snapshot)[endpoint_name("a", "affine", "")] == DRAINING
        # The other replica, which no call reached, drains it too.
        await wait_until(lambda: served_as(second, "a") == DRAINING, timeout_s=5)
        assert served_as(second, "b") == HEALTHY

        await admin.UndrainBackend(apb.UndrainBackendRequest(backend_id="a"))
        await wait_until(lambda: [served_as(r, "a") for r in replicas] == [HEALTHY, HEALTHY], timeout_s=5)


async def test_a_drain_the_registry_cannot_store_is_unavailable_and_changes_nothing(
    registry: DrainingRegistry, replicas: list[Router]
) -> None:
    first = replicas[0]
    await registry.stop()  # an outage: the routers keep their tables, and nothing can store a drain
    async with grpc.aio.insecure_channel(f"127.0.0.1:{first.app.port}") as channel:
        admin = apb_grpc.RouterAdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.DrainBackend(apb.DrainBackendRequest(backend_id="a"), timeout=10)
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "registry" in (caught.value.details() or "")
    _, info = status_details(caught.value.trailing_metadata())
    assert info is not None and info.reason == "REGISTRY_UNAVAILABLE"
    assert registry.updates == []
    assert first.ads.snapshot is not None
    assert snapshot_states(first.ads.snapshot)[endpoint_name("a", "affine", "")] == HEALTHY
