"""A development JWT issuer: an RS256 signing key, its JWKS for Envoy, and a token minter."""

# For the local stack and tests only. Production tokens come from a real identity provider whose
# JWKS URI the Kubernetes profile points at; nothing here is used there.

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import rsa

from services.edge.tokens import SigningKey

DEFAULT_DIR = Path(".servegrid") / "edge"
DEFAULT_ISSUER = "https://auth.servegrid.local"
DEFAULT_AUDIENCE = "servegrid"
KEY_FILE = "jwt-signing-key.pem"
JWKS_FILE = "jwks.json"


@dataclass(frozen=True)
class DevIssuer:
    """Signs tokens with one RSA key (as a typical identity provider does); `jwks` is what Envoy
    verifies them against. The key handling is the edge's own (services/edge/tokens.py SigningKey)."""

    private_key: rsa.RSAPrivateKey
    key_id: str
    issuer: str = DEFAULT_ISSUER
    audience: str = DEFAULT_AUDIENCE

    @classmethod
    def generate(cls, issuer: str = DEFAULT_ISSUER, audience: str = DEFAULT_AUDIENCE) -> DevIssuer:
        return cls(
            rsa.generate_private_key(public_exponent=65537, key_size=2048), uuid.uuid4().hex[:12], issuer, audience
        )

    @classmethod
    def load_or_create(
        cls, directory: Path = DEFAULT_DIR, issuer: str = DEFAULT_ISSUER, audience: str = DEFAULT_AUDIENCE
    ) -> DevIssuer:
        """The key under `directory` (made, with its JWKS, on first use; the key file is 0600)."""
        key_path = directory / KEY_FILE
        if key_path.exists():
            kid = json.loads((directory / JWKS_FILE).read_text())["keys"][0]["kid"]
            key = SigningKey.load(key_path, kid).private_key
            assert isinstance(key, rsa.RSAPrivateKey)
            return cls(key, kid, issuer, audience)
        dev = cls.generate(issuer, audience)
        dev.write(directory)
        return dev

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.private_key, self.key_id)

    def write(self, directory: Path) -> Path:
        """Write the private key (owner-only) and the JWKS; returns the JWKS path."""
        self.signing_key.write(directory / KEY_FILE, directory / JWKS_FILE)
        return directory / JWKS_FILE

    def jwks(self) -> dict[str, Any]:
        return self.signing_key.jwks()

    def token(
        self,
        tenant: str,
        *,
        subject: str = "dev-user",
        roles: Sequence[str] = ("user",),
        ttl_s: int = 3600,
        issuer: str | None = None,
        audience: str | list[str] | None = None,
        extra: dict[str, Any] | None = None,
        omit: Sequence[str] = (),
    ) -> str:
        """A signed token; `extra` overrides or adds claims, `omit` drops some (tests: a token without exp)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "iss": issuer if issuer is not None else self.issuer,
            "aud": audience if audience is not None else self.audience,
            "sub": subject,
            "tenant": tenant,
            "roles": list(roles),
            "iat": now,
            "nbf": now - 5,
            "exp": now + ttl_s,
            **(extra or {}),
        }
        for name in omit:
            claims.pop(name, None)
        return self.signing_key.sign(claims)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.edge.devkeys", description=__doc__)
    parser.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="where the key and jwks.json live")
    parser.add_argument("--tenant", default="dev")
    parser.add_argument("--role", action="append", help="repeat for several roles")
    parser.add_argument("--ttl-s", type=int, default=3600)
    args = parser.parse_args(argv)
    issuer = DevIssuer.load_or_create(args.dir)
    print(issuer.token(args.tenant, roles=args.role or ["user"], ttl_s=args.ttl_s))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
