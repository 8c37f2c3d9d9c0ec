"""Prometheus metrics the router exports: probes, snapshots, xDS streams, shadow comparisons, the registry watch."""

from __future__ import annotations

import contextlib

from prometheus_client import Counter, Gauge, Histogram

from services.runtime.metrics import set_state

# A backend as a whole: ServerReady passes (healthy) or not (unhealthy), or an operator drained it.
# Per-model readiness is in servegrid_router_endpoints; breakers and ejections are Envoy's
# (envoy_cluster_circuit_breakers_*_open, envoy_cluster_outlier_detection_ejections_active).
BACKEND_STATES = ("healthy", "unhealthy", "draining")
BACKEND_STATE = Gauge(
    "servegrid_router_backend_state",
    "1 on the state a backend is in (healthy: its probes pass; unhealthy: they fail; draining: an operator "
    "drained it), 0 on the others.",
    ["backend", "state"],
)
SHADOW_REQUESTS = Counter(
    "servegrid_router_shadow_requests_total",
    "Mirrored requests compared with the shadow version, by model, shadow version and outcome "
    "(sent, dropped, error, compared).",
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
SNAPSHOT_BUILDS = Counter(
    "servegrid_router_snapshot_builds_total",
    "xDS snapshots built from the table and endpoint states, by outcome (ok, error).",
    ["outcome"],
)
SNAPSHOT_BUILD_SECONDS = Histogram(
    "servegrid_router_snapshot_build_seconds",
    "Time to build and publish one xDS snapshot.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
)
ENDPOINT_STATES = Gauge(
    "servegrid_router_endpoints",
    "Endpoints (backend x Triton model) by the state Envoy is told: healthy, unhealthy, draining.",
    ["state"],
)
TABLE_REVISION = Gauge("servegrid_router_table_revision", "Revision of the routing table held in memory.")
REGISTRY_CONNECTED = Gauge("servegrid_router_registry_connected", "1 while the WatchRoutes stream is up.")
XDS_CONNECTED = Gauge("servegrid_router_xds_connected", "Envoys with an open ADS stream to this router.")
XDS_RESPONSES = Counter(
    "servegrid_router_xds_responses_total",
    "xDS DiscoveryResponses sent to Envoys, by type (clusters, endpoints, listeners, routes).",
    ["type"],
)
XDS_REJECTIONS = Counter(
    "servegrid_router_xds_rejections_total",
    "xDS versions an Envoy rejected (NACK), by type; each (node, type, version) counts once.",
    ["type"],
)
XDS_ACKED_REVISION = Gauge(
    "servegrid_router_xds_acked_revision",
    "Registry revision every connected Envoy has ACKed, by type (the laggard's; -1 for an unknown version).",
    ["type"],
)


def set_backend_state(backend: str, state: str) -> None:
    set_state(BACKEND_STATE, BACKEND_STATES, state, backend)


def forget_backend(backend: str) -> None:
    """The table no longer names the backend: its series go (a removed backend is not a down one)."""
    for state in BACKEND_STATES:
        with contextlib.suppress(KeyError):  # never probed: no series to remove
            BACKEND_STATE.remove(backend, state)
