"""PostgreSQL and Redis for one test session: the ones named, the machine's own, or embedded ones.

Which, per store (the session fixture `datastores` in tests/conftest.py resolves them once):
  1. SERVEGRID_TEST_DATABASE_URL / SERVEGRID_TEST_REDIS_URL when set (an error if unreachable);
  2. else the local server at the usual address, when one answers;
  3. else an embedded one (services/stack/datastores.py, as `make up` starts it) on a free port,
     stopped by PID when the session ends.
SERVEGRID_TEST_DATASTORES=embedded skips 1 and 2: both stores are embedded, whatever runs locally.
Tests keep their own schema and key prefix on whichever server it is, so sessions never collide.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis
from psycopg import sql

from services.stack.datastores import embedded_postgres, embedded_redis, postgres_reachable, redis_reachable
from services.stack.ports import free_port
from services.stack.supervisor import Supervisor

DATABASE_ENV = "SERVEGRID_TEST_DATABASE_URL"
REDIS_ENV = "SERVEGRID_TEST_REDIS_URL"
MODE_ENV = "SERVEGRID_TEST_DATASTORES"  # "auto" (the order above) or "embedded"
LOCAL_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/test"
LOCAL_REDIS_URL = "redis://127.0.0.1:6379/0"
_HOST = "127.0.0.1"


@dataclass(frozen=True)
class Schema:
    """A PostgreSQL schema of one test's own (SessionDatastores.fresh_schema)."""

    name: str
    database_url: str

    async def connect(self, **options: Any) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(self.database_url, autocommit=True, **options)


@dataclass(frozen=True)
class SessionDatastores:
    """The URLs every test of the session uses, and where each store came from."""

    database_url: str
    redis_url: str
    database_origin: str  # "given", "local" or "embedded"
    redis_origin: str

    @contextlib.contextmanager
    def fresh_schema(self, prefix: str) -> Iterator[Schema]:
        """A schema name no other test uses (`prefix` + random), dropped on exit."""
        schema = Schema(f"{prefix}{uuid.uuid4().hex[:12]}", self.database_url)
        try:
            yield schema
        finally:
            self.drop_schema(schema.name)

    def drop_schema(self, schema: str) -> None:
        """Drop a schema a test made (and everything in it); a missing one is fine."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(schema)))

    def delete_keys(self, prefix: str) -> None:
        """Delete every Redis key under a test's prefix."""
        client = redis.Redis.from_url(self.redis_url)
        try:
            keys = list(client.scan_iter(f"{prefix}*", count=500))
            if keys:
                client.unlink(*keys)
        finally:
            client.close()


def _choose(env: str, local: str, reachable: Callable[[str], bool], what: str) -> tuple[str | None, str]:
    """(URL, origin) of one store, or (None, "embedded") when one has to be started."""
    if os.environ.get(MODE_ENV, "auto") == "embedded":
        return None, "embedded"
    given = os.environ.get(env)
    if given:
        if not reachable(given):
            raise RuntimeError(f"{env} names a {what} that does not answer: {given}")
        return given, "given"
    if reachable(local):
        return local, "local"
    return None, "embedded"


@contextlib.contextmanager
def session_datastores() -> Iterator[SessionDatastores]:
    """Resolve both stores (starting embedded ones where needed); stop what was started on exit."""
    database_url, database_origin = _choose(DATABASE_ENV, LOCAL_DATABASE_URL, postgres_reachable, "PostgreSQL")
    redis_url, redis_origin = _choose(REDIS_ENV, LOCAL_REDIS_URL, redis_reachable, "Redis")
    if database_url and redis_url:
        yield SessionDatastores(database_url, redis_url, database_origin, redis_origin)
        return
    # An unprivileged embedded PostgreSQL (when root runs the tests) must reach its data folder.
    home = Path(tempfile.mkdtemp(prefix="servegrid-test-datastores-"))
    home.chmod(0o755)
    supervisor = Supervisor(home)
    try:
        if database_url is None:
            database_url, part = embedded_postgres(home, _HOST, free_port())
            supervisor.start(part)
        if redis_url is None:
            redis_url, part = embedded_redis(home, _HOST, free_port())
            supervisor.start(part)
        yield SessionDatastores(database_url, redis_url, database_origin, redis_origin)
    finally:
        supervisor.stop_all()
        shutil.rmtree(home, ignore_errors=True)
