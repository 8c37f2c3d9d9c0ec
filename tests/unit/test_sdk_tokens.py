"""The Python SDK's API-key exchange: one exchange for many calls, a refresh before expiry, and the
fallback to the plain key where the server has no exchange (real gRPC servers on port 0)."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest
from google.protobuf import timestamp_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from servegrid_sdk import ServegridClient, ServegridError

API_KEY = "sgk_test_secret"


@dataclass
class Clock:
    now: float = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Server:
    """AuthService and GatewayService.ListModels, recording what each call carried."""

    clock: Clock
    exchange: bool = True
    lifetime_s: int = 300
    revoked: bool = False
    exchanges: int = 0
    credentials: list[str] = field(default_factory=list)
    valid_tokens: set[str] = field(default_factory=set)


class Auth(gateway_pb2_grpc.AuthServiceServicer):
    def __init__(self, server: Server) -> None:
        self.server = server

    def CreateAccessToken(
        self, request: object, context: grpc.ServicerContext
    ) -> gateway_pb2.CreateAccessTokenResponse:
        if not self.server.exchange:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "no exchange here")
        if dict(context.invocation_metadata()).get("x-api-key") != API_KEY or self.server.revoked:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "API key has been revoked")
        self.server.exchanges += 1
        token = f"token-{self.server.exchanges}"
        self.server.valid_tokens.add(token)
        expires = int(self.server.clock.now) + self.server.lifetime_s
        return gateway_pb2.CreateAccessTokenResponse(
            access_token=token,
            token_type="Bearer",
            expire_time=timestamp_pb2.Timestamp(seconds=expires),
            expires_in=self.server.lifetime_s,
        )


class Gateway(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, server: Server) -> None:
        self.server = server

    def ListModels(self, request: object, context: grpc.ServicerContext) -> gateway_pb2.ListModelsResponse:
        metadata = dict(context.invocation_metadata())
        credential = metadata.get("authorization", "").removeprefix("Bearer ") or f"key:{metadata.get('x-api-key')}"
        self.server.credentials.append(credential)
        if credential.startswith("token-") and credential not in self.server.valid_tokens:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "token not accepted")
        return gateway_pb2.ListModelsResponse()


@pytest.fixture
def server() -> Iterator[tuple[Server, str]]:
    state = Server(Clock())
    grpc_server = grpc.server(futures.ThreadPoolExecutor(4))
    gateway_pb2_grpc.add_AuthServiceServicer_to_server(Auth(state), grpc_server)
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(Gateway(state), grpc_server)  # type: ignore[abstract]
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        yield state, f"127.0.0.1:{port}"
    finally:
        grpc_server.stop(None)


def test_one_exchange_serves_many_calls(server: tuple[Server, str]) -> None:
    state, target = server
    with ServegridClient(target, api_key=API_KEY, clock=state.clock) as client:
        for _ in range(10):
            list(client.list_models())
    assert state.exchanges == 1
    assert state.credentials == ["token-1"] * 10  # the key itself never went to the API


def test_the_token_is_refreshed_before_it_expires(server: tuple[Server, str]) -> None:
    state, target = server
    with ServegridClient(target, api_key=API_KEY, clock=state.clock) as client:
        list(client.list_models())
        state.clock.now += 239  # 61 s left of 300: still fresh
        list(client.list_models())
        assert state.exchanges == 1
        state.clock.now += 2  # 59 s left: inside the last fifth (at most a minute), exchange again
        list(client.list_models())
    assert state.exchanges == 2
    assert state.credentials == ["token-1", "token-1", "token-2"]


def test_a_refused_token_is_exchanged_again_once(server: tuple[Server, str]) -> None:
    state, target = server
    with ServegridClient(target, api_key=API_KEY, clock=state.clock) as client:
        list(client.list_models())
        state.valid_tokens.clear()  # e.g. the edge's signing key was rotated
        list(client.list_models())
    assert state.exchanges == 2


def test_a_revoked_key_fails_the_call_with_the_servers_reason(server: tuple[Server, str]) -> None:
    state, target = server
    state.revoked = True
    with ServegridClient(target, api_key=API_KEY, clock=state.clock) as client, pytest.raises(ServegridError) as err:
        list(client.list_models())
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED and "revoked" in err.value.message
    assert state.credentials == []


def test_without_an_exchange_the_key_is_sent_on_each_call(server: tuple[Server, str]) -> None:
    state, target = server
    state.exchange = False
    with ServegridClient(target, api_key=API_KEY, clock=state.clock) as client:
        for _ in range(3):
            list(client.list_models())
    assert state.credentials == [f"key:{API_KEY}"] * 3


def test_the_exchange_can_be_turned_off(server: tuple[Server, str]) -> None:
    state, target = server
    with ServegridClient(target, api_key=API_KEY, exchange_api_key=False) as client:
        list(client.list_models())
    assert state.exchanges == 0 and state.credentials == [f"key:{API_KEY}"]
