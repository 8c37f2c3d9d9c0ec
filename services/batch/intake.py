"""Turns a CreateBatchJobRequest into validated, storable items (structure only; the model judges the rest)."""

from __future__ import annotations

from collections.abc import Iterator

from google.protobuf import json_format
from servegrid.batch.v1 import batch_pb2

from services.batch.store import NewJob, request_digest
from services.batch.tensors import item_request
from services.mesh.names import MAX_NAME_BYTES, name_too_long
from services.runtime.errors import InvalidArgument
from services.runtime.tensors import bare_data_hint, validate

MAX_PRIORITY = 9
MAX_IDEMPOTENCY_KEY = 200


def _invalid(message: str, field: str, reason: str = "INVALID_ARGUMENT") -> InvalidArgument:
    return InvalidArgument(message, reason=reason, field_violations=[(field, message)])


def new_job(
    request: batch_pb2.CreateBatchJobRequest, trace_context: dict[str, str] | None = None, request_id: str = ""
) -> NewJob:
    """The job to store; `trace_context` and `request_id` are the submitting request's (see NewJob)."""
    if not request.tenant:
        raise _invalid("tenant is required", "tenant")
    if not request.model_id:
        raise _invalid("model_id is required", "model_id")
    if name_too_long(request.model_id):
        raise _invalid(f"model_id is longer than {MAX_NAME_BYTES} bytes", "model_id", "NAME_TOO_LONG")
    if not request.idempotency_key or len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY:
        raise _invalid(f"idempotency_key is required, at most {MAX_IDEMPOTENCY_KEY} characters", "idempotency_key")
    if not 0 <= request.priority <= MAX_PRIORITY:
        raise _invalid(f"priority must be 0..{MAX_PRIORITY}", "priority")
    if request.version < 0:
        raise _invalid("version must not be negative", "version")
    return NewJob(
        tenant=request.tenant,
        idempotency_key=request.idempotency_key,
        model_id=request.model_id,
        version=request.version,
        priority=request.priority,
        labels=dict(request.labels),
        # Deterministic bytes: the same request sent twice hashes the same, a different one does not.
        request_sha256=request_digest(request.SerializeToString(deterministic=True)),
        trace_context=dict(trace_context or {}),
        request_id=request_id,
    )


def _ndjson_items(payload: bytes) -> Iterator[tuple[int, batch_pb2.BatchItem]]:
    for line_no, line in enumerate(payload.splitlines(), start=1):
        if not line.strip():
            continue
        item = batch_pb2.BatchItem()
        field_name = f"items_ndjson[line {line_no}]"
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as error:
            message = f"line {line_no}: not UTF-8 (byte {error.start + 1} of the line); JSON Lines must be UTF-8"
            raise _invalid(message, field_name, "INVALID_ITEM") from error
        try:
            json_format.Parse(text, item)
        except json_format.ParseError as error:
            hint = bare_data_hint(text)
            message = f"line {line_no}: {hint}" if hint else f"line {line_no}: {error}"
            raise _invalid(message, field_name, "INVALID_ITEM") from error
        yield line_no, item


def storable_items(
    request: batch_pb2.CreateBatchJobRequest, *, max_inline: int, max_items: int
) -> list[tuple[str, bytes]]:
    """(item_id, stored ModelInferRequest bytes) per item, in job order; raises INVALID_ARGUMENT/INVALID_ITEM."""
    source = request.WhichOneof("source")
    if source == "items":
        if len(request.items.items) > max_inline:
            raise _invalid(f"at most {max_inline} inline items; use items_ndjson", "items.items")
        entries: Iterator[tuple[int, batch_pb2.BatchItem]] = enumerate(request.items.items)
        where = "items.items[{}]"
    elif source == "items_ndjson":
        entries = _ndjson_items(request.items_ndjson)
        where = "items_ndjson[line {}]"
    else:
        raise _invalid("items or items_ndjson is required", "source")
    rows: list[tuple[str, bytes]] = []
    for position, item in entries:
        index = len(rows)
        if index >= max_items:
            raise _invalid(f"at most {max_items} items per job", "source")
        label = where.format(position)
        if not item.inputs:
            raise _invalid("an item needs at least one input", f"{label}.inputs", "INVALID_ITEM")
        for j, tensor in enumerate(item.inputs):
            # The same rules as real-time Infer (one codec): the first problem, naming its field.
            if problems := validate(tensor, f"{label}.inputs[{j}]"):
                field, message = problems[0]
                raise _invalid(message, field, "INVALID_ITEM")
        rows.append((item.item_id or str(index), item_request(item.inputs).SerializeToString()))
    if not rows:
        raise _invalid("a job needs at least one item", "source")
    return rows
