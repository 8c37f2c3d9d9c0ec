"""Prometheus metrics the router exports, per model, version and backend."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter(
    "servegrid_router_requests_total",
    "ModelInfer calls answered by the router, by model, registry version, backend and status code.",
    ["model", "version", "backend", "code"],
)
LATENCY = Histogram(
    "servegrid_router_request_duration_seconds",
    "ModelInfer time through the router (retries included), by model and registry version.",
    ["model", "version"],
    buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RETRIES = Counter(
    "servegrid_router_retries_total",
    "Attempts retried on another try, by model and the status that caused them.",
    ["model", "code"],
)
RETRY_BUDGET_EXHAUSTED = Counter(
    "servegrid_router_retry_budget_exhausted_total",
    "Retryable failures returned to the caller because the retry budget was empty.",
    ["model"],
)
BREAKER_STATE = Gauge(
    "servegrid_router_breaker_state",
    "Circuit breaker state per backend: 1 closed, 2 open, 3 half-open.",
    ["backend"],
)
BREAKER_TRANSITIONS = Counter(
    "servegrid_router_breaker_transitions_total",
    "Circuit breaker state changes per backend, by the state entered.",
    ["backend", "state"],
)
EJECTIONS = Counter(
    "servegrid_router_ejections_total",
    "Passive outlier ejections per backend (consecutive connection failures).",
    ["backend"],
)
BACKEND_HEALTHY = Gauge(
    "servegrid_router_backend_healthy",
    "1 when a backend's active probes pass.",
    ["backend"],
)
SHADOW_REQUESTS = Counter(
    "servegrid_router_shadow_requests_total",
    "Shadow copies by model, shadow version and outcome (sent, dropped, error, compared).",
    ["model", "version", "outcome"],
)
SHADOW_MAX_ABS_DIFF = Histogram(
    "servegrid_router_shadow_max_abs_diff",
    "Largest absolute difference between primary and shadow outputs, per compared request.",
    ["model", "version"],
    buckets=(0, 1e-6, 1e-4, 1e-2, 0.1, 1, 10, 100, float("inf")),
)
SHADOW_ARGMAX_MISMATCHES = Counter(
    "servegrid_router_shadow_argmax_mismatches_total",
    "Rows whose argmax (predicted class) differs between primary and shadow outputs.",
    ["model", "version"],
)
TABLE_REVISION = Gauge("servegrid_router_table_revision", "Revision of the routing table held in memory.")
REGISTRY_CONNECTED = Gauge("servegrid_router_registry_connected", "1 while the WatchRoutes stream is up.")
