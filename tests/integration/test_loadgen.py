"""The load generator against a real Triton: it measures, and it counts errors instead of raising."""

from __future__ import annotations

import numpy as np
import pytest

from bench.loadgen import run_load
from services.stack.triton import TritonInstance

pytestmark = pytest.mark.integration


async def test_load_against_triton_reports_throughput_and_latency(triton: TritonInstance) -> None:
    result = await run_load(
        triton.grpc_address, "affine", {"x": np.ones(4, np.float32)}, concurrency=4, duration=1.0, warmup=0.2
    )
    assert result.errors == 0
    assert result.requests > 50 and result.rps > 50
    assert 0 < result.p50_ms <= result.p99_ms


async def test_failed_requests_are_counted_with_their_status(triton: TritonInstance) -> None:
    result = await run_load(
        triton.grpc_address, "no_such_model", {"x": np.ones(4, np.float32)}, concurrency=2, duration=0.5, warmup=0
    )
    assert result.requests == 0 and result.errors > 0
    assert result.error_samples and result.error_samples[0].startswith("NOT_FOUND")


async def test_unreachable_target_is_a_setup_error_not_a_measurement() -> None:
    with pytest.raises(ConnectionError, match="no gRPC connection"):
        await run_load("127.0.0.1:1", "affine", b"", concurrency=1, duration=0.1, connect_timeout=0.5)
