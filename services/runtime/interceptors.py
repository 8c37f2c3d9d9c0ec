"""The server interceptor every service runs: maps domain errors to statuses and records RPC metrics."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any

import grpc

from services.runtime.errors import ServegridError, abort_with, internal_status
from services.runtime.metrics import RPC_IN_FLIGHT, RPC_LATENCY, RPC_REQUESTS

log = logging.getLogger(__name__)

# Probes and reflection would drown the RPC metrics; they are not the service's work.
_UNMEASURED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")


def _split(method: str) -> tuple[str, str]:
    service, _, name = method.lstrip("/").rpartition("/")
    return service, name


def _code_name(context: grpc.aio.ServicerContext) -> str:
    code = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return code.name
    for status in grpc.StatusCode:  # some grpc versions hand back the integer value
        if status.value[0] == code:
            return status.name
    return "UNKNOWN"


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    """One place that turns exceptions into statuses and counts every call.

    - `ServegridError` → its status code, message and ErrorInfo (as `grpc-status-details-bin`).
    - anything else → INTERNAL with a generic message; the traceback goes to the log only.

    `passthrough` names full methods ("/pkg.Service/Method") left untouched: hot paths that map
    their own errors and record richer metrics of their own, where wrapping each call would cost
    a noticeable share of the request (a new handler, a wrapper coroutine and three metric updates).
    """

    def __init__(self, passthrough: Collection[str] = ()) -> None:
        self._passthrough = frozenset(passthrough)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method in self._passthrough or method.startswith(_UNMEASURED_PREFIXES):
            return handler
        service, name = _split(method)
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, service, name),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, service, name),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, service, name),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, service, name),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )

    def _wrap_unary(self, behavior: Callable[..., Any], service: str, name: str) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            in_flight = RPC_IN_FLIGHT.labels(service)
            in_flight.inc()
            code = "OK"
            try:
                response = await behavior(request, context)
                code = _code_name(context)
                return response
            except BaseException as exc:
                code, status = _classify(exc, context, service, name)
                if status is None:
                    raise
                await abort_with(context, status)
            finally:
                in_flight.dec()
                _record(service, name, code, started)

        return call

    def _wrap_stream(self, behavior: Callable[..., Any], service: str, name: str) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            started = time.perf_counter()
            in_flight = RPC_IN_FLIGHT.labels(service)
            in_flight.inc()
            code = "OK"
            try:
                result = behavior(request, context)
                if inspect.isasyncgen(result):
                    async for item in result:
                        yield item
                else:  # a handler that writes with context.write() and returns
                    await result
                code = _code_name(context)
            except BaseException as exc:
                code, status = _classify(exc, context, service, name)
                if status is None:
                    raise
                await abort_with(context, status)
            finally:
                in_flight.dec()
                _record(service, name, code, started)

        return call


def _classify(
    exc: BaseException, context: grpc.aio.ServicerContext, service: str, name: str
) -> tuple[str, grpc.Status | None]:
    """Status code name for metrics, and the status to abort with (None: let the exception pass)."""
    if isinstance(exc, grpc.aio.AbortError):  # the handler aborted on its own
        return _code_name(context), None
    if isinstance(exc, asyncio.CancelledError | GeneratorExit | KeyboardInterrupt | SystemExit):
        return "CANCELLED", None
    if isinstance(exc, ServegridError):
        log.info(
            "%s/%s: %s %s",
            service,
            name,
            exc.code.name,
            exc.message,
            extra={"grpc_code": exc.code.name, "reason": exc.reason},
        )
        return exc.code.name, exc.to_grpc_status()
    log.error("%s/%s failed unexpectedly", service, name, exc_info=exc)
    return "INTERNAL", internal_status()


def _record(service: str, name: str, code: str, started: float) -> None:
    RPC_REQUESTS.labels(service, name, code).inc()
    RPC_LATENCY.labels(service, name).observe(time.perf_counter() - started)
