"""The WatchRoutes client against a fake registry: reset, deltas, an outage keeps table and snapshot, reconnect."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servegrid.router.v1 import router_admin_pb2 as apb
from servegrid.router.v1 import router_admin_pb2_grpc as apb_grpc

from services.router.server import Router, build_router
from tests.support.polling import wait_until
from tests.support.router_harness import FakeProbeClients, FakeRegistry, fake_snapshot, route, unit_settings

A = [("a", "10.0.0.1:8001")]


@pytest.fixture
async def registry() -> AsyncIterator[FakeRegistry]:
    fake = await FakeRegistry([route("a", [(1, "affine", 100, A)])]).start()
    yield fake
    await fake.stop()


@pytest.fixture
async def router(registry: FakeRegistry) -> AsyncIterator[Router]:
    settings = unit_settings(
        registry_address=f"127.0.0.1:{registry.port}", registry_backoff_initial_s=0.05, registry_backoff_max_s=0.2
    )
    built = build_router(settings, build_snapshot=fake_snapshot, probe_clients=FakeProbeClients())
    await built.app.start()
    yield built
    await built.app.stop()


async def test_reset_then_deltas_reach_the_table_and_the_snapshot_fast(router: Router, registry: FakeRegistry) -> None:
    await wait_until(lambda: router.ads.snapshot is not None and router.ads.snapshot.revision == registry.revision)
    registry.push(upserts=[route("b", [(1, "digits", 100, A)])], removed=["a"])
    took = await wait_until(lambda: router.ads.snapshot is not None and router.ads.snapshot.revision == 2)
    assert took < 1.0
    assert set(router.table.routes) == {"b"} and router.table.revision == registry.revision


async def test_registry_outage_keeps_the_last_table_and_snapshot_and_reconnects(
    router: Router, registry: FakeRegistry
) -> None:
    assert router.watcher is not None
    await wait_until(
        lambda: router.watcher is not None and router.watcher.connected and router.ads.snapshot is not None
    )
    served = router.ads.snapshot
    port = registry.port
    await registry.stop()
    await wait_until(lambda: router.watcher is not None and not router.watcher.connected)
    assert set(router.table.routes) == {"a"}  # still serving what it had
    assert router.ads.snapshot is served  # and Envoys keep being told the same

    async with grpc.aio.insecure_channel(f"127.0.0.1:{router.app.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        await wait_until(lambda: router.app.health.components["registry"].ok is False)
        overall = await health.Check(health_pb2.HealthCheckRequest(service=""))
        assert overall.status == health_pb2.HealthCheckResponse.SERVING  # optional component

        replacement = FakeRegistry([route("c", [(1, "affine", 100, A)])])
        await replacement.start(port=port)
        try:
            await wait_until(lambda: set(router.table.routes) == {"c"})
            table = await apb_grpc.RouterAdminServiceStub(channel).GetRouteTable(apb.GetRouteTableRequest())
            assert table.registry_connected and [r.model_id for r in table.routes] == ["c"]
        finally:
            await replacement.stop()
