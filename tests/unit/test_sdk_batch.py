"""The Python SDKs' batch calls (sync and asyncio), and the headers an inference carries, against a real
gRPC server on port 0 that plays the gateway: what each call sends, how pages are followed, and how
errors come back."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
from servegrid.batch.v1 import batch_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from servegrid_sdk import AsyncServegridClient, ServegridClient, ServegridError
from services.mesh import names

JOBS = [f"job-{i}" for i in range(5)]


class Gateway(gateway_pb2_grpc.GatewayServiceServicer):
    """Five jobs, two per page; job-0 is the one that can be retried; others are NOT_FOUND. Infer records
    the call's metadata."""

    def __init__(self) -> None:
        self.seen: list[object] = []

    def Infer(self, request: gateway_pb2.InferRequest, context: grpc.ServicerContext) -> gateway_pb2.InferResponse:
        self.seen.append(dict(context.invocation_metadata()))
        return gateway_pb2.InferResponse(model_id=request.model_id)

    def ListBatchJobs(
        self, request: gateway_pb2.ListBatchJobsRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.ListBatchJobsResponse:
        self.seen.append(request)
        start = int(request.page_token or 0)
        page = JOBS[start : start + 2]
        token = str(start + 2) if start + 2 < len(JOBS) else ""
        return gateway_pb2.ListBatchJobsResponse(
            jobs=[batch_pb2.BatchJob(job_id=j) for j in page], next_page_token=token
        )

    def GetBatchJob(
        self, request: gateway_pb2.GetBatchJobRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.GetBatchJobResponse:
        if request.job_id not in JOBS:
            context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id} not found")
        job = batch_pb2.BatchJob(job_id=request.job_id, total_items=10, succeeded_items=4)
        return gateway_pb2.GetBatchJobResponse(progress=batch_pb2.BatchJobProgress(job=job, items_per_second=2.0))

    def CancelBatchJob(
        self, request: gateway_pb2.CancelBatchJobRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.CancelBatchJobResponse:
        job = batch_pb2.BatchJob(job_id=request.job_id, state=batch_pb2.BATCH_JOB_STATE_CANCELLED)
        return gateway_pb2.CancelBatchJobResponse(job=job)

    def RetryBatchJob(
        self, request: gateway_pb2.RetryBatchJobRequest, context: grpc.ServicerContext
    ) -> gateway_pb2.RetryBatchJobResponse:
        if request.job_id != "job-0":
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, "nothing to retry")
        job = batch_pb2.BatchJob(job_id=request.job_id, state=batch_pb2.BATCH_JOB_STATE_RUNNING)
        return gateway_pb2.RetryBatchJobResponse(job=job, requeued_items=3)


@pytest.fixture
def gateway() -> Iterator[tuple[Gateway, str]]:
    servicer = Gateway()  # type: ignore[abstract]  # only the batch calls are served
    server = grpc.server(futures.ThreadPoolExecutor(4))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_sync_batch_calls(gateway: tuple[Gateway, str]) -> None:
    servicer, target = gateway
    with ServegridClient(target, token="t") as sg:
        assert [j.job_id for j in sg.list_batch_jobs(page_size=2)] == JOBS  # three pages followed
        assert [r.page_token for r in servicer.seen] == ["", "2", "4"]  # type: ignore[attr-defined]
        progress = sg.get_batch_job("job-1")
        assert (progress.job.succeeded_items, progress.items_per_second) == (4, 2.0)
        assert sg.cancel_batch_job("job-2").state == batch_pb2.BATCH_JOB_STATE_CANCELLED
        job, requeued = sg.retry_batch_job("job-0")
        assert (job.job_id, requeued) == ("job-0", 3)
        with pytest.raises(ServegridError) as missing:
            sg.get_batch_job("ghost")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND and "ghost" in missing.value.message


async def test_async_batch_calls(gateway: tuple[Gateway, str]) -> None:
    _, target = gateway
    async with AsyncServegridClient(target, token="t") as sg:
        assert [j.job_id async for j in sg.list_batch_jobs(page_size=2)] == JOBS
        assert (await sg.get_batch_job("job-3")).job.total_items == 10
        assert (await sg.cancel_batch_job("job-4")).state == batch_pb2.BATCH_JOB_STATE_CANCELLED
        assert (await sg.retry_batch_job("job-0"))[1] == 3
        with pytest.raises(ServegridError) as refused:
            await sg.retry_batch_job("job-1")
        assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION


async def test_an_inference_names_its_model_to_the_data_plane(gateway: tuple[Gateway, str]) -> None:
    """Both clients send the headers Envoy routes and counts KServe calls by (services.mesh.names'),
    the version header only for a pinned version."""
    servicer, target = gateway
    inputs = {"x": np.zeros((1, 4), np.float32)}
    with ServegridClient(target, token="t") as sg:
        sg.infer("affine", inputs, version=2)
    async with AsyncServegridClient(target, token="t") as asg:
        await asg.infer("digits", inputs)
    pinned, latest = servicer.seen
    assert (pinned[names.MODEL_HEADER], pinned[names.VERSION_HEADER]) == ("affine", "2")  # type: ignore[index]
    assert latest[names.MODEL_HEADER] == "digits" and names.VERSION_HEADER not in latest  # type: ignore[index, operator]
