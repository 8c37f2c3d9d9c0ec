"""Structured logs: one JSON object per line, carrying the current trace and span ids and request id."""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

from opentelemetry import trace

# The request id (x-request-id, made by Envoy) of the work this task is doing: set for a call by the
# runtime's RequestIdInterceptor, for a batch item by the worker. Every log line carries it.
_REQUEST_ID: ContextVar[str] = ContextVar("servegrid_request_id", default="")


def current_request_id() -> str:
    """The request id of the call or batch item being worked on; "" when there is none."""
    return _REQUEST_ID.get()


def set_request_id(request_id: str) -> None:
    """For the rest of this task (a gRPC call runs in one): used by the server interceptor."""
    _REQUEST_ID.set(request_id)


@contextlib.contextmanager
def request_id_scope(request_id: str) -> Iterator[None]:
    """Log as part of request `request_id` inside the block (a batch item's submitting request)."""
    token = _REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        _REQUEST_ID.reset(token)


# LogRecord attributes that are not user extras.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats records as JSON with the service name, trace context and any `extra=` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            entry["trace_id"] = format(ctx.trace_id, "032x")
            entry["span_id"] = format(ctx.span_id, "016x")
        if request_id := _REQUEST_ID.get():
            entry["request_id"] = request_id
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Route every logger to stderr in the chosen format. Idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(service))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
