"""The token exchange's core (signing key, minter, exchange decisions) and the Envoy config that trusts it."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
import pytest

from services.edge.keys import ApiKey, hash_key, validate_identity
from services.edge.tokens import SigningKey, TokenExchange, TokenMinter, load_or_create_signing_key
from services.mesh import names
from services.mesh.auth import TOKEN_PROVIDER
from services.mesh.bootstrap import EnvoyParams, render_config, render_yaml
from services.runtime.errors import Unauthenticated, Unimplemented
from tests.support.envoy import chart_descriptors, validate_config

KEY = "sgk_0123456789ab_" + "s" * 43


class FakeStore:
    """The one ApiKeyStore call the exchange makes, answering from a dict; counts lookups."""

    def __init__(self, records: dict[str, ApiKey]) -> None:
        self.records = records
        self.lookups = 0

    async def lookup(self, key_hash: str) -> ApiKey | None:
        self.lookups += 1
        return self.records.get(key_hash)


def record(revoked: bool = False) -> ApiKey:
    now = datetime.now(UTC)
    return ApiKey("0123456789ab", "acme", ("user",), "", now, now if revoked else None)


def minter(key: SigningKey, now: float = 1_000_000.0) -> TokenMinter:
    return TokenMinter(key, names.TOKEN_ISSUER, "servegrid", 300, clock=lambda: now)


def test_minted_claims_are_what_envoy_and_rbac_expect() -> None:
    key = SigningKey.generate_ec()
    token = minter(key).mint("acme", "apikey:k1", ["user"])
    claims = jwt.decode(
        token.token,
        jwt.PyJWK(key.jwks()["keys"][0]).key,
        algorithms=["ES256"],
        audience="servegrid",
        options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
    )
    assert claims == {
        "iss": names.TOKEN_ISSUER,
        "aud": "servegrid",
        "sub": "apikey:k1",
        "tenant": "acme",
        "roles": ["user"],
        "iat": 1_000_000,
        "nbf": 1_000_000,
        "exp": 1_000_300,
    }
    assert jwt.get_unverified_header(token.token)["kid"] == key.key_id
    assert token.expires_at - token.issued_at == 300


def test_the_key_id_is_the_rfc7638_thumbprint_so_a_reloaded_key_keeps_it(tmp_path: Path) -> None:
    key, jwks_path = load_or_create_signing_key(tmp_path)
    again, _ = load_or_create_signing_key(tmp_path)
    assert again.key_id == key.key_id
    assert json.loads(jwks_path.read_text()) == key.jwks()
    assert (tmp_path / "token-signing-key.pem").stat().st_mode & 0o777 == 0o600
    # The RFC 7638 example key (section 3.1) has this thumbprint.
    rfc = {"kty": "RSA", "e": "AQAB", "n": RFC7638_N}
    public = jwt.algorithms.RSAAlgorithm.from_jwk(json.dumps(rfc))
    assert SigningKey(_with_public(public), "").thumbprint() == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


async def test_the_exchange_checks_the_store_every_time_and_refuses_revoked_and_unknown_keys() -> None:
    key = SigningKey.generate_ec()
    store = FakeStore({hash_key(KEY): record()})
    exchange = TokenExchange(store, minter(key))  # type: ignore[arg-type]
    assert (await exchange.exchange(KEY)).tenant == "acme"
    assert (await exchange.exchange(KEY)).tenant == "acme"
    assert store.lookups == 2  # no cache: a revocation is seen by the next exchange
    store.records[hash_key(KEY)] = record(revoked=True)
    with pytest.raises(Unauthenticated) as revoked:
        await exchange.exchange(KEY)
    assert revoked.value.reason == "API_KEY_REVOKED"
    for bad, why in [("", "API_KEY_MISSING"), ("not-a-key", "API_KEY_INVALID"), (KEY + "x", "API_KEY_INVALID")]:
        with pytest.raises(Unauthenticated) as refused:
            await exchange.exchange(bad)
        assert refused.value.reason == why


async def test_without_a_signing_key_the_exchange_is_unimplemented() -> None:
    with pytest.raises(Unimplemented) as off:
        await TokenExchange(FakeStore({}), None).exchange(KEY)  # type: ignore[arg-type]
    assert off.value.reason == "TOKEN_EXCHANGE_DISABLED"


@pytest.mark.parametrize(
    ("tenant", "ok"),
    [
        *[("acme", True), ("a" * 64, True), ("org:team.a_b-c", True)],
        *[("", False), ("a" * 65, False), ("ACME", False), ("acme\r\n", False), ("acme\n", False), ("ac me", False)],
    ],
)
def test_one_tenant_rule_for_keys_and_envoy(tenant: str, ok: bool) -> None:
    assert bool(re.fullmatch(names.TENANT_PATTERN, tenant)) is ok
    # Envoy's two regexes (charset, then length) say the same as the one pattern.
    envoy_ok = bool(re.fullmatch(f"{names.TENANT_CHARS}+", tenant)) and len(tenant) <= names.TENANT_MAX_LENGTH
    assert envoy_ok is ok
    if ok:
        validate_identity(tenant, ["user"])
    else:
        with pytest.raises(ValueError):
            validate_identity(tenant, ["user"])


def _jwt_config(params: EnvoyParams) -> dict[str, Any]:
    hcm = render_config(params)["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]
    (jwt_filter,) = [f for f in hcm["typed_config"]["http_filters"] if f["name"] == names.JWT_FILTER]
    return dict(jwt_filter["typed_config"])


def test_every_provider_requires_exp_bounds_the_lifetime_and_caches_verified_tokens() -> None:
    config = _jwt_config(EnvoyParams(jwt_max_lifetime_s=7200, token_max_lifetime_s=600))
    providers = config["providers"]
    assert set(providers) == {"servegrid", TOKEN_PROVIDER}
    assert providers["servegrid"]["max_lifetime"] == "7200s"
    assert providers[TOKEN_PROVIDER]["max_lifetime"] == "600s"
    assert providers[TOKEN_PROVIDER]["issuer"] == names.TOKEN_ISSUER
    for provider in providers.values():
        assert provider["require_expiration"] is True
        assert provider["jwt_cache_config"]["jwt_cache_size"] > 0
    requirements = config["rules"][-1]["requires"]["requires_any"]["requirements"]
    assert requirements == [{"provider_name": "servegrid"}, {"provider_name": TOKEN_PROVIDER}, {"allow_missing": {}}]
    # No token JWKS: only the identity provider; 0: no lifetime bound beyond exp itself.
    alone = _jwt_config(EnvoyParams(token_jwks_file="", jwt_max_lifetime_s=0))["providers"]
    assert set(alone) == {"servegrid"} and "max_lifetime" not in alone["servegrid"]


def test_the_bootstrap_cli_sets_the_lifetimes(tmp_path: Path) -> None:
    from services.mesh.bootstrap import main

    out = tmp_path / "envoy.yaml"
    assert main(["--jwt-max-lifetime-s", "3600", "--token-max-lifetime-s", "120", "--out", str(out)]) == 0
    text = out.read_text()
    assert "max_lifetime: 3600s" in text and "max_lifetime: 120s" in text


def test_the_chart_config_with_tokens_passes_envoy_validate(tmp_path: Path) -> None:
    from services.edge.devkeys import DevIssuer

    _, token_jwks = load_or_create_signing_key(tmp_path / "tokens")
    idp = DevIssuer.generate().write(tmp_path / "idp")
    params = EnvoyParams.for_profile(
        "kubernetes",
        token_jwks_file=str(token_jwks),
        jwks_uri="",
        jwks_file=str(idp),
        descriptor_file=chart_descriptors(tmp_path),
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(params))
    result = validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


RFC7638_N = (
    "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhM"
    "stn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvR"
    "L5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
)


def _with_public(public: Any) -> Any:
    """A stand-in private key whose public half is `public` (the thumbprint reads only that)."""

    class _Private:
        def public_key(self) -> Any:
            return public

    return _Private()
