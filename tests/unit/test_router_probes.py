"""BackendProbes: ServerReady + ModelReady verdicts and drains become endpoint states; listeners hear only changes."""

from __future__ import annotations

import pytest

from services.router.backends import HEALTHY, UNHEALTHY, BackendProbes, EndpointState
from services.router.table import RouteTable
from tests.support.polling import wait_until
from tests.support.router_harness import FakeProbeClients, route, unit_settings

A, B = ("a", "10.0.0.1:8001", "10.0.0.1:8000"), ("b", "10.0.0.2:8001")


def table_with(*routes: object) -> RouteTable:
    table = RouteTable()
    table.reset(routes, revision=1)  # type: ignore[arg-type]
    return table


@pytest.fixture
def clients() -> FakeProbeClients:
    return FakeProbeClients()


@pytest.fixture
def probes(clients: FakeProbeClients) -> BackendProbes:
    return BackendProbes(unit_settings(), clients)


async def test_states_cover_every_backend_and_triton_model_the_table_names(
    probes: BackendProbes, clients: FakeProbeClients
) -> None:
    table = table_with(route("m", [(1, "affine", 100, [A, B])]), route("d", [(1, "digits", 100, [A])]))
    probes.sync(table.backends())
    assert set(probes.states().values()) == {EndpointState.UNHEALTHY}  # never probed: not vouched for
    await probes.probe_all()
    assert probes.states() == {
        ("a", "affine", ""): EndpointState.HEALTHY,
        ("a", "digits", ""): EndpointState.HEALTHY,
        ("b", "affine", ""): EndpointState.HEALTHY,
    }
    assert probes.backends["a"].spec.http_address == "10.0.0.1:8000"


async def test_a_model_not_ready_on_one_backend_is_unhealthy_there_only(
    probes: BackendProbes, clients: FakeProbeClients
) -> None:
    probes.sync(table_with(route("m", [(1, "affine", 100, [A, B])])).backends())
    clients.clients[B[1]].models[("affine", "")] = False
    await probes.probe_all()
    assert probes.states()[("a", "affine", "")] is EndpointState.HEALTHY
    assert probes.states()[("b", "affine", "")] is EndpointState.UNHEALTHY
    assert probes.backends["b"].health == HEALTHY and probes.backends["b"].unready_models() == [("affine", "")]


async def test_server_not_ready_makes_all_its_models_unhealthy_and_health_fails_when_none_is_ready(
    probes: BackendProbes, clients: FakeProbeClients
) -> None:
    await probes.check()  # no backends yet: fine, the router waits for routes
    probes.sync(table_with(route("m", [(1, "affine", 100, [A, B])])).backends())
    clients.clients[A[1]].server = False
    await probes.probe_all()
    assert probes.states()[("a", "affine", "")] is EndpointState.UNHEALTHY
    assert probes.backends["a"].health == UNHEALTHY
    await probes.check()  # b is still ready
    clients.clients[B[1]].server = False
    await probes.probe_all()
    with pytest.raises(RuntimeError):
        await probes.check()


async def test_listeners_hear_only_real_changes(probes: BackendProbes, clients: FakeProbeClients) -> None:
    changes: list[int] = []
    probes.on_change(lambda: changes.append(len(probes.states())))
    table = table_with(route("m", [(1, "affine", 100, [A])]))
    probes.sync(table.backends())
    await probes.probe_all()
    assert len(changes) == 2  # the key appeared (unhealthy), then the probe vouched for it
    for _ in range(5):
        await probes.probe_all()  # idle probing: nothing changes, nothing is rebuilt
    probes.sync(table.backends())
    assert len(changes) == 2
    clients.clients[A[1]].server = False
    await probes.probe_all()
    assert len(changes) == 3


async def test_drain_wins_over_health_and_survives_an_address_change(probes: BackendProbes) -> None:
    probes.sync(table_with(route("m", [(1, "affine", 100, [A])])).backends())
    await probes.probe_all()
    assert probes.set_drained("a", True) is not None
    assert probes.states()[("a", "affine", "")] is EndpointState.DRAINING
    moved = ("a", "10.0.0.9:8001")
    probes.sync(table_with(route("m", [(1, "affine", 100, [moved])])).backends())
    assert probes.backends["a"].drained and probes.states()[("a", "affine", "")] is EndpointState.DRAINING
    probes.set_drained("a", False)
    await probes.probe_all()
    assert probes.states()[("a", "affine", "")] is EndpointState.HEALTHY
    assert probes.set_drained("nope", True) is None


async def test_probe_unprobed_asks_only_what_the_table_just_added(
    probes: BackendProbes, clients: FakeProbeClients
) -> None:
    probes.sync(table_with(route("m", [(1, "affine", 100, [A])])).backends())
    await probes.probe_all()
    calls = clients.clients[A[1]].calls
    probes.sync(table_with(route("m", [(1, "affine", 100, [A])]), route("d", [(1, "digits", 100, [A])])).backends())
    assert probes.has_unprobed()
    await probes.probe_unprobed()
    assert clients.clients[A[1]].calls == calls + 2  # ServerReady + ModelReady(digits), not affine again
    assert probes.states()[("a", "digits", "")] is EndpointState.HEALTHY and not probes.has_unprobed()


async def test_removed_backends_are_forgotten_and_their_clients_closed(
    probes: BackendProbes, clients: FakeProbeClients
) -> None:
    probes.sync(table_with(route("m", [(1, "affine", 100, [A, B])])).backends())
    await probes.probe_all()
    probes.sync(table_with(route("m", [(1, "affine", 100, [A])])).backends())
    assert set(probes.backends) == {"a"} and ("b", "affine", "") not in probes.states()
    await probes.close()
    assert clients.clients[A[1]].closed


async def test_backends_registered_by_dns_name_resolve_for_eds_and_a_change_is_heard(
    probes: BackendProbes, clients: FakeProbeClients
) -> None:
    # How a Kubernetes StatefulSet's Tritons register: a DNS name, which Envoy's EDS cannot take.
    named = ("t0", "localhost:8001", "localhost:8000")
    probes.sync(table_with(route("m", [(1, "affine", 100, [named])])).backends())
    heard: list[int] = []
    probes.on_change(lambda: heard.append(1))
    assert probes.resolve("localhost") is None  # not probed yet: nothing to tell Envoy
    await probes.probe_all()
    assert probes.resolve("localhost") in ("127.0.0.1", "::1")
    assert heard, "the resolved address must trigger a new snapshot"


async def test_a_backend_whose_connection_drops_is_probed_at_once_not_at_the_next_tick(
    clients: FakeProbeClients,
) -> None:
    probes = BackendProbes(unit_settings(probe_interval_s=3600), clients)
    probes.sync(table_with(route("m", [(1, "affine", 100, [A, B])])).backends())
    await probes.start()
    try:
        assert probes.states()[("a", "affine", "")] is EndpointState.HEALTHY
        clients.clients[A[1]].server = False  # Triton exits: its connection drops
        clients.clients[A[1]].lost.set()
        await wait_until(lambda: probes.states()[("a", "affine", "")] is EndpointState.UNHEALTHY, timeout_s=2)
        assert probes.states()[("b", "affine", "")] is EndpointState.HEALTHY
    finally:
        await probes.close()
