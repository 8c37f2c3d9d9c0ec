"""A small service built on the runtime, used to prove the runtime's behaviour in tests.

It implements the router admin contract with canned data: "missing" backends raise a domain
error, "boom" raises an unexpected one, and draining "slow" takes `SLOW_SECONDS`, so a test can
catch a call in flight during shutdown.
"""

from __future__ import annotations

import asyncio
import logging

import grpc
from pydantic_settings import SettingsConfigDict
from servegrid.router.v1 import router_admin_pb2 as pb
from servegrid.router.v1 import router_admin_pb2_grpc as pb_grpc

from services.runtime import NotFound, ServiceApp, ServiceSettings

SLOW_SECONDS = 1.5
SLOW_STARTED = "demo slow drain started"  # logged when a slow call is in the handler
log = logging.getLogger(__name__)
SERVICE = pb.DESCRIPTOR.services_by_name["RouterAdminService"].full_name


class DemoSettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEGRID_DEMO_", extra="ignore", frozen=True)


class DemoRouterAdmin(pb_grpc.RouterAdminServiceServicer):
    async def ListBackends(
        self, request: pb.ListBackendsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBackendsResponse:
        return pb.ListBackendsResponse(backends=[pb.BackendStatus(backend_id="triton-a", address="127.0.0.1:8001")])

    async def DrainBackend(
        self, request: pb.DrainBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.DrainBackendResponse:
        if request.backend_id == "boom":
            raise RuntimeError("secret internal detail")
        if request.backend_id == "slow":
            log.info(SLOW_STARTED)
            await asyncio.sleep(SLOW_SECONDS)
            return pb.DrainBackendResponse(backend=pb.BackendStatus(backend_id="slow", drained=True))
        raise NotFound(
            f"backend {request.backend_id!r} is not known to this router",
            reason="BACKEND_NOT_FOUND",
            metadata={"backend_id": request.backend_id},
        )

    async def UndrainBackend(
        self, request: pb.UndrainBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.UndrainBackendResponse:
        return pb.UndrainBackendResponse(backend=pb.BackendStatus(backend_id=request.backend_id))

    async def GetRouteTable(
        self, request: pb.GetRouteTableRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetRouteTableResponse:
        return pb.GetRouteTableResponse()


def build_app(settings: ServiceSettings) -> ServiceApp:
    app = ServiceApp("demo", settings)
    app.add_servicer(pb_grpc.add_RouterAdminServiceServicer_to_server, DemoRouterAdmin(), SERVICE)

    async def always_up() -> None:
        return None

    app.health.add_component("backends", always_up)
    return app


if __name__ == "__main__":
    build_app(DemoSettings()).run()
