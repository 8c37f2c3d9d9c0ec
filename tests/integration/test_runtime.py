"""The service runtime, proven on a real grpc.aio server: health, reflection, errors, metrics, drain."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servegrid.router.v1 import router_admin_pb2 as pb
from servegrid.router.v1 import router_admin_pb2_grpc as pb_grpc

from services.runtime.errors import DOMAIN, INTERNAL_MESSAGE, status_details
from services.runtime.server import ServiceApp
from tests.support.demo_service import SERVICE, SLOW_SECONDS, SLOW_STARTED, DemoSettings, build_app
from tests.support.polling import wait_started, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@pytest.fixture(scope="module")
async def demo() -> AsyncIterator[ServiceApp]:
    app = build_app(DemoSettings(port=0, metrics_port=0, use_uvloop=False))
    await app.start()
    yield app
    await app.stop()


@pytest.fixture
async def channel(demo: ServiceApp) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{demo.port}") as ch:
        yield ch


async def test_health_reports_service_and_components_serving(channel: grpc.aio.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE, "backends"):
        reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == SERVING, name


def _grpcurl() -> str:
    path = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    assert os.access(path, os.X_OK), "grpcurl is installed with the dev dependencies"
    return path


async def _run(*args: str) -> str:
    # The server under test shares this event loop, so the client must not block it.
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_reflection_lists_and_describes_services(demo: ServiceApp) -> None:
    target = f"127.0.0.1:{demo.port}"
    services = set((await _run(_grpcurl(), "-plaintext", target, "list")).split())
    assert {SERVICE, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= services

    service = await _run(_grpcurl(), "-plaintext", target, "describe", SERVICE)
    assert "rpc DrainBackend ( .servegrid.router.v1.DrainBackendRequest )" in service
    message = await _run(_grpcurl(), "-plaintext", target, "describe", "servegrid.router.v1.DrainBackendRequest")
    assert "string backend_id = 1" in message


async def test_domain_error_becomes_status_with_error_info(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.RouterAdminServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DrainBackend(pb.DrainBackendRequest(backend_id="ghost"))
    err = caught.value
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert "ghost" in (err.details() or "")
    status, info = status_details(err.trailing_metadata())
    assert status is not None and info is not None
    assert (info.reason, info.domain, info.metadata["backend_id"]) == ("BACKEND_NOT_FOUND", DOMAIN, "ghost")


async def test_unexpected_error_is_internal_without_leaking_details(channel: grpc.aio.Channel) -> None:
    stub = pb_grpc.RouterAdminServiceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.DrainBackend(pb.DrainBackendRequest(backend_id="boom"))
    assert caught.value.code() == grpc.StatusCode.INTERNAL
    assert caught.value.details() == INTERNAL_MESSAGE
    assert "secret" not in str(caught.value.trailing_metadata())


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"\xff\xff\xff\xff\xff\xff", id="garbage"),
        pytest.param(pb.DrainBackendRequest(backend_id="triton-a").SerializeToString()[:-3], id="truncated"),
    ],
)
async def test_undecodable_request_is_invalid_argument_naming_the_message(
    channel: grpc.aio.Channel, body: bytes
) -> None:
    # gRPC's own answer would be UNKNOWN "Unexpected <class 'google.protobuf.message.DecodeError'>".
    call = channel.unary_unary(f"/{SERVICE}/DrainBackend", request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(body, timeout=5)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "servegrid.router.v1.DrainBackendRequest" in (caught.value.details() or "")
    _, info = status_details(caught.value.trailing_metadata())
    assert info is not None and info.reason == "MALFORMED_REQUEST"


def _scrape(metrics_port: int) -> str:
    # The metrics endpoint runs in its own thread, so a blocking read is fine here.
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        return reply.read().decode()


def _sample(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_count_calls_by_method_and_code(demo: ServiceApp, channel: grpc.aio.Channel) -> None:
    assert demo.metrics_port
    stub = pb_grpc.RouterAdminServiceStub(channel)
    labels = {"grpc_service": SERVICE, "grpc_method": "ListBackends", "grpc_code": "OK"}
    before = _sample(_scrape(demo.metrics_port), "servegrid_rpc_requests_total", **labels)
    for _ in range(3):
        await stub.ListBackends(pb.ListBackendsRequest())
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.DrainBackend(pb.DrainBackendRequest(backend_id="ghost"))
    text = _scrape(demo.metrics_port)
    assert _sample(text, "servegrid_rpc_requests_total", **labels) == before + 3
    assert _sample(text, "servegrid_rpc_requests_total", grpc_method="DrainBackend", grpc_code="NOT_FOUND") >= 1
    assert _sample(text, "servegrid_rpc_duration_seconds_count", grpc_method="ListBackends") >= 3


async def test_sigterm_drains_in_flight_call_then_exits(tmp_path: Path) -> None:
    ready = tmp_path / "ready.json"
    log_path = tmp_path / "demo.log"
    env = {
        **os.environ,
        "SERVEGRID_DEMO_PORT": "0",
        "SERVEGRID_DEMO_READY_FILE": str(ready),
        "SERVEGRID_DEMO_GRACE_PERIOD_S": "10",
        "SERVEGRID_DEMO_SHUTDOWN_DELAY_S": "0.3",
    }
    # Popen only spawns; the waits below are async or happen after the server has gone.
    with log_path.open("wb") as log:
        proc = subprocess.Popen(  # noqa: ASYNC220
            [sys.executable, "-m", "tests.support.demo_service"], cwd=REPO, env=env, stderr=log
        )

    def logged() -> str:
        return log_path.read_text(errors="replace")

    try:
        await asyncio.to_thread(wait_started, proc, ready.exists, name="demo", timeout_s=20, log_tail=logged)
        port = json.loads(ready.read_text())["port"]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.RouterAdminServiceStub(ch)
            health = health_pb2_grpc.HealthStub(ch)
            watch = health.Watch(health_pb2.HealthCheckRequest())
            assert (await watch.read()).status == SERVING
            in_flight = asyncio.ensure_future(stub.DrainBackend(pb.DrainBackendRequest(backend_id="slow")))
            await wait_until(lambda: SLOW_STARTED in logged(), timeout_s=10)  # the call is inside the handler
            started = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            # During the shutdown delay the server still answers, and says it is going away.
            assert (await watch.read()).status == NOT_SERVING
            assert (await health.Check(health_pb2.HealthCheckRequest())).status == NOT_SERVING
            watch.cancel()
            reply = await in_flight
            assert reply.backend.drained, "the in-flight call finished with its real answer"
            assert time.monotonic() - started < SLOW_SECONDS + 1
        assert await asyncio.to_thread(proc.wait, 15) == 0
        logs = [json.loads(line) for line in logged().splitlines() if line]
        assert any(entry["msg"] == "demo draining" for entry in logs)
        assert all({"ts", "level", "service", "msg"} <= entry.keys() for entry in logs)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
