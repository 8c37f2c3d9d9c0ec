"""Shadow comparison: mirrors are answered at once, re-asked of shadow and primary through the mesh, and compared."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2

from services.mesh.names import MIRROR_HEADER, MODEL_HEADER, SHADOW_COMPARE_HEADER, VERSION_HEADER
from services.router.server import Router, build_router
from services.router.shadow import MODEL_INFER, compare
from tests.support.polling import wait_until
from tests.support.router_harness import FakeProbeClients, fake_snapshot, route, unit_settings, write_routes

A = [("a", "10.0.0.1:8001")]


class FakeMesh:
    """Envoy's mesh listener as the comparator sees it: answers ModelInfer by the version header."""

    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], service_pb2.ModelInferRequest]] = []
        self.outputs = {"1": np.array([[0.1, 0.9]], np.float32), "2": np.array([[0.7, 0.3]], np.float32)}
        self.gate = asyncio.Event()
        self.gate.set()
        self.port = 0
        self._server = grpc.aio.server()

    async def infer(self, request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        headers = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        message = service_pb2.ModelInferRequest.FromString(request)
        self.calls.append((headers, message))
        await self.gate.wait()
        out = self.outputs[headers.get(VERSION_HEADER, "1")]
        reply = service_pb2.ModelInferResponse(model_name=message.model_name)
        reply.outputs.add(name="probs", datatype="FP32", shape=list(out.shape))
        reply.raw_output_contents.append(out.tobytes())
        return reply.SerializeToString()

    async def start(self) -> FakeMesh:
        handler = grpc.method_handlers_generic_handler(
            "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(self.infer)}
        )
        self._server.add_generic_rpc_handlers((handler,))
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return self


@pytest.fixture
async def mesh() -> AsyncIterator[FakeMesh]:
    fake = await FakeMesh().start()
    yield fake
    await fake._server.stop(None)


async def start_router(tmp_path: Path, mesh: FakeMesh, **overrides: object) -> Router:
    routes = [route("m", [(1, "clf", 100, A)], sticky_header="x-user", shadow=(2, "clf_next", A, 1.0))]
    settings = unit_settings(
        routes_file=write_routes(tmp_path / "routes.json", routes), mesh_address=f"127.0.0.1:{mesh.port}", **overrides
    )
    built = build_router(settings, build_snapshot=fake_snapshot, probe_clients=FakeProbeClients())
    await built.app.start()
    return built


def mirror_body() -> bytes:
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    request.raw_input_contents.append(np.ones((1, 2), np.float32).tobytes())
    return request.SerializeToString()


async def test_a_mirror_is_answered_at_once_and_compared_off_its_path(tmp_path: Path, mesh: FakeMesh) -> None:
    router = await start_router(tmp_path, mesh)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.app.port}") as channel:
            call = channel.unary_unary(MODEL_INFER)
            mesh.gate.clear()  # the comparison hangs: the mirror's answer must not wait for it
            reply = await call(
                mirror_body(),
                timeout=2,
                metadata=((MODEL_HEADER, "m"), (MIRROR_HEADER, "2"), ("x-user", "alice")),
            )
            assert reply == b""
            mesh.gate.set()
            stats = router.shadow.stats
            await wait_until(lambda: "m" in stats and stats["m"].compared == 1)
        by_version = {headers.get(VERSION_HEADER, ""): (headers, body) for headers, body in mesh.calls}
        assert set(by_version) == {"", "2"}
        primary_headers, primary = by_version[""]
        assert primary_headers["x-user"] == "alice"  # sticky: Envoy picks the version the caller got
        assert primary_headers[SHADOW_COMPARE_HEADER] == "1" and primary_headers[MODEL_HEADER] == "m"
        _, shadow = by_version["2"]
        assert (shadow.model_name, shadow.model_version) == ("m", "")  # the version rides in the header only
        assert list(shadow.raw_input_contents) == list(primary.raw_input_contents)
        assert stats["m"].argmax_mismatches == 1 and stats["m"].max_abs_diff == pytest.approx(0.6)
        compared = REGISTRY.get_sample_value(
            "servegrid_router_shadow_requests_total", {"model": "m", "version": "2", "outcome": "compared"}
        )
        assert compared is not None and compared >= 1
    finally:
        await router.app.stop()


async def test_only_mirrors_are_answered_and_a_mirror_of_a_comparison_is_ignored(
    tmp_path: Path, mesh: FakeMesh
) -> None:
    router = await start_router(tmp_path, mesh)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.app.port}") as channel:
            call = channel.unary_unary(MODEL_INFER)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await call(mirror_body(), timeout=2, metadata=((MODEL_HEADER, "m"),))
            assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
            loop_back = ((MODEL_HEADER, "m"), (MIRROR_HEADER, "2"), (SHADOW_COMPARE_HEADER, "1"))
            assert await call(mirror_body(), timeout=2, metadata=loop_back) == b""
        assert mesh.calls == [] and "m" not in router.shadow.stats
    finally:
        await router.app.stop()


async def test_past_the_in_flight_bound_mirrors_are_dropped_and_counted(tmp_path: Path, mesh: FakeMesh) -> None:
    router = await start_router(tmp_path, mesh, shadow_max_in_flight=1)
    try:
        mesh.gate.clear()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.app.port}") as channel:
            call = channel.unary_unary(MODEL_INFER)
            for _ in range(3):
                await call(mirror_body(), timeout=2, metadata=((MODEL_HEADER, "m"), (MIRROR_HEADER, "2")))
        stats = router.shadow.stats["m"]
        assert (stats.sent, stats.dropped) == (1, 2)
        mesh.gate.set()
        await wait_until(lambda: stats.compared == 1)
    finally:
        await router.app.stop()


def test_compare_counts_argmax_changes_and_shape_mismatches() -> None:
    def response(array: np.ndarray, name: str = "y") -> service_pb2.ModelInferResponse:
        reply = service_pb2.ModelInferResponse()
        reply.outputs.add(name=name, datatype="FP32", shape=list(array.shape))
        reply.raw_output_contents.append(array.astype(np.float32).tobytes())
        return reply

    same = compare(response(np.eye(3)), response(np.eye(3)))
    assert (same.max_abs_diff, same.argmax_mismatches, same.shape_mismatches) == (0.0, 0, 0)
    flipped = compare(response(np.eye(3)), response(np.eye(3)[::-1]))
    assert flipped.argmax_mismatches == 2 and flipped.max_abs_diff == 1.0
    assert compare(response(np.eye(3)), response(np.eye(2))).shape_mismatches == 1
