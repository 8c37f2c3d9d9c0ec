"""API keys: creation, lookup, listing and revocation (hashed in PostgreSQL), and the `keys` CLI."""

# A key is "sgk_<key_id>_<secret>" with a 256-bit random secret. Only SHA-256 of the whole key is
# stored: with that much entropy a fast hash cannot be brute-forced, so no slow KDF (which would
# cost milliseconds per request) or pepper is needed, and the hash itself is the lookup index.
# The key id is public (safe to log and show) and is what `list` and `revoke` name.

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import re
import secrets
import sys
from collections.abc import AsyncIterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from psycopg import sql
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from services.mesh.names import TENANT_PATTERN
from services.runtime.migrations import apply_migrations

if TYPE_CHECKING:
    from services.edge.settings import EdgeSettings

KEY_PREFIX = "sgk_"
_IDENTITY_NAME = re.compile(TENANT_PATTERN)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


@dataclass(frozen=True)
class ApiKey:
    """An API key's public record (never the secret)."""

    key_id: str
    tenant: str
    roles: tuple[str, ...]
    description: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(key: str) -> str:
    """Hex SHA-256 of the presented key, the only form stored or cached."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh (key_id, full key)."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def validate_identity(tenant: str, roles: Sequence[str]) -> None:
    """Tenant and role names travel as HTTP header values: keep them plain (the rule Envoy also
    applies to a JWT's tenant claim, names.TENANT_PATTERN)."""
    for name, value in [("tenant", tenant), *(("role", r) for r in roles)]:
        if not _IDENTITY_NAME.fullmatch(value):
            raise ValueError(f"{name} {value!r} must be 1-64 of [a-z0-9-_:.]")


class ApiKeyStore:
    """The api_keys table in its own schema."""

    def __init__(self, pool: AsyncConnectionPool[Any], schema: str) -> None:
        self.pool = pool
        self.schema = schema
        self._table = sql.Identifier(schema, "api_keys")

    async def migrate(self) -> None:
        """Apply migrations/*.sql once each (services/runtime/migrations.py)."""
        async with self.pool.connection() as conn:
            await apply_migrations(conn, self.schema, MIGRATIONS_DIR, component="edge")

    async def ping(self) -> None:
        async with self.pool.connection() as conn:
            await conn.execute("SELECT 1")

    async def create(self, tenant: str, roles: Sequence[str], description: str = "") -> tuple[ApiKey, str]:
        """Store a new key; returns its record and the full key, which is never shown again."""
        validate_identity(tenant, roles)
        key_id, key = new_key()
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                sql.SQL(
                    "INSERT INTO {} (key_id, key_hash, tenant, roles, description) VALUES (%s, %s, %s, %s, %s)"
                    " RETURNING key_id, tenant, roles, description, created_at, revoked_at"
                ).format(self._table),
                (key_id, hash_key(key), tenant, list(roles), description),
            )
            row = await cur.fetchone()
        assert row is not None
        return _record(row), key

    async def lookup(self, key_hash: str) -> ApiKey | None:
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                sql.SQL(
                    "SELECT key_id, tenant, roles, description, created_at, revoked_at FROM {} WHERE key_hash = %s"
                ).format(self._table),
                (key_hash,),
            )
            row = await cur.fetchone()
        return None if row is None else _record(row)

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        query = sql.SQL("SELECT key_id, tenant, roles, description, created_at, revoked_at FROM {}").format(self._table)
        params: tuple[str, ...] = ()
        if tenant:
            query += sql.SQL(" WHERE tenant = %s")
            params = (tenant,)
        query += sql.SQL(" ORDER BY created_at, key_id")
        async with self.pool.connection() as conn:
            cur = await conn.execute(query, params)
            rows = await cur.fetchall()
        return [_record(r) for r in rows]

    async def revoke(self, key_id: str) -> str | None:
        """Mark a key revoked; returns its hash (to evict from caches), None when no such key."""
        async with self.pool.connection() as conn:
            cur = await conn.execute(
                sql.SQL(
                    "UPDATE {} SET revoked_at = coalesce(revoked_at, now()) WHERE key_id = %s RETURNING key_hash"
                ).format(self._table),
                (key_id,),
            )
            row = await cur.fetchone()
        return None if row is None else str(row["key_hash"])


def _record(row: dict[str, Any]) -> ApiKey:
    return ApiKey(
        key_id=row["key_id"],
        tenant=row["tenant"],
        roles=tuple(row["roles"]),
        description=row["description"],
        created_at=row["created_at"],
        revoked_at=row["revoked_at"],
    )


def open_pool(database_url: str, *, min_size: int = 1, max_size: int = 4) -> AsyncConnectionPool[Any]:
    """An unopened pool whose connections return rows as dicts."""
    return AsyncConnectionPool(
        database_url,
        min_size=min_size,
        max_size=max_size,
        kwargs={"row_factory": dict_row, "autocommit": True},
        open=False,
    )


class KeyAdmin:
    """What an operator (this module's CLI, or the `servegrid keys` CLI) does with keys.

    async with KeyAdmin.connect(EdgeSettings()) as admin:
        record, key = await admin.create("acme", ["user"])
    """

    def __init__(self, store: ApiKeyStore, cache: Any, pool: AsyncConnectionPool[Any]) -> None:
        self.store = store
        self.cache = cache
        self._pool = pool

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(cls, settings: EdgeSettings) -> AsyncIterator[KeyAdmin]:
        from services.edge.cache import KeyCache

        pool = open_pool(settings.database_url, max_size=1)
        await pool.open()
        cache = KeyCache.connect(settings)
        try:
            store = ApiKeyStore(pool, settings.db_schema)
            await store.migrate()
            yield cls(store, cache, pool)
        finally:
            await pool.close()
            await cache.redis.aclose()

    async def create(self, tenant: str, roles: Sequence[str], description: str = "") -> tuple[ApiKey, str]:
        """A new key for `tenant` with `roles`; the full key is returned once and never stored."""
        return await self.store.create(tenant, roles, description)

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        return await self.store.list(tenant)

    async def revoke(self, key_id: str) -> bool:
        """Revoke now: marked in PostgreSQL and evicted from the cache. False when no such key."""
        key_hash = await self.store.revoke(key_id)
        if key_hash is None:
            return False
        await self.cache.evict(key_hash)
        return True


async def _cli(args: argparse.Namespace) -> int:
    from services.edge.settings import EdgeSettings

    async with KeyAdmin.connect(EdgeSettings()) as admin:
        if args.command == "create":
            record, key = await admin.create(args.tenant, args.role or [], args.description)
            print(json.dumps({**_public(record), "api_key": key}))
            print("the api_key is shown only once; store it now", file=sys.stderr)
        elif args.command == "list":
            for record in await admin.list(args.tenant):
                print(json.dumps(_public(record)))
        elif not await admin.revoke(args.key_id):
            print(f"no key {args.key_id!r}", file=sys.stderr)
            return 1
        else:
            print(json.dumps({"key_id": args.key_id, "revoked": True}))
    return 0


def _public(record: ApiKey) -> dict[str, object]:
    data = asdict(record)
    data["roles"] = list(record.roles)
    data["created_at"] = record.created_at.isoformat()
    data["revoked_at"] = record.revoked_at.isoformat() if record.revoked_at else None
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.edge.keys", description="Manage servegrid API keys.")
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create a key and print it once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", action="append", help="repeat for several roles, e.g. --role user --role admin")
    create.add_argument("--description", default="")
    listing = sub.add_parser("list", help="list keys (never their secrets)")
    listing.add_argument("--tenant")
    revoke = sub.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_cli(args))
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
