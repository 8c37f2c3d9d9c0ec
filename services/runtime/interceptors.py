"""The server interceptors every service runs: errors mapped to statuses, RPC metrics, the request id for logs."""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, NoReturn

import grpc

from services.mesh.names import REQUEST_ID_HEADER
from services.runtime.errors import InvalidArgument, abort_with, internal_status, status_for
from services.runtime.logs import set_request_id
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


async def responses(result: Any) -> AsyncIterator[Any]:
    """A server-streaming handler's responses, whether it is an async generator or a coroutine that
    writes with context.write() and returns (then there is nothing to yield)."""
    if inspect.isasyncgen(result):
        async for item in result:
            yield item
    else:
        await result


class RequestIdInterceptor(grpc.aio.ServerInterceptor):
    """Keeps the caller's x-request-id for the call's log lines (services/runtime/logs.py).

    grpc.aio runs the interceptors and then the handler in one task per call, so a context variable
    set here is what the handler sees, and no other call; no wrapper is needed on the hot path."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        for key, value in details.invocation_metadata or ():
            if key == REQUEST_ID_HEADER and isinstance(value, str):
                set_request_id(value)
                break
        return await continuation(details)


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps each method's handler once (cached by method) and leaves
    health checks and reflection alone: they are not the service's work, and probes must pass."""

    skipped_prefixes = _UNMEASURED_PREFIXES

    def __init__(self) -> None:
        # The generic handlers hand back the same handler on every call, so each method is wrapped
        # once, not once per request.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method: str = details.method
        if handler is None or method.startswith(self.skipped_prefixes):
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(handler, method)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        raise NotImplementedError


class ServiceInterceptor(WrappingInterceptor):
    """One place that turns exceptions into statuses and counts every call.

    - `ServegridError` → its status code, message and ErrorInfo (as `grpc-status-details-bin`).
    - anything else → INTERNAL with a generic message; the traceback goes to the log only.

    - a request that is not valid protobuf → INVALID_ARGUMENT (reason MALFORMED_REQUEST), one log line.

    `passthrough` names full methods ("/pkg.Service/Method") that skip the mapping and the metrics:
    hot paths that map their own errors and record richer metrics of their own, where the wrapper's
    three metric updates would cost a noticeable share of the request. They keep the malformed-request
    check, one type test per call.
    """

    def __init__(self, passthrough: Collection[str] = ()) -> None:
        super().__init__()
        self._passthrough = frozenset(passthrough)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        service, name = _split(method)
        deserializer = tolerant(handler.request_deserializer)
        serializer = handler.response_serializer
        passthrough = method in self._passthrough
        if handler.unary_unary:
            unary = handler.unary_unary
            behavior = _guarded(unary) if passthrough else self._wrap_unary(unary, service, name)
            return grpc.unary_unary_rpc_method_handler(behavior, deserializer, serializer)
        if handler.unary_stream:
            streaming = handler.unary_stream
            behavior = _guarded_stream(streaming) if passthrough else self._wrap_stream(streaming, service, name)
            return grpc.unary_stream_rpc_method_handler(behavior, deserializer, serializer)
        if handler.stream_unary:
            behavior = self._wrap_unary(_guarded_requests(handler.stream_unary), service, name)
            return grpc.stream_unary_rpc_method_handler(behavior, deserializer, serializer)
        behavior = self._wrap_stream(_guarded_requests(handler.stream_stream), service, name)
        return grpc.stream_stream_rpc_method_handler(behavior, deserializer, serializer)

    def _wrap_unary(self, behavior: Callable[..., Any], service: str, name: str) -> Callable[..., Any]:
        async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            in_flight = RPC_IN_FLIGHT.labels(service)
            in_flight.inc()
            code = "OK"
            try:
                if request.__class__ is Undecodable:
                    raise request.error()
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
                if request.__class__ is Undecodable:
                    raise request.error()
                async for item in responses(behavior(request, context)):
                    yield item
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


class Undecodable:
    """What a request that is not valid protobuf for its method decodes to.

    gRPC's own answer to a deserializer that raises is UNKNOWN "Unexpected <class ...DecodeError>"
    and a traceback in the log; the handler instead sees this and answers INVALID_ARGUMENT."""

    __slots__ = ("cause", "type_name")

    def __init__(self, type_name: str, cause: Exception) -> None:
        self.type_name = type_name
        self.cause = cause

    def error(self) -> InvalidArgument:
        return InvalidArgument(
            f"the request is not a valid {self.type_name} message (garbage or truncated protobuf): {self.cause}",
            reason="MALFORMED_REQUEST",
        )


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """`deserializer`, returning an Undecodable instead of raising on bytes it cannot parse."""
    if deserializer is None:
        return None
    owner = getattr(deserializer, "__self__", None)
    descriptor = getattr(owner, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "request")
    parse = deserializer

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except Exception as error:  # protobuf's DecodeError, or whatever a custom deserializer raises
            return Undecodable(type_name, error)

    return deserialize


async def _reject(request: Undecodable, context: grpc.aio.ServicerContext) -> NoReturn:
    error = request.error()
    log.info("rejected an undecodable %s: %s", request.type_name, request.cause, extra={"reason": error.reason})
    await abort_with(context, error.to_grpc_status())


def _guarded(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A passthrough unary method: untouched, except that an undecodable request is refused first."""

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if request.__class__ is Undecodable:
            await _reject(request, context)
        return await behavior(request, context)

    return call


def _guarded_stream(behavior: Callable[..., Any]) -> Callable[..., Any]:
    async def call(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if request.__class__ is Undecodable:
            await _reject(request, context)
        async for item in responses(behavior(request, context)):
            yield item

    return call


def _guarded_requests(behavior: Callable[..., Any]) -> Callable[..., Any]:
    """A client-streaming method: each message is checked as it is read."""

    def call(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async def checked() -> AsyncIterator[Any]:
            async for message in requests:
                if message.__class__ is Undecodable:
                    raise message.error()
                yield message

        return behavior(checked(), context)

    return call


_STATUS_NAMES = {code: code.name for code in grpc.StatusCode}


def _classify(
    exc: BaseException, context: grpc.aio.ServicerContext, service: str, name: str
) -> tuple[str, grpc.Status | None]:
    """Status code name for metrics, and the status to abort with (None: let the exception pass)."""
    if isinstance(exc, grpc.aio.AbortError):  # the handler aborted on its own
        return _code_name(context), None
    if isinstance(exc, asyncio.CancelledError | GeneratorExit | KeyboardInterrupt | SystemExit):
        return "CANCELLED", None
    status = status_for(exc, f"{service}/{name}", log) if isinstance(exc, Exception) else internal_status()
    return _STATUS_NAMES.get(status.code, "INTERNAL"), status


def _record(service: str, name: str, code: str, started: float) -> None:
    RPC_REQUESTS.labels(service, name, code).inc()
    RPC_LATENCY.labels(service, name).observe(time.perf_counter() - started)
