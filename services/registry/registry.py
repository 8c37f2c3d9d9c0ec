"""The registry's transport-agnostic core: validation, storage, cache, backend loads and routes."""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Sequence
from dataclasses import asdict, replace
from datetime import datetime
from typing import Any

from services.registry import lifecycle
from services.registry.cache import RegistryCache
from services.registry.domain import (
    Backend,
    Model,
    ModelVersion,
    Page,
    ResolvedRoute,
    Route,
    Stage,
    TrafficPolicy,
    TransitionResult,
)
from services.registry.metrics import WRITES
from services.registry.routes import build_route, only_version
from services.registry.store import RegistryStore, Written
from services.registry.triton_control import BackendModelControl
from services.runtime.errors import InvalidArgument, NotFound
from services.runtime.paging import decode_page_token, encode_page_token

log = logging.getLogger(__name__)

MODEL, ROUTE = "model", "route"


class ModelRegistry:
    """What the gRPC servicer (and a future REST or CLI front) calls. Every write commits first, then
    invalidates the cache; the routing change reaches watchers through NOTIFY from the commit itself."""

    def __init__(self, store: RegistryStore, cache: RegistryCache, control: BackendModelControl) -> None:
        self.store = store
        self.cache = cache
        self.control = control

    # ---- models -------------------------------------------------------------------------------

    async def create_model(self, model: Model, subject: str) -> Model:
        lifecycle.check_id(model.model_id, "model.model_id")
        _check_model_fields(model)
        written = await self.store.create_model(model, subject)
        await self._after_write("create_model", written, subject, model_id=model.model_id)
        return written.value

    async def get_model(self, model_id: str) -> Model:
        lifecycle.check_id(model_id, "model_id")
        cached = await self.cache.get(MODEL, model_id)
        if cached is not None:
            return _model_from_json(cached[1])
        model, revision = await self.store.get_model(model_id)
        await self.cache.put(MODEL, model_id, revision, _model_to_json(model))
        return model

    async def list_models(self, page_size: int, page_token: str) -> Page[Model]:
        size = lifecycle.check_page_size(page_size)
        query: dict[str, Any] = {"list": "models"}
        after = decode_page_token(page_token, query)
        rows = await self.store.list_models(None if after is None else str(after), size + 1)
        return _page(rows, size, lambda m: m.model_id, query)

    async def update_model(self, model: Model, paths: Sequence[str], subject: str) -> Model:
        lifecycle.check_id(model.model_id, "model.model_id")
        mask = lifecycle.check_mask(paths, lifecycle.MODEL_MASK_PATHS)
        _check_model_fields(model)
        written = await self.store.update_model(model, mask, subject)
        await self._after_write("update_model", written, subject, model_id=model.model_id)
        return written.value

    async def delete_model(self, model_id: str, etag: str, force: bool, subject: str) -> None:
        lifecycle.check_id(model_id, "model_id")
        written = await self.store.delete_model(model_id, etag, force)
        await self._after_write("delete_model", written, subject, model_id=model_id)

    # ---- versions -----------------------------------------------------------------------------

    async def create_version(self, version: ModelVersion, subject: str) -> ModelVersion:
        lifecycle.check_id(version.model_id, "model_id")
        lifecycle.check_text(version.triton_model_name, "version.triton_model_name", required=True, limit=255)
        _check_version_fields(version)
        written = await self.store.create_version(version, subject)
        await self._after_write("create_version", written, subject, model_id=version.model_id)
        return written.value

    async def get_version(self, model_id: str, version: int) -> ModelVersion:
        lifecycle.check_id(model_id, "model_id")
        lifecycle.check_version_number(version)
        return await self.store.get_version(model_id, version)

    async def list_versions(
        self, model_id: str, page_size: int, page_token: str, stage: Stage | None
    ) -> Page[ModelVersion]:
        lifecycle.check_id(model_id, "model_id")
        size = lifecycle.check_page_size(page_size)
        query: dict[str, Any] = {"list": "versions", "model": model_id, "stage": None if stage is None else int(stage)}
        before = decode_page_token(page_token, query)
        rows = await self.store.list_versions(model_id, None if before is None else int(before), size + 1, stage)
        return _page(rows, size, lambda v: v.version, query)

    async def update_version(self, version: ModelVersion, paths: Sequence[str], subject: str) -> ModelVersion:
        lifecycle.check_id(version.model_id, "version.model_id")
        lifecycle.check_version_number(version.version, "version.version")
        mask = lifecycle.check_mask(paths, lifecycle.VERSION_MASK_PATHS)
        if "triton_model_name" in mask:
            lifecycle.check_text(version.triton_model_name, "version.triton_model_name", required=True, limit=255)
        _check_version_fields(version)
        written = await self.store.update_version(version, mask, subject)
        await self._after_write("update_version", written, subject, model_id=version.model_id)
        return written.value

    async def transition(
        self, model_id: str, version: int, target: Stage, *, etag: str, load_on_backends: bool, subject: str
    ) -> TransitionResult:
        """Change a version's stage; with `load_on_backends`, load it everywhere first (stage unchanged on failure)."""
        lifecycle.check_id(model_id, "model_id")
        lifecycle.check_version_number(version)
        expected: Stage | None = None
        backends: list[Backend] = []
        if load_on_backends:
            # Refuse an invalid move before touching any backend; the commit re-checks everything
            # and aborts if the version moved while the backends were loading.
            current = await self.store.get_version(model_id, version)
            lifecycle.check_transition(current.stage, target, model_id=model_id, version=version)
            expected = current.stage
            backends = await self.store.all_backends()
            if target in (Stage.STAGING, Stage.PRODUCTION):
                await self.control.load_everywhere(
                    current.triton_model_name, backends, what=f"model {model_id!r} version {version}"
                )
        written = await self.store.transition(
            model_id, version, target, etag=etag, subject=subject, expected_stage=expected
        )
        await self._after_write("transition", written, subject, model_id=model_id)
        result = written.value
        if load_on_backends:
            await self._unload_unused(model_id, result, backends)
        return result

    async def _unload_unused(self, model_id: str, result: TransitionResult, backends: Sequence[Backend]) -> None:
        """Unload the Triton models of versions that left service, unless another servable version uses them."""
        retired = [v for v in (result.version, *result.also_changed) if v.stage in (Stage.ARCHIVED, Stage.DRAFT)]
        if not retired:
            return
        snapshot = await self.store.routing_snapshot(None)
        in_use = {v.triton_model_name for versions in snapshot.versions.values() for v in versions}
        for name in sorted({v.triton_model_name for v in retired} - in_use):
            await self.control.unload_everywhere(name, backends)

    # ---- traffic policies ---------------------------------------------------------------------

    async def get_policy(self, model_id: str) -> TrafficPolicy:
        lifecycle.check_id(model_id, "model_id")
        return await self.store.get_policy(model_id)

    async def set_policy(self, policy: TrafficPolicy, subject: str) -> TrafficPolicy:
        lifecycle.check_id(policy.model_id, "policy.model_id")
        written = await self.store.set_policy(policy, subject)
        await self._after_write("set_policy", written, subject, model_id=policy.model_id)
        return written.value

    # ---- backends -----------------------------------------------------------------------------

    async def create_backend(self, backend: Backend, subject: str) -> Backend:
        lifecycle.check_id(backend.backend_id, "backend.backend_id")
        _check_backend_fields(backend, lifecycle.BACKEND_MASK_PATHS)
        if backend.weight == 0:
            backend = replace(backend, weight=1)  # the documented default for an unset weight
        written = await self.store.create_backend(backend)
        await self._after_write("create_backend", written, subject, backend_id=backend.backend_id)
        return written.value

    async def get_backend(self, backend_id: str) -> Backend:
        lifecycle.check_id(backend_id, "backend_id")
        return await self.store.get_backend(backend_id)

    async def list_backends(self, page_size: int, page_token: str) -> Page[Backend]:
        size = lifecycle.check_page_size(page_size)
        query: dict[str, Any] = {"list": "backends"}
        after = decode_page_token(page_token, query)
        rows = await self.store.list_backends(None if after is None else str(after), size + 1)
        return _page(rows, size, lambda b: b.backend_id, query)

    async def update_backend(self, backend: Backend, paths: Sequence[str], subject: str) -> Backend:
        lifecycle.check_id(backend.backend_id, "backend.backend_id")
        mask = lifecycle.check_mask(paths, lifecycle.BACKEND_MASK_PATHS)
        _check_backend_fields(backend, mask)
        written = await self.store.update_backend(backend, mask)
        await self._after_write("update_backend", written, subject, backend_id=backend.backend_id)
        return written.value

    async def delete_backend(self, backend_id: str, etag: str, subject: str) -> None:
        lifecycle.check_id(backend_id, "backend_id")
        written = await self.store.delete_backend(backend_id, etag)
        await self._after_write("delete_backend", written, subject, backend_id=backend_id)

    # ---- routes -------------------------------------------------------------------------------

    async def resolve_route(self, model_id: str, version: int) -> ResolvedRoute:
        lifecycle.check_id(model_id, "model_id")
        if version < 0:
            lifecycle.check_version_number(version)
        cached = await self.cache.get(ROUTE, model_id)
        if cached is not None:
            resolved = ResolvedRoute(Route.from_dict(json.loads(cached[1])), cached[0])
        else:
            snapshot = await self.store.routing_snapshot([model_id])
            if model_id not in snapshot.model_ids:
                raise NotFound(
                    f"model {model_id!r} does not exist", reason="MODEL_NOT_FOUND", metadata={"model_id": model_id}
                )
            route = build_route(
                model_id, snapshot.versions.get(model_id, []), snapshot.policies.get(model_id), snapshot.backends
            )
            resolved = ResolvedRoute(route, snapshot.revision)
            await self.cache.put(ROUTE, model_id, snapshot.revision, json.dumps(route.to_dict()))
        if version == 0:
            return resolved
        narrowed = only_version(resolved.route, version)
        if narrowed is None:
            raise NotFound(
                f"model {model_id!r} has no servable version {version} (only STAGING and PRODUCTION are served)",
                reason="VERSION_NOT_FOUND",
                metadata={"model_id": model_id, "version": str(version)},
            )
        return ResolvedRoute(narrowed, resolved.revision)

    # ---- after every write --------------------------------------------------------------------

    async def _after_write(
        self, operation: str, written: Written[Any], subject: str, *, model_id: str = "", backend_id: str = ""
    ) -> None:
        """Invalidate after the commit (never before: a reader could refill the old value in between)."""
        if model_id:
            await self.cache.invalidate([(MODEL, model_id), (ROUTE, model_id)], written.revision)
        if written.change is not None and written.change.all_models:
            await self.cache.invalidate_all(ROUTE, written.revision)
        WRITES.labels(operation).inc()
        log.info(
            "registry write",
            extra={
                "operation": operation,
                "subject": subject,
                "model_id": model_id or None,
                "backend_id": backend_id or None,
                "revision": written.revision,
            },
        )


def _check_model_fields(model: Model) -> None:
    lifecycle.check_text(model.description, "model.description")
    lifecycle.check_text(model.task, "model.task", limit=255)
    lifecycle.check_labels(model.labels, "model.labels")


def _check_version_fields(version: ModelVersion) -> None:
    lifecycle.check_text(version.description, "version.description")
    lifecycle.check_text(version.artifact_uri, "version.artifact_uri", limit=2048)
    if version.triton_model_version < 0:
        lifecycle.check_version_number(version.triton_model_version, "version.triton_model_version")


def _check_backend_fields(backend: Backend, fields: Collection[str]) -> None:
    if "address" in fields:
        lifecycle.check_address(backend.address, "backend.address")
    if "http_address" in fields and backend.http_address:  # empty: the backend serves gRPC only
        lifecycle.check_address(backend.http_address, "backend.http_address")
    if "labels" in fields:
        lifecycle.check_labels(backend.labels, "backend.labels")
    if "weight" in fields and backend.weight < 0:
        raise InvalidArgument("backend.weight must not be negative", field_violations=[("backend.weight", ">= 0")])
    if "triton_models" in fields:
        for i, name in enumerate(backend.triton_models):
            lifecycle.check_text(name, f"backend.triton_models[{i}]", required=True, limit=255)


def _page(rows: list[Any], size: int, key: Any, query: dict[str, Any]) -> Page[Any]:
    # One extra row was fetched to learn whether another page exists without a count query.
    if len(rows) <= size:
        return Page(rows)
    items = rows[:size]
    return Page(items, encode_page_token(key(items[-1]), query))


def _model_to_json(model: Model) -> str:
    data = asdict(model)
    for name in ("create_time", "update_time"):
        value = data[name]
        data[name] = value.isoformat() if value is not None else None
    return json.dumps(data)


def _model_from_json(payload: str) -> Model:
    data = json.loads(payload)
    for name in ("create_time", "update_time"):
        if data[name] is not None:
            data[name] = datetime.fromisoformat(data[name])
    return replace(Model(model_id=data.pop("model_id")), **data)
