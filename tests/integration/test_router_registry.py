"""Real registry → router → real Envoy: a policy change is served within a second; a registry outage changes nothing."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from servegrid.registry.v1 import registry_pb2 as pb
from servegrid.registry.v1 import registry_pb2_grpc as pb_grpc
from tritonclient.grpc import service_pb2

from bench.loadgen import encode_infer_request
from services.registry.server import build_app
from services.registry.settings import RegistrySettings
from services.router.settings import RouterSettings
from services.runtime.server import ServiceApp
from services.stack.triton import TritonInstance
from tests.support.datastores import SessionDatastores
from tests.support.polling import wait_until
from tests.support.router_harness import DataPlane

pytestmark = pytest.mark.integration

RUN = uuid.uuid4().hex[:10]
SCHEMA = f"test_router_registry_{RUN}"
PREFIX = f"test:router-registry:{RUN}:"


@pytest.fixture(scope="module")
async def registry(datastores: SessionDatastores) -> AsyncIterator[ServiceApp]:
    """A registry on a schema and key prefix of its own, dropped at the end."""
    settings = RegistrySettings(
        database_url=datastores.database_url,
        redis_url=datastores.redis_url,
        port=0,
        metrics_port=None,
        use_uvloop=False,
        db_schema=SCHEMA,
        redis_prefix=PREFIX,
        grace_period_s=0.5,
        db_pool_max=4,
        listen_reconnect_s=0.2,
    )
    app = build_app(settings)
    await app.start()
    yield app
    await app.stop()
    datastores.drop_schema(SCHEMA)
    datastores.delete_keys(PREFIX)


async def test_policy_change_reaches_envoy_within_a_second_under_load_and_a_registry_outage_keeps_the_table(
    registry: ServiceApp, triton_pair: tuple[TritonInstance, TritonInstance], tmp_path: Path
) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.port}") as registry_channel:
        admin = pb_grpc.RegistryServiceStub(registry_channel)
        for backend_id, triton in zip(("a", "b"), triton_pair, strict=True):
            backend = pb.Backend(backend_id=backend_id, address=triton.grpc_address, http_address=triton.http_address)
            await admin.CreateBackend(pb.CreateBackendRequest(backend=backend))
        await admin.CreateModel(pb.CreateModelRequest(model=pb.Model(model_id="scorer", task="regression")))
        for _ in range(2):
            await admin.CreateModelVersion(
                pb.CreateModelVersionRequest(model_id="scorer", version=pb.ModelVersion(triton_model_name="affine"))
            )
        for version, stages in ((1, (pb.STAGE_STAGING, pb.STAGE_PRODUCTION)), (2, (pb.STAGE_STAGING,))):
            for stage in stages:
                await admin.TransitionModelVersionStage(
                    pb.TransitionModelVersionStageRequest(model_id="scorer", version=version, stage=stage)
                )

        settings = RouterSettings(
            port=0,
            metrics_port=None,
            use_uvloop=False,
            registry_address=f"127.0.0.1:{registry.port}",
            registry_backoff_initial_s=0.05,
            registry_backoff_max_s=0.2,
            grace_period_s=0.2,
        )
        plane = await asyncio.to_thread(DataPlane, tmp_path, settings)
        try:
            await wait_until(lambda: "scorer" in plane.router.router.table.routes)
            await asyncio.to_thread(plane.add_envoy)
            routes = plane.router.router.table.routes
            assert routes["scorer"].versions[1].backends[0].http_address == triton_pair[0].http_address
            answers, errors, changed_at = await _calls_across_a_policy_change(plane, admin)

            await registry.stop()  # the router keeps its table, Envoy its routes
            watcher = plane.router.router.watcher
            await wait_until(lambda: watcher is not None and not watcher.connected)
            assert "scorer" in plane.router.router.table.routes
            payload = encode_infer_request("scorer", {"x": np.arange(4, dtype=np.float32)})
            async with grpc.aio.insecure_channel(plane.envoy.mesh_address) as channel:
                call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                reply = service_pb2.ModelInferResponse.FromString(await call(payload, timeout=5))
            assert reply.model_version == "2"
        finally:
            await asyncio.to_thread(plane.stop)

    assert not errors, errors[:3]
    assert {v for t, v in answers if t < changed_at - 0.5} == {"1"}
    last_old = max(t for t, v in answers if v == "1")
    first_new = min(t for t, v in answers if v == "2")
    assert last_old - changed_at < 1.0 and first_new - changed_at < 1.0, (last_old - changed_at, first_new - changed_at)
    assert all(v == "2" for t, v in answers if t > changed_at + 1.0)


async def _calls_across_a_policy_change(
    plane: DataPlane, admin: pb_grpc.RegistryServiceStub
) -> tuple[list[tuple[float, str]], list[str], float]:
    """Four callers through Envoy for 3 s; after 1 s version 2 takes all traffic; at the end the registry
    stops answering the router, which keeps its table (and Envoy its routes)."""
    payload = encode_infer_request("scorer", {"x": np.arange(4, dtype=np.float32)})
    answers: list[tuple[float, str]] = []
    errors: list[str] = []
    changed_at = float("inf")
    stop_at = time.monotonic() + 3.0
    async with grpc.aio.insecure_channel(plane.envoy.mesh_address) as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer", request_serializer=None, response_deserializer=None
        )

        async def caller() -> None:
            while time.monotonic() < stop_at:
                try:
                    reply = service_pb2.ModelInferResponse.FromString(await call(payload, timeout=5))
                    answers.append((time.monotonic(), reply.model_version))
                except grpc.aio.AioRpcError as error:
                    errors.append(f"{error.code().name}: {error.details()}")

        async def change() -> None:
            nonlocal changed_at
            await asyncio.sleep(1.0)
            policy = pb.TrafficPolicy(model_id="scorer", splits=[pb.TrafficSplit(version=2, weight=100)])
            await admin.SetTrafficPolicy(pb.SetTrafficPolicyRequest(policy=policy))
            changed_at = time.monotonic()  # committed once the call returns

        await asyncio.gather(change(), *(caller() for _ in range(4)))
    return answers, errors, changed_at
