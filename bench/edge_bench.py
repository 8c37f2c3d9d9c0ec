"""Full front door (Envoy + JWT + rate limit + gateway + Triton) against direct Triton, in one run."""

# Run: python -m bench.edge_bench [--duration 10] [--models affine,resnet18] [--json out.json]
#
# Every process here is real and local: Triton (Python backend, CPU), the edge service (RLS on the
# real Redis at 127.0.0.1:6379, with a limit far above the load so every request is counted but
# none refused), the gateway and Envoy. The client speaks gRPC with a JWT, exactly as an SDK does.
# Paths:
#   direct    client → Triton (KServe v2 ModelInfer)
#   kserve    client → Envoy (JWT, RLS) → Triton                 (tritonclient through the front door)
#   gateway   client → Envoy (JWT, RLS) → gateway → Triton      (the public API: typed tensors)

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from servegrid.common.v1 import tensor_pb2
from servegrid.gateway.v1 import gateway_pb2

from bench.loadgen import MODEL_INFER_METHOD, LoadResult, encode_infer_request
from bench.triton_direct import model_inputs

GATEWAY_INFER_METHOD = "/servegrid.gateway.v1.GatewayService/Infer"
DEFAULT_MODELS = ("affine", "resnet18")
# ResNet18 makes tens of requests/s on 2 cores; more in flight would only measure queueing.
CONCURRENCY = {"affine": 32, "resnet18": 4}
TARGETS = {"affine": {"rps": 1000.0, "p99_ms": 50.0}, "resnet18": {"ratio": 0.95}}
_CHANNEL_OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def gateway_request(model: str, inputs: Mapping[str, np.ndarray]) -> bytes:
    """A serialized servegrid InferRequest with the same tensors as the direct KServe request."""
    tensors = []
    for name, array in inputs.items():
        flat = np.ascontiguousarray(array, dtype=np.float32).ravel()
        tensors.append(
            tensor_pb2.Tensor(
                name=name, datatype="FP32", shape=array.shape, data=tensor_pb2.TensorData(fp32=flat.tolist())
            )
        )
    return gateway_pb2.InferRequest(model_id=model, inputs=tensors).SerializeToString()


async def run_unary_load(
    target: str,
    label: str,
    method: str,
    payload: bytes,
    *,
    concurrency: int,
    duration: float,
    warmup: float,
    metadata: Sequence[tuple[str, str]] = (),
    deadline_s: float = 30.0,
) -> LoadResult:
    """Closed loop: `concurrency` calls of `method` in flight for warmup + duration (bytes in, bytes out)."""
    async with grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10)
        call = channel.unary_unary(method, request_serializer=None, response_deserializer=None)
        measure_from = time.perf_counter() + warmup
        stop_at = measure_from + duration
        latencies: list[float] = []
        errors: list[str] = []
        last_done = measure_from
        md = tuple(metadata) or None

        async def worker() -> None:
            nonlocal last_done
            while (started := time.perf_counter()) < stop_at:
                try:
                    await call(payload, timeout=deadline_s, metadata=md)
                    error = ""
                except grpc.aio.AioRpcError as failure:
                    error = f"{failure.code().name}: {failure.details()}"
                finished = time.perf_counter()
                if started < measure_from:
                    continue
                last_done = max(last_done, finished)
                if error:
                    errors.append(error)
                else:
                    latencies.append(finished - started)

        cpu = time.process_time()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        cpu = time.process_time() - cpu
    window = max(stop_at, last_done) - measure_from
    ms = np.asarray(latencies) * 1e3 if latencies else np.asarray([math.nan])
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return LoadResult(
        target=f"{label} {target}",
        model=label.split(":")[0],
        concurrency=concurrency,
        duration_s=window,
        requests=len(latencies),
        errors=len(errors),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        mean_ms=float(ms.mean()),
        client_cpu_pct=100.0 * cpu / (window + warmup),
        error_samples=tuple(dict.fromkeys(errors))[:5],
    )


async def measure_paths(
    triton_address: str,
    envoy_address: str,
    token: str,
    models: Sequence[str],
    *,
    duration: float,
    warmup: float,
) -> dict[str, dict[str, LoadResult]]:
    """For each model: the three paths, one after the other, same inputs and concurrency."""
    auth = [("authorization", f"Bearer {token}")]
    results: dict[str, dict[str, LoadResult]] = {}
    for model in models:
        inputs = model_inputs(model)
        kserve = encode_infer_request(model, inputs)
        concurrency = CONCURRENCY.get(model, 8)
        plan = [
            ("direct", triton_address, MODEL_INFER_METHOD, kserve, ()),
            ("kserve", envoy_address, MODEL_INFER_METHOD, kserve, auth),
            ("gateway", envoy_address, GATEWAY_INFER_METHOD, gateway_request(model, inputs), auth),
        ]
        results[model] = {}
        for path, target, method, payload, metadata in plan:
            result = await run_unary_load(
                target,
                f"{model}:{path}",
                method,
                payload,
                concurrency=concurrency,
                duration=duration,
                warmup=warmup,
                metadata=metadata,
            )
            print(
                f"  {model:9s} {path:8s} c={concurrency:<3d} {result.rps:8,.0f} req/s  p50 {result.p50_ms:6.2f} ms"
                f"  p99 {result.p99_ms:6.2f} ms  errors {result.errors}",
                file=sys.stderr,
                flush=True,
            )
            results[model][path] = result
    return results


def summarize(results: Mapping[str, Mapping[str, LoadResult]]) -> dict[str, Any]:
    """Requests/s, p50, p99 per path, ratios to direct Triton, and the targets met or missed."""
    summary: dict[str, Any] = {}
    for model, paths in results.items():
        direct = paths["direct"].rps
        rows = {
            path: {
                "rps": round(r.rps, 1),
                "p50_ms": round(r.p50_ms, 2),
                "p99_ms": round(r.p99_ms, 2),
                "errors": r.errors,
                "ratio_to_direct": round(r.rps / direct, 3) if direct else math.nan,
                "concurrency": r.concurrency,
            }
            for path, r in paths.items()
        }
        target = TARGETS.get(model, {})
        gateway = rows["gateway"]
        checks = {}
        if "rps" in target:
            checks[f"rps>={target['rps']:g}"] = gateway["rps"] >= target["rps"]
        if "p99_ms" in target:
            checks[f"p99<{target['p99_ms']:g}ms"] = gateway["p99_ms"] < target["p99_ms"]
        if "ratio" in target:
            checks[f"ratio>={target['ratio']:g}"] = gateway["ratio_to_direct"] >= target["ratio"]
        summary[model] = {"paths": rows, "targets": checks}
    return summary


def format_summary(summary: Mapping[str, Any]) -> str:
    lines = [f"{'model':10s} {'path':8s} {'c':>3s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'x direct':>9s}"]
    for model, data in summary.items():
        for path, row in data["paths"].items():
            lines.append(
                f"{model:10s} {path:8s} {row['concurrency']:3d} {row['rps']:9,.0f} {row['p50_ms']:8.2f}"
                f" {row['p99_ms']:8.2f} {row['ratio_to_direct']:9.2f}"
            )
        for name, ok in data["targets"].items():
            lines.append(f"{'':10s} target {name}: {'met' if ok else 'MISSED'}")
    return "\n".join(lines)


def run_edge_bench(
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    duration: float = 10.0,
    warmup: float = 2.0,
    triton_address: str | None = None,
    envoy_concurrency: int = 1,
    state_dir: Path | None = None,
) -> dict[str, Any]:
    """Start what is missing (Triton unless given, then edge, gateway, Envoy), measure, stop it all."""
    # Imported here: the bench's helpers come from the test support kit and start real processes.
    from services.edge.devkeys import DevIssuer
    from services.edge.envoy_config import EnvoyParams
    from tests.support.envoy import start_envoy
    from tests.support.processes import start_service

    with tempfile.TemporaryDirectory(prefix="servegrid-edge-bench-") as scratch:
        root = state_dir or Path(scratch)
        triton_cm: Any = None
        if triton_address is None:
            from models.build import build_repository
            from services.stack.triton import start_triton

            repository = build_repository(root / "repository", log=False)
            print("starting Triton ...", file=sys.stderr, flush=True)
            triton_cm = start_triton(repository, load_models=list(models), state_dir=root / "triton")
            triton_address = triton_cm.grpc_address
        issuer = DevIssuer.generate()
        jwks = issuer.write(root / "jwt")
        prefix = f"servegrid:edgebench:{os.getpid()}:"
        started: list[Any] = []
        try:
            edge = start_service(
                "edge",
                "services.edge",
                "SERVEGRID_EDGE_",
                root,
                {
                    "SERVEGRID_EDGE_REDIS_PREFIX": prefix,
                    "SERVEGRID_EDGE_DB_SCHEMA": f"servegrid_edge_bench_{os.getpid()}",
                    "SERVEGRID_EDGE_DEFAULT_LIMIT": str(10**9),  # counted, never refused
                    "SERVEGRID_EDGE_LOG_LEVEL": "WARNING",
                },
            )
            started.append(edge)
            gateway = start_service(
                "gateway",
                "services.gateway",
                "SERVEGRID_GATEWAY_",
                root,
                {"SERVEGRID_GATEWAY_ROUTER_ADDRESS": triton_address, "SERVEGRID_GATEWAY_LOG_LEVEL": "WARNING"},
            )
            started.append(gateway)
            params = EnvoyParams.for_profile(
                "local", jwks_file=str(jwks), gateway=gateway.address, router=triton_address, edge=edge.address
            )
            envoy = start_envoy(root / "envoy", params, concurrency=envoy_concurrency)
            started.append(envoy)
            token = issuer.token("bench", ttl_s=3600)
            results = asyncio.run(
                measure_paths(triton_address, envoy.address, token, models, duration=duration, warmup=warmup)
            )
        finally:
            for process in reversed(started):
                process.stop()
            if triton_cm is not None:
                triton_cm.stop()
            _cleanup(prefix, f"servegrid_edge_bench_{os.getpid()}")
    summary = summarize(results)
    summary["_meta"] = {
        "duration_s": duration,
        "warmup_s": warmup,
        "cpus": os.cpu_count(),
        "envoy_concurrency": envoy_concurrency,
    }
    return summary


def _cleanup(prefix: str, schema: str) -> None:
    import psycopg
    import psycopg.sql
    import redis

    client = redis.Redis.from_url(os.environ.get("SERVEGRID_REDIS_URL", "redis://127.0.0.1:6379/0"))
    try:
        for key in client.scan_iter(f"{prefix}*"):
            client.delete(key)
    finally:
        client.close()
    url = os.environ.get("SERVEGRID_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(psycopg.sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(psycopg.sql.Identifier(schema)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.edge_bench", description=__doc__)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS), help="comma-separated: affine,resnet18,digits")
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per path")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--triton", help="use this running Triton (host:port) instead of starting one")
    parser.add_argument("--envoy-concurrency", type=int, default=1, help="Envoy worker threads")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    summary = run_edge_bench(
        models=[m for m in args.models.split(",") if m],
        duration=args.duration,
        warmup=args.warmup,
        triton_address=args.triton,
        envoy_concurrency=args.envoy_concurrency,
    )
    print(format_summary({k: v for k, v in summary.items() if not k.startswith("_")}))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
