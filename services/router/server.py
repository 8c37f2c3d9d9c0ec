"""Composition root of the router, Envoy's control plane: table, registry watch, probes, xDS, admin, shadow."""

# Data flow: the registry's WatchRoutes (or a routes file) fills the RouteTable; the probes follow the
# table's backends; any change to either asks the SnapshotPublisher for a new snapshot, which
# services.mesh builds and the AdsServer pushes to every Envoy on this same port. Inference never
# passes through here: the only KServe call the router answers is ModelInfer from Envoy's shadow
# mirror (services/router/shadow.py).

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from envoy.service.discovery.v3 import ads_pb2, ads_pb2_grpc
from servegrid.router.v1 import router_admin_pb2, router_admin_pb2_grpc

from services.mesh.names import KSERVE_SERVICE
from services.router import metrics
from services.router.admin import RouterAdmin
from services.router.backends import BackendProbes, EndpointStates, ProbeClientFactory
from services.router.publisher import SnapshotPublisher
from services.router.settings import RouterSettings
from services.router.shadow import MODEL_INFER, ShadowComparator
from services.router.table import RouteTable, load_routes_file
from services.router.watch import RegistryWatcher
from services.router.xds import AdsServer, XdsSnapshot
from services.runtime.server import ServiceApp

ADMIN_SERVICE = router_admin_pb2.DESCRIPTOR.services_by_name["RouterAdminService"].full_name
ADS_SERVICE = ads_pb2.DESCRIPTOR.services_by_name["AggregatedDiscoveryService"].full_name

SnapshotBuilder = Callable[[RouteTable, EndpointStates, RouterSettings], XdsSnapshot]


@dataclass
class Router:
    """The router's parts, for tests and tools that need to look inside a running replica."""

    app: ServiceApp
    table: RouteTable
    probes: BackendProbes
    ads: AdsServer
    publisher: SnapshotPublisher
    shadow: ShadowComparator
    watcher: RegistryWatcher | None


def _mesh_builder(probes: BackendProbes) -> SnapshotBuilder:
    from services.mesh.resources import build_snapshot

    def build(table: RouteTable, endpoints: EndpointStates, settings: RouterSettings) -> XdsSnapshot:
        # Backends registered by DNS name go to Envoy as the addresses the probes resolved.
        return build_snapshot(table, endpoints, settings, resolve=probes.resolve)

    return build


def build_router(
    settings: RouterSettings,
    *,
    build_snapshot: SnapshotBuilder | None = None,
    probe_clients: ProbeClientFactory | None = None,
) -> Router:
    """`build_snapshot` and `probe_clients` replace services.mesh and the gRPC probes in unit tests."""
    app = ServiceApp("router", settings)
    table = RouteTable()
    probes = BackendProbes(settings, probe_clients)
    ads = AdsServer()

    def build() -> XdsSnapshot:
        builder = build_snapshot or _mesh_builder(probes)
        return builder(table, probes.states(), settings)

    publisher = SnapshotPublisher(
        build,
        ads.set_snapshot,
        # Never publish before a table is loaded: an Envoy reconnecting to a fresh replica keeps its config.
        ready=lambda: table.loaded,
        prepare=probes.probe_unprobed,
        coalesce_s=settings.snapshot_coalesce_s,
    )

    def table_changed() -> None:
        probes.sync(table.backends())
        metrics.TABLE_REVISION.set(table.revision)
        publisher.request()

    table.on_change(table_changed)
    probes.on_change(publisher.request)
    shadow = ShadowComparator(table, settings)
    watcher = None
    if settings.registry_address:
        watcher = RegistryWatcher(
            settings.registry_address,
            table,
            watcher=settings.watcher_name,
            backoff_initial_s=settings.registry_backoff_initial_s,
            backoff_max_s=settings.registry_backoff_max_s,
            tls=settings.tls,
        )

    app.add_servicer(ads_pb2_grpc.add_AggregatedDiscoveryServiceServicer_to_server, ads, ADS_SERVICE)
    app.add_servicer(
        router_admin_pb2_grpc.add_RouterAdminServiceServicer_to_server,
        RouterAdmin(table, probes, publisher, ads, watcher, settings.drain_timeout_s),
        ADMIN_SERVICE,
    )
    # Mirrors are answered with an empty OK at once; the comparison records its own metrics.
    app.add_generic_handler(shadow.handler(), KSERVE_SERVICE, passthrough_methods=[MODEL_INFER])
    # Optional components: none of them stops the router serving the snapshot it has. A NACKed
    # snapshot shows here (Envoys keep the one before), as do probes that all fail and a registry outage.
    app.health.add_component("backends", probes.check, required=False)
    app.health.add_component("xds", ads.check, required=False)
    app.health.add_component("snapshot", publisher.check, required=False)

    async def start() -> None:
        # Channels and tasks belong to the running loop, so the static table is loaded here, not at build time.
        if settings.routes_file is not None:
            table.apply_watch(load_routes_file(settings.routes_file))
        await probes.start()
        await publisher.flush()
        if watcher is not None:
            await watcher.start()

    app.on_startup(start)
    # ADS streams never end on their own: end them first so Envoys reconnect (to another replica) at once.
    app.on_drain(ads.close)
    app.on_shutdown(probes.close)
    app.on_shutdown(publisher.close)
    app.on_shutdown(shadow.close)
    if watcher is not None:
        app.health.add_component("registry", watcher.check, required=False)
        app.on_shutdown(watcher.close)
    return Router(app, table, probes, ads, publisher, shadow, watcher)


def build_app(settings: RouterSettings) -> ServiceApp:
    return build_router(settings).app
