"""The registry's rules: valid ids, stage transitions, traffic policies and update masks."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from services.registry.domain import (
    SERVABLE_STAGES,
    LoadBalancing,
    ModelVersion,
    Stage,
    TrafficPolicy,
)
from services.runtime.errors import FailedPrecondition, InvalidArgument

ID_PATTERN = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
# gRPC metadata keys are lowercase; "grpc-" keys belong to gRPC itself.
HEADER_PATTERN = re.compile(r"^(?!grpc-)[a-z0-9][a-z0-9_.-]{0,99}$")
MAX_TEXT = 4096
MAX_LABELS = 64

# Allowed moves, as the proto documents them: the happy path, STAGING back to DRAFT, anything to
# ARCHIVED, and ARCHIVED back to STAGING (un-retire for a rollback).
TRANSITIONS: Mapping[Stage, frozenset[Stage]] = {
    Stage.DRAFT: frozenset({Stage.STAGING, Stage.ARCHIVED}),
    Stage.STAGING: frozenset({Stage.PRODUCTION, Stage.DRAFT, Stage.ARCHIVED}),
    Stage.PRODUCTION: frozenset({Stage.ARCHIVED}),
    Stage.ARCHIVED: frozenset({Stage.STAGING}),
}

MODEL_MASK_PATHS = frozenset({"description", "task", "labels"})
VERSION_MASK_PATHS = frozenset({"description", "artifact_uri", "triton_model_name", "triton_model_version"})
BACKEND_MASK_PATHS = frozenset({"address", "http_address", "labels", "triton_models", "weight", "drained"})


def check_id(value: str, field: str) -> str:
    """Model and backend ids: 1-63 of [a-z0-9_-], starting with a letter."""
    if not ID_PATTERN.fullmatch(value):
        raise InvalidArgument(
            f"{field} {value!r} is not a valid id: 1 to 63 lowercase letters, digits, '-' or '_', "
            "starting with a letter",
            field_violations=[(field, "must match ^[a-z][a-z0-9_-]{0,62}$")],
        )
    return value


def check_version_number(value: int, field: str = "version") -> int:
    if value <= 0:
        raise InvalidArgument(f"{field} must be a positive version number", field_violations=[(field, "must be > 0")])
    return value


def check_text(value: str, field: str, *, required: bool = False, limit: int = MAX_TEXT) -> str:
    if required and not value:
        raise InvalidArgument(f"{field} is required", field_violations=[(field, "required")])
    if len(value) > limit:
        raise InvalidArgument(f"{field} is too long", field_violations=[(field, f"at most {limit} characters")])
    return value


def check_labels(labels: Mapping[str, str], field: str) -> dict[str, str]:
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(f"{field} has too many entries", field_violations=[(field, f"at most {MAX_LABELS}")])
    for key, value in labels.items():
        if not key or len(key) > 63 or len(value) > 255:
            raise InvalidArgument(
                f"{field} entry {key!r} is invalid",
                field_violations=[(f"{field}[{key}]", "key 1-63 characters, value at most 255")],
            )
    return dict(labels)


def check_address(value: str, field: str) -> str:
    """A gRPC target "host:port" (IPv6 hosts in brackets)."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or len(value) > 255:
        raise InvalidArgument(
            f"{field} {value!r} is not host:port", field_violations=[(field, "must be host:port with port 1-65535")]
        )
    return value


def check_page_size(page_size: int, default: int = 50, maximum: int = 1000) -> int:
    """0 means the default, sizes above the maximum are clamped, negative sizes are refused (AIP-158)."""
    if page_size < 0:
        raise InvalidArgument("page_size must not be negative", field_violations=[("page_size", "must be >= 0")])
    return min(page_size or default, maximum)


def check_mask(paths: Sequence[str], allowed: frozenset[str], field: str = "update_mask") -> frozenset[str]:
    """Known paths only; "*" means every updatable field."""
    if not paths:
        raise InvalidArgument(f"{field} is required", field_violations=[(field, "name at least one field")])
    if list(paths) == ["*"]:
        return allowed
    unknown = sorted(set(paths) - allowed)
    if unknown:
        raise InvalidArgument(
            f"{field} names fields that cannot be updated: {', '.join(unknown)}",
            field_violations=[(field, f"unknown or immutable path {p!r}; allowed: {sorted(allowed)}") for p in unknown],
        )
    return frozenset(paths)


def check_transition(current: Stage, target: Stage, *, model_id: str, version: int) -> None:
    """Refuse moves the lifecycle does not allow (FAILED_PRECONDITION, INVALID_STAGE_TRANSITION)."""
    if target == Stage.UNSPECIFIED:
        raise InvalidArgument("stage is required", field_violations=[("stage", "required")])
    if target not in TRANSITIONS[current]:
        raise FailedPrecondition(
            f"version {version} of model {model_id!r} cannot move from {current.name} to {target.name}; "
            f"from {current.name} it can move to {', '.join(sorted(s.name for s in TRANSITIONS[current]))}",
            reason="INVALID_STAGE_TRANSITION",
            metadata={"model_id": model_id, "version": str(version), "from": current.name, "to": target.name},
        )


def check_leaving_policy(policy: TrafficPolicy | None, version: ModelVersion, target: Stage) -> None:
    """A version the traffic policy sends traffic to must stay servable until the policy changes."""
    if policy is None or target in SERVABLE_STAGES or version.version not in policy.referenced_versions():
        return
    raise FailedPrecondition(
        f"version {version.version} of model {version.model_id!r} is in the traffic policy; "
        f"change the policy before moving it to {target.name}",
        reason="INVALID_STAGE_TRANSITION",
        metadata={"model_id": version.model_id, "version": str(version.version), "to": target.name},
    )


def versions_to_archive(
    promoted: ModelVersion, others: Iterable[ModelVersion], policy: TrafficPolicy | None
) -> list[ModelVersion]:
    """On promotion to PRODUCTION: the other PRODUCTION versions that the policy sends no traffic to.

    Those the policy splits traffic with stay in PRODUCTION, so a canary can be promoted while
    the old version still takes its share.
    """
    kept = policy.referenced_versions() if policy is not None else set()
    return [
        v for v in others if v.stage == Stage.PRODUCTION and v.version != promoted.version and v.version not in kept
    ]


def check_policy(policy: TrafficPolicy, versions: Mapping[int, ModelVersion]) -> None:
    """Weights sum to 100 over distinct servable versions; shadow names a servable version; sane header."""
    seen: set[int] = set()
    for i, split in enumerate(policy.splits):
        where = f"policy.splits[{i}]"
        if split.version in seen:
            raise _policy_error(policy, f"version {split.version} appears twice", f"{where}.version", "duplicate")
        seen.add(split.version)
        if not 0 <= split.weight <= 100:
            raise _policy_error(policy, f"weight {split.weight} is outside 0..100", f"{where}.weight", "0 to 100")
        _check_servable(policy, versions, split.version, f"{where}.version")
    total = sum(s.weight for s in policy.splits)
    if policy.splits and total != 100:
        raise _policy_error(policy, f"split weights sum to {total}, not 100", "policy.splits", "must sum to 100")
    if policy.shadow is not None:
        if not 0.0 <= policy.shadow.sample_rate <= 1.0:
            raise _policy_error(
                policy, "shadow sample_rate must be 0.0 to 1.0", "policy.shadow.sample_rate", "0.0 to 1.0"
            )
        _check_servable(policy, versions, policy.shadow.version, "policy.shadow.version")
    if policy.sticky_header and not HEADER_PATTERN.fullmatch(policy.sticky_header):
        raise _policy_error(
            policy,
            f"sticky_header {policy.sticky_header!r} is not a valid lowercase header name",
            "policy.sticky_header",
            "lowercase letters, digits, '-', '_', '.'; not grpc-",
        )
    if policy.load_balancing not in set(LoadBalancing):
        raise _policy_error(policy, "unknown load_balancing", "policy.load_balancing", "unknown value")


def _policy_error(policy: TrafficPolicy, message: str, field: str, why: str) -> InvalidArgument:
    return InvalidArgument(
        message,
        reason="INVALID_TRAFFIC_POLICY",
        field_violations=[(field, why)],
        metadata={"model_id": policy.model_id},
    )


def _check_servable(policy: TrafficPolicy, versions: Mapping[int, ModelVersion], number: int, field: str) -> None:
    version = versions.get(number)
    if version is None or version.stage not in SERVABLE_STAGES:
        stage = "does not exist" if version is None else f"is in {version.stage.name}"
        raise _policy_error(
            policy, f"version {number} {stage}; traffic can only go to STAGING or PRODUCTION versions", field, stage
        )
