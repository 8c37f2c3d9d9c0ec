"""The SDK's numpy ↔ Tensor conversion keeps values, shapes and datatypes."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf import json_format

from servegrid_sdk import from_tensor, to_tensor


@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.arange(8, dtype=np.float32).reshape(2, 4), "FP32"),
        (np.array([[1, -2], [3, 4]], dtype=np.int64), "INT64"),
        (np.array([1, 2, 250], dtype=np.uint8), "UINT8"),
        (np.array([True, False]), "BOOL"),
        (np.array([0.5, 1.5], dtype=np.float64), "FP64"),
    ],
)
def test_round_trip(array: np.ndarray, datatype: str) -> None:
    tensor = to_tensor("t", array)
    assert tensor.datatype == datatype and list(tensor.shape) == list(array.shape)
    back = from_tensor(tensor)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


def test_bytes_and_json_form() -> None:
    tensor = to_tensor("text", np.array(["hi", "there"], dtype=object))
    assert tensor.datatype == "BYTES" and list(tensor.data.bytes) == [b"hi", b"there"]
    as_json = json_format.MessageToDict(to_tensor("x", np.ones((1, 2), np.float32)))
    assert as_json == {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": {"fp32": [1.0, 1.0]}}


def test_unsupported_dtype_is_a_clear_error() -> None:
    with pytest.raises(TypeError, match="complex"):
        to_tensor("c", np.array([1j]))


def test_plain_values_take_the_declared_datatype_and_never_lose_information() -> None:
    assert to_tensor("x", [[1.0, 2.0]], "FP32").datatype == "FP32"
    assert to_tensor("x", [[1.0, 2.0]]).datatype == "FP64"  # no declaration: numpy's default
    assert list(to_tensor("x", [1.0, 2.0], "INT32").data.int32) == [1, 2]  # whole numbers convert
    assert to_tensor("x", np.array([1.0], np.float64), "FP32").datatype == "FP64"  # an array keeps its dtype
    with pytest.raises(TypeError, match="not whole numbers"):
        to_tensor("x", [0.5], "INT32")
    with pytest.raises(TypeError, match="do not fit"):
        to_tensor("x", [300], "INT8")
    assert list(to_tensor("s", ["a", "b"], "BYTES").data.bytes) == [b"a", b"b"]
