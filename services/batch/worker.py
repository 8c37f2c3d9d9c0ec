"""WorkerPool: Kafka consumer-group workers that pack items into inference calls and write each result once.

Runs inside the batch service (`workers` setting) and as its own process: `python -m services.batch.worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import grpc
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from google.rpc import code_pb2
from opentelemetry import context as otel_context
from opentelemetry import trace
from servegrid.batch.v1 import batch_pb2
from tritonclient.grpc import service_pb2

from services.batch.inference import InferenceFailure, KServeBatchClient
from services.batch.metrics import (
    CONSUMER_LAG,
    DUPLICATES_DROPPED,
    INFER_REQUESTS,
    ITEM_RETRIES,
    ITEMS_DONE,
    JOB_DURATION,
    PACK_SIZE,
)
from services.batch.outbox import context_from_headers
from services.batch.settings import BatchSettings
from services.batch.store import BatchStore, Outcomes, PendingItem
from services.batch.tensors import ModelShape, Pack, make_packs, unpack_response
from services.mesh.names import REQUEST_ID_HEADER
from services.runtime import ServiceApp
from services.runtime.logs import request_id_scope
from services.runtime.tracing import resumed

log = logging.getLogger(__name__)
_TRACER = trace.get_tracer("servegrid.batch.worker")


def decode_chunk(value: bytes) -> tuple[uuid.UUID, list[int]]:
    body = json.loads(value)
    return uuid.UUID(body["job_id"]), [int(i) for i in body["items"]]


def _reason(code: grpc.StatusCode) -> str:
    return {grpc.StatusCode.INVALID_ARGUMENT: "INVALID_ITEM", grpc.StatusCode.NOT_FOUND: "MODEL_NOT_FOUND"}.get(
        code, "INFERENCE_FAILED"
    )


def _rpc_code(code: grpc.StatusCode) -> int:
    return int(code.value[0]) if isinstance(code.value, tuple) else code_pb2.UNKNOWN


@dataclass
class _JobWork:
    job_id: uuid.UUID
    model_id: str
    version: str
    items: list[tuple[int, service_pb2.ModelInferRequest]]
    # The submitting request's, from the chunk's Kafka headers (services/batch/outbox.py context_headers).
    trace_context: dict[str, str] = field(default_factory=dict)
    request_id: str = ""

    def metadata(self) -> list[tuple[str, str]]:
        """Sent with the job's inference calls: the request id, and the job's trace context (which this
        process's client interceptor replaces with its own span's when it traces)."""
        carried = list(self.trace_context.items())
        return [*carried, (REQUEST_ID_HEADER, self.request_id)] if self.request_id else carried


@contextlib.contextmanager
def _on_behalf_of(work: _JobWork) -> Iterator[None]:
    """Spans started and lines logged inside belong to the job's submitting request: its trace, its request id."""
    token = otel_context.attach(resumed(work.trace_context))
    try:
        with request_id_scope(work.request_id):
            yield
    finally:
        otel_context.detach(token)


class WorkerPool:
    """`consumers` group members in this process. Each round: fetch messages, load the items that still
    want a result, infer in packs, write every outcome in one transaction per job, THEN commit offsets.
    A crash anywhere before the commit redelivers the round; the writes are idempotent, so that is safe."""

    def __init__(
        self, settings: BatchSettings, store: BatchStore, inference: KServeBatchClient, consumers: int
    ) -> None:
        self._settings = settings
        self._store = store
        self._inference = inference
        self._consumers = consumers
        self._infer_slots = asyncio.Semaphore(settings.worker_concurrency * max(1, consumers))
        self._tasks: list[asyncio.Task[None]] = []
        self._lag: dict[int, int] = {}

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._run_consumer(n), name=f"batch-worker-{n}") for n in range(self._consumers)
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def _consumer(self, n: int) -> AIOKafkaConsumer:
        s = self._settings
        return AIOKafkaConsumer(
            s.items_topic,
            bootstrap_servers=s.kafka_bootstrap,
            group_id=s.consumer_group,
            client_id=f"{s.consumer_group}-{n}",
            enable_auto_commit=False,
            # Offsets lost with a broker's state: start at the beginning; already-done items are skipped.
            auto_offset_reset="earliest",
            session_timeout_ms=s.kafka_session_timeout_ms,
            heartbeat_interval_ms=max(100, s.kafka_session_timeout_ms // 5),
            metadata_max_age_ms=5_000,
            # The broker answers a fetch as soon as a message arrives; this only bounds an idle fetch, so
            # a long one costs no latency and keeps an idle worker from asking ten times a second.
            fetch_max_wait_ms=1_000,
            max_poll_interval_ms=max(300_000, int(s.request_timeout_s * 4000)),
        )

    async def _run_consumer(self, n: int) -> None:
        max_records = self._settings.worker_concurrency * 2
        while True:
            consumer = self._consumer(n)
            try:
                await consumer.start()
                while True:
                    batch = await consumer.getmany(timeout_ms=1_000, max_records=max_records)
                    if not batch:
                        continue
                    await self.process([m for messages in batch.values() for m in messages])
                    await self._commit(consumer, batch)
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Rejoining from the committed offsets redelivers the round that failed; nothing is lost.
                log.warning("worker round failed; rejoining", extra={"error": f"{type(error).__name__}: {error}"})
                await asyncio.sleep(0.5)
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()

    async def _commit(self, consumer: AIOKafkaConsumer, batch: dict[TopicPartition, list[ConsumerRecord]]) -> None:
        offsets = {tp: messages[-1].offset + 1 for tp, messages in batch.items()}
        try:
            await consumer.commit(offsets)
        except Exception as error:
            # Partitions moved to another member mid-round: it redelivers them and finds the results written.
            log.info("offset commit refused", extra={"error": f"{type(error).__name__}: {error}"})
        lag = 0
        for tp, next_offset in offsets.items():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lag += max(0, highwater - next_offset)
        self._lag[id(consumer)] = lag
        CONSUMER_LAG.set(sum(self._lag.values()))

    async def process(self, messages: Sequence[ConsumerRecord]) -> None:
        """Handle one round of messages; returns once every outcome is durable."""
        keys: dict[tuple[uuid.UUID, int], None] = {}
        origins: dict[uuid.UUID, tuple[dict[str, str], str]] = {}
        for message in messages:
            try:
                job_id, indices = decode_chunk(message.value)
            except (ValueError, KeyError, TypeError):
                log.error("dropping undecodable message", extra={"offset": message.offset})
                continue
            origins.setdefault(job_id, context_from_headers(message.headers))
            for index in indices:
                keys[(job_id, index)] = None
        if not keys:
            return
        pending = await self._store.load_pending(list(keys))
        if dropped := len(keys) - len(pending):
            DUPLICATES_DROPPED.inc(dropped)
        jobs: dict[uuid.UUID, _JobWork] = {}
        for item in pending:
            work = jobs.get(item.job_id)
            if work is None:
                work = jobs[item.job_id] = _JobWork(
                    item.job_id, item.model_id, _version(item), [], *origins[item.job_id]
                )
            work.items.append((item.item_index, service_pb2.ModelInferRequest.FromString(item.request)))
        results = await asyncio.gather(*(self._infer_job(work) for work in jobs.values()))
        for work, outcomes in zip(jobs.values(), results, strict=True):
            with _on_behalf_of(work):
                await self._record(work.job_id, outcomes)

    async def _record(self, job_id: uuid.UUID, outcomes: Outcomes) -> None:
        await record_outcomes(self._store, self._settings, job_id, outcomes)

    async def _infer_job(self, work: _JobWork) -> Outcomes:
        outcomes = Outcomes()
        with _on_behalf_of(work):
            try:
                shape = await self._inference.model_shape(work.model_id, work.version)
            except InferenceFailure as failure:
                outcomes.transient.extend((i, _rpc_code(failure.code), failure.message) for i, _ in work.items)
                return outcomes
            originals = dict(work.items)
            packs = make_packs(work.items, shape, self._settings.pack_size)
            await asyncio.gather(*(self._infer_pack(work, pack, originals, shape, outcomes) for pack in packs))
        return outcomes

    def _pack_span(self, work: _JobWork, pack: Pack) -> trace.Span:
        """One span per inference call, a child of the job's submit span (the current context here)."""
        return _TRACER.start_span(
            "batch.pack",
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation": "process",
                "messaging.destination.name": self._settings.items_topic,
                "servegrid.batch.job_id": str(work.job_id),
                "servegrid.batch.item_indices": list(pack.indices),
                "servegrid.model": work.model_id,
            },
        )

    async def _infer_pack(
        self,
        work: _JobWork,
        pack: Pack,
        originals: dict[int, service_pb2.ModelInferRequest],
        shape: ModelShape,
        outcomes: Outcomes,
    ) -> None:
        with trace.use_span(self._pack_span(work, pack), end_on_exit=True) as span:
            if work.request_id:
                pack.request.id = work.request_id  # Triton logs and traces the call under the submit's id
            async with self._infer_slots:
                try:
                    response = await self._inference.infer(work.model_id, work.version, pack.request, work.metadata())
                    INFER_REQUESTS.labels("OK").inc()
                    PACK_SIZE.observe(len(pack.indices))
                except InferenceFailure as failure:
                    INFER_REQUESTS.labels(failure.code.name).inc()
                    response = None
                    error = failure
            if response is not None:
                try:
                    per_item = unpack_response(pack, response)
                except ValueError as bad:
                    error = InferenceFailure(grpc.StatusCode.INTERNAL, str(bad))
                else:
                    outcomes.succeeded.extend(
                        (i, r.SerializeToString()) for i, r in zip(pack.indices, per_item, strict=True)
                    )
                    return
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(error)))
            if error.permanent and pack.packed and len(pack.indices) > 1:
                # One bad item must not fail its neighbours: try each alone to find which one the model
                # rejects (each its own span, under this one).
                singles = [Pack([i], originals[i], [False], packed=False) for i in pack.indices]
                await asyncio.gather(*(self._infer_pack(work, p, originals, shape, outcomes) for p in singles))
                return
            for index in pack.indices:
                if error.permanent:
                    outcomes.failed.append((index, _rpc_code(error.code), _reason(error.code), error.message))
                else:
                    outcomes.transient.append((index, _rpc_code(error.code), str(error)))


def _version(item: PendingItem) -> str:
    return str(item.version) if item.version else ""


def batch_resources(app: ServiceApp, settings: BatchSettings) -> tuple[BatchStore, KServeBatchClient]:
    """The database and the inference client every batch process runs on, with their lifecycle on
    `app`: the store opens and migrates first and is a required health component; both close last
    (shutdown hooks run in reverse, so whatever the caller registers after this stops before them)."""
    store = BatchStore(settings.database_url, settings.db_schema, max_size=settings.db_pool_max)
    inference = KServeBatchClient(
        settings.inference_address,
        timeout_s=settings.request_timeout_s,
        config_ttl_s=settings.model_config_ttl_s,
        tls=settings.tls,
    )

    async def migrate() -> None:
        await store.migrate()

    app.health.add_component("database", store.ping)
    app.on_startup(store.open)
    app.on_startup(migrate)
    app.on_shutdown(store.close)
    app.on_shutdown(inference.close)
    return store, inference


def build_worker_app(settings: BatchSettings) -> ServiceApp:
    """A standalone worker process, built like every service: gRPC health (its database), drain on
    SIGTERM (consumers stop and commit, then the pool closes), metrics, structured logs; no API."""
    update: dict[str, object] = {"port": settings.worker_port, "metrics_port": settings.worker_metrics_port}
    app = ServiceApp("batch-worker", settings.model_copy(update=update))
    store, inference = batch_resources(app, settings)
    pool = WorkerPool(settings, store, inference, consumers=max(1, settings.workers))
    app.on_startup(pool.start)
    app.on_shutdown(pool.stop)
    return app


def main() -> None:
    build_worker_app(BatchSettings()).run()


def _state_label(state: int) -> str:
    """'succeeded' for BATCH_JOB_STATE_SUCCEEDED: the metric label of a job's end state."""
    return (
        batch_pb2.BatchJobState.Name(batch_pb2.BatchJobState.ValueType(state)).removeprefix("BATCH_JOB_STATE_").lower()
    )


async def record_outcomes(store: BatchStore, settings: BatchSettings, job_id: uuid.UUID, outcomes: Outcomes) -> None:
    """Write a round's outcomes for one job and count them: the one way results are recorded, by a
    worker's round and by the reconciler's lease expiries alike."""
    written = await store.record(
        job_id,
        outcomes,
        max_attempts=settings.max_attempts,
        backoff_s=settings.retry_backoff_s,
        backoff_max_s=settings.retry_backoff_max_s,
    )
    ITEMS_DONE.labels("succeeded").inc(written.succeeded)
    ITEMS_DONE.labels("failed").inc(written.failed)
    ITEM_RETRIES.inc(written.retried)
    if written.ended and written.duration_s is not None:
        JOB_DURATION.labels(_state_label(written.job_state)).observe(written.duration_s)
        log.info("job ended", extra={"job_id": str(job_id), "state": _state_label(written.job_state)})


if __name__ == "__main__":
    main()
