"""Edge service cores without servers: settings, key format and hashing, the API-key decision."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest
from envoy.config.core.v3 import base_pb2 as core
from envoy.service.auth.v3 import attribute_context_pb2

from services.edge.authz import ApiKeyAuthorizer, caller_of, check_response
from services.edge.keys import KEY_PREFIX, ApiKey, hash_key, new_key, validate_identity
from services.edge.settings import EdgeSettings


def test_default_limit_is_100_per_minute(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SERVEGRID_EDGE_DEFAULT_LIMIT", "SERVEGRID_EDGE_LIMIT_UNIT"):
        monkeypatch.delenv(name, raising=False)
    settings = EdgeSettings()
    assert (settings.default_limit, settings.limit_unit) == (100, "minute")


def test_settings_read_the_stack_wide_database_and_redis_names(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVEGRID_EDGE_DATABASE_URL", raising=False)
    monkeypatch.setenv("SERVEGRID_DATABASE_URL", "postgresql://elsewhere/db")
    monkeypatch.setenv("SERVEGRID_EDGE_TENANT_LIMITS", '{"acme": 7}')
    settings = EdgeSettings()
    assert settings.database_url == "postgresql://elsewhere/db"
    assert settings.tenant_limits == {"acme": 7}


def test_keys_are_high_entropy_and_only_their_hash_is_kept() -> None:
    key_id, key = new_key()
    assert key.startswith(f"{KEY_PREFIX}{key_id}_") and len(key) > 50
    assert hash_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert new_key()[1] != key


@pytest.mark.parametrize("tenant", ["", "Acme", "a b", "x" * 65, "t\nx"])
def test_identity_names_must_be_plain(tenant: str) -> None:
    with pytest.raises(ValueError):
        validate_identity(tenant, ["user"])


class _Store:
    def __init__(self, records: dict[str, ApiKey]) -> None:
        self.records = records
        self.lookups = 0

    async def lookup(self, key_hash: str) -> ApiKey | None:
        self.lookups += 1
        return self.records.get(key_hash)


class _Cache:
    def __init__(self) -> None:
        self.values: dict[str, dict[str, Any]] = {}

    async def get(self, key_hash: str) -> dict[str, Any] | None:
        return self.values.get(key_hash)

    async def put(self, key_hash: str, value: dict[str, Any]) -> None:
        self.values[key_hash] = value


def _record(key_id: str, revoked: bool = False) -> ApiKey:
    now = datetime.now(UTC)
    return ApiKey(key_id, "acme", ("user", "admin"), "", now, now if revoked else None)


async def test_api_key_decisions_and_caching() -> None:
    good_id, good = new_key()
    gone_id, gone = new_key()
    store = _Store({hash_key(good): _record(good_id), hash_key(gone): _record(gone_id, revoked=True)})
    authorizer = ApiKeyAuthorizer(store, _Cache())  # type: ignore[arg-type]

    allowed = await authorizer.decide(good)
    assert allowed.allowed and allowed.tenant == "acme" and allowed.roles == ("user", "admin")
    await authorizer.decide(good)
    assert store.lookups == 1  # the second check came from the cache

    revoked = await authorizer.decide(gone)
    assert not revoked.allowed and "revoked" in revoked.message
    assert (await authorizer.decide(None)).outcome == "missing"
    assert (await authorizer.decide("not-a-key")).outcome == "invalid"
    assert (await authorizer.decide(new_key()[1])).outcome == "invalid"


async def test_check_response_sets_identity_and_drops_the_key() -> None:
    key_id, key = new_key()
    authorizer = ApiKeyAuthorizer(_Store({hash_key(key): _record(key_id)}), _Cache())  # type: ignore[arg-type]
    response = check_response(await authorizer.decide(key))
    assert response.WhichOneof("http_response") == "ok_response"
    headers = {h.header.key: h.header.value for h in response.ok_response.headers}
    assert headers["x-servegrid-tenant"] == "acme"
    assert headers["x-servegrid-roles"] == "user,admin"
    assert list(response.ok_response.headers_to_remove) == ["x-api-key"]
    assert all(
        h.append_action == core.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for h in response.ok_response.headers
    )
    assert list(response.dynamic_metadata.fields["roles"].list_value) == ["user", "admin"]

    denied = check_response(await authorizer.decide(None))
    assert denied.denied_response.status.code == 401
    assert "x-api-key" in denied.denied_response.body


def _http(path: str, **headers: str) -> attribute_context_pb2.AttributeContext.HttpRequest:
    return attribute_context_pb2.AttributeContext.HttpRequest(path=path, headers=headers)


def test_caller_is_told_apart_by_content_type_or_path() -> None:
    assert caller_of(_http("/servegrid.gateway.v1.GatewayService/ListModels")) == "grpc"
    assert caller_of(_http("/inference.GRPCInferenceService/ModelInfer")) == "grpc"
    assert caller_of(_http("/v1/models/digits:infer")) == "rest"
    assert caller_of(_http("/v1/models?pageSize=2")) == "rest"
    assert caller_of(_http("/v2/models/affine/infer")) == "kserve"
    assert caller_of(_http("/v2")) == "kserve"
    # When ext_authz passes the content-type, it decides.
    assert caller_of(_http("/v1/models", **{"content-type": "application/grpc"})) == "grpc"
    assert caller_of(_http("/a.B/C", **{"content-type": "application/json"})) == "rest"


async def test_denials_come_in_the_callers_shape() -> None:
    import json

    from google.rpc import error_details_pb2, status_pb2

    gone_id, gone = new_key()
    authorizer = ApiKeyAuthorizer(_Store({hash_key(gone): _record(gone_id, revoked=True)}), _Cache())  # type: ignore[arg-type]
    decisions = {
        "UNAUTHENTICATED_MISSING": await authorizer.decide(None),
        "UNAUTHENTICATED_API_KEY_INVALID": await authorizer.decide("sgk_nope"),
        "UNAUTHENTICATED_API_KEY_REVOKED": await authorizer.decide(gone),
    }
    for reason, decision in decisions.items():
        assert decision.reason == reason
        rest = check_response(decision, "rest").denied_response
        body = json.loads(rest.body)
        assert body["code"] == 16 and body["message"] == decision.message
        assert body["details"] == [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": reason, "domain": "servegrid.dev"}
        ]
        assert {h.header.key: h.header.value for h in rest.headers}["content-type"] == "application/json"
        assert json.loads(check_response(decision, "kserve").denied_response.body) == {"error": decision.message}
        # gRPC: Envoy makes the body the grpc-message, so it is the sentence the details repeat.
        grpc_reply = check_response(decision, "grpc").denied_response
        assert grpc_reply.body == decision.message and not grpc_reply.body.startswith("{")
        headers = {h.header.key: h.header.value for h in grpc_reply.headers}
        assert headers["grpc-status"] == "16" and "content-type" not in headers
        status = status_pb2.Status.FromString(base64.b64decode(headers["grpc-status-details-bin"]))
        info = error_details_pb2.ErrorInfo()
        assert (status.code, status.message) == (16, decision.message) and status.details[0].Unpack(info)
        assert info.reason == reason
