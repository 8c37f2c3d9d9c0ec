"""The gateway's batch RPCs need a verified tenant and relay the batch service's own status."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from google.protobuf import json_format
from servegrid.batch.v1 import batch_pb2, batch_pb2_grpc
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.batch.server import build_app as batch_build_app
from services.batch.settings import BatchSettings
from services.gateway.server import build_app
from services.gateway.settings import GatewaySettings
from services.runtime.errors import status_details
from services.runtime.paging import encode_page_token
from services.stack.kafka import start_broker
from services.stack.ports import free_port
from tests.support.datastores import SessionDatastores
from tests.support.fake_registry import FakeRegistrySettings
from tests.support.fake_registry import build_app as registry_build_app

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def stub() -> AsyncIterator[gateway_pb2_grpc.GatewayServiceStub]:
    dead = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(
        port=0, metrics_port=None, use_uvloop=False, inference_address=dead, registry_address=dead, batch_address=dead
    )
    app = build_app(settings)
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield gateway_pb2_grpc.GatewayServiceStub(channel)
    await app.stop()


async def test_a_call_without_a_verified_tenant_is_unauthenticated(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBatchJob(gateway_pb2.GetBatchJobRequest(job_id="j1"), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    _, info = status_details(caught.value.trailing_metadata())
    assert info is not None and info.reason == "TENANT_REQUIRED"


async def test_with_a_tenant_the_call_is_forwarded(stub: gateway_pb2_grpc.GatewayServiceStub) -> None:
    # The batch service is down here, so the forwarded call's own UNAVAILABLE comes back unchanged.
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GetBatchJob(
            gateway_pb2.GetBatchJobRequest(job_id="j1"), timeout=5, metadata=[("x-servegrid-tenant", "acme")]
        )
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


# --- the relay: every status the batch service returns reaches the gateway's caller unchanged ------


@dataclass
class Relay:
    gateway: gateway_pb2_grpc.GatewayServiceStub
    batch: batch_pb2_grpc.BatchServiceStub
    gateway_channel: grpc.aio.Channel


@pytest.fixture(scope="module")
async def relay(tmp_path_factory: pytest.TempPathFactory, datastores: SessionDatastores) -> AsyncIterator[Relay]:
    """A real batch service (PostgreSQL, a broker) behind a real gateway; the stand-in registry knows
    affine and digits at version 1. No worker runs: these calls never need an inference."""
    schema = f"batch_r_{uuid.uuid4().hex[:12]}"
    with start_broker(log_path=tmp_path_factory.mktemp("tansu") / "tansu.log") as broker:
        batch_app = batch_build_app(
            BatchSettings(
                port=0,
                metrics_port=None,
                use_uvloop=False,
                database_url=datastores.database_url,
                db_schema=schema,
                kafka_bootstrap=broker.bootstrap,
                items_topic=f"items-{schema}",
                dlq_topic=f"dlq-{schema}",
                consumer_group=f"workers-{schema}",
                inference_address=f"127.0.0.1:{free_port()}",
            )
        )
        registry_app = registry_build_app(FakeRegistrySettings(port=0, metrics_port=None, use_uvloop=False))
        await batch_app.start()
        await registry_app.start()
        gateway_app = build_app(
            GatewaySettings(
                port=0,
                metrics_port=None,
                use_uvloop=False,
                inference_address=f"127.0.0.1:{free_port()}",
                registry_address=f"127.0.0.1:{registry_app.port}",
                batch_address=f"127.0.0.1:{batch_app.port}",
            )
        )
        await gateway_app.start()
        try:
            async with (
                grpc.aio.insecure_channel(f"127.0.0.1:{gateway_app.port}") as to_gateway,
                grpc.aio.insecure_channel(f"127.0.0.1:{batch_app.port}") as to_batch,
            ):
                yield Relay(
                    gateway_pb2_grpc.GatewayServiceStub(to_gateway),
                    batch_pb2_grpc.BatchServiceStub(to_batch),
                    to_gateway,
                )
        finally:
            await gateway_app.stop()
            await registry_app.stop()
            await batch_app.stop()
            datastores.drop_schema(schema)


TENANT = [("x-servegrid-tenant", "acme")]
ITEM = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": {"fp32": [1, 2, 3, 4]}}]}\n'


def _error(caught: pytest.ExceptionInfo[grpc.aio.AioRpcError]) -> tuple[grpc.StatusCode, str, str]:
    _, info = status_details(caught.value.trailing_metadata())
    return caught.value.code(), caught.value.details() or "", info.reason if info else ""


def _create(**fields: object) -> gateway_pb2.CreateBatchJobRequest:
    base: dict[str, object] = {"model_id": "affine", "idempotency_key": uuid.uuid4().hex, "items_ndjson": ITEM}
    base.update(fields)
    return gateway_pb2.CreateBatchJobRequest(**base)  # type: ignore[arg-type]


async def _both(relay: Relay, method: str, request: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """The same call through the gateway and straight to the batch service (with the tenant field)."""
    with pytest.raises(grpc.aio.AioRpcError) as through:
        await getattr(relay.gateway, method)(request, metadata=TENANT, timeout=10)
    # Same field names, different numbers (the batch request carries the tenant): copy by name.
    fields = json_format.MessageToDict(request, preserving_proto_field_name=True)
    direct_request = json_format.ParseDict({**fields, "tenant": "acme"}, getattr(batch_pb2, type(request).__name__)())
    with pytest.raises(grpc.aio.AioRpcError) as direct:
        await getattr(relay.batch, method)(direct_request, timeout=10)
    return _error(through), _error(direct)


# KServe v2's JSON tensor (values straight in `data`): refused with where the values go, on every hop.
BARE_DATA_LIST = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}\n'


@pytest.mark.parametrize(
    ("method", "request_", "code", "reason"),
    [
        ("GetBatchJob", gateway_pb2.GetBatchJobRequest(job_id=str(uuid.uuid4())), "NOT_FOUND", "JOB_NOT_FOUND"),
        ("GetBatchJob", gateway_pb2.GetBatchJobRequest(job_id="not-a-uuid"), "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        ("CancelBatchJob", gateway_pb2.CancelBatchJobRequest(job_id=str(uuid.uuid4())), "NOT_FOUND", "JOB_NOT_FOUND"),
        ("ListBatchJobs", gateway_pb2.ListBatchJobsRequest(page_size=-1), "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        (
            "ListBatchJobs",
            gateway_pb2.ListBatchJobsRequest(page_token="garbage"),
            "INVALID_ARGUMENT",
            "INVALID_ARGUMENT",
        ),
        ("CreateBatchJob", _create(idempotency_key=""), "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
        ("CreateBatchJob", _create(items_ndjson=b"{not json}\n"), "INVALID_ARGUMENT", "INVALID_ITEM"),
        ("CreateBatchJob", _create(items_ndjson=b'{"inputs": "\xff\xfe"}\n'), "INVALID_ARGUMENT", "INVALID_ITEM"),
        ("CreateBatchJob", _create(items_ndjson=BARE_DATA_LIST), "INVALID_ARGUMENT", "INVALID_ITEM"),
        ("CreateBatchJob", _create(priority=42), "INVALID_ARGUMENT", "INVALID_ARGUMENT"),
    ],
    ids=lambda value: value if isinstance(value, str) else None,
)
async def test_batch_errors_reach_the_caller_unchanged(
    relay: Relay, method: str, request_: Any, code: str, reason: str
) -> None:
    through, direct = await _both(relay, method, request_)
    assert through == direct
    assert (through[0].name, through[2]) == (code, reason)
    assert through[1] and not through[1].startswith("Unexpected")
    if getattr(request_, "items_ndjson", b"") == BARE_DATA_LIST:
        assert through[1].endswith('inputs[0].data takes its values in the list its datatype names: {"fp32": [...]}')


async def test_cancelled_and_reused_jobs_keep_their_status_through_the_gateway(relay: Relay) -> None:
    created = await relay.gateway.CreateBatchJob(_create(idempotency_key="reuse-me"), metadata=TENANT, timeout=10)
    job_id = created.job.job_id
    await relay.gateway.CancelBatchJob(gateway_pb2.CancelBatchJobRequest(job_id=job_id), metadata=TENANT, timeout=10)
    retried, _ = await _both(relay, "RetryBatchJob", gateway_pb2.RetryBatchJobRequest(job_id=job_id))
    assert (retried[0], retried[2]) == (grpc.StatusCode.FAILED_PRECONDITION, "JOB_NOT_RETRYABLE")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await relay.gateway.CreateBatchJob(
            _create(idempotency_key="reuse-me", model_id="digits"), metadata=TENANT, timeout=10
        )
    assert _error(caught)[::2] == (grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [({"model_id": "no-such-model"}, "MODEL_NOT_FOUND"), ({"version": 7}, "VERSION_NOT_FOUND")],
)
async def test_a_job_for_a_model_nobody_serves_is_refused_at_submit(
    relay: Relay, fields: dict[str, object], reason: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await relay.gateway.CreateBatchJob(_create(**fields), metadata=TENANT, timeout=10)
    assert _error(caught)[::2] == (grpc.StatusCode.NOT_FOUND, reason)
    jobs = await relay.batch.ListBatchJobs(batch_pb2.ListBatchJobsRequest(tenant="acme", page_size=500), timeout=10)
    assert all(job.model_id != fields.get("model_id", "affine") or job.version != 7 for job in jobs.jobs)


async def test_undecodable_infer_is_invalid_argument(relay: Relay) -> None:
    # Infer is a passthrough method (no per-call metrics wrapper); it keeps the malformed-request check.
    call = relay.gateway_channel.unary_unary("/servegrid.gateway.v1.GatewayService/Infer")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call(b"\x0a\xff\xff\xff", timeout=5)
    assert _error(caught)[::2] == (grpc.StatusCode.INVALID_ARGUMENT, "MALFORMED_REQUEST")


async def test_a_results_page_token_is_bound_to_the_job_and_the_state_filter(relay: Relay) -> None:
    created = await relay.gateway.CreateBatchJob(_create(), metadata=TENANT, timeout=10)
    job_id = created.job.job_id
    failed = batch_pb2.BATCH_ITEM_STATE_FAILED
    # A token as the FAILED-only listing of this job would issue it (the layout is not secret; the
    # binding is what is checked), replayed against the unfiltered listing and another job.
    token = encode_page_token(0, {"list": "results", "tenant": "acme", "job": job_id, "state": failed})
    ok = await relay.gateway.ListBatchJobResults(
        gateway_pb2.ListBatchJobResultsRequest(job_id=job_id, page_token=token, state=failed),
        metadata=TENANT,
        timeout=10,
    )
    assert list(ok.results) == []
    for request in (
        gateway_pb2.ListBatchJobResultsRequest(job_id=job_id, page_token=token),
        gateway_pb2.ListBatchJobResultsRequest(job_id=str(uuid.uuid4()), page_token=token, state=failed),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await relay.gateway.ListBatchJobResults(request, metadata=TENANT, timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "different list or filter" in (caught.value.details() or "")
