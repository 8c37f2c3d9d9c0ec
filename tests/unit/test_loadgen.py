"""Load generator pieces that need no server: request encoding, result round trip, the table."""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import service_pb2

from bench.loadgen import LoadResult, encode_infer_request
from bench.triton_direct import format_table


def test_encoded_request_is_a_kserve_model_infer_request_with_raw_tensors() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    request = service_pb2.ModelInferRequest.FromString(encode_infer_request("affine_batched", {"x": x}, version="1"))
    assert (request.model_name, request.model_version) == ("affine_batched", "1")
    assert [(i.name, i.datatype, list(i.shape)) for i in request.inputs] == [("x", "FP32", [2, 4])]
    np.testing.assert_array_equal(np.frombuffer(request.raw_input_contents[0], np.float32).reshape(2, 4), x)


def _result(model: str, concurrency: int, requests: int) -> LoadResult:
    return LoadResult("t", model, concurrency, 10.0, requests, 0, 1.0, 2.0, 3.0, 1.5, 40.0)


def test_result_survives_a_json_round_trip() -> None:
    result = _result("affine", 8, 25_000)
    assert LoadResult.from_dict(result.to_dict()) == result
    assert result.rps == 2_500


def test_table_prints_ratio_against_a_baseline_matched_by_model_and_concurrency() -> None:
    baseline = [_result("affine", 1, 20_000), _result("affine", 8, 50_000)]
    table = format_table([_result("affine", 8, 20_000), _result("resnet18", 1, 600)], baseline)
    lines = table.splitlines()
    assert lines[0].split()[-1] == "base"
    assert lines[2].endswith("0.40x")  # 2,000 vs 5,000 req/s
    assert lines[3].endswith("-")  # no baseline for resnet18
