"""Batch service core pieces without any server: tensor packing, intake validation, progress, page tokens, retries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from servegrid.batch.v1 import batch_pb2
from servegrid.common.v1 import tensor_pb2
from tritonclient.grpc import service_pb2

from services.batch.intake import new_job, storable_items
from services.batch.outbox import context_from_headers, context_headers, encode_chunk
from services.batch.progress import RateWindow, eta_seconds
from services.batch.store import DueChunk, Job, retry_plan
from services.batch.tensors import ModelShape, item_request, make_packs, response_tensors, unpack_response
from services.batch.worker import decode_chunk
from services.runtime.errors import InvalidArgument

DIGITS = ModelShape(max_batch_size=128, input_dims={"pixels": (64,)})


def fp32(name: str, shape: list[int], values: list[float]) -> tensor_pb2.Tensor:
    return tensor_pb2.Tensor(name=name, datatype="FP32", shape=shape, data=tensor_pb2.TensorData(fp32=values))


def digits_item(seed: int, shape: list[int] | None = None) -> service_pb2.ModelInferRequest:
    return item_request([fp32("pixels", shape or [1, 64], [float(seed)] * 64)])


# The codec itself (round trips, field paths of refusals) is tested with it: test_runtime_tensors.py
# and test_tensor_properties.py.


def test_items_pack_up_to_the_limit_and_unpack_in_order() -> None:
    items = [(i, digits_item(i)) for i in range(10)]
    packs = make_packs(items, DIGITS, pack_size=4)
    assert [p.indices for p in packs] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert list(packs[0].request.inputs[0].shape) == [4, 64]
    assert packs[0].request.raw_input_contents[0] == b"".join(r.raw_input_contents[0] for _, r in items[:4])

    response = service_pb2.ModelInferResponse()
    response.outputs.add(name="label", datatype="INT64", shape=[2, 1])
    response.raw_output_contents.append(np.array([[8], [9]], dtype="<i8").tobytes())
    per_item = unpack_response(packs[2], response)
    labels = [response_tensors(r)[0] for r in per_item]
    assert [list(t.data.int64) for t in labels] == [[8], [9]]
    assert [list(t.shape) for t in labels] == [[1, 1], [1, 1]]


def test_max_batch_size_caps_the_pack() -> None:
    small = ModelShape(max_batch_size=3, input_dims={"pixels": (64,)})
    assert [len(p.indices) for p in make_packs([(i, digits_item(i)) for i in range(7)], small, 64)] == [3, 3, 1]


def test_a_wrong_shape_is_sent_alone_for_the_model_to_judge() -> None:
    items = [(0, digits_item(0)), (1, item_request([fp32("pixels", [1, 63], [0.0] * 63)])), (2, digits_item(2))]
    packs = make_packs(items, DIGITS, 64)
    alone = [p for p in packs if not p.packed]
    assert [p.indices for p in alone] == [[1]]
    assert list(alone[0].request.inputs[0].shape) == [1, 63]
    assert sorted(i for p in packs if p.packed for i in p.indices) == [0, 2]


def test_per_item_shapes_without_the_leading_one_pack_too() -> None:
    packs = make_packs([(0, digits_item(0, [64])), (1, digits_item(1, [64]))], DIGITS, 64)
    assert len(packs) == 1 and list(packs[0].request.inputs[0].shape) == [2, 64]


def test_unbatched_models_get_one_item_per_request() -> None:
    affine = ModelShape(max_batch_size=0, input_dims={"x": (4,)})
    items = [(i, item_request([fp32("x", [4], [1.0] * 4)])) for i in range(3)]
    assert [(p.indices, p.packed) for p in make_packs(items, affine, 64)] == [([0], False), ([1], False), ([2], False)]


def create(**fields: object) -> batch_pb2.CreateBatchJobRequest:
    base: dict[str, object] = {"tenant": "t", "model_id": "digits", "idempotency_key": "k"}
    base.update(fields)
    return batch_pb2.CreateBatchJobRequest(**base)  # type: ignore[arg-type]


def test_ndjson_and_inline_items_store_the_same_bytes() -> None:
    item = batch_pb2.BatchItem(item_id="a", inputs=[fp32("pixels", [1, 2], [1.0, 2.0])])
    tensor = b'{"name": "pixels", "datatype": "FP32", "shape": [1, 2], "data": {"fp32": [1, 2]}}'
    line = b'{"itemId": "a", "inputs": [' + tensor + b"]}"
    inline = storable_items(create(items=batch_pb2.BatchItems(items=[item])), max_inline=10, max_items=10)
    ndjson = storable_items(create(items_ndjson=line + b"\n\n"), max_inline=10, max_items=10)
    assert inline == ndjson
    assert inline[0][0] == "a"


def test_item_ids_default_to_positions_and_limits_hold() -> None:
    items = [batch_pb2.BatchItem(inputs=[fp32("x", [1], [1.0])]) for _ in range(3)]
    rows = storable_items(create(items=batch_pb2.BatchItems(items=items)), max_inline=10, max_items=10)
    assert [r[0] for r in rows] == ["0", "1", "2"]
    with pytest.raises(InvalidArgument):
        storable_items(create(items=batch_pb2.BatchItems(items=items)), max_inline=2, max_items=10)
    with pytest.raises(InvalidArgument) as error:
        storable_items(create(items_ndjson=b"{not json}"), max_inline=10, max_items=10)
    assert error.value.reason == "INVALID_ITEM"
    with pytest.raises(InvalidArgument) as error:
        good = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": {"fp32": [1]}}]}'
        storable_items(create(items_ndjson=good + b"\n\xff\xfe\n"), max_inline=10, max_items=10)
    assert (error.value.reason, error.value.field_violations[0][0]) == ("INVALID_ITEM", "items_ndjson[line 2]")
    with pytest.raises(InvalidArgument, match="longer than 256"):
        new_job(create(model_id="m" * 300))
    long_name = batch_pb2.BatchItem(inputs=[fp32("x" * 300, [1], [1.0])])
    with pytest.raises(InvalidArgument, match="longer than 256"):
        storable_items(create(items=batch_pb2.BatchItems(items=[long_name])), max_inline=10, max_items=10)


def test_same_request_same_digest_different_request_different_digest() -> None:
    items = batch_pb2.BatchItems(items=[batch_pb2.BatchItem(inputs=[fp32("x", [1], [1.0])])])
    assert new_job(create(items=items)).request_sha256 == new_job(create(items=items)).request_sha256
    assert new_job(create(items=items)).request_sha256 != new_job(create(items=items, priority=3)).request_sha256
    with pytest.raises(InvalidArgument):
        new_job(create(items=items, priority=10))
    with pytest.raises(InvalidArgument):
        new_job(create(items=items, idempotency_key=""))


def test_work_messages_name_items_only() -> None:
    import uuid

    job_id = uuid.uuid4()
    body = encode_chunk(DueChunk(job_id, [4, 5, 6]))
    assert json.loads(body) == {"job_id": str(job_id), "items": [4, 5, 6]}
    assert decode_chunk(body) == (job_id, [4, 5, 6])


def test_work_messages_carry_the_submits_trace_context_and_request_id_in_headers() -> None:

    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = context_headers({"traceparent": traceparent, "baggage": "x=1"}, "rid-1")
    assert headers == [("traceparent", traceparent.encode()), ("x-request-id", b"rid-1")]  # W3C trace context only
    assert context_from_headers(headers) == ({"traceparent": traceparent}, "rid-1")
    assert context_from_headers(None) == ({}, "")  # a message published before the headers existed


def test_rate_window_and_eta() -> None:
    window = RateWindow(window_s=5)
    window.add(0, at=0.0)
    assert window.add(100, at=1.0) == pytest.approx(100.0)
    assert window.add(300, at=2.0) == pytest.approx(150.0)
    job = Job(*([None] * 15))  # type: ignore[arg-type]
    running = job.__class__(
        **{
            **job.__dict__,
            "state": 2,
            "total_items": 1000,
            "succeeded_items": 400,
            "failed_items": 0,
            "cancelled_items": 0,
        }
    )
    assert eta_seconds(running, 100.0) == pytest.approx(6.0)
    assert eta_seconds(running, 0.0) < 0


def test_a_transient_failure_backs_off_doubling_to_the_cap_then_fails_for_good() -> None:
    # (index, code, message) of a round; tries: the attempt each would be (absent: no longer pending).
    transient = [(0, 14, "unavailable"), (1, 14, "unavailable"), (2, 14, "unavailable"), (3, 14, "gone")]
    tries = {0: 1, 1: 3, 2: 5}
    given_up, again = retry_plan(transient, tries, max_attempts=5, backoff_s=0.5, backoff_max_s=1.5)
    assert again == [(0, 0.5), (1, 1.5)]  # 0.5 * 2**2 = 2.0, capped
    assert given_up == [(2, 14, "RETRIES_EXHAUSTED", "failed 5 times; last error: unavailable")]


def test_a_bare_data_list_is_refused_with_where_its_values_go() -> None:
    # KServe v2's JSON puts a tensor's values straight in `data`; servegrid's names the list.
    line = b'{"inputs": [{"name": "x", "datatype": "INT64", "shape": [2], "data": [1, 2]}]}'
    with pytest.raises(InvalidArgument) as error:
        storable_items(create(items_ndjson=b"\n" + line), max_inline=10, max_items=10)
    assert error.value.reason == "INVALID_ITEM"
    hint = 'inputs[0].data takes its values in the list its datatype names: {"int64": [...]}'
    assert str(error.value) == f"line 2: {hint}"
