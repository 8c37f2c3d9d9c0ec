"""Applies the versioned SQL files in migrations/ once each, safely when several replicas start together."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg
from psycopg import sql

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


@dataclass(frozen=True)
class Migration:
    """One SQL file: `NNNN_name.sql`, applied in version order."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path = MIGRATIONS_DIR) -> list[Migration]:
    migrations = []
    for path in sorted(directory.glob("*.sql")):
        number, _, name = path.stem.partition("_")
        migrations.append(Migration(int(number), name, path.read_text()))
    versions = [m.version for m in migrations]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"two migrations share a version number in {directory}")
    return migrations


class MigrationError(RuntimeError):
    """The database holds a migration history this code does not agree with."""


async def apply_migrations(conn: psycopg.AsyncConnection[object], schema: str) -> list[int]:
    """Bring `schema` up to date in one transaction; returns the versions applied now.

    Two replicas starting at once would both find a migration missing and both run it (or race on
    CREATE SCHEMA, which fails even with IF NOT EXISTS). A transaction-scoped advisory lock keyed on
    the schema serializes them: the second waits, then finds nothing to do. It is an advisory lock
    rather than a lock on schema_migrations because that table may not exist yet, and a
    transaction-scoped one because it can never outlive a crashed starter's connection. DDL is
    transactional in PostgreSQL, so a failing migration leaves nothing half-applied.
    """
    migrations = load_migrations()
    applied_now: list[int] = []
    ident = sql.Identifier(schema)
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"servegrid.registry.migrate:{schema}",)
        )
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(ident))
        await conn.execute(
            """
            CREATE TABLE IF NOT EXISTS schema_migrations (
                version integer PRIMARY KEY,
                name text NOT NULL,
                checksum text NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )
            """
        )
        cur = await conn.execute("SELECT version, checksum FROM schema_migrations")
        done = {int(row[0]): str(row[1]) for row in await cur.fetchall()}  # type: ignore[index]
        known = {m.version for m in migrations}
        if unknown := sorted(set(done) - known):
            # A newer replica migrated further than this code knows: refuse rather than misread the schema.
            raise MigrationError(f"schema {schema} has migrations {unknown} this registry does not know")
        for migration in migrations:
            if migration.version in done:
                if done[migration.version] != migration.checksum:
                    raise MigrationError(
                        f"migration {migration.version}_{migration.name} changed after it was applied to {schema}"
                    )
                continue
            await conn.execute(sql.SQL(migration.sql))
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.version)
    if applied_now:
        log.info("applied registry migrations", extra={"schema": schema, "versions": applied_now})
    return applied_now
