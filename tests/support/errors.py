"""Assertions on servegrid's error shape, as callers read it: REST `{"code", "message", "details"}` and gRPC
status + ErrorInfo (grpc_status.rpc_status). Shared by the error-table and the adversarial suites."""

from __future__ import annotations

from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.mesh.names import ERROR_DOMAIN
from tests.support.edge_stack import HttpReply


def assert_rest_error(
    reply: HttpReply, status: int, code: int, reason: str, metadata: dict[str, str] | None = None
) -> dict[str, Any]:
    """`metadata`: the ErrorInfo's metadata, when the error carries some (a service's NotFound names its id)."""
    assert reply.status == status, reply.body[:300]
    assert reply.headers["content-type"] == "application/json", reply.headers
    body = reply.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    (info,) = body["details"]
    expected = {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": ERROR_DOMAIN}
    assert info == (expected if metadata is None else {**expected, "metadata": metadata})
    return body


def assert_grpc_error(error: grpc.RpcError, code: int, reason: str) -> str:
    """The message is a sentence, and grpc_status reads the same code and message back from the details."""
    assert error.code().value[0] == code, (error.code(), error.details())
    message = error.details()
    assert message and not message.lstrip().startswith("{"), message
    status = rpc_status.from_call(error)  # raises if its code or message differ from the call's
    assert status is not None, f"no grpc-status-details-bin: {error.trailing_metadata()}"
    infos = [d for d in status.details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    assert len(infos) == 1, status
    info = error_details_pb2.ErrorInfo()
    infos[0].Unpack(info)
    assert (info.reason, info.domain) == (reason, ERROR_DOMAIN)
    return message
