"""TLS on the public listener through a real Envoy, edge, gateway and router: HTTPS and gRPC over TLS on
one port (ALPN), verified with the local CA; plain HTTP and plaintext gRPC to that port get nowhere."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from servegrid_sdk import ServegridClient
from services.stack import certs
from tests.support.datastores import SessionDatastores
from tests.support.edge_stack import EdgeStack, edge_stack

pytestmark = pytest.mark.integration

TENANT = "tls-tenant"
NO_TRITON = "127.0.0.1:1"  # no KServe call here


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, datastores: SessionDatastores) -> Iterator[tuple[EdgeStack, Path]]:
    state = tmp_path_factory.mktemp("public-tls")
    public = certs.generate_public(state / "certs")
    overrides = {"public_tls_cert_file": str(public.cert), "public_tls_key_file": str(public.key)}
    with edge_stack(state, datastores, NO_TRITON, {}, envoy_overrides=overrides) as running:
        yield running, public.ca


def _https(url: str, ca: Path, token: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    context = ssl.create_default_context(cafile=str(ca))
    with urllib.request.urlopen(request, timeout=30, context=context) as reply:
        return reply.status, reply.read()


def test_rest_over_https_verified_with_the_ca(stack: tuple[EdgeStack, Path]) -> None:
    running, ca = stack
    port = running.envoy.port
    status, body = _https(f"https://127.0.0.1:{port}/v1/models", ca, running.issuer.token(TENANT))
    assert (status == 200 and "models" in json.loads(body)) or json.loads(body) == {}
    status, body = _https(f"https://localhost:{port}/openapi.json", ca, running.issuer.token(TENANT))
    assert status == 200 and json.loads(body)["openapi"]


def test_a_client_without_the_ca_refuses_the_certificate(stack: tuple[EdgeStack, Path]) -> None:
    running, _ = stack
    context = ssl.create_default_context()  # the system's roots: the local CA is not among them
    with pytest.raises(urllib.error.URLError, match="CERTIFICATE_VERIFY_FAILED"):
        urllib.request.urlopen(f"https://127.0.0.1:{running.envoy.port}/openapi.json", timeout=10, context=context)


def test_plain_http_to_the_tls_port_gets_no_http_answer(stack: tuple[EdgeStack, Path]) -> None:
    running, _ = stack
    connection = http.client.HTTPConnection("127.0.0.1", running.envoy.port, timeout=10)
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        connection.request("GET", "/openapi.json")
        connection.getresponse()
    connection.close()


@pytest.mark.parametrize(("offered", "chosen"), [(["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")])
def test_alpn_selects_h2_for_grpc_and_http11_for_rest(
    stack: tuple[EdgeStack, Path], offered: list[str], chosen: str
) -> None:
    running, ca = stack
    context = ssl.create_default_context(cafile=str(ca))
    context.set_alpn_protocols(offered)
    with (
        socket.create_connection(("127.0.0.1", running.envoy.port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
    ):
        assert tls.selected_alpn_protocol() == chosen
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_grpc_over_tls_and_the_sdk_s_ca_file(stack: tuple[EdgeStack, Path]) -> None:
    running, ca = stack
    token = running.issuer.token(TENANT)
    credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
    with grpc.secure_channel(running.envoy.address, credentials) as channel:
        gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(
            gateway_pb2.ListModelsRequest(), metadata=[("authorization", f"Bearer {token}")], timeout=10
        )
    with ServegridClient(running.envoy.address, token=token, ca_file=str(ca)) as client:
        assert isinstance(list(client.list_models()), list)  # an answer, not an RpcError


def test_plaintext_grpc_to_the_tls_port_is_unavailable(stack: tuple[EdgeStack, Path]) -> None:
    running, _ = stack
    with grpc.insecure_channel(running.envoy.address) as channel, pytest.raises(grpc.RpcError) as caught:
        gateway_pb2_grpc.GatewayServiceStub(channel).ListModels(gateway_pb2.ListModelsRequest(), timeout=5)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
