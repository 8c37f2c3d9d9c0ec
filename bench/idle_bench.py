"""What the local stack costs doing nothing: CPU % of one core per process, measured from /proc.

# Run: python -m bench.idle_bench [--settle S] [--window S]   (make bench BENCH=idle; about 100 s)

A whole mesh (`servegrid up`) starts on free ports in a scratch home; after it settles (readiness
probes, first xDS pushes, the broker's group joins), every process tree's CPU is read over a quiet
window. Polling shows up here: a loop that wakes every 100 ms costs a visible share of a core even
when it finds nothing to do. Target: the whole idle stack under 2 % of one core.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from bench.mesh_bench import running_stack
from bench.proc import CpuMeter

TARGET_PERCENT = 2.0


def measure_idle(settle_s: float, window_s: float) -> dict[str, float]:
    """% of one core each process used over `window_s` of an idle stack."""
    with (
        tempfile.TemporaryDirectory(prefix="servegrid-idle-bench-") as scratch,
        running_stack(Path(scratch) / "home") as stack,
    ):
        time.sleep(settle_s)  # the measurement itself: what the stack does while nobody calls it
        meter = CpuMeter(stack.pids)
        meter.start()
        started = time.monotonic()
        time.sleep(window_s)
        used = meter.stop()
        elapsed = time.monotonic() - started
    return {name: 100.0 * seconds / elapsed for name, seconds in used.items()}


def format_table(percent: dict[str, float]) -> str:
    lines = ["| process | % of one core |", "|---|---|"]
    for name, value in sorted(percent.items(), key=lambda item: -item[1]):
        lines.append(f"| {name} | {value:.2f} |")
    lines.append(f"| **all** | **{sum(percent.values()):.2f}** |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_bench", description=__doc__)
    parser.add_argument("--settle", type=float, default=10.0, help="seconds after `up` before measuring")
    # CPU time comes in 10 ms ticks: over 20 s one tick is 0.05 % per process, and ten processes' rounding
    # plus a shared machine's jitter moved 20 s totals of one build by up to 0.6 %; a minute smooths both.
    parser.add_argument("--window", type=float, default=60.0, help="measured seconds")
    args = parser.parse_args(argv)
    percent = measure_idle(args.settle, args.window)
    print(format_table(percent))
    total = sum(percent.values())
    print(f"\ntarget: the idle stack under {TARGET_PERCENT:.0f} % of one core; measured {total:.2f} %")
    return 0 if total < TARGET_PERCENT else 1


if __name__ == "__main__":
    sys.exit(main())
