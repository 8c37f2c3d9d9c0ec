"""The one tensor codec: friendly tensors (servegrid.common.v1.Tensor) ↔ KServe v2 inputs and raw contents.

The gateway (real-time Infer) and batch (CreateBatchJob, stored items and results) use it alike, so
both accept the same tensors, refuse the same ones with the same field paths, and write the same bytes.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from servegrid.common.v1 import tensor_pb2
from tritonclient.grpc import service_pb2

from services.mesh.names import MAX_NAME_BYTES, name_too_long


@dataclass(frozen=True)
class DataType:
    """How one KServe v2 datatype is held in TensorData and laid out on the wire."""

    name: str
    field: str  # the TensorData list that carries it
    dtype: np.dtype[Any] | None  # little-endian wire dtype; None for BYTES
    low: int | None = None  # inclusive range for integers narrower than their list
    high: int | None = None


def _int(name: str, field: str, dtype: str) -> DataType:
    info = np.iinfo(np.dtype(dtype))
    return DataType(name, field, np.dtype(dtype), int(info.min), int(info.max))


DATATYPES: dict[str, DataType] = {
    "BOOL": DataType("BOOL", "bool", np.dtype("?")),
    "UINT8": _int("UINT8", "uint32", "<u1"),
    "UINT16": _int("UINT16", "uint32", "<u2"),
    "UINT32": DataType("UINT32", "uint32", np.dtype("<u4")),
    "UINT64": DataType("UINT64", "uint64", np.dtype("<u8")),
    "INT8": _int("INT8", "int32", "<i1"),
    "INT16": _int("INT16", "int32", "<i2"),
    "INT32": DataType("INT32", "int32", np.dtype("<i4")),
    "INT64": DataType("INT64", "int64", np.dtype("<i8")),
    "FP16": DataType("FP16", "fp32", np.dtype("<f2")),
    "FP32": DataType("FP32", "fp32", np.dtype("<f4")),
    "FP64": DataType("FP64", "fp64", np.dtype("<f8")),
    "BYTES": DataType("BYTES", "bytes", None),
}
_FIELDS = ("bool", "int32", "int64", "uint32", "uint64", "fp32", "fp64", "bytes")
MAX_RANK = 8
# TensorData's float lists are packed repeated fixed-width fields: on the protobuf wire they already
# are little-endian float32/float64 arrays, i.e. exactly KServe v2 raw contents. Moving bytes
# between the two forms through protobuf's C serializer costs nothing per element, where a Python
# or numpy conversion walks every value (a ResNet input has 150,528 of them).
_PACKED_TAGS = {"fp32": (6 << 3) | 2, "fp64": (7 << 3) | 2}
_LITTLE_ENDIAN = sys.byteorder == "little"


class TensorError(ValueError):
    """Input the gateway rejects itself; carries (field, description) violations for BadRequest."""

    def __init__(self, violations: Sequence[tuple[str, str]]) -> None:
        self.violations = list(violations)
        super().__init__("; ".join(f"{f}: {d}" for f, d in self.violations))


def validate(tensor: tensor_pb2.Tensor, where: str) -> list[tuple[str, str]]:
    """Every problem with one input tensor, each as (field path, what to fix)."""
    problems: list[tuple[str, str]] = []
    if not tensor.name:
        problems.append((f"{where}.name", "required: the model input's name"))
    elif name_too_long(tensor.name):
        problems.append((f"{where}.name", f"longer than {MAX_NAME_BYTES} bytes"))
    spec = DATATYPES.get(tensor.datatype)
    if spec is None:
        problems.append(
            (f"{where}.datatype", f"unknown datatype {tensor.datatype!r}; use one of {', '.join(DATATYPES)}")
        )
    if not tensor.shape:
        problems.append((f"{where}.shape", "required: at least one dimension, e.g. [1, 4]"))
    elif len(tensor.shape) > MAX_RANK:
        problems.append((f"{where}.shape", f"at most {MAX_RANK} dimensions"))
    elif any(d < 0 for d in tensor.shape):
        problems.append((f"{where}.shape", f"dimensions must be >= 0, got {list(tensor.shape)}"))
    filled = [f for f in _FIELDS if len(getattr(tensor.data, f))]
    if spec is None:
        return problems
    wrong = [f for f in filled if f != spec.field]
    if wrong:
        problems.append(
            (f"{where}.data", f"datatype {spec.name} takes its elements in data.{spec.field}, not data.{wrong[0]}")
        )
        return problems
    values = getattr(tensor.data, spec.field)
    if tensor.shape and all(d >= 0 for d in tensor.shape) and len(tensor.shape) <= MAX_RANK:
        expected = math.prod(tensor.shape)
        if expected != len(values):
            problems.append(
                (
                    f"{where}.shape",
                    f"shape {list(tensor.shape)} holds {expected} elements but data.{spec.field} has {len(values)}",
                )
            )
    if spec.low is not None and spec.high is not None and len(values):
        array = np.asarray(values, dtype=np.int64)
        if int(array.min()) < spec.low or int(array.max()) > spec.high:
            problems.append(
                (f"{where}.data.{spec.field}", f"{spec.name} elements must be in [{spec.low}, {spec.high}]")
            )
    return problems


def bare_data_hint(document: str) -> str:
    """For JSON that protobuf refused as a request with `inputs`: when a tensor's `data` is a bare list
    (KServe v2's JSON shape), the sentence saying where its values go instead; else ''."""
    try:
        inputs = json.loads(document).get("inputs")
    except (ValueError, AttributeError):
        return ""
    for i, tensor in enumerate(inputs if isinstance(inputs, list) else []):
        if isinstance(tensor, dict) and isinstance(tensor.get("data"), list):
            spec = DATATYPES.get(str(tensor.get("datatype", "")).upper())
            field = spec.field if spec else "fp32"
            return f'inputs[{i}].data takes its values in the list its datatype names: {{"{field}": [...]}}'
    return ""


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _packed_payload(data: tensor_pb2.TensorData) -> bytes:
    """The one packed list in `data` (validated to be the only one filled), as its raw bytes."""
    wire = data.SerializeToString()
    if not wire:
        return b""
    index, length, shift = 1, 0, 0  # skip the one-byte tag, then read the varint length
    while True:
        byte = wire[index]
        index += 1
        length |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return wire[index : index + length]
        shift += 7


def to_raw(tensor: tensor_pb2.Tensor) -> bytes:
    """The tensor's elements as KServe v2 raw contents (little-endian; BYTES length-prefixed)."""
    spec = DATATYPES[tensor.datatype]
    if _LITTLE_ENDIAN and spec.name in ("FP32", "FP64"):
        return _packed_payload(tensor.data)
    values = getattr(tensor.data, spec.field)
    if spec.dtype is None:
        return b"".join(len(v).to_bytes(4, "little") + v for v in values)
    return np.asarray(values, dtype=spec.dtype).tobytes()


def to_infer_inputs(
    inputs: Sequence[tensor_pb2.Tensor],
) -> tuple[list[service_pb2.ModelInferRequest.InferInputTensor], list[bytes]]:
    """Validated inputs as KServe v2 input tensors plus their raw contents; raises TensorError."""
    problems: list[tuple[str, str]] = []
    if not inputs:
        problems.append(("inputs", "required: at least one input tensor"))
    seen: set[str] = set()
    for i, tensor in enumerate(inputs):
        problems += validate(tensor, f"inputs[{i}]")
        if tensor.name in seen:
            problems.append((f"inputs[{i}].name", f"input {tensor.name!r} is given twice"))
        seen.add(tensor.name)
    if problems:
        raise TensorError(problems)
    tensors = [
        service_pb2.ModelInferRequest.InferInputTensor(name=t.name, datatype=t.datatype, shape=t.shape) for t in inputs
    ]
    return tensors, [to_raw(t) for t in inputs]


def split_bytes(raw: bytes) -> list[bytes]:
    """BYTES raw contents (each element length-prefixed, 4 bytes little-endian) as the elements."""
    out: list[bytes] = []
    offset = 0
    while offset + 4 <= len(raw):
        size = int.from_bytes(raw[offset : offset + 4], "little")
        out.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return out


_CONTENTS = {
    "bool": "bool_contents",
    "int32": "int_contents",
    "int64": "int64_contents",
    "uint32": "uint_contents",
    "uint64": "uint64_contents",
    "fp32": "fp32_contents",
    "fp64": "fp64_contents",
    "bytes": "bytes_contents",
}


def from_infer_output(output: service_pb2.ModelInferResponse.InferOutputTensor, raw: bytes | None) -> tensor_pb2.Tensor:
    """One KServe v2 output (raw contents when present, else typed contents) as a friendly tensor."""
    spec = DATATYPES.get(output.datatype)
    if spec is None:
        raise ValueError(f"model returned unsupported datatype {output.datatype!r} for {output.name!r}")
    tensor = tensor_pb2.Tensor(name=output.name, datatype=output.datatype, shape=output.shape)
    if raw is not None and _LITTLE_ENDIAN and spec.name in ("FP32", "FP64"):
        tag = _PACKED_TAGS[spec.field]
        tensor.data.ParseFromString(bytes([tag]) + _varint(len(raw)) + raw if raw else b"")
        return tensor
    target = getattr(tensor.data, spec.field)
    if raw is None:
        target.extend(getattr(output.contents, _CONTENTS[spec.field]))
    elif spec.dtype is None:
        target.extend(split_bytes(raw))
    else:
        array = np.frombuffer(raw, dtype=spec.dtype)
        if spec.name == "FP16":
            array = array.astype(np.float32)
        target.extend(array.tolist())
    return tensor


def from_infer_response(response: service_pb2.ModelInferResponse) -> list[tensor_pb2.Tensor]:
    raw = list(response.raw_output_contents)
    return [from_infer_output(output, raw[i] if i < len(raw) else None) for i, output in enumerate(response.outputs)]
