"""Prometheus metrics of the edge's decisions."""

from __future__ import annotations

from prometheus_client import Counter

DECISIONS = Counter(
    "servegrid_edge_decisions_total",
    "Edge decisions by kind (ratelimit, authz), tenant and outcome (ok, over_limit, denied, error...).",
    ["kind", "tenant", "outcome"],
)


_children: dict[tuple[str, str, str], Counter] = {}


def count_decision(kind: str, tenant: str, outcome: str) -> None:
    """DECISIONS.labels(...).inc(), with the child looked up once per label set (a hot path)."""
    key = (kind, tenant, outcome)
    child = _children.get(key)
    if child is None:
        child = _children[key] = DECISIONS.labels(kind, tenant, outcome)
    child.inc()
