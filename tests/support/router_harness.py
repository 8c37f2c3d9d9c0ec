"""Test helpers for the router: fakes for unit tests, and the shared start-up of router + Envoy + Tritons."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from google.protobuf import json_format
from servegrid.registry.v1 import registry_pb2 as rpb

from services.router.backends import EndpointStates
from services.router.server import Router, SnapshotBuilder, build_router
from services.router.settings import RouterSettings
from services.router.table import RouteTable
from services.router.xds import TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_ROUTE, XdsSnapshot

T = TypeVar("T")


# ---- unit-test fakes ---------------------------------------------------------------------------


@dataclass
class FakeProbeClient:
    """A backend's readiness as the test sets it: `server` answers ServerReady, `models` ModelReady."""

    address: str
    server: bool = True
    models: dict[tuple[str, str], bool] = field(default_factory=dict)
    default_model_ready: bool = True
    calls: int = 0
    closed: bool = False
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # set it: the connection drops

    async def server_ready(self, timeout_s: float) -> bool:
        self.calls += 1
        return self.server

    async def model_ready(self, name: str, version: str, timeout_s: float) -> bool:
        self.calls += 1
        return self.models.get((name, version), self.default_model_ready)

    async def connection_lost(self) -> None:
        await self.lost.wait()
        self.lost.clear()

    async def close(self) -> None:
        self.closed = True


class FakeProbeClients:
    """The probe-client factory for BackendProbes: one FakeProbeClient per address, kept for the test to steer."""

    def __init__(self) -> None:
        self.clients: dict[str, FakeProbeClient] = {}

    def __call__(self, address: str) -> FakeProbeClient:
        return self.clients.setdefault(address, FakeProbeClient(address))


def endpoint_name(backend_id: str, triton_model: str, triton_version: str) -> str:
    return f"{backend_id}/{triton_model}/{triton_version or 'latest'}"


def fake_snapshot(table: RouteTable, endpoints: EndpointStates, settings: RouterSettings) -> XdsSnapshot:
    """A stand-in for services.mesh.resources.build_snapshot: one ClusterLoadAssignment per endpoint key,
    whose single endpoint carries the state as its health status (the numbers are Envoy's)."""
    assignments = {}
    for (backend_id, name, version), state in endpoints.items():
        key = endpoint_name(backend_id, name, version)
        assignments[key] = endpoint_pb2.ClusterLoadAssignment(
            cluster_name=key,
            endpoints=[
                endpoint_components_pb2.LocalityLbEndpoints(
                    lb_endpoints=[endpoint_components_pb2.LbEndpoint(health_status=int(state))]
                )
            ],
        )
    return XdsSnapshot.build(table.revision, {TYPE_ENDPOINT: assignments})


def snapshot_states(snapshot: XdsSnapshot) -> dict[str, int]:
    """endpoint name -> health status, read back from a fake_snapshot."""
    out = {}
    for name, message in snapshot.resources[TYPE_ENDPOINT].items():
        assert isinstance(message, endpoint_pb2.ClusterLoadAssignment)
        out[name] = int(message.endpoints[0].lb_endpoints[0].health_status)
    return out


def unit_settings(**overrides: Any) -> RouterSettings:
    base: dict[str, Any] = {
        "port": 0,
        "metrics_port": None,
        "use_uvloop": False,
        "grace_period_s": 0.1,
        "health_interval_s": 0.05,
        "probe_interval_s": 0.05,
        "probe_timeout_s": 0.2,
        "snapshot_coalesce_s": 0.002,
    }
    base.update(overrides)
    return RouterSettings(**base)


# ---- the router on a thread of its own ---------------------------------------------------------


class RouterThread:
    """A router serving from a background thread's event loop.

    Its own loop lets blocking clients and the test's loop call it, and lets a test stop the router
    (as a crash would) while the Envoy it configured keeps serving.
    """

    def __init__(self, settings: RouterSettings, *, build_snapshot: SnapshotBuilder | None = None) -> None:
        self.settings = settings
        self.build_snapshot = build_snapshot
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="router", daemon=True)
        self.router: Router

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run on the router's loop from another loop without blocking that loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self.loop))

    def start(self) -> RouterThread:
        self._thread.start()

        async def build() -> Router:
            router = build_router(self.settings, build_snapshot=self.build_snapshot)
            await router.app.start()
            return router

        self.router = self.run(build())
        return self

    @property
    def port(self) -> int:
        assert self.router.app.port is not None
        return self.router.app.port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def push(self, message: rpb.WatchRoutesResponse) -> None:
        """Apply a table change on the router's loop, as the registry stream would, and wait for its snapshot."""

        async def apply() -> None:
            self.router.table.apply_watch(message)
            await self.router.publisher.flush()

        self.run(apply())

    def stop(self) -> None:
        """Drain and stop the router and its loop; a second call does nothing."""
        if not self._thread.is_alive():
            return
        try:
            self.run(self.router.app.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)


def write_routes(path: Path, routes: Sequence[rpb.Route], revision: int = 1) -> Path:
    path.write_text(json_format.MessageToJson(rpb.WatchRoutesResponse(reset=True, routes=routes, revision=revision)))
    return path


Backends = Sequence[tuple[str, str] | tuple[str, str, str]]  # (backend id, gRPC address[, HTTP address])


def route(
    model_id: str,
    versions: Sequence[tuple[int, str, int, Backends]],
    *,
    load_balancing: int = 0,
    sticky_header: str = "",
    shadow: tuple[int, str, Backends, float] | None = None,
) -> rpb.Route:
    """A Route from (version, triton model, weight, [(backend id, address[, http address])]) tuples."""

    def backend(spec: tuple[str, str] | tuple[str, str, str]) -> rpb.RouteBackend:
        http = spec[2] if len(spec) > 2 else ""
        return rpb.RouteBackend(backend_id=spec[0], address=spec[1], weight=1, http_address=http)

    def version(number: int, triton: str, weight: int, backends: Backends) -> rpb.RouteVersion:
        return rpb.RouteVersion(
            version=number,
            stage=rpb.STAGE_PRODUCTION if weight else rpb.STAGE_STAGING,
            triton_model_name=triton,
            weight=weight,
            backends=[backend(b) for b in backends],
        )

    message = rpb.Route(
        model_id=model_id,
        versions=[version(*v) for v in versions],
        load_balancing=load_balancing,  # type: ignore[arg-type]
        sticky_header=sticky_header,
    )
    if shadow is not None:
        number, triton, backends, rate = shadow
        message.shadow.target.CopyFrom(version(number, triton, 0, backends))
        message.shadow.sample_rate = rate
    return message


class FakeRegistry:
    """WatchRoutes only: the whole table first (reset), then whatever the test pushes."""

    def __init__(self, routes: Sequence[rpb.Route]) -> None:
        self.routes = list(routes)
        self.revision = 1
        self.watchers = 0
        self._queues: list[asyncio.Queue[rpb.WatchRoutesResponse]] = []
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def WatchRoutes(self, request: rpb.WatchRoutesRequest, context: grpc.aio.ServicerContext) -> Any:
        queue: asyncio.Queue[rpb.WatchRoutesResponse] = asyncio.Queue()
        self._queues.append(queue)
        self.watchers += 1
        try:
            yield rpb.WatchRoutesResponse(reset=True, routes=self.routes, revision=self.revision)
            while True:
                yield await queue.get()
        finally:
            self._queues.remove(queue)

    def push(self, upserts: Sequence[rpb.Route] = (), removed: Sequence[str] = ()) -> None:
        self.revision += 1
        by_id = {r.model_id: r for r in self.routes}
        by_id.update({r.model_id: r for r in upserts})
        for model_id in removed:
            by_id.pop(model_id, None)
        self.routes = list(by_id.values())
        change = rpb.WatchRoutesResponse(routes=upserts, removed_model_ids=removed, revision=self.revision)
        for queue in self._queues:
            queue.put_nowait(change)

    async def start(self, port: int = 0) -> FakeRegistry:
        self._server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        handler = grpc.method_handlers_generic_handler(
            "servegrid.registry.v1.RegistryService",
            {
                "WatchRoutes": grpc.unary_stream_rpc_method_handler(
                    self.WatchRoutes,
                    request_deserializer=rpb.WatchRoutesRequest.FromString,
                    response_serializer=rpb.WatchRoutesResponse.SerializeToString,
                )
            },
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port(f"127.0.0.1:{port}")
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(None)


# ---- router + real Envoy (integration tests) -----------------------------------------------------


def start_mesh_envoy(
    state_dir: Path, xds_address: str | Sequence[str], *, node_id: str = "test-envoy", mesh_port: int = 0
) -> MeshEnvoy:
    """A real Envoy from services.mesh.bootstrap on free ports, its ADS pointing at `xds_address` (one
    router, or several replicas: the xds cluster's endpoints)."""
    from services.edge.devkeys import DevIssuer
    from services.mesh.bootstrap import EnvoyParams
    from services.stack.ports import free_port
    from tests.support.envoy import start_envoy

    jwks = DevIssuer.generate().write(state_dir / "jwt")  # the public listener's jwt_authn needs a JWKS
    mesh_port = mesh_port or free_port()
    params = EnvoyParams.for_profile("local", jwks_file=str(jwks), token_jwks_file=str(jwks))
    xds = (xds_address,) if isinstance(xds_address, str) else tuple(xds_address)
    envoy = start_envoy(state_dir, params, xds=xds, mesh_port=mesh_port, mesh_host="127.0.0.1", node_id=node_id)
    return MeshEnvoy(envoy, mesh_port, node_id)


@dataclass
class MeshEnvoy:
    """An Envoy under test: the process, its mesh listener (no auth) and its node id."""

    process: Any  # tests.support.envoy.EnvoyProcess
    mesh_port: int
    node_id: str

    @property
    def mesh_address(self) -> str:
        return f"127.0.0.1:{self.mesh_port}"

    @property
    def mesh_url(self) -> str:
        return f"http://127.0.0.1:{self.mesh_port}"

    def clusters(self) -> dict[str, dict[str, dict[str, str]]]:
        """Envoy's /clusters page: cluster -> host -> stat -> value (rq_total, health_flags, ...)."""
        import urllib.request

        url = f"http://127.0.0.1:{self.process.admin_port}/clusters"
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
        out: dict[str, dict[str, dict[str, str]]] = {}
        for line in text.splitlines():
            parts = line.split("::")
            if len(parts) == 4:
                cluster, host, stat, value = parts
                out.setdefault(cluster, {}).setdefault(host, {})[stat] = value
        return out

    def host_requests(self, cluster: str) -> dict[str, int]:
        """host -> requests Envoy sent it in `cluster` (0 for hosts it knows but never used)."""
        return {host: int(stats.get("rq_total", "0")) for host, stats in self.clusters().get(cluster, {}).items()}

    def cluster_requests(self, cluster: str) -> int:
        return sum(self.host_requests(cluster).values())

    def stop(self) -> None:
        self.process.stop()


class DataPlane:
    """A router (on its own loop thread) and the Envoys it configures, started together for a test module.

    The first Envoy's mesh port is chosen before the router starts, so the router's shadow comparisons
    (mesh_address) go through it."""

    def __init__(self, state_dir: Path, settings: RouterSettings) -> None:
        from services.stack.ports import free_port

        self.state_dir = state_dir
        self.mesh_port = free_port()
        self.settings = settings.model_copy(update={"mesh_address": f"127.0.0.1:{self.mesh_port}"})
        self.router = RouterThread(self.settings).start()
        self.envoys: list[MeshEnvoy] = []

    @property
    def envoy(self) -> MeshEnvoy:
        return self.envoys[0]

    def add_envoy(self, node_id: str = "test-envoy") -> MeshEnvoy:
        port = 0 if self.envoys else self.mesh_port
        envoy = start_mesh_envoy(self.state_dir / node_id, self.router.address, node_id=node_id, mesh_port=port)
        self.envoys.append(envoy)
        self.wait_synced()
        return envoy

    def wait_synced(self, timeout_s: float = 15.0) -> None:
        """Until every Envoy has ACKed the router's current snapshot (CDS, EDS, RDS: listeners are static)."""
        ads = self.router.router.ads

        async def synced() -> None:
            snapshot = ads.snapshot
            assert snapshot is not None, "the router has published no snapshot"
            wanted = {t: v for t, v in snapshot.versions.items() if t in (TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_ROUTE)}
            await ads.wait_acked(wanted, timeout_s=timeout_s, min_nodes=len(self.envoys))

        self.router.run(synced(), timeout=timeout_s + 5)

    def restart_router(self) -> None:
        """Stop the router (its Envoys keep their config) and start a fresh one on the same port."""
        port = self.router.port
        self.router.stop()
        self.router = RouterThread(self.settings.model_copy(update={"port": port})).start()

    def stop(self) -> None:
        for envoy in self.envoys:
            envoy.stop()
        self.router.stop()
