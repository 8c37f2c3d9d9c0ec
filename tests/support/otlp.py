"""A small real OTLP trace receiver for tests: OTLP/gRPC (Envoy, the Python services) and OTLP/HTTP (Triton).

Both endpoints decode the collector protocol's own messages (opentelemetry-proto) into `ReceivedSpan`s
kept in memory, so a test can wait for a trace and check who is whose parent. OTLP/HTTP takes protobuf
and JSON bodies: Triton 2.51's exporter (opentelemetry-cpp 1.13) posts JSON, with hex span ids.
"""

from __future__ import annotations

import base64
import gzip
import json
import threading
import time
from collections.abc import Callable, Iterable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import grpc
from google.protobuf import json_format
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, kind) if kind else None


def _attributes(pairs: Iterable[common_pb2.KeyValue]) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as an exporter sent it; ids as lowercase hex, parent_span_id "" for a root."""

    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    attributes: dict[str, Any] = field(default_factory=dict)
    links: tuple[tuple[str, str], ...] = ()  # (trace_id, span_id) of each link

    @property
    def kind_name(self) -> str:
        return trace_pb2.Span.SpanKind.Name(trace_pb2.Span.SpanKind.ValueType(self.kind))


def decode(request: trace_service_pb2.ExportTraceServiceRequest) -> list[ReceivedSpan]:
    spans = []
    for resource_spans in request.resource_spans:
        service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        service=service,
                        name=span.name,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        kind=span.kind,
                        attributes=_attributes(span.attributes),
                        links=tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                    )
                )
    return spans


_ID_KEYS = ("traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id")


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON writes ids as hex (the spec's one departure from protobuf's JSON mapping, which wants base64)."""
    if isinstance(node, list):
        return [_hex_ids_to_base64(v) for v in node]
    if isinstance(node, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in _ID_KEYS and isinstance(v, str)
            else _hex_ids_to_base64(v)
            for k, v in node.items()
        }
    return node


def parse_http_body(body: bytes, content_type: str) -> trace_service_pb2.ExportTraceServiceRequest:
    """An OTLP/HTTP export body, protobuf or JSON."""
    request = trace_service_pb2.ExportTraceServiceRequest()
    if "json" in content_type:
        json_format.ParseDict(_hex_ids_to_base64(json.loads(body)), request, ignore_unknown_fields=True)
    else:
        request.ParseFromString(body)
    return request


def describe(spans: Iterable[ReceivedSpan]) -> str:
    """One line per span: service, name, kind, span id <- parent span id (for assertion messages)."""
    return "\n".join(
        f"{s.service:18} {s.name:44} {s.kind_name:18} {s.span_id} <- {s.parent_span_id or '-'}" for s in spans
    )


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, receiver: OtlpReceiver) -> None:
        self._receiver = receiver

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self._receiver.add(decode(request))
        return trace_service_pb2.ExportTraceServiceResponse()


def _http_handler(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length") or 0))
            if self.headers.get("content-encoding") == "gzip":
                body = gzip.decompress(body)
            content_type = self.headers.get("content-type") or ""
            if self.path != "/v1/traces" or not ("json" in content_type or "protobuf" in content_type):
                self.send_response(415 if self.path == "/v1/traces" else 404)
                self.end_headers()
                return
            receiver.add(decode(parse_http_body(body, content_type)))
            reply = (
                b"{}" if "json" in content_type else trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            )
            self.send_response(200)
            self.send_header("content-type", "application/json" if "json" in content_type else "application/x-protobuf")
            self.send_header("content-length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            return

    return Handler


class OtlpReceiver:
    """OTLP/gRPC on `grpc_endpoint` (host:port) and OTLP/HTTP on `http_url` (host:port/v1/traces), in threads."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), self._grpc)
        self._grpc_port = self._grpc.add_insecure_port(f"{host}:0")
        self._http = ThreadingHTTPServer((host, 0), _http_handler(self))
        self._http_thread = threading.Thread(target=self._http.serve_forever, name="otlp-http", daemon=True)
        self.host = host

    @property
    def grpc_endpoint(self) -> str:
        return f"{self.host}:{self._grpc_port}"

    @property
    def http_url(self) -> str:
        """Without a scheme, as Triton's `opentelemetry,url=` takes it."""
        return f"{self.host}:{self._http.server_address[1]}/v1/traces"

    def start(self) -> OtlpReceiver:
        self._grpc.start()
        self._http_thread.start()
        return self

    def stop(self) -> None:
        self._grpc.stop(grace=0.5)
        self._http.shutdown()
        self._http.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._changed:
            self._spans.extend(spans)
            self._changed.notify_all()

    def spans(self, trace_id: str | None = None) -> list[ReceivedSpan]:
        with self._changed:
            return [s for s in self._spans if trace_id is None or s.trace_id == trace_id]

    def wait_for(
        self, condition: Callable[[list[ReceivedSpan]], bool], timeout_s: float = 30.0, what: str = "spans"
    ) -> list[ReceivedSpan]:
        """Block until `condition(all spans so far)` holds (re-checked on every export); return the spans."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while not condition(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = sorted({(s.service, s.name) for s in self._spans})
                    raise AssertionError(f"no {what} within {timeout_s}s; received (service, name): {seen}")
                self._changed.wait(left)
            return list(self._spans)

    def wait_for_trace(
        self, trace_id: str, services: Iterable[str], timeout_s: float = 30.0, whole: bool = True
    ) -> dict[str, list[ReceivedSpan]]:
        """The trace's spans by service once every one of `services` has sent at least one and, when
        `whole`, every span's parent has arrived too (each process exports on its own flush interval:
        Triton's span can land before the Envoy span it is the child of)."""
        wanted = set(services)

        def complete(spans: list[ReceivedSpan]) -> bool:
            ours = [s for s in spans if s.trace_id == trace_id]
            if not wanted <= {s.service for s in ours}:
                return False
            ids = {s.span_id for s in ours}
            return not whole or all(not s.parent_span_id or s.parent_span_id in ids for s in ours)

        try:
            what = f"spans of {sorted(wanted)} in trace {trace_id}" + (", every parent among them" if whole else "")
            self.wait_for(complete, timeout_s, what=what)
        except AssertionError as missing:
            raise AssertionError(f"{missing}\nthe trace so far:\n{describe(self.spans(trace_id))}") from None
        by_service: dict[str, list[ReceivedSpan]] = {}
        for span in self.spans(trace_id):
            by_service.setdefault(span.service, []).append(span)
        return by_service
