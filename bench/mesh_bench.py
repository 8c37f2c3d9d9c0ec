"""The data plane against direct Triton, in one run: Envoy alone, the full public path, the gateway's Infer."""

# Run: python -m bench.mesh_bench [--quick] [--duration S] [--load python|perf] [--json out.json]
#      (make bench BENCH=mesh)
#
# A whole local mesh (`servegrid up`: Triton, registry, router, edge, gateway, batch, Envoy) starts on
# free ports in a scratch home, with a rate limit far above the load so every request is counted and
# none refused. Paths, each measured right after direct Triton for the same model and concurrency:
#   direct    client → Triton (the Triton model the mesh name maps to)
#   mesh      client → Envoy mesh listener → Triton                     (the data plane, no auth)
#   public    client → Envoy public (TLS + JWT + rate limit + model routing) → Triton   (tritonclient, no change)
#   public-key    the same with an API key (x-api-key): one ext_authz call to the edge per request
#   public-token  the same with the token that key exchanges for (AuthService): Envoy verifies it alone
#   gateway   client → Envoy public → gateway → Envoy mesh → Triton     (the typed servegrid API)
# For every path: req/s, ratio to direct, p50/p99 added, and CPU µs per request of every process from
# /proc. Triton's own statistics must account for the requests the load tool claims, so a run of
# errors cannot pass as throughput. Paths through the public port speak TLS when the stack serves it
# (the default; SERVEGRID_STACK_PUBLIC_TLS=false measures them in plaintext, for TLS's cost).

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from bench.loadgen import GATEWAY_INFER_METHOD, LoadResult, gateway_request, run_load, run_unary_load
from bench.perf_tools import PerfAnalyzer, ensure_perf_analyzer, run_perf
from bench.proc import CpuMeter
from bench.triton_direct import model_inputs

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("direct", "mesh", "public", "public-key", "public-token", "gateway")
SCENARIOS = {"affine": (1, 8, 32), "resnet18": (1, 4)}
QUICK = {"affine": (8,)}
# Mesh name → the Triton model it runs (the seed maps `affine` to Triton's batched variant).
TRITON_NAME = {"affine": "affine_batched", "resnet18": "resnet18", "digits": "digits"}
TARGETS = (
    "mesh >= 0.95x direct at c=32; public >= 0.85x, <= 0.5 ms added p50 at c=1, <= 250 us mesh CPU per request; "
    "resnet18 >= 0.95x, <= 1 ms added p50; gateway >= 0.5x; router and edge CPU per KServe request ~ 0"
)


@dataclass
class Stack:
    home: Path
    ports: dict[str, int]
    pids: dict[str, int]
    token: str  # from the development identity provider
    api_key: str
    exchanged_token: str  # what api_key exchanges for
    ca_file: Path | None  # the CA of the public port's certificate; None when it serves plain HTTP
    # The mesh listener under mTLS: the CA and a certificate it admits (the gateway's, as its real
    # clients present); None when the stack runs without mTLS.
    mesh_tls: tuple[bytes, tuple[bytes, bytes]] | None = None

    @property
    def public_roots(self) -> bytes | None:
        return self.ca_file.read_bytes() if self.ca_file else None

    def address(self, port: str) -> str:
        return f"127.0.0.1:{self.ports[port]}"


@dataclass
class Row:
    model: str
    concurrency: int
    path: str
    rps: float
    p50_ms: float
    p99_ms: float
    served: int  # requests Triton's statistics counted as successful during the run
    claimed: int  # requests the load tool says succeeded
    errors: int
    cpu_us: dict[str, float] = field(default_factory=dict)

    @property
    def verified(self) -> bool:
        return self.errors == 0 and self.served >= 0.95 * self.claimed and self.claimed > 0


@contextmanager
def running_stack(home: Path) -> Iterator[Stack]:
    """`servegrid up` on free ports in `home`; `servegrid down` afterwards whatever happens."""
    from services.edge.devkeys import DevIssuer
    from services.stack.local import PORT_SETTINGS, StackSettings, component_tls, public_ca_file
    from services.stack.ports import free_block, free_ports
    from services.stack.supervisor import Supervisor

    ports = dict(zip(PORT_SETTINGS, free_ports(len(PORT_SETTINGS)), strict=True))
    env = {
        **os.environ,
        "SERVEGRID_STACK_HOME": str(home),
        "SERVEGRID_STACK_METRICS_PORT_BASE": str(free_block(5)),  # the services' metrics: base+1 ... base+5
        **{f"SERVEGRID_STACK_{name}": str(port) for name, port in ports.items()},
        "SERVEGRID_EDGE_DEFAULT_LIMIT": str(10**9),  # counted, never refused
        "SERVEGRID_LOG_LEVEL": "WARNING",
    }
    command = [sys.executable, "-m", "services.stack"]
    print("starting the mesh (servegrid up) ...", file=sys.stderr, flush=True)
    try:
        subprocess.run([*command, "up"], env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
        pids = {name: entry.pid for name, entry in Supervisor(home).load().items()}
        token = DevIssuer.load_or_create(home / "edge").token("bench", ttl_s=3600)
        api_key = _create_api_key(env)
        settings = StackSettings(home=home)
        ca_file = public_ca_file(settings) if settings.public_tls else None
        exchanged = _exchange(ports["ENVOY_PORT"], api_key, ca_file)
        gateway_tls = component_tls(settings, "gateway")
        mesh_tls = None
        if gateway_tls is not None:
            cert, key, ca = gateway_tls.read()
            mesh_tls = (ca, (key, cert))
        yield Stack(home, ports, pids, token, api_key, exchanged, ca_file, mesh_tls)
    finally:
        subprocess.run([*command, "down"], env=env, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)


def _create_api_key(env: Mapping[str, str]) -> str:
    created = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "keys", "create", "--tenant", "bench", "--role", "user"],
        env=env,
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return str(json.loads(created.stdout.strip().splitlines()[-1])["api_key"])


def _exchange(envoy_port: int, api_key: str, ca_file: Path | None) -> str:
    """The API key's access token, from the public REST mapping of AuthService.CreateAccessToken."""
    scheme = "https" if ca_file else "http"
    request = urllib.request.Request(
        f"{scheme}://127.0.0.1:{envoy_port}/v1/auth:token", data=b"{}", headers={"x-api-key": api_key}, method="POST"
    )
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    with urllib.request.urlopen(request, timeout=10, context=context) as reply:
        return str(json.loads(reply.read())["accessToken"])


def triton_successes(address: str, triton_model: str) -> int:
    with grpc.insecure_channel(address) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=triton_model), timeout=10)
    return sum(int(s.inference_stats.success.count) for s in reply.model_stats)


def _python_load(
    target: str,
    model: str,
    concurrency: int,
    duration: float,
    headers: Mapping[str, str],
    root_certificates: bytes | None,
    client_cert: tuple[bytes, bytes] | None = None,
) -> LoadResult:
    return asyncio.run(
        run_load(
            target,
            model,
            model_inputs(TRITON_NAME.get(model, model) if model == "affine" else model),
            concurrency=concurrency,
            duration=duration,
            warmup=min(1.0, duration / 3),
            metadata=list(headers.items()),
            root_certificates=root_certificates,
            client_cert=client_cert,
        )
    )


def measure(
    stack: Stack, model: str, concurrency: int, path: str, *, duration: float, tool: PerfAnalyzer | None, work: Path
) -> Row:
    triton = stack.address("TRITON_GRPC_PORT")
    triton_model = TRITON_NAME.get(model, model)
    auth = {"authorization": f"Bearer {stack.token}"}
    target, name, headers = {
        "direct": (triton, triton_model, {}),
        "mesh": (stack.address("ENVOY_MESH_PORT"), model, {}),
        "public": (stack.address("ENVOY_PORT"), model, auth),
        "public-key": (stack.address("ENVOY_PORT"), model, {"x-api-key": stack.api_key}),
        "public-token": (stack.address("ENVOY_PORT"), model, {"authorization": f"Bearer {stack.exchanged_token}"}),
        "gateway": (stack.address("ENVOY_PORT"), model, auth),
    }[path]
    # Every path through the public listener speaks TLS when the stack serves it: its cost is measured.
    public = target == stack.address("ENVOY_PORT")
    roots = stack.public_roots if public else None
    client_cert = None
    if path == "mesh" and stack.mesh_tls is not None:
        roots, client_cert = stack.mesh_tls
    meter = CpuMeter(stack.pids)
    before = triton_successes(triton, triton_model)
    meter.start()
    if path == "gateway":
        result = asyncio.run(
            run_unary_load(
                target,
                model,
                GATEWAY_INFER_METHOD,
                gateway_request(model, model_inputs(triton_model if model == "affine" else model)),
                concurrency=concurrency,
                duration=duration,
                warmup=min(1.0, duration / 3),
                metadata=list(headers.items()),
                root_certificates=roots,
            )
        )
        rps, p50, p99, claimed, errors = result.rps, result.p50_ms, result.p99_ms, result.requests, result.errors
    elif tool is not None:
        perf = run_perf(
            tool,
            target,
            name,
            concurrency,
            interval_ms=int(duration * 1000),
            headers=headers,
            work_dir=work,
            ca_file=stack.ca_file if public else None,
        )
        rps, p50, p99, errors = perf.rps, perf.p50_ms, perf.p99_ms, 0
        claimed = int(perf.rps * duration)  # at least one measured window's worth
    else:
        result = _python_load(target, name, concurrency, duration, headers, roots, client_cert)
        rps, p50, p99, claimed, errors = result.rps, result.p50_ms, result.p99_ms, result.requests, result.errors
    meter.stop()
    served = triton_successes(triton, triton_model) - before
    return Row(model, concurrency, path, rps, p50, p99, served, claimed, errors, meter.per_request_us(served))


def run_mesh_bench(
    scenarios: Mapping[str, Sequence[int]], *, duration: float, load: str = "perf", paths: Sequence[str] = PATHS
) -> list[Row]:
    tool = ensure_perf_analyzer() if load == "perf" else None
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="servegrid-mesh-bench-") as scratch:
        work = Path(scratch)
        with running_stack(work / "home") as stack:
            for model, levels in scenarios.items():
                for concurrency in levels:
                    for path in paths:
                        row = measure(stack, model, concurrency, path, duration=duration, tool=tool, work=work)
                        rows.append(row)
                        print(_line(row, _direct(rows, row)), file=sys.stderr, flush=True)
        shutil.rmtree(work, ignore_errors=True)
    return rows


def _direct(rows: Sequence[Row], row: Row) -> Row | None:
    return next((r for r in rows if (r.model, r.concurrency, r.path) == (row.model, row.concurrency, "direct")), None)


def _cpu(row: Row) -> str:
    shown = {k: v for k, v in row.cpu_us.items() if k in ("envoy", "router", "edge", "gateway", "registry", "triton")}
    return " ".join(f"{k} {v:,.0f}" for k, v in shown.items() if not math.isnan(v))


def _line(row: Row, direct: Row | None) -> str:
    ratio = row.rps / direct.rps if direct and direct.rps else math.nan
    added = row.p50_ms - direct.p50_ms if direct else math.nan
    check = "ok" if row.verified else f"UNVERIFIED (Triton served {row.served} of {row.claimed}, {row.errors} errors)"
    return (
        f"{row.model:9} c={row.concurrency:<3} {row.path:12} {row.rps:9,.1f} req/s  x{ratio:4.2f}  "
        f"p50 {row.p50_ms:7.2f} ms (+{added:5.2f})  p99 {row.p99_ms:7.2f} ms  cpu us/req: {_cpu(row)}  [{check}]"
    )


def format_table(rows: Sequence[Row]) -> str:
    lines = [
        "| model | c | path | req/s | vs direct | p50 added ms | p99 ms | CPU µs/request (by process) | served |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        direct = _direct(rows, row)
        ratio = row.rps / direct.rps if direct and direct.rps else math.nan
        added = row.p50_ms - direct.p50_ms if direct else math.nan
        lines.append(
            f"| {row.model} | {row.concurrency} | {row.path} | {row.rps:,.0f} | {ratio:.2f} | {added:+.2f} | "
            f"{row.p99_ms:.1f} | {_cpu(row)} | {'yes' if row.verified else 'NO'} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.mesh_bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="affine at c=8 only, short windows")
    parser.add_argument("--duration", type=float, default=5.0, help="measured seconds per path")
    # perf_analyzer 2.41 gives up through Envoy ("failed to find the requested model version") on the
    # renamed `affine`, so the Python generator is the default; `perf` works for same-name models.
    parser.add_argument("--load", choices=["perf", "python"], default="python", help="load tool for KServe paths")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    scenarios = QUICK if args.quick else SCENARIOS
    rows = run_mesh_bench(scenarios, duration=2.0 if args.quick else args.duration, load=args.load)
    print(format_table(rows))
    print(f"\ntargets: {TARGETS}")
    if args.json:
        args.json.write_text(json.dumps([row.__dict__ for row in rows], indent=2))
    return 0 if all(row.verified for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
