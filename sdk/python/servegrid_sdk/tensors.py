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


def _as_declared(name: str, values: object, datatype: str) -> np.ndarray:
    """Plain Python values as the model's declared datatype: [[1.0, 2.0]] for an FP32 input is FP32,
    not numpy's default FP64 (which the model would refuse). Never loses information silently."""
    if datatype not in _BY_DATATYPE:
        raise TypeError(f"tensor {name!r}: the model declares unknown datatype {datatype!r}")
    dtype = _BY_DATATYPE[datatype][0]
    if datatype == "BYTES":
        return np.asarray(values, dtype=object)
    raw = np.asarray(values)
    if dtype.kind in "iub" and raw.dtype.kind == "f" and not np.all(np.mod(raw, 1) == 0):
        raise TypeError(f"tensor {name!r}: the model takes {datatype}, and these values are not whole numbers")
    arr = raw.astype(dtype)
    if dtype.kind in "iu" and not np.array_equal(arr, raw):
        raise TypeError(f"tensor {name!r}: values do not fit the model's {datatype}")
    return arr


def to_tensor(name: str, array: np.ndarray | list[object], datatype: str | None = None) -> tensor_pb2.Tensor:
    """Wrap an array as a named Tensor. A numpy array keeps its dtype; plain Python values take
    `datatype` (the model's declared input type) when given, else numpy's default."""
    arr = _as_declared(name, array, datatype) if datatype and not isinstance(array, np.ndarray) else np.asarray(array)
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
