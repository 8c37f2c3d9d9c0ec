"""API keys an attacker guesses, bends or replays after revocation, through a real Envoy and edge.

Each is refused with the reason the API-key check gives (services/edge/authz.py) on a plain request, and
with the exchange's own (services/edge/tokens.py) on `POST /v1/auth:token`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import pytest
from google.rpc import code_pb2

from services.edge.authz import API_KEY_INVALID, API_KEY_REVOKED
from tests.security.support import (
    TENANT_A,
    Keys,
    assert_models_listed,
    list_models_grpc,
    list_models_rest,
    raw_request,
)
from tests.support.edge_stack import EdgeStack, http
from tests.support.errors import assert_grpc_error, assert_rest_error

pytestmark = pytest.mark.integration

UNAUTHENTICATED = code_pb2.UNAUTHENTICATED
MISSING = "UNAUTHENTICATED_MISSING"


@dataclass(frozen=True)
class BadKey:
    """An x-api-key value (from the package's keys) and the reasons: plain request, then the exchange."""

    value: Callable[[Keys], str]
    reason: str
    exchange_reason: str  # "": not sent to the exchange here (see its own test)


BAD_KEYS: dict[str, BadKey] = {
    "revoked": BadKey(lambda k: k.revoked, API_KEY_REVOKED, "API_KEY_REVOKED"),
    "wrong-prefix": BadKey(lambda k: "sk_live_" + k.user[len("sgk_") :], API_KEY_INVALID, "API_KEY_INVALID"),
    "upper-case-prefix": BadKey(lambda k: "SGK_" + k.user[len("sgk_") :], API_KEY_INVALID, "API_KEY_INVALID"),
    # Within gRPC's metadata limits only probabilistically on the exchange: tested there at 32 KB.
    "10-kb": BadKey(lambda k: "sgk_" + "a" * 10_240, API_KEY_INVALID, ""),
    # The id of a real key, with a secret of the right shape that is not its own.
    "right-id-wrong-secret": BadKey(
        lambda k: f"sgk_{k.user_id}_" + "A" * len(k.user.rsplit("_", 1)[1]), API_KEY_INVALID, "API_KEY_INVALID"
    ),
    "real-key-plus-a-suffix": BadKey(lambda k: k.user + "x", API_KEY_INVALID, "API_KEY_INVALID"),
    "real-key-truncated": BadKey(lambda k: k.user[:-1], API_KEY_INVALID, "API_KEY_INVALID"),
}


@pytest.mark.parametrize("bad", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def test_a_bad_api_key_is_refused_with_its_reason(stack: EdgeStack, keys: Keys, bad: BadKey) -> None:
    credential = {"x-api-key": bad.value(keys)}
    assert_rest_error(list_models_rest(stack.envoy, credential), 401, UNAUTHENTICATED, bad.reason)
    error = list_models_grpc(stack.envoy.address, list(credential.items()))
    assert isinstance(error, grpc.RpcError), error
    assert_grpc_error(error, UNAUTHENTICATED, bad.reason)
    if bad.exchange_reason:
        exchanged = http("POST", f"{stack.envoy.url}/v1/auth:token", {}, credential)
        assert_rest_error(exchanged, 401, UNAUTHENTICATED, bad.exchange_reason)


def test_an_oversized_api_key_does_not_exchange(stack: EdgeStack) -> None:
    # Past gRPC's default metadata limits (8 KiB soft, 16 KiB hard) the edge's server refused the call
    # as RESOURCE_EXHAUSTED, at random in between; services accept what Envoy forwards (60 KiB).
    exchanged = http("POST", f"{stack.envoy.url}/v1/auth:token", {}, {"x-api-key": "sgk_" + "a" * 32_768})
    assert_rest_error(exchanged, 401, UNAUTHENTICATED, "API_KEY_INVALID")


def test_the_good_key_works(stack: EdgeStack, keys: Keys) -> None:
    """The positive control: the key the bad ones were made from lists the catalogue and exchanges."""
    assert_models_listed(list_models_rest(stack.envoy, {"x-api-key": keys.user}))
    exchanged = http("POST", f"{stack.envoy.url}/v1/auth:token", {}, {"x-api-key": keys.user})
    assert exchanged.status == 200, exchanged.body
    assert exchanged.json()["tenant"] == TENANT_A


def test_an_empty_api_key_is_no_credential(stack: EdgeStack) -> None:
    reply = raw_request(stack.envoy, "GET", "/v1/models", [("x-api-key", "")])
    assert_rest_error(reply, 401, UNAUTHENTICATED, MISSING)
    error = list_models_grpc(stack.envoy.address, [("x-api-key", "")])
    assert isinstance(error, grpc.RpcError), error
    assert_grpc_error(error, UNAUTHENTICATED, MISSING)


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("sgk_ключ_секрет".encode(), id="utf-8"),
        pytest.param("sgk_clé_secrète".encode("latin-1"), id="latin-1"),
    ],
)
def test_a_non_ascii_api_key_is_invalid(stack: EdgeStack, value: bytes) -> None:
    """Bytes no key can contain: the key check's own refusal, never an error of the check itself."""
    reply = raw_request(stack.envoy, "GET", "/v1/models", [("x-api-key", value)])
    assert_rest_error(reply, 401, UNAUTHENTICATED, API_KEY_INVALID)


@pytest.mark.parametrize("parameter", ["api_key", "x-api-key", "key"])
def test_an_api_key_in_the_query_string_does_not_authenticate(stack: EdgeStack, keys: Keys, parameter: str) -> None:
    reply = http("GET", f"{stack.envoy.url}/v1/models?{parameter}={keys.user}")
    assert_rest_error(reply, 401, UNAUTHENTICATED, MISSING)
