"""Router overhead: the same load against Triton directly and through the router, in one run, side by side."""

# Both targets are measured in the same run, one after the other per (model, concurrency), so the
# ratio compares like with like on a shared box. The router runs as its own process, the way it is
# deployed (uvloop, JSON logs off), so its CPU is separate from the load generator's.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from servegrid.registry.v1 import registry_pb2 as rpb

from bench.loadgen import MODEL_INFER_METHOD as MODEL_INFER
from bench.loadgen import LoadResult, run_load_sync
from bench.triton_direct import model_inputs

DEFAULT_MODELS = ("affine", "resnet18")
DEFAULT_CONCURRENCY = (1, 8, 32)
DEFAULT_DURATION_S = 5.0
DEFAULT_WARMUP_S = 1.0
READY_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Comparison:
    model: str
    concurrency: int
    direct: LoadResult
    routed: LoadResult
    # Router process CPU per routed request (user + system), in microseconds: what the hop costs.
    router_cpu_us: float = math.nan
    # The same through a bare raw-bytes proxy (no routing): the floor a Python grpc.aio hop costs here.
    floor: LoadResult | None = None
    floor_cpu_us: float = math.nan

    @property
    def ratio(self) -> float:
        return self.routed.rps / self.direct.rps if self.direct.rps else math.nan

    @property
    def added_p50_ms(self) -> float:
        return self.routed.p50_ms - self.direct.p50_ms

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "concurrency": self.concurrency,
            "ratio": round(self.ratio, 3),
            "added_p50_ms": round(self.added_p50_ms, 3),
            "router_cpu_us_per_request": round(self.router_cpu_us, 1),
            "direct": self.direct.to_dict(),
            "router": self.routed.to_dict(),
            "floor": self.floor.to_dict() if self.floor else None,
            "floor_cpu_us_per_request": round(self.floor_cpu_us, 1),
        }


def routes_for(models: Sequence[str], backend_address: str) -> rpb.WatchRoutesResponse:
    """Each model served under its own name by the one Triton: a route of one version, one backend."""
    return rpb.WatchRoutesResponse(
        reset=True,
        revision=1,
        routes=[
            rpb.Route(
                model_id=model,
                versions=[
                    rpb.RouteVersion(
                        version=1,
                        stage=rpb.STAGE_PRODUCTION,
                        triton_model_name=model,
                        weight=100,
                        backends=[rpb.RouteBackend(backend_id="triton-0", address=backend_address, weight=1)],
                    )
                ],
            )
            for model in models
        ],
    )


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class RouterProcess:
    address: str
    pid: int


@contextmanager
def _spawn(command: list[str], ready: Path, env: dict[str, str]) -> Iterator[RouterProcess]:
    """Start a server process that writes {"port": N} to `ready` once serving; SIGTERM it at the end."""
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not ready.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{command[-1]} did not start (exit status {process.poll()})")
            time.sleep(0.1)
        yield RouterProcess(f"127.0.0.1:{json.loads(ready.read_text())['port']}", process.pid)
    finally:
        process.terminate()  # SIGTERM: graceful drain, and cProfile writes its file on exit
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def router_process(routes_file: Path, scratch: Path, *, profile: Path | None = None) -> Iterator[RouterProcess]:
    """Start `python -m services.router` on free ports. With `profile`, under cProfile."""
    ready = scratch / "router-ready.json"
    env = {
        **os.environ,
        "SERVEGRID_ROUTER_PORT": "0",
        "SERVEGRID_ROUTER_METRICS_PORT": "0",
        "SERVEGRID_ROUTER_ROUTES_FILE": str(routes_file),
        "SERVEGRID_ROUTER_READY_FILE": str(ready),
        "SERVEGRID_ROUTER_LOG_LEVEL": "WARNING",
        "SERVEGRID_ROUTER_GRACE_PERIOD_S": "1",
    }
    command = [sys.executable]
    if profile is not None:
        command += ["-m", "cProfile", "-o", str(profile)]
    with _spawn([*command, "-m", "services.router"], ready, env) as process:
        yield process


@contextmanager
def floor_process(target: str, scratch: Path) -> Iterator[RouterProcess]:
    """The cheapest possible Python hop: a raw-bytes grpc.aio proxy on uvloop with no routing at all."""
    ready = scratch / "floor-ready.json"
    command = [sys.executable, "-m", "bench.router_bench", "--serve-floor-proxy", target, str(ready)]
    with _spawn(command, ready, dict(os.environ)) as process:
        yield process


async def _serve_floor_proxy(target: str, ready: Path) -> None:
    import grpc

    channel = grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", -1)])
    call = channel.unary_unary(MODEL_INFER, request_serializer=None, response_deserializer=None)

    async def infer(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        response: bytes = await call(request, timeout=context.time_remaining())
        return response

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1), ("grpc.so_reuseport", 0)])
    handler = grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService", {"ModelInfer": grpc.unary_unary_rpc_method_handler(infer)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await asyncio.to_thread(ready.write_text, json.dumps({"port": port}))
    await server.wait_for_termination()


def _routed(
    proxy: RouterProcess, model: str, inputs: Any, c: int, duration: float, warmup: float
) -> tuple[LoadResult, float]:
    """Load through a proxy process, and that process's CPU microseconds per request."""
    cpu_before = process_cpu_s(proxy.pid)
    result = run_load_sync(proxy.address, model, inputs, concurrency=c, duration=duration, warmup=warmup)
    served = result.rps * (duration + warmup)  # warm-up requests are in the CPU figure too
    return result, (process_cpu_s(proxy.pid) - cpu_before) / served * 1e6 if served else math.nan


def compare(
    direct_target: str,
    router: RouterProcess,
    models: Sequence[str],
    concurrency: Sequence[int],
    *,
    duration: float,
    warmup: float,
    floor: RouterProcess | None = None,
) -> list[Comparison]:
    results = []
    for model in models:
        inputs = model_inputs(model)
        for c in concurrency:
            direct = run_load_sync(direct_target, model, inputs, concurrency=c, duration=duration, warmup=warmup)
            routed, cpu_us = _routed(router, model, inputs, c, duration, warmup)
            floored, floor_cpu_us = (
                _routed(floor, model, inputs, c, duration, warmup) if floor is not None else (None, math.nan)
            )
            print(
                f"  {model} c={c}: direct {direct.rps:,.0f} req/s, router {routed.rps:,.0f} req/s",
                file=sys.stderr,
                flush=True,
            )
            results.append(Comparison(model, c, direct, routed, cpu_us, floored, floor_cpu_us))
    return results


def format_table(results: Sequence[Comparison]) -> str:
    header = [
        "model",
        "conc",
        "direct r/s",
        "router r/s",
        "ratio",
        "p50 d/r ms",
        "+p50 ms",
        "p99 d/r ms",
        "router cpu/req",
        "floor r/s",
        "floor cpu/req",
        "errors",
    ]
    rows = [header]
    for r in results:
        rows.append(
            [
                r.model,
                str(r.concurrency),
                f"{r.direct.rps:,.0f}",
                f"{r.routed.rps:,.0f}",
                f"{r.ratio:.2f}",
                f"{r.direct.p50_ms:.2f}/{r.routed.p50_ms:.2f}",
                f"{r.added_p50_ms:+.2f}",
                f"{r.direct.p99_ms:.2f}/{r.routed.p99_ms:.2f}",
                f"{r.router_cpu_us:.0f} us",
                f"{r.floor.rps:,.0f}" if r.floor else "-",
                f"{r.floor_cpu_us:.0f} us" if r.floor else "-",
                f"{r.direct.errors}/{r.routed.errors}",
            ]
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
        )
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.router_bench", description=__doc__)
    parser.add_argument("--models", type=_split, default=list(DEFAULT_MODELS), help="comma-separated")
    parser.add_argument("--concurrency", type=lambda t: [int(p) for p in _split(t)], default=list(DEFAULT_CONCURRENCY))
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, help="unmeasured seconds before each run")
    parser.add_argument("--triton", help="host:port of a running Triton serving the models (else one is started)")
    parser.add_argument("--profile", type=Path, help="run the router under cProfile and write the stats here")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--floor", action="store_true", help="also measure a bare raw-bytes proxy: the cost of any Python hop"
    )
    parser.add_argument("--serve-floor-proxy", nargs=2, metavar=("TARGET", "READY_FILE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_floor_proxy:
        import uvloop

        uvloop.run(_serve_floor_proxy(args.serve_floor_proxy[0], Path(args.serve_floor_proxy[1])))
        return 0

    with tempfile.TemporaryDirectory(prefix="servegrid-router-bench-") as scratch_dir:
        scratch = Path(scratch_dir)
        with _triton(args.triton, args.models, scratch) as triton_address:
            routes = scratch / "routes.json"
            routes.write_text(json_format.MessageToJson(routes_for(args.models, triton_address)))
            with (
                router_process(routes, scratch, profile=args.profile) as router,
                contextlib.ExitStack() as stack,
            ):
                floor = stack.enter_context(floor_process(triton_address, scratch)) if args.floor else None
                results = compare(
                    triton_address,
                    router,
                    args.models,
                    args.concurrency,
                    duration=args.duration,
                    warmup=args.warmup,
                    floor=floor,
                )
    print(format_table(results))
    if args.json:
        args.json.write_text(json.dumps([r.to_dict() for r in results], indent=2) + "\n")
    return 0 if all(r.direct.errors == 0 and r.routed.errors == 0 for r in results) else 1


@contextmanager
def _triton(address: str | None, models: Sequence[str], scratch: Path) -> Iterator[str]:
    if address:
        yield address
        return
    # Imported here so benchmarking an existing Triton needs neither the models nor the launcher.
    from models.build import build_repository
    from services.stack.triton import start_triton

    repository = build_repository(scratch / "repository", log=False)
    print("starting Triton ...", file=sys.stderr, flush=True)
    with start_triton(repository, load_models=list(models), state_dir=scratch / "triton") as triton:
        yield triton.grpc_address


if __name__ == "__main__":
    sys.exit(main())
