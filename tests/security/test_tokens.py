"""Bearer tokens an attacker forges or bends, through a real Envoy: each refused with its exact status and reason.

Every case is sent twice, as REST (`GET /v1/models`) and as gRPC (GatewayService.ListModels), and the
positive control (a good token) lists the catalogue on both."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2

from services.edge.devkeys import DevIssuer
from services.edge.tokens import SIGNING_KEY_FILE, SigningKey
from services.mesh import names
from tests.security import support
from tests.security.support import TENANT_A, bearer, list_models_grpc, list_models_rest
from tests.support.edge_stack import EdgeStack, http
from tests.support.errors import assert_grpc_error, assert_rest_error

pytestmark = pytest.mark.integration

UNAUTHENTICATED, PERMISSION_DENIED = code_pb2.UNAUTHENTICATED, code_pb2.PERMISSION_DENIED
TOKEN_INVALID = "UNAUTHENTICATED_TOKEN_INVALID"
TOKEN_EXPIRED = "UNAUTHENTICATED_TOKEN_EXPIRED"
MISSING = "UNAUTHENTICATED_MISSING"
TENANT_INVALID = "UNAUTHENTICATED_TENANT_INVALID"


def edge_key(stack: EdgeStack) -> SigningKey:
    return SigningKey.load(stack.state_dir / "tokens" / SIGNING_KEY_FILE)


def exchanged_claims(stack: EdgeStack, lifetime_s: int) -> dict[str, Any]:
    """Claims as the edge mints them (services/edge/tokens.py TokenMinter), for `lifetime_s` seconds."""
    now = int(time.time())
    return {
        "iss": names.TOKEN_ISSUER,
        "aud": stack.params.audience,
        "sub": "apikey:forged",
        "tenant": TENANT_A,
        "roles": ["user"],
        "iat": now,
        "nbf": now,
        "exp": now + lifetime_s,
    }


@dataclass(frozen=True)
class Attack:
    """An Authorization header value and what Envoy must answer: HTTP status, gRPC code, ErrorInfo reason."""

    authorization: Callable[[EdgeStack], str]
    status: int
    code: int
    reason: str


def token(make: Callable[[EdgeStack], str]) -> Callable[[EdgeStack], str]:
    return lambda stack: f"Bearer {make(stack)}"


def claims(**fields: Any) -> Callable[[EdgeStack], str]:
    return token(lambda stack: stack.issuer.token(TENANT_A, **fields))


ATTACKS: dict[str, Attack] = {
    # Signature games.
    "alg-none": Attack(token(lambda s: support.unsigned(s.issuer, TENANT_A)), 401, UNAUTHENTICATED, TOKEN_INVALID),
    "alg-None": Attack(
        token(lambda s: support.unsigned(s.issuer, TENANT_A, "None")), 401, UNAUTHENTICATED, TOKEN_INVALID
    ),
    "hs256-keyed-with-the-public-key": Attack(
        token(lambda s: support.hs256_with_public_key(s.issuer, TENANT_A)), 401, UNAUTHENTICATED, TOKEN_INVALID
    ),
    "embedded-jwk": Attack(
        token(lambda s: support.embedded_jwk(s.issuer, TENANT_A)), 401, UNAUTHENTICATED, TOKEN_INVALID
    ),
    "payload-edited-after-signing": Attack(
        token(lambda s: support.tampered(s.issuer, TENANT_A, roles=["admin"])), 401, UNAUTHENTICATED, TOKEN_INVALID
    ),
    "signature-stripped": Attack(
        token(lambda s: support.stripped(s.issuer, TENANT_A)), 401, UNAUTHENTICATED, TOKEN_INVALID
    ),
    "another-key": Attack(token(lambda s: DevIssuer.generate().token(TENANT_A)), 401, UNAUTHENTICATED, TOKEN_INVALID),
    "another-key-with-the-trusted-kid": Attack(
        token(lambda s: support.same_kid_other_key(s.issuer, TENANT_A)), 401, UNAUTHENTICATED, TOKEN_INVALID
    ),
    # The identity provider's key, the edge's issuer: each provider trusts only its own key.
    "idp-key-under-the-edge-issuer": Attack(claims(issuer=names.TOKEN_ISSUER), 401, UNAUTHENTICATED, TOKEN_INVALID),
    # Time and lifetime (Envoy allows 30 s of clock skew).
    "expired": Attack(claims(ttl_s=-120), 401, UNAUTHENTICATED, TOKEN_EXPIRED),
    # nbf is taken when the token is made, not when the module is imported: a long session would
    # otherwise reach it (600 s less Envoy's 30 s of skew) before this case runs.
    "not-valid-before-the-future": Attack(
        token(lambda s: s.issuer.token(TENANT_A, extra={"nbf": int(time.time()) + 600})),
        401,
        UNAUTHENTICATED,
        TOKEN_INVALID,
    ),
    "no-exp": Attack(claims(omit=["exp"]), 401, UNAUTHENTICATED, TOKEN_INVALID),
    "lifetime-above-the-maximum": Attack(
        token(lambda s: s.issuer.token(TENANT_A, ttl_s=s.params.jwt_max_lifetime_s + 3600)),
        401,
        UNAUTHENTICATED,
        TOKEN_INVALID,
    ),
    "exchanged-token-above-its-maximum": Attack(
        token(lambda s: edge_key(s).sign(exchanged_claims(s, s.params.token_max_lifetime_s + 3600))),
        401,
        UNAUTHENTICATED,
        TOKEN_INVALID,
    ),
    # Issuer and audience.
    "wrong-issuer": Attack(claims(issuer="https://evil.example"), 401, UNAUTHENTICATED, TOKEN_INVALID),
    "wrong-audience": Attack(claims(audience="someone-else"), 403, PERMISSION_DENIED, "AUDIENCE_MISMATCH"),
    "no-audience": Attack(claims(omit=["aud"]), 403, PERMISSION_DENIED, "AUDIENCE_MISMATCH"),
    # Not a token at all.
    "garbage": Attack(lambda s: "Bearer not-a-jwt", 401, UNAUTHENTICATED, TOKEN_INVALID),
    "three-garbage-segments": Attack(lambda s: "Bearer a.b.c", 401, UNAUTHENTICATED, TOKEN_INVALID),
    "10-kb-of-garbage": Attack(lambda s: "Bearer " + "x" * 10_240, 401, UNAUTHENTICATED, TOKEN_INVALID),
    "an-api-key-as-bearer": Attack(
        lambda s: "Bearer sgk_000000000000_" + "x" * 43, 401, UNAUTHENTICATED, TOKEN_INVALID
    ),
    # No token taken from the header: the API-key check then finds no key either.
    "bearer-with-nothing": Attack(lambda s: "Bearer", 401, UNAUTHENTICATED, MISSING),
    "basic-credentials": Attack(lambda s: "Basic YWRtaW46YWRtaW4=", 401, UNAUTHENTICATED, MISSING),
    "token-without-the-bearer-prefix": Attack(lambda s: s.issuer.token(TENANT_A), 401, UNAUTHENTICATED, MISSING),
}


@pytest.mark.parametrize("attack", list(ATTACKS.values()), ids=list(ATTACKS))
def test_a_forged_or_bent_token_is_refused(stack: EdgeStack, attack: Attack) -> None:
    credential = {"authorization": attack.authorization(stack)}
    assert_rest_error(list_models_rest(stack.envoy, credential), attack.status, attack.code, attack.reason)
    error = list_models_grpc(stack.envoy.address, list(credential.items()))
    assert isinstance(error, grpc.RpcError), error
    assert_grpc_error(error, attack.code, attack.reason)


def test_a_good_token_lists_the_catalogue(stack: EdgeStack) -> None:
    """The positive control for the table above: the same calls with the issuer's own token."""
    support.assert_models_listed(list_models_rest(stack.envoy, support.user(stack)))
    reply = list_models_grpc(stack.envoy.address, list(support.user(stack).items()))
    assert not isinstance(reply, grpc.RpcError), reply
    assert [m.model_id for m in reply.models] == support.MODELS


@pytest.mark.parametrize("parameter", ["access_token", "authorization", "token", "jwt"])
def test_a_token_in_the_query_string_does_not_authenticate(stack: EdgeStack, parameter: str) -> None:
    """Only the Authorization header carries a token (a URL ends up in logs and referrers)."""
    good = stack.issuer.token(TENANT_A)
    value = f"Bearer%20{good}" if parameter == "authorization" else good
    reply = http("GET", f"{stack.envoy.url}/v1/models?{parameter}={value}")
    assert_rest_error(reply, 401, UNAUTHENTICATED, MISSING)


# --- claims the identity provider signed but the front door must not take as they are ----------
# (Tenant claims of the wrong type, with CR/LF, too long or upper-case: tests/integration/test_edge_tokens.py.)

BAD_TENANTS: dict[str, Any] = {
    "null": None,
    "nul-byte": f"{TENANT_A}\x00",
    "cyrillic-homoglyph": "\u0430lice",
    "comma-joined-pair": f"{TENANT_A},{support.TENANT_B}",
    "path-traversal": f"../{TENANT_A}",
    "wildcard": "*",
    "trailing-space": f"{TENANT_A} ",
}


@pytest.mark.parametrize("tenant", list(BAD_TENANTS.values()), ids=list(BAD_TENANTS))
def test_a_tenant_claim_that_is_not_a_tenant_id_is_refused(stack: EdgeStack, tenant: Any) -> None:
    credential = bearer(stack.issuer.token(TENANT_A, extra={"tenant": tenant}))
    assert_rest_error(list_models_rest(stack.envoy, credential), 401, UNAUTHENTICATED, TENANT_INVALID)
    error = list_models_grpc(stack.envoy.address, list(credential.items()))
    assert isinstance(error, grpc.RpcError), error
    assert_grpc_error(error, UNAUTHENTICATED, TENANT_INVALID)


def test_the_tenant_claims_name_is_exact(stack: EdgeStack) -> None:
    """`Tenant` is not `tenant`: a token with only the former names no tenant."""
    credential = bearer(stack.issuer.token(TENANT_A, omit=["tenant"], extra={"Tenant": TENANT_A}))
    assert_rest_error(list_models_rest(stack.envoy, credential), 401, UNAUTHENTICATED, TENANT_INVALID)


BAD_ROLES: dict[str, Any] = {
    "object": {"admin": True},
    "nested-list": [["admin"]],
    "comma-joined-string": "user,admin",
    "comma-joined-in-a-list": ["user,admin"],
    "space-joined-string": "user admin",
    "upper-case": ["ADMIN"],
    "number": 1,
}


@pytest.mark.parametrize("roles", list(BAD_ROLES.values()), ids=list(BAD_ROLES))
def test_a_roles_claim_that_only_looks_like_admin_does_not_open_the_admin_api(stack: EdgeStack, roles: Any) -> None:
    credential = bearer(stack.issuer.token(TENANT_A, extra={"roles": roles}))
    # Still a valid caller off the admin paths...
    support.assert_models_listed(list_models_rest(stack.envoy, credential))
    # ...but not an admin, over REST or gRPC.
    admin_api = http("GET", f"{stack.envoy.url}/v1/admin/models", headers=credential)
    assert_rest_error(admin_api, 403, PERMISSION_DENIED, "ADMIN_ROLE_REQUIRED")
    error = support.grpc_error(stack.envoy.address, support.REGISTRY_LIST, b"", list(credential.items()))
    assert_grpc_error(error, PERMISSION_DENIED, "ADMIN_ROLE_REQUIRED")


def test_the_admin_role_opens_the_admin_api(stack: EdgeStack) -> None:
    """The positive control: a real admin claim (a list naming it) gets the registry's catalogue."""
    reply = http("GET", f"{stack.envoy.url}/v1/admin/models", headers=support.admin(stack))
    assert reply.status == 200, reply.body
    assert [m["modelId"] for m in reply.json()["models"]] == ["affine", "digits", "draft-only"]


BAD_SUBJECTS = [
    # Each would become an invalid or oversized x-servegrid-subject header (503, or a random 429 from
    # gRPC's metadata limits, before the subject rule in services/mesh/auth.py).
    pytest.param(f"dev\r\n{names.TENANT_HEADER}: {support.TENANT_B}", id="crlf-header-injection"),
    pytest.param("dev\x00user", id="nul-byte"),
    pytest.param("s" * 10_240, id="10-kb"),
    pytest.param("s" * (names.MAX_NAME_BYTES + 1), id="one-byte-too-long"),
]


@pytest.mark.parametrize("subject", BAD_SUBJECTS)
def test_a_subject_that_cannot_be_a_header_is_a_bad_token(stack: EdgeStack, subject: str) -> None:
    """The subject becomes a request header (claim_to_headers): one with control characters or too long
    for the services' metadata limit is a bad credential (401), not an upstream failure."""
    credential = bearer(stack.issuer.token(TENANT_A, subject=subject))
    assert_rest_error(list_models_rest(stack.envoy, credential), 401, UNAUTHENTICATED, TOKEN_INVALID)


def test_a_long_but_plain_subject_is_still_served(stack: EdgeStack) -> None:
    """The edge of the subject rule: exactly names.MAX_NAME_BYTES printable characters (an email-like sub)."""
    subject = ("user.name+tag@example.com|" * 20)[: names.MAX_NAME_BYTES]
    reply = list_models_rest(stack.envoy, bearer(stack.issuer.token(TENANT_A, subject=subject)))
    assert reply.status == 200, reply.body[:200]
