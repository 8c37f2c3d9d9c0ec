"""The committed OpenAPI document: valid OpenAPI 3.1, one operation per REST binding Envoy transcodes, in the
proto3 JSON shape the transcoder speaks, fresh from proto/, and served whole by the public route config."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor, descriptor_pool
from openapi_spec_validator import validate
from openapi_spec_validator.validation.validators import OpenAPIV31SpecValidator
from servegrid.gateway.v1 import gateway_pb2  # noqa: F401  (registers the services in the default pool)
from servegrid.registry.v1 import registry_pb2  # noqa: F401
from servegrid.router.v1 import router_admin_pb2  # noqa: F401

from scripts import gen_openapi, gen_protos
from services.mesh import api_docs, names
from services.mesh.routes import fixed_routes, public_route_config

REPO = Path(__file__).resolve().parents[2]
DOC = api_docs.openapi_document()
SCHEMAS = DOC["components"]["schemas"]


def operations() -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, verbs in DOC["paths"].items():
        for verb, operation in verbs.items():
            yield verb, path, operation


def operation(operation_id: str) -> dict[str, Any]:
    (found,) = [op for _, _, op in operations() if op["operationId"] == operation_id]
    return found


def parameters(operation_id: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in operation(operation_id).get("parameters", [])}


def body_schema(operation_id: str) -> dict[str, Any]:
    schema: dict[str, Any] = operation(operation_id)["requestBody"]["content"]["application/json"]["schema"]
    return schema


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(DOC, cls=OpenAPIV31SpecValidator)
    assert DOC["openapi"] == "3.1.0"


def _http_bindings(service: descriptor.ServiceDescriptor) -> Iterator[tuple[str, str]]:
    """(verb, path template with every `{...}` blanked) of each binding, read from the compiled stubs."""
    for method in service.methods:
        rule = method.GetOptions().Extensions[annotations_pb2.http]
        for binding in [rule, *rule.additional_bindings]:
            verb = binding.WhichOneof("pattern")
            yield verb, re.sub(r"\{[^}]*\}", "{}", getattr(binding, verb))


def test_every_binding_envoy_transcodes_is_an_operation_and_nothing_else() -> None:
    pool = descriptor_pool.Default()
    expected = {b for name in names.TRANSCODED_SERVICES for b in _http_bindings(pool.FindServiceByName(name))}
    described = {(verb, re.sub(r"\{[^}]*\}", "{}", path)) for verb, path, _ in operations()}
    assert described == expected
    assert len(expected) == 36  # a new mapping shows up here too
    # RouterAdminService's mappings are routed (admin only) and described.
    assert {p for _, p, _ in operations() if p.startswith("/v1/router/")} == {
        "/v1/router/backends",
        "/v1/router/backends/{backend_id}:drain",
        "/v1/router/backends/{backend_id}:undrain",
        "/v1/router/routes",
    }


def test_fields_follow_the_proto3_json_mapping() -> None:
    job = SCHEMAS["servegrid.batch.v1.BatchJob"]["properties"]
    assert job["totalItems"]["type"] == "string" and job["totalItems"]["format"] == "int64"  # int64 as a string
    assert {"type": "integer", "format": "int32"}.items() <= job["priority"].items()
    assert job["createTime"]["format"] == "date-time" and job["createTime"]["readOnly"] is True  # OUTPUT_ONLY
    assert job["state"]["$ref"] == "#/components/schemas/servegrid.batch.v1.BatchJobState"
    assert job["labels"]["additionalProperties"] == {"type": "string"}  # map<string, string>
    state = SCHEMAS["servegrid.batch.v1.BatchJobState"]
    assert state["type"] == "string" and "BATCH_JOB_STATE_RUNNING" in state["enum"]  # enums by name
    assert "- `BATCH_JOB_STATE_QUEUED`: " in state["description"]
    tensor = SCHEMAS["servegrid.common.v1.TensorData"]["properties"]
    assert tensor["bytes"]["items"]["format"] == "byte"  # base64
    assert tensor["uint64"]["items"]["pattern"] == "^[0-9]+$"
    assert SCHEMAS["servegrid.registry.v1.ModelVersion"]["required"] == ["tritonModelName"]  # REQUIRED
    detail = SCHEMAS["google.rpc.Status"]["properties"]["details"]["items"]  # Any: fields beside `@type`
    assert detail["required"] == ["@type"] and detail["additionalProperties"] is True


def test_requests_map_to_path_query_and_body_as_the_transcoder_does() -> None:
    listed = parameters("RegistryService_ListModelVersions")
    assert {name: p["in"] for name, p in listed.items()} == {
        "model_id": "path",
        "pageSize": "query",
        "pageToken": "query",
        "stage": "query",
    }
    assert listed["model_id"]["required"] is True
    assert listed["stage"]["schema"] == {"$ref": "#/components/schemas/servegrid.registry.v1.Stage"}
    # body: "model" → the rest in the query; a nested path field keeps its field path in the description.
    update = parameters("RegistryService_UpdateModel")
    assert update["updateMask"]["in"] == "query" and update["updateMask"]["required"] is True
    assert "`model.model_id`" in update["model_id"]["description"]
    assert body_schema("RegistryService_UpdateModel") == {"$ref": "#/components/schemas/servegrid.registry.v1.Model"}
    # body: "*" → every field the path does not bind.
    infer = body_schema("GatewayService_Infer_2")
    assert "modelId" not in infer["properties"] and "version" not in infer["properties"]
    assert infer["required"] == ["inputs"]
    create = body_schema("GatewayService_CreateBatchJob")
    assert create["properties"]["itemsNdjson"]["contentEncoding"] == "base64"
    assert (
        "At most one of `items`, `itemsNdjson` is set."
        in operation("GatewayService_CreateBatchJob")["requestBody"]["description"]
    )
    assert {p["in"] for p in parameters("RegistryService_DeleteModel").values()} == {"path", "query"}


def test_errors_credentials_and_streams() -> None:
    status = {"$ref": "#/components/schemas/google.rpc.Status"}
    assert all(op["responses"]["default"]["content"]["application/json"]["schema"] == status for *_, op in operations())
    assert DOC["security"] == [{"bearerAuth": []}, {"apiKey": []}]
    schemes = DOC["components"]["securitySchemes"]
    assert schemes["bearerAuth"]["bearerFormat"] == "JWT"
    assert schemes["apiKey"] == {**schemes["apiKey"], "in": "header", "name": "x-api-key"}
    assert operation("AuthService_CreateAccessToken")["security"] == [{"apiKey": []}]
    assert "newline-delimited JSON" in operation("GatewayService_WatchBatchJob")["responses"]["200"]["description"]


def test_descriptions_come_from_the_proto_comments() -> None:
    infer = operation("GatewayService_Infer")
    assert infer["summary"] == "Runs one inference"
    assert infer["description"].startswith("Runs one inference. The tensors are converted")
    tags = {tag["name"]: tag["description"] for tag in DOC["tags"]}
    assert tags["AuthService"].startswith("AuthService exchanges an API key")


def test_the_committed_document_is_what_the_protos_render() -> None:
    rendered = gen_openapi.to_json(gen_openapi.render(gen_protos.described_set(REPO)))
    assert rendered == gen_openapi.to_json(gen_openapi.render(gen_protos.described_set(REPO)))  # deterministic
    committed = REPO / "gen" / gen_protos.OPENAPI_PACKAGE / gen_protos.OPENAPI_FILE
    assert committed.read_text(encoding="utf-8") == rendered, "run `make gen`"


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (["model_id", "version"], {"model_id": "model_id", "version": "version"}),
        (["version.model_id", "version.version"], {"version.model_id": "model_id", "version.version": "version"}),
        (["a.id", "b.id"], {"a.id": "a_id", "b.id": "b_id"}),
    ],
)
def test_path_parameters_are_named_without_dots(fields: list[str], expected: dict[str, str]) -> None:
    assert gen_openapi.parameter_names(fields) == expected


def test_the_docs_page_lists_every_operation_and_runs_nothing() -> None:
    page = api_docs.docs_html()
    assert all(op["operationId"] in page for *_, op in operations())
    assert "<script" not in page and "&lt;access_token&gt;" in page  # comments are escaped
    assert f'href="{api_docs.OPENAPI_PATH}"' in page


def test_the_public_routes_serve_the_document_whole() -> None:
    routes = {route["name"]: route for route in fixed_routes()}
    assert routes["openapi-json"]["direct_response"]["body"]["inline_string"] == api_docs.openapi_json()
    assert routes["openapi-json"]["match"] == {"path": "/openapi.json"}
    limit = public_route_config([])["max_direct_response_body_size_bytes"]
    bodies = [
        r["direct_response"].get("body", {}).get("inline_string", "") for r in routes.values() if "direct_response" in r
    ]
    largest = max(len(body.encode()) for body in bodies)
    assert limit >= largest > api_docs.ENVOY_DEFAULT_BODY_LIMIT
