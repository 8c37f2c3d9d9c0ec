"""Failures under load through a real Envoy: kill -9 a Triton, a model missing on one backend, the router restarting."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from servegrid.router.v1 import router_admin_pb2 as apb
from servegrid.router.v1 import router_admin_pb2_grpc as apb_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.mesh.names import version_cluster
from services.router.settings import RouterSettings
from services.stack.triton import TritonInstance, start_triton
from tests.support.polling import wait_until
from tests.support.router_harness import DataPlane, MeshEnvoy, route, write_routes

pytestmark = pytest.mark.integration

X = np.arange(4, dtype=np.float32)
AFFINE = version_cluster("affine", 1, "grpc")


@pytest.fixture(scope="module")
def victim(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TritonInstance]]:
    """A Triton of this module's own (only `affine`), the one that gets killed; a list so a restart can replace it."""
    state = tmp_path_factory.mktemp("triton-victim")
    instances = [start_triton(model_repository, load_models=["affine"], state_dir=state)]
    yield instances
    for instance in instances:
        instance.stop()


def routes(steady: TritonInstance, victim: TritonInstance) -> list[object]:
    both = [("steady", steady.grpc_address), ("victim", victim.grpc_address)]
    # digits is routed to both, but only `steady` has it loaded.
    return [route("affine", [(1, "affine", 100, both)]), route("digits", [(1, "digits", 100, both)])]


@pytest.fixture(scope="module")
def plane(
    triton: TritonInstance, victim: list[TritonInstance], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DataPlane]:
    state = tmp_path_factory.mktemp("router-failover")
    settings = RouterSettings(
        port=0,
        metrics_port=None,
        use_uvloop=False,
        grace_period_s=0.2,
        probe_interval_s=0.25,
        routes_file=write_routes(state / "routes.json", routes(triton, victim[0])),  # type: ignore[arg-type]
    )
    plane = DataPlane(state, settings)
    try:
        plane.add_envoy()
        yield plane
    finally:
        plane.stop()


def affine_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="affine")
    request.inputs.add(name="x", datatype="FP32", shape=[4])
    request.raw_input_contents.append(X.tobytes())
    return request


class Load:
    """Callers through Envoy's mesh listener until stopped; every error is kept."""

    def __init__(self, address: str, callers: int = 8) -> None:
        self.address = address
        self.callers = callers
        self.errors: list[str] = []
        self.served = 0
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        self._channel = grpc.aio.insecure_channel(self.address)
        stub = service_pb2_grpc.GRPCInferenceServiceStub(self._channel)
        payload = affine_request()

        async def caller() -> None:
            while not self._stop.is_set():
                try:
                    reply = await stub.ModelInfer(payload, timeout=5)
                    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), 2 * X + 1)
                    self.served += 1
                except grpc.aio.AioRpcError as error:
                    self.errors.append(f"{error.code().name}: {error.details()}")

        self._tasks = [asyncio.create_task(caller()) for _ in range(self.callers)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        await self._channel.close()


async def test_a_model_not_loaded_on_a_backend_gets_no_traffic_there(
    plane: DataPlane, victim: list[TritonInstance]
) -> None:
    cluster = version_cluster("digits", 1, "grpc")
    pixels = np.zeros((1, 64), np.float32)
    request = service_pb2.ModelInferRequest(model_name="digits")
    request.inputs.add(name="pixels", datatype="FP32", shape=[1, 64])
    request.raw_input_contents.append(pixels.tobytes())
    async with grpc.aio.insecure_channel(plane.envoy.mesh_address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for _ in range(40):
            await stub.ModelInfer(request, timeout=5)
        listed = await apb_grpc.RouterAdminServiceStub(grpc.aio.insecure_channel(plane.router.address)).ListBackends(
            apb.ListBackendsRequest()
        )
    assert plane.envoy.host_requests(cluster).get(victim[0].grpc_address, 0) == 0
    by_id = {b.backend_id: b for b in listed.backends}
    assert list(by_id["victim"].unready_triton_models) == ["digits"]
    assert by_id["victim"].endpoint_state == apb.ENDPOINT_STATE_HEALTHY  # it still serves affine


def taken_out(envoy: MeshEnvoy, cluster: str, host: str) -> bool:
    """Envoy no longer counts `host` healthy in `cluster` (/clusters health_flags other than "healthy")."""
    return envoy.clusters().get(cluster, {}).get(host, {}).get("health_flags", "healthy") != "healthy"


async def test_kill_nine_under_load_stops_traffic_within_a_second_and_the_backend_returns(
    plane: DataPlane, victim: list[TritonInstance], model_repository: Path
) -> None:
    envoy = plane.envoy
    dead = victim[0]
    host = dead.grpc_address

    def to_victim() -> int:
        return envoy.host_requests(AFFINE).get(host, 0)

    async with Load(envoy.mesh_address) as load:
        await wait_until(lambda: to_victim() > 50, timeout_s=15)
        os.killpg(dead.pid, signal.SIGKILL)  # Triton and its Python-backend stubs
        # Within a second Envoy takes the host out (outlier ejection, or the router's EDS push) ...
        took = await wait_until(lambda: taken_out(envoy, AFFINE, host), timeout_s=10)
        assert took < 1.0, f"Envoy counted the killed Triton healthy for {took:.2f}s"
        # ... and sends it nothing more while the load goes on through the other backend.
        after, served = to_victim(), load.served
        await wait_until(lambda: load.served > served + 200, timeout_s=15)
        assert to_victim() == after, "Envoy still sends to the killed Triton after taking it out"
        errors_while_down = list(load.errors)

        await asyncio.to_thread(dead.stop)
        revived = await asyncio.to_thread(
            start_triton,
            model_repository,
            grpc_port=dead.grpc_port,
            http_port=dead.http_port,
            metrics_port=dead.metrics_port,
            load_models=["affine"],
            state_dir=dead.state_dir,
        )
        victim.append(revived)
        before = to_victim()
        took = await wait_until(lambda: to_victim() > before + 20, timeout_s=15)
        assert took < 10
    assert not errors_while_down, errors_while_down[:5]  # retries hid the requests in flight on it
    assert not load.errors, load.errors[:5]
    assert load.served > 300


async def test_envoy_keeps_serving_while_the_router_restarts_and_takes_changes_after(
    plane: DataPlane, triton: TritonInstance, victim: list[TritonInstance]
) -> None:
    async with Load(plane.envoy.mesh_address, callers=4) as load:
        await wait_until(lambda: load.served > 50)
        port = plane.router.port
        await asyncio.to_thread(plane.router.stop)
        served = load.served
        await wait_until(lambda: load.served > served + 100)  # no control plane: Envoy serves its last config
        await asyncio.to_thread(plane.restart_router)
        assert plane.router.port == port
        await asyncio.to_thread(plane.wait_synced)
    assert not load.errors, load.errors[:5]

    from servegrid.registry.v1 import registry_pb2 as rpb

    late = route("late", [(1, "affine", 100, [("steady", triton.grpc_address)])])
    await asyncio.to_thread(plane.router.push, rpb.WatchRoutesResponse(routes=[late], revision=2))
    await asyncio.to_thread(plane.wait_synced)
    request = affine_request()
    request.model_name = "late"
    async with grpc.aio.insecure_channel(plane.envoy.mesh_address) as channel:
        reply = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=5)
    assert reply.model_name == "late"
