"""BatchService gRPC servicer: protobuf ↔ domain, nothing more."""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf import timestamp_pb2
from google.rpc import status_pb2
from servegrid.batch.v1 import batch_pb2, batch_pb2_grpc
from tritonclient.grpc import service_pb2

from services.batch.intake import new_job, storable_items
from services.batch.progress import RateWindow, average_rate, eta_seconds
from services.batch.settings import BatchSettings
from services.batch.store import BatchStore, Job, ResultRow
from services.batch.tensors import response_tensors
from services.runtime.errors import InvalidArgument
from services.runtime.logs import current_request_id
from services.runtime.paging import bad_position, decode_page_token, encode_page_token
from services.runtime.tracing import trace_context

DEFAULT_JOBS_PAGE = 50
MAX_JOBS_PAGE = 500
DEFAULT_RESULTS_PAGE = 100
MAX_RESULTS_PAGE = 5000


def _timestamp(value: dt.datetime | None) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def job_proto(job: Job) -> batch_pb2.BatchJob:
    message = batch_pb2.BatchJob(
        name=f"batchJobs/{job.job_id}",
        job_id=str(job.job_id),
        tenant=job.tenant,
        model_id=job.model_id,
        version=job.version,
        priority=job.priority,
        idempotency_key=job.idempotency_key,
        state=batch_pb2.BatchJobState.ValueType(job.state),
        total_items=job.total_items,
        succeeded_items=job.succeeded_items,
        failed_items=job.failed_items,
        cancelled_items=job.cancelled_items,
        create_time=_timestamp(job.create_time),
        start_time=_timestamp(job.start_time),
        end_time=_timestamp(job.end_time),
        labels=job.labels,
    )
    return message


def progress_proto(job: Job, rate: float | None = None) -> batch_pb2.BatchJobProgress:
    items_per_second = average_rate(job) if rate is None else rate
    return batch_pb2.BatchJobProgress(
        job=job_proto(job), items_per_second=items_per_second, eta_seconds=eta_seconds(job, items_per_second)
    )


def result_proto(row: ResultRow) -> batch_pb2.BatchResult:
    result = batch_pb2.BatchResult(
        item_id=row.item_id,
        item_index=row.item_index,
        state=batch_pb2.BatchItemState.ValueType(row.state),
        attempts=row.attempts,
        complete_time=_timestamp(row.complete_time),
    )
    if row.response is not None:
        result.outputs.extend(response_tensors(service_pb2.ModelInferResponse.FromString(bytes(row.response))))
    if row.error_code is not None:
        result.error.CopyFrom(
            status_pb2.Status(code=row.error_code, message=f"{row.error_reason}: {row.error_message}")
        )
    return result


def _job_id(value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError as error:
        raise InvalidArgument("job_id must be a UUID", field_violations=[("job_id", "not a UUID")]) from error


def _tenant(value: str) -> str:
    if not value:
        raise InvalidArgument("tenant is required", field_violations=[("tenant", "required")])
    return value


def _page_size(value: int, default: int, most: int) -> int:
    if value < 0:
        raise InvalidArgument("page_size must not be negative", field_violations=[("page_size", "negative")])
    return min(value or default, most)


class BatchServicer(batch_pb2_grpc.BatchServiceServicer):
    def __init__(self, store: BatchStore, settings: BatchSettings, on_due: Callable[[], None]) -> None:
        self._store = store
        self._settings = settings
        self._on_due = on_due

    async def CreateBatchJob(
        self, request: batch_pb2.CreateBatchJobRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.CreateBatchJobResponse:
        # The job keeps the submit's trace context and request id: its items' spans and logs join them.
        spec = new_job(request, trace_context(context.invocation_metadata()), current_request_id())
        # Parsing and encoding thousands of tensors is CPU work; keep the event loop answering meanwhile.
        items = await asyncio.to_thread(
            storable_items, request, max_inline=self._settings.max_inline_items, max_items=self._settings.max_items
        )
        job, created = await self._store.create_job(spec, items)
        if created:
            self._on_due()
        return batch_pb2.CreateBatchJobResponse(job=job_proto(job), created=created)

    async def GetBatchJob(
        self, request: batch_pb2.GetBatchJobRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.GetBatchJobResponse:
        job = await self._store.get_job(_tenant(request.tenant), _job_id(request.job_id))
        return batch_pb2.GetBatchJobResponse(progress=progress_proto(job))

    async def ListBatchJobs(
        self, request: batch_pb2.ListBatchJobsRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.ListBatchJobsResponse:
        tenant = _tenant(request.tenant)
        size = _page_size(request.page_size, DEFAULT_JOBS_PAGE, MAX_JOBS_PAGE)
        query = {"list": "jobs", "tenant": tenant}
        after = None
        if position := decode_page_token(request.page_token, query):
            try:
                created, job_id = position
                after = (dt.datetime.fromisoformat(created), uuid.UUID(job_id))
            except (TypeError, ValueError) as error:
                raise bad_position() from error
        jobs = await self._store.list_jobs(tenant, size + 1, after)
        token = ""
        if len(jobs) > size:
            jobs = jobs[:size]
            token = encode_page_token([jobs[-1].create_time.isoformat(), str(jobs[-1].job_id)], query)
        return batch_pb2.ListBatchJobsResponse(jobs=[job_proto(j) for j in jobs], next_page_token=token)

    async def CancelBatchJob(
        self, request: batch_pb2.CancelBatchJobRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.CancelBatchJobResponse:
        job = await self._store.cancel_job(_tenant(request.tenant), _job_id(request.job_id))
        return batch_pb2.CancelBatchJobResponse(job=job_proto(job))

    async def RetryBatchJob(
        self, request: batch_pb2.RetryBatchJobRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.RetryBatchJobResponse:
        job, requeued = await self._store.retry_job(_tenant(request.tenant), _job_id(request.job_id))
        if requeued:
            self._on_due()
        return batch_pb2.RetryBatchJobResponse(job=job_proto(job), requeued_items=requeued)

    async def WatchBatchJob(
        self, request: batch_pb2.WatchBatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[batch_pb2.WatchBatchJobResponse]:
        tenant, job_id = _tenant(request.tenant), _job_id(request.job_id)
        window = RateWindow()
        last: tuple[int, int] | None = None
        while True:
            job = await self._store.get_job(tenant, job_id)
            rate = window.add(job.done_items)
            # Send on change (and the first snapshot); the stream stays quiet while nothing moves.
            if (job.state, job.done_items) != last:
                last = (job.state, job.done_items)
                yield batch_pb2.WatchBatchJobResponse(progress=progress_proto(job, rate if not job.terminal else None))
            if job.terminal:
                return
            await asyncio.sleep(self._settings.watch_interval_s)

    async def ListBatchJobResults(
        self, request: batch_pb2.ListBatchJobResultsRequest, context: grpc.aio.ServicerContext
    ) -> batch_pb2.ListBatchJobResultsResponse:
        tenant, job_id = _tenant(request.tenant), _job_id(request.job_id)
        size = _page_size(request.page_size, DEFAULT_RESULTS_PAGE, MAX_RESULTS_PAGE)
        state = int(request.state) or None
        # Bound to the job and the state filter: a token from the FAILED list cannot page the full one.
        query = {"list": "results", "tenant": tenant, "job": str(job_id), "state": state}
        position = decode_page_token(request.page_token, query)
        if position is not None and (not isinstance(position, int) or position < 0):
            raise bad_position()
        after = -1 if position is None else position
        rows = await self._store.list_results(tenant, job_id, size + 1, after, state)
        token = ""
        if len(rows) > size:
            rows = rows[:size]
            token = encode_page_token(rows[-1].item_index, query)
        return batch_pb2.ListBatchJobResultsResponse(results=[result_proto(r) for r in rows], next_page_token=token)
