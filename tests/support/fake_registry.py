"""A stand-in registry serving a fixed catalogue (ListModels, GetModel, ResolveRoute) for gateway tests."""

# The real registry (services/registry) needs its own schema and Triton loads; the gateway only
# reads three RPCs, so its tests run against this small, fixed implementation of the same contract.

from __future__ import annotations

import grpc
from pydantic_settings import SettingsConfigDict
from servegrid.registry.v1 import registry_pb2 as pb
from servegrid.registry.v1 import registry_pb2_grpc as pb_grpc

from services.runtime import InvalidArgument, NotFound, ServiceApp, ServiceSettings

SERVICE = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name
# model id → (task, description); every model has version 1 in PRODUCTION taking all traffic,
# except "draft-only", which exists but has nothing servable.
CATALOGUE = {
    "affine": ("regression", "y = 2x + 1 on FP32[4]"),
    "digits": ("image-classification", "8x8 handwritten digits"),
    "draft-only": ("image-classification", "registered, nothing promoted yet"),
}


class FakeRegistrySettings(ServiceSettings):
    model_config = SettingsConfigDict(env_prefix="SERVEGRID_FAKE_REGISTRY_", extra="ignore", frozen=True)


def _model(model_id: str) -> pb.Model:
    task, description = CATALOGUE[model_id]
    return pb.Model(name=f"models/{model_id}", model_id=model_id, task=task, description=description)


class FakeRegistry(pb_grpc.RegistryServiceServicer):
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        if request.page_size < 0:
            raise InvalidArgument("page_size must be >= 0")
        ids = sorted(CATALOGUE)
        start = int(request.page_token or 0)
        size = request.page_size or 50
        page = ids[start : start + size]
        token = str(start + size) if start + size < len(ids) else ""
        return pb.ListModelsResponse(models=[_model(m) for m in page], next_page_token=token)

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        if request.model_id not in CATALOGUE:
            raise NotFound(f"model {request.model_id!r} not found", reason="MODEL_NOT_FOUND")
        return pb.GetModelResponse(model=_model(request.model_id))

    async def ResolveRoute(
        self, request: pb.ResolveRouteRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveRouteResponse:
        if request.model_id not in CATALOGUE:
            raise NotFound(f"model {request.model_id!r} not found", reason="MODEL_NOT_FOUND")
        if request.model_id == "draft-only":
            raise NotFound(f"model {request.model_id!r} has no servable version", reason="NO_SERVABLE_VERSION")
        version = pb.RouteVersion(version=1, stage=pb.STAGE_PRODUCTION, triton_model_name=request.model_id, weight=100)
        return pb.ResolveRouteResponse(route=pb.Route(model_id=request.model_id, versions=[version]), revision=1)


def build_app(settings: ServiceSettings) -> ServiceApp:
    app = ServiceApp("fake-registry", settings)
    # Only the read RPCs the gateway uses are implemented; the rest answer UNIMPLEMENTED.
    app.add_servicer(pb_grpc.add_RegistryServiceServicer_to_server, FakeRegistry(), SERVICE)  # type: ignore[abstract]
    return app


if __name__ == "__main__":
    build_app(FakeRegistrySettings()).run()
