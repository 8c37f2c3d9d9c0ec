"""OpenTelemetry tracing: OTLP export when OTEL_EXPORTER_OTLP_ENDPOINT is set, else a no-op; and the W3C
trace context and request id a service carries from one hop to the next (gRPC metadata, Kafka headers)."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from services.mesh.names import REQUEST_ID_HEADER, TRACEPARENT_HEADER, TRACESTATE_HEADER

log = logging.getLogger(__name__)

# The W3C trace context headers a hop passes on (what Envoy's OpenTelemetry tracer reads and writes).
TRACE_HEADERS = (TRACEPARENT_HEADER, TRACESTATE_HEADER)
# Passed on to the next hop of the same request, whether or not this process traces: the request id,
# the W3C trace context, and B3's (a Zipkin-style tracer in front of the mesh may send those).
_CARRIED = (REQUEST_ID_HEADER, *TRACE_HEADERS, "x-b3-traceid", "x-b3-spanid", "x-b3-sampled")
_unavailable = False  # the exporter could not be loaded: run untraced rather than not at all


def tracing_enabled() -> bool:
    configured = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return bool(configured) and not _unavailable


def setup_tracing(service: str) -> bool:
    """Install a tracer provider exporting over OTLP/gRPC. Returns whether tracing is on."""
    global _unavailable
    if not tracing_enabled():
        return False
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError as error:
        # Seen when another package's older copy of opentelemetry/proto/ overwrote opentelemetry-proto's
        # (xds-protos ships one): a service must still serve, so it runs untraced and says why.
        _unavailable = True
        log.error("tracing is off: the OTLP exporter cannot be loaded (%s); reinstall opentelemetry-proto", error)
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    return True


def server_interceptors() -> list[grpc.aio.ServerInterceptor]:
    """The OTel server interceptor, leaving health checks out of traces; empty when tracing is off."""
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

    return [aio_server_interceptor(filter_=filters.negate(filters.health_check()))]


def client_interceptors() -> list[Any]:
    """Interceptors for outgoing grpc.aio channels so traces continue into the next hop."""
    if not tracing_enabled():
        return []
    from opentelemetry.instrumentation.grpc import aio_client_interceptors

    return list(aio_client_interceptors())


def shutdown_tracing() -> None:
    provider = trace.get_tracer_provider()
    shutdown = getattr(provider, "shutdown", None)
    if callable(shutdown):
        shutdown()


def carried_metadata(incoming: Iterable[tuple[str, str | bytes]] | None) -> list[tuple[str, str]]:
    """What a service sends on to the next hop of the same request: the caller's request id and trace
    context as they came. When this process traces, its client interceptor writes its own span's
    traceparent over the caller's, so the next hop hangs under this one either way."""
    return [(k, v) for k, v in incoming or () if k in _CARRIED and isinstance(v, str)]


def trace_context(incoming: Iterable[tuple[str, str | bytes]] | None = None) -> dict[str, str]:
    """The W3C trace context to store or send with work that outlives the call (a batch job): the
    current span's when this process traces, else the caller's traceparent/tracestate, so the trace
    goes on through a process that does not trace."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        propagate.inject(carrier)
    else:
        carrier = {k: v for k, v in incoming or () if k in TRACE_HEADERS and isinstance(v, str)}
    return {k: v for k, v in carrier.items() if k in TRACE_HEADERS}


def resumed(carrier: Mapping[str, str]) -> otel_context.Context:
    """The context to start a span in that continues the trace stored in `carrier` (trace_context's)."""
    return propagate.extract(dict(carrier))
