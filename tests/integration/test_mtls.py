"""Internal services trust only the mesh: a gateway, router and registry on mutual TLS behind a real Envoy on it.

Envoy presents its certificate to the gateway (and the router's xDS, the registry), the gateway
presents its own to Envoy's mesh listener, the registry and the batch service. A caller without a
certificate cannot connect; one with another component's valid certificate can, but its identity
headers are ignored: only Envoy may say who is calling.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servegrid.batch.v1 import batch_pb2, batch_pb2_grpc
from servegrid.common.v1 import tensor_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.edge.devkeys import DevIssuer
from services.mesh.bootstrap import EnvoyParams
from services.runtime.channels import open_sync_channel
from services.runtime.errors import status_details
from services.runtime.tls import CertFiles, server_credentials
from services.stack import certs
from services.stack.local import grpc_ready
from services.stack.ports import free_port
from tests.support.datastores import SessionDatastores
from tests.support.edge_stack import EdgeStack, edge_stack, http, tls_env
from tests.support.envoy import EnvoyProcess, start_envoy
from tests.support.processes import ServiceProcess, start_service

pytestmark = pytest.mark.integration

TENANT = "acme"


@dataclass
class StandInBatch(batch_pb2_grpc.BatchServiceServicer):
    """The batch service's contract, on mutual TLS: remembers which tenant each ListBatchJobs named."""

    tenants: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ListBatchJobs(
        self, request: batch_pb2.ListBatchJobsRequest, context: grpc.ServicerContext
    ) -> batch_pb2.ListBatchJobsResponse:
        with self.lock:
            self.tenants.append(request.tenant)
        return batch_pb2.ListBatchJobsResponse(next_page_token=f"tenant={request.tenant}")


@dataclass
class MeshOnTls:
    certs: dict[str, CertFiles]
    issuer: DevIssuer
    batch: StandInBatch
    gateway: ServiceProcess
    registry: ServiceProcess
    gateway_health_port: int
    envoy: EnvoyProcess
    mesh_address: str


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MeshOnTls]:
    from services.router.settings import RouterSettings
    from tests.support.router_harness import RouterThread, write_routes

    state = tmp_path_factory.mktemp("mtls")
    made = certs.generate(state / "certs")
    issuer = DevIssuer.generate()
    jwks = issuer.write(state / "jwt")

    stand_in = StandInBatch()  # type: ignore[abstract]
    batch_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    batch_pb2_grpc.add_BatchServiceServicer_to_server(stand_in, batch_server)
    batch_port = batch_server.add_secure_port("127.0.0.1:0", server_credentials(made["batch"]))
    batch_server.start()

    router_tls = made["router"]
    router = RouterThread(
        RouterSettings(
            port=0,
            metrics_port=None,
            use_uvloop=False,
            grace_period_s=0.2,
            routes_file=write_routes(state / "routes.json", []),
            tls_cert_file=router_tls.cert,
            tls_key_file=router_tls.key,
            tls_ca_file=router_tls.ca,
        )
    ).start()
    started: list[ServiceProcess | EnvoyProcess] = []
    try:
        registry = start_service(
            "registry",
            "tests.support.fake_registry",
            "SERVEGRID_FAKE_REGISTRY_",
            state,
            {
                **tls_env("SERVEGRID_FAKE_REGISTRY_", made["registry"], "envoy", "gateway"),
            },
        )
        started.append(registry)
        mesh_port, health_port = free_port(), free_port()
        gateway = start_service(
            "gateway",
            "services.gateway",
            "SERVEGRID_GATEWAY_",
            state,
            {
                **tls_env("SERVEGRID_GATEWAY_", made["gateway"]),
                "SERVEGRID_GATEWAY_HEALTH_PORT": str(health_port),
                "SERVEGRID_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{mesh_port}",
                "SERVEGRID_GATEWAY_REGISTRY_ADDRESS": registry.address,
                "SERVEGRID_GATEWAY_BATCH_ADDRESS": f"127.0.0.1:{batch_port}",
            },
        )
        started.append(gateway)
        envoy_tls = made["envoy"]
        params = EnvoyParams.for_profile(
            "local",
            jwks_file=str(jwks),
            token_jwks_file="",
            gateway=gateway.address,
            xds=(router.address,),
            registry=registry.address,
            edge=f"127.0.0.1:{free_port()}",  # not needed: JWT calls skip ext_authz, quotas fail open
            mesh_host="127.0.0.1",
            mesh_port=mesh_port,
            tls_cert_file=str(envoy_tls.cert),
            tls_key_file=str(envoy_tls.key),
            tls_ca_file=str(envoy_tls.ca),
        )
        # Ready means Envoy got its routes from the router: over mutual TLS, or not at all.
        envoy = start_envoy(state / "envoy", params)
        started.append(envoy)
        yield MeshOnTls(made, issuer, stand_in, gateway, registry, health_port, envoy, f"127.0.0.1:{mesh_port}")
    finally:
        for process in reversed(started):
            process.stop()
        router.stop()
        batch_server.stop(0)


def _bearer(mesh: MeshOnTls) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {mesh.issuer.token(TENANT)}")]


def test_a_call_through_envoy_carries_its_verified_tenant_to_batch(mesh: MeshOnTls) -> None:
    with grpc.insecure_channel(mesh.envoy.address) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).ListBatchJobs(
            gateway_pb2.ListBatchJobsRequest(), metadata=_bearer(mesh), timeout=10
        )
    assert reply.next_page_token == f"tenant={TENANT}"


def test_the_gateway_reaches_the_registry_and_the_mesh_listener_over_tls(mesh: MeshOnTls) -> None:
    with grpc.insecure_channel(mesh.envoy.address) as channel:
        stub = gateway_pb2_grpc.GatewayServiceStub(channel)
        models = stub.ListModels(gateway_pb2.ListModelsRequest(), metadata=_bearer(mesh), timeout=10)
        with pytest.raises(grpc.RpcError) as missing:
            x = tensor_pb2.Tensor(name="x", datatype="FP32", shape=[4], data=tensor_pb2.TensorData(fp32=[1, 2, 3, 4]))
            stub.Infer(gateway_pb2.InferRequest(model_id="nowhere", inputs=[x]), metadata=_bearer(mesh), timeout=10)
    assert [m.model_id for m in models.models] == ["affine", "digits"]  # the stand-in registry's servable ones
    # The mesh listener answered (no route for the model); a failed handshake would be UNAVAILABLE.
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND, missing.value.details()


@pytest.mark.parametrize("how", ["plaintext", "no client certificate"])
def test_a_caller_without_a_certificate_cannot_connect(mesh: MeshOnTls, how: str) -> None:
    if how == "plaintext":
        channel = grpc.insecure_channel(mesh.gateway.address)
    else:
        credentials = grpc.ssl_channel_credentials(root_certificates=mesh.certs["gateway"].ca.read_bytes())
        channel = grpc.secure_channel(mesh.gateway.address, credentials, [("grpc.ssl_target_name_override", "gateway")])
    with channel, pytest.raises(grpc.RpcError) as refused:
        gateway_pb2_grpc.GatewayServiceStub(channel).ListBatchJobs(
            gateway_pb2.ListBatchJobsRequest(), metadata=[("x-servegrid-tenant", TENANT)], timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_another_components_certificate_does_not_make_its_identity_headers_true(mesh: MeshOnTls) -> None:
    before = len(mesh.batch.tenants)
    spoofed = [("x-servegrid-tenant", TENANT), ("x-servegrid-roles", "admin")]
    with (
        open_sync_channel(mesh.gateway.address, tls=mesh.certs["registry"], peer="gateway") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        gateway_pb2_grpc.GatewayServiceStub(channel).ListBatchJobs(
            gateway_pb2.ListBatchJobsRequest(), metadata=spoofed, timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    _, info = status_details(refused.value.trailing_metadata())
    assert info is not None and info.reason == "TENANT_REQUIRED"
    assert len(mesh.batch.tenants) == before  # nothing reached the batch service


def test_envoys_certificate_is_what_makes_them_true(mesh: MeshOnTls) -> None:
    """The control for the test above: same call, same headers, Envoy's certificate."""
    with open_sync_channel(mesh.gateway.address, tls=mesh.certs["envoy"], peer="gateway") as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).ListBatchJobs(
            gateway_pb2.ListBatchJobsRequest(), metadata=[("x-servegrid-tenant", TENANT)], timeout=5
        )
    assert reply.next_page_token == f"tenant={TENANT}"


@pytest.mark.parametrize("who", ["no certificate", "registry"])
def test_the_mesh_listener_takes_only_the_components_that_use_it(mesh: MeshOnTls, who: str) -> None:
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    if who == "no certificate":
        credentials = grpc.ssl_channel_credentials(root_certificates=mesh.certs["envoy"].ca.read_bytes())
        channel = grpc.secure_channel(mesh.mesh_address, credentials, [("grpc.ssl_target_name_override", "envoy")])
    else:
        channel = open_sync_channel(mesh.mesh_address, tls=mesh.certs[who], peer="envoy")
    with channel, pytest.raises(grpc.RpcError) as refused:
        service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelReady(
            service_pb2.ModelReadyRequest(name="nowhere"), timeout=5
        )
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_the_health_port_answers_probes_without_a_certificate_and_serves_nothing_else(mesh: MeshOnTls) -> None:
    address = f"127.0.0.1:{mesh.gateway_health_port}"
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as absent:
            gateway_pb2_grpc.GatewayServiceStub(channel).ListBatchJobs(
                gateway_pb2.ListBatchJobsRequest(), metadata=[("x-servegrid-tenant", TENANT)], timeout=5
            )
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert absent.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_a_service_answers_only_the_components_allowed_to_call_it(mesh: MeshOnTls) -> None:
    """The registry here takes envoy and gateway: batch's valid certificate connects, and is refused."""
    from servegrid.registry.v1 import registry_pb2, registry_pb2_grpc

    with (
        open_sync_channel(mesh.registry.address, tls=mesh.certs["batch"], peer="registry") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        registry_pb2_grpc.RegistryServiceStub(channel).ListModels(registry_pb2.ListModelsRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "batch may not call the fake-registry service" in (refused.value.details() or "")
    _, info = status_details(refused.value.trailing_metadata())
    assert info is not None and info.reason == "PEER_NOT_ALLOWED"
    # The gateway is allowed: test_the_gateway_reaches_the_registry_... lists models through it.


@pytest.mark.parametrize(("who", "refused"), [("batch", True), ("gateway", False)])
def test_the_allowlist_guards_streams_too(mesh: MeshOnTls, who: str, refused: bool) -> None:
    """WatchRoutes streams; the stand-in registry does not implement it, so an allowed peer gets as far as
    the handler (which fails) and a refused one never reaches it."""
    from servegrid.registry.v1 import registry_pb2, registry_pb2_grpc

    with (
        open_sync_channel(mesh.registry.address, tls=mesh.certs[who], peer="registry") as channel,
        pytest.raises(grpc.RpcError) as ended,
    ):
        next(registry_pb2_grpc.RegistryServiceStub(channel).WatchRoutes(registry_pb2.WatchRoutesRequest(), timeout=5))
    assert (ended.value.code() == grpc.StatusCode.PERMISSION_DENIED) is refused, ended.value.details()


def test_the_stacks_readiness_check_presents_the_operator_certificate(mesh: MeshOnTls) -> None:
    """`servegrid up` waits on each service's health over mTLS with the `cli` certificate (health is open to
    every certificate, even where the allowlist, as here, leaves `cli` out)."""
    assert grpc_ready(mesh.registry.address, mesh.certs["cli"], "registry")
    with pytest.raises(grpc.RpcError) as refused:
        grpc_ready(mesh.registry.address)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_service_without_tls_says_it_trusts_identity_headers_from_anyone(tmp_path: Path) -> None:
    registry = start_service("registry", "tests.support.fake_registry", "SERVEGRID_FAKE_REGISTRY_", tmp_path, {})
    try:
        gateway = start_service(
            "gateway",
            "services.gateway",
            "SERVEGRID_GATEWAY_",
            tmp_path,
            {
                "SERVEGRID_GATEWAY_REGISTRY_ADDRESS": registry.address,
                "SERVEGRID_GATEWAY_INFERENCE_ADDRESS": "127.0.0.1:1",
            },
        )
        gateway.stop()
    finally:
        registry.stop()
    assert "identity headers (x-servegrid-tenant" in gateway.log_path.read_text()


@pytest.fixture(scope="module")
def edge_mesh(tmp_path_factory: pytest.TempPathFactory, datastores: SessionDatastores) -> Iterator[EdgeStack]:
    """The front door with a real edge (PostgreSQL, Redis), everything inside on mutual TLS."""
    state = tmp_path_factory.mktemp("mtls-edge")
    with edge_stack(state, datastores, "127.0.0.1:1", {}, certs=certs.generate(state / "certs")) as running:
        yield running


async def test_api_keys_are_checked_and_exchanged_by_the_edge_over_tls(edge_mesh: EdgeStack) -> None:
    from tests.support.polling import wait_until

    _, api_key = edge_mesh.create_key("acme")
    with grpc.insecure_channel(edge_mesh.envoy.address) as channel:
        # ext_authz (cluster edge) and the quota stream (edge_quota) both cross to the edge over mTLS.
        models = gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
            gateway_pb2.ListModelsRequest(), metadata=[("x-api-key", api_key)], timeout=10
        )
    assert [m.model_id for m in models.models] == ["affine", "digits"]
    exchanged = http("POST", f"{edge_mesh.envoy.url}/v1/auth:token", {}, {"x-api-key": api_key})
    assert exchanged.status == 200, exchanged.body
    assert exchanged.json()["tenant"] == "acme"
    # Fail-open quotas would hide a broken quota stream: its TLS handshake must have happened.
    handshakes = "cluster.edge_quota.ssl.handshake"
    await wait_until(lambda: edge_mesh.envoy.stats(handshakes).get(handshakes, 0) > 0)
    assert edge_mesh.envoy.stats("cluster.edge.ssl.handshake")["cluster.edge.ssl.handshake"] > 0


def test_the_edge_answers_only_envoy(edge_mesh: EdgeStack) -> None:
    from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc

    gateway = certs.files_for(edge_mesh.state_dir / "certs", "gateway")
    with (
        open_sync_channel(edge_mesh.edge.address, tls=gateway, peer="edge") as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        external_auth_pb2_grpc.AuthorizationStub(channel).Check(external_auth_pb2.CheckRequest(), timeout=5)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
