"""Wire splicing: model name/version read and replaced without decoding tensors, and the fallback parse."""

from __future__ import annotations

import numpy as np
from tritonclient.grpc import service_pb2

from services.router.wire import encode_head, read_head, replace_head, split_head

parse = service_pb2.ModelInferRequest.FromString


def _request(name: str, version: str = "") -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=name, model_version=version, id="r1")
    request.inputs.add(name="x", datatype="FP32", shape=[4])
    request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
    return request


def test_reads_leading_name_and_version() -> None:
    data = _request("affine", "3").SerializeToString()
    head = read_head(data)
    assert head is not None
    name, version, offset = head
    assert (name, version) == ("affine", "3")
    assert data[:offset] == encode_head("affine", "3")


def test_missing_version_reads_as_empty() -> None:
    head = read_head(_request("digits").SerializeToString())
    assert head is not None and head[:2] == ("digits", "")


def test_replaced_head_parses_as_the_same_request_with_new_names() -> None:
    original = _request("caller-model", "2")
    spliced = replace_head(original.SerializeToString(), encode_head("triton_name", "7"), parse)
    expected = service_pb2.ModelInferRequest()
    expected.CopyFrom(original)
    expected.model_name, expected.model_version = "triton_name", "7"
    assert parse(spliced) == expected


def test_long_names_use_multi_byte_lengths() -> None:
    name = "m" * 300  # length varint needs two bytes
    data = _request(name, "1").SerializeToString()
    head = read_head(data)
    assert head is not None and head[0] == name and head[1] == "1"
    assert parse(encode_head(name, "1")).model_name == name


def test_fields_out_of_order_fall_back_to_a_full_parse() -> None:
    request = _request("affine", "1")
    # A hand-rolled encoder that writes `id` (field 3) first, then the names.
    id_only = service_pb2.ModelInferRequest(id="r1").SerializeToString()
    rest = service_pb2.ModelInferRequest(inputs=request.inputs, raw_input_contents=request.raw_input_contents)
    data = id_only + encode_head("affine", "1") + rest.SerializeToString()
    assert read_head(data) is None
    name, version, body = split_head(data, parse)
    assert (name, version) == ("affine", "1")
    assert parse(body).model_name == "" and parse(body).id == "r1"
    assert parse(replace_head(data, encode_head("other", ""), parse)).model_name == "other"


def test_truncated_message_is_not_misread() -> None:
    data = _request("affine", "1").SerializeToString()
    assert read_head(data[:3]) is None
    assert read_head(b"") is None
