"""One public API: a stage spelled one way by the gateway, the registry and the CLI; reflection (v1 and
v1alpha) listing exactly what the public routes reach."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha import reflection_pb2
from servegrid.registry.v1 import registry_pb2 as rpb
from typer.testing import CliRunner

from services.cli import models as cli_models
from services.gateway import catalog
from services.gateway.server import public_services
from services.mesh import names
from services.mesh.routes import KservePolicy, kserve_routes, public_route_config
from services.router.table import compile_route
from services.runtime import reflection
from services.runtime.server import ServiceApp
from services.runtime.settings import ServiceSettings
from tests.support.router_harness import route

SERVABLE = (rpb.STAGE_STAGING, rpb.STAGE_PRODUCTION)


# --- stage names ------------------------------------------------------------------------------


def registry_spelling(stage: rpb.Stage.ValueType) -> str:
    """How the registry's API spells a stage: its REST JSON (the gRPC enum's value name)."""
    spelled: str = json_format.MessageToDict(rpb.ModelVersion(stage=stage))["stage"]
    return spelled


@pytest.mark.parametrize("stage", SERVABLE)
def test_the_gateway_spells_a_stage_as_the_registry_does(stage: rpb.Stage.ValueType) -> None:
    version = rpb.RouteVersion(version=1, stage=stage, triton_model_name="affine", weight=100)
    served = catalog._model(rpb.Model(model_id="m"), rpb.Route(model_id="m", versions=[version]))
    assert served.versions[0].stage == registry_spelling(stage) == rpb.Stage.Name(stage)
    assert json_format.MessageToDict(served)["versions"][0]["stage"] == registry_spelling(stage)


def test_an_unknown_stage_number_reads_as_unspecified_not_an_error() -> None:
    assert catalog.stage_name(99) == "STAGE_UNSPECIFIED"  # type: ignore[arg-type]


class _Registry:
    """What `servegrid models get` and `promote` ask the registry."""

    def __init__(self, stage: rpb.Stage.ValueType) -> None:
        self.stage = stage
        self.moved: list[rpb.TransitionModelVersionStageRequest] = []

    def GetModel(self, request: rpb.GetModelRequest, **_: Any) -> rpb.GetModelResponse:
        return rpb.GetModelResponse(model=rpb.Model(model_id=request.model_id))

    def ListModelVersions(self, request: rpb.ListModelVersionsRequest, **_: Any) -> rpb.ListModelVersionsResponse:
        version = rpb.ModelVersion(model_id=request.model_id, version=1, triton_model_name="affine", stage=self.stage)
        return rpb.ListModelVersionsResponse(versions=[version])

    def GetTrafficPolicy(self, request: rpb.GetTrafficPolicyRequest, **_: Any) -> rpb.GetTrafficPolicyResponse:
        return rpb.GetTrafficPolicyResponse(policy=rpb.TrafficPolicy(model_id=request.model_id))

    def TransitionModelVersionStage(
        self, request: rpb.TransitionModelVersionStageRequest, **_: Any
    ) -> rpb.TransitionModelVersionStageResponse:
        self.moved.append(request)
        version = rpb.ModelVersion(model_id=request.model_id, version=request.version, stage=request.stage)
        return rpb.TransitionModelVersionStageResponse(version=version)


@pytest.fixture
def fake_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Registry]:
    stub = _Registry(rpb.STAGE_PRODUCTION)

    @contextmanager
    def registry(_: str) -> Iterator[_Registry]:
        yield stub

    monkeypatch.setattr(cli_models, "_registry", registry)
    yield stub


def _cli(*args: str) -> str:
    from services.cli.main import app

    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200", "TERM": "dumb"})
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("stage", SERVABLE)
def test_the_cli_prints_the_stage_as_the_apis_spell_it(fake_registry: _Registry, stage: rpb.Stage.ValueType) -> None:
    fake_registry.stage = stage
    version = rpb.RouteVersion(version=1, stage=stage, triton_model_name="affine", weight=100)
    gateway_says = catalog._model(rpb.Model(model_id="m"), rpb.Route(model_id="m", versions=[version])).versions[0]
    row = next(line for line in _cli("models", "get", "m").splitlines() if "affine:latest" in line)
    assert registry_spelling(stage) in row.split() and gateway_says.stage in row.split()


@pytest.mark.parametrize("given", ["production", "PRODUCTION", "STAGE_PRODUCTION", "stage_production"])
def test_promote_takes_the_short_name_or_the_apis_and_answers_with_the_apis(
    fake_registry: _Registry, given: str
) -> None:
    output = _cli("models", "promote", "m", "1", "--stage", given)
    assert fake_registry.moved[-1].stage == rpb.STAGE_PRODUCTION
    assert "m v1 → STAGE_PRODUCTION" in output


def test_promote_refuses_a_stage_that_does_not_exist(fake_registry: _Registry) -> None:
    from services.cli.main import app

    result = CliRunner().invoke(app, ["models", "promote", "m", "1", "--stage", "canary"], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "unknown stage 'canary'" in result.output
    assert fake_registry.moved == []


# --- what the public port routes, and reflection lists ----------------------------------------


def _routed_grpc_prefixes() -> set[str]:
    """The path (or prefix) of every public gRPC route that sends requests somewhere (not a fixed reply)."""
    backend = [("t", "127.0.0.1:8001", "127.0.0.1:8000")]
    kserve = kserve_routes([compile_route(route("m", [(1, "affine", 100, backend)]))], KservePolicy())
    config = public_route_config(kserve)
    found = set()
    for entry in config["virtual_hosts"][0]["routes"]:
        match = entry["match"]
        if "grpc" in match and "route" in entry:
            found.add(match.get("prefix") or match["path"])
    return found


def test_reflection_lists_exactly_the_services_the_public_routes_reach() -> None:
    prefixes = _routed_grpc_prefixes() - {names.REFLECTION_PREFIX}
    services = public_services()
    for service in services:
        assert any(f"/{service}/".startswith(p) or p.startswith(f"/{service}/") for p in prefixes), service
    for prefix in prefixes:
        assert any(f"/{s}/".startswith(prefix) or prefix.startswith(f"/{s}/") for s in services), prefix
    assert names.REFLECTION_PREFIX in _routed_grpc_prefixes()


def _v1_messages() -> tuple[type[Any], type[Any]]:
    """v1's request and response classes, built from the v1 descriptor (not the v1alpha classes)."""
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(reflection.v1_file().SerializeToString())
    request = message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{reflection.V1_PACKAGE}.ServerReflectionRequest")
    )
    response = message_factory.GetMessageClass(
        pool.FindMessageTypeByName(f"{reflection.V1_PACKAGE}.ServerReflectionResponse")
    )
    return request, response


@pytest.fixture
async def reflected() -> AsyncIterator[grpc.aio.Channel]:
    app = ServiceApp("reflected", ServiceSettings(port=0, metrics_port=None, use_uvloop=False))
    app.reflect(public_services())
    await app.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield channel
    await app.stop()


async def _ask(channel: grpc.aio.Channel, service: str, request: Any, response: type[Any]) -> Any:
    call = channel.stream_stream(
        f"/{service}/ServerReflectionInfo",
        request_serializer=type(request).SerializeToString,
        response_deserializer=response.FromString,
    )
    async for reply in call(iter([request]), timeout=5):
        return reply
    raise AssertionError("no reflection answer")


async def test_reflection_v1_and_v1alpha_list_and_describe_the_same(reflected: grpc.aio.Channel) -> None:
    v1_request, v1_response = _v1_messages()
    alpha = await _ask(
        reflected,
        reflection.V1ALPHA_SERVICE,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionResponse,
    )
    v1 = await _ask(reflected, reflection.V1_SERVICE, v1_request(list_services=""), v1_response)
    listed = [s.name for s in v1.list_services_response.service]
    assert listed == [s.name for s in alpha.list_services_response.service]
    assert set(listed) == {*names.PUBLIC_GRPC_SERVICES, *reflection.REFLECTION_SERVICES}

    for symbol in (names.ROUTER_ADMIN_SERVICE, names.KSERVE_SERVICE, reflection.V1_SERVICE):
        described = await _ask(reflected, reflection.V1_SERVICE, v1_request(file_containing_symbol=symbol), v1_response)
        files = described.file_descriptor_response.file_descriptor_proto
        assert files, symbol
        pool = descriptor_pool.DescriptorPool()
        protos = [descriptor_pb2.FileDescriptorProto.FromString(f) for f in files]
        for proto in _dependency_order(protos):
            pool.Add(proto)
        assert pool.FindServiceByName(symbol).methods, symbol


def _dependency_order(protos: list[Any]) -> list[Any]:
    by_name = {p.name: p for p in protos}
    ordered: list[Any] = []

    def visit(name: str) -> None:
        proto = by_name.get(name)
        if proto is None or proto in ordered:
            return
        for dependency in proto.dependency:
            visit(dependency)
        ordered.append(proto)

    for name in by_name:
        visit(name)
    return ordered
