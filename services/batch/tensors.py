"""Friendly tensors ↔ KServe v2 raw tensor contents, and packing several items into one batched request."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from servegrid.common.v1 import tensor_pb2
from tritonclient.grpc import service_pb2

from services.mesh.names import MAX_NAME_BYTES, name_too_long

# KServe v2 datatype -> (numpy dtype, TensorData list that carries it). BYTES is length-prefixed raw.
_NUMERIC: dict[str, tuple[type[np.generic], str]] = {
    "BOOL": (np.bool_, "bool"),
    "UINT8": (np.uint8, "uint32"),
    "UINT16": (np.uint16, "uint32"),
    "UINT32": (np.uint32, "uint32"),
    "UINT64": (np.uint64, "uint64"),
    "INT8": (np.int8, "int32"),
    "INT16": (np.int16, "int32"),
    "INT32": (np.int32, "int32"),
    "INT64": (np.int64, "int64"),
    "FP16": (np.float16, "fp32"),
    "FP32": (np.float32, "fp32"),
    "FP64": (np.float64, "fp64"),
}
DATATYPES = frozenset([*_NUMERIC, "BYTES"])


class TensorError(ValueError):
    """A tensor whose structure is wrong on its own (before any model sees it); `field` names the part."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _field_for(datatype: str) -> str:
    return "bytes" if datatype == "BYTES" else _NUMERIC[datatype][1]


def check_tensor(tensor: tensor_pb2.Tensor, where: str) -> None:
    """Raise TensorError when name, datatype, shape and data do not agree."""
    if not tensor.name:
        raise TensorError(f"{where}.name", "tensor name is required")
    if name_too_long(tensor.name):
        raise TensorError(f"{where}.name", f"tensor name is longer than {MAX_NAME_BYTES} bytes")
    if tensor.datatype not in DATATYPES:
        raise TensorError(f"{where}.datatype", f"unknown datatype {tensor.datatype!r}")
    if any(d < 0 for d in tensor.shape):
        raise TensorError(f"{where}.shape", "dimensions must not be negative")
    expected = math.prod(tensor.shape)
    wanted = _field_for(tensor.datatype)
    for name in ("bool", "int32", "int64", "uint32", "uint64", "fp32", "fp64", "bytes"):
        count = len(getattr(tensor.data, name))
        if name == wanted and count != expected:
            raise TensorError(
                f"{where}.data.{name}", f"shape {list(tensor.shape)} needs {expected} elements, got {count}"
            )
        if name != wanted and count:
            raise TensorError(f"{where}.data.{name}", f"{tensor.datatype} data belongs in data.{wanted}")


def to_raw(tensor: tensor_pb2.Tensor) -> bytes:
    """Little-endian raw contents, as KServe v2 `raw_input_contents` carries them."""
    if tensor.datatype == "BYTES":
        return b"".join(struct.pack("<I", len(b)) + b for b in tensor.data.bytes)
    dtype, field = _NUMERIC[tensor.datatype]
    return np.asarray(getattr(tensor.data, field), dtype=dtype).astype(np.dtype(dtype).newbyteorder("<")).tobytes()


def from_raw(name: str, datatype: str, shape: Sequence[int], raw: bytes) -> tensor_pb2.Tensor:
    """The friendly tensor for raw contents (the inverse of `to_raw`)."""
    tensor = tensor_pb2.Tensor(name=name, datatype=datatype, shape=list(shape))
    if datatype == "BYTES":
        tensor.data.bytes.extend(split_bytes_elements(raw))
        return tensor
    dtype, field = _NUMERIC[datatype]
    values = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<"))
    if field == "bool":
        getattr(tensor.data, field).extend(values.astype(bool).tolist())
    else:
        getattr(tensor.data, field).extend(values.tolist())
    return tensor


def split_bytes_elements(raw: bytes) -> list[bytes]:
    out: list[bytes] = []
    offset = 0
    while offset < len(raw):
        (size,) = struct.unpack_from("<I", raw, offset)
        out.append(raw[offset + 4 : offset + 4 + size])
        offset += 4 + size
    return out


def item_request(inputs: Sequence[tensor_pb2.Tensor]) -> service_pb2.ModelInferRequest:
    """One item's inputs as a KServe request without model name: how an item is stored."""
    request = service_pb2.ModelInferRequest()
    for tensor in inputs:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=list(tensor.shape))
        request.raw_input_contents.append(to_raw(tensor))
    return request


def response_tensors(response: service_pb2.ModelInferResponse) -> list[tensor_pb2.Tensor]:
    """A stored per-item response as friendly tensors."""
    return [
        from_raw(out.name, out.datatype, out.shape, raw)
        for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    ]


@dataclass(frozen=True)
class ModelShape:
    """What packing needs to know about a model: its batch limit and each input's per-item dims."""

    max_batch_size: int
    input_dims: dict[str, tuple[int, ...]]

    @property
    def batched(self) -> bool:
        return self.max_batch_size > 0


@dataclass
class Pack:
    """Items sent in one inference request; `leading_one[i]` says item i spelled its batch dim as [1, ...]."""

    indices: list[int]
    request: service_pb2.ModelInferRequest
    leading_one: list[bool]
    packed: bool


def _dims_match(dims: Sequence[int], declared: Sequence[int]) -> bool:
    return len(dims) == len(declared) and all(d == w or w == -1 for d, w in zip(dims, declared, strict=True))


def per_item_signature(request: service_pb2.ModelInferRequest, model: ModelShape) -> tuple[object, bool] | None:
    """A key shared by items that can be stacked together, and whether the item wrote [1, ...].

    None means the item cannot be packed safely (shape the model does not declare): it is sent alone,
    unchanged, so the model itself judges it and its error becomes that item's failure.
    """
    if not model.batched or set(model.input_dims) != {t.name for t in request.inputs}:
        return None
    parts: list[tuple[str, str, tuple[int, ...]]] = []
    leading: bool | None = None
    for tensor in request.inputs:
        shape = tuple(tensor.shape)
        declared = model.input_dims[tensor.name]
        if _dims_match(shape, declared):
            this_leading = False
        elif len(shape) == len(declared) + 1 and shape[0] == 1 and _dims_match(shape[1:], declared):
            this_leading, shape = True, shape[1:]
        else:
            return None
        if leading is not None and leading != this_leading:
            return None
        leading = this_leading
        parts.append((tensor.name, tensor.datatype, shape))
    return tuple(sorted(parts)), bool(leading)


def make_packs(
    items: Sequence[tuple[int, service_pb2.ModelInferRequest]], model: ModelShape, pack_size: int
) -> list[Pack]:
    """Group items into as few requests as the model allows; the raw contents are concatenated, not decoded."""
    limit = max(1, min(pack_size, model.max_batch_size)) if model.batched else 1
    groups: dict[object, list[tuple[int, service_pb2.ModelInferRequest, bool]]] = {}
    packs: list[Pack] = []
    for index, request in items:
        signature = per_item_signature(request, model)
        if signature is None:
            packs.append(Pack([index], request, [False], packed=False))
            continue
        key, leading = signature
        groups.setdefault(key, []).append((index, request, leading))
    for members in groups.values():
        for start in range(0, len(members), limit):
            chunk = members[start : start + limit]
            first = chunk[0][1]
            batched = service_pb2.ModelInferRequest()
            for position, tensor in enumerate(first.inputs):
                dims = list(tensor.shape[1:]) if chunk[0][2] else list(tensor.shape)
                batched.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=[len(chunk), *dims])
                batched.raw_input_contents.append(b"".join(r.raw_input_contents[position] for _, r, _ in chunk))
            packs.append(Pack([i for i, _, _ in chunk], batched, [lead for _, _, lead in chunk], packed=True))
    return packs


def unpack_response(pack: Pack, response: service_pb2.ModelInferResponse) -> list[service_pb2.ModelInferResponse]:
    """Split a packed response into one response per item (same order as `pack.indices`)."""
    if not pack.packed:
        single = service_pb2.ModelInferResponse()
        single.outputs.extend(
            service_pb2.ModelInferResponse.InferOutputTensor(name=o.name, datatype=o.datatype, shape=list(o.shape))
            for o in response.outputs
        )
        single.raw_output_contents.extend(response.raw_output_contents)
        return [single]
    count = len(pack.indices)
    per_item = [service_pb2.ModelInferResponse() for _ in range(count)]
    for out, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        if not out.shape or out.shape[0] != count:
            raise ValueError(f"output {out.name!r} has shape {list(out.shape)}, expected a batch of {count}")
        item_dims = list(out.shape[1:])
        if out.datatype == "BYTES":
            elements = split_bytes_elements(raw)
            step = math.prod(item_dims)
            slices = [
                b"".join(struct.pack("<I", len(e)) + e for e in elements[i * step : (i + 1) * step])
                for i in range(count)
            ]
        else:
            size = len(raw) // count
            slices = [raw[i * size : (i + 1) * size] for i in range(count)]
        for i, piece in enumerate(slices):
            shape = [1, *item_dims] if pack.leading_one[i] else item_dims
            per_item[i].outputs.add(name=out.name, datatype=out.datatype, shape=shape)
            per_item[i].raw_output_contents.append(piece)
    return per_item
