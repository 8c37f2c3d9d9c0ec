"""The edge bench runs end to end (briefly) and reports every path with its ratio to direct Triton."""

from __future__ import annotations

import pytest

from bench.edge_bench import format_summary, run_edge_bench
from services.stack.triton import TritonInstance

pytestmark = pytest.mark.integration


def test_edge_bench_measures_all_three_paths(triton: TritonInstance) -> None:
    summary = run_edge_bench(models=["affine"], duration=0.5, warmup=0.3, triton_address=triton.grpc_address)
    paths = summary["affine"]["paths"]
    assert set(paths) == {"direct", "kserve", "gateway"}
    for path, row in paths.items():
        assert row["errors"] == 0 and row["rps"] > 0, (path, row)
    assert paths["direct"]["ratio_to_direct"] == 1.0
    assert "rps>=1000" in summary["affine"]["targets"]
    assert "gateway" in format_summary({"affine": summary["affine"]})
