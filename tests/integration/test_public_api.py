"""The public port as a client sees it, through a real Envoy: one stage spelling in the gateway's and the
registry's APIs, the router admin REST API (admin only, drains every replica), and reflection (grpcurl
list/describe, v1 and v1alpha) that spends none of the tenant's quota.

Real processes: the registry (PostgreSQL, Redis), the edge (JWT-less here: the quota server), the
gateway and Envoy; two routers watching the registry run on threads of their own, as replicas."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from servegrid.registry.v1 import registry_pb2 as rpb
from servegrid.registry.v1 import registry_pb2_grpc as rpb_grpc

from services.edge.devkeys import DevIssuer
from services.edge.limits import UNIT_SECONDS
from services.edge.tokens import SIGNING_KEY_FILE, load_or_create_signing_key
from services.mesh import names
from services.mesh.bootstrap import EnvoyParams
from services.router.settings import RouterSettings
from services.runtime import reflection
from services.stack.ports import free_port
from tests.support.datastores import SessionDatastores
from tests.support.edge_stack import HttpReply, http
from tests.support.envoy import EnvoyProcess, start_envoy
from tests.support.polling import wait_for
from tests.support.processes import ServiceProcess, start_service
from tests.support.router_harness import RouterThread

pytestmark = pytest.mark.integration

RUN = secrets.token_hex(4)
REGISTRY_SCHEMA, EDGE_SCHEMA = f"test_public_registry_{RUN}", f"test_public_edge_{RUN}"
REGISTRY_PREFIX, EDGE_PREFIX = f"test:public:{RUN}:registry:", f"test:public:{RUN}:edge:"
TENANT, LIMITED = f"acme-{RUN}", f"thrifty-{RUN}"
LIMIT = 3  # LIMITED's calls a day (the quota test); every other tenant gets the stack's 100000
DAY = UNIT_SECONDS["day"]
MODEL, BACKEND = "scorer", "triton-x"


@dataclass
class PublicStack:
    issuer: DevIssuer
    envoy: EnvoyProcess
    routers: list[RouterThread]

    def token(self, tenant: str = TENANT, *roles: str) -> str:
        return self.issuer.token(tenant, roles=list(roles or ("user",)))

    def headers(self, tenant: str = TENANT, *roles: str) -> dict[str, str]:
        return {"authorization": f"Bearer {self.token(tenant, *roles)}"}

    def admin(self) -> dict[str, str]:
        return self.headers(TENANT, "user", "admin")

    def call(self, method: str, path: str, body: object | None = None, headers: dict[str, str] | None = None) -> Any:
        """A REST call through Envoy that must succeed; its JSON."""
        reply = http(method, f"{self.envoy.url}{path}", body, headers or self.admin())
        assert reply.status == 200, (method, path, reply.status, reply.body)
        return reply.json()


def _drop_everything(datastores: SessionDatastores) -> None:
    for schema in (REGISTRY_SCHEMA, EDGE_SCHEMA):
        datastores.drop_schema(schema)
    for prefix in (REGISTRY_PREFIX, EDGE_PREFIX):
        datastores.delete_keys(prefix)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, datastores: SessionDatastores) -> Iterator[PublicStack]:
    left = DAY - time.time() % DAY
    if left < 120:  # the quota test counts in one day's window
        time.sleep(left + 1)
    state = tmp_path_factory.mktemp("public-api")
    issuer = DevIssuer.generate()
    jwks = issuer.write(state / "jwt")
    _, token_jwks = load_or_create_signing_key(state / "tokens")
    started: list[ServiceProcess | EnvoyProcess | RouterThread] = []
    try:
        registry = start_service(
            "registry",
            "services.registry",
            "SERVEGRID_REGISTRY_",
            state,
            {
                "SERVEGRID_REGISTRY_DATABASE_URL": datastores.database_url,
                "SERVEGRID_REGISTRY_REDIS_URL": datastores.redis_url,
                "SERVEGRID_REGISTRY_DB_SCHEMA": REGISTRY_SCHEMA,
                "SERVEGRID_REGISTRY_REDIS_PREFIX": REGISTRY_PREFIX,
            },
        )
        started.append(registry)
        routers = []
        for name in ("router-0", "router-1"):
            settings = RouterSettings(
                port=0,
                metrics_port=None,
                use_uvloop=False,
                grace_period_s=0.2,
                registry_address=registry.address,
                watcher_name=name,
            )
            routers.append(RouterThread(settings).start())
            started.append(routers[-1])
        edge = start_service(
            "edge",
            "services.edge",
            "SERVEGRID_EDGE_",
            state,
            {
                "SERVEGRID_EDGE_DATABASE_URL": datastores.database_url,
                "SERVEGRID_EDGE_REDIS_URL": datastores.redis_url,
                "SERVEGRID_EDGE_DB_SCHEMA": EDGE_SCHEMA,
                "SERVEGRID_EDGE_REDIS_PREFIX": EDGE_PREFIX,
                "SERVEGRID_EDGE_TENANT_LIMITS": json.dumps({LIMITED: LIMIT}),
                "SERVEGRID_EDGE_DEFAULT_LIMIT": "100000",
                "SERVEGRID_EDGE_LIMIT_UNIT": "day",
                "SERVEGRID_EDGE_USE_UVLOOP": "false",
                "SERVEGRID_EDGE_TOKEN_SIGNING_KEY_FILE": str(state / "tokens" / SIGNING_KEY_FILE),
            },
        )
        started.append(edge)
        mesh_port = free_port()
        gateway = start_service(
            "gateway",
            "services.gateway",
            "SERVEGRID_GATEWAY_",
            state,
            {
                "SERVEGRID_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{mesh_port}",
                "SERVEGRID_GATEWAY_REGISTRY_ADDRESS": registry.address,
            },
        )
        started.append(gateway)
        params = EnvoyParams.for_profile(
            "local",
            ext_authz_timeout_s=5.0,
            jwks_file=str(jwks),
            token_jwks_file=str(token_jwks),
            gateway=gateway.address,
            xds=tuple(r.address for r in routers),
            mesh_host="127.0.0.1",
            mesh_port=mesh_port,
            registry=registry.address,
            edge=edge.address,
            ratelimit_window_s=DAY,
        )
        envoy = start_envoy(state / "envoy", params)
        started.append(envoy)
        yield PublicStack(issuer, envoy, routers)
    finally:
        for part in reversed(started):
            part.stop()
        _drop_everything(datastores)


@pytest.fixture(scope="module")
def served(stack: PublicStack) -> PublicStack:
    """MODEL v1 in PRODUCTION on BACKEND, made over the registry's REST API through Envoy, as an operator would."""
    backend = {"backendId": BACKEND, "address": "127.0.0.1:1"}  # no Triton there: probes fail, drains still work
    stack.call("POST", "/v1/admin/backends", backend)
    stack.call("POST", "/v1/admin/models", {"modelId": MODEL, "task": "regression"})
    stack.call("POST", f"/v1/admin/models/{MODEL}/versions", {"tritonModelName": "affine"})
    for stage in ("STAGE_STAGING", "STAGE_PRODUCTION"):
        stack.call("POST", f"/v1/admin/models/{MODEL}/versions/1:transition", {"stage": stage})
    # Both replicas have the route (and so the backend) before anyone drains it.
    wait_for(lambda: all(r.router.probes.get(BACKEND) is not None for r in stack.routers), 15)
    return stack


# --- one stage spelling -----------------------------------------------------------------------


def test_the_gateway_and_the_registry_spell_a_stage_the_same_over_rest_and_grpc(served: PublicStack) -> None:
    registry_rest = served.call("GET", f"/v1/admin/models/{MODEL}/versions/1")["version"]["stage"]
    models = served.call("GET", "/v1/models?pageSize=10", headers=served.headers())["models"]
    (model,) = [m for m in models if m["modelId"] == MODEL]
    gateway_rest = model["versions"][0]["stage"]
    assert gateway_rest == registry_rest == "STAGE_PRODUCTION"

    metadata = [("authorization", f"Bearer {served.token(TENANT, 'user', 'admin')}")]
    with grpc.insecure_channel(served.envoy.address) as channel:
        listed = gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
            gateway_pb2.ListModelsRequest(page_size=10), metadata=metadata, timeout=10
        )
        version = rpb_grpc.RegistryServiceStub(channel).GetModelVersion(
            rpb.GetModelVersionRequest(model_id=MODEL, version=1), metadata=metadata, timeout=10
        )
    (grpc_model,) = [m for m in listed.models if m.model_id == MODEL]
    assert grpc_model.versions[0].stage == rpb.Stage.Name(version.version.stage) == gateway_rest


# --- the router admin API over REST -----------------------------------------------------------


def test_the_router_admin_rest_api_needs_the_admin_role(served: PublicStack) -> None:
    url = f"{served.envoy.url}/v1/router/backends"
    assert http("GET", url).status == 401
    refused = http("GET", url, headers=served.headers())
    assert refused.status == 403, refused.body
    assert http("POST", f"{url}/{BACKEND}:drain", {}, served.headers()).status == 403
    listed = served.call("GET", "/v1/router/backends")
    assert [b["backendId"] for b in listed["backends"]] == [BACKEND]
    table = served.call("GET", "/v1/router/routes")
    assert [r["modelId"] for r in table["routes"]] == [MODEL] and table["registryConnected"] is True


def _drained_everywhere(stack: PublicStack, drained: bool) -> bool:
    def replica(router: RouterThread) -> bool:
        async def read() -> bool:  # on the router's loop, where its state changes
            backend = router.router.probes.get(BACKEND)
            return backend is not None and backend.drained == drained

        return router.run(read(), timeout=5)

    return all(replica(r) for r in stack.routers)


def test_a_rest_drain_through_envoy_drains_every_router_replica(served: PublicStack) -> None:
    drained = served.call("POST", f"/v1/router/backends/{BACKEND}:drain", {})["backend"]
    assert drained["drained"] is True and drained["endpointState"] == "ENDPOINT_STATE_DRAINING"
    # Envoy's REST call reached one replica; the flag lives in the registry, so both drain.
    wait_for(lambda: _drained_everywhere(served, True), 10)
    assert served.call("GET", f"/v1/admin/backends/{BACKEND}")["backend"]["drained"] is True
    for router in served.routers:

        async def state(r: RouterThread = router) -> int:
            return int(r.router.probes.states()[(BACKEND, "affine", "")])

        assert router.run(state(), timeout=5) == 3  # DRAINING, what EDS tells every Envoy

    undrained = served.call("POST", f"/v1/router/backends/{BACKEND}:undrain", {})["backend"]
    assert "drained" not in undrained  # proto3 JSON leaves false out
    wait_for(lambda: _drained_everywhere(served, False), 10)

    unknown = http("POST", f"{served.envoy.url}/v1/router/backends/ghost:drain", {}, served.admin())
    assert unknown.status == 404 and unknown.json()["details"][0]["reason"] == "BACKEND_NOT_FOUND"


# --- reflection through the public port -------------------------------------------------------


def _grpcurl(stack: PublicStack, *args: str, tenant: str = TENANT) -> subprocess.CompletedProcess[str]:
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    command = [grpcurl, "-plaintext", "-H", f"authorization: Bearer {stack.token(tenant)}", stack.envoy.address]
    return subprocess.run([*command, *args], capture_output=True, text=True, timeout=30, check=False)


def test_grpcurl_lists_and_describes_every_service_the_public_port_routes(served: PublicStack) -> None:
    listed = _grpcurl(served, "list")
    assert listed.returncode == 0, listed.stderr
    assert set(listed.stdout.split()) == {*names.PUBLIC_GRPC_SERVICES, *reflection.REFLECTION_SERVICES}
    for service in names.PUBLIC_GRPC_SERVICES:
        described = _grpcurl(served, "describe", service)
        assert described.returncode == 0, (service, described.stderr)
        assert f"service {service.rsplit('.', 1)[1]} {{" in described.stdout, described.stdout
    drain = _grpcurl(served, "describe", "servegrid.router.v1.RouterAdminService.DrainBackend")
    assert "rpc DrainBackend ( .servegrid.router.v1.DrainBackendRequest )" in drain.stdout, drain.stdout
    kserve = _grpcurl(served, "describe", "inference.ModelInferRequest")
    assert kserve.returncode == 0 and "model_name" in kserve.stdout, kserve.stderr


def _reflect(stack: PublicStack, service: str, request: Any, response: type[Any]) -> Any:
    metadata = [("authorization", f"Bearer {stack.token()}")]
    with grpc.insecure_channel(stack.envoy.address) as channel:
        call = channel.stream_stream(
            f"/{service}/ServerReflectionInfo",
            request_serializer=type(request).SerializeToString,
            response_deserializer=response.FromString,
        )
        return next(iter(call(iter([request]), metadata=metadata, timeout=10)))


def test_reflection_v1_answers_through_envoy_as_v1alpha_does(served: PublicStack) -> None:
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(reflection.v1_file().SerializeToString())
    v1_request, v1_response = (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"grpc.reflection.v1.{name}"))
        for name in ("ServerReflectionRequest", "ServerReflectionResponse")
    )
    v1 = _reflect(served, reflection.V1_SERVICE, v1_request(list_services=""), v1_response)
    alpha = _reflect(
        served,
        reflection.V1ALPHA_SERVICE,
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionResponse,
    )
    v1_names = [s.name for s in v1.list_services_response.service]
    assert v1_names == [s.name for s in alpha.list_services_response.service] and names.KSERVE_SERVICE in v1_names
    described = _reflect(
        served, reflection.V1_SERVICE, v1_request(file_containing_symbol=names.ROUTER_ADMIN_SERVICE), v1_response
    )
    assert described.file_descriptor_response.file_descriptor_proto


def test_reflection_spends_none_of_the_tenants_quota(served: PublicStack) -> None:
    # Ten discovery calls by a tenant allowed three calls a day: every one answers...
    for args in (("list",), ("describe", names.GATEWAY_SERVICE)) * 5:
        done = _grpcurl(served, *args, tenant=LIMITED)
        assert done.returncode == 0, done.stderr
    # ...and the tenant still has all of its quota: L calls (L + 1 at most, serially on one Envoy) pass.
    replies: list[HttpReply] = []
    for _ in range(LIMIT + 4):
        replies.append(http("GET", f"{served.envoy.url}/v1/models", headers=served.headers(LIMITED)))
        if replies[-1].status == 429:
            break
    passed = [r.status for r in replies].count(200)
    assert replies[-1].status == 429, [r.status for r in replies]
    assert LIMIT <= passed <= LIMIT + 1, [r.status for r in replies]
