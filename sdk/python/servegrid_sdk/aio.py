"""The asyncio client: ServegridClient's API on grpc.aio, for services that call servegrid from an event loop.

>>> async with AsyncServegridClient("127.0.0.1:8080", token=jwt) as sg:
...     result = await sg.infer("digits", {"pixels": [[0.0] * 64]})

Requests are built and answers read by the same functions as the sync client (servegrid_sdk.client), so
both speak the API identically; only the calls differ.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable
from types import TracebackType
from typing import Any

import grpc
from servegrid.batch.v1 import batch_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from servegrid_sdk.client import (
    InferResult,
    Inputs,
    ServegridError,
    batch_job_request,
    declared_datatypes,
    infer_request,
    infer_result,
    model_metadata,
    needs_signature,
    refresh_time,
    tls_credentials,
)


class AsyncApiKeyCredential:
    """ApiKeyCredential for grpc.aio: one exchange at a time, the token reused until shortly before it ends."""

    def __init__(self, channel: grpc.aio.Channel, api_key: str, *, clock: Callable[[], float] = time.time) -> None:
        self._stub = gateway_pb2_grpc.AuthServiceStub(channel)
        self._api_key = api_key
        self._clock = clock
        self._lock = asyncio.Lock()
        self._token = ""
        self._refresh_at = 0.0
        self._plain = False
        self.exchanges = 0

    async def metadata(self, timeout_s: float) -> list[tuple[str, str]]:
        async with self._lock:
            if not self._plain and (not self._token or self._clock() >= self._refresh_at):
                try:
                    reply = await self._stub.CreateAccessToken(
                        gateway_pb2.CreateAccessTokenRequest(),
                        metadata=[("x-api-key", self._api_key)],
                        timeout=timeout_s,
                    )
                except grpc.aio.AioRpcError as err:
                    if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                        raise ServegridError.from_rpc_error(err) from None
                    self._plain = True
                else:
                    self.exchanges += 1
                    self._token = reply.access_token
                    self._refresh_at = refresh_time(reply, self._clock())
            if self._plain:
                return [("x-api-key", self._api_key)]
            return [("authorization", f"Bearer {self._token}")]


class AsyncServegridClient:
    """GatewayService over grpc.aio with credentials and a default deadline (see ServegridClient)."""

    def __init__(
        self,
        target: str = "127.0.0.1:8080",
        *,
        token: str | None = None,
        api_key: str | None = None,
        timeout_s: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        ca_file: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        credentials = tls_credentials(credentials, ca_file)
        self._channel = (
            grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
        )
        self._stub = gateway_pb2_grpc.GatewayServiceStub(self._channel)
        self._static = [("authorization", f"Bearer {token}")] if token else []
        self.api_key = AsyncApiKeyCredential(self._channel, api_key, clock=clock) if api_key and not token else None
        self.timeout_s = timeout_s
        self._signatures: dict[str, dict[str, str]] = {}

    async def _metadata(self) -> list[tuple[str, str]]:
        return self._static if self.api_key is None else await self.api_key.metadata(self.timeout_s)

    async def _call(
        self, method: str, request: Any, timeout_s: float | None = None, headers: list[tuple[str, str]] | None = None
    ) -> Any:
        try:
            return await getattr(self._stub, method)(
                request, timeout=timeout_s or self.timeout_s, metadata=[*await self._metadata(), *(headers or ())]
            )
        except grpc.aio.AioRpcError as err:
            raise ServegridError.from_rpc_error(err) from None

    async def _declared(self, model_id: str) -> dict[str, str]:
        if model_id not in self._signatures:
            self._signatures[model_id] = declared_datatypes(await self.get_model(model_id))
        return self._signatures[model_id]

    async def infer(
        self,
        model_id: str,
        inputs: Inputs,
        *,
        version: int = 0,
        output_names: Iterable[str] = (),
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> InferResult:
        declared = await self._declared(model_id) if needs_signature(inputs) else {}
        request = infer_request(
            model_id, inputs, declared, version=version, output_names=output_names, request_id=request_id
        )
        return infer_result(await self._call("Infer", request, timeout_s, model_metadata(model_id, version)))

    async def list_models(self, page_size: int = 0) -> AsyncIterator[gateway_pb2.Model]:
        async for model in self._paged("ListModels", gateway_pb2.ListModelsRequest(page_size=page_size), "models"):
            yield model

    async def _paged(self, method: str, request: Any, field: str) -> AsyncIterator[Any]:
        """Every item of a List RPC, following next_page_token from page to page."""
        while True:
            reply = await self._call(method, request)
            for item in getattr(reply, field):
                yield item
            if not reply.next_page_token:
                return
            request.page_token = reply.next_page_token

    async def get_model(self, model_id: str) -> gateway_pb2.Model:
        return (await self._call("GetModel", gateway_pb2.GetModelRequest(model_id=model_id))).model

    async def create_batch_job(
        self,
        model_id: str,
        items: Iterable[Inputs],
        *,
        idempotency_key: str | None = None,
        version: int = 0,
        priority: int = 0,
    ) -> batch_pb2.BatchJob:
        items = list(items)
        declared = await self._declared(model_id) if any(needs_signature(item) for item in items) else {}
        request = batch_job_request(
            model_id, items, declared, idempotency_key=idempotency_key, version=version, priority=priority
        )
        return (await self._call("CreateBatchJob", request)).job

    async def get_batch_job(self, job_id: str) -> batch_pb2.BatchJobProgress:
        return (await self._call("GetBatchJob", gateway_pb2.GetBatchJobRequest(job_id=job_id))).progress

    async def list_batch_jobs(self, page_size: int = 0) -> AsyncIterator[batch_pb2.BatchJob]:
        request = gateway_pb2.ListBatchJobsRequest(page_size=page_size)
        async for job in self._paged("ListBatchJobs", request, "jobs"):
            yield job

    async def cancel_batch_job(self, job_id: str) -> batch_pb2.BatchJob:
        return (await self._call("CancelBatchJob", gateway_pb2.CancelBatchJobRequest(job_id=job_id))).job

    async def retry_batch_job(self, job_id: str) -> tuple[batch_pb2.BatchJob, int]:
        reply = await self._call("RetryBatchJob", gateway_pb2.RetryBatchJobRequest(job_id=job_id))
        return reply.job, reply.requeued_items

    async def watch_batch_job(self, job_id: str) -> AsyncIterator[batch_pb2.BatchJobProgress]:
        try:
            stream = self._stub.WatchBatchJob(
                gateway_pb2.WatchBatchJobRequest(job_id=job_id), metadata=await self._metadata()
            )
            async for reply in stream:
                yield reply.progress
        except grpc.aio.AioRpcError as err:
            raise ServegridError.from_rpc_error(err) from None

    async def batch_results(self, job_id: str) -> AsyncIterator[batch_pb2.BatchResult]:
        try:
            stream = self._stub.StreamBatchJobResults(
                gateway_pb2.StreamBatchJobResultsRequest(job_id=job_id), metadata=await self._metadata()
            )
            async for reply in stream:
                yield reply.result
        except grpc.aio.AioRpcError as err:
            raise ServegridError.from_rpc_error(err) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncServegridClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
