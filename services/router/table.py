"""The routing table: model id -> versions -> backends, compiled for cheap per-request decisions."""

from __future__ import annotations

import bisect
import random
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format
from servegrid.registry.v1 import registry_pb2

from services.router.wire import encode_head
from services.runtime.errors import NotFound

PRODUCTION = registry_pb2.STAGE_PRODUCTION


@dataclass(frozen=True)
class BackendRef:
    """A backend as one route version names it."""

    backend_id: str
    address: str
    weight: int


@dataclass(frozen=True)
class VersionTarget:
    """One servable version of a model, with what the hot path needs precomputed."""

    model_id: str
    version: int
    version_str: str
    triton_model_name: str
    triton_model_version: str  # "" lets Triton pick its latest
    weight: int
    stage: int
    backends: tuple[BackendRef, ...]
    # model_name/model_version as the backend must see them, already protobuf-encoded.
    request_head: bytes
    # What the backend is asked, so the request can go unchanged when the caller asked the same.
    backend_key: tuple[str, str]
    backend_ids: tuple[str, ...]


@dataclass(frozen=True)
class CompiledRoute:
    """A Route with cumulative weights for canary picks and versions indexed by number."""

    model_id: str
    proto: registry_pb2.Route
    versions: Mapping[int, VersionTarget]
    weighted: tuple[VersionTarget, ...]  # versions with weight > 0, in version order
    cumulative: tuple[int, ...]  # running weight totals matching `weighted`
    default: VersionTarget | None  # PRODUCTION when no version has a weight
    shadow: VersionTarget | None
    shadow_rate: float
    sticky_header: str
    load_balancing: int

    def pick_version(self, requested: str, sticky_value: str | None = None) -> VersionTarget:
        """The version serving a request: the one asked for, else a canary pick (sticky when keyed)."""
        if requested:
            try:
                target = self.versions.get(int(requested))
            except ValueError:
                target = None
            if target is None:
                raise NotFound(
                    f"model {self.model_id!r} has no servable version {requested!r}",
                    reason="VERSION_NOT_FOUND",
                    metadata={"model_id": self.model_id, "version": requested},
                )
            return target
        if self.weighted:
            total = self.cumulative[-1]
            if len(self.weighted) == 1:
                return self.weighted[0]
            if sticky_value is not None:
                # crc32 is stable across processes and replicas (Python's hash() is salted).
                point = zlib.crc32(sticky_value.encode()) % total
            else:
                point = int(random.random() * total)
            return self.weighted[bisect.bisect_right(self.cumulative, point)]
        if self.default is not None:
            return self.default
        raise NotFound(
            f"model {self.model_id!r} has no version taking default traffic; name a version",
            reason="VERSION_NOT_FOUND",
            metadata={"model_id": self.model_id},
        )


def _target(model_id: str, version: registry_pb2.RouteVersion) -> VersionTarget:
    triton_version = str(version.triton_model_version) if version.triton_model_version else ""
    return VersionTarget(
        model_id=model_id,
        version=version.version,
        version_str=str(version.version),
        triton_model_name=version.triton_model_name,
        triton_model_version=triton_version,
        weight=max(0, version.weight),
        stage=version.stage,
        backends=tuple(BackendRef(b.backend_id, b.address, b.weight or 1) for b in version.backends),
        request_head=encode_head(version.triton_model_name, triton_version),
        backend_key=(version.triton_model_name, triton_version),
        backend_ids=tuple(b.backend_id for b in version.backends),
    )


def compile_route(route: registry_pb2.Route) -> CompiledRoute:
    versions = {v.version: _target(route.model_id, v) for v in route.versions}
    weighted = tuple(versions[n] for n in sorted(versions) if versions[n].weight > 0)
    cumulative: list[int] = []
    running = 0
    for target in weighted:
        running += target.weight
        cumulative.append(running)
    production = [versions[n] for n in sorted(versions) if versions[n].stage == PRODUCTION]
    default = production[-1] if production else None
    shadow = None
    if route.HasField("shadow") and route.shadow.target.triton_model_name and route.shadow.sample_rate > 0:
        shadow = _target(route.model_id, route.shadow.target)
    return CompiledRoute(
        model_id=route.model_id,
        proto=route,
        versions=versions,
        weighted=weighted,
        cumulative=tuple(cumulative),
        default=default,
        shadow=shadow,
        shadow_rate=min(1.0, route.shadow.sample_rate) if shadow else 0.0,
        sticky_header=route.sticky_header.lower(),
        load_balancing=route.load_balancing,
    )


@dataclass
class RouteTable:
    """The routes this replica serves. Replaced as a whole dict on every change, so readers never lock."""

    routes: dict[str, CompiledRoute] = field(default_factory=dict)
    revision: int = 0
    update_time: float = 0.0
    _listeners: list[Callable[[], None]] = field(default_factory=list)

    def get(self, model_id: str) -> CompiledRoute:
        route = self.routes.get(model_id)
        if route is None:
            raise NotFound(
                f"model {model_id!r} is not served by this router",
                reason="MODEL_NOT_FOUND",
                metadata={"model_id": model_id},
            )
        return route

    def reset(self, routes: Iterable[registry_pb2.Route], revision: int) -> None:
        self.routes = {r.model_id: compile_route(r) for r in routes}
        self._changed(revision)

    def apply(self, upserts: Iterable[registry_pb2.Route], removed: Iterable[str], revision: int) -> None:
        routes = dict(self.routes)
        for model_id in removed:
            routes.pop(model_id, None)
        for route in upserts:
            routes[route.model_id] = compile_route(route)
        self.routes = routes
        self._changed(revision)

    def apply_watch(self, message: registry_pb2.WatchRoutesResponse) -> None:
        if message.reset:
            self.reset(message.routes, message.revision)
        else:
            self.apply(message.routes, message.removed_model_ids, message.revision)

    def backends(self) -> dict[str, tuple[str, int, set[tuple[str, str]]]]:
        """backend id -> (address, weight, the (triton model, version) pairs it serves) across all routes."""
        out: dict[str, tuple[str, int, set[tuple[str, str]]]] = {}
        for route in self.routes.values():
            targets = list(route.versions.values()) + ([route.shadow] if route.shadow else [])
            for target in targets:
                for ref in target.backends:
                    _, _, models = out.setdefault(ref.backend_id, (ref.address, ref.weight, set()))
                    models.add(target.backend_key)
        return out

    def protos(self) -> list[registry_pb2.Route]:
        return [self.routes[k].proto for k in sorted(self.routes)]

    def on_change(self, listener: Callable[[], None]) -> None:
        """Register a callable run after every change (the backend pool syncs its channels)."""
        self._listeners.append(listener)

    def _changed(self, revision: int) -> None:
        self.revision = revision
        self.update_time = time.time()
        for listener in self._listeners:
            listener()


def load_routes_file(path: Path) -> registry_pb2.WatchRoutesResponse:
    """A static table: a WatchRoutesResponse in proto JSON ({"routes": [...], "revision": N})."""
    message = json_format.Parse(path.read_text(), registry_pb2.WatchRoutesResponse())
    message.reset = True
    return message
