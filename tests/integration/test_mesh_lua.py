"""The kserve Lua filters in a real Envoy in front of a real Triton: routing by model name with no
client change, refusing ambiguous or malformed requests, and renaming models whose Triton name differs."""

from __future__ import annotations

import base64
import http.client
import json
import os
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from tritonclient.grpc import service_pb2
from tritonclient.utils import InferenceServerException

from services.mesh import lua
from services.stack.ports import free_port
from services.stack.triton import TritonInstance
from tests.support.envoy import admin_ready, envoy_binary
from tests.support.polling import wait_started

pytestmark = pytest.mark.integration

KSERVE = "/inference.GRPCInferenceService/"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
RENAMED = "mesh-affine"  # the mesh's name for Triton's affine_batched
RENAMED_RESNET = "mesh-resnet"  # and for resnet18 (a 600 KB request)
LATEST = "latest-affine"  # affine_batched with no Triton version: Triton serves its latest


def _grpc_cluster(name: str, port: int, http_filters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    if http_filters:
        options["http_filters"] = http_filters
    return _cluster(name, port, options)


def _http_cluster(name: str, port: int, http_filters: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    options: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http_protocol_options": {}},
    }
    if http_filters:
        options["http_filters"] = http_filters
    return _cluster(name, port, options)


def _cluster(name: str, port: int, options: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options},
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {
                    "lb_endpoints": [
                        {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}
                    ]
                }
            ],
        },
    }


def _model_route(model: str, cluster: str) -> dict[str, Any]:
    return {
        "match": {"prefix": KSERVE, "headers": [{"name": "x-servegrid-model", "string_match": {"exact": model}}]},
        "route": {"cluster": cluster, "timeout": "0s"},
    }


def _not_found_route() -> dict[str, Any]:
    # A trailers-only gRPC NOT_FOUND, as the real route config answers for an unknown model.
    headers = {
        "grpc-status": "5",
        "grpc-message": "no model %REQ(x-servegrid-model)%",
        "content-type": "application/grpc",
    }
    return {
        "match": {"prefix": KSERVE},
        "direct_response": {"status": 200},
        "response_headers_to_add": [
            {"header": {"key": k, "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
            for k, v in headers.items()
        ],
    }


def bootstrap(
    triton: TritonInstance, port: int, admin_port: int, *, stream_extraction: bool = True, trust_header: bool = False
) -> dict[str, Any]:
    """A static Envoy: the kserve filters, routes on x-servegrid-model, renamed clusters."""
    rename = lua.upstream_rename_filters("affine_batched", "1", RENAMED, "7")
    latest = lua.upstream_rename_filters("affine_batched", "", LATEST, "2")
    filters = [lua.stream_extraction_filter()] if stream_extraction else []
    filters += [
        lua.downstream_filter(trust_header=trust_header),
        {
            "name": "envoy.filters.http.router",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
        },
    ]
    routes = [
        _model_route("affine", "triton_grpc"),
        _model_route(RENAMED, "renamed_grpc"),
        _model_route("resnet18", "triton_grpc"),
        _model_route(RENAMED_RESNET, "renamed_resnet_grpc"),
        _model_route(LATEST, "latest_grpc"),
        {"match": {"prefix": KSERVE + "Server"}, "route": {"cluster": "triton_grpc", "timeout": "0s"}},
        _not_found_route(),
        {"match": {"prefix": f"/v2/models/{RENAMED}"}, "route": {"cluster": "renamed_http"}},
        {"match": {"prefix": f"/v2/models/{LATEST}"}, "route": {"cluster": "latest_http"}},
        {"match": {"prefix": "/v2/"}, "route": {"cluster": "triton_http"}},
    ]
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "public",
        "codec_type": "AUTO",
        "route_config": {"name": "public", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": routes}]},
        "http_filters": filters,
    }
    listener = {
        "name": "public",
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {
            "listeners": [listener],
            "clusters": [
                _grpc_cluster("triton_grpc", triton.grpc_port),
                _grpc_cluster("renamed_grpc", triton.grpc_port, rename),
                _grpc_cluster(
                    "renamed_resnet_grpc", triton.grpc_port, lua.upstream_rename_filters("resnet18", "", RENAMED_RESNET)
                ),
                _http_cluster("triton_http", triton.http_port),
                _http_cluster("renamed_http", triton.http_port, rename),
                _grpc_cluster("latest_grpc", triton.grpc_port, latest),
                _http_cluster("latest_http", triton.http_port, latest),
            ],
        },
    }


@dataclass
class Envoy:
    process: subprocess.Popen[bytes]
    port: int
    admin_port: int
    log_path: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_envoy(config: dict[str, Any], state_dir: Path, port: int, admin_port: int) -> Envoy:
    state_dir.mkdir(parents=True, exist_ok=True)
    config_path = state_dir / "envoy.json"
    config_path.write_text(json.dumps(config))
    log_path = state_dir / "envoy.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                envoy_binary(),
                "-c",
                str(config_path),
                "--use-dynamic-base-id",
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "-l",
                "warning",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    envoy = Envoy(process, port, admin_port, log_path)
    try:
        wait_started(
            process, lambda: admin_ready(admin_port), name="envoy", log_tail=lambda: log_path.read_text()[-4000:]
        )
    except RuntimeError:
        stop_envoy(envoy)
        raise
    return envoy


def stop_envoy(envoy: Envoy) -> None:
    if envoy.process.poll() is None:
        os.kill(envoy.process.pid, 15)
        try:
            envoy.process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(envoy.process.pid, 9)
            envoy.process.wait(5)


@pytest.fixture(scope="module")
def envoy(triton: TritonInstance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    port, admin_port = free_port(), free_port()
    started = start_envoy(bootstrap(triton, port, admin_port), tmp_path_factory.mktemp("envoy-lua"), port, admin_port)
    try:
        yield started
    finally:
        stop_envoy(started)


@pytest.fixture(scope="module")
def mesh_envoy(triton: TritonInstance, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Envoy]:
    """The mesh listener's flavour: a client's x-servegrid-model header is trusted, the body streams."""
    port, admin_port = free_port(), free_port()
    config = bootstrap(triton, port, admin_port, trust_header=True)
    started = start_envoy(config, tmp_path_factory.mktemp("envoy-lua-mesh"), port, admin_port)
    try:
        yield started
    finally:
        stop_envoy(started)


@pytest.fixture(scope="module")
def raw_channel(envoy: Envoy) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(envoy.address) as channel:
        yield channel


def _call_raw(channel: grpc.Channel, method: str, payload: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> bytes:
    call = channel.unary_unary(KSERVE + method, request_serializer=None, response_deserializer=None)
    return call(payload, metadata=metadata, timeout=10)


def _error(channel: grpc.Channel, method: str, payload: bytes, **kw: Any) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        _call_raw(channel, method, payload, **kw)
    return info.value


def _reason(error: grpc.RpcError) -> str:
    status = rpc_status.from_call(error)
    assert status is not None, "the refusal carries grpc-status-details-bin"
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert info.domain == "servegrid.dev"
    return info.reason


def _affine_inputs(shape: list[int]) -> list[grpcclient.InferInput]:
    x = grpcclient.InferInput("x", shape, "FP32")
    x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(shape))
    return [x]


def _infer_request(*names: str, shape: tuple[int, ...] = (4,)) -> bytes:
    """A ModelInferRequest whose model_name field appears once per name, in order."""
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(shape))
    tail = service_pb2.ModelInferRequest(inputs=[tensor], raw_input_contents=[np.ones(4, np.float32).tobytes()])
    head = b"".join(service_pb2.ModelInferRequest(model_name=n).SerializeToString() for n in names)
    return head + tail.SerializeToString()


def _executions(triton: TritonInstance, model: str) -> int:
    with grpcclient.InferenceServerClient(triton.grpc_address) as client:
        stats = client.get_inference_statistics(model, as_json=True)
    return sum(int(m.get("execution_count", 0)) for m in stats["model_stats"])


def test_unary_calls_route_by_body_and_match_direct_triton(envoy: Envoy, triton: TritonInstance) -> None:
    with (
        grpcclient.InferenceServerClient(envoy.address) as via_envoy,
        grpcclient.InferenceServerClient(triton.grpc_address) as direct,
    ):
        assert via_envoy.is_server_live()
        assert via_envoy.is_model_ready("affine")
        assert via_envoy.get_model_metadata("affine") == direct.get_model_metadata("affine")
        assert via_envoy.get_model_config("affine") == direct.get_model_config("affine")
        got = via_envoy.infer("affine", _affine_inputs([4]))
        want = direct.infer("affine", _affine_inputs([4]))
        assert got.get_response().model_name == "affine"
        np.testing.assert_array_equal(got.as_numpy("y"), want.as_numpy("y"))
        with pytest.raises(InferenceServerException) as missing:
            via_envoy.get_model_metadata("no-such-model")
        assert missing.value.status() == "StatusCode.NOT_FOUND"


def test_stream_infer_routes_on_the_first_message(envoy: Envoy) -> None:
    results: list[Any] = []
    with grpcclient.InferenceServerClient(envoy.address) as client:
        client.start_stream(callback=lambda result, error: results.append(error or result))
        for _ in range(3):
            client.async_stream_infer("affine", _affine_inputs([4]))
        client.stop_stream()  # waits for every answer
    assert len(results) == 3
    for result in results:
        assert not isinstance(result, InferenceServerException), result
        np.testing.assert_array_equal(result.as_numpy("y"), np.arange(4, dtype=np.float32) * 2 + 1)


def _stream_error(address: str, message: bytes, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info, grpc.insecure_channel(address) as channel:
        stream = channel.stream_stream(KSERVE + "ModelStreamInfer", request_serializer=None, response_deserializer=None)
        list(stream(iter([message]), metadata=metadata, timeout=10))
    return info.value


def test_stream_header_contradicting_the_first_message_is_refused(envoy: Envoy) -> None:
    error = _stream_error(envoy.address, _infer_request("affine"), (("x-servegrid-model", RENAMED),))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(error) == "MODEL_NAME_MISMATCH"


def test_without_field_extraction_streams_need_the_header(
    triton: TritonInstance, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Reading the first chunk from Lua (bodyChunks) cannot route: Envoy passes the headers on, and the
    # router picks the route, before the first chunk reaches the script. So the header is the fallback.
    port, admin_port = free_port(), free_port()
    config = bootstrap(triton, port, admin_port, stream_extraction=False)
    started = start_envoy(config, tmp_path_factory.mktemp("envoy-lua-noext"), port, admin_port)
    try:
        error = _stream_error(started.address, _infer_request("affine"))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert _reason(error) == "MODEL_HEADER_REQUIRED"
        results: list[Any] = []
        with grpcclient.InferenceServerClient(started.address) as client:
            client.start_stream(
                callback=lambda result, error: results.append(error or result), headers={"x-servegrid-model": "affine"}
            )
            client.async_stream_infer("affine", _affine_inputs([4]))
            client.stop_stream()
        assert [r.get_response().model_name for r in results] == ["affine"]
    finally:
        stop_envoy(started)


@pytest.mark.parametrize("names", [("affine", "affine_batched"), ("affine_batched", "affine")])
def test_model_name_twice_is_refused_before_triton(
    raw_channel: grpc.Channel, triton: TritonInstance, names: tuple[str, str]
) -> None:
    before = {m: _executions(triton, m) for m in names}
    error = _error(raw_channel, "ModelInfer", _infer_request(*names))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model_name appears twice" in (error.details() or "")
    assert _reason(error) == "MODEL_NAME_REPEATED"
    assert {m: _executions(triton, m) for m in names} == before


def test_header_disagreeing_with_body_is_refused(raw_channel: grpc.Channel) -> None:
    error = _error(raw_channel, "ModelInfer", _infer_request("affine"), metadata=(("x-servegrid-model", RENAMED),))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(error) == "MODEL_NAME_MISMATCH"


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(b"\xff\xff\xff\xff garbage", id="garbage"),
        pytest.param(b"\x0a\x06affine\x12\x05one", id="truncated-field"),
        pytest.param(_infer_request("affine")[:-3], id="truncated-message"),
        pytest.param(b"\x0a\x06affine\x18\x8f", id="truncated-varint"),
        pytest.param(b"\x0a\x06affine\x0b", id="group-wire-type"),
    ],
)
def test_malformed_messages_are_refused(raw_channel: grpc.Channel, message: bytes) -> None:
    error = _error(raw_channel, "ModelInfer", message)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(error) == "MALFORMED_REQUEST"


def _framed(message: bytes, flag: int = 0) -> bytes:
    return bytes([flag]) + struct.pack(">I", len(message)) + message


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\x07garbage", id="garbage-frame"),
        pytest.param(_framed(_infer_request("affine"), flag=1), id="compressed"),
        pytest.param(_framed(_infer_request("affine"))[:-3], id="length-disagrees"),
        pytest.param(_framed(_infer_request("affine")) * 2, id="two-messages"),
        pytest.param(b"\0\0", id="shorter-than-prefix"),
    ],
)
def test_malformed_grpc_frames_are_refused(envoy: Envoy, body: bytes) -> None:
    # gRPC clients always frame correctly, so these go over HTTP/1.1, which the filter treats alike.
    connection = http.client.HTTPConnection(envoy.address, timeout=10)
    try:
        connection.request("POST", KSERVE + "ModelInfer", body=body, headers={"content-type": "application/grpc"})
        reply = connection.getresponse()
        reply.read()
    finally:
        connection.close()
    assert reply.getheader("grpc-status") == "3"
    assert "MALFORMED_REQUEST" in base64.b64decode((reply.getheader("grpc-status-details-bin") or "") + "==").decode(
        errors="replace"
    )


@pytest.mark.parametrize("shape", [(-1, 4), (2**62 + 1, 4), (2**31 + 1,), (2**32, 2**32)])
def test_shapes_that_overflow_or_exceed_the_limit_are_refused(
    raw_channel: grpc.Channel, shape: tuple[int, ...]
) -> None:
    tensor = service_pb2.ModelInferRequest.InferInputTensor(name="x", datatype="FP32", shape=list(shape))
    request = service_pb2.ModelInferRequest(model_name="affine", inputs=[tensor], raw_input_contents=[b"\0" * 16])
    error = _error(raw_channel, "ModelInfer", request.SerializeToString())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(error) == "INVALID_SHAPE"


@pytest.mark.parametrize(
    ("request_", "metadata"),
    [
        pytest.param(service_pb2.ModelInferRequest(model_name="m" * 5000), (), id="model-name"),
        pytest.param(service_pb2.ModelInferRequest(model_name="affine", model_version="9" * 300), (), id="version"),
        pytest.param(
            service_pb2.ModelInferRequest(
                model_name="affine",
                inputs=[service_pb2.ModelInferRequest.InferInputTensor(name="x" * 100_000, datatype="FP32", shape=[4])],
            ),
            (),
            id="input-name",
        ),
        pytest.param(
            service_pb2.ModelInferRequest(model_name="affine"), (("x-servegrid-model", "m" * 5000),), id="header"
        ),
    ],
)
def test_overlong_names_are_invalid_argument_not_an_echo_that_overflows_metadata(
    raw_channel: grpc.Channel, request_: service_pb2.ModelInferRequest, metadata: tuple[tuple[str, str], ...]
) -> None:
    # Echoed back in a NOT_FOUND, a 5,000-byte name overflowed the client's metadata limit and came
    # back RESOURCE_EXHAUSTED.
    error = _error(raw_channel, "ModelInfer", request_.SerializeToString(), metadata=metadata)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert _reason(error) == "NAME_TOO_LONG"
    assert len(error.details() or "") < 200


def _rest_infer(envoy: Envoy, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    connection = http.client.HTTPConnection(envoy.address, timeout=10)
    try:
        connection.request(
            "POST", "/v2/models/affine/infer", body=json.dumps(body), headers={"content-type": "application/json"}
        )
        reply = connection.getresponse()
        return reply.status, json.loads(reply.read() or b"{}")
    finally:
        connection.close()


@pytest.mark.parametrize("shape", [[2**62 + 1, 4], [-1, 4], [2**31 + 1], [1.5, 4]])
def test_rest_shapes_that_overflow_or_exceed_the_limit_are_refused(envoy: Envoy, shape: list[float]) -> None:
    # 2^62+1 x 4 wraps to 4 elements in 64 bits: Triton ran it with 4 values.
    tensor = {"name": "x", "datatype": "FP32", "shape": shape, "data": [1.0, 2.0, 3.0, 4.0]}
    status, body = _rest_infer(envoy, {"inputs": [tensor]})
    assert status == 400
    # Refused in Envoy (Triton's own wording is different, and it ran the wrapping one).
    assert "non-negative integer" in body["error"] or "this deployment accepts" in body["error"], body


def test_rest_infer_with_a_sound_shape_still_runs(envoy: Envoy) -> None:
    tensor = {"name": "x", "datatype": "FP32", "shape": [4], "data": [0.0, 1.0, 2.0, 3.0]}
    status, body = _rest_infer(envoy, {"inputs": [tensor]})
    assert status == 200, body
    assert body["outputs"][0]["data"] == [1.0, 3.0, 5.0, 7.0]


def test_renamed_cluster_speaks_the_clients_name(envoy: Envoy) -> None:
    with grpcclient.InferenceServerClient(envoy.address) as client:
        assert client.is_model_ready(RENAMED)
        result = client.infer(RENAMED, _affine_inputs([1, 4]))
        assert result.get_response().model_name == RENAMED
        assert result.get_response().model_version == "7"
        np.testing.assert_array_equal(result.as_numpy("y"), (np.arange(4, dtype=np.float32) * 2 + 1).reshape(1, 4))
        assert client.get_model_metadata(RENAMED).name == RENAMED
        config = client.get_model_config(RENAMED).config
        assert config.name == RENAMED and config.max_batch_size == 64
    stream_error = _stream_error(envoy.address, _infer_request(RENAMED), (("x-servegrid-model", RENAMED),))
    assert stream_error.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_renamed_cluster_over_rest(envoy: Envoy) -> None:
    client = httpclient.InferenceServerClient(envoy.address)
    try:
        assert client.get_model_metadata(RENAMED)["name"] == RENAMED
        x = httpclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4), binary_data=True)
        result = client.infer(RENAMED, [x], model_version="7")
        assert result.get_response()["model_name"] == RENAMED
        np.testing.assert_array_equal(result.as_numpy("y"), (np.arange(4, dtype=np.float32) * 2 + 1).reshape(1, 4))
        assert client.get_model_metadata("affine")["name"] == "affine"  # other models pass untouched
    finally:
        client.close()


def test_empty_triton_version_overrides_the_clients_version(envoy: Envoy) -> None:
    # The client names the registry's version 2; Triton has only affine_batched version 1, so the
    # call succeeds only if the rename replaced the body's model_version (gRPC) or the path's (REST).
    expected = (np.arange(4, dtype=np.float32) * 2 + 1).reshape(1, 4)
    with grpcclient.InferenceServerClient(envoy.address) as client:
        result = client.infer(LATEST, _affine_inputs([1, 4]), model_version="2")
        assert result.get_response().model_name == LATEST
        np.testing.assert_array_equal(result.as_numpy("y"), expected)
        assert client.is_model_ready(LATEST, model_version="2")
        assert client.get_model_metadata(LATEST, model_version="2").name == LATEST
    rest = httpclient.InferenceServerClient(envoy.address)
    try:
        x = httpclient.InferInput("x", [1, 4], "FP32")
        x.set_data_from_numpy(np.arange(4, dtype=np.float32).reshape(1, 4), binary_data=True)
        reply = rest.infer(LATEST, [x], model_version="2")
        assert reply.get_response()["model_name"] == LATEST
        np.testing.assert_array_equal(reply.as_numpy("y"), expected)
        assert rest.is_model_ready(LATEST, model_version="2")
    finally:
        rest.close()


def _image() -> list[grpcclient.InferInput]:
    image = grpcclient.InferInput("input", [1, 3, 224, 224], "FP32")
    image.set_data_from_numpy(np.random.default_rng(7).random((1, 3, 224, 224), dtype=np.float32))
    return [image]


@pytest.mark.parametrize("trusted", [False, True], ids=["peeked", "header-trusted"])
def test_large_request_renamed_across_chunks(
    envoy: Envoy, mesh_envoy: Envoy, triton: TritonInstance, trusted: bool
) -> None:
    # Trusted, the body reaches the rename filter in HTTP/2 frames: the prefix and the end are apart.
    front = mesh_envoy if trusted else envoy
    headers = {"x-servegrid-model": RENAMED_RESNET} if trusted else {}
    with (
        grpcclient.InferenceServerClient(front.address) as via_envoy,
        grpcclient.InferenceServerClient(triton.grpc_address) as direct,
    ):
        got = via_envoy.infer(RENAMED_RESNET, _image(), headers=headers)
        want = direct.infer("resnet18", _image())
    assert got.get_response().model_name == RENAMED_RESNET
    np.testing.assert_array_equal(got.as_numpy("logits"), want.as_numpy("logits"))
