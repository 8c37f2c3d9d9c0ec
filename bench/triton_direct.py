"""Baseline: client -> Triton with no servegrid hop, the figures every hop is compared against."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import platform
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.loadgen import LoadResult, run_load

DEFAULT_MODELS = ("affine", "affine_batched", "resnet18")
# ResNet18 runs at tens of requests/s on 2 CPU cores: c=32 would only measure queueing.
DEFAULT_CONCURRENCY: Mapping[str, tuple[int, ...]] = {"resnet18": (1, 4)}
LIGHT_CONCURRENCY = (1, 8, 32)
DEFAULT_DURATION_S = 10.0
DEFAULT_WARMUP_S = 1.0


@dataclass(frozen=True)
class Scenario:
    model: str
    inputs: dict[str, np.ndarray]
    concurrencies: tuple[int, ...]


def model_inputs(model: str) -> dict[str, np.ndarray]:
    """One representative request per model: batch 1 wherever the model has a batch dimension."""
    rng = np.random.default_rng(0)
    if model == "affine":
        return {"x": np.arange(4, dtype=np.float32)}
    if model == "affine_batched":
        return {"x": np.arange(4, dtype=np.float32).reshape(1, 4)}
    if model == "digits":
        return {"pixels": rng.integers(0, 17, (1, 64)).astype(np.float32)}
    if model == "resnet18":
        return {"input": rng.random((1, 3, 224, 224), dtype=np.float32)}
    raise ValueError(f"no benchmark input for model {model!r}")


def scenarios(models: Sequence[str] = DEFAULT_MODELS, concurrency: Sequence[int] | None = None) -> list[Scenario]:
    return [
        Scenario(
            model=model,
            inputs=model_inputs(model),
            concurrencies=tuple(concurrency) if concurrency else DEFAULT_CONCURRENCY.get(model, LIGHT_CONCURRENCY),
        )
        for model in models
    ]


async def measure(
    target: str,
    plan: Sequence[Scenario],
    *,
    duration: float = DEFAULT_DURATION_S,
    warmup: float = DEFAULT_WARMUP_S,
    progress: bool = True,
) -> list[LoadResult]:
    """Run every scenario against a KServe v2 gRPC `target`, one after the other."""
    results = []
    for scenario in plan:
        for concurrency in scenario.concurrencies:
            result = await run_load(
                target, scenario.model, scenario.inputs, concurrency=concurrency, duration=duration, warmup=warmup
            )
            if progress:
                print(f"  {scenario.model} c={concurrency}: {result.rps:,.0f} req/s", file=sys.stderr, flush=True)
            results.append(result)
    return results


def run_direct_triton(
    *,
    models: Sequence[str] = DEFAULT_MODELS,
    concurrency: Sequence[int] | None = None,
    duration: float = DEFAULT_DURATION_S,
    warmup: float = DEFAULT_WARMUP_S,
    target: str | None = None,
) -> list[LoadResult]:
    """Measure `models` on `target`, or on a Triton started here for the run (own ports, own temp dir)."""
    plan = scenarios(models, concurrency)
    if target is not None:
        return _run(measure(target, plan, duration=duration, warmup=warmup))

    # Imported here so that pointing the bench at an existing target needs neither models nor Triton.
    from models.build import build_repository
    from services.stack.triton import start_triton

    with tempfile.TemporaryDirectory(prefix="servegrid-bench-") as scratch:
        repository = build_repository(Path(scratch) / "repository", log=False)
        print("starting Triton ...", file=sys.stderr, flush=True)
        with start_triton(repository, load_models=list(models), state_dir=Path(scratch) / "triton") as triton:
            return _run(measure(triton.grpc_address, plan, duration=duration, warmup=warmup))


def _run(coroutine: Any) -> list[LoadResult]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a project dependency
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


def format_table(
    results: Sequence[LoadResult], baseline: Sequence[LoadResult] | None = None, *, title: str = ""
) -> str:
    """A fixed-width table; with `baseline`, an `x base` column (req/s ratio, matched by model and concurrency)."""
    by_key = {(r.model, r.concurrency): r for r in baseline or ()}
    header = ["model", "conc", "req/s", "p50 ms", "p90 ms", "p99 ms", "errors", "client cpu"]
    if baseline is not None:
        header.append("x base")
    rows = [header]
    for r in results:
        row = [
            r.model,
            str(r.concurrency),
            f"{r.rps:,.0f}",
            f"{r.p50_ms:.2f}",
            f"{r.p90_ms:.2f}",
            f"{r.p99_ms:.2f}",
            str(r.errors),
            f"{r.client_cpu_pct:.0f}%" if not math.isnan(r.client_cpu_pct) else "-",
        ]
        if baseline is not None:
            base = by_key.get((r.model, r.concurrency))
            row.append(f"{r.rps / base.rps:.2f}x" if base and base.rps else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [title] if title else []
    for n, row in enumerate(rows):
        cells = [
            cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_results(path: Path, results: Sequence[LoadResult], **meta: Any) -> None:
    """JSON a later bench can load as its baseline (load_results)."""
    document = {
        "meta": {"created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(), **meta},
        "results": [r.to_dict() for r in results],
    }
    path.write_text(json.dumps(document, indent=2) + "\n")


def load_results(path: Path) -> list[LoadResult]:
    return [LoadResult.from_dict(item) for item in json.loads(path.read_text())["results"]]


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _str_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--duration", type=float, default=DEFAULT_DURATION_S, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=DEFAULT_WARMUP_S, help="unmeasured seconds before each run")
    parser.add_argument(
        "--concurrency",
        type=_int_list,
        help="e.g. 1,8,32 for every model (default: 1,8,32; resnet18 1,4)",
    )
    parser.add_argument("--models", type=_str_list, default=list(DEFAULT_MODELS), help="comma-separated")
    parser.add_argument("--target", help="host:port of a running KServe v2 gRPC endpoint instead of a fresh Triton")
    parser.add_argument("--json", type=Path, help="also write the results here (usable as --baseline)")
    parser.add_argument("--baseline", type=Path, help="results JSON to print an `x base` ratio column against")
    args = parser.parse_args(argv)

    results = run_direct_triton(
        models=args.models,
        concurrency=args.concurrency,
        duration=args.duration,
        warmup=args.warmup,
        target=args.target,
    )
    baseline = load_results(args.baseline) if args.baseline else None
    where = args.target or "a Triton started for this run"
    print(format_table(results, baseline, title=f"direct Triton ({where}), {args.duration:.0f}s per run"))
    if args.json:
        save_results(args.json, results, bench="triton_direct", target=args.target, duration_s=args.duration)
    return 0 if all(r.errors == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
