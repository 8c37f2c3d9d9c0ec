"""What every servegrid service stands on: settings, server lifecycle, errors, telemetry."""

from services.runtime.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    ServegridError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from services.runtime.server import ServiceApp
from services.runtime.settings import ServiceSettings

__all__ = [
    "Aborted",
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "ServegridError",
    "ServiceApp",
    "ServiceSettings",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
]
