"""ext_authz for API keys: Envoy asks, the edge answers allow (with identity headers) or deny."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import grpc
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from services.edge.cache import KeyCache
from services.edge.envoy_api import external_auth_pb2 as pb
from services.edge.envoy_api import external_auth_pb2_grpc as pb_grpc
from services.edge.keys import KEY_PREFIX, ApiKeyStore, hash_key
from services.edge.metrics import count_decision

log = logging.getLogger(__name__)

API_KEY_HEADER = "x-api-key"
TENANT_HEADER = "x-servegrid-tenant"
SUBJECT_HEADER = "x-servegrid-subject"
ROLES_HEADER = "x-servegrid-roles"
AUTH_METHOD_HEADER = "x-servegrid-auth"
_OVERWRITE = pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


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


class ApiKeyAuthorizer:
    """Checks an `x-api-key` against the store, through the cache."""

    def __init__(self, store: ApiKeyStore, cache: KeyCache) -> None:
        self.store = store
        self.cache = cache

    async def decide(self, api_key: str | None) -> Decision:
        if not api_key:
            # Envoy only asks when no JWT was presented, so this is "no credential at all".
            return Decision(
                False,
                message="missing credentials: send 'Authorization: Bearer <JWT>' or 'x-api-key: <key>'",
                outcome="missing",
            )
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
            return Decision(False, message="invalid API key", outcome="invalid")
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
            return Decision(False, message="invalid API key", outcome="invalid")
        if entry["revoked"]:
            return Decision(
                False, tenant=entry["tenant"], message=f"API key {entry['key_id']} has been revoked", outcome="revoked"
            )
        return Decision(True, tenant=entry["tenant"], subject=f"apikey:{entry['key_id']}", roles=tuple(entry["roles"]))


def _header(key: str, value: str) -> pb.HeaderValueOption:
    return pb.HeaderValueOption(header=pb.HeaderValue(key=key, value=value), append_action=_OVERWRITE)


def check_response(decision: Decision) -> pb.CheckResponse:
    """The CheckResponse Envoy acts on: identity headers on allow, a JSON error body on deny."""
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
    code = code_pb2.UNAUTHENTICATED if decision.http_status == 401 else code_pb2.PERMISSION_DENIED
    body = json.dumps({"code": code, "message": decision.message, "details": []})
    headers = [_header("content-type", "application/json")]
    if decision.http_status == 401:
        headers.append(_header("www-authenticate", 'Bearer realm="servegrid", ApiKey header="x-api-key"'))
    return pb.CheckResponse(
        status=status_pb2.Status(code=code, message=decision.message),
        denied_response=pb.DeniedHttpResponse(
            status=pb.HttpStatus(code=decision.http_status), headers=headers, body=body
        ),
    )


class AuthorizationServicer(pb_grpc.AuthorizationServicer):
    """envoy.service.auth.v3.Authorization."""

    def __init__(self, authorizer: ApiKeyAuthorizer) -> None:
        self.authorizer = authorizer

    async def Check(self, request: pb.CheckRequest, context: grpc.aio.ServicerContext) -> pb.CheckResponse:
        headers = request.attributes.request.http.headers
        try:
            decision = await self.authorizer.decide(headers.get(API_KEY_HEADER))
        except Exception:
            # The store is unreachable: answer with an error so Envoy applies its configured
            # failure mode (fail closed for authentication, see envoy/render.py).
            log.exception("api-key check failed")
            count_decision("authz", "", "error")
            await context.abort(grpc.StatusCode.UNAVAILABLE, "api-key store unavailable")
            raise  # unreachable: abort raises
        count_decision("authz", decision.tenant, decision.outcome)
        return check_response(decision)
