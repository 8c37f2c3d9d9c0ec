"""Unit tests for the registry's rules: stage transitions, traffic policies, ids and update masks."""

from __future__ import annotations

import grpc
import pytest

from services.registry import lifecycle
from services.registry.domain import ModelVersion, ShadowPolicy, Stage, TrafficPolicy, TrafficSplit
from services.runtime.errors import FailedPrecondition, InvalidArgument

D, S, P, A = Stage.DRAFT, Stage.STAGING, Stage.PRODUCTION, Stage.ARCHIVED


def version(number: int, stage: Stage) -> ModelVersion:
    return ModelVersion(model_id="m", version=number, triton_model_name="affine", stage=stage)


@pytest.mark.parametrize(
    ("current", "target"),
    [(D, S), (S, P), (P, A), (S, D), (D, A), (S, A), (A, S)],
)
def test_allowed_transitions(current: Stage, target: Stage) -> None:
    lifecycle.check_transition(current, target, model_id="m", version=1)


@pytest.mark.parametrize(
    ("current", "target"),
    [(D, P), (P, S), (P, D), (A, P), (A, D), (P, P), (D, D), (A, A)],
)
def test_refused_transitions_are_failed_precondition(current: Stage, target: Stage) -> None:
    with pytest.raises(FailedPrecondition) as caught:
        lifecycle.check_transition(current, target, model_id="m", version=1)
    assert caught.value.reason == "INVALID_STAGE_TRANSITION"
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert caught.value.metadata["from"] == current.name


def test_unspecified_target_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgument):
        lifecycle.check_transition(D, Stage.UNSPECIFIED, model_id="m", version=1)


def test_promotion_archives_previous_production_unless_policy_splits_with_it() -> None:
    old, new = version(1, P), version(2, S)
    assert lifecycle.versions_to_archive(new, [old, new], None) == [old]
    canary = TrafficPolicy("m", splits=(TrafficSplit(1, 90), TrafficSplit(2, 10)))
    assert lifecycle.versions_to_archive(new, [old, new], canary) == []
    unrelated = TrafficPolicy("m", splits=(TrafficSplit(2, 100),))
    assert lifecycle.versions_to_archive(new, [old, new], unrelated) == [old]


def test_version_in_policy_cannot_leave_service() -> None:
    policy = TrafficPolicy("m", splits=(TrafficSplit(1, 90), TrafficSplit(2, 10)), shadow=ShadowPolicy(3, 0.5))
    for number in (1, 3):
        with pytest.raises(FailedPrecondition) as caught:
            lifecycle.check_leaving_policy(policy, version(number, S), A)
        assert caught.value.reason == "INVALID_STAGE_TRANSITION"
    lifecycle.check_leaving_policy(policy, version(4, S), A)  # not in the policy
    lifecycle.check_leaving_policy(policy, version(2, S), P)  # stays servable


def policy_error(policy: TrafficPolicy, versions: dict[int, ModelVersion]) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as caught:
        lifecycle.check_policy(policy, versions)
    assert caught.value.reason == "INVALID_TRAFFIC_POLICY"
    return caught.value


SERVABLE = {1: version(1, P), 2: version(2, S), 3: version(3, D), 4: version(4, A)}


def test_valid_policy_passes() -> None:
    lifecycle.check_policy(
        TrafficPolicy(
            "m",
            splits=(TrafficSplit(1, 90), TrafficSplit(2, 10)),
            shadow=ShadowPolicy(2, 0.25),
            sticky_header="x-user-id",
        ),
        SERVABLE,
    )
    lifecycle.check_policy(TrafficPolicy("m"), SERVABLE)  # empty: all traffic to PRODUCTION


def test_weights_must_sum_to_100() -> None:
    err = policy_error(TrafficPolicy("m", splits=(TrafficSplit(1, 90), TrafficSplit(2, 20))), SERVABLE)
    assert err.field_violations[0][0] == "policy.splits"
    assert "110" in err.message


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        (TrafficPolicy("m", splits=(TrafficSplit(1, 50), TrafficSplit(1, 50))), "policy.splits[1].version"),
        (TrafficPolicy("m", splits=(TrafficSplit(1, 101), TrafficSplit(2, -1))), "policy.splits[0].weight"),
        (TrafficPolicy("m", splits=(TrafficSplit(1, 50), TrafficSplit(3, 50))), "policy.splits[1].version"),
        (TrafficPolicy("m", splits=(TrafficSplit(4, 100),)), "policy.splits[0].version"),
        (TrafficPolicy("m", splits=(TrafficSplit(9, 100),)), "policy.splits[0].version"),
        (TrafficPolicy("m", shadow=ShadowPolicy(2, 1.5)), "policy.shadow.sample_rate"),
        (TrafficPolicy("m", shadow=ShadowPolicy(3, 0.5)), "policy.shadow.version"),
        (TrafficPolicy("m", sticky_header="X-User"), "policy.sticky_header"),
        (TrafficPolicy("m", sticky_header="grpc-timeout"), "policy.sticky_header"),
    ],
)
def test_invalid_policies_name_the_field(policy: TrafficPolicy, field: str) -> None:
    assert policy_error(policy, SERVABLE).field_violations[0][0] == field


@pytest.mark.parametrize("value", ["resnet18", "a", "digits_v2-x", "a" * 63])
def test_valid_ids(value: str) -> None:
    assert lifecycle.check_id(value, "model_id") == value


@pytest.mark.parametrize("value", ["", "1abc", "Abc", "a b", "a" * 64, "x'); DROP TABLE models;--", "ü"])
def test_invalid_ids_have_field_violations(value: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        lifecycle.check_id(value, "model.model_id")
    assert caught.value.field_violations[0][0] == "model.model_id"


def test_masks() -> None:
    assert lifecycle.check_mask(["description"], lifecycle.MODEL_MASK_PATHS) == {"description"}
    assert lifecycle.check_mask(["*"], lifecycle.MODEL_MASK_PATHS) == lifecycle.MODEL_MASK_PATHS
    for bad in ([], ["model_id"], ["description", "etag"], ["stage"]):
        with pytest.raises(InvalidArgument):
            lifecycle.check_mask(bad, lifecycle.MODEL_MASK_PATHS)
    with pytest.raises(InvalidArgument):
        lifecycle.check_mask(["stage"], lifecycle.VERSION_MASK_PATHS)


def test_page_size_rules() -> None:
    assert lifecycle.check_page_size(0) == 50
    assert lifecycle.check_page_size(7) == 7
    assert lifecycle.check_page_size(5000) == 1000
    with pytest.raises(InvalidArgument):
        lifecycle.check_page_size(-1)


@pytest.mark.parametrize("value", ["127.0.0.1:8001", "triton-a.svc:8001", "[::1]:8001"])
def test_valid_addresses(value: str) -> None:
    lifecycle.check_address(value, "backend.address")


@pytest.mark.parametrize("value", ["", "host", ":8001", "host:0", "host:70000", "host:abc"])
def test_invalid_addresses(value: str) -> None:
    with pytest.raises(InvalidArgument):
        lifecycle.check_address(value, "backend.address")
