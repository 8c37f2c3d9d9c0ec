"""Two router replicas behind one xds cluster: identical snapshots, a change everywhere within a second, and
an Envoy whose router stops moves to the other replica keeping its config and every request."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
import numpy as np
import pytest
from servegrid.registry.v1 import registry_pb2 as rpb
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.router.settings import RouterSettings
from services.router.xds import TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_ROUTE, NodeState, XdsSnapshot, short_name
from services.stack.triton import TritonInstance
from tests.support.polling import wait_for
from tests.support.router_harness import FakeRegistry, MeshEnvoy, RouterThread, route, start_mesh_envoy

pytestmark = pytest.mark.integration

T = TypeVar("T")
MODEL = "replicated"  # two versions, both Triton's affine; the reply's model_version says which one ran
X = np.arange(4, dtype=np.float32)
DYNAMIC = (TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_ROUTE)  # listeners are static in the bootstrap
RDS_VERSION = "http.mesh.rds.mesh.version_text"  # Envoy's own view of the mesh route config


class RegistryThread:
    """The harness's FakeRegistry on an event loop of its own, so sync tests can push table changes."""

    def __init__(self, routes: Sequence[rpb.Route]) -> None:
        self.registry = FakeRegistry(routes)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-registry", daemon=True)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def start(self) -> RegistryThread:
        self._thread.start()
        self._run(self.registry.start())
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.registry.port}"

    @property
    def revision(self) -> int:
        return self.registry.revision

    def push(self, routes: Sequence[rpb.Route]) -> None:
        async def push() -> None:
            self.registry.push(routes)  # its queues belong to this loop

        self._run(push())

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                self._run(self.registry.stop())
            finally:
                self.loop.call_soon_threadsafe(self.loop.stop)
                self._thread.join(10)


def table(triton: TritonInstance, weights: tuple[int, int]) -> list[rpb.Route]:
    backends = [("t", triton.grpc_address, triton.http_address)]
    return [route(MODEL, [(1, "affine", weights[0], backends), (2, "affine", weights[1], backends)])]


def nodes(router: RouterThread) -> list[NodeState]:
    async def read() -> list[NodeState]:  # on the router's loop: its streams change there
        return router.router.ads.nodes()

    return router.run(read(), timeout=5)


def envoy_versions(envoy: MeshEnvoy) -> dict[str, str]:
    """Envoy's text readouts `*.version_text`: what it holds per subscription, whoever sent it."""
    url = f"http://127.0.0.1:{envoy.process.admin_port}/stats?filter=version_text$"
    with urllib.request.urlopen(url, timeout=5) as reply:
        lines = reply.read().decode().splitlines()
    return {name: value.strip().strip('"') for name, _, value in (line.partition(": ") for line in lines)}


def revision_of(version: str) -> int:
    return int(version.split(".", 1)[0])


@dataclass
class Replicas:
    triton: TritonInstance
    registry: RegistryThread
    routers: list[RouterThread]
    envoys: list[MeshEnvoy]
    weights: tuple[int, int] = (100, 0)

    def live(self) -> list[RouterThread]:
        return [r for r in self.routers if r.loop.is_running()]

    def agreed_snapshot(self) -> XdsSnapshot | None:
        """The snapshot every live replica serves for the registry's current revision, once they agree."""
        snapshots = [r.router.ads.snapshot for r in self.live()]
        if any(s is None or s.revision != self.registry.revision for s in snapshots):
            return None
        first = snapshots[0]
        assert first is not None
        return first if all(s is not None and s.versions == first.versions for s in snapshots) else None

    def wait_agreed(self, timeout_s: float = 10.0) -> XdsSnapshot:
        wait_for(lambda: self.agreed_snapshot() is not None, timeout_s, poll_s=0.005)
        snapshot = self.agreed_snapshot()
        assert snapshot is not None
        return snapshot

    def connections(self) -> dict[str, tuple[int, NodeState]]:
        """node id -> (index of the replica its ADS stream is on, that stream's state)."""
        out: dict[str, tuple[int, NodeState]] = {}
        for index, router in enumerate(self.routers):
            if router.loop.is_running():
                out.update({node.node_id: (index, node) for node in nodes(router)})
        return out

    def all_acked(self, snapshot: XdsSnapshot) -> bool:
        wanted = {short_name(t): snapshot.versions[t] for t in DYNAMIC}
        held = self.connections()
        return all(
            e.node_id in held and {k: held[e.node_id][1].acked.get(k) for k in wanted} == wanted for e in self.envoys
        )

    def flip(self) -> tuple[int, int]:
        """Move all default traffic to the other version (a registry revision bump); returns the new weights."""
        self.weights = (self.weights[1], self.weights[0])
        self.registry.push(table(self.triton, self.weights))
        return self.weights


def serving_version(weights: tuple[int, int]) -> str:
    return "1" if weights[0] else "2"


def infer_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="x", datatype="FP32", shape=[4])
    request.raw_input_contents.append(X.tobytes())
    return request


def answering_version(envoy: MeshEnvoy) -> str:
    with grpc.insecure_channel(envoy.mesh_address) as channel:
        reply = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(infer_request(), timeout=5)
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), 2 * X + 1)
    return str(reply.model_version)


@pytest.fixture(scope="module")
def replicas(triton: TritonInstance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    state = tmp_path_factory.mktemp("mesh-replicas")
    registry = RegistryThread(table(triton, (100, 0))).start()
    plane = Replicas(triton, registry, [], [])
    try:
        for name in ("router-a", "router-b"):
            settings = RouterSettings(
                port=0,
                metrics_port=None,
                use_uvloop=False,
                grace_period_s=0.2,
                probe_interval_s=0.25,
                registry_address=registry.address,
                registry_backoff_initial_s=0.05,
                registry_backoff_max_s=0.2,
                watcher_name=name,
            )
            plane.routers.append(RouterThread(settings).start())
        plane.wait_agreed()
        xds = [r.address for r in plane.routers]
        for node_id in ("envoy-a", "envoy-b"):
            plane.envoys.append(start_mesh_envoy(state / node_id, xds, node_id=node_id))
        wait_for(lambda: plane.all_acked(plane.wait_agreed()), timeout_s=15)
        yield plane
    finally:
        for envoy in plane.envoys:
            envoy.stop()
        for router in plane.routers:
            router.stop()
        registry.stop()


def test_replicas_serve_identical_versions_and_every_envoy_acks_them(replicas: Replicas) -> None:
    snapshot = replicas.wait_agreed()
    versions = [r.router.ads.snapshot.versions for r in replicas.routers if r.router.ads.snapshot is not None]
    assert len(versions) == 2 and versions[0] == versions[1]
    assert all(revision_of(v) == replicas.registry.revision for v in snapshot.versions.values())
    held = replicas.connections()
    assert set(held) == {"envoy-a", "envoy-b"}, held
    for index, node in held.values():
        assert node.in_sync, (index, node)
        assert node.acked == {short_name(t): v for t, v in snapshot.versions.items() if t in DYNAMIC}, node
    for envoy in replicas.envoys:
        assert envoy_versions(envoy)[RDS_VERSION] == snapshot.versions[TYPE_ROUTE]
        assert answering_version(envoy) == serving_version(replicas.weights)


def test_a_table_change_reaches_both_envoys_within_a_second(replicas: Replicas) -> None:
    before = replicas.wait_agreed()
    started = time.monotonic()
    weights = replicas.flip()
    after = replicas.wait_agreed()
    wanted = after.versions[TYPE_ROUTE]
    elapsed = wait_for(
        lambda: all(envoy_versions(e)[RDS_VERSION] == wanted for e in replicas.envoys), timeout_s=5, poll_s=0.01
    )
    took = time.monotonic() - started
    assert took < 1.0, f"the change took {took:.3f}s to reach both Envoys ({elapsed:.3f}s after the snapshot)"
    assert revision_of(wanted) > revision_of(before.versions[TYPE_ROUTE])
    for envoy in replicas.envoys:
        assert answering_version(envoy) == serving_version(weights)
    wait_for(lambda: replicas.all_acked(after), timeout_s=5)


class Load:
    """One caller through an Envoy's mesh listener, bounded in calls and time; every error is kept."""

    def __init__(self, envoy: MeshEnvoy, max_calls: int = 5000, max_s: float = 20.0) -> None:
        self.envoy, self.max_calls, self.max_s = envoy, max_calls, max_s
        self.calls = 0
        self.errors: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="load", daemon=True)

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_s
        with grpc.insecure_channel(self.envoy.mesh_address) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            request = infer_request()
            while not self._stop.is_set() and self.calls < self.max_calls and time.monotonic() < deadline:
                try:
                    self.versions.add(stub.ModelInfer(request, timeout=5).model_version)
                except grpc.RpcError as error:
                    self.errors.append(f"{error.code()}: {error.details()}")
                self.calls += 1

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def test_an_envoy_whose_router_stops_moves_to_the_other_replica_and_keeps_serving(replicas: Replicas) -> None:
    envoy = replicas.envoys[0]
    snapshot = replicas.wait_agreed()
    wait_for(lambda: replicas.all_acked(snapshot), timeout_s=5)
    victim, _ = replicas.connections()[envoy.node_id]
    survivor = 1 - victim
    held_before = envoy_versions(envoy)
    seen: list[dict[str, str]] = []

    def moved() -> bool:
        seen.append(envoy_versions(envoy))
        connection = replicas.connections().get(envoy.node_id)
        return connection is not None and connection[0] == survivor and connection[1].in_sync

    with Load(envoy) as load:
        wait_for(lambda: load.calls >= 20, timeout_s=5, poll_s=0.01)
        replicas.routers[victim].stop()
        switch_s = wait_for(moved, timeout_s=10, poll_s=0.02)
        after_switch = load.calls
        wait_for(lambda: load.calls >= after_switch + 50 or not load.running, timeout_s=5, poll_s=0.01)
    assert not load.errors, load.errors[:5]
    assert load.calls > after_switch and load.versions == {serving_version(replicas.weights)}, load.versions
    # Never backwards, and in fact unchanged: the survivor serves the very versions Envoy held.
    assert all(sample == held_before for sample in seen), (held_before, seen[-1], f"switched in {switch_s:.2f}s")
    (_, node) = replicas.connections()[envoy.node_id]
    assert node.acked == {short_name(t): v for t, v in snapshot.versions.items() if t in DYNAMIC}

    # A later policy change applies through the survivor alone, to every Envoy (all on it now).
    weights = replicas.flip()
    after = replicas.wait_agreed()
    wait_for(lambda: replicas.all_acked(after), timeout_s=5, poll_s=0.01)
    assert {i for i, _ in replicas.connections().values()} == {survivor}
    for each in replicas.envoys:
        assert revision_of(envoy_versions(each)[RDS_VERSION]) == replicas.registry.revision
        assert answering_version(each) == serving_version(weights)
