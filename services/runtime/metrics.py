"""Prometheus metrics every service exports, and the /metrics HTTP endpoint."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

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


def serve_metrics(host: str, port: int) -> int:
    """Start the /metrics endpoint in a daemon thread; returns the bound port (useful with port 0)."""
    server, _thread = start_http_server(port, addr=host)
    return int(server.server_port)
