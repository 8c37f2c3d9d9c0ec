"""The gateway's batch RPCs need a verified tenant and relay the batch service's own status."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator

import grpc
import pytest
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.gateway.server import build_app
from services.gateway.settings import GatewaySettings
from services.runtime.errors import status_details

pytestmark = pytest.mark.integration


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
async def stub() -> AsyncIterator[gateway_pb2_grpc.GatewayServiceStub]:
    dead = f"127.0.0.1:{_closed_port()}"
    settings = GatewaySettings(
        port=0, metrics_port=None, use_uvloop=False, inference_address=dead, registry_address=dead, batch_address=dead
    )
    app = build_app(settings)
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)
    await app.stop()


async def test_a_call_without_a_verified_tenant_is_unauthenticated(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBatchJob(gateway_pb2.GetBatchJobRequest(job_id="j1"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    _, info = status_details(caught.value.trailing_metadata())
    assert info is not None and info.reason == "TENANT_REQUIRED"


async def test_with_a_tenant_the_call_is_forwarded(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    # The batch service is down here, so the forwarded call's own UNAVAILABLE comes back unchanged.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBatchJob(
            gateway_pb2.GetBatchJobRequest(job_id="j1"), timeout=5, metadata=[("x-servegrid-tenant", "acme")]
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
