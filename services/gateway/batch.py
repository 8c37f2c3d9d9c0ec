"""The gateway's batch RPCs: forwarded to servegrid.batch.v1.BatchService with the caller's verified tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
from servegrid.batch.v1 import batch_pb2, batch_pb2_grpc
from servegrid.gateway.v1 import gateway_pb2

from services.gateway.identity import Identity
from services.runtime import Unauthenticated, Unimplemented
from services.runtime.channels import open_channel
from services.runtime.errors import relay
from services.runtime.tls import CertFiles
from services.runtime.tracing import carried_metadata

# ListBatchJobResults page size used to stream a job's results.
_STREAM_PAGE = 1000


class BatchForwarder:
    """Holds the channel to the batch service (opened lazily, on the serving event loop)."""

    def __init__(self, address: str, default_timeout_s: float, tls: CertFiles | None = None) -> None:
        self.address = address
        self.tls = tls
        self.default_timeout_s = default_timeout_s
        self._channel: grpc.aio.Channel | None = None
        self._stub: batch_pb2_grpc.BatchServiceStub | None = None

    def require(self) -> None:
        if not self.address:
            raise Unimplemented(
                "batch is not deployed: this gateway has no batch service configured "
                "(SERVEGRID_GATEWAY_BATCH_ADDRESS); real-time Infer works",
                reason="BATCH_NOT_DEPLOYED",
            )

    def stub(self) -> batch_pb2_grpc.BatchServiceStub:
        self.require()
        if self._stub is None:
            self._channel = open_channel(self.address, tls=self.tls, peer="batch")
            self._stub = batch_pb2_grpc.BatchServiceStub(self._channel)
        return self._stub

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()

    def timeout(self, context: grpc.aio.ServicerContext) -> float:
        remaining = context.time_remaining()
        return self.default_timeout_s if remaining is None else max(0.001, remaining)


def tenant_of(forwarder: BatchForwarder, identity: Identity) -> str:
    """Jobs belong to a tenant, so a call without a verified one cannot name any job. (Whether batch
    is deployed at all is said first: no credential would help.)"""
    forwarder.require()
    if identity.anonymous:
        raise Unauthenticated(
            "no verified tenant on this call: reach the gateway through Envoy with a JWT or an API key",
            reason="TENANT_REQUIRED",
        )
    return identity.tenant


def create_request(tenant: str, request: gateway_pb2.CreateBatchJobRequest) -> batch_pb2.CreateBatchJobRequest:
    forwarded = batch_pb2.CreateBatchJobRequest(
        tenant=tenant,
        model_id=request.model_id,
        version=request.version,
        priority=request.priority,
        idempotency_key=request.idempotency_key,
        labels=dict(request.labels),
    )
    source = request.WhichOneof("source")
    if source == "items":
        forwarded.items.CopyFrom(request.items)
    elif source == "items_ndjson":
        forwarded.items_ndjson = request.items_ndjson
    return forwarded


async def unary(forwarder: BatchForwarder, context: grpc.aio.ServicerContext, method: str, request: Any) -> Any:
    """Call one unary BatchService method, relaying its error status as is."""
    call = getattr(forwarder.stub(), method)
    try:
        # The request id and trace context go along: a job keeps them for its items (services/batch).
        metadata = carried_metadata(context.invocation_metadata())
        return await call(request, timeout=forwarder.timeout(context), metadata=metadata)
    except grpc.aio.AioRpcError as error:
        await relay(error, context)
        raise AssertionError("unreachable: abort raises") from error


async def watch(
    forwarder: BatchForwarder, context: grpc.aio.ServicerContext, tenant: str, job_id: str
) -> AsyncIterator[batch_pb2.BatchJobProgress]:
    stream = forwarder.stub().WatchBatchJob(
        batch_pb2.WatchBatchJobRequest(tenant=tenant, job_id=job_id),
        metadata=carried_metadata(context.invocation_metadata()),
    )
    try:
        async for reply in stream:
            yield reply.progress
    except grpc.aio.AioRpcError as error:
        await relay(error, context)


async def results(
    forwarder: BatchForwarder,
    context: grpc.aio.ServicerContext,
    tenant: str,
    job_id: str,
    state: batch_pb2.BatchItemState.ValueType,
) -> AsyncIterator[batch_pb2.BatchResult]:
    token = ""
    while True:
        request = batch_pb2.ListBatchJobResultsRequest(
            tenant=tenant, job_id=job_id, page_size=_STREAM_PAGE, page_token=token, state=state
        )
        page: batch_pb2.ListBatchJobResultsResponse = await unary(forwarder, context, "ListBatchJobResults", request)
        for result in page.results:
            yield result
        token = page.next_page_token
        if not token:
            return
