"""Prometheus metrics of the registry: cache effectiveness, watchers, notification lag, writes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

CACHE_REQUESTS = Counter(
    "servegrid_registry_cache_requests_total",
    "Cache lookups by kind (model, route) and result (hit, miss, error, skipped while Redis is away).",
    ["kind", "result"],
)
WATCHERS = Gauge("servegrid_registry_watchers", "WatchRoutes streams connected to this replica.")
NOTIFY_LAG = Histogram(
    "servegrid_registry_notify_lag_seconds",
    "From a write's commit to this replica having rebuilt the routes it changed.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
ROUTE_UPDATES = Counter(
    "servegrid_registry_route_updates_total", "Routing-table changes this replica sent to its watchers."
)
LISTEN_RECONNECTS = Counter(
    "servegrid_registry_listen_reconnects_total", "Times the LISTEN connection was lost and opened again."
)
WRITES = Counter("servegrid_registry_writes_total", "Committed writes, by operation.", ["operation"])
BACKEND_LOADS = Counter(
    "servegrid_registry_backend_loads_total",
    "Model load/unload requests sent to Triton backends, by action and result.",
    ["action", "result"],
)
