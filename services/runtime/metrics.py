"""Prometheus metrics every service exports, and the /metrics HTTP endpoint."""

# Names follow Prometheus' conventions (OpenTelemetry's map onto them): the unit in the name
# (`_seconds`, `_bytes`), `_total` on counters, durations as histograms in seconds, states as a
# labelled 0/1 gauge with one series per named state. Labels take values from a small fixed set
# (methods, codes, states, backends an operator configured), never from tenants or request data.
# Every service's own metrics live in its metrics.py; deploy/observability/ reads them.

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server

# prometheus_client adds a `_created` gauge (the series' creation time) per counter and histogram
# child: as many series again, which no dashboard or rule reads. Off for the whole process (the flag
# is read at each scrape), once, here: every service serves /metrics through this module.
disable_created_metrics()

RPC_REQUESTS = Counter(
    "servegrid_rpc_requests_total",
    "gRPC calls handled, by method and status code.",
    ["grpc_service", "grpc_method", "grpc_code"],
)
RPC_LATENCY = Histogram(
    "servegrid_rpc_duration_seconds",
    "gRPC call handling time, by method.",
    ["grpc_service", "grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RPC_IN_FLIGHT = Gauge(
    "servegrid_rpc_in_flight",
    "gRPC calls being handled now.",
    ["grpc_service"],
)
COMPONENT_UP = Gauge(
    "servegrid_component_up",
    "1 when a dependency (database, cache, broker ...) passes its health check.",
    ["component"],
)

# Set when the port is bound: services load their certificate once, at start, so this is the one they
# serve and call with until they restart (CertificateExpiring alerts on it). A plaintext process
# exports no series, rather than a 0 that reads as long expired.
TLS_CERTIFICATE_EXPIRY = Gauge(
    "servegrid_tls_certificate_expiry_timestamp_seconds",
    "When a certificate this process serves and calls with expires (notAfter), as a Unix time.",
    ["certificate"],
)


def set_state(gauge: Gauge, states: Iterable[str], current: str, *labels: str) -> None:
    """A labelled state gauge: 1 on `current`'s series, 0 on every other state's (one series per state, so
    a dashboard or an alert selects `state="..."` and sees 0 rather than nothing for the states not held)."""
    for state in states:
        gauge.labels(*labels, state).set(1 if state == current else 0)


def serve_metrics(host: str, port: int) -> int:
    """Start the /metrics endpoint in a daemon thread; returns the bound port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
