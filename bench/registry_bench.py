"""Registry benchmark: GetModel/ResolveRoute latency cached vs uncached, and route propagation between replicas."""

# Everything runs in one process and one event loop (two registry replicas, a third one whose Redis
# is unreachable so every read goes to PostgreSQL, and the client), against the PostgreSQL and Redis
# the settings point at, in a throwaway schema and key prefix that are dropped at the end. Latencies
# therefore include the client's share of the loop; compare the rows with each other.

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence

import grpc
import psycopg
import redis.asyncio as aioredis
from psycopg import sql
from servegrid.registry.v1 import registry_pb2 as pb
from servegrid.registry.v1 import registry_pb2_grpc as pb_grpc

from services.registry.server import build_app
from services.registry.settings import RegistrySettings
from services.runtime.server import ServiceApp
from services.stack.ports import free_port


def percentile(samples: Sequence[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def summary(name: str, samples_s: Sequence[float]) -> str:
    ms = [s * 1000 for s in samples_s]
    return (
        f"{name:<36} n={len(ms):<5} p50={percentile(ms, 50):7.3f} ms  p99={percentile(ms, 99):7.3f} ms"
        f"  mean={statistics.fmean(ms):7.3f} ms"
    )


async def timed(call: Callable[[], Awaitable[object]], n: int) -> list[float]:
    for _ in range(min(20, n)):  # warm channels, pools and caches
        await call()
    samples = []
    for _ in range(n):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


async def run(requests: int, writes: int) -> int:
    run_id = uuid.uuid4().hex[:10]
    base = RegistrySettings(
        port=0,
        metrics_port=None,
        use_uvloop=False,
        db_schema=f"bench_registry_{run_id}",
        redis_prefix=f"bench:registry:{run_id}:",
        grace_period_s=0.2,
    )
    apps: list[ServiceApp] = []
    try:
        for settings in (
            base,
            base,
            base.model_copy(update={"redis_url": f"redis://127.0.0.1:{free_port()}/0", "cache_retry_after_s": 3600}),
        ):
            app = build_app(settings)
            await app.start()
            apps.append(app)
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") for app in apps]
        a, b, uncached = (pb_grpc.RegistryServiceStub(ch) for ch in channels)

        model_id = "bench-model"
        await a.CreateModel(pb.CreateModelRequest(model=pb.Model(model_id=model_id, task="bench")))
        await a.CreateBackend(pb.CreateBackendRequest(backend=pb.Backend(backend_id="triton-a", address="h:8001")))
        for _ in range(2):
            await a.CreateModelVersion(
                pb.CreateModelVersionRequest(model_id=model_id, version=pb.ModelVersion(triton_model_name="affine"))
            )
        for version, stage in ((1, pb.STAGE_STAGING), (1, pb.STAGE_PRODUCTION), (2, pb.STAGE_STAGING)):
            await a.TransitionModelVersionStage(
                pb.TransitionModelVersionStageRequest(model_id=model_id, version=version, stage=stage)
            )

        get = pb.GetModelRequest(model_id=model_id)
        resolve = pb.ResolveRouteRequest(model_id=model_id)
        lines = [
            summary("GetModel, Redis cache hit", await timed(lambda: a.GetModel(get), requests)),
            summary("GetModel, PostgreSQL (no cache)", await timed(lambda: uncached.GetModel(get), requests)),
            summary("ResolveRoute, Redis cache hit", await timed(lambda: a.ResolveRoute(resolve), requests)),
            summary(
                "ResolveRoute, PostgreSQL (no cache)", await timed(lambda: uncached.ResolveRoute(resolve), requests)
            ),
        ]

        # Propagation: a policy write through replica A until replica B's WatchRoutes stream shows it.
        watch = b.WatchRoutes(pb.WatchRoutesRequest(watcher="bench"))
        reset = await watch.read()
        assert isinstance(reset, pb.WatchRoutesResponse) and reset.reset
        samples = []
        for i in range(writes):
            weight = 1 + i % 99
            policy = pb.TrafficPolicy(
                model_id=model_id,
                splits=[pb.TrafficSplit(version=1, weight=100 - weight), pb.TrafficSplit(version=2, weight=weight)],
            )
            started = time.perf_counter()
            await a.SetTrafficPolicy(pb.SetTrafficPolicyRequest(policy=policy))
            while True:
                update = await asyncio.wait_for(watch.read(), 10)
                assert isinstance(update, pb.WatchRoutesResponse)
                if any(v.version == 2 and v.weight == weight for r in update.routes for v in r.versions):
                    break
            samples.append(time.perf_counter() - started)
        watch.cancel()
        lines.append(summary("propagation A write -> B watch", samples))
        print("registry bench (one process: 2 replicas + 1 cacheless replica + client)")
        for line in lines:
            print("  " + line)
        for ch in channels:
            await ch.close()
        return 0
    finally:
        for app in apps:
            await app.stop()
        async with await psycopg.AsyncConnection.connect(base.database_url, autocommit=True) as conn:
            await conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(base.db_schema)))
        client = aioredis.Redis.from_url(base.redis_url)
        keys = [k async for k in client.scan_iter(match=f"{base.redis_prefix}*")]
        if keys:
            await client.unlink(*keys)
        await client.aclose()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=500, help="reads per latency row")
    parser.add_argument("--writes", type=int, default=50, help="writes timed for propagation")
    args = parser.parse_args(argv)
    # The cacheless replica logs its (expected) Redis failures; keep the figures readable.
    logging.basicConfig(level=logging.ERROR)
    return asyncio.run(run(args.requests, args.writes))


if __name__ == "__main__":
    sys.exit(main())
