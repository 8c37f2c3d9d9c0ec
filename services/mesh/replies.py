"""The error shape servegrid answers in, for replies Envoy writes itself (no service behind them).

Every servegrid service maps an error to a gRPC status whose details carry a google.rpc.ErrorInfo
(domain servegrid.dev), and over REST to `{"code", "message", "details"}`. Envoy's own replies (direct
responses, local replies, the rate-limit and auth filters' denials) are built from these two functions,
so a client cannot tell which hop refused it.
"""

from __future__ import annotations

import base64
import json
from functools import cache
from typing import Any

from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from services.mesh.names import ERROR_DOMAIN

ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"


@cache
def status_details(code: int, message: str, reason: str) -> str:
    """grpc-status-details-bin: google.rpc.Status with an ErrorInfo, base64 as the header carries it."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    status = status_pb2.Status(code=code, message=message, details=[info])
    return base64.b64encode(status.SerializeToString(deterministic=True)).decode()


def error_body(code: int, message: str, reason: str) -> dict[str, Any]:
    """The REST error object: what the transcoder makes of a service's status, written by hand."""
    return {
        "code": code,
        "message": message,
        "details": [{"@type": ERROR_INFO_TYPE, "reason": reason, "domain": ERROR_DOMAIN}],
    }


def error_json(code: int, message: str, reason: str) -> str:
    """error_body as compact JSON text with a trailing newline (a direct response's body)."""
    return json.dumps(error_body(code, message, reason), separators=(",", ":")) + "\n"
