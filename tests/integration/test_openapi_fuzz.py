"""The OpenAPI document against the REST API it describes, through a real Envoy: served without a credential,
and schemathesis-generated requests for its operations answered with no 5xx and in the documented shape."""

# The stack is tests/support/edge_stack.py (edge, gateway, stand-in registry, router, Envoy) plus the real
# registry on its own PostgreSQL schema, a gateway reading it and a second Envoy in front of both: every
# fuzzed request meets real services (the stand-in registry answers only what gateway tests need).
# Bounded for CI: a fixed, derandomized number of examples per operation, valid and invalid ones mixed
# (EXAMPLES=15: ~350 requests, about 10 s here; 300 per operation, random, found nothing more).

from __future__ import annotations

import contextlib
import re
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.mesh import api_docs
from services.stack.ports import free_port
from tests.support.datastores import SessionDatastores
from tests.support.edge_stack import EdgeStack, edge_stack, http
from tests.support.envoy import EnvoyProcess
from tests.support.errors import assert_rest_error
from tests.support.processes import start_service

pytestmark = pytest.mark.integration

NO_TRITON = "127.0.0.1:1"  # no inference reaches a model here (the fuzzed model ids are not served)
TENANT = f"fuzz-{secrets.token_hex(3)}"
EXAMPLES = 15
# What a gRPC metadata key may be. Invalid requests come with made-up headers; a name HTTP allows but gRPC
# does not is a known 500 (test_a_header_name_grpc_cannot_carry_is_a_client_error), so the fuzzing leaves
# such names out and looks for other faults.
GRPC_KEY = re.compile(r"[0-9a-z_.-]+")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Operations not fuzzed here, and why.
NOT_FUZZED = {
    # Server streams never end while the watched thing lives; schemathesis reads whole responses.
    "GatewayService_WatchBatchJob": "server stream",
    "GatewayService_StreamBatchJobResults": "server stream",
    "RegistryService_WatchRoutes": "server stream",
    # This stack runs no batch service: every well-formed call is UNAVAILABLE (503) by construction.
    "GatewayService_CreateBatchJob": "no batch service in this stack",
    "GatewayService_GetBatchJob": "no batch service in this stack",
    "GatewayService_ListBatchJobs": "no batch service in this stack",
    "GatewayService_CancelBatchJob": "no batch service in this stack",
    "GatewayService_RetryBatchJob": "no batch service in this stack",
    "GatewayService_ListBatchJobResults": "no batch service in this stack",
}


def _operations() -> list[tuple[str, str, str]]:
    """(operationId, verb, path) of every operation in the committed document, in document order."""
    document = api_docs.openapi_document()
    return [(op["operationId"], verb, path) for path, verbs in document["paths"].items() for verb, op in verbs.items()]


FUZZED = [op for op in _operations() if op[0] not in NOT_FUZZED]


@dataclass
class FuzzStack:
    edge: EdgeStack
    envoy: EnvoyProcess  # in front of the real registry and a gateway reading it
    api_key: str


@contextlib.contextmanager
def real_registry(stack: EdgeStack) -> Iterator[EnvoyProcess]:
    """The real registry on a fresh schema and Redis prefix and a gateway reading it, behind their own Envoy;
    the schema and keys are dropped afterwards."""
    schema, prefix = f"fuzz_registry_{secrets.token_hex(4)}", f"servegrid:fuzz:{secrets.token_hex(4)}:"
    registry = start_service(
        "registry-real",
        "services.registry",
        "SERVEGRID_REGISTRY_",
        stack.state_dir,
        {
            "SERVEGRID_REGISTRY_DATABASE_URL": stack.datastores.database_url,
            "SERVEGRID_REGISTRY_REDIS_URL": stack.datastores.redis_url,
            "SERVEGRID_REGISTRY_DB_SCHEMA": schema,
            "SERVEGRID_REGISTRY_REDIS_PREFIX": prefix,
            "SERVEGRID_REGISTRY_USE_UVLOOP": "false",
        },
    )
    mesh_port = free_port()  # this Envoy's own: the stack's Envoy holds the stack's
    gateway = start_service(
        "gateway-real",
        "services.gateway",
        "SERVEGRID_GATEWAY_",
        stack.state_dir,
        {
            "SERVEGRID_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{mesh_port}",
            "SERVEGRID_GATEWAY_REGISTRY_ADDRESS": registry.address,
        },
    )
    try:
        yield stack.start_envoy(
            "envoy-real", stack.edge, registry=registry.address, gateway=gateway.address, mesh_port=mesh_port
        )
    finally:
        gateway.stop()
        registry.stop()
        with contextlib.suppress(psycopg.Error):
            stack.datastores.drop_schema(schema)
        stack.datastores.delete_keys(prefix)


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory: pytest.TempPathFactory, datastores: SessionDatastores) -> Iterator[FuzzStack]:
    state = tmp_path_factory.mktemp("openapi-fuzz")
    with edge_stack(state, datastores, NO_TRITON, {}) as stack, real_registry(stack) as envoy:
        _, api_key = stack.create_key(TENANT, "user")
        yield FuzzStack(stack, envoy, api_key)


def test_the_document_and_docs_page_need_no_credential(fuzz_stack: FuzzStack) -> None:
    url = fuzz_stack.edge.envoy.url
    spec = http("GET", f"{url}{api_docs.OPENAPI_PATH}")
    assert spec.status == 200, spec.body[:300]
    assert spec.headers["content-type"] == "application/json"
    assert spec.json() == api_docs.openapi_document()
    page = http("GET", f"{url}{api_docs.DOCS_PATH}", headers={"authorization": "Bearer not-a-token"})
    assert page.status == 200, page.body[:300]
    assert page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert b"RegistryService_UpdateModel" in page.body and b"/v1/auth:token" in page.body
    # Every other path still needs one.
    assert http("GET", f"{url}/v1/models").status == 401


def _headers(stack: FuzzStack, operation_id: str) -> dict[str, str]:
    if operation_id.startswith("AuthService_"):
        return {"x-api-key": stack.api_key}
    roles = ["admin"] if operation_id.startswith("RegistryService_") else ["user"]
    return {"authorization": f"Bearer {stack.edge.issuer.token(TENANT, roles=roles)}"}


@pytest.fixture(scope="module")
def api_schema() -> Any:
    # Reproductions show page tokens and the like; only the credentials are masked.
    config = schemathesis.Config.from_dict(
        {"output": {"sanitization": {"keys-to-sanitize": ["authorization", "x-api-key"]}}}
    )
    return schemathesis.openapi.from_dict(api_docs.openapi_document(), config=config)


@pytest.mark.parametrize(("operation_id", "verb", "path"), FUZZED, ids=[op[0] for op in FUZZED])
def test_generated_requests_get_no_server_error_and_documented_answers(
    fuzz_stack: FuzzStack, api_schema: Any, operation_id: str, verb: str, path: str
) -> None:
    operation = api_schema[path][verb.upper()]
    headers, base_url = _headers(fuzz_stack, operation_id), fuzz_stack.envoy.url
    started = time.monotonic()

    @given(case=operation.as_strategy() | operation.as_strategy(schemathesis.GenerationMode.NEGATIVE))
    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate, Phase.shrink],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: schemathesis.Case) -> None:
        for name in [name for name in case.headers or {} if not GRPC_KEY.fullmatch(name.lower())]:
            del case.headers[name]
        case.call_and_validate(base_url=base_url, headers=headers, checks=CHECKS, timeout=20)

    check()
    assert time.monotonic() - started < 60, "fuzzing one operation should take seconds"


def test_every_operation_is_fuzzed_or_excluded_with_a_reason() -> None:
    ids = {op[0] for op in _operations()}
    assert set(NOT_FUZZED) <= ids, "an exclusion names an operation the document no longer has"
    assert {op[0] for op in FUZZED} | set(NOT_FUZZED) == ids


@pytest.mark.parametrize("operation_id", ["GatewayService_ListModels", "RegistryService_ListModels"])
def test_a_header_name_grpc_cannot_carry_is_a_client_error(fuzz_stack: FuzzStack, operation_id: str) -> None:
    path = "/v1/models" if operation_id.startswith("Gateway") else "/v1/admin/models"
    # HTTP allows `#6`, gRPC metadata does not: the service's gRPC server would refuse the stream (500).
    reply = http("GET", f"{fuzz_stack.envoy.url}{path}", headers={**_headers(fuzz_stack, operation_id), "#6": "x"})
    body = assert_rest_error(reply, 400, 3, "INVALID_HEADER_NAME")
    assert "#6" in body["message"]
