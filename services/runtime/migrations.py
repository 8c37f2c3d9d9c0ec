"""The one migration runner: versioned SQL files applied once each, safely when replicas start together.

Every service with a PostgreSQL schema (registry, batch, edge) keeps `migrations/NNNN_name.sql` beside
its store and calls `apply_migrations`. Each applied file is recorded with its checksum; a history
this code does not know (a newer replica migrated further) or a file changed after it was applied is
refused instead of misread.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.rows import tuple_row

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Migration:
    """One SQL file: `NNNN_name.sql`, applied in version order."""

    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


def load_migrations(directory: Path) -> list[Migration]:
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


async def apply_migrations(
    conn: psycopg.AsyncConnection[Any], schema: str, directory: Path, *, component: str
) -> list[int]:
    """Bring `schema` up to date in one transaction; returns the versions applied now.

    Two replicas starting at once would both find a migration missing and both run it (or race on
    CREATE SCHEMA, which fails even with IF NOT EXISTS). A transaction-scoped advisory lock keyed on
    the component and schema serializes them: the second waits, then finds nothing to do. It is an
    advisory lock rather than a lock on schema_migrations because that table may not exist yet, and a
    transaction-scoped one because it can never outlive a crashed starter's connection. DDL is
    transactional in PostgreSQL, so a failing migration leaves nothing half-applied. Tables are
    created unqualified: the search path is the schema for the transaction.
    """
    migrations = load_migrations(directory)
    applied_now: list[int] = []
    ident = sql.Identifier(schema)
    async with conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"servegrid.{component}.migrate:{schema}",)
        )
        await conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(ident))
        await conn.execute(sql.SQL("SET LOCAL search_path TO {}").format(ident))
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   checksum text,
                   applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        # Histories written before checksums were recorded (batch) adopt today's file's checksum.
        await conn.execute("ALTER TABLE schema_migrations ADD COLUMN IF NOT EXISTS checksum text")
        # Tuples whatever the caller's row factory (the edge's pool hands out dict rows).
        async with conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute("SELECT version, checksum FROM schema_migrations")
            done: dict[int, str | None] = {int(version): checksum for version, checksum in await cur.fetchall()}
        known = {m.version: m for m in migrations}
        if unknown := sorted(set(done) - set(known)):
            raise MigrationError(f"schema {schema} has {component} migrations {unknown} this version does not know")
        for migration in migrations:
            if migration.version in done:
                recorded = done[migration.version]
                if recorded is None:
                    await conn.execute(
                        "UPDATE schema_migrations SET checksum = %s WHERE version = %s",
                        (migration.checksum, migration.version),
                    )
                elif recorded != migration.checksum:
                    raise MigrationError(
                        f"{component} migration {migration.version}_{migration.name} changed after it was applied"
                        f" to {schema}"
                    )
                continue
            await conn.execute(sql.SQL(migration.sql))  # our own files, never input
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES (%s, %s, %s)",
                (migration.version, migration.name, migration.checksum),
            )
            applied_now.append(migration.version)
    if applied_now:
        log.info("applied migrations", extra={"component": component, "schema": schema, "versions": applied_now})
    return applied_now
