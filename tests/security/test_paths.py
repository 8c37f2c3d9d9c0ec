"""Paths bent to slip past the admin check or reach KServe APIs the front door does not serve.

RBAC matches the path after the HCM has normalised it (dot segments, merged slashes), the same path the
route and the upstream see. Each trick is sent with a user's token (refused, exactly) and an admin's
(which shows where the bent path really lands: the admin API, or nowhere)."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2
from tritonclient.grpc import service_pb2

from services.mesh import names
from tests.security import support
from tests.security.support import raw_request
from tests.support.edge_stack import EdgeStack, HttpReply
from tests.support.errors import assert_grpc_error, assert_rest_error

pytestmark = pytest.mark.integration

PERMISSION_DENIED, NOT_FOUND = code_pb2.PERMISSION_DENIED, code_pb2.NOT_FOUND
ADMIN_ROLE_REQUIRED = "ADMIN_ROLE_REQUIRED"
KSERVE = f"/{names.KSERVE_SERVICE}"


@dataclass(frozen=True)
class Bent:
    """A request target and where it lands: for a user (403: the admin check; 404: no such path; 400:
    Envoy's HTTP/1 codec refuses the request line) and for an admin (200: it is the admin API; 404: it
    is not; 400)."""

    target: str
    user_status: int
    admin_status: int


ADMIN_PATHS: dict[str, Bent] = {
    "plain": Bent("/v1/admin/models", 403, 200),
    "double-slash": Bent("/v1//admin/models", 403, 200),
    "leading-double-slash": Bent("//v1/admin/models", 403, 200),
    "dot-segment": Bent("/v1/./admin/models", 403, 200),
    "dot-dot-segment": Bent("/v1/admin/../admin/models", 403, 200),
    "dot-dot-from-a-public-path": Bent("/v1/models/../admin/models", 403, 200),
    "percent-encoded-letter": Bent("/v1/%61dmin/models", 403, 200),
    "percent-encoded-dot-dot": Bent("/v1/models/%2e%2e/admin/models", 403, 200),
    "percent-encoded-slash": Bent("/v1/admin%2fmodels", 404, 404),
    "upper-case": Bent("/V1/ADMIN/models", 404, 404),
    "upper-case-admin": Bent("/v1/ADMIN/models", 404, 404),
    "trailing-question-mark": Bent("/v1/admin/models?", 403, 200),
    # A fragment has no place in a request target (RFC 9112): refused before any filter, with no body.
    "fragment": Bent("/v1/admin/models#top", 400, 400),
    "path-parameter": Bent("/v1/admin/models;x=1", 403, 404),
    "trailing-slash": Bent("/v1/admin/models/", 403, 200),
}


def get(stack: EdgeStack, target: str, credential: dict[str, str]) -> HttpReply:
    return raw_request(stack.envoy, "GET", target, list(credential.items()))


@pytest.mark.parametrize("bent", list(ADMIN_PATHS.values()), ids=list(ADMIN_PATHS))
def test_a_bent_admin_path_stays_closed_to_a_user(stack: EdgeStack, bent: Bent) -> None:
    reply = get(stack, bent.target, support.user(stack))
    if bent.user_status == 403:
        assert_rest_error(reply, 403, PERMISSION_DENIED, ADMIN_ROLE_REQUIRED)
    elif bent.user_status == 404:
        assert_rest_error(reply, 404, NOT_FOUND, "UNKNOWN_PATH")
    else:
        assert (reply.status, reply.body) == (400, b""), reply
    as_admin = get(stack, bent.target, support.admin(stack))
    assert as_admin.status == bent.admin_status, as_admin.body[:300]
    if bent.admin_status == 200:
        assert [m["modelId"] for m in as_admin.json()["models"]] == ["affine", "digits", "draft-only"]


# --- the admin API's gRPC path, over HTTP/1.1 --------------------------------------------------------

EMPTY_GRPC_MESSAGE = b"\x00\x00\x00\x00\x00"  # one length-prefixed frame: uncompressed, 0 bytes


def grpc_status_of(reply: HttpReply) -> tuple[int, str]:
    """(grpc-status, ErrorInfo reason) of a trailers-only gRPC reply, read from its headers."""
    status = status_pb2.Status.FromString(base64.b64decode(reply.headers["grpc-status-details-bin"] + "=="))
    info = error_details_pb2.ErrorInfo()
    assert status.details and status.details[0].Unpack(info), status
    return int(reply.headers["grpc-status"]), info.reason


@pytest.mark.parametrize("suffix", ["", "?", "?page_size=1"])
@pytest.mark.parametrize("content_type", ["application/grpc", "application/grpc+proto"])
def test_the_registrys_grpc_path_over_http1_is_refused(stack: EdgeStack, content_type: str, suffix: str) -> None:
    """gRPC's own shape (HTTP 200, the refusal in grpc-status), since the caller speaks gRPC."""
    headers = [*support.user(stack).items(), ("content-type", content_type), ("te", "trailers")]
    reply = raw_request(stack.envoy, "POST", support.REGISTRY_LIST + suffix, headers, EMPTY_GRPC_MESSAGE)
    assert reply.status == 200 and reply.body == b"", (reply.status, reply.body[:300])
    assert grpc_status_of(reply) == (PERMISSION_DENIED, ADMIN_ROLE_REQUIRED)


@pytest.mark.xfail(
    strict=True,
    reason="finding: Envoy's refusal of a request target with a fragment reaches a gRPC caller as "
    "grpc-status 13 INTERNAL with no message or ErrorInfo (REST callers get a bare 400); the caller's "
    "mistake should read INVALID_ARGUMENT",
)
def test_the_registrys_grpc_path_with_a_fragment_is_invalid_argument(stack: EdgeStack) -> None:
    headers = [*support.user(stack).items(), ("content-type", "application/grpc"), ("te", "trailers")]
    reply = raw_request(stack.envoy, "POST", support.REGISTRY_LIST + "#x", headers, EMPTY_GRPC_MESSAGE)
    assert (reply.status, reply.body) == (200, b""), reply  # today: 200, grpc-status 13, nothing else
    assert reply.headers["grpc-status"] == str(code_pb2.INVALID_ARGUMENT), reply.headers


def test_the_registrys_grpc_path_as_json_is_refused(stack: EdgeStack) -> None:
    headers = [*support.user(stack).items(), ("content-type", "application/json")]
    reply = raw_request(stack.envoy, "POST", support.REGISTRY_LIST, headers, b"{}")
    assert_rest_error(reply, 403, PERMISSION_DENIED, ADMIN_ROLE_REQUIRED)


@pytest.mark.parametrize(
    ("method", "code", "reason"),
    [
        pytest.param(support.REGISTRY_LIST, PERMISSION_DENIED, ADMIN_ROLE_REQUIRED, id="plain"),
        pytest.param(
            support.REGISTRY_LIST.replace("/ListModels", "//ListModels"),
            PERMISSION_DENIED,
            ADMIN_ROLE_REQUIRED,
            id="double-slash",
        ),
        pytest.param(
            support.REGISTRY_LIST.replace("/ListModels", "/./ListModels"),
            PERMISSION_DENIED,
            ADMIN_ROLE_REQUIRED,
            id="dot-segment",
        ),
        pytest.param(
            f"/{names.GATEWAY_SERVICE}/../{support.REGISTRY_LIST.lstrip('/')}",
            PERMISSION_DENIED,
            ADMIN_ROLE_REQUIRED,
            id="dot-dot-from-the-gateway",
        ),
        pytest.param(
            support.REGISTRY_LIST.replace("servegrid.registry", "Servegrid.Registry"),
            code_pb2.UNIMPLEMENTED,
            "UNKNOWN_METHOD",
            id="upper-case-package",
        ),
    ],
)
def test_a_bent_registry_method_stays_closed_to_a_user(stack: EdgeStack, method: str, code: int, reason: str) -> None:
    error = support.grpc_error(stack.envoy.address, method, b"", list(support.user(stack).items()))
    assert_grpc_error(error, code, reason)


# --- KServe: statistics are for admins, the rest of the server API is not served --------------------


@pytest.mark.parametrize("model", ["affine", ""], ids=["one-model", "every-model"])
@pytest.mark.parametrize(
    "path",
    [f"{KSERVE}/ModelStatistics", f"{KSERVE}//ModelStatistics", f"{KSERVE}/./ModelStatistics"],
    ids=["plain", "double-slash", "dot-segment"],
)
def test_model_statistics_need_the_admin_role(stack: EdgeStack, path: str, model: str) -> None:
    request = service_pb2.ModelStatisticsRequest(name=model).SerializeToString()
    error = support.grpc_error(stack.envoy.address, path, request, list(support.user(stack).items()))
    assert_grpc_error(error, PERMISSION_DENIED, ADMIN_ROLE_REQUIRED)


NOT_SERVED_RPCS = [
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
    "modelstatistics",  # a served method's bent spelling is not it
]


@pytest.mark.parametrize("rpc", NOT_SERVED_RPCS)
def test_kserve_server_rpcs_are_unimplemented_even_for_an_admin(stack: EdgeStack, rpc: str) -> None:
    for credential in (support.user(stack), support.admin(stack)):
        error = support.grpc_error(stack.envoy.address, f"{KSERVE}/{rpc}", b"", list(credential.items()))
        assert_grpc_error(error, code_pb2.UNIMPLEMENTED, "METHOD_NOT_SERVED")


def test_a_method_path_with_a_trailing_slash_is_invalid(stack: EdgeStack) -> None:
    """Not a gRPC method path at all (`/package.Service/Method`): refused as such, not routed."""
    for credential in (support.user(stack), support.admin(stack)):
        error = support.grpc_error(stack.envoy.address, f"{KSERVE}/ModelStatistics/", b"", list(credential.items()))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error
        assert "should be in form of `/package.service/method`" in (error.details() or "")


NOT_SERVED_REST = [
    ("POST", "/v2/repository/index"),
    ("POST", "/v2/repository/models/affine/load"),
    ("POST", "/v2/repository/models/affine/unload"),
    ("GET", "/v2/systemsharedmemory/status"),
    ("POST", "/v2/systemsharedmemory/region/r/register"),
    ("GET", "/v2/cudasharedmemory/status"),
    ("POST", "/v2/cudasharedmemory/region/r/unregister"),
    ("GET", "/v2/trace/setting"),
    ("GET", "/v2/logging"),
    ("GET", "/v2/models/affine/stats"),
    ("GET", "/v2/models/affine/versions/1/stats"),
    ("GET", "/v2/models/affine/trace/setting"),
    # Bent spellings.
    ("POST", "/v2//repository/index"),
    ("POST", "/v2/models/../repository/index"),
    ("POST", "/v2/%72epository/index"),
    ("GET", "/v2/models/affine/./stats"),
    ("GET", "/v2/models/affine/stats/"),
    ("GET", "/v2/models/affine/stats?x=1"),
]


@pytest.mark.parametrize(("method", "target"), NOT_SERVED_REST, ids=[f"{m} {t}" for m, t in NOT_SERVED_REST])
def test_kserve_server_apis_over_rest_are_forbidden_even_for_an_admin(
    stack: EdgeStack, method: str, target: str
) -> None:
    """KServe's REST shape (`{"error"}`: what tritonclient reads)."""
    for credential in (support.user(stack), support.admin(stack)):
        body = b"{}" if method == "POST" else None
        headers = [*credential.items(), ("content-type", "application/json")]
        reply = raw_request(stack.envoy, method, target, headers, body)
        assert reply.status == 403, (reply.status, reply.body[:300])
        assert reply.json() == {"error": "this KServe API is not served"}


def test_every_models_statistics_over_rest_is_no_model(stack: EdgeStack) -> None:
    """`/v2/models/stats` (Triton: every model's counts) is read as a model named "stats": not served."""
    for credential in (support.user(stack), support.admin(stack)):
        reply = raw_request(stack.envoy, "GET", "/v2/models/stats", list(credential.items()))
        assert reply.status == 404, (reply.status, reply.body[:300])
        assert reply.json() == {"error": "no model is served at /v2/models/stats"}


def test_the_kserve_server_metadata_stays_reachable(stack: EdgeStack) -> None:
    """A control for the guards: a served server-wide method is routed (to no Triton here: UNAVAILABLE),
    not refused by them."""
    result = support.grpc_call(stack.envoy.address, f"{KSERVE}/ServerLive", b"", list(support.user(stack).items()))
    assert isinstance(result, grpc.RpcError) and result.code() == grpc.StatusCode.UNAVAILABLE, result
