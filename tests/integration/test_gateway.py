"""The gateway against a recording KServe v2 router: raw contents, deadlines, identity, error mapping."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import pytest
from servegrid.common.v1 import tensor_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from services.gateway.server import build_app
from services.gateway.settings import GatewaySettings
from services.runtime import ServiceApp
from services.runtime.errors import status_details

pytestmark = pytest.mark.integration


@dataclass
class RecordingRouter(service_pb2_grpc.GRPCInferenceServiceServicer):
    """Echoes inputs back as outputs and remembers what it was sent."""

    calls: list[tuple[service_pb2.ModelInferRequest, dict[str, str], float | None]] = field(default_factory=list)

    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: grpc.aio.ServicerContext
    ) -> service_pb2.ModelInferResponse:
        metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        self.calls.append((request, metadata, context.time_remaining()))
        if request.model_name == "strict":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "unexpected shape for input 'x', expected [4]")
        if request.model_name == "slow":
            await asyncio.sleep(2)
        outputs = [
            service_pb2.ModelInferResponse.InferOutputTensor(name=f"{t.name}_out", datatype=t.datatype, shape=t.shape)
            for t in request.inputs
        ]
        return service_pb2.ModelInferResponse(
            model_name=request.model_name,
            model_version="3",
            id=request.id,
            outputs=outputs,
            raw_output_contents=request.raw_input_contents,
        )


@dataclass
class Running:
    router: RecordingRouter
    stub: gateway_pb2_grpc.GatewayServiceStub


@pytest.fixture(scope="module")
async def running() -> AsyncIterator[Running]:
    recorder = RecordingRouter()
    router = grpc.aio.server()
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(recorder, router)
    router_port = router.add_insecure_port("127.0.0.1:0")
    await router.start()
    settings = GatewaySettings(
        port=0,
        metrics_port=None,
        use_uvloop=False,
        inference_address=f"127.0.0.1:{router_port}",
        registry_address="127.0.0.1:1",
    )
    app: ServiceApp = build_app(settings)
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield Running(recorder, gateway_pb2_grpc.GatewayServiceStub(channel))
    await app.stop()
    await router.stop(0)


def _x(values: list[float], shape: list[int] | None = None) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(
        name="x", datatype="FP32", shape=shape or [len(values)], data=tensor_pb2.TensorData(fp32=values)
    )


async def test_infer_sends_raw_little_endian_and_returns_typed_outputs(running: Running) -> None:
    reply = await running.stub.Infer(
        gateway_pb2.InferRequest(model_id="echo", inputs=[_x([1.0, 2.0, 3.0, 4.0])], output_names=["x_out"]),
        metadata=[("x-servegrid-tenant", "acme"), ("x-request-id", "rid-1"), ("traceparent", "00-abc-def-01")],
        timeout=5,
    )
    request, metadata, _ = running.router.calls[-1]
    assert request.raw_input_contents == [np.array([1, 2, 3, 4], "<f4").tobytes()]
    assert not request.inputs[0].HasField("contents")  # raw bytes only, never JSON-ish lists
    assert [o.name for o in request.outputs] == ["x_out"]
    assert metadata["x-servegrid-tenant"] == "acme" and metadata["traceparent"] == "00-abc-def-01"
    assert list(reply.outputs[0].data.fp32) == [1.0, 2.0, 3.0, 4.0] and reply.version == 3
    assert reply.request_id and request.id == reply.request_id  # one was made up and passed on


async def test_callers_deadline_travels_to_the_router(running: Running) -> None:
    await running.stub.Infer(gateway_pb2.InferRequest(model_id="echo", inputs=[_x([1.0])]), timeout=1.5)
    remaining = running.router.calls[-1][2]
    assert remaining is not None and 0.5 < remaining < 2  # not the 30 s default: the caller's own
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await running.stub.Infer(gateway_pb2.InferRequest(model_id="slow", inputs=[_x([1.0])]), timeout=0.5)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


async def test_invalid_input_never_reaches_the_router(running: Running) -> None:
    before = len(running.router.calls)
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await running.stub.Infer(gateway_pb2.InferRequest(model_id="echo", inputs=[_x([1.0, 2.0], [3])]), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "inputs[0].shape" in (error.value.details() or "")
    _, info = status_details(error.value.trailing_metadata())
    assert info is not None and info.reason == "INVALID_TENSOR"
    assert len(running.router.calls) == before


async def test_router_errors_keep_their_code_and_message(running: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await running.stub.Infer(gateway_pb2.InferRequest(model_id="strict", inputs=[_x([1.0])]), timeout=5)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "unexpected shape for input 'x'" in (error.value.details() or "")


async def test_registry_outage_is_unavailable(running: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await running.stub.ListModels(gateway_pb2.ListModelsRequest(), timeout=10)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(grpc.aio.AioRpcError) as negative:
        await running.stub.ListModels(gateway_pb2.ListModelsRequest(page_size=-1), timeout=5)
    assert negative.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_batch_rpcs_say_batch_is_not_deployed(running: Running) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await running.stub.GetBatchJob(gateway_pb2.GetBatchJobRequest(job_id="j1"), timeout=5)
    assert error.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert "batch is not deployed" in (error.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as streamed:
        async for _ in running.stub.WatchBatchJob(gateway_pb2.WatchBatchJobRequest(job_id="j1"), timeout=5):
            pass
    assert streamed.value.code() == grpc.StatusCode.UNIMPLEMENTED
