"""Composition root of the gateway: the public API in front of the data plane (Envoy) and the registry."""

from __future__ import annotations

from google.protobuf import descriptor_pool
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

# Imported for their descriptors: the gateway answers reflection for Envoy's whole public port (the
# public routes send /grpc.reflection.* here), so it describes every service those routes reach.
from servegrid.registry.v1 import registry_pb2  # noqa: F401
from servegrid.router.v1 import router_admin_pb2  # noqa: F401
from tritonclient.grpc import service_pb2  # noqa: F401

from services.gateway.batch import BatchForwarder
from services.gateway.catalog import ModelCatalog
from services.gateway.identity import IdentityPolicy
from services.gateway.servicer import GatewayServicer
from services.gateway.settings import GatewaySettings
from services.gateway.upstream import KServeClient, RegistryClient
from services.mesh.names import PUBLIC_GRPC_SERVICES
from services.runtime import ServiceApp

SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name


def public_services() -> tuple[str, ...]:
    """What reflection through Envoy lists: every service the public port routes, each checked to be
    describable here (a KeyError at startup names one whose generated module is not imported)."""
    pool = descriptor_pool.Default()
    for name in PUBLIC_GRPC_SERVICES:
        pool.FindServiceByName(name)
    return PUBLIC_GRPC_SERVICES


def build_app(settings: GatewaySettings) -> ServiceApp:
    app = ServiceApp("gateway", settings)
    app.reflect(public_services())
    tls = settings.tls
    identity = IdentityPolicy(mtls=tls is not None, trusted_peers=frozenset(settings.identity_peers))

    async def make_servicer() -> GatewayServicer:
        # On the serving loop: the clients open their grpc.aio channels here.
        identity.warn_if_open()
        inference = KServeClient(settings.inference_address, tls)
        registry = RegistryClient(settings.registry_address, settings.registry_timeout_s, tls)
        catalog = ModelCatalog(registry, inference, settings.max_page_size, settings.registry_timeout_s)
        batch = BatchForwarder(settings.batch_address, settings.default_timeout_s, tls)

        async def close() -> None:
            await inference.close()
            await registry.close()
            await batch.close()

        app.on_shutdown(close)
        return GatewayServicer(inference, catalog, settings.default_timeout_s, batch, identity)

    # Infer is the hot path: it skips the runtime's per-call metrics wrapper (it maps its own errors
    # through runtime.errors.status_for), which saves a noticeable share of a small request's CPU.
    app.add_servicer(
        gateway_pb2_grpc.add_GatewayServiceServicer_to_server,
        make_servicer,
        SERVICE,
        passthrough_methods=[f"/{SERVICE}/Infer"],
    )
    return app
