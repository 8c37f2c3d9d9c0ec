"""Composition root of the router: table, backend pool, forwarder, shadow, registry watch, admin API."""

from __future__ import annotations

from dataclasses import dataclass

from servegrid.router.v1 import router_admin_pb2, router_admin_pb2_grpc

from services.router import metrics
from services.router.admin import RouterAdmin
from services.router.backends import BackendPool
from services.router.forwarder import SERVICE, InferenceForwarder
from services.router.settings import RouterSettings
from services.router.shadow import ShadowMirror
from services.router.table import RouteTable, load_routes_file
from services.router.watch import RegistryWatcher
from services.runtime.server import ServiceApp

ADMIN_SERVICE = router_admin_pb2.DESCRIPTOR.services_by_name["RouterAdminService"].full_name


@dataclass
class Router:
    """The router's parts, for tests and tools that need to look inside a running replica."""

    app: ServiceApp
    table: RouteTable
    pool: BackendPool
    forwarder: InferenceForwarder
    shadow: ShadowMirror
    watcher: RegistryWatcher | None


def build_router(settings: RouterSettings) -> Router:
    app = ServiceApp("router", settings)
    table = RouteTable()
    pool = BackendPool(settings)

    def table_changed() -> None:
        pool.sync(table.backends())
        metrics.TABLE_REVISION.set(table.revision)

    table.on_change(table_changed)
    shadow = ShadowMirror(pool, settings.shadow_max_in_flight, settings.default_timeout_s)
    forwarder = InferenceForwarder(table, pool, settings, shadow)
    watcher = None
    if settings.registry_address:
        watcher = RegistryWatcher(
            settings.registry_address,
            table,
            watcher=settings.watcher_name,
            backoff_initial_s=settings.registry_backoff_initial_s,
            backoff_max_s=settings.registry_backoff_max_s,
        )

    # ModelInfer aborts with domain statuses and records per model/version/backend metrics itself;
    # the generic interceptor would add ~10% CPU per call for metrics we already have.
    app.add_generic_handler(forwarder.handler(), SERVICE, passthrough_methods=[f"/{SERVICE}/ModelInfer"])
    app.add_servicer(
        router_admin_pb2_grpc.add_RouterAdminServiceServicer_to_server, RouterAdmin(table, pool, watcher), ADMIN_SERVICE
    )
    # Optional components: a router with no healthy backend still answers every call (UNAVAILABLE
    # naming the model), and a registry outage only freezes the table; neither takes it out.
    app.health.add_component("backends", pool.check, required=False)

    async def start() -> None:
        # Channels belong to the running loop, so the static table is loaded here, not at build time.
        if settings.routes_file is not None:
            table.apply_watch(load_routes_file(settings.routes_file))
        await pool.start()
        if watcher is not None:
            await watcher.start()

    app.on_startup(start)
    app.on_shutdown(pool.close)
    app.on_shutdown(shadow.close)
    if watcher is not None:
        app.health.add_component("registry", watcher.check, required=False)
        app.on_shutdown(watcher.close)
    return Router(app, table, pool, forwarder, shadow, watcher)


def build_app(settings: RouterSettings) -> ServiceApp:
    return build_router(settings).app
