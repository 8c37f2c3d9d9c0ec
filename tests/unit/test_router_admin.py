"""RouterAdminService: ListBackends shows what Envoy is told, drains reach the snapshot before the reply, xDS state."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from servegrid.router.v1 import router_admin_pb2 as apb
from servegrid.router.v1 import router_admin_pb2_grpc as apb_grpc

from services.router.publisher import snapshot_version
from services.router.server import Router, build_router
from services.router.xds import TYPE_ENDPOINT
from services.runtime.errors import status_details
from tests.support.polling import wait_until
from tests.support.router_harness import (
    FakeProbeClients,
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
