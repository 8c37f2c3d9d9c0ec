"""Credentials through a real Envoy, edge, gateway, PostgreSQL and Redis: token rules, tenant claims, and the
API key → short-lived JWT exchange (no ext_authz call per request for exchanged tokens)."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from servegrid_sdk import ServegridClient
from services.edge.tokens import SIGNING_KEY_FILE, SigningKey
from services.mesh import names
from services.runtime.errors import status_details
from tests.support.datastores import SessionDatastores
from tests.support.edge_stack import EdgeStack, HttpReply, edge_stack, http
from tests.support.envoy import EnvoyProcess
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

SUFFIX = secrets.token_hex(3)
TENANT = f"tok-{SUFFIX}"
# Its exchanges are limited to one a window (the edge's default unit: a minute).
SPARING = f"sparing-{SUFFIX}"
# No KServe call here: the router's backends need not exist.
NO_TRITON = "127.0.0.1:1"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, datastores: SessionDatastores) -> Iterator[EdgeStack]:
    settings = {"SERVEGRID_EDGE_ROUTE_LIMITS": json.dumps({f"{SPARING}/{names.EXCHANGE_ROUTE}": 1})}
    with edge_stack(
        tmp_path_factory.mktemp("edge-tokens"), datastores, NO_TRITON, {}, edge_settings=settings
    ) as running:
        yield running


def models_url(envoy: EnvoyProcess) -> str:
    return f"{envoy.url}/v1/models"


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def ext_authz_checks(envoy: EnvoyProcess) -> int:
    stats = envoy.stats("ext_authz")
    return sum(
        v
        for k, v in stats.items()
        if k.startswith("http.public.ext_authz.") and k.endswith((".ok", ".denied", ".error"))
    )


def exchange(envoy: EnvoyProcess, api_key: str) -> HttpReply:
    return http("POST", f"{envoy.url}/v1/auth:token", {}, {"x-api-key": api_key})


def reason(reply: HttpReply) -> str:
    details = reply.json().get("details") or [{}]
    return str(details[0].get("reason", ""))


def grpc_list_models(envoy: EnvoyProcess, metadata: list[tuple[str, str]]) -> grpc.RpcError | None:
    with grpc.insecure_channel(envoy.address) as channel:
        try:
            gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
                gateway_pb2.ListModelsRequest(), metadata=metadata, timeout=10
            )
        except grpc.RpcError as error:
            return error
    return None


def edge_key(stack: EdgeStack) -> SigningKey:
    return SigningKey.load(stack.state_dir / "tokens" / SIGNING_KEY_FILE)


# --- what every token must carry ---------------------------------------------------------------


def test_a_token_without_exp_is_refused(stack: EdgeStack) -> None:
    url = models_url(stack.envoy)
    assert http("GET", url, headers=bearer(stack.issuer.token(TENANT))).status == 200
    assert http("GET", url, headers=bearer(stack.issuer.token(TENANT, omit=["exp"]))).status == 401


def test_a_token_living_longer_than_the_maximum_is_refused(stack: EdgeStack) -> None:
    limit = stack.params.jwt_max_lifetime_s
    url = models_url(stack.envoy)
    assert http("GET", url, headers=bearer(stack.issuer.token(TENANT, ttl_s=limit - 120))).status == 200
    assert http("GET", url, headers=bearer(stack.issuer.token(TENANT, ttl_s=limit + 3600))).status == 401


def test_the_maximum_lifetime_is_a_parameter(stack: EdgeStack) -> None:
    short = stack.start_envoy("envoy-short-tokens", stack.edge, jwt_max_lifetime_s=600)
    assert http("GET", models_url(short), headers=bearer(stack.issuer.token(TENANT, ttl_s=300))).status == 200
    assert http("GET", models_url(short), headers=bearer(stack.issuer.token(TENANT, ttl_s=3600))).status == 401


# --- the tenant claim ----------------------------------------------------------------------------


BAD_TENANTS: dict[str, Any] = {
    "list": [TENANT],
    "object": {"id": TENANT},
    "number": 42,
    "boolean": True,
    "crlf": f"{TENANT}\r\nx-servegrid-roles: admin",
    "empty": "",
    "too-long": "a" * (names.TENANT_MAX_LENGTH + 1),
    "upper-case": "ACME",
    "space": "ac me",
}


@pytest.mark.parametrize("tenant", list(BAD_TENANTS.values()), ids=list(BAD_TENANTS))
def test_a_tenant_claim_that_is_not_a_tenant_id_is_401_with_a_reason(stack: EdgeStack, tenant: Any) -> None:
    token = stack.issuer.token(TENANT, extra={"tenant": tenant})
    reply = http("GET", models_url(stack.envoy), headers=bearer(token))
    assert reply.status == 401, reply.body
    assert reply.headers["content-type"] == "application/json"
    assert reason(reply) == "UNAUTHENTICATED_TENANT_INVALID"
    error = grpc_list_models(stack.envoy, list(bearer(token).items()))
    assert error is not None and error.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "tenant" in (error.details() or "")
    _, info = status_details(error.trailing_metadata())
    assert info is not None and info.reason == "UNAUTHENTICATED_TENANT_INVALID"


def test_a_token_without_a_tenant_is_401(stack: EdgeStack) -> None:
    reply = http("GET", models_url(stack.envoy), headers=bearer(stack.issuer.token(TENANT, omit=["tenant"])))
    assert reply.status == 401
    assert reason(reply) == "UNAUTHENTICATED_TENANT_INVALID"


@pytest.mark.parametrize(
    "tenant", [pytest.param(TENANT, id="this-session"), "a", "x" * names.TENANT_MAX_LENGTH, "org:team.a_b-c"]
)
def test_a_tenant_id_string_passes(stack: EdgeStack, tenant: str) -> None:
    assert http("GET", models_url(stack.envoy), headers=bearer(stack.issuer.token(tenant))).status == 200


def test_a_wrong_audience_with_a_good_tenant_stays_403(stack: EdgeStack) -> None:
    reply = http("GET", models_url(stack.envoy), headers=bearer(stack.issuer.token(TENANT, audience="elsewhere")))
    assert reply.status == 403


# --- API key → token exchange --------------------------------------------------------------------


def test_an_exchanged_token_calls_the_gateway_with_no_ext_authz_call(stack: EdgeStack) -> None:
    tenant = f"xchg-{SUFFIX}"
    key_id, api_key = stack.create_key(tenant, "user")
    checks = ext_authz_checks(stack.envoy)
    reply = exchange(stack.envoy, api_key)
    assert reply.status == 200, reply.body
    body = reply.json()
    assert body["tokenType"] == "Bearer" and body["tenant"] == tenant and body["roles"] == ["user"]
    assert body["expiresIn"] == 300
    claims = jwt.decode(body["accessToken"], options={"verify_signature": False})
    assert claims["iss"] == names.TOKEN_ISSUER and claims["sub"] == f"apikey:{key_id}"
    assert claims["exp"] - claims["iat"] == 300
    for _ in range(3):
        assert http("GET", models_url(stack.envoy), headers=bearer(body["accessToken"])).status == 200
    # Neither the exchange (the edge checks the key itself) nor the token's calls asked ext_authz.
    assert ext_authz_checks(stack.envoy) == checks
    # The same key sent plainly still works, through ext_authz.
    assert http("GET", models_url(stack.envoy), headers={"x-api-key": api_key}).status == 200
    assert ext_authz_checks(stack.envoy) == checks + 1


def test_the_exchange_over_grpc(stack: EdgeStack) -> None:
    tenant = f"xgrpc-{SUFFIX}"
    _, api_key = stack.create_key(tenant, "user", "admin")
    with grpc.insecure_channel(stack.envoy.address) as channel:
        reply = gateway_pb2_grpc.AuthServiceStub(channel).CreateAccessToken(
            gateway_pb2.CreateAccessTokenRequest(), metadata=[("x-api-key", api_key)], timeout=10
        )
    assert reply.tenant == tenant and list(reply.roles) == ["user", "admin"]
    assert reply.expire_time.seconds - time.time() == pytest.approx(300, abs=30)
    # An exchanged token carries the key's roles: the admin API opens for an admin key's token.
    admin = http("GET", f"{stack.envoy.url}/v1/admin/models", headers=bearer(reply.access_token))
    assert admin.status == 200, admin.body


def test_exchanges_count_against_the_tenants_limits_and_a_refusal_says_when_to_retry(stack: EdgeStack) -> None:
    _, api_key = stack.create_key(SPARING, "user")
    replies = [exchange(stack.envoy, api_key) for _ in range(4)]
    assert replies[0].status == 200, replies[0].body
    # One exchange a minute: a window's end can fall between two of these calls at most once.
    refused = next((reply for reply in replies[1:] if reply.status != 200), None)
    assert refused is not None, [reply.status for reply in replies]
    assert refused.status == 429 and reason(refused) == "RATE_LIMITED", refused.body
    wait = int(refused.json()["details"][0]["metadata"]["retry_after_s"])
    assert 1 <= wait <= 60 and f"retry in {wait} s" in refused.json()["message"]
    # The same over gRPC: RESOURCE_EXHAUSTED with the ErrorInfo, relayed by Envoy unchanged.
    with grpc.insecure_channel(stack.envoy.address) as channel:
        stub = gateway_pb2_grpc.AuthServiceStub(channel)
        errors = []
        for _ in range(3):
            try:
                stub.CreateAccessToken(
                    gateway_pb2.CreateAccessTokenRequest(), metadata=[("x-api-key", api_key)], timeout=10
                )
            except grpc.RpcError as caught:
                errors.append(caught)
                break
    (refusal,) = errors
    assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refusal
    _, info = status_details(refusal.trailing_metadata())
    assert info is not None and info.reason == "RATE_LIMITED" and "retry_after_s" in info.metadata
    # Another tenant's exchanges are not touched.
    _, other = stack.create_key(f"other-{SUFFIX}", "user")
    assert all(exchange(stack.envoy, other).status == 200 for _ in range(3))


def test_a_revoked_key_stops_exchanging_at_once_and_its_token_lives_out_its_lifetime(stack: EdgeStack) -> None:
    key_id, api_key = stack.create_key(f"revoked-{SUFFIX}", "user")
    minted = exchange(stack.envoy, api_key)
    assert minted.status == 200
    # Warm the ext_authz cache with the key, so "at once" is not just a cold cache.
    assert http("GET", models_url(stack.envoy), headers={"x-api-key": api_key}).status == 200
    assert stack.keys_cli("revoke", key_id).returncode == 0
    refused = exchange(stack.envoy, api_key)
    assert refused.status == 401, refused.body
    assert reason(refused) == "API_KEY_REVOKED" and key_id in refused.json()["message"]
    # Plain key requests stop at once too (revoke evicts the ext_authz cache entry).
    assert http("GET", models_url(stack.envoy), headers={"x-api-key": api_key}).status == 401
    # The token minted before the revocation is honoured until it expires (the stated bound).
    token = minted.json()["accessToken"]
    assert http("GET", models_url(stack.envoy), headers=bearer(token)).status == 200


def test_unknown_or_missing_keys_do_not_exchange(stack: EdgeStack) -> None:
    unknown = exchange(stack.envoy, "sgk_000000000000_" + "x" * 43)
    assert unknown.status == 401 and reason(unknown) == "API_KEY_INVALID"
    missing = http("POST", f"{stack.envoy.url}/v1/auth:token", {})
    assert missing.status == 401 and reason(missing) == "API_KEY_MISSING"


def test_an_expired_exchanged_token_is_401(stack: EdgeStack) -> None:
    now = int(time.time())
    claims = {
        "iss": names.TOKEN_ISSUER,
        "aud": stack.params.audience,
        "sub": "apikey:expired",
        "tenant": TENANT,
        "roles": ["user"],
        "iat": now - 400,
        "nbf": now - 400,
        "exp": now - 100,  # past the 30 s clock skew Envoy allows
    }
    reply = http("GET", models_url(stack.envoy), headers=bearer(edge_key(stack).sign(claims)))
    assert reply.status == 401
    fresh = {**claims, "iat": now, "nbf": now, "exp": now + 60}
    assert http("GET", models_url(stack.envoy), headers=bearer(edge_key(stack).sign(fresh))).status == 200


def test_a_token_signed_by_another_key_under_the_edge_issuer_is_401(stack: EdgeStack) -> None:
    now = int(time.time())
    claims = {"iss": names.TOKEN_ISSUER, "aud": stack.params.audience, "tenant": TENANT, "exp": now + 60}
    forged = SigningKey.generate_ec().sign(claims)
    assert http("GET", models_url(stack.envoy), headers=bearer(forged)).status == 401


def test_the_sdk_exchanges_once_for_many_calls(stack: EdgeStack) -> None:
    _, api_key = stack.create_key(f"sdk-{SUFFIX}", "user")
    checks = ext_authz_checks(stack.envoy)
    exchanges = _exchange_count(stack.envoy)
    with ServegridClient(stack.envoy.address, api_key=api_key) as client:
        for _ in range(5):
            assert list(client.list_models()) is not None
    assert _exchange_count(stack.envoy) == exchanges + 1
    assert ext_authz_checks(stack.envoy) == checks


def test_without_a_signing_key_the_exchange_is_unimplemented_and_the_sdk_falls_back(stack: EdgeStack) -> None:
    edge = stack.start_edge("edge-no-tokens", SERVEGRID_EDGE_TOKEN_SIGNING_KEY_FILE="")
    envoy = stack.start_envoy("envoy-no-tokens", edge)
    _, api_key = stack.create_key(f"fallback-{SUFFIX}", "user")
    with grpc.insecure_channel(envoy.address) as channel, pytest.raises(grpc.RpcError) as refused:
        gateway_pb2_grpc.AuthServiceStub(channel).CreateAccessToken(
            gateway_pb2.CreateAccessTokenRequest(), metadata=[("x-api-key", api_key)], timeout=10
        )
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    checks = ext_authz_checks(envoy)
    with ServegridClient(envoy.address, api_key=api_key) as client:
        for _ in range(2):
            list(client.list_models())
    assert ext_authz_checks(envoy) == checks + 2  # the plain key, checked per request


def _access_log_paths(access_log: Path) -> list[str]:
    if not access_log.exists():
        return []
    return [json.loads(line)["path"] for line in access_log.read_text().splitlines() if line.strip()]


def _exchange_count(envoy: EnvoyProcess) -> int:
    """CreateAccessToken calls in Envoy's access log, once every earlier line is written: a marker
    request goes last and is waited for (the log is flushed in order, every second or so)."""
    marker = f"/healthz?marker={secrets.token_hex(4)}"
    assert http("GET", f"{envoy.url}{marker}").status == 200
    wait_for(lambda: marker in _access_log_paths(envoy.access_log_path), timeout_s=15)
    method = f"/{names.AUTH_SERVICE}/CreateAccessToken"
    return _access_log_paths(envoy.access_log_path).count(method)
