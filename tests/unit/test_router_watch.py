"""The WatchRoutes client against a fake registry: reset, deltas, outage with last-known table, reconnect."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servegrid.router.v1 import router_admin_pb2 as apb
from servegrid.router.v1 import router_admin_pb2_grpc as apb_grpc

from services.router.server import Router, build_router
from services.router.settings import RouterSettings
from services.runtime.errors import status_details
from tests.support.router_harness import FakeRegistry, route, wait_until

DEAD = [("dead", "127.0.0.1:9")]  # nothing listens on the discard port: probes fail fast


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    fake = await FakeRegistry([route("a", [(1, "affine", 100, DEAD)])]).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def router(registry: FakeRegistry) -> AsyncIterator[Router]:
    settings = RouterSettings(
        port=0,
        metrics_port=None,
        use_uvloop=False,
        registry_address=f"127.0.0.1:{registry.port}",
        registry_backoff_initial_s=0.05,
        registry_backoff_max_s=0.2,
        health_interval_s=0.1,
        grace_period_s=0.1,
    )
    built = build_router(settings)
    await built.app.start()
    yield built
    await built.app.stop()


async def test_reset_then_deltas_reach_the_table_fast(router: Router, registry: FakeRegistry) -> None:
    await wait_until(lambda: "a" in router.table.routes)
    registry.push(upserts=[route("b", [(1, "digits", 100, DEAD)])], removed=["a"])
    took = await wait_until(lambda: set(router.table.routes) == {"b"})
    assert took < 1.0
    assert router.table.revision == registry.revision


async def test_registry_outage_keeps_the_last_table_and_reconnects(router: Router, registry: FakeRegistry) -> None:
    assert router.watcher is not None
    await wait_until(lambda: router.watcher is not None and router.watcher.connected)
    port = registry.port
    await registry.stop()
    await wait_until(lambda: router.watcher is not None and not router.watcher.connected)
    assert set(router.table.routes) == {"a"}  # still serving what it had

    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await wait_until(lambda: router.app.health.components["registry"].ok is False)
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert overall.status == health_pb2.HealthCheckResponse.SERVING  # optional component

        replacement = FakeRegistry([route("c", [(1, "affine", 100, DEAD)])])
        await replacement.start(port=port)
        try:
            await wait_until(lambda: set(router.table.routes) == {"c"})
            table = await apb_grpc.RouterAdminServiceStub(channel).GetRouteTable(apb.GetRouteTableRequest())
            assert table.registry_connected and [r.model_id for r in table.routes] == ["c"]
        finally:
            await replacement.stop()


async def test_admin_lists_and_drains_backends(router: Router) -> None:
    await wait_until(lambda: "dead" in router.pool.backends)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.app.port}") as channel:
        admin = apb_grpc.RouterAdminServiceStub(channel)
        listed = await admin.ListBackends(apb.ListBackendsRequest())
        assert [b.backend_id for b in listed.backends] == ["dead"]
        assert listed.backends[0].triton_models == ["affine"]
        drained = await admin.DrainBackend(apb.DrainBackendRequest(backend_id="dead"))
        assert drained.backend.drained
        undrained = await admin.UndrainBackend(apb.UndrainBackendRequest(backend_id="dead"))
        assert not undrained.backend.drained
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await admin.DrainBackend(apb.DrainBackendRequest(backend_id="nope"))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        _, info = status_details(caught.value.trailing_metadata())
        assert info is not None and info.reason == "BACKEND_NOT_FOUND"
