"""Prometheus metrics of the edge's decisions."""

from __future__ import annotations

from prometheus_client import Counter

DECISIONS = Counter(
    "servegrid_edge_decisions_total",
    "Edge decisions by kind (authz, token), tenant and outcome (ok, denied, error...).",
    ["kind", "tenant", "outcome"],
)
# Rate-limit quota: no tenant label on purpose (one series per tenant grows without bound); a
# tenant's state is in Redis (its window counters) and in Envoy's access log.
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

_children: dict[tuple[str, str, str], Counter] = {}
_QUOTA = {outcome: QUOTA_ASSIGNMENTS.labels(outcome) for outcome in ("lease", "keep", "deny", "fail_open")}
_ALLOWED, _DENIED = QUOTA_REQUESTS.labels("allowed"), QUOTA_REQUESTS.labels("denied")


def count_decision(kind: str, tenant: str, outcome: str) -> None:
    """DECISIONS.labels(...).inc(), with the child looked up once per label set (a hot path)."""
    key = (kind, tenant, outcome)
    child = _children.get(key)
    if child is None:
        child = _children[key] = DECISIONS.labels(kind, tenant, outcome)
    child.inc()


def count_quota(outcome: str) -> None:
    """One assignment sent (outcome: lease, keep, deny, fail_open)."""
    _QUOTA[outcome].inc()


def count_reported(allowed: int, denied: int) -> None:
    """What one bucket's usage report said."""
    if allowed:
        _ALLOWED.inc(allowed)
    if denied:
        _DENIED.inc(denied)
