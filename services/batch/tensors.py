"""Batch items as KServe v2 requests, and packing several items into one batched request.

The tensor codec itself is services/runtime/tensors.py, shared with the gateway."""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from servegrid.common.v1 import tensor_pb2
from tritonclient.grpc import service_pb2

from services.runtime.tensors import from_infer_output, split_bytes, to_raw


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
        from_infer_output(out, raw) for out, raw in zip(response.outputs, response.raw_output_contents, strict=True)
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
            elements = split_bytes(raw)
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
