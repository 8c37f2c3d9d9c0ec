"""Kill -9 a Triton under load: the router stops using it within a second, retries hide it, and it comes back."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.loadgen import encode_infer_request
from services.router.settings import RouterSettings
from services.stack.triton import TritonInstance, start_triton
from tests.support.router_harness import RouterThread, route, wait_until, write_routes

pytestmark = pytest.mark.integration

X = np.arange(4, dtype=np.float32)
_RETRY_LABELS = {"model": "affine", "code": "UNAVAILABLE"}


@pytest.fixture(scope="module")
def victim(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[TritonInstance]]:
    """A Triton of this module's own (only `affine`), the one that gets killed; a list so a restart can replace it."""
    state = tmp_path_factory.mktemp("triton-victim")
    instances = [start_triton(model_repository, load_models=["affine"], state_dir=state)]
    yield instances
    for instance in instances:
        instance.stop()


@pytest.fixture(scope="module")
def router(
    triton: TritonInstance, victim: list[TritonInstance], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RouterThread]:
    backends = [("steady", triton.grpc_address), ("victim", victim[0].grpc_address)]
    path = write_routes(
        tmp_path_factory.mktemp("router-failover") / "routes.json", [route("affine", [(1, "affine", 100, backends)])]
    )
    settings = RouterSettings(
        port=0,
        metrics_port=None,
        use_uvloop=False,
        routes_file=path,
        probe_interval_s=0.25,
        grace_period_s=0.2,
    )
    thread = RouterThread(settings).start()
    yield thread
    thread.stop()


async def test_kill_nine_under_load_is_invisible_and_the_backend_returns(
    router: RouterThread, victim: list[TritonInstance], model_repository: Path
) -> None:
    pool = router.router.pool
    dead = victim[0]
    retried_before = REGISTRY.get_sample_value("servegrid_router_retries_total", _RETRY_LABELS) or 0.0
    payload = encode_infer_request("affine", {"x": X})
    errors: list[str] = []
    served = 0
    stop = asyncio.Event()

    async with grpc.aio.insecure_channel(router.address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None
        )

        async def caller() -> None:
            nonlocal served
            while not stop.is_set():
                try:
                    reply = service_pb2.ModelInferResponse.FromString(await call(payload, timeout=5))
                    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), 2 * X + 1)
                    served += 1
                except grpc.aio.AioRpcError as error:
                    errors.append(f"{error.code().name}: {error.details()}")

        callers = [asyncio.create_task(caller()) for _ in range(8)]
        try:
            await wait_until(lambda: pool.backends["victim"].requests_total > 50)
            os.kill(dead.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.sleep(1.0)
            sent_after_1s = pool.backends["victim"].requests_total
            await asyncio.sleep(1.0)
            assert pool.backends["victim"].requests_total == sent_after_1s, "still sending 1 s after the kill"
            assert not errors, errors[:5]
            assert time.monotonic() - killed_at < 5
            retried = (
                REGISTRY.get_sample_value("servegrid_router_retries_total", _RETRY_LABELS) or 0.0
            ) - retried_before
            assert retried >= 1  # requests in flight on the killed Triton were retried, not failed

            # Restart on the same ports; probes find it and traffic returns.
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
            before = pool.backends["victim"].requests_total
            took = await wait_until(lambda: pool.backends["victim"].requests_total > before + 20, timeout_s=15)
            assert took < 10
        finally:
            stop.set()
            await asyncio.gather(*callers)
    assert not errors, errors[:5]
    assert served > 500
    async with grpc.aio.insecure_channel(router.address) as channel:
        ready = await service_pb2_grpc.GRPCInferenceServiceStub(channel).ServerReady(service_pb2.ServerReadyRequest())
    assert ready.ready
