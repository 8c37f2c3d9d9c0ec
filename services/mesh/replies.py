"""The error shape servegrid answers in, for replies Envoy writes itself (no service behind them).

Every servegrid service maps an error to a gRPC status whose details carry a google.rpc.ErrorInfo
(domain servegrid.dev), and over REST to `{"code", "message", "details"}`. Envoy's own replies (direct
responses, local replies, the rate-limit and auth filters' denials) are built from these functions,
so a client cannot tell which hop refused it. KServe v2 REST paths answer `{"error": "..."}` instead
(kserve_error_json): tritonclient's HTTP client reads that key and nothing else.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2

from services.mesh.names import ERROR_DOMAIN

ERROR_INFO_TYPE = "type.googleapis.com/google.rpc.ErrorInfo"
# Whom a reply is for: a gRPC client, a KServe v2 REST client (tritonclient), a servegrid REST client.
Caller = Literal["grpc", "kserve", "rest"]
# An Envoy formatter command inside a message, with what frames it: `'%REQ(x)%'`, ` (%X%)`, `: %X%`.
_FORMATTER = re.compile(r"\s*:?\s*\(?'?%[A-Z_]+(\([^)]*\))?%'?\)?")

# ErrorInfo reasons the API-key check (services/edge/authz.py) and Envoy's own replies share.
UNAUTHENTICATED_MISSING = "UNAUTHENTICATED_MISSING"
MISSING_CREDENTIALS = "missing credentials: send 'Authorization: Bearer <JWT>' or 'x-api-key: <key>'"


def encode_status(code: int, message: str, reason: str) -> str:
    """grpc-status-details-bin for one reply: google.rpc.Status with an ErrorInfo, base64 as the header carries it."""
    info = any_pb2.Any()
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN))
    status = status_pb2.Status(code=code, message=message, details=[info])
    return base64.b64encode(status.SerializeToString(deterministic=True)).decode()


@cache
def status_details(code: int, message: str, reason: str) -> str:
    """encode_status for the static replies in Envoy's config (rendered many times, always the same)."""
    return encode_status(code, message, reason)


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


def kserve_error_json(message: str) -> str:
    """A KServe v2 REST error body: `{"error": "..."}`."""
    return json.dumps({"error": message}, separators=(",", ":")) + "\n"


def static_part(message: str) -> str:
    """`message` without its Envoy formatter commands: what a Status in a static header can say."""
    return _FORMATTER.sub("", message).strip()


@dataclass(frozen=True)
class Refusal:
    """One kind of reply Envoy writes itself: its HTTP status, gRPC code, ErrorInfo reason and sentence.

    `message` may use Envoy's formatter (`%LOCAL_REPLY_BODY%`, `%REQ(:PATH)%`) for REST. gRPC callers get
    its static part (grpc_message) in both grpc-message and the Status in grpc-status-details-bin: that
    header is fixed in the config, and grpc_status.rpc_status.from_call refuses a Status whose message
    differs from grpc-message."""

    http_status: int
    grpc_code: int
    reason: str
    message: str

    @property
    def grpc_message(self) -> str:
        return static_part(self.message)

    @property
    def grpc_status_details(self) -> str:
        return status_details(self.grpc_code, self.grpc_message, self.reason)

    def rest_body(self) -> dict[str, Any]:
        return error_body(self.grpc_code, self.message, self.reason)

    def rest_json(self) -> str:
        return error_json(self.grpc_code, self.message, self.reason)


# What a caller over its tenant's limit gets, from whichever filter counts: Envoy's local replies give
# every 429 this shape, so a rate-limit filter's own deny settings should say the same (message, reason).
RATE_LIMITED = Refusal(
    429,
    code_pb2.RESOURCE_EXHAUSTED,
    "RATE_LIMITED",
    "the tenant's request limit for this window is used up; retry after retry-after seconds",
)
# No route: a REST path servegrid does not serve (404; also the transcoder's unmapped /v1/ paths), or
# a gRPC method no service here has (UNIMPLEMENTED, as a gRPC server answers an unknown method).
UNKNOWN_PATH = Refusal(
    404, code_pb2.NOT_FOUND, "UNKNOWN_PATH", "no such API path or method; see the API reference for the paths"
)
UNKNOWN_METHOD = Refusal(
    404, code_pb2.UNIMPLEMENTED, "UNKNOWN_METHOD", "method '%REQ(:PATH)%' is not part of the servegrid API"
)
