"""Composition root of the registry: builds the store, cache, hub and servicer onto a ServiceApp."""

from __future__ import annotations

from servegrid.registry.v1 import registry_pb2_grpc as pb_grpc

from services.registry.cache import RegistryCache
from services.registry.registry import ModelRegistry
from services.registry.servicer import SERVICE_NAME, RegistryServicer
from services.registry.settings import RegistrySettings
from services.registry.store import RegistryStore
from services.registry.triton_control import BackendModelControl, ModelLoader, TritonModelLoader
from services.registry.watch import RouteHub
from services.runtime.server import ServiceApp


def build_app(settings: RegistrySettings, *, loader: ModelLoader | None = None) -> ServiceApp:
    """The registry as a ServiceApp; `loader` replaces the Triton repository client (tests)."""
    store = RegistryStore(
        settings.database_url,
        settings.db_schema,
        min_size=settings.db_pool_min,
        max_size=settings.db_pool_max,
        pool_timeout_s=settings.db_pool_timeout_s,
        statement_timeout_s=settings.db_statement_timeout_s,
    )
    cache = RegistryCache(
        settings.redis_url,
        settings.redis_prefix,
        ttl_s=settings.cache_ttl_s,
        timeout_s=settings.cache_timeout_s,
        retry_after_s=settings.cache_retry_after_s,
    )
    control = BackendModelControl(loader or TritonModelLoader(load_timeout_s=settings.triton_load_timeout_s))
    registry = ModelRegistry(store, cache, control)
    hub = RouteHub(store, cache=cache, queue_size=settings.watch_queue_size, reconnect_s=settings.listen_reconnect_s)

    app = ServiceApp("registry", settings)
    app.add_servicer(pb_grpc.add_RegistryServiceServicer_to_server, RegistryServicer(registry, hub), SERVICE_NAME)
    app.health.add_component("database", store.ping)
    app.health.add_component("cache", cache.ping, required=False, timeout_s=max(0.5, settings.cache_timeout_s * 5))
    # Startup: migrate and open the pool, then LISTEN, all before the port opens.
    app.on_startup(store.open)
    app.on_startup(hub.start)
    # WatchRoutes streams never end by themselves: close them as soon as draining starts, so
    # shutdown does not wait out the grace period. The pool and cache close after calls drain.
    app.on_drain(hub.stop)
    app.on_shutdown(store.close)
    app.on_shutdown(cache.close)
    return app
