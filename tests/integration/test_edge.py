"""The front door end to end: real Envoy, edge, gateway, Triton, PostgreSQL and Redis."""

from __future__ import annotations

import base64
import json
import secrets
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tritongrpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servegrid.common.v1 import tensor_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from servegrid.registry.v1 import registry_pb2, registry_pb2_grpc

from models.digits import HeldOutSplit
from services.runtime.errors import status_details
from services.stack.triton import TritonInstance
from tests.support.datastores import SessionDatastores
from tests.support.edge_stack import EdgeStack, HttpReply, edge_stack, http

pytestmark = pytest.mark.integration

SUFFIX = secrets.token_hex(3)
TENANT = f"acme-{SUFFIX}"
OTHER = f"globex-{SUFFIX}"
LIMITS: dict[str, int] = {}  # no tenant is limited here (tests/integration/test_edge_ratelimit.py)


@pytest.fixture(scope="module")
def stack(
    triton: TritonInstance, tmp_path_factory: pytest.TempPathFactory, datastores: SessionDatastores
) -> Iterator[EdgeStack]:
    edge_dir = tmp_path_factory.mktemp("edge")
    with edge_stack(edge_dir, datastores, triton.grpc_address, LIMITS, triton.http_address) as running:
        yield running


@pytest.fixture(scope="module")
def digit(triton: TritonInstance, digits_held_out: HeldOutSplit) -> tuple[list[float], int]:
    """A held-out image that Triton, asked directly, classifies correctly, with its label."""
    client = tritongrpc.InferenceServerClient(triton.grpc_address)
    try:
        pixels = digits_held_out.pixels[:20].astype(np.float32)
        tensor = tritongrpc.InferInput("pixels", list(pixels.shape), "FP32")
        tensor.set_data_from_numpy(pixels)
        labels = client.infer("digits", [tensor]).as_numpy("label")[:, 0]
    finally:
        client.close()
    index = next(i for i in range(len(labels)) if labels[i] == digits_held_out.labels[i])
    return pixels[index].tolist(), int(digits_held_out.labels[index])


def bearer(stack: EdgeStack, tenant: str = TENANT, **claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {stack.issuer.token(tenant, **claims)}"}


def infer_body(pixels: list[float]) -> dict[str, object]:
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": {"fp32": pixels}}]}


def rest_infer(stack: EdgeStack, headers: dict[str, str], body: object, model: str = "digits") -> HttpReply:
    return http("POST", f"{stack.envoy.url}/v1/models/{model}:infer", body, headers)


def label_of(reply: HttpReply) -> int:
    outputs = {o["name"]: o for o in reply.json()["outputs"]}
    return int(outputs["label"]["data"]["int64"][0])


def digits_stats(triton: TritonInstance) -> tuple[int, int]:
    """Triton's (success, fail) counts for digits: proof of whether a request reached it."""
    with urllib.request.urlopen(f"http://{triton.http_address}/v2/models/digits/stats", timeout=5) as reply:
        stats = json.loads(reply.read())["model_stats"][0]["inference_stats"]
    return int(stats["success"]["count"]), int(stats["fail"]["count"])


# --- the happy paths -------------------------------------------------------------------------


def _ext_authz_checks(stack: EdgeStack) -> int:
    stats = stack.envoy.stats("ext_authz")
    return sum(
        v
        for k, v in stats.items()
        if k.startswith("http.public.ext_authz.") and k.split(".")[-1] in ("ok", "denied", "error")
    )


def test_rest_infer_with_jwt_returns_the_right_digit(stack: EdgeStack, digit: tuple[list[float], int]) -> None:
    pixels, label = digit
    checks = _ext_authz_checks(stack)
    reply = rest_infer(stack, bearer(stack), infer_body(pixels))
    # A verified JWT is enough: the API-key check (a call to the edge) is skipped.
    assert _ext_authz_checks(stack) == checks
    assert reply.status == 200, reply.body
    assert label_of(reply) == label
    body = reply.json()
    assert body["modelId"] == "digits" and body["requestId"]
    assert reply.headers.get("x-request-id")


def test_grpc_infer_through_envoy_with_jwt(stack: EdgeStack, digit: tuple[list[float], int]) -> None:
    pixels, label = digit
    with grpc.insecure_channel(stack.envoy.address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        tensor = tensor_pb2.Tensor(
            name="pixels", datatype="FP32", shape=[1, 64], data=tensor_pb2.TensorData(fp32=pixels)
        )
        reply = stub.Infer(
            gateway_pb2.InferRequest(model_id="digits", inputs=[tensor], request_id="req-1"),
            metadata=list(bearer(stack).items()),
            timeout=10,
        )
    outputs = {o.name: o for o in reply.outputs}
    assert list(outputs["label"].data.int64) == [label]
    assert reply.request_id == "req-1"


def test_tritonclient_through_envoy_with_jwt(stack: EdgeStack, digit: tuple[list[float], int]) -> None:
    pixels, label = digit
    client = tritongrpc.InferenceServerClient(stack.envoy.address)
    try:
        tensor = tritongrpc.InferInput("pixels", [1, 64], "FP32")
        tensor.set_data_from_numpy(np.asarray([pixels], dtype=np.float32))
        result = client.infer("digits", [tensor], headers=bearer(stack))
        assert int(result.as_numpy("label")[0, 0]) == label
        with pytest.raises(tritongrpc.InferenceServerException) as refused:
            client.infer("digits", [tensor])
        assert "UNAUTHENTICATED" in str(refused.value.status())
    finally:
        client.close()


def test_model_statistics_are_for_admins_only(stack: EdgeStack) -> None:
    # Triton's statistics count every tenant's requests to the model.
    client = tritongrpc.InferenceServerClient(stack.envoy.address)
    try:
        with pytest.raises(tritongrpc.InferenceServerException) as refused:
            client.get_inference_statistics("digits", headers=bearer(stack, roles=["user"]))
        assert "PERMISSION_DENIED" in str(refused.value.status())
        stats = client.get_inference_statistics("digits", headers=bearer(stack, roles=["admin"]))
        assert [s.name for s in stats.model_stats] == ["digits"]
    finally:
        client.close()


def test_health_needs_no_credential(stack: EdgeStack) -> None:
    assert http("GET", f"{stack.envoy.url}/healthz").status == 200
    with grpc.insecure_channel(stack.envoy.address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_grpcurl_discovers_the_api_through_envoy_with_a_credential(stack: EdgeStack) -> None:
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    token = bearer(stack)["authorization"]
    listed = subprocess.run(
        [grpcurl, "-plaintext", "-H", f"authorization: {token}", stack.envoy.address, "list"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert listed.returncode == 0, listed.stderr
    assert "servegrid.gateway.v1.GatewayService" in listed.stdout.split()


def test_list_and_get_models_over_rest(stack: EdgeStack) -> None:
    listed = http("GET", f"{stack.envoy.url}/v1/models?pageSize=10", headers=bearer(stack))
    assert listed.status == 200, listed.body
    ids = [m["modelId"] for m in listed.json()["models"]]
    assert ids == ["affine", "digits"]  # "draft-only" has nothing servable
    got = http("GET", f"{stack.envoy.url}/v1/models/digits", headers=bearer(stack))
    assert got.status == 200, got.body
    model = got.json()["model"]
    assert [i["name"] for i in model["inputs"]] == ["pixels"]
    assert {o["name"] for o in model["outputs"]} == {"label", "probabilities"}
    assert model["versions"][0]["stage"] == "STAGE_PRODUCTION"  # the registry's spelling


def test_batch_is_unimplemented_with_a_clear_message(stack: EdgeStack) -> None:
    reply = http("GET", f"{stack.envoy.url}/v1/batchJobs", headers=bearer(stack))
    assert reply.status == 501
    assert "batch is not deployed" in reply.json()["message"]


# --- credentials -----------------------------------------------------------------------------


def test_no_credential_is_401_and_unauthenticated(stack: EdgeStack, digit: tuple[list[float], int]) -> None:
    reply = rest_infer(stack, {}, infer_body(digit[0]))
    assert reply.status == 401
    assert "x-api-key" in reply.body.decode()
    with grpc.insecure_channel(stack.envoy.address) as channel, pytest.raises(grpc.RpcError) as refused:
        gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("claims", "status"),
    [
        pytest.param({"ttl_s": -120}, 401, id="expired"),
        pytest.param({"issuer": "https://evil.example"}, 401, id="wrong-issuer"),
        pytest.param({"audience": "someone-else"}, 403, id="wrong-audience"),
        pytest.param({"audience": ["someone-else", "other"]}, 403, id="wrong-audience-list"),
        pytest.param({"audience": ["someone-else", "servegrid"]}, 200, id="audience-in-list"),
    ],
)
def test_bad_tokens(stack: EdgeStack, digit: tuple[list[float], int], claims: dict[str, Any], status: int) -> None:
    reply = rest_infer(stack, bearer(stack, **claims), infer_body(digit[0]))
    assert reply.status == status, reply.body


def test_token_signed_by_another_key_is_401(stack: EdgeStack, digit: tuple[list[float], int]) -> None:
    from services.edge.devkeys import DevIssuer

    forged = DevIssuer.generate().token(TENANT)
    assert rest_infer(stack, {"authorization": f"Bearer {forged}"}, infer_body(digit[0])).status == 401


def test_wrong_audience_over_grpc_is_permission_denied(stack: EdgeStack) -> None:
    with grpc.insecure_channel(stack.envoy.address) as channel, pytest.raises(grpc.RpcError) as refused:
        gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
            gateway_pb2.ListModelsRequest(), metadata=list(bearer(stack, audience="nope").items()), timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_spoofed_identity_headers_are_ignored(stack: EdgeStack, digit: tuple[list[float], int]) -> None:
    victim = f"victim-{SUFFIX}"
    spoofed_payload = base64.urlsafe_b64encode(json.dumps({"tenant": victim, "roles": ["admin"]}).encode()).decode()
    headers = {
        **bearer(stack, OTHER),
        "x-servegrid-tenant": victim,
        "x-servegrid-roles": "admin",
        "x-jwt-payload": spoofed_payload,
    }
    reply = rest_infer(stack, headers, infer_body(digit[0]))
    assert reply.status == 200, reply.body
    # Counted against the caller's own tenant, never the one it named.
    assert stack.counter_keys(OTHER) and not stack.counter_keys(victim)
    # And the spoofed admin role does not open the admin API.
    admin = http("GET", f"{stack.envoy.url}/v1/admin/models", headers=headers)
    assert admin.status == 403


def test_api_key_works_until_revoked(stack: EdgeStack, digit: tuple[list[float], int]) -> None:
    tenant = f"keyed-{SUFFIX}"
    key_id, api_key = stack.create_key(tenant, "user")
    checks = _ext_authz_checks(stack)
    reply = rest_infer(stack, {"x-api-key": api_key}, infer_body(digit[0]))
    assert reply.status == 200, reply.body
    assert _ext_authz_checks(stack) == checks + 1  # without a JWT, the edge checked the key
    assert label_of(reply) == digit[1]
    assert stack.counter_keys(tenant)
    listed = stack.keys_cli("list", "--tenant", tenant)
    assert key_id in listed.stdout and api_key not in listed.stdout
    assert stack.keys_cli("revoke", key_id).returncode == 0
    revoked = rest_infer(stack, {"x-api-key": api_key}, infer_body(digit[0]))
    assert revoked.status == 401
    assert "revoked" in revoked.body.decode()
    assert rest_infer(stack, {"x-api-key": "sgk_nope_nope"}, infer_body(digit[0])).status == 401


def test_admin_api_needs_the_admin_role(stack: EdgeStack) -> None:
    url = f"{stack.envoy.url}/v1/admin/models"
    assert http("GET", url, headers=bearer(stack, roles=["user"])).status == 403
    assert http("GET", url, headers=bearer(stack, roles=["admin"])).status == 200
    _, user_key = stack.create_key(f"keyed-{SUFFIX}", "user")
    _, admin_key = stack.create_key(f"keyed-{SUFFIX}", "admin")
    assert http("GET", url, headers={"x-api-key": user_key}).status == 403
    assert http("GET", url, headers={"x-api-key": admin_key}).status == 200
    with grpc.insecure_channel(stack.envoy.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ListModels(registry_pb2.ListModelsRequest(), metadata=list(bearer(stack).items()), timeout=5)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        admin = stub.ListModels(
            registry_pb2.ListModelsRequest(), metadata=list(bearer(stack, roles=["admin"]).items()), timeout=5
        )
        assert [m.model_id for m in admin.models] == ["affine", "digits", "draft-only"]


# --- rate limits -----------------------------------------------------------------------------
# Limits (the edge as Envoy's rate-limit quota server: bounds, 429 shape, fail-open and recovery with
# two Envoys) are tested in tests/integration/test_edge_ratelimit.py, with a window they can control.


# --- input the front door refuses ------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        pytest.param(b'{"inputs": [', "", id="malformed-json"),
        pytest.param(
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 63], "data": {"fp32": [0.0] * 64}}]},
            "inputs[0].shape",
            id="shape-does-not-match-data",
        ),
        pytest.param(
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": {"int32": [0] * 64}}]},
            "data.fp32",
            id="data-in-the-wrong-list",
        ),
        pytest.param(
            {"inputs": [{"name": "pixels", "datatype": "FLOAT", "shape": [1, 64], "data": {"fp32": [0.0] * 64}}]},
            "unknown datatype",
            id="unknown-datatype",
        ),
        pytest.param(
            {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 64], "data": {"fp32": ["a"] * 64}}]},
            "",
            id="string-for-a-float",
        ),
        pytest.param(
            {
                "version": "latest",
                "inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1], "data": {"fp32": [1]}}],
            },
            "version",
            id="unknown-field-value",
        ),
        pytest.param({"inputs": []}, "at least one input", id="no-inputs"),
    ],
)
def test_bad_input_is_400_and_never_reaches_triton(
    stack: EdgeStack, triton: TritonInstance, body: object, fragment: str
) -> None:
    before = digits_stats(triton)
    reply = rest_infer(stack, bearer(stack), body)
    assert reply.status == 400, reply.body
    assert fragment in reply.body.decode()
    assert digits_stats(triton) == before


def test_model_rejects_wrong_shape_with_tritons_message(stack: EdgeStack) -> None:
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [1, 63], "data": {"fp32": [0.0] * 63}}]}
    reply = rest_infer(stack, bearer(stack), body)
    assert reply.status == 400
    assert "pixels" in reply.json()["message"]


def test_oversized_body_is_refused(stack: EdgeStack, triton: TritonInstance) -> None:
    before = digits_stats(triton)
    count = stack.params.max_request_body_bytes // 4 + 1024  # FP32: 4 bytes per element once transcoded
    body = {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": [count], "data": {"fp32": [1.5] * count}}]}
    reply = rest_infer(stack, bearer(stack), body)
    assert reply.status == 413, reply.body[:300]
    assert digits_stats(triton) == before


def test_unknown_paths_and_models(stack: EdgeStack, digit: tuple[list[float], int]) -> None:
    assert http("GET", f"{stack.envoy.url}/v1/nothing-here", headers=bearer(stack)).status == 404
    assert http("POST", f"{stack.envoy.url}/v1/models/digits:explode", {}, bearer(stack)).status == 404
    assert http("GET", f"{stack.envoy.url}/elsewhere", headers=bearer(stack)).status == 404
    # An unknown streaming gRPC method is answered at once, not held open.
    with grpc.insecure_channel(stack.envoy.address) as channel, pytest.raises(grpc.RpcError) as unknown:
        call = channel.stream_stream("/no.such.Service/Chat", request_serializer=None, response_deserializer=None)
        list(call(iter([b""]), metadata=list(bearer(stack).items()), timeout=5))
    assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
    missing = rest_infer(stack, bearer(stack), infer_body(digit[0]), model="no-such-model")
    assert missing.status == 404
    with grpc.insecure_channel(stack.envoy.address) as channel, pytest.raises(grpc.RpcError) as refused:
        gateway_pb2_grpc.GatewayServiceStub(channel).Infer(
            gateway_pb2.InferRequest(
                model_id="no-such-model",
                inputs=[tensor_pb2.Tensor(name="x", datatype="FP32", shape=[1], data=tensor_pb2.TensorData(fp32=[1]))],
            ),
            metadata=list(bearer(stack).items()),
            timeout=5,
        )
    assert refused.value.code() == grpc.StatusCode.NOT_FOUND
    _, info = status_details(refused.value.trailing_metadata())
    assert info is not None and info.reason == "MODEL_NOT_FOUND"


# --- the Python SDK through Envoy ------------------------------------------------------------


def test_sdk_plain_python_lists_take_the_models_declared_datatype(
    stack: EdgeStack, digit: tuple[list[float], int]
) -> None:
    # numpy's default for [[0.0, ...]] is FP64, which the FP32 model refuses; the SDK asks the model's
    # signature once and converts.
    from servegrid_sdk import ServegridClient, ServegridError

    pixels, label = digit
    with ServegridClient(stack.envoy.address, token=stack.issuer.token(TENANT)) as sg:
        result = sg.infer("digits", {"pixels": [pixels]})
        assert int(result.outputs["label"][0, 0]) == label
        assert sg._signatures == {"digits": {"pixels": "FP32"}}  # one GetModel, then cached
        with pytest.raises(ServegridError) as refused:
            sg.infer("no-such-model", {"x": [[1.0]]})
        assert refused.value.code == grpc.StatusCode.NOT_FOUND


async def test_async_sdk_infers_lists_models_and_exchanges_an_api_key(
    stack: EdgeStack, digit: tuple[list[float], int]
) -> None:
    from servegrid_sdk import AsyncServegridClient

    pixels, label = digit
    _, key = stack.create_key(f"async-{SUFFIX}", "user")
    async with AsyncServegridClient(stack.envoy.address, api_key=key) as sg:
        result = await sg.infer("digits", {"pixels": [pixels]})
        assert int(result.outputs["label"][0, 0]) == label
        assert [m.model_id async for m in sg.list_models(page_size=1)] == ["affine", "digits"]
        assert sg.api_key is not None and sg.api_key.exchanges == 1  # one exchange for every call
