"""The router as Envoy's control plane with a real Envoy and two Tritons: routing, canary, versions, drain, shadow."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from servegrid.router.v1 import router_admin_pb2 as apb
from servegrid.router.v1 import router_admin_pb2_grpc as apb_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.mesh.names import VERSION_HEADER, version_cluster
from services.router.settings import RouterSettings
from services.stack.triton import TritonInstance
from tests.security.support import logged as access_logged
from tests.support.polling import wait_until
from tests.support.router_harness import DataPlane, route, write_routes

pytestmark = pytest.mark.integration

AFFINE_X = np.arange(4, dtype=np.float32)


def settings(**overrides: object) -> RouterSettings:
    base: dict[str, object] = {
        "port": 0,
        "metrics_port": None,
        "use_uvloop": False,
        "grace_period_s": 0.2,
        "health_interval_s": 0.2,
        "probe_interval_s": 0.25,
    }
    base.update(overrides)
    return RouterSettings(**base)  # type: ignore[arg-type]


def digits_pixels() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 17, (5, 64)).astype(np.float32)


@pytest.fixture(scope="module")
def plane(
    triton_pair: tuple[TritonInstance, TritonInstance], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DataPlane]:
    a, b = triton_pair
    both = [("a", a.grpc_address, a.http_address), ("b", b.grpc_address, b.http_address)]
    routes = [
        route("affine", [(1, "affine", 100, both)]),
        route("digits", [(1, "digits", 100, both)]),
        route("canary", [(1, "affine", 90, both), (2, "affine", 10, both)], sticky_header="x-user"),
        # As the registry builds it: the shadow target is a servable version too (weight 0).
        route(
            "shadowed",
            [(1, "digits", 100, [both[0]]), (2, "digits", 0, [both[1]])],
            shadow=(2, "digits", [both[1]], 1.0),
        ),
    ]
    state = tmp_path_factory.mktemp("router")
    # Room for every comparison of the shadow test at once: on a loaded 2-core machine they outlast the
    # requests that caused them (the drop past the bound is test_router_shadow's to check).
    routes_file = write_routes(state / "routes.json", routes)
    plane = DataPlane(state, settings(routes_file=routes_file, shadow_max_in_flight=64))
    try:
        plane.add_envoy()
        yield plane
    finally:
        plane.stop()


@pytest.fixture
async def mesh(plane: DataPlane) -> AsyncIterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    async with grpc.aio.insecure_channel(plane.envoy.mesh_address) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def affine_request(model: str, version: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="x", datatype="FP32", shape=[4])
    request.raw_input_contents.append(AFFINE_X.tobytes())
    return request


async def calls(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
    model: str,
    count: int,
    *,
    concurrency: int = 8,
    metadata: tuple[tuple[str, str], ...] = (),
) -> None:
    payload = affine_request(model)

    async def caller(n: int) -> None:
        for _ in range(n):
            reply = await stub.ModelInfer(payload, timeout=10, metadata=metadata or None)
            np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), 2 * AFFINE_X + 1)

    await asyncio.gather(*(caller(count // concurrency) for _ in range(concurrency)))


def test_tritonclient_through_envoy_gets_the_same_answers_as_triton(
    plane: DataPlane, triton_pair: tuple[TritonInstance, TritonInstance]
) -> None:
    direct = grpcclient.InferenceServerClient(triton_pair[0].grpc_address)
    routed = grpcclient.InferenceServerClient(plane.envoy.mesh_address)  # no extra headers
    assert routed.is_server_live() and routed.is_server_ready()
    for model, name, array in (("affine", "x", AFFINE_X), ("digits", "pixels", digits_pixels())):
        assert routed.is_model_ready(model)
        assert routed.get_model_metadata(model, as_json=True) == direct.get_model_metadata(model, as_json=True)
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        ours, theirs = routed.infer(model, [tensor]), direct.infer(model, [tensor])
        assert ours.get_response().model_name == model
        for output in theirs.get_response().outputs:
            np.testing.assert_array_equal(ours.as_numpy(output.name), theirs.as_numpy(output.name))

    rest = httpclient.InferenceServerClient(plane.envoy.mesh_url.removeprefix("http://"))
    tensor = httpclient.InferInput("x", [4], "FP32")
    tensor.set_data_from_numpy(AFFINE_X, binary_data=True)
    np.testing.assert_array_equal(rest.infer("affine", [tensor]).as_numpy("y"), 2 * AFFINE_X + 1)


async def test_unknown_model_and_version_are_not_found(mesh: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    for request in (affine_request("no-such-model"), affine_request("affine", "42")):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await mesh.ModelInfer(request, timeout=5)
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND


async def test_canary_splits_90_10_and_sticky_callers_keep_their_version(
    plane: DataPlane, mesh: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    envoy = plane.envoy
    v1, v2 = version_cluster("canary", 1, "grpc"), version_cluster("canary", 2, "grpc")
    before = envoy.cluster_requests(v1), envoy.cluster_requests(v2)
    await calls(mesh, "canary", 2000, concurrency=16)
    one, two = envoy.cluster_requests(v1) - before[0], envoy.cluster_requests(v2) - before[1]
    assert one + two == 2000
    assert abs(two / 2000 - 0.10) < 0.03, (one, two)
    for user in ("u1", "u2", "u3", "u4"):
        start = envoy.cluster_requests(v1), envoy.cluster_requests(v2)
        await calls(mesh, "canary", 20, concurrency=2, metadata=(("x-user", user),))
        grew = envoy.cluster_requests(v1) - start[0], envoy.cluster_requests(v2) - start[1]
        assert sorted(grew) == [0, 20], (user, grew)


async def explicit_version_calls(
    plane: DataPlane,
    mesh: service_pb2_grpc.GRPCInferenceServiceStub,
    request: service_pb2.ModelInferRequest,
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[int, int]:
    """(requests to canary v1, to v2) during 20 calls."""
    envoy = plane.envoy
    v1, v2 = version_cluster("canary", 1, "grpc"), version_cluster("canary", 2, "grpc")
    before = envoy.cluster_requests(v1), envoy.cluster_requests(v2)
    for _ in range(20):
        reply = await mesh.ModelInfer(request, timeout=5, metadata=metadata or None)
        np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), 2 * AFFINE_X + 1)
    return envoy.cluster_requests(v1) - before[0], envoy.cluster_requests(v2) - before[1]


async def test_an_explicit_version_header_goes_to_that_version(
    plane: DataPlane, mesh: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    assert await explicit_version_calls(plane, mesh, affine_request("canary"), ((VERSION_HEADER, "2"),)) == (0, 20)


async def test_an_explicit_version_in_the_body_goes_to_that_version(
    plane: DataPlane, mesh: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    assert await explicit_version_calls(plane, mesh, affine_request("canary", "2")) == (0, 20)


async def test_a_drained_backend_gets_no_traffic_until_undrained(
    plane: DataPlane, mesh: service_pb2_grpc.GRPCInferenceServiceStub, triton_pair: tuple[TritonInstance, ...]
) -> None:
    envoy = plane.envoy
    cluster = version_cluster("affine", 1, "grpc")
    host_a = triton_pair[0].grpc_address
    async with grpc.aio.insecure_channel(plane.router.address) as channel:
        admin = apb_grpc.RouterAdminServiceStub(channel)
        drained = await admin.DrainBackend(apb.DrainBackendRequest(backend_id="a"))
        assert drained.backend.endpoint_state == apb.ENDPOINT_STATE_DRAINING
        await asyncio.to_thread(plane.wait_synced)
        before = envoy.host_requests(cluster)
        await calls(mesh, "affine", 80)
        after = envoy.host_requests(cluster)
        assert after[host_a] == before[host_a], "a drained backend got requests"
        assert sum(after.values()) - sum(before.values()) == 80

        await admin.UndrainBackend(apb.UndrainBackendRequest(backend_id="a"))
        await asyncio.to_thread(plane.wait_synced)
        await calls(mesh, "affine", 80)
        assert envoy.host_requests(cluster)[host_a] > after[host_a]
        listed = await admin.ListBackends(apb.ListBackendsRequest())
        assert {b.backend_id: b.endpoint_state for b in listed.backends} == {
            "a": apb.ENDPOINT_STATE_HEALTHY,
            "b": apb.ENDPOINT_STATE_HEALTHY,
        }
        table = await admin.GetRouteTable(apb.GetRouteTableRequest())
        (node,) = table.envoys
        assert node.node_id == envoy.node_id and node.in_sync and table.snapshot_version


async def test_the_shadow_gets_every_sampled_request_and_the_router_compares_them(
    plane: DataPlane, mesh: service_pb2_grpc.GRPCInferenceServiceStub
) -> None:
    pixels = digits_pixels()
    request = service_pb2.ModelInferRequest(model_name="shadowed")
    request.inputs.add(name="pixels", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    request_id = f"shadowed-{uuid.uuid4().hex[:8]}"
    for i in range(20):
        reply = await mesh.ModelInfer(request, timeout=10, metadata=[("x-request-id", request_id)] if i == 0 else None)
        assert reply.model_name == "shadowed"
    stats = plane.router.router.shadow.stats

    # Each comparison asks the shadow and the primary again through the mesh, off the caller's path: on
    # a loaded 2-core machine twenty of them can take longer than the default wait.
    def settled() -> bool:
        shadow = stats.get("shadowed")
        return shadow is not None and shadow.compared + shadow.errors + shadow.dropped >= 20

    await wait_until(settled, timeout_s=45)
    shadow = stats["shadowed"]
    assert shadow.errors == 0 and shadow.dropped == 0, shadow
    assert shadow.max_abs_diff == 0.0 and shadow.argmax_mismatches == 0  # the same Triton model both sides
    # The comparison's two re-asks went through Envoy under the caller's request id (and trace).
    asked = await asyncio.to_thread(access_logged, plane.envoy.process, request_id, 3)
    assert len(asked) == 3 and {line["path"] for line in asked} == {"/inference.GRPCInferenceService/ModelInfer"}


def test_routes_file_round_trips(tmp_path: Path) -> None:
    from services.router.table import load_routes_file

    path = write_routes(tmp_path / "r.json", [route("m", [(1, "affine", 100, [("a", "h:1", "h:2")])])], revision=9)
    loaded = load_routes_file(path)
    assert loaded.reset and loaded.revision == 9
    assert loaded.routes[0].versions[0].backends[0].http_address == "h:2"
