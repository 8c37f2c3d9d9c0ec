"""Unit tests for route building: weights, backends per Triton model, shadow, stickiness."""

from __future__ import annotations

from services.registry.domain import (
    Backend,
    LoadBalancing,
    ModelVersion,
    Route,
    ShadowPolicy,
    Stage,
    TrafficPolicy,
    TrafficSplit,
)
from services.registry.routes import build_route, default_weights, only_version

BACKENDS = [
    Backend("triton-b", "10.0.0.2:8001", weight=2),
    Backend("triton-a", "10.0.0.1:8001"),
    Backend("only-resnet", "10.0.0.3:8001", triton_models=("resnet18",)),
]


def v(number: int, stage: Stage, name: str = "digits") -> ModelVersion:
    return ModelVersion(
        model_id="digits", version=number, triton_model_name=name, triton_model_version=number, stage=stage
    )


def test_without_policy_production_takes_all_and_staging_is_explicit_only() -> None:
    route = build_route("digits", [v(1, Stage.PRODUCTION), v(2, Stage.STAGING), v(3, Stage.DRAFT)], None, BACKENDS)
    assert [(rv.version, rv.stage, rv.weight) for rv in route.versions] == [
        (2, Stage.STAGING, 0),
        (1, Stage.PRODUCTION, 100),
    ]
    assert route.shadow is None and route.sticky_header == ""
    assert route.load_balancing == LoadBalancing.UNSPECIFIED


def test_backends_are_those_serving_the_triton_model_in_id_order() -> None:
    route = build_route("digits", [v(1, Stage.PRODUCTION), v(2, Stage.STAGING, "resnet18")], None, BACKENDS)
    by_version = {rv.version: [b.backend_id for b in rv.backends] for rv in route.versions}
    assert by_version == {1: ["triton-a", "triton-b"], 2: ["only-resnet", "triton-a", "triton-b"]}
    assert route.versions[1].backends[1].weight == 2


def test_canary_split_shadow_sticky_and_balancing() -> None:
    policy = TrafficPolicy(
        "digits",
        splits=(TrafficSplit(1, 90), TrafficSplit(2, 10)),
        shadow=ShadowPolicy(3, 0.2),
        sticky_header="x-user-id",
        load_balancing=LoadBalancing.ROUND_ROBIN,
    )
    versions = [v(1, Stage.PRODUCTION), v(2, Stage.STAGING), v(3, Stage.STAGING), v(4, Stage.ARCHIVED)]
    route = build_route("digits", versions, policy, BACKENDS)
    assert {rv.version: rv.weight for rv in route.versions} == {1: 90, 2: 10, 3: 0}
    assert route.shadow is not None
    assert (route.shadow.target.version, route.shadow.sample_rate) == (3, 0.2)
    assert route.shadow.target.triton_model_version == 3
    assert route.sticky_header == "x-user-id"
    assert route.load_balancing == LoadBalancing.ROUND_ROBIN


def test_shadow_on_a_retired_version_or_zero_rate_is_dropped() -> None:
    versions = [v(1, Stage.PRODUCTION), v(2, Stage.ARCHIVED)]
    assert (
        build_route("digits", versions, TrafficPolicy("digits", shadow=ShadowPolicy(2, 0.5)), BACKENDS).shadow is None
    )
    versions = [v(1, Stage.PRODUCTION), v(2, Stage.STAGING)]
    assert (
        build_route("digits", versions, TrafficPolicy("digits", shadow=ShadowPolicy(2, 0.0)), BACKENDS).shadow is None
    )


def test_two_production_versions_without_splits_send_all_to_the_newest() -> None:
    assert default_weights([v(1, Stage.PRODUCTION), v(3, Stage.PRODUCTION)], TrafficPolicy("digits")) == {1: 0, 3: 100}


def test_model_without_servable_versions_has_an_empty_route() -> None:
    route = build_route("digits", [v(1, Stage.DRAFT)], None, BACKENDS)
    assert route == Route("digits")


def test_route_dict_round_trip_and_narrowing() -> None:
    policy = TrafficPolicy("digits", splits=(TrafficSplit(1, 50), TrafficSplit(2, 50)), shadow=ShadowPolicy(2, 0.1))
    route = build_route("digits", [v(1, Stage.PRODUCTION), v(2, Stage.STAGING)], policy, BACKENDS)
    assert Route.from_dict(route.to_dict()) == route
    narrowed = only_version(route, 2)
    assert narrowed is not None and [rv.version for rv in narrowed.versions] == [2]
    assert only_version(route, 7) is None
