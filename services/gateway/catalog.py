"""The catalogue of servable models: the registry's view, plus signatures from the data plane."""

from __future__ import annotations

import asyncio

from servegrid.gateway.v1 import gateway_pb2
from servegrid.registry.v1 import registry_pb2

from services.gateway.upstream import KServeClient, RegistryClient
from services.runtime import InvalidArgument, NotFound

DEFAULT_PAGE_SIZE = 50


def stage_name(stage: registry_pb2.Stage.ValueType) -> str:
    """A stage as every servegrid API spells it: the registry's enum value name ("STAGE_PRODUCTION").

    A value this gateway does not know (a newer registry's) reads as STAGE_UNSPECIFIED, never an error."""
    return registry_pb2.Stage.Name(stage) if stage in registry_pb2.Stage.values() else "STAGE_UNSPECIFIED"


def _model(model: registry_pb2.Model, route: registry_pb2.Route) -> gateway_pb2.Model:
    return gateway_pb2.Model(
        name=f"models/{model.model_id}",
        model_id=model.model_id,
        description=model.description,
        task=model.task,
        labels=dict(model.labels),
        versions=[
            gateway_pb2.ModelVersion(version=v.version, stage=stage_name(v.stage), traffic_percent=v.weight)
            for v in route.versions
        ],
    )


class ModelCatalog:
    """Read-only: lists what the registry says is servable; GetModel adds the signature the data plane reports."""

    def __init__(self, registry: RegistryClient, inference: KServeClient, max_page_size: int, timeout_s: float) -> None:
        self.registry = registry
        self.inference = inference
        self.max_page_size = max_page_size
        self.timeout_s = timeout_s

    async def list(self, page_size: int, page_token: str) -> tuple[list[gateway_pb2.Model], str]:
        if page_size < 0:
            raise InvalidArgument(
                "page_size must be >= 0", reason="INVALID_PAGE_SIZE", field_violations=[("page_size", "must be >= 0")]
            )
        size = min(page_size or DEFAULT_PAGE_SIZE, self.max_page_size)
        page = await self.registry.list_models(size, page_token)
        routes = await asyncio.gather(*(self.registry.resolve_route(m.model_id) for m in page.models))
        # Models with no servable version are the registry's business, not a caller's: skip them
        # (a page may come back shorter than asked; the token still leads on, as AIP-158 allows).
        models = [_model(m, r) for m, r in zip(page.models, routes, strict=True) if r is not None and r.versions]
        return models, page.next_page_token

    async def require_servable(self, model_id: str, version: int) -> None:
        """NOT_FOUND unless `model_id` (and `version`, when not 0) can be served right now.

        A batch job is checked here at submit: otherwise it is accepted and every one of its items
        fails later with the same error."""
        if not model_id:
            raise InvalidArgument("model_id is required", field_violations=[("model_id", "required")])
        route = await self.registry.resolve_route(model_id)
        if route is None or not route.versions:
            raise NotFound(
                f"model {model_id!r} has no servable version", reason="MODEL_NOT_FOUND", metadata={"model_id": model_id}
            )
        served = sorted(v.version for v in route.versions)
        if version and version not in served:
            raise NotFound(
                f"model {model_id!r} has no servable version {version}; servable: {', '.join(map(str, served))}",
                reason="VERSION_NOT_FOUND",
                metadata={"model_id": model_id, "version": str(version)},
            )

    async def get(self, model_id: str) -> gateway_pb2.Model:
        if not model_id:
            raise InvalidArgument("model_id is required", field_violations=[("model_id", "required")])
        model, route = await asyncio.gather(self.registry.get_model(model_id), self.registry.resolve_route(model_id))
        if route is None or not route.versions:
            raise NotFound(
                f"model {model_id!r} has no servable version", reason="MODEL_NOT_FOUND", metadata={"model_id": model_id}
            )
        result = _model(model, route)
        # The data plane serves models by their servegrid id (it maps ids to Triton names itself), and
        # with no version it answers for the one a version-less Infer would reach.
        metadata = await self.inference.metadata(model_id, "", self.timeout_s)
        result.inputs.extend(
            gateway_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.inputs
        )
        result.outputs.extend(
            gateway_pb2.TensorSpec(name=t.name, datatype=t.datatype, shape=t.shape) for t in metadata.outputs
        )
        return result
