"""The one migration runner against a real PostgreSQL: once each, in order, under concurrency, and
refusing a history it does not agree with."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg import sql
from psycopg.rows import dict_row

from services.runtime.migrations import MigrationError, apply_migrations
from tests.support.datastores import Schema, SessionDatastores

pytestmark = pytest.mark.integration


@pytest.fixture
def schema(datastores: SessionDatastores) -> Iterator[Schema]:
    with datastores.fresh_schema("mig_") as fresh:
        yield fresh


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return directory


async def _apply(schema: Schema, directory: Path) -> list[int]:
    # dict rows, as the edge's pool hands out: the runner must not care.
    async with await schema.connect(row_factory=dict_row) as conn:
        return await apply_migrations(conn, schema.name, directory, component="test")


async def _history(schema: Schema) -> list[tuple[int, str]]:
    async with await schema.connect() as conn:
        query = sql.SQL("SELECT version, name FROM {}.schema_migrations ORDER BY version")
        cur = await conn.execute(query.format(sql.Identifier(schema.name)))
        return [(int(v), str(n)) for v, n in await cur.fetchall()]


FILES = {
    "0001_things.sql": "CREATE TABLE things (id int PRIMARY KEY);",
    "0002_more.sql": "ALTER TABLE things ADD COLUMN label text NOT NULL DEFAULT '';",
}


async def test_migrations_apply_once_in_order_and_into_the_schema(schema: Schema, tmp_path: Path) -> None:
    directory = _write(tmp_path / "m", FILES)
    assert await _apply(schema, directory) == [1, 2]
    assert await _apply(schema, directory) == []
    assert await _history(schema) == [(1, "things"), (2, "more")]
    async with await schema.connect() as conn:
        await conn.execute(
            sql.SQL("INSERT INTO {}.things (id, label) VALUES (1, 'x')").format(sql.Identifier(schema.name))
        )


async def test_replicas_starting_together_apply_each_migration_once(schema: Schema, tmp_path: Path) -> None:
    directory = _write(tmp_path / "m", FILES)
    results = await asyncio.gather(*(_apply(schema, directory) for _ in range(4)))
    assert sorted(v for applied in results for v in applied) == [1, 2]
    assert await _history(schema) == [(1, "things"), (2, "more")]


async def test_a_history_from_a_newer_version_is_refused(schema: Schema, tmp_path: Path) -> None:
    await _apply(schema, _write(tmp_path / "new", {**FILES, "0003_newer.sql": "SELECT 1;"}))
    with pytest.raises(MigrationError, match=r"\[3\]"):
        await _apply(schema, _write(tmp_path / "old", FILES))


async def test_a_migration_changed_after_it_ran_is_refused_and_nothing_half_applies(
    schema: Schema, tmp_path: Path
) -> None:
    await _apply(schema, _write(tmp_path / "a", {"0001_things.sql": FILES["0001_things.sql"]}))
    changed = {
        "0001_things.sql": "CREATE TABLE things (id bigint PRIMARY KEY);",
        "0002_more.sql": FILES["0002_more.sql"],
    }
    with pytest.raises(MigrationError, match="changed after it was applied"):
        await _apply(schema, _write(tmp_path / "b", changed))
    assert await _history(schema) == [(1, "things")]  # 0002 did not run either


async def test_a_history_without_checksums_adopts_them(schema: Schema, tmp_path: Path) -> None:
    # The batch service recorded migrations before the runner recorded checksums.
    async with await schema.connect() as conn:
        ident = sql.Identifier(schema.name)
        await conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        await conn.execute(sql.SQL("CREATE TABLE {}.things (id int PRIMARY KEY)").format(ident))
        await conn.execute(
            sql.SQL(
                "CREATE TABLE {}.schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident)
        )
        await conn.execute(sql.SQL("INSERT INTO {}.schema_migrations VALUES (1, 'things')").format(ident))
    directory = _write(tmp_path / "m", FILES)
    assert await _apply(schema, directory) == [2]
    assert await _apply(schema, directory) == []
