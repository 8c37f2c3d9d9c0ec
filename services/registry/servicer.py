"""RegistryService over gRPC: converts protobuf to domain types and back, and nothing else."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp
from servegrid.registry.v1 import registry_pb2 as pb
from servegrid.registry.v1 import registry_pb2_grpc as pb_grpc

from services.mesh.names import SUBJECT_HEADER
from services.registry.domain import (
    Backend,
    LoadBalancing,
    Model,
    ModelVersion,
    Route,
    RouteVersion,
    ShadowPolicy,
    Stage,
    TrafficPolicy,
    TrafficSplit,
)
from services.registry.registry import ModelRegistry
from services.registry.watch import RouteHub
from services.runtime.errors import InvalidArgument

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RegistryService"].full_name
ANONYMOUS = "anonymous"


def subject_of(context: grpc.aio.ServicerContext) -> str:
    """The caller's subject, as Envoy sets it after authenticating; "anonymous" without one."""
    for key, value in context.invocation_metadata() or ():
        if key == SUBJECT_HEADER and isinstance(value, str) and value:
            return value[:255]
    return ANONYMOUS


def _ts(value: datetime | None) -> Timestamp | None:
    if value is None:
        return None
    stamp = Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _stage(value: int, field: str) -> Stage:
    try:
        return Stage(value)
    except ValueError:
        raise InvalidArgument(f"{field} {value} is not a known stage", field_violations=[(field, "unknown")]) from None


def _balancing(value: int) -> LoadBalancing:
    try:
        return LoadBalancing(value)
    except ValueError:
        raise InvalidArgument(
            f"load_balancing {value} is not known", field_violations=[("policy.load_balancing", "unknown")]
        ) from None


# ---- domain -> proto ---------------------------------------------------------------------------


def model_pb(m: Model) -> pb.Model:
    return pb.Model(
        name=f"models/{m.model_id}",
        model_id=m.model_id,
        description=m.description,
        task=m.task,
        labels=m.labels,
        create_time=_ts(m.create_time),
        update_time=_ts(m.update_time),
        updated_by=m.updated_by,
        etag=m.etag,
    )


def version_pb(v: ModelVersion) -> pb.ModelVersion:
    return pb.ModelVersion(
        name=f"models/{v.model_id}/versions/{v.version}",
        model_id=v.model_id,
        version=v.version,
        triton_model_name=v.triton_model_name,
        triton_model_version=v.triton_model_version,
        artifact_uri=v.artifact_uri,
        stage=pb.Stage.ValueType(v.stage),
        description=v.description,
        create_time=_ts(v.create_time),
        update_time=_ts(v.update_time),
        updated_by=v.updated_by,
        etag=v.etag,
    )


def policy_pb(p: TrafficPolicy) -> pb.TrafficPolicy:
    return pb.TrafficPolicy(
        name=f"models/{p.model_id}/trafficPolicy",
        model_id=p.model_id,
        splits=[pb.TrafficSplit(version=s.version, weight=s.weight) for s in p.splits],
        shadow=None
        if p.shadow is None
        else pb.ShadowPolicy(version=p.shadow.version, sample_rate=p.shadow.sample_rate),
        sticky_header=p.sticky_header,
        load_balancing=pb.LoadBalancing.ValueType(p.load_balancing),
        update_time=_ts(p.update_time),
        updated_by=p.updated_by,
        etag=p.etag,
    )


def backend_pb(b: Backend) -> pb.Backend:
    return pb.Backend(
        name=f"backends/{b.backend_id}",
        backend_id=b.backend_id,
        address=b.address,
        http_address=b.http_address,
        labels=b.labels,
        triton_models=list(b.triton_models),
        weight=b.weight,
        drained=b.drained,
        create_time=_ts(b.create_time),
        update_time=_ts(b.update_time),
        etag=b.etag,
    )


def route_version_pb(v: RouteVersion) -> pb.RouteVersion:
    return pb.RouteVersion(
        version=v.version,
        stage=pb.Stage.ValueType(v.stage),
        triton_model_name=v.triton_model_name,
        triton_model_version=v.triton_model_version,
        weight=v.weight,
        backends=[
            pb.RouteBackend(
                backend_id=b.backend_id,
                address=b.address,
                weight=b.weight,
                http_address=b.http_address,
                drained=b.drained,
            )
            for b in v.backends
        ],
    )


def route_pb(r: Route) -> pb.Route:
    return pb.Route(
        model_id=r.model_id,
        versions=[route_version_pb(v) for v in r.versions],
        shadow=None
        if r.shadow is None
        else pb.RouteShadow(target=route_version_pb(r.shadow.target), sample_rate=r.shadow.sample_rate),
        sticky_header=r.sticky_header,
        load_balancing=pb.LoadBalancing.ValueType(r.load_balancing),
    )


# ---- proto -> domain ---------------------------------------------------------------------------


def model_from(m: pb.Model) -> Model:
    return Model(model_id=m.model_id, description=m.description, task=m.task, labels=dict(m.labels), etag=m.etag)


def version_from(model_id: str, v: pb.ModelVersion) -> ModelVersion:
    return ModelVersion(
        model_id=model_id,
        version=v.version,
        triton_model_name=v.triton_model_name,
        triton_model_version=v.triton_model_version,
        artifact_uri=v.artifact_uri,
        description=v.description,
        etag=v.etag,
    )


def policy_from(p: pb.TrafficPolicy) -> TrafficPolicy:
    shadow = None
    if p.HasField("shadow") and p.shadow.version:
        shadow = ShadowPolicy(p.shadow.version, p.shadow.sample_rate)
    return TrafficPolicy(
        model_id=p.model_id,
        splits=tuple(TrafficSplit(s.version, s.weight) for s in p.splits),
        shadow=shadow,
        sticky_header=p.sticky_header,
        load_balancing=_balancing(p.load_balancing),
        etag=p.etag,
    )


def backend_from(b: pb.Backend) -> Backend:
    return Backend(
        backend_id=b.backend_id,
        address=b.address,
        http_address=b.http_address,
        labels=dict(b.labels),
        triton_models=tuple(b.triton_models),
        weight=b.weight,
        drained=b.drained,
        etag=b.etag,
    )


class RegistryServicer(pb_grpc.RegistryServiceServicer):
    """Thin adapter over ModelRegistry and RouteHub."""

    def __init__(self, registry: ModelRegistry, hub: RouteHub) -> None:
        self.registry = registry
        self.hub = hub

    async def CreateModel(
        self, request: pb.CreateModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateModelResponse:
        model = await self.registry.create_model(model_from(request.model), subject_of(context))
        return pb.CreateModelResponse(model=model_pb(model))

    async def GetModel(self, request: pb.GetModelRequest, context: grpc.aio.ServicerContext) -> pb.GetModelResponse:
        return pb.GetModelResponse(model=model_pb(await self.registry.get_model(request.model_id)))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        page = await self.registry.list_models(request.page_size, request.page_token)
        return pb.ListModelsResponse(models=[model_pb(m) for m in page.items], next_page_token=page.next_page_token)

    async def UpdateModel(
        self, request: pb.UpdateModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateModelResponse:
        model = await self.registry.update_model(
            model_from(request.model), list(request.update_mask.paths), subject_of(context)
        )
        return pb.UpdateModelResponse(model=model_pb(model))

    async def DeleteModel(
        self, request: pb.DeleteModelRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteModelResponse:
        await self.registry.delete_model(request.model_id, request.etag, request.force, subject_of(context))
        return pb.DeleteModelResponse()

    async def CreateModelVersion(
        self, request: pb.CreateModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateModelVersionResponse:
        version = await self.registry.create_version(
            version_from(request.model_id, request.version), subject_of(context)
        )
        return pb.CreateModelVersionResponse(version=version_pb(version))

    async def GetModelVersion(
        self, request: pb.GetModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetModelVersionResponse:
        version = await self.registry.get_version(request.model_id, request.version)
        return pb.GetModelVersionResponse(version=version_pb(version))

    async def ListModelVersions(
        self, request: pb.ListModelVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelVersionsResponse:
        stage = _stage(request.stage, "stage") if request.stage else None
        page = await self.registry.list_versions(request.model_id, request.page_size, request.page_token, stage)
        return pb.ListModelVersionsResponse(
            versions=[version_pb(v) for v in page.items], next_page_token=page.next_page_token
        )

    async def UpdateModelVersion(
        self, request: pb.UpdateModelVersionRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateModelVersionResponse:
        version = await self.registry.update_version(
            version_from(request.version.model_id, request.version),
            list(request.update_mask.paths),
            subject_of(context),
        )
        return pb.UpdateModelVersionResponse(version=version_pb(version))

    async def TransitionModelVersionStage(
        self, request: pb.TransitionModelVersionStageRequest, context: grpc.aio.ServicerContext
    ) -> pb.TransitionModelVersionStageResponse:
        result = await self.registry.transition(
            request.model_id,
            request.version,
            _stage(request.stage, "stage"),
            etag=request.etag,
            load_on_backends=request.load_on_backends,
            subject=subject_of(context),
        )
        return pb.TransitionModelVersionStageResponse(
            version=version_pb(result.version), also_changed=[version_pb(v) for v in result.also_changed]
        )

    async def GetTrafficPolicy(
        self, request: pb.GetTrafficPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetTrafficPolicyResponse:
        return pb.GetTrafficPolicyResponse(policy=policy_pb(await self.registry.get_policy(request.model_id)))

    async def SetTrafficPolicy(
        self, request: pb.SetTrafficPolicyRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetTrafficPolicyResponse:
        policy = await self.registry.set_policy(policy_from(request.policy), subject_of(context))
        return pb.SetTrafficPolicyResponse(policy=policy_pb(policy))

    async def CreateBackend(
        self, request: pb.CreateBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateBackendResponse:
        backend = await self.registry.create_backend(backend_from(request.backend), subject_of(context))
        return pb.CreateBackendResponse(backend=backend_pb(backend))

    async def GetBackend(
        self, request: pb.GetBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetBackendResponse:
        return pb.GetBackendResponse(backend=backend_pb(await self.registry.get_backend(request.backend_id)))

    async def ListBackends(
        self, request: pb.ListBackendsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListBackendsResponse:
        page = await self.registry.list_backends(request.page_size, request.page_token)
        return pb.ListBackendsResponse(
            backends=[backend_pb(b) for b in page.items], next_page_token=page.next_page_token
        )

    async def UpdateBackend(
        self, request: pb.UpdateBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateBackendResponse:
        backend = await self.registry.update_backend(
            backend_from(request.backend), list(request.update_mask.paths), subject_of(context)
        )
        return pb.UpdateBackendResponse(backend=backend_pb(backend))

    async def DeleteBackend(
        self, request: pb.DeleteBackendRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteBackendResponse:
        await self.registry.delete_backend(request.backend_id, request.etag, subject_of(context))
        return pb.DeleteBackendResponse()

    async def ResolveRoute(
        self, request: pb.ResolveRouteRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveRouteResponse:
        resolved = await self.registry.resolve_route(request.model_id, request.version)
        return pb.ResolveRouteResponse(route=route_pb(resolved.route), revision=resolved.revision)

    async def WatchRoutes(
        self, request: pb.WatchRoutesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRoutesResponse]:
        watcher = request.watcher or context.peer()
        async for update in self.hub.watch(watcher):
            yield pb.WatchRoutesResponse(
                reset=update.reset,
                routes=[route_pb(r) for r in update.routes],
                removed_model_ids=list(update.removed_model_ids),
                revision=update.revision,
            )
