"""Batch throughput (items/s) through the whole path, next to direct Triton's best from the same run.

    python -m bench.batch_bench [--arith-items 20000] [--resnet-items 300] [--json out.json]

Starts its own broker (tansu), Triton and batch service (in this process), uses a throwaway schema in
the PostgreSQL at SERVEGRID_DATABASE_URL, and removes everything it started when done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import psycopg
from servegrid.batch.v1 import batch_pb2, batch_pb2_grpc
from servegrid.common.v1 import tensor_pb2

from bench.loadgen import run_load
from models.build import build_repository
from models.catalog import Backend, Device
from services.batch.server import build_app
from services.batch.settings import BatchSettings
from services.stack.kafka import KafkaBroker, start_broker
from services.stack.triton import TritonInstance, start_triton

ARITH_MODEL = "affine_batched"
RESNET_MODEL = "resnet18"
_BIG = 1024 * 1024 * 1024
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", _BIG), ("grpc.max_receive_message_length", _BIG)]


def _items(name: str, rows: np.ndarray) -> list[batch_pb2.BatchItem]:
    shape = [1, *rows.shape[1:]]
    return [
        batch_pb2.BatchItem(
            inputs=[
                tensor_pb2.Tensor(
                    name=name, datatype="FP32", shape=shape, data=tensor_pb2.TensorData(fp32=row.ravel().tolist())
                )
            ]
        )
        for row in rows
    ]


async def _run_job(
    stub: batch_pb2_grpc.BatchServiceStub, model: str, items: list[batch_pb2.BatchItem]
) -> dict[str, float]:
    """Submit one job and wait for it; items/s end to end and over the processing window only."""
    started = time.perf_counter()
    created = await stub.CreateBatchJob(
        batch_pb2.CreateBatchJobRequest(
            tenant="bench", model_id=model, idempotency_key=uuid.uuid4().hex, items=batch_pb2.BatchItems(items=items)
        ),
        timeout=600,
    )
    submitted = time.perf_counter()
    async for update in stub.WatchBatchJob(
        batch_pb2.WatchBatchJobRequest(tenant="bench", job_id=created.job.job_id), timeout=1800
    ):
        job = update.progress.job
    ended = time.perf_counter()
    if job.state != batch_pb2.BATCH_JOB_STATE_SUCCEEDED or job.succeeded_items != len(items):
        raise RuntimeError(f"bench job did not succeed: {job}")
    # start_time/end_time are stamped by the service: first publish to last result.
    processing = job.end_time.ToDatetime() - job.start_time.ToDatetime()
    return {
        "items": len(items),
        "submit_s": submitted - started,
        "end_to_end_s": ended - started,
        "end_to_end_items_per_s": len(items) / (ended - started),
        "processing_s": processing.total_seconds(),
        "processing_items_per_s": len(items) / max(1e-9, processing.total_seconds()),
    }


async def _direct_best(
    triton: TritonInstance, model: str, inputs: dict[str, np.ndarray], levels: Sequence[int]
) -> dict[str, Any]:
    """Direct Triton, closed loop, at each concurrency; items/s = requests/s x items per request."""
    per_request = next(iter(inputs.values())).shape[0]
    runs = []
    for concurrency in levels:
        result = await run_load(triton.grpc_address, model, inputs, concurrency=concurrency, duration=5.0, warmup=1.0)
        runs.append({"concurrency": concurrency, "items_per_s": result.rps * per_request, "errors": result.errors})
    best = max(runs, key=lambda r: r["items_per_s"])
    return {"items_per_request": per_request, "runs": runs, "best_items_per_s": best["items_per_s"]}


@contextlib.asynccontextmanager
async def _service(settings: BatchSettings) -> AsyncIterator[batch_pb2_grpc.BatchServiceStub]:
    app = build_app(settings)
    await app.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}", options=_CHANNEL_OPTIONS) as channel:
            yield batch_pb2_grpc.BatchServiceStub(channel)
    finally:
        await app.stop()


async def bench(
    arith_items: int, resnet_items: int, database_url: str, *, resnet_pack: int = 1, resnet_concurrency: int = 4
) -> dict[str, Any]:
    schema = f"batch_bench_{uuid.uuid4().hex[:10]}"
    work = Path(tempfile.mkdtemp(prefix="servegrid-batch-bench-"))
    repository = build_repository(work / "models", backend=Backend.PYTHON, device=Device.CPU, log=False)
    broker: KafkaBroker = start_broker(log_path=work / "tansu.log")
    triton = start_triton(repository, load_models=[ARITH_MODEL, RESNET_MODEL], state_dir=work / "triton")
    report: dict[str, Any] = {"arith_model": ARITH_MODEL, "resnet_model": RESNET_MODEL}
    base: dict[str, Any] = {
        "port": 0,
        "metrics_port": None,
        "use_uvloop": False,
        "database_url": database_url,
        "db_schema": schema,
        "kafka_bootstrap": broker.bootstrap,
        "router_address": triton.grpc_address,
        "max_message_bytes": _BIG,
        "max_inline_items": 1_000_000,
        "lease_s": 300.0,
    }
    rng = np.random.default_rng(0)
    try:
        # Each model gets the profile that suits it: light models pack wide; ResNet18 gains nothing from
        # batching on 2 cores (DESIGN.md) and needs its CPU for the model, not for a deep queue.
        arith = BatchSettings(**base, items_topic=f"a-{schema}", dlq_topic=f"ad-{schema}", consumer_group=f"a-{schema}")
        async with _service(arith) as stub:
            await _run_job(stub, ARITH_MODEL, _items("x", rng.random((256, 4), dtype=np.float32)))  # warm-up
            report["batch_arith"] = await _run_job(
                stub, ARITH_MODEL, _items("x", rng.random((arith_items, 4), dtype=np.float32))
            )
        report["direct_arith"] = await _direct_best(
            triton, ARITH_MODEL, {"x": np.ones((64, 4), dtype=np.float32)}, (1, 4, 8)
        )
        report["direct_arith_single_item"] = await _direct_best(
            triton, ARITH_MODEL, {"x": np.ones((1, 4), dtype=np.float32)}, (8, 32)
        )
        resnet_input = {"input": np.ones((1, 3, 224, 224), dtype=np.float32)}
        before = await _direct_best(triton, RESNET_MODEL, resnet_input, (1, 4))
        resnet = BatchSettings(
            **base,
            items_topic=f"r-{schema}",
            dlq_topic=f"rd-{schema}",
            consumer_group=f"r-{schema}",
            pack_size=resnet_pack,
            chunk_size=max(resnet_pack, 4),
            worker_concurrency=resnet_concurrency,
        )
        images = rng.random((resnet_items, 3, 224, 224), dtype=np.float32)
        async with _service(resnet) as stub:
            await _run_job(stub, RESNET_MODEL, _items("input", images[:8]))  # warm-up
            report["batch_resnet"] = await _run_job(stub, RESNET_MODEL, _items("input", images))
        after = await _direct_best(triton, RESNET_MODEL, resnet_input, (1, 4))
        # Other suites share these 2 cores: direct is measured on both sides of the batch run, best kept.
        report["direct_resnet"] = max(before, after, key=lambda r: r["best_items_per_s"])
        report["resnet_profile"] = {"pack_size": resnet_pack, "worker_concurrency": resnet_concurrency}
    finally:
        triton.stop()
        broker.stop()
        shutil.rmtree(work, ignore_errors=True)
        with psycopg.connect(database_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    report["resnet_ratio_vs_direct_best"] = (
        report["batch_resnet"]["processing_items_per_s"] / report["direct_resnet"]["best_items_per_s"]
    )
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--arith-items", type=int, default=20_000)
    parser.add_argument("--resnet-items", type=int, default=300)
    parser.add_argument("--database-url", default=BatchSettings().database_url)
    parser.add_argument("--resnet-pack", type=int, default=1, help="pack_size for the ResNet18 job")
    parser.add_argument("--resnet-concurrency", type=int, default=4, help="worker_concurrency for ResNet18")
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    report = asyncio.run(
        bench(
            args.arith_items,
            args.resnet_items,
            args.database_url,
            resnet_pack=args.resnet_pack,
            resnet_concurrency=args.resnet_concurrency,
        )
    )
    a, r = report["batch_arith"], report["batch_resnet"]
    print(
        f"{ARITH_MODEL}: batch {a['processing_items_per_s']:.0f} items/s processing "
        f"({a['end_to_end_items_per_s']:.0f} end to end incl. submit) for {a['items']} items; "
        f"direct Triton best {report['direct_arith']['best_items_per_s']:.0f} items/s packed x64, "
        f"{report['direct_arith_single_item']['best_items_per_s']:.0f} items/s one item per request"
    )
    print(
        f"{RESNET_MODEL}: batch {r['processing_items_per_s']:.1f} items/s processing "
        f"({r['end_to_end_items_per_s']:.1f} end to end) for {r['items']} items; "
        f"direct Triton best {report['direct_resnet']['best_items_per_s']:.1f} items/s; "
        f"ratio {report['resnet_ratio_vs_direct_best']:.2f}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
