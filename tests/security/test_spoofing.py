"""Identity headers a client sends itself (every x-servegrid-* Envoy or the edge sets, and Envoy's x-jwt-*),
in several casings, over REST and as gRPC metadata: they never authenticate, and never change who the
gateway serves.

What the gateway was told is observable in Envoy's access log, which both listeners write: the public
listener's line shows the tenant header the gateway received, the mesh listener's line the tenant the
gateway itself forwarded with the inference it made (services/gateway/servicer.py Infer)."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import grpc
import pytest
import redis
from google.rpc import code_pb2
from servegrid.common.v1 import tensor_pb2
from servegrid.gateway.v1 import gateway_pb2

from services.mesh import names
from tests.security import support
from tests.security.support import TENANT_A, TENANT_B, Keys, logged, raw_request, request_id
from tests.support.edge_stack import EdgeStack, HttpReply, http
from tests.support.errors import assert_grpc_error, assert_rest_error
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

UNAUTHENTICATED, PERMISSION_DENIED = code_pb2.UNAUTHENTICATED, code_pb2.PERMISSION_DENIED
JWT_PAYLOAD = base64.urlsafe_b64encode(json.dumps({"tenant": TENANT_B, "roles": ["admin"]}).encode()).decode()
INFER_BODY = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": {"fp32": [1, 2, 3, 4]}}]}


def spoofed(keys: Keys) -> dict[str, str]:
    """Tenant B's identity (an admin one) in every header a client must not be able to set."""
    return {
        names.TENANT_HEADER: TENANT_B,
        names.SUBJECT_HEADER: "root",
        names.ROLES_HEADER: "admin",
        names.AUTH_METHOD_HEADER: "api-key",
        names.EXCHANGE_KEY_HEADER: keys.other_tenant,  # tenant B's real key, in the edge's internal header
        names.RATELIMIT_ROUTE_HEADER: "spoofed",
        "x-jwt-payload": JWT_PAYLOAD,
        "x-jwt-claim-tenant": TENANT_B,
    }


CASINGS: dict[str, Callable[[str], str]] = {
    "lower": str.lower,
    "upper": str.upper,
    "title": lambda name: "-".join(part.capitalize() for part in name.split("-")),
    "mixed": lambda name: "".join(c.upper() if i % 2 else c for i, c in enumerate(name)),
    # Not the same header to Envoy; a service that folded `_` into `-` would make it one.
    "underscores": lambda name: name.replace("-", "_"),
}


def cased(headers: dict[str, str], casing: str) -> list[tuple[str, str]]:
    return [(CASINGS[casing](name), value) for name, value in headers.items()]


def rest(
    stack: EdgeStack, method: str, path: str, headers: list[tuple[str, str]], body: object = None, rid: str = ""
) -> HttpReply:
    extra = [("content-type", "application/json")] if body is not None else []
    extra += [("x-request-id", rid)] if rid else []
    data = json.dumps(body).encode() if body is not None else None
    return raw_request(stack.envoy, method, path, [*headers, *extra], data)


def tenants_logged(stack: EdgeStack, rid: str, count: int) -> list[str]:
    return [line["tenant"] for line in logged(stack.envoy, rid, count)]


# --- no credential -----------------------------------------------------------------------------


@pytest.mark.parametrize("casing", list(CASINGS))
def test_spoofed_identity_headers_are_no_credential(stack: EdgeStack, keys: Keys, casing: str) -> None:
    reply = rest(stack, "GET", "/v1/models", cased(spoofed(keys), casing))
    assert_rest_error(reply, 401, UNAUTHENTICATED, "UNAUTHENTICATED_MISSING")
    admin_api = rest(stack, "GET", "/v1/admin/models", cased(spoofed(keys), casing))
    assert_rest_error(admin_api, 401, UNAUTHENTICATED, "UNAUTHENTICATED_MISSING")


def test_spoofed_identity_metadata_is_no_credential(stack: EdgeStack, keys: Keys) -> None:
    metadata = list(spoofed(keys).items())
    error = support.list_models_grpc(stack.envoy.address, metadata)
    assert isinstance(error, grpc.RpcError), error
    assert_grpc_error(error, UNAUTHENTICATED, "UNAUTHENTICATED_MISSING")
    assert_grpc_error(
        support.grpc_error(stack.envoy.address, support.REGISTRY_LIST, b"", metadata),
        UNAUTHENTICATED,
        "UNAUTHENTICATED_MISSING",
    )


@pytest.mark.parametrize("casing", ["lower", "upper", "title"])
def test_the_exchange_takes_the_key_from_x_api_key_only(stack: EdgeStack, keys: Keys, casing: str) -> None:
    """The edge reads the exchanged key from an internal header Envoy fills in; a client's copy of it is
    scrubbed, so it neither exchanges alone nor replaces the x-api-key sent with it."""
    header = CASINGS[casing](names.EXCHANGE_KEY_HEADER)
    alone = rest(stack, "POST", "/v1/auth:token", [(header, keys.other_tenant)], {})
    assert_rest_error(alone, 401, UNAUTHENTICATED, "API_KEY_MISSING")
    both = rest(stack, "POST", "/v1/auth:token", [(header, keys.other_tenant), ("x-api-key", keys.user)], {})
    assert both.status == 200, both.body
    assert both.json()["tenant"] == TENANT_A


# --- a valid credential for tenant A, tenant B's identity spoofed beside it -------------------------


@pytest.mark.parametrize("casing", list(CASINGS))
def test_a_spoofed_tenant_does_not_replace_the_tokens(stack: EdgeStack, keys: Keys, casing: str) -> None:
    headers = [*support.user(stack).items(), *cased(spoofed(keys), casing)]
    listing = request_id()
    support.assert_models_listed(rest(stack, "GET", "/v1/models", headers, rid=listing))
    inference = request_id()
    # No Triton behind the mesh: the gateway's inference fails, after it forwarded the tenant it believes.
    infer = rest(stack, "POST", "/v1/models/affine:infer", headers, INFER_BODY, rid=inference)
    assert_rest_error(infer, 503, code_pb2.UNAVAILABLE, "NO_HEALTHY_BACKEND")
    assert tenants_logged(stack, listing, 1) == [TENANT_A]
    # The public listener's line (what the gateway got) and the mesh listener's (what it forwarded).
    assert tenants_logged(stack, inference, 2) == [TENANT_A, TENANT_A]


def test_spoofed_tenant_metadata_does_not_replace_the_tokens(stack: EdgeStack, keys: Keys) -> None:
    listing, inference = request_id(), request_id()
    metadata = [*support.user(stack).items(), *spoofed(keys).items()]
    reply = support.list_models_grpc(stack.envoy.address, [*metadata, ("x-request-id", listing)])
    assert not isinstance(reply, grpc.RpcError), reply
    assert [m.model_id for m in reply.models] == support.MODELS
    tensor = tensor_pb2.Tensor(name="x", datatype="FP32", shape=[1, 4], data=tensor_pb2.TensorData(fp32=[1, 2, 3, 4]))
    request = gateway_pb2.InferRequest(model_id="affine", inputs=[tensor]).SerializeToString()
    error = support.grpc_error(
        stack.envoy.address, f"/{names.GATEWAY_SERVICE}/Infer", request, [*metadata, ("x-request-id", inference)]
    )
    assert_grpc_error(error, code_pb2.UNAVAILABLE, "NO_HEALTHY_BACKEND")
    assert tenants_logged(stack, listing, 1) == [TENANT_A]
    assert tenants_logged(stack, inference, 2) == [TENANT_A, TENANT_A]


@pytest.mark.parametrize("casing", ["lower", "upper"])
def test_a_spoofed_tenant_does_not_replace_the_api_keys(stack: EdgeStack, keys: Keys, casing: str) -> None:
    rid = request_id()
    reply = rest(stack, "GET", "/v1/models", [("x-api-key", keys.user), *cased(spoofed(keys), casing)], rid=rid)
    support.assert_models_listed(reply)
    assert tenants_logged(stack, rid, 1) == [TENANT_A]


def test_a_token_and_another_tenants_api_key_serve_the_tokens_tenant(stack: EdgeStack, keys: Keys) -> None:
    """A verified token decides; the key beside it is neither checked nor passed on."""
    rid = request_id()
    reply = rest(stack, "GET", "/v1/models", [*support.user(stack).items(), ("x-api-key", keys.other_tenant)], rid=rid)
    support.assert_models_listed(reply)
    assert tenants_logged(stack, rid, 1) == [TENANT_A]


# --- spoofed roles ---------------------------------------------------------------------------------


@pytest.mark.parametrize("casing", list(CASINGS))
def test_spoofed_admin_headers_do_not_open_the_admin_api(stack: EdgeStack, keys: Keys, casing: str) -> None:
    for credential in (support.user(stack), {"x-api-key": keys.user}):
        reply = rest(stack, "GET", "/v1/admin/models", [*credential.items(), *cased(spoofed(keys), casing)])
        assert_rest_error(reply, 403, PERMISSION_DENIED, "ADMIN_ROLE_REQUIRED")


def test_spoofed_admin_metadata_does_not_open_the_admin_api(stack: EdgeStack, keys: Keys) -> None:
    for credential in (support.user(stack), {"x-api-key": keys.user}):
        metadata = [*credential.items(), *spoofed(keys).items()]
        error = support.grpc_error(stack.envoy.address, support.REGISTRY_LIST, b"", metadata)
        assert_grpc_error(error, PERMISSION_DENIED, "ADMIN_ROLE_REQUIRED")
    # The positive control: the admin key opens it.
    admin = http("GET", f"{stack.envoy.url}/v1/admin/models", headers={"x-api-key": keys.admin})
    assert admin.status == 200, admin.body


# --- the rate-limit bucket ------------------------------------------------------------------------


def route_counters(stack: EdgeStack, tenant: str) -> set[str]:
    """The routes the edge counts `tenant`'s requests under (route limits: support.ROUTE_LIMITS)."""
    client = redis.Redis.from_url(stack.datastores.redis_url)
    try:
        keys = [k.decode() for k in client.scan_iter(f"{stack.redis_prefix}rl:*:t={tenant}|r=*")]
    finally:
        client.close()
    return {key.rsplit("|r=", 1)[1].rsplit(":", 1)[0] for key in keys}


@pytest.mark.parametrize("casing", ["lower", "upper"])
def test_a_spoofed_rate_limit_route_is_not_the_bucket(stack: EdgeStack, casing: str) -> None:
    """Envoy counts a request under its route's rate-limit name, whatever name the client sent."""
    tenant = f"bucket-{casing}-{support.SUFFIX}"
    header = CASINGS[casing](names.RATELIMIT_ROUTE_HEADER)
    reply = rest(stack, "GET", "/v1/models", [*support.user(stack, tenant).items(), (header, "spoofed")])
    support.assert_models_listed(reply)
    wait_for(lambda: bool(route_counters(stack, tenant)), timeout_s=15, poll_s=0.1)
    assert route_counters(stack, tenant) == {"gateway"}
