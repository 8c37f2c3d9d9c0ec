"""ext_authz for API keys: Envoy asks, the edge answers allow (with identity headers) or deny."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import grpc
from envoy.config.core.v3 import base_pb2 as core
from envoy.service.auth.v3 import attribute_context_pb2
from envoy.service.auth.v3 import external_auth_pb2 as pb
from envoy.service.auth.v3 import external_auth_pb2_grpc as pb_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from services.edge.cache import KeyCache
from services.edge.keys import KEY_PREFIX, ApiKeyStore, hash_key
from services.edge.metrics import count_decision
from services.mesh import replies
from services.mesh.names import API_KEY_HEADER, AUTH_METHOD_HEADER, ROLES_HEADER, SUBJECT_HEADER, TENANT_HEADER
from services.mesh.replies import Caller

log = logging.getLogger(__name__)

_OVERWRITE = core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_CHALLENGE = 'Bearer realm="servegrid", ApiKey header="x-api-key"'
# A gRPC method's path: /package.Service/Method (every servegrid and KServe service has a package).
_GRPC_PATH = re.compile(r"/[A-Za-z_][\w]*(\.[\w]+)+/[\w]+")

API_KEY_INVALID = "UNAUTHENTICATED_API_KEY_INVALID"
API_KEY_REVOKED = "UNAUTHENTICATED_API_KEY_REVOKED"


@dataclass(frozen=True)
class Decision:
    """Allowed with an identity, or denied with an HTTP status and a message a person can act on."""

    allowed: bool
    tenant: str = ""
    subject: str = ""
    roles: tuple[str, ...] = ()
    http_status: int = 401
    message: str = ""
    outcome: str = "ok"
    reason: str = "UNAUTHENTICATED"  # a denial's ErrorInfo reason


class ApiKeyAuthorizer:
    """Checks an `x-api-key` against the store, through the cache."""

    def __init__(self, store: ApiKeyStore, cache: KeyCache) -> None:
        self.store = store
        self.cache = cache

    async def decide(self, api_key: str | None) -> Decision:
        if not api_key:
            # Envoy only asks when no JWT was presented, so this is "no credential at all".
            return Decision(
                False, message=replies.MISSING_CREDENTIALS, outcome="missing", reason=replies.UNAUTHENTICATED_MISSING
            )
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
            return _invalid()
        key_hash = hash_key(api_key)
        entry = await self.cache.get(key_hash)
        if entry is None:
            record = await self.store.lookup(key_hash)
            entry = (
                {"found": False}
                if record is None
                else {
                    "found": True,
                    "key_id": record.key_id,
                    "tenant": record.tenant,
                    "roles": list(record.roles),
                    "revoked": not record.active,
                }
            )
            await self.cache.put(key_hash, entry)
        if not entry["found"]:
            return _invalid()
        if entry["revoked"]:
            return Decision(
                False,
                tenant=entry["tenant"],
                message=f"API key {entry['key_id']} has been revoked; ask the tenant's admin for a new one",
                outcome="revoked",
                reason=API_KEY_REVOKED,
            )
        return Decision(True, tenant=entry["tenant"], subject=f"apikey:{entry['key_id']}", roles=tuple(entry["roles"]))


def _invalid() -> Decision:
    return Decision(
        False, message="invalid API key: check the x-api-key header", outcome="invalid", reason=API_KEY_INVALID
    )


def _header(key: str, value: str) -> core.HeaderValueOption:
    return core.HeaderValueOption(header=core.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def check_response(decision: Decision, caller: Caller = "rest") -> pb.CheckResponse:
    """The CheckResponse Envoy acts on: identity headers on allow, on deny an error in the caller's shape."""
    if decision.allowed:
        metadata = struct_pb2.Struct()
        metadata.update({"tenant": decision.tenant, "subject": decision.subject, "roles": list(decision.roles)})
        return pb.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=pb.OkHttpResponse(
                headers=[
                    _header(TENANT_HEADER, decision.tenant),
                    _header(SUBJECT_HEADER, decision.subject),
                    _header(ROLES_HEADER, ",".join(decision.roles)),
                    _header(AUTH_METHOD_HEADER, "api-key"),
                ],
                # The secret has done its job; upstream services and their logs never see it.
                headers_to_remove=[API_KEY_HEADER],
            ),
            dynamic_metadata=metadata,
        )
    return pb.CheckResponse(
        status=status_pb2.Status(code=_code(decision), message=decision.message),
        denied_response=_denial(decision, caller),
    )


def caller_of(request: attribute_context_pb2.AttributeContext.HttpRequest) -> Caller:
    """Who is asking, so the denial comes in the shape it reads. ext_authz sends only the allowed headers
    (content-type, when it is among them) and the path, and a gRPC method's path never looks like a REST
    one (/v1/..., /v2/...)."""
    content_type = request.headers.get("content-type", "")
    path = request.path.split("?", 1)[0]
    if content_type.startswith("application/grpc") or (not content_type and _GRPC_PATH.fullmatch(path)):
        return "grpc"
    return "kserve" if path == "/v2" or path.startswith("/v2/") else "rest"


def _code(decision: Decision) -> int:
    return code_pb2.UNAUTHENTICATED if decision.http_status == 401 else code_pb2.PERMISSION_DENIED


def _denial(decision: Decision, caller: Caller) -> pb.DeniedHttpResponse:
    """gRPC: Envoy turns the body into grpc-message (the sentence) and keeps these headers, the ErrorInfo
    among them. REST: the services' JSON error; KServe v2 REST: `{"error": ...}` (tritonclient)."""
    code = _code(decision)
    reason = decision.reason
    headers = [_header("www-authenticate", _CHALLENGE)] if decision.http_status == 401 else []
    if caller == "grpc":
        headers.append(_header("grpc-status", str(code)))
        headers.append(_header("grpc-status-details-bin", replies.encode_status(code, decision.message, reason)))
        body = decision.message
    else:
        headers.append(_header("content-type", "application/json"))
        kserve = caller == "kserve"
        body = (
            replies.kserve_error_json(decision.message)
            if kserve
            else replies.error_json(code, decision.message, reason)
        )
    return pb.DeniedHttpResponse(
        status=http_status_pb2.HttpStatus(code=decision.http_status), headers=headers, body=body
    )


class AuthorizationServicer(pb_grpc.AuthorizationServicer):
    """envoy.service.auth.v3.Authorization."""

    def __init__(self, authorizer: ApiKeyAuthorizer) -> None:
        self.authorizer = authorizer

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:
        http = request.attributes.request.http
        try:
            decision = await self.authorizer.decide(http.headers.get(API_KEY_HEADER))
        except Exception:
            # The store is unreachable: answer with an error so Envoy applies its configured
            # failure mode (fail closed for authentication: services/mesh/auth.py ext_authz_filter).
            log.exception("api-key check failed")
            count_decision("authz", "error")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "api-key store unavailable")
            raise  # unreachable: abort raises
        count_decision("authz", decision.outcome)
        return check_response(decision, caller_of(http))
