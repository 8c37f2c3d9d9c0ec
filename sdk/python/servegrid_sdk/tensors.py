"""numpy arrays ↔ servegrid.common.v1.Tensor, the friendly typed tensor of the public API."""

from __future__ import annotations

import numpy as np
from servegrid.common.v1 import tensor_pb2

# KServe v2 datatype → (numpy dtype, TensorData field that carries it).
_BY_DATATYPE: dict[str, tuple[np.dtype, str]] = {
    "BOOL": (np.dtype(np.bool_), "bool"),
    "INT8": (np.dtype(np.int8), "int32"),
    "INT16": (np.dtype(np.int16), "int32"),
    "INT32": (np.dtype(np.int32), "int32"),
    "INT64": (np.dtype(np.int64), "int64"),
    "UINT8": (np.dtype(np.uint8), "uint32"),
    "UINT16": (np.dtype(np.uint16), "uint32"),
    "UINT32": (np.dtype(np.uint32), "uint32"),
    "UINT64": (np.dtype(np.uint64), "uint64"),
    "FP16": (np.dtype(np.float16), "fp32"),
    "FP32": (np.dtype(np.float32), "fp32"),
    "FP64": (np.dtype(np.float64), "fp64"),
    "BYTES": (np.dtype(np.object_), "bytes"),
}
_BY_DTYPE = {dtype: name for name, (dtype, _) in _BY_DATATYPE.items() if name != "BYTES"}


def to_tensor(name: str, array: np.ndarray | list[object]) -> tensor_pb2.Tensor:
    """Wrap an array as a named Tensor; the datatype follows the array's dtype."""
    arr = np.asarray(array)
    values: list[object]
    if arr.dtype.kind in ("U", "S", "O"):
        datatype = "BYTES"
        values = [v if isinstance(v, bytes) else str(v).encode() for v in arr.reshape(-1)]
    elif arr.dtype in _BY_DTYPE:
        datatype = _BY_DTYPE[arr.dtype]
        values = arr.reshape(-1).tolist()
    else:
        raise TypeError(f"tensor {name!r}: numpy dtype {arr.dtype} has no KServe v2 datatype")
    tensor = tensor_pb2.Tensor(name=name, datatype=datatype, shape=list(arr.shape))
    getattr(tensor.data, _BY_DATATYPE[datatype][1]).extend(values)
    return tensor


def from_tensor(tensor: tensor_pb2.Tensor) -> np.ndarray:
    """The Tensor's elements as an array of its shape and datatype."""
    try:
        dtype, field = _BY_DATATYPE[tensor.datatype]
    except KeyError:
        raise ValueError(f"tensor {tensor.name!r}: unknown datatype {tensor.datatype!r}") from None
    values = list(getattr(tensor.data, field))
    return np.array(values, dtype=dtype).reshape(tuple(tensor.shape))
