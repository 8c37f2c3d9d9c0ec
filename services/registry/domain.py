"""Registry domain types, independent of protobuf and of storage."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Stage(enum.IntEnum):
    """Lifecycle stage of a model version; values match the proto enum so conversion is a cast."""

    UNSPECIFIED = 0
    DRAFT = 1
    STAGING = 2
    PRODUCTION = 3
    ARCHIVED = 4


class LoadBalancing(enum.IntEnum):
    """Backend selection within a version; values match the proto enum."""

    UNSPECIFIED = 0
    P2C = 1
    ROUND_ROBIN = 2
    WEIGHTED = 3


# Stages a router may send traffic to.
SERVABLE_STAGES = frozenset({Stage.STAGING, Stage.PRODUCTION})


@dataclass(frozen=True)
class Model:
    """A named thing that can be served."""

    model_id: str
    description: str = ""
    task: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    create_time: datetime | None = None
    update_time: datetime | None = None
    updated_by: str = ""
    etag: str = ""


@dataclass(frozen=True)
class ModelVersion:
    """One trained artifact of a model and its stage."""

    model_id: str
    version: int
    triton_model_name: str
    triton_model_version: int = 0
    artifact_uri: str = ""
    stage: Stage = Stage.DRAFT
    description: str = ""
    create_time: datetime | None = None
    update_time: datetime | None = None
    updated_by: str = ""
    etag: str = ""


@dataclass(frozen=True)
class TrafficSplit:
    """A share of a model's default traffic for one version."""

    version: int
    weight: int


@dataclass(frozen=True)
class ShadowPolicy:
    """Copies a sample of requests to another version."""

    version: int
    sample_rate: float


@dataclass(frozen=True)
class TrafficPolicy:
    """How a model's requests spread over its versions; a model without one has the empty policy."""

    model_id: str
    splits: tuple[TrafficSplit, ...] = ()
    shadow: ShadowPolicy | None = None
    sticky_header: str = ""
    load_balancing: LoadBalancing = LoadBalancing.UNSPECIFIED
    update_time: datetime | None = None
    updated_by: str = ""
    etag: str = ""

    def referenced_versions(self) -> set[int]:
        """Versions the policy sends traffic (or shadow copies) to."""
        versions = {s.version for s in self.splits if s.weight > 0}
        if self.shadow is not None:
            versions.add(self.shadow.version)
        return versions


@dataclass(frozen=True)
class Backend:
    """One Triton server."""

    backend_id: str
    address: str
    labels: dict[str, str] = field(default_factory=dict)
    triton_models: tuple[str, ...] = ()
    weight: int = 1
    create_time: datetime | None = None
    update_time: datetime | None = None
    etag: str = ""
    http_address: str = ""  # KServe v2 REST "host:port"; empty when it serves gRPC only
    drained: bool = False  # an operator drained it: no new requests (EDS DRAINING on every router)

    def serves(self, triton_model_name: str) -> bool:
        """An empty `triton_models` means the backend serves every model."""
        return not self.triton_models or triton_model_name in self.triton_models


@dataclass(frozen=True)
class RouteBackend:
    """A backend as the router needs it."""

    backend_id: str
    address: str
    weight: int
    http_address: str = ""
    drained: bool = False


@dataclass(frozen=True)
class RouteVersion:
    """One servable version and where it runs."""

    version: int
    stage: Stage
    triton_model_name: str
    triton_model_version: int
    weight: int
    backends: tuple[RouteBackend, ...] = ()


@dataclass(frozen=True)
class RouteShadow:
    """Where shadow copies go."""

    target: RouteVersion
    sample_rate: float


@dataclass(frozen=True)
class Route:
    """Everything the router needs to serve one model."""

    model_id: str
    versions: tuple[RouteVersion, ...] = ()
    shadow: RouteShadow | None = None
    sticky_header: str = ""
    load_balancing: LoadBalancing = LoadBalancing.UNSPECIFIED

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form, for the cache."""
        return {
            "model_id": self.model_id,
            "versions": [_version_dict(v) for v in self.versions],
            "shadow": None
            if self.shadow is None
            else {"target": _version_dict(self.shadow.target), "sample_rate": self.shadow.sample_rate},
            "sticky_header": self.sticky_header,
            "load_balancing": int(self.load_balancing),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Route:
        shadow = data.get("shadow")
        return cls(
            model_id=data["model_id"],
            versions=tuple(_version_from(v) for v in data["versions"]),
            shadow=None
            if shadow is None
            else RouteShadow(target=_version_from(shadow["target"]), sample_rate=float(shadow["sample_rate"])),
            sticky_header=data["sticky_header"],
            load_balancing=LoadBalancing(data["load_balancing"]),
        )


def _version_dict(v: RouteVersion) -> dict[str, Any]:
    return {
        "version": v.version,
        "stage": int(v.stage),
        "triton_model_name": v.triton_model_name,
        "triton_model_version": v.triton_model_version,
        "weight": v.weight,
        "backends": [[b.backend_id, b.address, b.weight, b.http_address, b.drained] for b in v.backends],
    }


def _version_from(data: dict[str, Any]) -> RouteVersion:
    return RouteVersion(
        version=int(data["version"]),
        stage=Stage(data["stage"]),
        triton_model_name=data["triton_model_name"],
        triton_model_version=int(data["triton_model_version"]),
        weight=int(data["weight"]),
        # Entries cached before backends had an HTTP address have three items, before drains four.
        backends=tuple(
            RouteBackend(b[0], b[1], int(b[2]), b[3] if len(b) > 3 else "", bool(b[4]) if len(b) > 4 else False)
            for b in data["backends"]
        ),
    )


@dataclass(frozen=True)
class ResolvedRoute:
    """A route with the routing-table revision it reflects."""

    route: Route
    revision: int


@dataclass(frozen=True)
class RouteUpdate:
    """One change to the routing table as WatchRoutes sends it."""

    revision: int
    routes: tuple[Route, ...] = ()
    removed_model_ids: tuple[str, ...] = ()
    reset: bool = False


@dataclass(frozen=True)
class TransitionResult:
    """A stage change and the versions it changed as a consequence."""

    version: ModelVersion
    also_changed: tuple[ModelVersion, ...] = ()


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list and the token for the next one ("" on the last page)."""

    items: list[T]
    next_page_token: str = ""
