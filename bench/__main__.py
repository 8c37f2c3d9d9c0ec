"""`python -m bench [SUITE ...] [-- ARGS]` (what `make bench` runs): every servegrid path against direct Triton.

Each suite measures its own direct-Triton baseline in the same run, so its ratios compare like with
like on a shared machine. With no SUITE every suite runs, one after another.
"""

from __future__ import annotations

import importlib
import sys
import time

SUITES = {
    "triton": "bench.triton_direct",  # the baseline: direct Triton, with and without dynamic batching
    "mesh": "bench.mesh_bench",  # Envoy data plane, full public path and gateway vs direct Triton
    "batch": "bench.batch_bench",  # batch items/s vs direct Triton's best
    "registry": "bench.registry_bench",  # cached vs uncached reads, route propagation
    "idle": "bench.idle_bench",  # what the stack costs doing nothing (CPU % per process)
}


def main(argv: list[str]) -> int:
    names = [a for a in argv if not a.startswith("-")] or list(SUITES)
    extra = [a for a in argv if a.startswith("-")]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        print(f"unknown suite(s) {', '.join(unknown)}; choose from {', '.join(SUITES)}", file=sys.stderr)
        return 2
    status = 0
    for name in names:
        print(f"\n=== {name} ({SUITES[name]}) ===", flush=True)
        started = time.monotonic()
        module = importlib.import_module(SUITES[name])
        status |= module.main(extra if len(names) == 1 else [])
        print(f"=== {name}: {time.monotonic() - started:.0f}s ===", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
