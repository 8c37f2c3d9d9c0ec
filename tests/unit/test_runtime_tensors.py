"""Friendly tensors ↔ KServe v2 raw contents: every datatype round-trips, bad input names its field."""

from __future__ import annotations

import numpy as np
import pytest
from servegrid.common.v1 import tensor_pb2
from tritonclient.grpc import service_pb2

from services.gateway.identity import identity_from_metadata
from services.runtime.tensors import DATATYPES, TensorError, from_infer_output, to_infer_inputs, to_raw

SAMPLES: dict[str, list[object]] = {
    "BOOL": [True, False, True, True],
    "UINT8": [0, 1, 200, 255],
    "UINT16": [0, 1, 65535, 7],
    "UINT32": [0, 1, 4294967295, 7],
    "UINT64": [0, 1, 2**64 - 1, 7],
    "INT8": [-128, 0, 127, 5],
    "INT16": [-32768, 0, 32767, 5],
    "INT32": [-(2**31), 0, 2**31 - 1, 5],
    "INT64": [-(2**63), 0, 2**63 - 1, 5],
    "FP16": [0.5, -1.0, 2.0, 0.25],
    "FP32": [0.5, -1.5, 2.25, 1e-3],
    "FP64": [0.5, -1.5, 2.25, 1e-300],
    "BYTES": [b"a", b"", b"hello", b"\x00\xff"],
}


def _tensor(datatype: str, values: list[object], shape: list[int] | None = None) -> tensor_pb2.Tensor:
    tensor = tensor_pb2.Tensor(name="x", datatype=datatype, shape=shape or [2, 2])
    getattr(tensor.data, DATATYPES[datatype].field).extend(values)
    return tensor


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_every_datatype_round_trips_through_raw_contents(datatype: str) -> None:
    tensor = _tensor(datatype, SAMPLES[datatype])
    inputs, raw = to_infer_inputs([tensor])
    assert inputs[0].datatype == datatype and list(inputs[0].shape) == [2, 2]
    output = service_pb2.ModelInferResponse.InferOutputTensor(name="x", datatype=datatype, shape=[2, 2])
    back = from_infer_output(output, raw[0])
    assert back == tensor


def test_raw_contents_are_little_endian() -> None:
    assert to_raw(_tensor("FP32", [1.0, 2.0, 3.0, 4.0])) == np.array([1, 2, 3, 4], "<f4").tobytes()
    assert to_raw(_tensor("INT16", [1, 256, -1, 0])) == b"\x01\x00\x00\x01\xff\xff\x00\x00"
    assert to_raw(_tensor("BYTES", [b"ab", b"", b"c", b"d"])) == (
        b"\x02\x00\x00\x00ab" + b"\x00\x00\x00\x00" + b"\x01\x00\x00\x00c" + b"\x01\x00\x00\x00d"
    )


def test_typed_output_contents_are_read_when_raw_is_absent() -> None:
    output = service_pb2.ModelInferResponse.InferOutputTensor(
        name="y", datatype="FP32", shape=[2], contents=service_pb2.InferTensorContents(fp32_contents=[1.5, 2.5])
    )
    assert list(from_infer_output(output, None).data.fp32) == [1.5, 2.5]


@pytest.mark.parametrize(
    ("tensor", "field", "words"),
    [
        (
            tensor_pb2.Tensor(name="x", datatype="FLOAT", shape=[1]),
            "inputs[0].datatype",
            "unknown datatype",
        ),
        (_tensor("FP32", [1.0, 2.0, 3.0], [2, 2]), "inputs[0].shape", "holds 4 elements but data.fp32 has 3"),
        (_tensor("FP32", [1.0], [-1]), "inputs[0].shape", ">= 0"),
        (
            tensor_pb2.Tensor(name="x", datatype="FP32", data=tensor_pb2.TensorData(fp32=[1])),
            "inputs[0].shape",
            "required",
        ),
        (
            tensor_pb2.Tensor(name="x", datatype="FP32", shape=[1], data=tensor_pb2.TensorData(int32=[1])),
            "inputs[0].data",
            "data.fp32",
        ),
        (_tensor("INT8", [1, 2, 3, 300]), "inputs[0].data.int32", "[-128, 127]"),
        (_tensor("UINT8", [1, 2, 3, 256]), "inputs[0].data.uint32", "[0, 255]"),
        (
            tensor_pb2.Tensor(datatype="FP32", shape=[1], data=tensor_pb2.TensorData(fp32=[1])),
            "inputs[0].name",
            "required",
        ),
        (
            tensor_pb2.Tensor(name="x" * 100_000, datatype="FP32", shape=[1], data=tensor_pb2.TensorData(fp32=[1])),
            "inputs[0].name",
            "longer than 256 bytes",
        ),
    ],
)
def test_bad_tensors_name_the_field_to_fix(tensor: tensor_pb2.Tensor, field: str, words: str) -> None:
    with pytest.raises(TensorError) as error:
        to_infer_inputs([tensor])
    assert any(f == field and words in d for f, d in error.value.violations), error.value.violations


def test_duplicate_and_missing_inputs_are_refused() -> None:
    with pytest.raises(TensorError, match="at least one input"):
        to_infer_inputs([])
    one = _tensor("FP32", [1.0, 2.0, 3.0, 4.0])
    with pytest.raises(TensorError, match="given twice"):
        to_infer_inputs([one, one])


def test_identity_comes_only_from_the_envoy_headers() -> None:
    identity = identity_from_metadata(
        [("x-servegrid-tenant", "acme"), ("x-servegrid-subject", "u1"), ("x-servegrid-roles", "user, admin")]
    )
    assert (identity.tenant, identity.subject, identity.roles) == ("acme", "u1", frozenset({"user", "admin"}))
    assert identity_from_metadata([("authorization", "Bearer x")]).anonymous
