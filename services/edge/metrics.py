"""Prometheus metrics of the edge's decisions."""

from __future__ import annotations

from prometheus_client import Counter

# No tenant label, here or below: a label per tenant is a series per tenant, growing without bound
# (43 after one afternoon of tests). Who was refused is in Envoy's access log (`tenant`, `details`) and
# in the edge's own log lines; a tenant's usage is in Redis (its window counters).
DECISIONS = Counter(
    "servegrid_edge_decisions_total",
    "Edge decisions by kind (authz: an API-key check; token: an API key exchanged) and outcome "
    "(ok, missing, invalid, revoked, error; limited: an exchange past the tenant's rate limit).",
    ["kind", "outcome"],
)
QUOTA_ASSIGNMENTS = Counter(
    "servegrid_edge_quota_assignments_total",
    "Bucket assignments the quota server sent Envoy, by outcome: lease (new tokens), keep (same lease, "
    "TTL renewed), deny (limit reached: DENY_ALL), fail_open (counters unreachable: ALLOW_ALL).",
    ["outcome"],
)
QUOTA_REQUESTS = Counter(
    "servegrid_edge_quota_requests_total",
    "Requests Envoy reported to the quota server, by what its token buckets decided (allowed, denied).",
    ["decision"],
)

# Every (kind, outcome) the edge can decide, exported at 0 from the start.
OUTCOMES = {
    "authz": ("ok", "missing", "invalid", "revoked", "error"),
    "token": ("ok", "invalid", "revoked", "limited"),
}
_DECISIONS = {
    (kind, outcome): DECISIONS.labels(kind, outcome) for kind, outcomes in OUTCOMES.items() for outcome in outcomes
}
_QUOTA = {outcome: QUOTA_ASSIGNMENTS.labels(outcome) for outcome in ("lease", "keep", "deny", "fail_open")}
_ALLOWED, _DENIED = QUOTA_REQUESTS.labels("allowed"), QUOTA_REQUESTS.labels("denied")


def count_decision(kind: str, outcome: str) -> None:
    """One decision (kind: authz, token; outcome: one of OUTCOMES[kind])."""
    _DECISIONS[kind, outcome].inc()


def count_quota(outcome: str) -> None:
    """One assignment sent (outcome: lease, keep, deny, fail_open)."""
    _QUOTA[outcome].inc()


def count_reported(allowed: int, denied: int) -> None:
    """What one bucket's usage report said."""
    if allowed:
        _ALLOWED.inc(allowed)
    if denied:
        _DENIED.inc(denied)
