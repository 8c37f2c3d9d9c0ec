"""Batch service against a real broker (tansu), PostgreSQL and Triton: exactly one result per item, always."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import psycopg
import pytest
from aiokafka import AIOKafkaConsumer
from prometheus_client import REGISTRY
from servegrid.batch.v1 import batch_pb2, batch_pb2_grpc
from servegrid.common.v1 import tensor_pb2

from models.digits import HeldOutSplit
from services.batch.server import build_app
from services.batch.settings import BatchSettings
from services.batch.store import BatchStore
from services.batch.worker import build_worker_app, decode_chunk
from services.runtime.errors import status_details
from services.runtime.server import ServiceApp
from services.stack.kafka import KafkaBroker, start_broker
from services.stack.triton import TritonInstance, start_triton
from tests.support.datastores import Schema, SessionDatastores
from tests.support.polling import wait_started, wait_until

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TENANT = "tenant-a"
SUCCEEDED = batch_pb2.BATCH_JOB_STATE_SUCCEEDED
FAILED = batch_pb2.BATCH_JOB_STATE_FAILED
CANCELLED = batch_pb2.BATCH_JOB_STATE_CANCELLED
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaBroker]:
    """One in-memory broker for the module; the restart test restarts it in place (same port)."""
    with start_broker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log") as instance:
        yield instance


@pytest.fixture
def schema(datastores: SessionDatastores) -> Iterator[Schema]:
    """A fresh schema per test, so no test's outbox relay ever sees another test's items."""
    with datastores.fresh_schema("batch_t_") as fresh:
        yield fresh


@pytest.fixture(scope="module")
def digits_onnx(model_repository: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_repository / "digits" / "1" / "model.onnx"))


def make_settings(schema: Schema, broker: KafkaBroker, router: str, **overrides: Any) -> BatchSettings:
    tag = schema.name.removeprefix("batch_t_")
    values: dict[str, Any] = {
        "port": 0,
        "metrics_port": None,
        "use_uvloop": False,
        "database_url": schema.database_url,
        "db_schema": schema.name,
        "kafka_bootstrap": broker.bootstrap,
        "items_topic": f"batch-items-{tag}",
        "dlq_topic": f"batch-dlq-{tag}",
        "consumer_group": f"batch-workers-{tag}",
        "topic_partitions": 4,
        "inference_address": router,
        "lease_s": 4.0,
        "reconcile_interval_s": 0.5,
        "kafka_session_timeout_ms": 6000,
        "retry_backoff_s": 0.2,
        "retry_backoff_max_s": 1.0,
        "watch_interval_s": 0.1,  # progress updates as often as tests look
        "health_interval_s": 1.0,
        "grace_period_s": 1.0,
    }
    values.update(overrides)
    return BatchSettings(**values)


def settings_env(settings: BatchSettings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SERVEGRID_")}
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"SERVEGRID_BATCH_{name.upper()}"] = str(value)
    # A free port rather than the default 9154, which a running local stack may hold.
    env["SERVEGRID_BATCH_METRICS_PORT"] = "0"
    env["SERVEGRID_BATCH_LOG_LEVEL"] = "WARNING"
    return env


@contextlib.asynccontextmanager
async def running(settings: BatchSettings) -> AsyncIterator[batch_pb2_grpc.BatchServiceStub]:
    app = build_app(settings)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            yield batch_pb2_grpc.BatchServiceStub(channel)
    finally:
        await app.stop()


def digits_items(pixels: np.ndarray, count: int) -> list[batch_pb2.BatchItem]:
    rows = pixels[np.arange(count) % len(pixels)]
    return [
        batch_pb2.BatchItem(
            item_id=f"img-{i}",
            inputs=[
                tensor_pb2.Tensor(
                    name="pixels", datatype="FP32", shape=[1, 64], data=tensor_pb2.TensorData(fp32=row.tolist())
                )
            ],
        )
        for i, row in enumerate(rows)
    ]


def create_request(items: list[batch_pb2.BatchItem], key: str | None = None) -> batch_pb2.CreateBatchJobRequest:
    return batch_pb2.CreateBatchJobRequest(
        tenant=TENANT,
        model_id="digits",
        idempotency_key=key or uuid.uuid4().hex,
        items=batch_pb2.BatchItems(items=items),
    )


async def job(stub: batch_pb2_grpc.BatchServiceStub, job_id: str) -> batch_pb2.BatchJob:
    reply = await stub.GetBatchJob(batch_pb2.GetBatchJobRequest(tenant=TENANT, job_id=job_id))
    return reply.progress.job


async def wait_for(
    stub: batch_pb2_grpc.BatchServiceStub, job_id: str, *, done_at_least: int = 0, timeout_s: float = 90.0
) -> batch_pb2.BatchJob:
    """Follow the job's WatchBatchJob stream until `done_at_least` items finished (0: until it ends)."""
    current: batch_pb2.BatchJob | None = None
    call = stub.WatchBatchJob(batch_pb2.WatchBatchJobRequest(tenant=TENANT, job_id=job_id))
    try:
        async with asyncio.timeout(timeout_s):
            async for update in call:
                current = update.progress.job
                done = current.succeeded_items + current.failed_items + current.cancelled_items
                if (done_at_least and done >= done_at_least) or current.state in TERMINAL:
                    return current
    except TimeoutError:
        pass
    finally:
        call.cancel()
    raise AssertionError(f"job stuck after {timeout_s}s: {current}")


def db_counts(schema: Schema, job_id: str) -> tuple[int, int, int]:
    """(result rows, distinct items with a result, items still pending) straight from PostgreSQL."""
    name = schema.name
    with psycopg.connect(schema.database_url, autocommit=True) as conn:
        row = conn.execute(
            f"""SELECT (SELECT count(*) FROM {name}.results WHERE job_id = %s),
                       (SELECT count(DISTINCT item_index) FROM {name}.results WHERE job_id = %s),
                       (SELECT count(*) FROM {name}.items WHERE job_id = %s AND state = 1)""",
            (job_id, job_id, job_id),
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def assert_exactly_once(schema: Schema, final: batch_pb2.BatchJob, total: int) -> None:
    assert final.state == SUCCEEDED, final
    assert final.succeeded_items == total
    assert db_counts(schema, final.job_id) == (total, total, 0)


async def all_results(stub: batch_pb2_grpc.BatchServiceStub, job_id: str) -> list[batch_pb2.BatchResult]:
    results: list[batch_pb2.BatchResult] = []
    token = ""
    while True:
        page = await stub.ListBatchJobResults(
            batch_pb2.ListBatchJobResultsRequest(tenant=TENANT, job_id=job_id, page_size=5000, page_token=token)
        )
        results.extend(page.results)
        token = page.next_page_token
        if not token:
            return results


def spawn(module: str, settings: BatchSettings, log_path: Path) -> subprocess.Popen[bytes]:
    log = log_path.open("ab")
    return subprocess.Popen(
        [sys.executable, "-m", module], cwd=REPO, env=settings_env(settings), stdout=log, stderr=subprocess.STDOUT
    )


def retries() -> float:
    """Item attempts this process's workers failed and queued again (servegrid_batch_item_retries_total)."""
    return REGISTRY.get_sample_value("servegrid_batch_item_retries_total") or 0.0


def kill(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    process.wait(timeout=10)


# --- the core flow --------------------------------------------------------------------------------


async def test_ten_thousand_digits_each_correct_exactly_once(
    schema: Schema, broker: KafkaBroker, triton: TritonInstance, digits_held_out: HeldOutSplit, digits_onnx: Any
) -> None:
    total = 10_000
    settings = make_settings(schema, broker, triton.grpc_address, lease_s=30.0, workers=2)
    async with running(settings) as stub:
        started = time.monotonic()
        created = await stub.CreateBatchJob(create_request(digits_items(digits_held_out.pixels, total)))
        assert created.created and created.job.total_items == total
        job_id = created.job.job_id

        updates = [
            u.progress async for u in stub.WatchBatchJob(batch_pb2.WatchBatchJobRequest(tenant=TENANT, job_id=job_id))
        ]
        elapsed = time.monotonic() - started
        final = updates[-1].job
        assert_exactly_once(schema, final, total)
        # Every update after the first that has finished items reports a rate (while running: over the
        # recent window, which the first look cannot have; at the end: the job's average). Whether a
        # running update with finished items comes at all depends on how fast the job is against the
        # watch interval, so that is not what is asserted.
        later = updates[1:] or updates
        with_items = [u for u in later if u.job.succeeded_items + u.job.failed_items > 0]
        assert with_items and all(u.items_per_second > 0 for u in with_items), updates
        print(f"\n10,000 digits: {elapsed:.1f} s end to end, {total / elapsed:.0f} items/s")

        results = await all_results(stub, job_id)
        assert [r.item_index for r in results] == list(range(total))
        labels = np.array([r.outputs[0].data.int64[0] for r in results])
        probabilities = np.array([list(r.outputs[1].data.fp32) for r in results], dtype=np.float32)
        assert {r.item_id for r in results} == {f"img-{i}" for i in range(total)}
        assert all(r.state == batch_pb2.BATCH_ITEM_STATE_SUCCEEDED for r in results)
        assert [o.name for o in results[0].outputs] == ["label", "probabilities"]
        assert list(results[0].outputs[1].shape) == [1, 10]

        pixels = digits_held_out.pixels[np.arange(total) % len(digits_held_out.pixels)].astype(np.float32)
        want_label, want_probabilities = digits_onnx.run(["label", "probabilities"], {"pixels": pixels})
        np.testing.assert_array_equal(labels, want_label.reshape(-1))
        np.testing.assert_allclose(probabilities, want_probabilities, rtol=1e-5, atol=1e-6)


async def test_idempotency_key_returns_the_same_job(
    schema: Schema, broker: KafkaBroker, triton: TritonInstance, digits_held_out: HeldOutSplit
) -> None:
    async with running(make_settings(schema, broker, triton.grpc_address)) as stub:
        request = create_request(digits_items(digits_held_out.pixels, 20), key="same-key")
        first, second = await asyncio.gather(stub.CreateBatchJob(request), stub.CreateBatchJob(request))
        assert first.job.job_id == second.job.job_id
        assert sorted([first.created, second.created]) == [False, True]

        different = create_request(digits_items(digits_held_out.pixels, 21), key="same-key")
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.CreateBatchJob(different)
        assert error.value.code() == grpc.StatusCode.ALREADY_EXISTS
        _, info = status_details(error.value.trailing_metadata())
        assert info is not None and info.reason == "IDEMPOTENCY_KEY_REUSED"

        final = await wait_for(stub, first.job.job_id)
        assert_exactly_once(schema, final, 20)
        listed = await stub.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant=TENANT))
        assert [j.job_id for j in listed.jobs] == [first.job.job_id]


async def test_jobs_are_per_tenant_and_paginate(
    schema: Schema, broker: KafkaBroker, triton: TritonInstance, digits_held_out: HeldOutSplit
) -> None:
    async with running(make_settings(schema, broker, triton.grpc_address)) as stub:
        ids = [(await stub.CreateBatchJob(create_request(digits_items(digits_held_out.pixels, 3)))).job.job_id]
        ids += [(await stub.CreateBatchJob(create_request(digits_items(digits_held_out.pixels, 3)))).job.job_id]
        ids += [(await stub.CreateBatchJob(create_request(digits_items(digits_held_out.pixels, 3)))).job.job_id]
        seen: list[str] = []
        token = ""
        while True:
            page = await stub.ListBatchJobs(
                batch_pb2.ListBatchJobsRequest(tenant=TENANT, page_size=2, page_token=token)
            )
            seen += [j.job_id for j in page.jobs]
            token = page.next_page_token
            if not token:
                break
        assert seen == ids[::-1]
        other = await stub.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant="tenant-b"))
        assert not other.jobs
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.GetBatchJob(batch_pb2.GetBatchJobRequest(tenant="tenant-b", job_id=ids[0]))
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant=TENANT, page_size=-1))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for job_id in ids:
            assert_exactly_once(schema, await wait_for(stub, job_id), 3)


async def test_malformed_tensor_is_rejected_up_front(
    schema: Schema, broker: KafkaBroker, triton: TritonInstance
) -> None:
    async with running(make_settings(schema, broker, triton.grpc_address)) as stub:
        bad = batch_pb2.BatchItem(
            inputs=[
                tensor_pb2.Tensor(name="pixels", datatype="FP32", shape=[1, 64], data=tensor_pb2.TensorData(fp32=[1]))
            ]
        )
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.CreateBatchJob(create_request([bad]))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        _, info = status_details(error.value.trailing_metadata())
        assert info is not None and info.reason == "INVALID_ITEM"


async def test_poison_item_fails_into_the_dead_letter_topic_and_the_rest_succeed(
    schema: Schema, broker: KafkaBroker, triton: TritonInstance, digits_held_out: HeldOutSplit
) -> None:
    settings = make_settings(schema, broker, triton.grpc_address)
    items = digits_items(digits_held_out.pixels, 300)
    poison = 137
    # Structurally fine (63 values for shape [1, 63]) but the wrong shape for the model.
    items[poison].inputs[0].shape[:] = [1, 63]
    del items[poison].inputs[0].data.fp32[63:]
    trace_id, request_id = uuid.uuid4().hex, f"poison-{uuid.uuid4().hex[:8]}"
    submitted_by = [("traceparent", f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"), ("x-request-id", request_id)]
    async with running(settings) as stub:
        created = await stub.CreateBatchJob(create_request(items), metadata=submitted_by)
        final = await wait_for(stub, created.job.job_id)
        assert final.state == FAILED
        assert (final.succeeded_items, final.failed_items) == (299, 1)
        assert db_counts(schema, final.job_id) == (300, 300, 0)

        failed = await stub.ListBatchJobResults(
            batch_pb2.ListBatchJobResultsRequest(
                tenant=TENANT, job_id=final.job_id, state=batch_pb2.BATCH_ITEM_STATE_FAILED
            )
        )
        assert [r.item_index for r in failed.results] == [poison]
        assert failed.results[0].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "INVALID_ITEM" in failed.results[0].error.message

        letters = await _dead_letters(settings, broker, schema, 1)
        assert len(letters) == 1, letters
        letter = letters[0]
        assert (letter["job_id"], letter["item_index"], letter["item_id"]) == (final.job_id, poison, f"img-{poison}")
        assert letter["error"]["reason"] == "INVALID_ITEM"
        assert "63" in letter["error"]["message"] or "shape" in letter["error"]["message"].lower()
        # The letter leads back to the request that submitted the job: its trace and its request id.
        headers = letter["kafka_headers"]
        assert headers["x-request-id"] == request_id and headers["traceparent"].split("-")[1] == trace_id

        retried = await stub.RetryBatchJob(batch_pb2.RetryBatchJobRequest(tenant=TENANT, job_id=final.job_id))
        assert retried.requeued_items == 1
        again = await wait_for(stub, final.job_id)
        assert (again.state, again.succeeded_items, again.failed_items) == (FAILED, 299, 1)
        assert db_counts(schema, final.job_id) == (300, 300, 0)


async def test_an_item_that_keeps_killing_its_worker_is_dead_lettered_after_max_attempts(
    schema: Schema, broker: KafkaBroker
) -> None:
    # A "worker" that takes every item it is handed (what a real worker's first step does, through the
    # store) and then dies on it, before any result: each lease that then expires counts an attempt,
    # and after max_attempts the item fails for good instead of going round forever.
    settings = make_settings(
        schema, broker, "127.0.0.1:1", workers=0, lease_s=0.5, max_attempts=2, reconcile_interval_s=0.1
    )
    tensor = tensor_pb2.Tensor(name="x", datatype="FP32", shape=[1, 1], data=tensor_pb2.TensorData(fp32=[1.0]))
    items = [batch_pb2.BatchItem(item_id=f"doomed-{i}", inputs=[tensor]) for i in range(3)]
    store = BatchStore(schema.database_url, schema.name)
    consumer = AIOKafkaConsumer(
        settings.items_topic,
        bootstrap_servers=broker.bootstrap,
        group_id=settings.consumer_group,
        auto_offset_reset="earliest",
    )

    async def take_and_die() -> None:
        async for message in consumer:
            job_id, indices = decode_chunk(message.value)
            await store.load_pending([(job_id, i) for i in indices])

    async with running(settings) as stub:
        await store.open()
        await consumer.start()
        doomed = asyncio.create_task(take_and_die())
        try:
            created = await stub.CreateBatchJob(create_request(items))
            final = await wait_for(stub, created.job.job_id, timeout_s=60)
        finally:
            doomed.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await doomed
            await consumer.stop()
            await store.close()
        assert (final.state, final.failed_items) == (FAILED, 3)
        results = await all_results(stub, final.job_id)
        assert {r.attempts for r in results} == {2}
        assert all("lease expired" in r.error.message for r in results), results
        letters = await _dead_letters(settings, broker, schema, 3)
        assert sorted(letter["item_id"] for letter in letters) == ["doomed-0", "doomed-1", "doomed-2"]
        assert {letter["error"]["reason"] for letter in letters} == {"RETRIES_EXHAUSTED"}


async def _dead_letters(
    settings: BatchSettings, broker: KafkaBroker, schema: Schema, want: int
) -> list[dict[str, Any]]:
    """The dead-letter topic's first `want` letters (fewer if 20 s pass without them), read from the start;
    each with its message's headers under "kafka_headers"."""
    consumer = AIOKafkaConsumer(
        settings.dlq_topic,
        bootstrap_servers=broker.bootstrap,
        group_id=f"dlq-{schema.name}",
        auto_offset_reset="earliest",
    )
    await consumer.start()
    letters: list[dict[str, Any]] = []
    try:
        # getmany answers as soon as letters arrive: the timeout only bounds a topic that stays empty.
        async with asyncio.timeout(20):
            while len(letters) < want:
                batch = await consumer.getmany(timeout_ms=1000)
                for message in (m for ms in batch.values() for m in ms):
                    headers = {key: value.decode() for key, value in message.headers or ()}
                    letters.append({**json.loads(message.value), "kafka_headers": headers})
    except TimeoutError:
        pass
    finally:
        await consumer.stop()
    return letters


async def test_cancel_mid_job_stops_writing_results(
    schema: Schema, broker: KafkaBroker, triton: TritonInstance, digits_held_out: HeldOutSplit
) -> None:
    # Small packs and one call at a time, so the job is still running when the cancel lands.
    settings = make_settings(schema, broker, triton.grpc_address, pack_size=2, chunk_size=4, worker_concurrency=1)
    total = 3000
    async with running(settings) as stub:
        created = await stub.CreateBatchJob(create_request(digits_items(digits_held_out.pixels, total)))
        await wait_for(stub, created.job.job_id, done_at_least=100)
        cancelled = await stub.CancelBatchJob(batch_pb2.CancelBatchJobRequest(tenant=TENANT, job_id=created.job.job_id))
        assert cancelled.job.state == CANCELLED
        settled = db_counts(schema, created.job.job_id)
        await asyncio.sleep(2.0)  # rounds in flight finish; none of their results may land
        final = await job(stub, created.job.job_id)
        assert db_counts(schema, created.job.job_id) == settled
        assert final.state == CANCELLED
        assert 0 < final.cancelled_items < total
        assert final.succeeded_items + final.cancelled_items == total
        assert settled[0] == final.succeeded_items
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await stub.RetryBatchJob(batch_pb2.RetryBatchJobRequest(tenant=TENANT, job_id=final.job_id))
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION


# --- chaos ------------------------------------------------------------------------------------------

CHAOS_ITEMS = 2000


async def test_chaos_kill_9_a_worker_mid_job(
    schema: Schema, broker: KafkaBroker, triton: TritonInstance, digits_held_out: HeldOutSplit, tmp_path: Path
) -> None:
    # The service runs no workers itself: two worker processes share the group, one is killed hard.
    settings = make_settings(
        schema, broker, triton.grpc_address, workers=0, pack_size=4, chunk_size=8, worker_concurrency=2
    )
    async with running(settings) as stub:
        workers = [spawn("services.batch.worker", settings, tmp_path / f"worker-{n}.log") for n in range(2)]
        try:
            created = await stub.CreateBatchJob(create_request(digits_items(digits_held_out.pixels, CHAOS_ITEMS)))
            mid = await wait_for(stub, created.job.job_id, done_at_least=200)
            assert mid.state == batch_pb2.BATCH_JOB_STATE_RUNNING, "the fault must land mid-job"
            kill(workers[0])
            final = await wait_for(stub, created.job.job_id)
            assert_exactly_once(schema, final, CHAOS_ITEMS)
        finally:
            for worker in workers:
                kill(worker)


async def test_chaos_broker_restart_loses_messages(
    schema: Schema, broker: KafkaBroker, triton: TritonInstance, digits_held_out: HeldOutSplit
) -> None:
    settings = make_settings(schema, broker, triton.grpc_address, pack_size=4, chunk_size=8, worker_concurrency=2)
    async with running(settings) as stub:
        created = await stub.CreateBatchJob(create_request(digits_items(digits_held_out.pixels, CHAOS_ITEMS)))
        mid = await wait_for(stub, created.job.job_id, done_at_least=200)
        assert mid.state == batch_pb2.BATCH_JOB_STATE_RUNNING, "the fault must land mid-job"
        await asyncio.to_thread(broker.restart)  # in-memory storage: every message and offset is gone
        final = await wait_for(stub, created.job.job_id, timeout_s=120)
        assert_exactly_once(schema, final, CHAOS_ITEMS)


async def test_chaos_kill_9_the_batch_service(
    schema: Schema, broker: KafkaBroker, triton: TritonInstance, digits_held_out: HeldOutSplit, tmp_path: Path
) -> None:
    settings = make_settings(
        schema, broker, triton.grpc_address, workers=1, pack_size=4, chunk_size=8, worker_concurrency=2
    )
    ready = tmp_path / "ready.json"

    async def start_service() -> tuple[subprocess.Popen[bytes], int]:
        ready.unlink(missing_ok=True)
        log = tmp_path / "service.log"
        process = spawn("services.batch", settings.model_copy(update={"ready_file": ready}), log)

        def tail() -> str:
            return log.read_text()[-3000:]

        await asyncio.to_thread(wait_started, process, ready.exists, name="batch", log_tail=tail)
        return process, int(json.loads(ready.read_text())["port"])

    process, port = await start_service()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = batch_pb2_grpc.BatchServiceStub(channel)
            created = await stub.CreateBatchJob(create_request(digits_items(digits_held_out.pixels, CHAOS_ITEMS)))
            mid = await wait_for(stub, created.job.job_id, done_at_least=200)
            assert mid.state == batch_pb2.BATCH_JOB_STATE_RUNNING, "the fault must land mid-job"
        kill(process)
        assert db_counts(schema, created.job.job_id)[2] > 0, "the job should still have had work left"
        process, port = await start_service()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = batch_pb2_grpc.BatchServiceStub(channel)
            final = await wait_for(stub, created.job.job_id)
            assert_exactly_once(schema, final, CHAOS_ITEMS)
    finally:
        kill(process)


async def test_chaos_kill_the_triton_backend_and_restart_it(
    schema: Schema,
    broker: KafkaBroker,
    model_repository: Path,
    digits_held_out: HeldOutSplit,
    tmp_path: Path,
) -> None:
    backend = await asyncio.to_thread(start_triton, model_repository, load_models=["digits"], state_dir=tmp_path)
    settings = make_settings(
        schema,
        broker,
        backend.grpc_address,
        pack_size=4,
        chunk_size=8,
        worker_concurrency=2,
        max_attempts=60,
        lease_s=10.0,
    )
    try:
        async with running(settings) as stub:
            created = await stub.CreateBatchJob(create_request(digits_items(digits_held_out.pixels, CHAOS_ITEMS)))
            mid = await wait_for(stub, created.job.job_id, done_at_least=200)
            assert mid.state == batch_pb2.BATCH_JOB_STATE_RUNNING, "the fault must land mid-job"
            retried = retries()
            os.killpg(backend.pid, signal.SIGKILL)  # the whole process group: Triton and its Python stubs
            await asyncio.to_thread(backend.stop)
            await wait_until(lambda: retries() > retried, timeout_s=30)  # the workers met the outage
            backend = await asyncio.to_thread(
                start_triton, model_repository, grpc_port=backend.grpc_port, load_models=["digits"], state_dir=tmp_path
            )
            final = await wait_for(stub, created.job.job_id, timeout_s=120)
            assert_exactly_once(schema, final, CHAOS_ITEMS)
    finally:
        await asyncio.to_thread(backend.stop)


async def test_through_the_real_mesh(
    schema: Schema, broker: KafkaBroker, triton: TritonInstance, digits_held_out: HeldOutSplit, tmp_path: Path
) -> None:
    """In production the workers infer through Envoy's mesh listener (routes from the router over xDS)."""
    from services.router.settings import RouterSettings
    from tests.support.router_harness import DataPlane, route, write_routes

    routes = write_routes(
        tmp_path / "routes.json",
        [route("digits", [(1, "digits", 100, [("a", triton.grpc_address, triton.http_address)])])],
    )
    plane = DataPlane(
        tmp_path,
        RouterSettings(port=0, metrics_port=None, use_uvloop=False, grace_period_s=0.2, routes_file=routes),
    )
    try:
        envoy = plane.add_envoy()
        async with running(make_settings(schema, broker, envoy.mesh_address)) as stub:
            created = await stub.CreateBatchJob(create_request(digits_items(digits_held_out.pixels, 1000)))
            assert_exactly_once(schema, await wait_for(stub, created.job.job_id), 1000)
        # Every item went through Envoy to the version's cluster, none around it.
        assert envoy.cluster_requests("kserve|digits|v1|grpc") > 0
    finally:
        plane.stop()


def test_app_is_a_service_app() -> None:
    assert isinstance(build_app(BatchSettings(port=0, metrics_port=None)), ServiceApp)


async def test_a_standalone_worker_serves_health_and_drains(schema: Schema, broker: KafkaBroker) -> None:
    # The worker process is a ServiceApp: gRPC health (SERVING once its database answers), then on stop
    # NOT_SERVING before its consumers go.
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    settings = make_settings(schema, broker, "127.0.0.1:1", workers=1, grace_period_s=0.2)
    app = build_worker_app(settings)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        await app.stop()
