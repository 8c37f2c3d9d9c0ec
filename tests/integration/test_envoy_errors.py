"""Every reply Envoy writes itself, through a real Envoy: the services' error shape, over REST and gRPC.

REST: the HTTP status, `content-type: application/json` and `{"code", "message", "details": [ErrorInfo]}`
(KServe v2 paths: `{"error": ...}`, what tritonclient reads). gRPC: the status code, a sentence as the
message (never JSON text) and an ErrorInfo in the status details, as grpc_status.rpc_status reads them.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from servegrid.registry.v1 import registry_pb2, registry_pb2_grpc

from services.edge.devkeys import DevIssuer
from services.stack.ports import free_port
from tests.support.datastores import SessionDatastores
from tests.support.edge_stack import EdgeStack, HttpReply, edge_stack, http
from tests.support.envoy import EnvoyProcess, start_envoy
from tests.support.errors import assert_grpc_error, assert_rest_error
from tests.support.polling import wait_for

pytestmark = pytest.mark.integration

SUFFIX = secrets.token_hex(3)
TENANT = f"acme-{SUFFIX}"
LIMITED = f"limited-{SUFFIX}"
LIMITS = {LIMITED: 1}
# Nothing serves the models: these tests never reach Triton, and the routes need a backend address.
NO_TRITON = "127.0.0.1:1"


@dataclass(frozen=True)
class Keys:
    user: str
    revoked: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, datastores: SessionDatastores) -> Iterator[EdgeStack]:
    with edge_stack(tmp_path_factory.mktemp("errors"), datastores, NO_TRITON, LIMITS, NO_TRITON) as running:
        yield running


@pytest.fixture(scope="module")
def keys(stack: EdgeStack) -> Keys:
    _, user = stack.create_key(TENANT, "user")
    revoked_id, revoked = stack.create_key(TENANT, "user")
    assert stack.keys_cli("revoke", revoked_id).returncode == 0
    return Keys(user, revoked)


@pytest.fixture(scope="module")
def cut_off(stack: EdgeStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    """An Envoy whose gateway, registry and edge are addresses nobody listens on."""
    nobody = f"127.0.0.1:{free_port()}"
    params = replace(stack.params, gateway=nobody, registry=nobody, edge=nobody, mesh_port=free_port())
    with start_envoy(tmp_path_factory.mktemp("cut-off"), params) as envoy:
        yield envoy


def bearer(stack: EdgeStack, tenant: str = TENANT, **claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.issuer.token(tenant, **claims)}"}


def forged(stack: EdgeStack) -> dict[str, str]:
    return {"authorization": f"Bearer {DevIssuer.generate().token(TENANT)}"}


# --- what each case sends ------------------------------------------------------------------------
# (name, credential headers for the main Envoy) → a REST request and a gRPC call that Envoy refuses.

Credential = Callable[[EdgeStack, Keys], dict[str, str]]
CREDENTIALS: dict[str, Credential] = {
    "none": lambda s, k: {},
    "expired": lambda s, k: bearer(s, ttl_s=-120),
    "malformed": lambda s, k: {"authorization": "Bearer not-a-jwt"},
    "forged": lambda s, k: forged(s),
    "wrong-issuer": lambda s, k: bearer(s, issuer="https://evil.example"),
    "bad-api-key": lambda s, k: {"x-api-key": "sgk_nope_nope"},
    "revoked-api-key": lambda s, k: {"x-api-key": k.revoked},
    "wrong-audience": lambda s, k: bearer(s, audience="someone-else"),
    "wrong-audience-list": lambda s, k: bearer(s, audience=["someone-else", "other"]),
    "bad-tenant": lambda s, k: bearer(s, "Not A Tenant"),
    "user": lambda s, k: bearer(s),
    "user-api-key": lambda s, k: {"x-api-key": k.user},
}


@dataclass(frozen=True)
class Case:
    credential: str
    status: int  # HTTP (REST)
    code: int
    reason: str
    path: str = "/v1/models"  # REST
    method: str = "GET"
    body: bytes | None = None
    grpc: str = "gateway"  # which call over gRPC: gateway ListModels, registry ListModels, or a path


AUTH_CASES = {
    "no-credential": Case("none", 401, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_MISSING"),
    "expired-token": Case("expired", 401, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_TOKEN_EXPIRED"),
    "malformed-token": Case("malformed", 401, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_TOKEN_INVALID"),
    "forged-token": Case("forged", 401, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_TOKEN_INVALID"),
    "wrong-issuer": Case("wrong-issuer", 401, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_TOKEN_INVALID"),
    "bad-api-key": Case("bad-api-key", 401, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_API_KEY_INVALID"),
    "revoked-api-key": Case("revoked-api-key", 401, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_API_KEY_REVOKED"),
    "wrong-audience": Case("wrong-audience", 403, code_pb2.PERMISSION_DENIED, "AUDIENCE_MISMATCH"),
    "wrong-audience-list": Case("wrong-audience-list", 403, code_pb2.PERMISSION_DENIED, "AUDIENCE_MISMATCH"),
    "tenant-invalid": Case("bad-tenant", 401, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_TENANT_INVALID"),
    "admin-role-missing": Case(
        "user", 403, code_pb2.PERMISSION_DENIED, "ADMIN_ROLE_REQUIRED", path="/v1/admin/models", grpc="registry"
    ),
    "admin-role-missing-api-key": Case(
        "user-api-key",
        403,
        code_pb2.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
        path="/v1/admin/models",
        grpc="registry",
    ),
}
# REST only: the transcoder and the body limit never see a gRPC request.
REST_CASES = {
    "unknown-path": Case("user", 404, code_pb2.NOT_FOUND, "UNKNOWN_PATH", path="/elsewhere"),
    "unmapped-api-path": Case("user", 404, code_pb2.NOT_FOUND, "UNKNOWN_PATH", path="/v1/nothing-here"),
    "unmapped-verb": Case(
        "user", 404, code_pb2.NOT_FOUND, "UNKNOWN_PATH", path="/v1/models/digits:explode", method="POST", body=b"{}"
    ),
    "malformed-json": Case(
        "user",
        400,
        code_pb2.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
        path="/v1/models/digits:infer",
        method="POST",
        body=b'{"inputs": [',
    ),
    "wrong-field-type": Case(
        "user",
        400,
        code_pb2.INVALID_ARGUMENT,
        "MALFORMED_REQUEST",
        path="/v1/models/digits:infer",
        method="POST",
        body=b'{"inputs": "pixels"}',
    ),
    "wrong-query-type": Case("user", 400, code_pb2.INVALID_ARGUMENT, "MALFORMED_REQUEST", path="/v1/models?pageSize=x"),
    "unknown-query-parameter": Case(
        "user", 400, code_pb2.INVALID_ARGUMENT, "MALFORMED_REQUEST", path="/v1/models?colour=red"
    ),
}
# gRPC only: an unknown method is UNIMPLEMENTED, as a gRPC server answers it.
GRPC_CASES = {
    "unknown-method": Case("user", 0, code_pb2.UNIMPLEMENTED, "UNKNOWN_METHOD", grpc="/no.such.Service/Call"),
    "kserve-statistics-without-admin": Case(
        "user",
        0,
        code_pb2.PERMISSION_DENIED,
        "ADMIN_ROLE_REQUIRED",
        grpc="/inference.GRPCInferenceService/ModelStatistics",
    ),
    "unknown-method-no-credential": Case(
        "none", 0, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_MISSING", grpc="/no.such.Service/Call"
    ),
}


def rest(envoy: EnvoyProcess, case: Case, headers: dict[str, str]) -> HttpReply:
    content = {"content-type": "application/json"} if case.body is not None else {}
    return http(case.method, f"{envoy.url}{case.path}", case.body, {**headers, **content})


def grpc_call(envoy: EnvoyProcess, which: str, headers: dict[str, str]) -> grpc.RpcError:
    """The call's error (the test fails if the call succeeds)."""
    metadata = list(headers.items())
    with grpc.insecure_channel(envoy.address) as channel, pytest.raises(grpc.RpcError) as refused:
        if which == "gateway":
            gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
                gateway_pb2.ListModelsRequest(), metadata=metadata, timeout=10
            )
        elif which == "registry":
            registry_pb2_grpc.RegistryServiceStub(channel).ListModels(
                registry_pb2.ListModelsRequest(), metadata=metadata, timeout=10
            )
        else:
            channel.unary_unary(which)(b"", metadata=metadata, timeout=10)
    return refused.value


# --- the table -----------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [pytest.param(c, id=n) for n, c in {**AUTH_CASES, **REST_CASES}.items()])
def test_rest(stack: EdgeStack, keys: Keys, case: Case) -> None:
    reply = rest(stack.envoy, case, CREDENTIALS[case.credential](stack, keys))
    assert_rest_error(reply, case.status, case.code, case.reason)


@pytest.mark.parametrize("case", [pytest.param(c, id=n) for n, c in {**AUTH_CASES, **GRPC_CASES}.items()])
def test_grpc(stack: EdgeStack, keys: Keys, case: Case) -> None:
    error = grpc_call(stack.envoy, case.grpc, CREDENTIALS[case.credential](stack, keys))
    assert_grpc_error(error, case.code, case.reason)


def test_token_reasons_say_what_was_wrong(stack: EdgeStack, keys: Keys) -> None:
    """The REST message keeps jwt_authn's own words; the gRPC one is the fixed sentence its details carry."""
    expired = rest(stack.envoy, AUTH_CASES["expired-token"], CREDENTIALS["expired"](stack, keys)).json()
    assert "expired" in expired["message"]
    malformed = rest(stack.envoy, AUTH_CASES["malformed-token"], CREDENTIALS["malformed"](stack, keys)).json()
    assert "Header.Payload.Signature" in malformed["message"]
    revoked = rest(stack.envoy, AUTH_CASES["revoked-api-key"], CREDENTIALS["revoked-api-key"](stack, keys))
    assert "revoked" in revoked.json()["message"]
    assert revoked.headers["www-authenticate"].startswith("Bearer")


def test_oversized_body(stack: EdgeStack) -> None:
    count = stack.params.max_request_body_bytes // 4 + 1024
    body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[%d],"data":{"fp32":[%s]}}]}' % (
        count,
        b",".join([b"1.5"] * count),
    )
    reply = http("POST", f"{stack.envoy.url}/v1/models/digits:infer", body, bearer(stack))
    body_json = assert_rest_error(reply, 413, code_pb2.RESOURCE_EXHAUSTED, "REQUEST_TOO_LARGE")
    assert str(stack.params.max_request_body_bytes) in body_json["message"]


def _first_limited(send: Callable[[], Any], limited: Callable[[Any], bool]) -> Any:
    """Send until the tenant's limit bites (a limit of 1 per minute; the counting filter may let a few
    through before it has the tenant's count)."""
    replies: list[Any] = []

    def over() -> bool:
        replies.append(send())
        return limited(replies[-1])

    wait_for(over, timeout_s=30, poll_s=0.2)
    return replies[-1]


def test_rate_limited(stack: EdgeStack) -> None:
    def send_rest() -> HttpReply:
        return http("GET", f"{stack.envoy.url}/v1/models", headers=bearer(stack, LIMITED))

    reply = _first_limited(send_rest, lambda r: r.status == 429)
    assert_rest_error(reply, 429, code_pb2.RESOURCE_EXHAUSTED, "RATE_LIMITED")
    assert any(h.startswith("x-ratelimit-") or h == "retry-after" for h in reply.headers), reply.headers

    def send_grpc() -> grpc.RpcError | None:
        try:
            with grpc.insecure_channel(stack.envoy.address) as channel:
                gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
                    gateway_pb2.ListModelsRequest(), metadata=list(bearer(stack, LIMITED).items()), timeout=10
                )
        except grpc.RpcError as error:
            return error
        return None

    error = _first_limited(send_grpc, lambda e: e is not None and e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED)
    assert_grpc_error(error, code_pb2.RESOURCE_EXHAUSTED, "RATE_LIMITED")


def test_kserve_rest_keeps_kserves_error_shape(stack: EdgeStack, keys: Keys) -> None:
    """tritonclient's HTTP client reads `error`: the same refusals on /v2/ paths say it there."""
    url = f"{stack.envoy.url}/v2/models/affine/infer"
    for headers, status in [({}, 401), (bearer(stack, ttl_s=-120), 401), ({"x-api-key": keys.revoked}, 401)]:
        reply = http("POST", url, b"{}", headers)
        assert reply.status == status, reply.body
        assert reply.headers["content-type"] == "application/json"
        assert list(reply.json()) == ["error"] and reply.json()["error"], reply.body


def test_kserve_grpc_refusal_carries_the_error_info(stack: EdgeStack) -> None:
    error = grpc_call(stack.envoy, "/inference.GRPCInferenceService/ServerLive", {})
    assert_grpc_error(error, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_MISSING")


# --- when what Envoy needs is down ---------------------------------------------------------------


def test_service_unreachable(stack: EdgeStack, cut_off: EnvoyProcess) -> None:
    reply = http("GET", f"{cut_off.url}/v1/models", headers=bearer(stack))
    body = assert_rest_error(reply, 503, code_pb2.UNAVAILABLE, "SERVICE_UNAVAILABLE")
    assert "gateway" in body["message"]
    admin = http("GET", f"{cut_off.url}/v1/admin/models", headers=bearer(stack, roles=["admin"]))
    assert "registry" in assert_rest_error(admin, 503, code_pb2.UNAVAILABLE, "SERVICE_UNAVAILABLE")["message"]
    assert_grpc_error(grpc_call(cut_off, "gateway", bearer(stack)), code_pb2.UNAVAILABLE, "SERVICE_UNAVAILABLE")


def test_api_key_check_unavailable(stack: EdgeStack, keys: Keys, cut_off: EnvoyProcess) -> None:
    reply = http("GET", f"{cut_off.url}/v1/models", headers={"x-api-key": keys.user})
    assert_rest_error(reply, 503, code_pb2.UNAVAILABLE, "API_KEY_CHECK_UNAVAILABLE")
    error = grpc_call(cut_off, "gateway", {"x-api-key": keys.user})
    assert_grpc_error(error, code_pb2.UNAVAILABLE, "API_KEY_CHECK_UNAVAILABLE")


# --- what the transcoder does not check ----------------------------------------------------------


def test_unknown_json_fields_are_dropped_by_the_transcoder(stack: EdgeStack) -> None:
    """Envoy 1.40's grpc_json_transcoder has no option to refuse unknown body fields (its translator
    sets ignore_unknown_fields): the request reaches the gateway without them. Documented in the README;
    this test fails when that changes, so the table can say so."""
    body = b'{"inputs": [], "colour": "red"}'
    reply = http("POST", f"{stack.envoy.url}/v1/models/digits:infer", body, bearer(stack))
    # The gateway's own refusal (no inputs), not the transcoder's: "colour" was silently dropped.
    assert reply.status == 400, reply.body
    assert "at least one input" in reply.json()["message"]
    assert "colour" not in reply.body.decode()
