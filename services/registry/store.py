"""PostgreSQL repository for the registry: every write one transaction that bumps the revision and notifies."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from services.registry import lifecycle
from services.registry.domain import (
    Backend,
    LoadBalancing,
    Model,
    ModelVersion,
    ShadowPolicy,
    Stage,
    TrafficPolicy,
    TrafficSplit,
    TransitionResult,
)
from services.runtime.errors import Aborted, AlreadyExists, FailedPrecondition, NotFound, Unavailable
from services.runtime.migrations import apply_migrations
from services.runtime.notifications import Listener

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"

Conn = psycopg.AsyncConnection[DictRow]
T = TypeVar("T")
# NOTIFY payloads are limited to 8000 bytes; past this many ids a change just says "everything".
_MAX_NOTIFY_IDS_BYTES = 6000


def notify_channel(schema: str) -> str:
    """The LISTEN/NOTIFY channel of one registry schema (identifiers stop at 63 bytes)."""
    channel = f"{schema}_routes"
    if len(channel.encode()) > 63:
        channel = "registry_routes_" + hashlib.sha256(schema.encode()).hexdigest()[:32]
    return channel


@dataclass(frozen=True)
class RoutingSnapshot:
    """What routes are built from, read in one consistent snapshot with its revision."""

    revision: int
    model_ids: list[str]
    versions: dict[str, list[ModelVersion]]
    policies: dict[str, TrafficPolicy]
    backends: list[Backend]


@dataclass(frozen=True)
class Change:
    """A routing change as NOTIFY carries it: which models' routes may differ after `revision`."""

    revision: int
    model_ids: tuple[str, ...] = ()
    all_models: bool = False
    committed_at: float = 0.0

    def to_payload(self) -> str:
        ids = list(self.model_ids)
        all_models = self.all_models or len(json.dumps(ids)) > _MAX_NOTIFY_IDS_BYTES
        data = {"rev": self.revision, "models": [] if all_models else ids, "all": all_models, "ts": time.time()}
        return json.dumps(data, separators=(",", ":"))

    @classmethod
    def from_payload(cls, payload: str) -> Change:
        data = json.loads(payload)
        return cls(int(data["rev"]), tuple(data["models"]), bool(data["all"]), float(data.get("ts", 0.0)))


@dataclass
class _Write:
    """The transaction of one write: its connection, its revision, and what it changed."""

    conn: Conn
    revision: int
    model_ids: set[str] = field(default_factory=set)
    all_models: bool = False

    @property
    def etag(self) -> str:
        return str(self.revision)


@dataclass(frozen=True)
class Written(Generic[T]):
    """A committed write's result and the revision it committed at."""

    value: T
    revision: int
    change: Change | None


class RegistryStore:
    """Registry data in PostgreSQL, in its own schema (set through each connection's search_path)."""

    def __init__(
        self,
        conninfo: str,
        schema: str,
        *,
        min_size: int = 1,
        max_size: int = 10,
        pool_timeout_s: float = 5.0,
        statement_timeout_s: float = 10.0,
    ) -> None:
        self.conninfo = conninfo
        self.schema = schema
        self.channel = notify_channel(schema)
        self.statement_timeout_ms = int(statement_timeout_s * 1000)
        self.pool: AsyncConnectionPool[Conn] = AsyncConnectionPool(
            conninfo,
            connection_class=psycopg.AsyncConnection[DictRow],
            kwargs={"autocommit": True, "row_factory": dict_row},
            min_size=min_size,
            max_size=max_size,
            timeout=pool_timeout_s,
            configure=self._configure,
            open=False,
            name=f"registry-{schema}",
        )

    async def _configure(self, conn: Conn) -> None:
        await conn.execute(sql.SQL("SET search_path TO {}").format(sql.Identifier(self.schema)))
        await conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(self.statement_timeout_ms)))

    async def open(self) -> None:
        """Apply migrations, then open the pool."""
        async with await psycopg.AsyncConnection.connect(self.conninfo, autocommit=True) as conn:
            await apply_migrations(conn, self.schema, MIGRATIONS_DIR, component="registry")
        await self.pool.open(wait=True)

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> None:
        async with self._conn() as conn:
            await conn.execute("SELECT 1 FROM registry_state")

    async def listen(self) -> Listener:
        """A dedicated connection LISTENing on this schema's channel."""
        return await Listener.open(self.conninfo, self.channel)

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[Conn]:
        # The database being away is a retryable condition for callers, not an internal error.
        try:
            async with self.pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise Unavailable("the registry database is not reachable", reason="DATABASE_UNAVAILABLE") from exc
        except psycopg.OperationalError as exc:
            log.warning("database error", extra={"error": str(exc)})
            raise Unavailable("the registry database is not reachable", reason="DATABASE_UNAVAILABLE") from exc

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[_Write]:
        """One write transaction. Bumping the single revision row first serializes writers: commit
        order equals revision order (so watchers see revisions rise), writers cannot deadlock, and
        every read inside the transaction sees a state no other writer can change under it."""
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute("UPDATE registry_state SET revision = revision + 1 RETURNING revision")
            row = await cur.fetchone()
            assert row is not None
            tx = _Write(conn, int(row["revision"]))
            yield tx
            if tx.model_ids or tx.all_models:
                change = Change(tx.revision, tuple(sorted(tx.model_ids)), tx.all_models)
                # Delivered to listeners only when (and if) this transaction commits.
                await conn.execute("SELECT pg_notify(%s, %s)", (self.channel, change.to_payload()))

    async def _run_write(self, body: Callable[[_Write], Awaitable[T]]) -> Written[T]:
        async with self._write() as tx:
            value = await body(tx)
        change = (
            Change(tx.revision, tuple(sorted(tx.model_ids)), tx.all_models) if tx.model_ids or tx.all_models else None
        )
        return Written(value, tx.revision, change)

    # ---- models -------------------------------------------------------------------------------

    async def get_model(self, model_id: str) -> tuple[Model, int]:
        """The model and the revision of the snapshot it was read in (one statement, one snapshot)."""
        async with self._conn() as conn:
            cur = await conn.execute(
                "SELECT m.*, s.revision AS snapshot_revision FROM models m, registry_state s WHERE m.model_id = %s",
                (model_id,),
            )
            row = await cur.fetchone()
        if row is None:
            raise _model_not_found(model_id)
        return _model(row), int(row["snapshot_revision"])

    async def list_models(self, after: str | None, limit: int) -> list[Model]:
        async with self._conn() as conn:
            cur = await conn.execute(
                "SELECT * FROM models WHERE %(after)s::text IS NULL OR model_id > %(after)s "
                "ORDER BY model_id LIMIT %(n)s",
                {"after": after, "n": limit},
            )
            return [_model(r) for r in await cur.fetchall()]

    async def create_model(self, model: Model, subject: str) -> Written[Model]:
        async def body(tx: _Write) -> Model:
            cur = await tx.conn.execute(
                """
                INSERT INTO models (model_id, description, task, labels, updated_by, revision)
                VALUES (%s, %s, %s, %s, %s, %s)
                ON CONFLICT (model_id) DO NOTHING
                RETURNING *
                """,
                (model.model_id, model.description, model.task, Jsonb(model.labels), subject, tx.revision),
            )
            row = await cur.fetchone()
            if row is None:
                raise AlreadyExists(
                    f"model {model.model_id!r} already exists",
                    reason="MODEL_ALREADY_EXISTS",
                    metadata={"model_id": model.model_id},
                )
            tx.model_ids.add(model.model_id)  # a new, empty route
            return _model(row)

        return await self._run_write(body)

    async def update_model(self, model: Model, paths: Collection[str], subject: str) -> Written[Model]:
        async def body(tx: _Write) -> Model:
            current = await _lock_model(tx.conn, model.model_id)
            _check_etag(model.etag, current.etag, f"model {model.model_id!r}")
            updated = replace(
                current,
                description=model.description if "description" in paths else current.description,
                task=model.task if "task" in paths else current.task,
                labels=model.labels if "labels" in paths else current.labels,
            )
            cur = await tx.conn.execute(
                """
                UPDATE models SET description = %s, task = %s, labels = %s, updated_by = %s,
                    revision = %s, update_time = now()
                WHERE model_id = %s RETURNING *
                """,
                (updated.description, updated.task, Jsonb(updated.labels), subject, tx.revision, model.model_id),
            )
            row = await cur.fetchone()
            assert row is not None
            return _model(row)

        return await self._run_write(body)

    async def delete_model(self, model_id: str, etag: str, force: bool) -> Written[None]:
        async def body(tx: _Write) -> None:
            current = await _lock_model(tx.conn, model_id)
            _check_etag(etag, current.etag, f"model {model_id!r}")
            cur = await tx.conn.execute(
                "SELECT count(*) AS n FROM model_versions WHERE model_id = %s AND stage = %s",
                (model_id, int(Stage.PRODUCTION)),
            )
            row = await cur.fetchone()
            if row is not None and row["n"] and not force:
                raise FailedPrecondition(
                    f"model {model_id!r} has a version in PRODUCTION; archive it first or delete with force",
                    reason="MODEL_IN_PRODUCTION",
                    metadata={"model_id": model_id},
                )
            # Versions and the policy go with it (ON DELETE CASCADE), in this same transaction.
            await tx.conn.execute("DELETE FROM models WHERE model_id = %s", (model_id,))
            tx.model_ids.add(model_id)

        return await self._run_write(body)

    # ---- versions -----------------------------------------------------------------------------

    async def get_version(self, model_id: str, version: int) -> ModelVersion:
        async with self._conn() as conn:
            cur = await conn.execute(
                "SELECT * FROM model_versions WHERE model_id = %s AND version = %s", (model_id, version)
            )
            row = await cur.fetchone()
            if row is None:
                await _require_model(conn, model_id)
                raise _version_not_found(model_id, version)
        return _version(row)

    async def list_versions(
        self, model_id: str, before: int | None, limit: int, stage: Stage | None
    ) -> list[ModelVersion]:
        async with self._conn() as conn:
            await _require_model(conn, model_id)
            cur = await conn.execute(
                """
                SELECT * FROM model_versions
                WHERE model_id = %(model)s
                  AND (%(before)s::bigint IS NULL OR version < %(before)s)
                  AND (%(stage)s::smallint IS NULL OR stage = %(stage)s)
                ORDER BY version DESC LIMIT %(n)s
                """,
                {"model": model_id, "before": before, "stage": None if stage is None else int(stage), "n": limit},
            )
            return [_version(r) for r in await cur.fetchall()]

    async def create_version(self, version: ModelVersion, subject: str) -> Written[ModelVersion]:
        async def body(tx: _Write) -> ModelVersion:
            await _lock_model(tx.conn, version.model_id)
            cur = await tx.conn.execute(
                """
                INSERT INTO model_versions (model_id, version, triton_model_name, triton_model_version,
                    artifact_uri, stage, description, updated_by, revision)
                SELECT %(model)s, COALESCE(MAX(version), 0) + 1, %(name)s, %(tver)s, %(uri)s, %(stage)s,
                    %(desc)s, %(by)s, %(rev)s
                FROM model_versions WHERE model_id = %(model)s
                RETURNING *
                """,
                {
                    "model": version.model_id,
                    "name": version.triton_model_name,
                    "tver": version.triton_model_version,
                    "uri": version.artifact_uri,
                    "stage": int(Stage.DRAFT),
                    "desc": version.description,
                    "by": subject,
                    "rev": tx.revision,
                },
            )
            row = await cur.fetchone()
            assert row is not None
            return _version(row)  # DRAFT: no route changes

        return await self._run_write(body)

    async def update_version(
        self, version: ModelVersion, paths: Collection[str], subject: str
    ) -> Written[ModelVersion]:
        async def body(tx: _Write) -> ModelVersion:
            current = await _get_version(tx.conn, version.model_id, version.version)
            _check_etag(version.etag, current.etag, f"version {version.version} of model {version.model_id!r}")
            updated = replace(
                current,
                **{p: getattr(version, p) for p in lifecycle.VERSION_MASK_PATHS if p in paths},
            )
            cur = await tx.conn.execute(
                """
                UPDATE model_versions SET description = %s, artifact_uri = %s, triton_model_name = %s,
                    triton_model_version = %s, updated_by = %s, revision = %s, update_time = now()
                WHERE model_id = %s AND version = %s RETURNING *
                """,
                (
                    updated.description,
                    updated.artifact_uri,
                    updated.triton_model_name,
                    updated.triton_model_version,
                    subject,
                    tx.revision,
                    version.model_id,
                    version.version,
                ),
            )
            row = await cur.fetchone()
            assert row is not None
            if current.stage in (Stage.STAGING, Stage.PRODUCTION):
                tx.model_ids.add(version.model_id)  # the Triton name or version of a served route changed
            return _version(row)

        return await self._run_write(body)

    async def transition(
        self,
        model_id: str,
        version: int,
        target: Stage,
        *,
        etag: str,
        subject: str,
        expected_stage: Stage | None = None,
    ) -> Written[TransitionResult]:
        """Move a version to `target`; on promotion, archive the PRODUCTION versions the policy does not use."""

        async def body(tx: _Write) -> TransitionResult:
            await _lock_model(tx.conn, model_id)
            versions = {v.version: v for v in await _versions(tx.conn, model_id)}
            current = versions.get(version)
            if current is None:
                raise _version_not_found(model_id, version)
            _check_etag(etag, current.etag, f"version {version} of model {model_id!r}")
            if expected_stage is not None and current.stage != expected_stage:
                raise Aborted(
                    f"version {version} of model {model_id!r} changed stage while its backends loaded it; retry",
                    reason="ETAG_MISMATCH",
                    metadata={"model_id": model_id, "version": str(version)},
                )
            lifecycle.check_transition(current.stage, target, model_id=model_id, version=version)
            policy = await _policy(tx.conn, model_id)
            lifecycle.check_leaving_policy(policy, current, target)
            archived = (
                lifecycle.versions_to_archive(current, versions.values(), policy) if target == Stage.PRODUCTION else []
            )
            rows = []
            for number, stage in [(version, target), *((v.version, Stage.ARCHIVED) for v in archived)]:
                cur = await tx.conn.execute(
                    """
                    UPDATE model_versions SET stage = %s, updated_by = %s, revision = %s, update_time = now()
                    WHERE model_id = %s AND version = %s RETURNING *
                    """,
                    (int(stage), subject, tx.revision, model_id, number),
                )
                row = await cur.fetchone()
                assert row is not None
                rows.append(_version(row))
            tx.model_ids.add(model_id)
            return TransitionResult(rows[0], tuple(rows[1:]))

        return await self._run_write(body)

    # ---- traffic policies ---------------------------------------------------------------------

    async def get_policy(self, model_id: str) -> TrafficPolicy:
        async with self._conn() as conn:
            await _require_model(conn, model_id)
            return await _policy(conn, model_id) or TrafficPolicy(model_id=model_id)

    async def set_policy(self, policy: TrafficPolicy, subject: str) -> Written[TrafficPolicy]:
        async def body(tx: _Write) -> TrafficPolicy:
            await _lock_model(tx.conn, policy.model_id)
            current = await _policy(tx.conn, policy.model_id)
            _check_etag(policy.etag, current.etag if current else "", f"traffic policy of model {policy.model_id!r}")
            versions = {v.version: v for v in await _versions(tx.conn, policy.model_id)}
            lifecycle.check_policy(policy, versions)
            shadow = policy.shadow
            cur = await tx.conn.execute(
                """
                INSERT INTO traffic_policies (model_id, splits, shadow_version, shadow_sample_rate,
                    sticky_header, load_balancing, updated_by, revision)
                VALUES (%(model)s, %(splits)s, %(sv)s, %(sr)s, %(sticky)s, %(lb)s, %(by)s, %(rev)s)
                ON CONFLICT (model_id) DO UPDATE SET splits = EXCLUDED.splits,
                    shadow_version = EXCLUDED.shadow_version, shadow_sample_rate = EXCLUDED.shadow_sample_rate,
                    sticky_header = EXCLUDED.sticky_header, load_balancing = EXCLUDED.load_balancing,
                    updated_by = EXCLUDED.updated_by, revision = EXCLUDED.revision, update_time = now()
                RETURNING *
                """,
                {
                    "model": policy.model_id,
                    "splits": Jsonb([{"version": s.version, "weight": s.weight} for s in policy.splits]),
                    "sv": shadow.version if shadow else None,
                    "sr": shadow.sample_rate if shadow else None,
                    "sticky": policy.sticky_header,
                    "lb": int(policy.load_balancing),
                    "by": subject,
                    "rev": tx.revision,
                },
            )
            row = await cur.fetchone()
            assert row is not None
            tx.model_ids.add(policy.model_id)
            return _policy_from(row)

        return await self._run_write(body)

    # ---- backends -----------------------------------------------------------------------------

    async def get_backend(self, backend_id: str) -> Backend:
        async with self._conn() as conn:
            cur = await conn.execute("SELECT * FROM backends WHERE backend_id = %s", (backend_id,))
            row = await cur.fetchone()
        if row is None:
            raise _backend_not_found(backend_id)
        return _backend(row)

    async def list_backends(self, after: str | None, limit: int) -> list[Backend]:
        async with self._conn() as conn:
            cur = await conn.execute(
                "SELECT * FROM backends WHERE %(after)s::text IS NULL OR backend_id > %(after)s "
                "ORDER BY backend_id LIMIT %(n)s",
                {"after": after, "n": limit},
            )
            return [_backend(r) for r in await cur.fetchall()]

    async def all_backends(self) -> list[Backend]:
        async with self._conn() as conn:
            cur = await conn.execute("SELECT * FROM backends ORDER BY backend_id")
            return [_backend(r) for r in await cur.fetchall()]

    async def create_backend(self, backend: Backend) -> Written[Backend]:
        async def body(tx: _Write) -> Backend:
            cur = await tx.conn.execute(
                """
                INSERT INTO backends
                    (backend_id, address, http_address, labels, triton_models, weight, drained, revision)
                VALUES (%s, %s, %s, %s, %s, %s, %s, %s)
                ON CONFLICT (backend_id) DO NOTHING RETURNING *
                """,
                (
                    backend.backend_id,
                    backend.address,
                    backend.http_address,
                    Jsonb(backend.labels),
                    list(backend.triton_models),
                    backend.weight,
                    backend.drained,
                    tx.revision,
                ),
            )
            row = await cur.fetchone()
            if row is None:
                raise AlreadyExists(
                    f"backend {backend.backend_id!r} already exists",
                    reason="BACKEND_ALREADY_EXISTS",
                    metadata={"backend_id": backend.backend_id},
                )
            tx.all_models = True  # a backend can appear in any model's route
            return _backend(row)

        return await self._run_write(body)

    async def update_backend(self, backend: Backend, paths: Collection[str]) -> Written[Backend]:
        async def body(tx: _Write) -> Backend:
            current = await _lock_backend(tx.conn, backend.backend_id)
            _check_etag(backend.etag, current.etag, f"backend {backend.backend_id!r}")
            updated = replace(current, **{p: getattr(backend, p) for p in lifecycle.BACKEND_MASK_PATHS if p in paths})
            cur = await tx.conn.execute(
                """
                UPDATE backends SET address = %s, http_address = %s, labels = %s, triton_models = %s, weight = %s,
                    drained = %s, revision = %s, update_time = now()
                WHERE backend_id = %s RETURNING *
                """,
                (
                    updated.address,
                    updated.http_address,
                    Jsonb(updated.labels),
                    list(updated.triton_models),
                    updated.weight,
                    updated.drained,
                    tx.revision,
                    backend.backend_id,
                ),
            )
            row = await cur.fetchone()
            assert row is not None
            tx.all_models = True
            return _backend(row)

        return await self._run_write(body)

    async def delete_backend(self, backend_id: str, etag: str) -> Written[None]:
        async def body(tx: _Write) -> None:
            current = await _lock_backend(tx.conn, backend_id)
            _check_etag(etag, current.etag, f"backend {backend_id!r}")
            await tx.conn.execute("DELETE FROM backends WHERE backend_id = %s", (backend_id,))
            tx.all_models = True

        return await self._run_write(body)

    # ---- routing ------------------------------------------------------------------------------

    async def routing_snapshot(self, model_ids: Sequence[str] | None = None) -> RoutingSnapshot:
        """Servable versions, policies and backends of some models (None: all), in one snapshot."""
        params = {"ids": None if model_ids is None else list(model_ids)}
        async with self._conn() as conn, conn.transaction():
            # Repeatable read: the revision and every table below come from the same moment.
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            cur = await conn.execute("SELECT revision FROM registry_state")
            state = await cur.fetchone()
            assert state is not None
            cur = await conn.execute(
                "SELECT model_id FROM models WHERE %(ids)s::text[] IS NULL OR model_id = ANY(%(ids)s) "
                "ORDER BY model_id",
                params,
            )
            existing = [str(r["model_id"]) for r in await cur.fetchall()]
            cur = await conn.execute(
                "SELECT * FROM model_versions WHERE (%(ids)s::text[] IS NULL OR model_id = ANY(%(ids)s)) "
                "AND stage IN (2, 3)",
                params,
            )
            versions: dict[str, list[ModelVersion]] = {}
            for row in await cur.fetchall():
                versions.setdefault(row["model_id"], []).append(_version(row))
            cur = await conn.execute(
                "SELECT * FROM traffic_policies WHERE %(ids)s::text[] IS NULL OR model_id = ANY(%(ids)s)", params
            )
            policies = {r["model_id"]: _policy_from(r) for r in await cur.fetchall()}
            cur = await conn.execute("SELECT * FROM backends ORDER BY backend_id")
            backends = [_backend(r) for r in await cur.fetchall()]
        return RoutingSnapshot(int(state["revision"]), existing, versions, policies, backends)


# ---- row mapping and shared checks --------------------------------------------------------------


def _model(row: DictRow) -> Model:
    return Model(
        model_id=row["model_id"],
        description=row["description"],
        task=row["task"],
        labels=dict(row["labels"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        updated_by=row["updated_by"],
        etag=str(row["revision"]),
    )


def _version(row: DictRow) -> ModelVersion:
    return ModelVersion(
        model_id=row["model_id"],
        version=int(row["version"]),
        triton_model_name=row["triton_model_name"],
        triton_model_version=int(row["triton_model_version"]),
        artifact_uri=row["artifact_uri"],
        stage=Stage(row["stage"]),
        description=row["description"],
        create_time=row["create_time"],
        update_time=row["update_time"],
        updated_by=row["updated_by"],
        etag=str(row["revision"]),
    )


def _policy_from(row: DictRow) -> TrafficPolicy:
    shadow = None
    if row["shadow_version"] is not None:
        shadow = ShadowPolicy(int(row["shadow_version"]), float(row["shadow_sample_rate"] or 0.0))
    return TrafficPolicy(
        model_id=row["model_id"],
        splits=tuple(TrafficSplit(int(s["version"]), int(s["weight"])) for s in row["splits"]),
        shadow=shadow,
        sticky_header=row["sticky_header"],
        load_balancing=LoadBalancing(row["load_balancing"]),
        update_time=row["update_time"],
        updated_by=row["updated_by"],
        etag=str(row["revision"]),
    )


def _backend(row: DictRow) -> Backend:
    return Backend(
        backend_id=row["backend_id"],
        address=row["address"],
        http_address=row["http_address"],
        labels=dict(row["labels"]),
        triton_models=tuple(row["triton_models"]),
        weight=int(row["weight"]),
        drained=bool(row["drained"]),
        create_time=row["create_time"],
        update_time=row["update_time"],
        etag=str(row["revision"]),
    )


def _check_etag(given: str, stored: str, what: str) -> None:
    if given and given != stored:
        raise Aborted(
            f"{what} changed since it was read (etag {given!r}, now {stored!r}); read it again and retry",
            reason="ETAG_MISMATCH",
            metadata={"etag": stored},
        )


def _model_not_found(model_id: str) -> NotFound:
    return NotFound(f"model {model_id!r} does not exist", reason="MODEL_NOT_FOUND", metadata={"model_id": model_id})


def _version_not_found(model_id: str, version: int) -> NotFound:
    return NotFound(
        f"model {model_id!r} has no version {version}",
        reason="VERSION_NOT_FOUND",
        metadata={"model_id": model_id, "version": str(version)},
    )


def _backend_not_found(backend_id: str) -> NotFound:
    return NotFound(
        f"backend {backend_id!r} does not exist", reason="BACKEND_NOT_FOUND", metadata={"backend_id": backend_id}
    )


async def _require_model(conn: Conn, model_id: str) -> None:
    cur = await conn.execute("SELECT 1 FROM models WHERE model_id = %s", (model_id,))
    if await cur.fetchone() is None:
        raise _model_not_found(model_id)


async def _lock_model(conn: Conn, model_id: str) -> Model:
    cur = await conn.execute("SELECT * FROM models WHERE model_id = %s FOR UPDATE", (model_id,))
    row = await cur.fetchone()
    if row is None:
        raise _model_not_found(model_id)
    return _model(row)


async def _lock_backend(conn: Conn, backend_id: str) -> Backend:
    cur = await conn.execute("SELECT * FROM backends WHERE backend_id = %s FOR UPDATE", (backend_id,))
    row = await cur.fetchone()
    if row is None:
        raise _backend_not_found(backend_id)
    return _backend(row)


async def _versions(conn: Conn, model_id: str) -> list[ModelVersion]:
    await _require_model(conn, model_id)
    cur = await conn.execute("SELECT * FROM model_versions WHERE model_id = %s ORDER BY version", (model_id,))
    return [_version(r) for r in await cur.fetchall()]


async def _get_version(conn: Conn, model_id: str, version: int) -> ModelVersion:
    cur = await conn.execute("SELECT * FROM model_versions WHERE model_id = %s AND version = %s", (model_id, version))
    row = await cur.fetchone()
    if row is None:
        await _require_model(conn, model_id)
        raise _version_not_found(model_id, version)
    return _version(row)


async def _policy(conn: Conn, model_id: str) -> TrafficPolicy | None:
    cur = await conn.execute("SELECT * FROM traffic_policies WHERE model_id = %s", (model_id,))
    row = await cur.fetchone()
    return None if row is None else _policy_from(row)
