"""The routing table: model id -> versions -> backends, as the registry sent it, compiled for snapshot building."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from google.protobuf import json_format
from servegrid.registry.v1 import registry_pb2

from services.runtime.errors import NotFound

PRODUCTION = registry_pb2.STAGE_PRODUCTION


@dataclass(frozen=True)
class BackendRef:
    """A backend as one route version names it."""

    backend_id: str
    address: str
    weight: int
    http_address: str = ""  # KServe v2 REST "host:port"; empty when the backend serves gRPC only
    drained: bool = False  # drained by an operator, as the registry stores it (Backend.drained)


@dataclass(frozen=True)
class VersionTarget:
    """One servable version of a model and the Triton model it runs as."""

    model_id: str
    version: int
    version_str: str
    triton_model_name: str
    triton_model_version: str  # "" lets Triton pick its latest
    weight: int
    stage: int
    backends: tuple[BackendRef, ...]
    # (Triton model, Triton version): what the backend is asked, and the key of its endpoint state.
    backend_key: tuple[str, str]
    backend_ids: tuple[str, ...]


@dataclass(frozen=True)
class CompiledRoute:
    """A Route with versions indexed by number and the default-traffic choice made once."""

    model_id: str
    proto: registry_pb2.Route
    versions: Mapping[int, VersionTarget]
    weighted: tuple[VersionTarget, ...]  # versions with weight > 0, in version order
    default: VersionTarget | None  # PRODUCTION when no version has a weight
    shadow: VersionTarget | None
    shadow_rate: float
    sticky_header: str
    load_balancing: int


class BackendSpec(NamedTuple):
    """A backend across every route that names it: where it is and which Triton models it must serve."""

    address: str
    weight: int
    models: frozenset[tuple[str, str]]  # (Triton model, Triton version)
    http_address: str = ""
    drained: bool = False  # the registry's drain flag (shared by every router replica)


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
        backends=tuple(
            BackendRef(b.backend_id, b.address, b.weight or 1, b.http_address, b.drained) for b in version.backends
        ),
        backend_key=(version.triton_model_name, triton_version),
        backend_ids=tuple(b.backend_id for b in version.backends),
    )


def compile_route(route: registry_pb2.Route) -> CompiledRoute:
    versions = {v.version: _target(route.model_id, v) for v in route.versions}
    weighted = tuple(versions[n] for n in sorted(versions) if versions[n].weight > 0)
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
    loaded: bool = False  # False until the first reset: an empty table that was never loaded is not "no routes"
    _listeners: list[Callable[[], None]] = field(default_factory=list)
    _waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = field(default_factory=list)

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

    def backends(self) -> dict[str, BackendSpec]:
        """backend id -> its addresses, weight and every (Triton model, version) the routes send it."""
        found: dict[str, tuple[BackendRef, set[tuple[str, str]]]] = {}
        for route in self.routes.values():
            targets = list(route.versions.values()) + ([route.shadow] if route.shadow else [])
            for target in targets:
                for ref in target.backends:
                    found.setdefault(ref.backend_id, (ref, set()))[1].add(target.backend_key)
        return {
            backend_id: BackendSpec(ref.address, ref.weight, frozenset(models), ref.http_address, ref.drained)
            for backend_id, (ref, models) in found.items()
        }

    def protos(self) -> list[registry_pb2.Route]:
        return [self.routes[k].proto for k in sorted(self.routes)]

    def on_change(self, listener: Callable[[], None]) -> None:
        """Register a callable run after every change (the probes follow the backends, a snapshot is built)."""
        self._listeners.append(listener)

    async def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        """True once `condition()` holds, checked now and after every change (listeners have run by
        then); False when `timeout_s` passes first."""
        if condition():
            return True
        waiter = (condition, asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(asyncio.shield(waiter[1]), timeout_s)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters.remove(waiter)

    def _changed(self, revision: int) -> None:
        self.loaded = True
        self.revision = revision
        self.update_time = time.time()
        for listener in self._listeners:
            listener()
        for condition, future in self._waiters:
            if not future.done() and condition():
                future.set_result(None)


def load_routes_file(path: Path) -> registry_pb2.WatchRoutesResponse:
    """A static table: a WatchRoutesResponse in proto JSON ({"routes": [...], "revision": N})."""
    message = json_format.Parse(path.read_text(), registry_pb2.WatchRoutesResponse())
    message.reset = True
    return message
