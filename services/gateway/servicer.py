"""servegrid.gateway.v1.GatewayService: protobuf in and out; the work is in tensors, catalog and upstream."""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import grpc
from servegrid.batch.v1 import batch_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tritonclient.grpc import service_pb2

from services.gateway import batch
from services.gateway.batch import BatchForwarder
from services.gateway.catalog import ModelCatalog
from services.gateway.identity import OPEN_POLICY, IdentityPolicy
from services.gateway.upstream import KServeClient
from services.mesh.names import MAX_NAME_BYTES, TENANT_HEADER, name_too_long
from services.runtime import InvalidArgument
from services.runtime.errors import abort_with, status_for
from services.runtime.logs import current_request_id
from services.runtime.tensors import TensorError, from_infer_response, to_infer_inputs
from services.runtime.tracing import carried_metadata

log = logging.getLogger(__name__)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    """The public API."""

    def __init__(
        self,
        inference: KServeClient,
        catalog: ModelCatalog,
        default_timeout_s: float,
        batch: BatchForwarder,
        identity: IdentityPolicy = OPEN_POLICY,
    ) -> None:
        self.inference = inference
        self.catalog = catalog
        self.default_timeout_s = default_timeout_s
        self.batch = batch
        self.identity = identity

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        return batch.tenant_of(self.batch, self.identity.identity(context))

    async def Infer(
        self, request: gateway_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.InferResponse:
        # The hot path skips the runtime's interceptor (see server.py), so it maps its own errors,
        # through the same function the interceptor uses.
        try:
            return await self._infer(request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as error:
            await abort_with(context, status_for(error, "GatewayService/Infer", log))

    async def _infer(
        self, request: gateway_pb2.InferRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.InferResponse:
        problems: list[tuple[str, str]] = []
        if not request.model_id:
            problems.append(("model_id", "required: the model to run"))
        elif name_too_long(request.model_id):
            problems.append(("model_id", f"longer than {MAX_NAME_BYTES} bytes"))
        if request.version < 0:
            problems.append(("version", "must be >= 0 (0 follows the model's traffic policy)"))
        try:
            inputs, raw = to_infer_inputs(request.inputs)
        except TensorError as error:
            problems += error.violations
        if problems:
            # Rejected here, so nothing malformed ever costs an inference call.
            raise InvalidArgument(
                "invalid request: " + "; ".join(f"{f}: {d}" for f, d in problems),
                reason="INVALID_TENSOR" if any(f.startswith("inputs") for f, _ in problems) else "INVALID_ARGUMENT",
                field_violations=problems,
            )
        # The caller's own id, else the one Envoy made for this request (x-request-id), so both name one thing.
        request_id = request.request_id or current_request_id() or uuid.uuid4().hex
        infer = service_pb2.ModelInferRequest(
            model_name=request.model_id,
            model_version=str(request.version) if request.version else "",
            id=request_id,
            inputs=inputs,
            outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in request.output_names],
            raw_input_contents=raw,
        )
        incoming = context.invocation_metadata() or ()
        identity = self.identity.identity(context, incoming)
        # The request id and trace context go on to the data plane (a trace spans Envoy → gateway → Envoy
        # → Triton even when this process does not trace).
        metadata = carried_metadata(incoming)
        if identity.tenant:
            metadata.append((TENANT_HEADER, identity.tenant))
        remaining = context.time_remaining()
        timeout = self.default_timeout_s if remaining is None else remaining
        response = await self.inference.infer(infer, timeout, metadata)
        try:
            outputs = from_infer_response(response)
        except ValueError as error:
            log.error("unusable inference response", extra={"model": request.model_id, "error": str(error)})
            raise
        version = int(response.model_version) if response.model_version.isdigit() else request.version
        return gateway_pb2.InferResponse(
            model_id=request.model_id, version=version, outputs=outputs, request_id=request_id
        )

    async def ListModels(
        self, request: gateway_pb2.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListModelsResponse:
        models, token = await self.catalog.list(request.page_size, request.page_token)
        return gateway_pb2.ListModelsResponse(models=models, next_page_token=token)

    async def GetModel(
        self, request: gateway_pb2.GetModelRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetModelResponse:
        return gateway_pb2.GetModelResponse(model=await self.catalog.get(request.model_id))

    async def CreateBatchJob(
        self, request: gateway_pb2.CreateBatchJobRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CreateBatchJobResponse:
        forwarded = batch.create_request(self._tenant(context), request)
        await self.catalog.require_servable(request.model_id, request.version)
        reply: batch_pb2.CreateBatchJobResponse = await batch.unary(self.batch, context, "CreateBatchJob", forwarded)
        return gateway_pb2.CreateBatchJobResponse(job=reply.job, created=reply.created)

    async def GetBatchJob(
        self, request: gateway_pb2.GetBatchJobRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.GetBatchJobResponse:
        forwarded = batch_pb2.GetBatchJobRequest(tenant=self._tenant(context), job_id=request.job_id)
        reply: batch_pb2.GetBatchJobResponse = await batch.unary(self.batch, context, "GetBatchJob", forwarded)
        return gateway_pb2.GetBatchJobResponse(progress=reply.progress)

    async def ListBatchJobs(
        self, request: gateway_pb2.ListBatchJobsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListBatchJobsResponse:
        forwarded = batch_pb2.ListBatchJobsRequest(
            tenant=self._tenant(context), page_size=request.page_size, page_token=request.page_token
        )
        reply: batch_pb2.ListBatchJobsResponse = await batch.unary(self.batch, context, "ListBatchJobs", forwarded)
        return gateway_pb2.ListBatchJobsResponse(jobs=reply.jobs, next_page_token=reply.next_page_token)

    async def CancelBatchJob(
        self, request: gateway_pb2.CancelBatchJobRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CancelBatchJobResponse:
        forwarded = batch_pb2.CancelBatchJobRequest(tenant=self._tenant(context), job_id=request.job_id)
        reply: batch_pb2.CancelBatchJobResponse = await batch.unary(self.batch, context, "CancelBatchJob", forwarded)
        return gateway_pb2.CancelBatchJobResponse(job=reply.job)

    async def RetryBatchJob(
        self, request: gateway_pb2.RetryBatchJobRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.RetryBatchJobResponse:
        forwarded = batch_pb2.RetryBatchJobRequest(tenant=self._tenant(context), job_id=request.job_id)
        reply: batch_pb2.RetryBatchJobResponse = await batch.unary(self.batch, context, "RetryBatchJob", forwarded)
        return gateway_pb2.RetryBatchJobResponse(job=reply.job, requeued_items=reply.requeued_items)

    async def ListBatchJobResults(
        self, request: gateway_pb2.ListBatchJobResultsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListBatchJobResultsResponse:
        forwarded = batch_pb2.ListBatchJobResultsRequest(
            tenant=self._tenant(context),
            job_id=request.job_id,
            page_size=request.page_size,
            page_token=request.page_token,
            state=request.state,
        )
        reply: batch_pb2.ListBatchJobResultsResponse = await batch.unary(
            self.batch, context, "ListBatchJobResults", forwarded
        )
        return gateway_pb2.ListBatchJobResultsResponse(results=reply.results, next_page_token=reply.next_page_token)

    async def WatchBatchJob(
        self, request: gateway_pb2.WatchBatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.WatchBatchJobResponse]:
        async for progress in batch.watch(self.batch, context, self._tenant(context), request.job_id):
            yield gateway_pb2.WatchBatchJobResponse(progress=progress)

    async def StreamBatchJobResults(
        self, request: gateway_pb2.StreamBatchJobResultsRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[gateway_pb2.StreamBatchJobResultsResponse]:
        tenant = self._tenant(context)
        async for result in batch.results(self.batch, context, tenant, request.job_id, request.state):
            yield gateway_pb2.StreamBatchJobResultsResponse(result=result)
