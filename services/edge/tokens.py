"""API key → short-lived JWT exchange (servegrid.gateway.v1.AuthService), and the edge's signing key."""

# Why: every plain API-key request costs Envoy an ext_authz call to the edge. A client that swaps its
# key for a JWT once (CreateAccessToken) sends that JWT instead, which Envoy verifies on its own with
# the JWKS written next to the signing key (a second jwt_authn provider, services/mesh/auth.py).
#
# The key is checked straight against PostgreSQL, never through the Redis cache, so a revoked key
# cannot exchange even once more. A token already minted stays valid until its `exp`: revocation is
# complete within one token lifetime (EdgeSettings.token_ttl_s).
#
# The signing key is an EC P-256 key (ES256: small tokens, fast to verify); its `kid` is the RFC 7638
# thumbprint of the public key, so the edge and the JWKS agree without sharing anything but the key.

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from google.protobuf import timestamp_pb2
from servegrid.gateway.v1 import gateway_pb2, gateway_pb2_grpc

from services.edge.keys import KEY_PREFIX, ApiKeyStore, hash_key
from services.edge.metrics import count_decision
from services.mesh import names
from services.mesh.names import API_KEY_HEADER
from services.runtime.errors import Unauthenticated, Unimplemented

if TYPE_CHECKING:
    from services.edge.settings import EdgeSettings
    from services.runtime import ServiceApp

log = logging.getLogger(__name__)

SIGNING_KEY_FILE = "token-signing-key.pem"
JWKS_FILE = "token-jwks.json"
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True)
class SigningKey:
    """A private key (RSA → RS256, EC P-256 → ES256), its kid, and the JWKS that verifies it."""

    private_key: PrivateKey
    key_id: str

    @property
    def algorithm(self) -> str:
        return "RS256" if isinstance(self.private_key, rsa.RSAPrivateKey) else "ES256"

    @classmethod
    def generate_ec(cls) -> SigningKey:
        return cls.from_private_key(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_private_key(cls, private_key: PrivateKey, key_id: str = "") -> SigningKey:
        key = cls(private_key, "")
        return cls(private_key, key_id or key.thumbprint())

    @classmethod
    def load(cls, path: Path, key_id: str = "") -> SigningKey:
        """The PEM private key at `path` (PKCS#8 or SEC1); kid defaults to its thumbprint."""
        private_key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        if not isinstance(private_key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
            raise ValueError(f"{path}: an RSA or EC P-256 private key is needed")
        if isinstance(private_key, ec.EllipticCurvePrivateKey) and not isinstance(private_key.curve, ec.SECP256R1):
            raise ValueError(f"{path}: EC keys must be on P-256 (ES256)")
        return cls.from_private_key(private_key, key_id)

    def public_jwk(self) -> dict[str, Any]:
        public = self.private_key.public_key()
        if isinstance(public, rsa.RSAPublicKey):
            jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public))
        else:
            jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(public))
        return {k: jwk[k] for k in ("kty", "crv", "x", "y", "n", "e") if k in jwk}

    def thumbprint(self) -> str:
        """RFC 7638: SHA-256 of the required members, sorted, without whitespace."""
        canonical = json.dumps(self.public_jwk(), sort_keys=True, separators=(",", ":"))
        return _b64url(hashlib.sha256(canonical.encode()).digest())

    def jwks(self) -> dict[str, Any]:
        return {"keys": [{**self.public_jwk(), "kid": self.key_id, "alg": self.algorithm, "use": "sig"}]}

    def sign(self, claims: dict[str, Any]) -> str:
        return jwt.encode(claims, self.private_key, algorithm=self.algorithm, headers={"kid": self.key_id})

    def write(self, key_path: Path, jwks_path: Path) -> None:
        """The private key (owner-only, PKCS#8 PEM) and the JWKS Envoy reads."""
        key_path.parent.mkdir(parents=True, exist_ok=True)
        pem = self.private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(pem)
        jwks_path.parent.mkdir(parents=True, exist_ok=True)
        jwks_path.write_text(json.dumps(self.jwks(), indent=2))


def load_or_create_signing_key(directory: Path) -> tuple[SigningKey, Path]:
    """The edge's key under `directory` (an EC key and its JWKS, made on first use); returns the key and
    the JWKS path. The JWKS is rewritten from the key each time, so the two cannot drift."""
    key_path, jwks_path = directory / SIGNING_KEY_FILE, directory / JWKS_FILE
    key = SigningKey.load(key_path) if key_path.exists() else SigningKey.generate_ec()
    key.write(key_path, jwks_path)
    return key, jwks_path


@dataclass(frozen=True)
class AccessToken:
    token: str
    issued_at: int
    expires_at: int
    tenant: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class TokenMinter:
    """Mints the exchanged tokens: the claims Envoy's second jwt_authn provider and RBAC expect."""

    key: SigningKey
    issuer: str
    audience: str
    ttl_s: int
    clock: Callable[[], float] = time.time

    def mint(self, tenant: str, subject: str, roles: Sequence[str]) -> AccessToken:
        now = int(self.clock())
        claims = {
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "tenant": tenant,
            "roles": list(roles),
            "iat": now,
            "nbf": now,
            "exp": now + self.ttl_s,
        }
        return AccessToken(self.key.sign(claims), now, now + self.ttl_s, tenant, tuple(roles))


class TokenExchange:
    """The exchange itself, transport-agnostic: a presented key in, a token or a refusal out."""

    def __init__(
        self, store: ApiKeyStore, minter: TokenMinter | None, charge: Callable[[str], Awaitable[None]] | None = None
    ) -> None:
        self.store = store
        self.minter = minter
        # Counts the exchange against the key's tenant (services/edge/quota.py DirectCharge); raises
        # RESOURCE_EXHAUSTED when the tenant's limit is used up.
        self.charge = charge

    async def exchange(self, api_key: str) -> AccessToken:
        if self.minter is None:
            raise Unimplemented(
                "this deployment does not exchange API keys for tokens: send the key as x-api-key on each call",
                reason="TOKEN_EXCHANGE_DISABLED",
            )
        if not api_key:
            raise Unauthenticated("send the API key to exchange in the x-api-key header", reason="API_KEY_MISSING")
        if not api_key.startswith(KEY_PREFIX) or len(api_key) > 200:
            raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        # Straight to PostgreSQL: no cache, so a revocation a moment ago is already seen.
        record = await self.store.lookup(hash_key(api_key))
        if record is None:
            count_decision("token", "invalid")
            raise Unauthenticated("invalid API key", reason="API_KEY_INVALID")
        if not record.active:
            count_decision("token", "revoked")
            raise Unauthenticated(f"API key {record.key_id} has been revoked", reason="API_KEY_REVOKED")
        if self.charge is not None:
            await self.charge(record.tenant)
        count_decision("token", "ok")
        return self.minter.mint(record.tenant, f"apikey:{record.key_id}", record.roles)


def _api_key(context: grpc.aio.ServicerContext) -> str:
    """The presented key: Envoy copies x-api-key into EXCHANGE_KEY_HEADER on the exchange route (the
    listener strips x-api-key before any upstream); a direct call may send x-api-key itself."""
    metadata = {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
    return metadata.get(names.EXCHANGE_KEY_HEADER) or metadata.get(API_KEY_HEADER, "")


class AuthServicer(gateway_pb2_grpc.AuthServiceServicer):
    """servegrid.gateway.v1.AuthService on the edge (the service holding the hashed keys)."""

    def __init__(self, exchange: TokenExchange) -> None:
        self.exchange = exchange

    async def CreateAccessToken(
        self, request: gateway_pb2.CreateAccessTokenRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.CreateAccessTokenResponse:
        token = await self.exchange.exchange(_api_key(context))
        return gateway_pb2.CreateAccessTokenResponse(
            access_token=token.token,
            token_type="Bearer",
            expire_time=timestamp_pb2.Timestamp(seconds=token.expires_at),
            expires_in=token.expires_at - token.issued_at,
            tenant=token.tenant,
            roles=list(token.roles),
        )


def token_minter(settings: EdgeSettings) -> TokenMinter | None:
    """The minter the settings describe, or None when no signing key is configured (exchange off)."""
    if not settings.token_signing_key_file:
        return None
    key = SigningKey.load(Path(settings.token_signing_key_file))
    return TokenMinter(key, settings.token_issuer, settings.token_audience, settings.token_ttl_s)


def add_token_exchange(
    app: ServiceApp, settings: EdgeSettings, store: ApiKeyStore, charge: Callable[[str], Awaitable[None]] | None
) -> None:
    """Serve AuthService on the edge's server (through the runtime's interceptor: errors keep their
    ErrorInfo). Without a signing key it still answers, UNIMPLEMENTED, so clients fall back cleanly."""
    servicer = AuthServicer(TokenExchange(store, token_minter(settings), charge))
    app.add_servicer(gateway_pb2_grpc.add_AuthServiceServicer_to_server, servicer, names.AUTH_SERVICE)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m services.edge.tokens", description="Make the edge's token signing key and its JWKS."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help=f"write {SIGNING_KEY_FILE} (0600) and {JWKS_FILE} into DIR")
    keygen.add_argument("dir", type=Path)
    args = parser.parse_args(argv)
    key, jwks = load_or_create_signing_key(args.dir)
    print(json.dumps({"key_id": key.key_id, "signing_key": str(args.dir / SIGNING_KEY_FILE), "jwks": str(jwks)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
