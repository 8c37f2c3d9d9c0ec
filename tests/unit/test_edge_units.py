"""Edge service cores without servers: limit policy, key format and hashing, the API-key decision."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from typing import Any

import pytest

from services.edge.authz import ApiKeyAuthorizer, check_response
from services.edge.envoy_api import external_auth_pb2 as pb
from services.edge.keys import KEY_PREFIX, ApiKey, hash_key, new_key, validate_identity
from services.edge.limits import LimitPolicy
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


def test_limit_policy() -> None:
    policy = LimitPolicy(100, {"acme": 1000}, {"infer": 50, "acme/infer": 500})
    assert policy.limit_for([("tenant", "globex")]).requests == 100  # type: ignore[union-attr]
    assert policy.limit_for([("tenant", "acme")]).requests == 1000  # type: ignore[union-attr]
    assert policy.limit_for([("tenant", "globex"), ("route", "infer")]).requests == 50  # type: ignore[union-attr]
    assert policy.limit_for([("tenant", "acme"), ("route", "infer")]).requests == 500  # type: ignore[union-attr]
    assert policy.limit_for([("tenant", "acme"), ("route", "admin")]) is None
    assert policy.limit_for([("remote_address", "1.2.3.4")]) is None
    assert policy.limit_for([("tenant", "")]) is None
    # Tenant and route counters never share a key.
    tenant, route = policy.limit_for([("tenant", "acme")]), policy.limit_for([("tenant", "acme"), ("route", "infer")])
    assert tenant is not None and route is not None and tenant.counter != route.counter


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
    assert all(h.append_action == pb.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD for h in response.ok_response.headers)
    assert list(response.dynamic_metadata.fields["roles"].list_value) == ["user", "admin"]

    denied = check_response(await authorizer.decide(None))
    assert denied.denied_response.status.code == 401
    assert "x-api-key" in denied.denied_response.body
