"""Tenant B reaching for tenant A's batch job, through a real Envoy in front of a gateway and batch service.

Another tenant's job answers exactly as a job that does not exist (NOT_FOUND, JOB_NOT_FOUND, the same
sentence), so a job id tells B nothing, and nothing B does changes A's job. The edge_stack's gateway has
no batch service; this module starts one (PostgreSQL, an in-memory broker, no workers) behind a second
gateway and a second Envoy sharing the stack's edge, registry and control plane."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from google.rpc import code_pb2
from servegrid.batch.v1 import batch_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.mesh import names
from services.stack.kafka import start_broker
from services.stack.ports import free_port
from tests.security import support
from tests.security.support import NO_TRITON, TENANT_A, TENANT_B, Keys, Metadata
from tests.support.edge_stack import EdgeStack, HttpReply, http
from tests.support.envoy import EnvoyProcess
from tests.support.errors import assert_grpc_error, assert_rest_error
from tests.support.processes import ServiceProcess, start_service

pytestmark = pytest.mark.integration

NOT_FOUND = code_pb2.NOT_FOUND
JOB_NOT_FOUND = "JOB_NOT_FOUND"
ITEM = b'{"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": {"fp32": [1, 2, 3, 4]}}]}\n'


def _start_batch(state_dir: Path, database_url: str, schema: str, bootstrap: str) -> ServiceProcess:
    env = {
        "SERVEGRID_BATCH_DATABASE_URL": database_url,
        "SERVEGRID_BATCH_DB_SCHEMA": schema,
        "SERVEGRID_BATCH_KAFKA_BOOTSTRAP": bootstrap,
        "SERVEGRID_BATCH_ITEMS_TOPIC": f"items-{schema}",
        "SERVEGRID_BATCH_DLQ_TOPIC": f"dlq-{schema}",
        "SERVEGRID_BATCH_CONSUMER_GROUP": f"workers-{schema}",
        "SERVEGRID_BATCH_WORKERS": "0",  # no inference here: jobs stay queued
        "SERVEGRID_BATCH_INFERENCE_ADDRESS": NO_TRITON,
        "SERVEGRID_BATCH_USE_UVLOOP": "false",
    }
    return start_service("batch", "services.batch", "SERVEGRID_BATCH_", state_dir, env, timeout_s=60)


@pytest.fixture(scope="module")
def envoy(stack: EdgeStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[EnvoyProcess]:
    """An Envoy whose gateway relays batch calls to a real batch service."""
    state_dir = tmp_path_factory.mktemp("security-batch")
    schema = f"security_batch_{uuid.uuid4().hex[:10]}"
    started: list[ServiceProcess] = []
    with start_broker(log_path=state_dir / "tansu.log") as broker:
        try:
            batch = _start_batch(state_dir, stack.datastores.database_url, schema, broker.bootstrap)
            started.append(batch)
            gateway_env = {
                "SERVEGRID_GATEWAY_INFERENCE_ADDRESS": NO_TRITON,
                "SERVEGRID_GATEWAY_REGISTRY_ADDRESS": stack.registry.address,
                "SERVEGRID_GATEWAY_BATCH_ADDRESS": batch.address,
            }
            gateway = start_service("gateway-batch", "services.gateway", "SERVEGRID_GATEWAY_", state_dir, gateway_env)
            started.append(gateway)
            front = stack.start_envoy("envoy-batch", stack.edge, gateway=gateway.address, mesh_port=free_port())
            yield front
            front.stop()
        finally:
            for process in reversed(started):
                process.stop()
            stack.datastores.drop_schema(schema)


def stub(envoy: EnvoyProcess) -> tuple[grpc.Channel, gateway_pb2_grpc.GatewayServiceStub]:
    channel = grpc.insecure_channel(envoy.address)
    return channel, gateway_pb2_grpc.GatewayServiceStub(channel)


def create(envoy: EnvoyProcess, metadata: Metadata, idempotency_key: str = "") -> gateway_pb2.CreateBatchJobResponse:
    request = gateway_pb2.CreateBatchJobRequest(
        model_id="affine", idempotency_key=idempotency_key or uuid.uuid4().hex, items_ndjson=ITEM
    )
    channel, gateway = stub(envoy)
    with channel:
        reply: gateway_pb2.CreateBatchJobResponse = gateway.CreateBatchJob(request, metadata=list(metadata), timeout=15)
    return reply


@dataclass(frozen=True)
class Job:
    job_id: str
    idempotency_key: str


@pytest.fixture(scope="module")
def job_a(stack: EdgeStack, envoy: EnvoyProcess) -> Job:
    key = uuid.uuid4().hex
    reply = create(envoy, list(support.user(stack, TENANT_A).items()), key)
    assert reply.created and reply.job.tenant == TENANT_A
    return Job(reply.job.job_id, key)


def get_job(envoy: EnvoyProcess, job_id: str, metadata: Metadata) -> batch_pb2.BatchJob:
    channel, gateway = stub(envoy)
    with channel:
        reply = gateway.GetBatchJob(gateway_pb2.GetBatchJobRequest(job_id=job_id), metadata=list(metadata), timeout=10)
    job: batch_pb2.BatchJob = reply.progress.job
    return job


def listed(envoy: EnvoyProcess, metadata: Metadata) -> list[str]:
    channel, gateway = stub(envoy)
    with channel:
        reply = gateway.ListBatchJobs(
            gateway_pb2.ListBatchJobsRequest(page_size=500), metadata=list(metadata), timeout=10
        )
    return [job.job_id for job in reply.jobs]


def every_call(envoy: EnvoyProcess, job_id: str, metadata: Metadata) -> dict[str, grpc.RpcError]:
    """Each job-scoped RPC on `job_id`, unary and streaming: the error each answered with."""
    channel, gateway = stub(envoy)
    options = {"metadata": list(metadata), "timeout": 10}
    calls = {
        "GetBatchJob": lambda: gateway.GetBatchJob(gateway_pb2.GetBatchJobRequest(job_id=job_id), **options),
        "CancelBatchJob": lambda: gateway.CancelBatchJob(gateway_pb2.CancelBatchJobRequest(job_id=job_id), **options),
        "RetryBatchJob": lambda: gateway.RetryBatchJob(gateway_pb2.RetryBatchJobRequest(job_id=job_id), **options),
        "ListBatchJobResults": lambda: gateway.ListBatchJobResults(
            gateway_pb2.ListBatchJobResultsRequest(job_id=job_id), **options
        ),
        "WatchBatchJob": lambda: list(
            gateway.WatchBatchJob(gateway_pb2.WatchBatchJobRequest(job_id=job_id), **options)
        ),
        "StreamBatchJobResults": lambda: list(
            gateway.StreamBatchJobResults(gateway_pb2.StreamBatchJobResultsRequest(job_id=job_id), **options)
        ),
    }
    errors: dict[str, grpc.RpcError] = {}
    with channel:
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as refused:
                call()
            errors[name] = refused.value
    return errors


def assert_not_found(errors: dict[str, grpc.RpcError], job_id: str) -> None:
    for name, error in errors.items():
        message = assert_grpc_error(error, NOT_FOUND, JOB_NOT_FOUND)
        assert job_id in message, (name, message)


# --- the positive control --------------------------------------------------------------------------


def test_the_owner_sees_its_job(stack: EdgeStack, envoy: EnvoyProcess, job_a: Job) -> None:
    owner = list(support.user(stack, TENANT_A).items())
    job = get_job(envoy, job_a.job_id, owner)
    assert (job.job_id, job.tenant, job.model_id) == (job_a.job_id, TENANT_A, "affine")
    assert job_a.job_id in listed(envoy, owner)
    reply = http("GET", f"{envoy.url}/v1/batchJobs/{job_a.job_id}", headers=support.user(stack, TENANT_A))
    assert reply.status == 200, reply.body
    assert reply.json()["progress"]["job"]["jobId"] == job_a.job_id


# --- tenant B -------------------------------------------------------------------------------------


def test_another_tenants_job_is_not_found_on_every_call(stack: EdgeStack, envoy: EnvoyProcess, job_a: Job) -> None:
    assert_not_found(every_call(envoy, job_a.job_id, list(support.user(stack, TENANT_B).items())), job_a.job_id)
    # B's cancel and retry changed nothing (no worker runs: the job stays queued or running).
    job = get_job(envoy, job_a.job_id, list(support.user(stack, TENANT_A).items()))
    running = (batch_pb2.BATCH_JOB_STATE_QUEUED, batch_pb2.BATCH_JOB_STATE_RUNNING)
    assert job.state in running and job.cancelled_items == 0, job


def test_another_tenants_job_reads_exactly_as_a_missing_one(stack: EdgeStack, envoy: EnvoyProcess, job_a: Job) -> None:
    as_b = list(support.user(stack, TENANT_B).items())
    missing = str(uuid.uuid4())
    theirs = every_call(envoy, job_a.job_id, as_b)
    nobodys = every_call(envoy, missing, as_b)

    def shape(error: grpc.RpcError, job_id: str) -> tuple[grpc.StatusCode, str, bytes]:
        details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin", b"")
        assert isinstance(details, bytes)
        return error.code(), (error.details() or "").replace(job_id, "<id>"), details.replace(job_id.encode(), b"<id>")

    assert {n: shape(e, job_a.job_id) for n, e in theirs.items()} == {n: shape(e, missing) for n, e in nobodys.items()}


def test_another_tenants_job_is_not_found_over_rest(stack: EdgeStack, envoy: EnvoyProcess, job_a: Job) -> None:
    as_b = support.user(stack, TENANT_B)
    replies: list[HttpReply] = [
        http("GET", f"{envoy.url}/v1/batchJobs/{job_a.job_id}", headers=as_b),
        http("POST", f"{envoy.url}/v1/batchJobs/{job_a.job_id}:cancel", {}, as_b),
        http("POST", f"{envoy.url}/v1/batchJobs/{job_a.job_id}:retry", {}, as_b),
        http("GET", f"{envoy.url}/v1/batchJobs/{job_a.job_id}/results", headers=as_b),
    ]
    for reply in replies:
        body = assert_rest_error(reply, 404, NOT_FOUND, JOB_NOT_FOUND, {"job_id": job_a.job_id})
        assert job_a.job_id in body["message"]


def test_another_tenants_list_does_not_show_the_job(stack: EdgeStack, envoy: EnvoyProcess, job_a: Job) -> None:
    assert job_a.job_id not in listed(envoy, list(support.user(stack, TENANT_B).items()))
    reply = http("GET", f"{envoy.url}/v1/batchJobs?pageSize=500", headers=support.user(stack, TENANT_B))
    assert reply.status == 200, reply.body
    assert job_a.job_id not in {job["jobId"] for job in reply.json().get("jobs", [])}


def test_another_tenants_api_key_does_not_reach_the_job(envoy: EnvoyProcess, keys: Keys, job_a: Job) -> None:
    assert_not_found(every_call(envoy, job_a.job_id, [("x-api-key", keys.other_tenant)]), job_a.job_id)


@pytest.mark.parametrize("header", [names.TENANT_HEADER, names.TENANT_HEADER.upper()])
def test_b_naming_a_as_its_tenant_does_not_reach_the_job(
    stack: EdgeStack, envoy: EnvoyProcess, job_a: Job, header: str
) -> None:
    spoof = [(header, TENANT_A), (names.ROLES_HEADER, "admin"), (names.SUBJECT_HEADER, "dev-user")]
    reply = support.raw_request(
        envoy, "GET", f"/v1/batchJobs/{job_a.job_id}", [*support.user(stack, TENANT_B).items(), *spoof]
    )
    assert_rest_error(reply, 404, NOT_FOUND, JOB_NOT_FOUND, {"job_id": job_a.job_id})
    if header.islower():  # gRPC metadata keys are lower-case
        metadata = [*support.user(stack, TENANT_B).items(), *spoof]
        assert_not_found(every_call(envoy, job_a.job_id, metadata), job_a.job_id)


def test_a_job_is_created_for_the_verified_tenant_not_a_spoofed_one(stack: EdgeStack, envoy: EnvoyProcess) -> None:
    reply = create(envoy, [*support.user(stack, TENANT_A).items(), (names.TENANT_HEADER, TENANT_B)])
    assert reply.created and reply.job.tenant == TENANT_A
    assert reply.job.job_id not in listed(envoy, list(support.user(stack, TENANT_B).items()))


def test_an_idempotency_key_is_per_tenant(stack: EdgeStack, envoy: EnvoyProcess, job_a: Job) -> None:
    """B reusing A's key makes B's own job: it never returns A's (nor says that A used the key)."""
    reply = create(envoy, list(support.user(stack, TENANT_B).items()), job_a.idempotency_key)
    assert reply.created and reply.job.tenant == TENANT_B
    assert reply.job.job_id != job_a.job_id
