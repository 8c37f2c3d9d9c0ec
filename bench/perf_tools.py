"""Triton's own load tool, perf_analyzer, installed where a benchmark can run it (`.build/perfvenv`)."""

# perf_analyzer ships in the tritonclient 2.41 wheel (later wheels dropped the binary). It links the
# CUDA runtime even for CPU-only runs (the nvidia-cuda-runtime-cu12 wheel provides it) and Debian's
# libb64. It lives in its own virtualenv because tritonclient 2.41 pins what the project's 2.5x needs.
# A C++ client costs far less CPU per request than a Python one, which matters on a 2-core box where
# the client competes with the servers it measures.

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV = ROOT / ".build" / "perfvenv"
PACKAGES = ("tritonclient[all]==2.41.0", "nvidia-cuda-runtime-cu12")


@dataclass(frozen=True)
class PerfAnalyzer:
    binary: Path
    env: dict[str, str]


def _cuda_lib_dir() -> Path | None:
    found = sorted(VENV.glob("lib/python*/site-packages/nvidia/cuda_runtime/lib"))
    return found[0] if found else None


def ensure_perf_analyzer(install: bool = True) -> PerfAnalyzer | None:
    """The binary and the environment it needs, installing both on first use; None when impossible."""
    binary = VENV / "bin" / "perf_analyzer"
    if not binary.exists() and install:
        print("installing perf_analyzer (tritonclient 2.41) into .build/perfvenv ...", file=sys.stderr, flush=True)
        try:
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
            subprocess.run(
                [str(VENV / "bin" / "pip"), "install", "--quiet", *PACKAGES],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            if not Path("/usr/lib/x86_64-linux-gnu/libb64.so.0d").exists() and shutil.which("apt-get"):
                subprocess.run(["apt-get", "install", "-y", "-q", "libb64-0d"], check=False, capture_output=True)
        except (OSError, subprocess.CalledProcessError) as error:
            print(f"perf_analyzer unavailable ({error}); using the Python load generator", file=sys.stderr)
            return None
    lib = _cuda_lib_dir()
    if not binary.exists() or lib is None:
        return None
    env = {**os.environ, "LD_LIBRARY_PATH": f"{lib}:{os.environ.get('LD_LIBRARY_PATH', '')}"}
    probe = subprocess.run([str(binary), "--help"], env=env, capture_output=True, text=True)
    if "Usage" not in probe.stdout + probe.stderr and "usage" not in (probe.stdout + probe.stderr).lower():
        return None
    return PerfAnalyzer(binary, env)


@dataclass(frozen=True)
class PerfResult:
    rps: float
    p50_ms: float
    p99_ms: float


def run_perf(
    tool: PerfAnalyzer,
    address: str,
    model: str,
    concurrency: int,
    *,
    interval_ms: int,
    headers: dict[str, str] | None = None,
    work_dir: Path,
    ca_file: Path | None = None,
) -> PerfResult:
    """One perf_analyzer run at a fixed concurrency (over TLS verified with `ca_file` when given); raises
    RuntimeError with its output when it fails."""
    report = work_dir / f"perf-{model}-{concurrency}-{os.getpid()}.csv"
    argv = [
        str(tool.binary),
        "-i",
        "grpc",
        "-u",
        address,
        "-m",
        model,
        "-b",
        "1",
        "--concurrency-range",
        f"{concurrency}:{concurrency}",
        "--measurement-interval",
        str(interval_ms),
        "--max-trials",
        "4",
        "-s",
        "25",
        "-f",
        str(report),
    ]
    for key, value in (headers or {}).items():
        argv += ["-H", f"{key}:{value}"]
    if ca_file is not None:
        argv += ["--ssl-grpc-use-ssl", "--ssl-grpc-root-certifications-file", str(ca_file)]
    done = subprocess.run(argv, env=tool.env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 or not report.exists():
        raise RuntimeError(f"perf_analyzer failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    with report.open() as handle:
        row = next(csv.DictReader(handle))
    report.unlink()
    return PerfResult(
        rps=float(row["Inferences/Second"]),
        p50_ms=float(row["p50 latency"]) / 1e3,
        p99_ms=float(row["p99 latency"]) / 1e3,
    )
