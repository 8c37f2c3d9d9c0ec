"""Domain errors and the one mapping from them to gRPC status codes with google.rpc.ErrorInfo."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import ClassVar, NoReturn

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

DOMAIN = "servegrid.dev"
_DETAILS_KEY = "grpc-status-details-bin"


class ServegridError(Exception):
    """An error a caller can act on. Subclasses fix the status code; `reason` names the case."""

    code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN
    default_reason: ClassVar[str] = "UNKNOWN"

    def __init__(
        self,
        message: str,
        *,
        reason: str | None = None,
        metadata: Mapping[str, str] | None = None,
        field_violations: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or self.default_reason
        self.metadata = dict(metadata or {})
        self.field_violations = list(field_violations)

    def to_status_proto(self) -> status_pb2.Status:
        """google.rpc.Status with an ErrorInfo (and a BadRequest when fields are named)."""
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata)
        details = [_pack(info)]
        if self.field_violations:
            bad = error_details_pb2.BadRequest(
                field_violations=[
                    error_details_pb2.BadRequest.FieldViolation(field=f, description=d)
                    for f, d in self.field_violations
                ]
            )
            details.append(_pack(bad))
        return status_pb2.Status(code=self.code.value[0], message=self.message, details=details)

    def to_grpc_status(self) -> grpc.Status:
        return rpc_status.to_status(self.to_status_proto())


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


class InvalidArgument(ServegridError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "INVALID_ARGUMENT"


class NotFound(ServegridError):
    code = grpc.StatusCode.NOT_FOUND
    default_reason = "NOT_FOUND"


class AlreadyExists(ServegridError):
    code = grpc.StatusCode.ALREADY_EXISTS
    default_reason = "ALREADY_EXISTS"


class FailedPrecondition(ServegridError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    default_reason = "FAILED_PRECONDITION"


class Aborted(ServegridError):
    code = grpc.StatusCode.ABORTED
    default_reason = "ABORTED"


class PermissionDenied(ServegridError):
    code = grpc.StatusCode.PERMISSION_DENIED
    default_reason = "PERMISSION_DENIED"


class Unauthenticated(ServegridError):
    code = grpc.StatusCode.UNAUTHENTICATED
    default_reason = "UNAUTHENTICATED"


class ResourceExhausted(ServegridError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    default_reason = "RESOURCE_EXHAUSTED"


class Unavailable(ServegridError):
    code = grpc.StatusCode.UNAVAILABLE
    default_reason = "UNAVAILABLE"


class DeadlineExceeded(ServegridError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    default_reason = "DEADLINE_EXCEEDED"


class Unimplemented(ServegridError):
    code = grpc.StatusCode.UNIMPLEMENTED
    default_reason = "UNIMPLEMENTED"


INTERNAL_MESSAGE = "internal error; the server logged the details"


def internal_status() -> grpc.Status:
    """The only thing a caller learns about an unexpected failure."""
    status = status_pb2.Status(
        code=code_pb2.INTERNAL,
        message=INTERNAL_MESSAGE,
        details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))],
    )
    return rpc_status.to_status(status)


def status_for(exc: Exception, method: str, logger: logging.Logger) -> grpc.Status:
    """The one mapping from an exception to what the caller gets, logged once: a ServegridError's own
    status (one info line: the caller's mistake or a known condition), anything else INTERNAL with
    the traceback in the log only. Used by the runtime's interceptor and by passthrough hot paths."""
    if isinstance(exc, ServegridError):
        logger.info(
            "%s: %s %s", method, exc.code.name, exc.message, extra={"grpc_code": exc.code.name, "reason": exc.reason}
        )
        return exc.to_grpc_status()
    logger.error("%s failed unexpectedly", method, exc_info=exc)
    return internal_status()


async def abort_with(context: grpc.aio.ServicerContext, status: grpc.Status) -> NoReturn:
    """End the call with `status`: its code, message and details (ErrorInfo) in trailing metadata."""
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("abort returns only by raising")


# The only trailer relayed: the google.rpc.Status (ErrorInfo, BadRequest) the upstream service attached.
_RELAYED_TRAILERS = (_DETAILS_KEY,)


async def relay(error: grpc.aio.AioRpcError, context: grpc.aio.ServicerContext) -> NoReturn:
    """End the call with another servegrid service's status unchanged: code, message and ErrorInfo details.

    `context.abort` wants a tuple of (key, value) pairs; an RPC error's trailers are a
    grpc.aio.Metadata, which it refuses (a TypeError that turned every relayed error into INTERNAL)."""
    trailers = tuple((key, value) for key, value in error.trailing_metadata() or () if key in _RELAYED_TRAILERS)
    await context.abort(error.code(), error.details() or "", trailers)
    raise AssertionError("abort returns only by raising")


def status_details(
    metadata: Sequence[tuple[str, str | bytes]] | None,
) -> tuple[status_pb2.Status | None, error_details_pb2.ErrorInfo | None]:
    """Read google.rpc.Status and its ErrorInfo from an RPC's trailing metadata (client side)."""
    for key, value in metadata or ():
        if key == _DETAILS_KEY and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            for detail in status.details:
                if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                    info = error_details_pb2.ErrorInfo()
                    detail.Unpack(info)
                    return status, info
            return status, None
    return None, None
