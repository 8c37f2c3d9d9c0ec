"""Property-based checks of the tensor codec: friendly tensors ↔ KServe v2 raw contents, and JSON → items.

The gateway (real-time Infer) and batch (CreateBatchJob) share one codec (services/runtime/tensors.py);
these properties hold for every tensor hypothesis can build, not only the hand-picked cases of
test_runtime_tensors.py: the stored batch item carries exactly the raw contents Infer sends, reading them
back gives the tensor again, and no input, however malformed, escapes as anything but a clear refusal
— on both paths alike.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from servegrid.batch.v1 import batch_pb2
from servegrid.common.v1 import tensor_pb2
from tritonclient.grpc import service_pb2

from services.batch.intake import storable_items
from services.batch.tensors import item_request, response_tensors
from services.runtime import tensors as codec
from services.runtime.errors import InvalidArgument

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SPECS = codec.DATATYPES


def _elements(datatype: str) -> st.SearchStrategy[Any]:
    spec = SPECS[datatype]
    if datatype == "BOOL":
        return st.booleans()
    if datatype == "BYTES":
        return st.binary(max_size=8)
    if datatype in ("FP16", "FP32", "FP64"):
        width = {"FP16": 16, "FP32": 32, "FP64": 64}[datatype]
        return st.floats(width=width, allow_nan=False)  # type: ignore[arg-type]
    assert spec.dtype is not None
    info = np.iinfo(spec.dtype)
    return st.integers(int(info.min), int(info.max))


@st.composite
def valid_tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    datatype = draw(st.sampled_from(sorted(SPECS)))
    shape = draw(st.lists(st.integers(0, 4), min_size=1, max_size=3))
    values = draw(st.lists(_elements(datatype), min_size=math.prod(shape), max_size=math.prod(shape)))
    tensor = tensor_pb2.Tensor(name="x", datatype=datatype, shape=shape)
    getattr(tensor.data, SPECS[datatype].field).extend(values)
    return tensor


@FAST
@given(valid_tensors())
def test_a_stored_batch_item_carries_what_infer_sends(tensor: tensor_pb2.Tensor) -> None:
    inputs, raw = codec.to_infer_inputs([tensor])
    stored = item_request([tensor])
    assert list(stored.raw_input_contents) == raw
    assert (stored.inputs[0].datatype, list(stored.inputs[0].shape)) == (inputs[0].datatype, list(inputs[0].shape))


@FAST
@given(valid_tensors())
def test_raw_contents_read_back_as_the_same_tensor(tensor: tensor_pb2.Tensor) -> None:
    _, raw = codec.to_infer_inputs([tensor])
    output = service_pb2.ModelInferResponse.InferOutputTensor(name="x", datatype=tensor.datatype, shape=tensor.shape)
    field = SPECS[tensor.datatype].field
    expected = list(getattr(tensor.data, field))
    response = service_pb2.ModelInferResponse(outputs=[output], raw_output_contents=raw)
    for decoded in (codec.from_infer_output(output, raw[0]), response_tensors(response)[0]):
        assert list(decoded.shape) == list(tensor.shape)
        assert list(getattr(decoded.data, field)) == expected


_DATATYPE_NAMES = st.sampled_from([*sorted(SPECS), "FLOAT", "", "fp32", "INT128"])
_DIMS = st.integers(-3, 5) | st.sampled_from([2**31 - 1, 2**16 + 1, -(2**31)])  # Tensor.shape is int32


@st.composite
def any_tensors(draw: st.DrawFn) -> tensor_pb2.Tensor:
    """Whatever a careless or hostile client can put in a Tensor message."""
    tensor = tensor_pb2.Tensor(
        name=draw(st.text(max_size=4) | st.just("x" * 300)),
        datatype=draw(_DATATYPE_NAMES),
        shape=draw(st.lists(_DIMS, max_size=4)),
    )
    field = draw(st.sampled_from(["bool", "int32", "int64", "uint32", "uint64", "fp32", "fp64", "bytes"]))
    element = {
        "bool": st.booleans(),
        "int32": st.integers(-(2**31), 2**31 - 1),
        "int64": st.integers(-(2**63), 2**63 - 1),
        "uint32": st.integers(0, 2**32 - 1),
        "uint64": st.integers(0, 2**64 - 1),
        "fp32": st.floats(width=32),
        "fp64": st.floats(),
        "bytes": st.binary(max_size=4),
    }[field]
    getattr(tensor.data, field).extend(draw(st.lists(element, max_size=6)))
    return tensor


@FAST
@given(any_tensors())
def test_any_tensor_is_accepted_or_refused_with_a_named_field(tensor: tensor_pb2.Tensor) -> None:
    try:
        codec.to_infer_inputs([tensor])
        infer_ok = True
    except codec.TensorError as error:
        assert error.violations and all(f.startswith("inputs") for f, _ in error.violations)
        infer_ok = False
    # The same tensor in a batch job: refused exactly when Infer refuses it, naming the same field.
    job = batch_pb2.CreateBatchJobRequest(
        tenant="t",
        model_id="m",
        idempotency_key="k",
        items=batch_pb2.BatchItems(items=[batch_pb2.BatchItem(inputs=[tensor])]),
    )
    try:
        storable_items(job, max_inline=10, max_items=10)
        batch_ok = True
    except InvalidArgument as error:
        assert error.field_violations[0][0].startswith("items.items[0].inputs[0]")
        batch_ok = False
    assert batch_ok == infer_ok


_JSON_KEYS = st.sampled_from(["inputs", "name", "datatype", "shape", "data", "fp32", "int32", "bytes", "itemId", "x"])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_JSON_KEYS, children, max_size=4),
    max_leaves=12,
)


def _job(ndjson: bytes) -> batch_pb2.CreateBatchJobRequest:
    return batch_pb2.CreateBatchJobRequest(tenant="t", model_id="m", idempotency_key="k", items_ndjson=ndjson)


@FAST
@given(st.lists(_JSON, min_size=1, max_size=3))
def test_any_json_lines_are_items_or_an_invalid_argument(lines: list[Any]) -> None:
    ndjson = "\n".join(json.dumps(line) for line in lines).encode()
    try:
        rows = storable_items(_job(ndjson), max_inline=10, max_items=10)
    except InvalidArgument as error:
        assert error.field_violations, error.message
        return
    for _, stored in rows:
        request = service_pb2.ModelInferRequest.FromString(stored)
        assert len(request.inputs) == len(request.raw_input_contents) >= 1


@FAST
@given(st.binary(max_size=64))
def test_any_bytes_as_json_lines_are_items_or_an_invalid_argument(ndjson: bytes) -> None:
    try:
        storable_items(_job(ndjson), max_inline=10, max_items=10)
    except InvalidArgument as error:
        assert error.field_violations, error.message


def test_a_parsed_item_keeps_its_values() -> None:
    # One concrete anchor for the properties above: JSON in, the same numbers in the raw contents.
    item = json_format.Parse(
        '{"inputs": [{"name": "x", "datatype": "INT8", "shape": [2], "data": {"int32": [-128, 127]}}]}',
        batch_pb2.BatchItem(),
    )
    raw = codec.to_raw(item.inputs[0])
    assert np.frombuffer(raw, dtype="<i1").tolist() == [-128, 127]
