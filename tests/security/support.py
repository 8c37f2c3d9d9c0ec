"""What the adversarial suite shares: forged tokens, raw requests, one gRPC call, and what Envoy logged."""

# Why raw requests: urllib normalises a URL before sending it (it drops a `#fragment`, for one), and the
# point of the path cases is what Envoy does with the bytes an attacker really sends.

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.edge.devkeys import DevIssuer
from services.mesh import names
from tests.support.edge_stack import EdgeStack, HttpReply, http
from tests.support.envoy import EnvoyProcess
from tests.support.polling import wait_for

SUFFIX = secrets.token_hex(3)
TENANT_A = f"alice-{SUFFIX}"
TENANT_B = f"bob-{SUFFIX}"
# Nothing serves the models: no case here needs an inference, and the routes need a backend address.
NO_TRITON = "127.0.0.1:1"
# Route limits for two rate-limit names: a bucket's route then shows in its Redis counter's key
# (services/edge/limits.py), so a test can tell which route Envoy counted a request under.
ROUTE_LIMITS = {"gateway": 1_000_000, "spoofed": 1_000_000}
REGISTRY_LIST = f"{names.REGISTRY_PACKAGE_PREFIX}RegistryService/ListModels"  # the admin API over gRPC
MODELS = ["affine", "digits"]  # what the stand-in registry lists as servable (tests/support/fake_registry.py)

Metadata = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class Keys:
    """API keys made through the operator's CLI: tenant A's user, admin and revoked keys, tenant B's user key."""

    user_id: str
    user: str
    admin: str
    revoked: str
    other_tenant: str


# --- tokens ------------------------------------------------------------------------------------


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: dict[str, Any]) -> str:
    return b64url(json.dumps(value, separators=(",", ":")).encode())


def claims_of(token: str) -> dict[str, Any]:
    """A token's claims, unverified: the start of a forgery that differs from a good token in one way."""
    claims: dict[str, Any] = jwt.decode(token, options={"verify_signature": False})
    return claims


def header_of(token: str) -> dict[str, Any]:
    return dict(jwt.get_unverified_header(token))


def unsigned(issuer: DevIssuer, tenant: str, alg: str = "none") -> str:
    """alg=none (in any spelling): no signature at all, the classic downgrade."""
    header = {"alg": alg, "typ": "JWT", "kid": issuer.key_id}
    return f"{segment(header)}.{segment(claims_of(issuer.token(tenant)))}."


def hs256_with_public_key(issuer: DevIssuer, tenant: str) -> str:
    """HS256 keyed with the RSA public key's PEM (what a verifier that trusts the token's alg would use)."""
    pem = issuer.private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    signing_input = (
        f"{segment({'alg': 'HS256', 'typ': 'JWT', 'kid': issuer.key_id})}.{segment(claims_of(issuer.token(tenant)))}"
    )
    signature = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(signature)}"


def embedded_jwk(issuer: DevIssuer, tenant: str) -> str:
    """Signed by an attacker's key, which the header carries as `jwk` (CVE-2018-0114's trick)."""
    attacker = DevIssuer.generate()
    claims = claims_of(issuer.token(tenant))
    headers = {"kid": issuer.key_id, "jwk": attacker.signing_key.public_jwk()}
    return jwt.encode(claims, attacker.private_key, algorithm="RS256", headers=headers)


def tampered(issuer: DevIssuer, tenant: str, **changes: Any) -> str:
    """A good token whose payload was edited afterwards (the signature is the original's)."""
    header, _, signature = issuer.token(tenant).split(".")
    return f"{header}.{segment({**claims_of(issuer.token(tenant)), **changes})}.{signature}"


def stripped(issuer: DevIssuer, tenant: str) -> str:
    """A good token without its signature."""
    header, payload, _ = issuer.token(tenant).split(".")
    return f"{header}.{payload}."


def same_kid_other_key(issuer: DevIssuer, tenant: str) -> str:
    """Another key claiming the trusted key's kid."""
    return DevIssuer(DevIssuer.generate().private_key, issuer.key_id, issuer.issuer, issuer.audience).token(tenant)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def user(stack: EdgeStack, tenant: str = TENANT_A, **claims: Any) -> dict[str, str]:
    return bearer(stack.issuer.token(tenant, **claims))


def admin(stack: EdgeStack, tenant: str = TENANT_A) -> dict[str, str]:
    return bearer(stack.issuer.token(tenant, roles=["user", "admin"]))


# --- requests ----------------------------------------------------------------------------------


def raw_request(
    envoy: EnvoyProcess,
    method: str,
    target: str,
    headers: Iterable[tuple[str, str | bytes]] = (),
    body: bytes | None = None,
) -> HttpReply:
    """One HTTP/1.1 request whose target and header names go out byte for byte as given."""
    connection = HTTPConnection("127.0.0.1", envoy.port, timeout=30)
    try:
        connection.putrequest(method, target, skip_accept_encoding=True)
        for name, value in headers:
            connection.putheader(name, value)
        if body is not None:
            connection.putheader("content-length", str(len(body)))
        connection.endheaders(body)
        reply = connection.getresponse()
        return HttpReply(reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read())
    finally:
        connection.close()


def list_models_rest(envoy: EnvoyProcess, headers: dict[str, str]) -> HttpReply:
    return http("GET", f"{envoy.url}/v1/models", headers=headers)


def assert_models_listed(reply: HttpReply) -> None:
    """The positive control: 200 with the stand-in registry's catalogue."""
    assert reply.status == 200, reply.body[:300]
    assert [m["modelId"] for m in reply.json()["models"]] == MODELS


def grpc_call(
    address: str, method: str, request: bytes = b"", metadata: Metadata = (), timeout_s: float = 10.0
) -> bytes | grpc.RpcError:
    """A unary call by path with serialized bytes: what it answered, or its error."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply: bytes = channel.unary_unary(method)(request, metadata=list(metadata), timeout=timeout_s)
        except grpc.RpcError as error:
            return error
    return reply


def grpc_error(address: str, method: str, request: bytes = b"", metadata: Metadata = ()) -> grpc.RpcError:
    """The call's error; fails the test if the call succeeds."""
    result = grpc_call(address, method, request, metadata)
    assert isinstance(result, grpc.RpcError), f"{method} answered instead of refusing: {result!r}"
    return result


def list_models_grpc(address: str, metadata: Metadata) -> gateway_pb2.ListModelsResponse | grpc.RpcError:
    with grpc.insecure_channel(address) as channel:
        try:
            reply: gateway_pb2.ListModelsResponse = gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
                gateway_pb2.ListModelsRequest(), metadata=list(metadata), timeout=10
            )
        except grpc.RpcError as error:
            return error
    return reply


def request_id() -> str:
    return f"sec-{secrets.token_hex(6)}"


# --- what Envoy logged -------------------------------------------------------------------------


def _log_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    # Envoy may be halfway through a line: only whole (newline-terminated) lines are read.
    whole = path.read_text().rpartition("\n")[0]
    return [json.loads(line) for line in whole.splitlines() if line.strip()]


def flush_access_log(envoy: EnvoyProcess) -> None:
    """Envoy writes its access log out every 10 s unless told: reopening the log files flushes them now."""
    admin = f"http://127.0.0.1:{envoy.admin_port}/reopen_logs"
    with urllib.request.urlopen(urllib.request.Request(admin, method="POST"), timeout=5) as reply:
        assert reply.status == 200


def logged(envoy: EnvoyProcess, rid: str, count: int = 1, timeout_s: float = 15.0) -> list[dict[str, Any]]:
    """The access-log lines of request `rid` (x-request-id), once `count` of them are written. Both
    listeners log there: the public one (what the gateway was sent) and the mesh one (what the gateway
    forwarded). A line is logged just after its reply is sent, so each poll flushes again."""
    found: list[dict[str, Any]] = []

    def written() -> bool:
        flush_access_log(envoy)
        found[:] = [line for line in _log_lines(envoy.access_log_path) if line.get("request_id") == rid]
        return len(found) >= count

    wait_for(written, timeout_s=timeout_s, poll_s=0.2)
    return found
