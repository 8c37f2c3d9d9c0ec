"""Route building: from versions, a traffic policy and backends to what the router serves."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from services.registry.domain import (
    SERVABLE_STAGES,
    Backend,
    LoadBalancing,
    ModelVersion,
    Route,
    RouteBackend,
    RouteShadow,
    RouteVersion,
    Stage,
    TrafficPolicy,
)


def default_weights(versions: Sequence[ModelVersion], policy: TrafficPolicy | None) -> dict[int, int]:
    """Percent of default traffic per servable version.

    The policy's splits when it has some; otherwise 100 to the PRODUCTION version (the newest one,
    should a policy that split traffic have been cleared while two were in PRODUCTION).
    """
    servable = {v.version: v for v in versions if v.stage in SERVABLE_STAGES}
    weights = dict.fromkeys(servable, 0)
    if policy is not None and policy.splits:
        for split in policy.splits:
            if split.version in servable:
                weights[split.version] = split.weight
        return weights
    production = [v.version for v in servable.values() if v.stage == Stage.PRODUCTION]
    if production:
        weights[max(production)] = 100
    return weights


def route_backends(triton_model_name: str, backends: Iterable[Backend]) -> tuple[RouteBackend, ...]:
    """Backends that can serve a Triton model, in id order so every replica builds the same route."""
    return tuple(
        RouteBackend(b.backend_id, b.address, b.weight, b.http_address, b.drained)
        for b in sorted(backends, key=lambda b: b.backend_id)
        if b.serves(triton_model_name)
    )


def build_route(
    model_id: str,
    versions: Sequence[ModelVersion],
    policy: TrafficPolicy | None,
    backends: Sequence[Backend],
) -> Route:
    """The route for one model: servable versions (newest first) with weights and backends, shadow, stickiness."""
    weights = default_weights(versions, policy)
    by_number = {v.version: v for v in versions}

    def route_version(v: ModelVersion) -> RouteVersion:
        return RouteVersion(
            version=v.version,
            stage=v.stage,
            triton_model_name=v.triton_model_name,
            triton_model_version=v.triton_model_version,
            weight=weights.get(v.version, 0),
            backends=route_backends(v.triton_model_name, backends),
        )

    served = tuple(route_version(v) for v in sorted(versions, key=lambda v: -v.version) if v.stage in SERVABLE_STAGES)
    shadow = None
    if policy is not None and policy.shadow is not None and policy.shadow.sample_rate > 0:
        target = by_number.get(policy.shadow.version)
        # A shadow target that stopped being servable is dropped rather than routed to.
        if target is not None and target.stage in SERVABLE_STAGES:
            shadow = RouteShadow(route_version(target), policy.shadow.sample_rate)
    return Route(
        model_id=model_id,
        versions=served,
        shadow=shadow,
        sticky_header=policy.sticky_header if policy else "",
        load_balancing=policy.load_balancing if policy else LoadBalancing.UNSPECIFIED,
    )


def only_version(route: Route, version: int) -> Route | None:
    """The route narrowed to one explicitly requested version (None when that version is not servable)."""
    chosen = [v for v in route.versions if v.version == version]
    if not chosen:
        return None
    return Route(
        model_id=route.model_id,
        versions=tuple(chosen),
        shadow=route.shadow,
        sticky_header=route.sticky_header,
        load_balancing=route.load_balancing,
    )
