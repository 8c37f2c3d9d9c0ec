"""PostgreSQL: jobs, items (the outbox), one result per item, and every state change as one transaction.

Lock order, everywhere: a job's row before its items' rows. Writers that touch items without the job
(outbox relay, reconciler, dead-letter relay) take them with SKIP LOCKED and never wait for a job row, so
no two transactions can wait on each other in a cycle.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg_pool import AsyncConnectionPool

from services.runtime.errors import AlreadyExists, FailedPrecondition, NotFound
from services.runtime.migrations import apply_migrations
from services.runtime.notifications import Listener

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"

# servegrid.batch.v1.BatchJobState / BatchItemState numbers, stored as smallint.
JOB_QUEUED, JOB_RUNNING, JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLING, JOB_CANCELLED = 1, 2, 3, 4, 5, 6
ITEM_PENDING, ITEM_SUCCEEDED, ITEM_FAILED, ITEM_CANCELLED = 1, 2, 3, 4
ACTIVE_JOB_STATES = (JOB_QUEUED, JOB_RUNNING)
TERMINAL_JOB_STATES = (JOB_SUCCEEDED, JOB_FAILED, JOB_CANCELLED)

_JOB_COLUMNS = """job_id, tenant, idempotency_key, model_id, version, priority, labels, state, total_items,
    succeeded_items, failed_items, cancelled_items, create_time, start_time, end_time"""
# Composed into queries with psycopg.sql, never by string formatting.
_COLUMNS = sql.SQL(_JOB_COLUMNS)


@dataclass(frozen=True)
class Job:
    job_id: uuid.UUID
    tenant: str
    idempotency_key: str
    model_id: str
    version: int
    priority: int
    labels: dict[str, str]
    state: int
    total_items: int
    succeeded_items: int
    failed_items: int
    cancelled_items: int
    create_time: dt.datetime
    start_time: dt.datetime | None
    end_time: dt.datetime | None

    @property
    def done_items(self) -> int:
        return self.succeeded_items + self.failed_items + self.cancelled_items

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_JOB_STATES

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Job:
        return cls(
            job_id=row[0],
            tenant=row[1],
            idempotency_key=row[2],
            model_id=row[3],
            version=int(row[4]),
            priority=int(row[5]),
            labels=dict(row[6] or {}),
            state=int(row[7]),
            total_items=int(row[8]),
            succeeded_items=int(row[9]),
            failed_items=int(row[10]),
            cancelled_items=int(row[11]),
            create_time=row[12],
            start_time=row[13],
            end_time=row[14],
        )


@dataclass(frozen=True)
class NewJob:
    tenant: str
    idempotency_key: str
    model_id: str
    version: int
    priority: int
    labels: dict[str, str]
    request_sha256: bytes
    # The submitting request's W3C trace context and request id, carried to the worker with every item.
    trace_context: dict[str, str] = field(default_factory=dict)
    request_id: str = ""


@dataclass(frozen=True)
class ResultRow:
    item_index: int
    item_id: str
    state: int
    attempts: int
    response: bytes | None
    error_code: int | None
    error_reason: str | None
    error_message: str | None
    complete_time: dt.datetime | None


@dataclass(frozen=True)
class DueChunk:
    """Items of one job the relay publishes as one message."""

    job_id: uuid.UUID
    item_indices: list[int]
    trace_context: dict[str, str] = field(default_factory=dict)  # the job's (NewJob.trace_context)
    request_id: str = ""


@dataclass(frozen=True)
class DeadLetter:
    job_id: uuid.UUID
    item_index: int
    item_id: str
    tenant: str
    model_id: str
    version: int
    attempts: int
    error_code: int
    error_reason: str
    error_message: str
    trace_context: dict[str, str] = field(default_factory=dict)  # the job's, as its work messages carry
    request_id: str = ""


@dataclass(frozen=True)
class PendingItem:
    job_id: uuid.UUID
    item_index: int
    request: bytes
    model_id: str
    version: int
    attempts: int


@dataclass
class Outcomes:
    """What one worker round learned about one job's items."""

    succeeded: list[tuple[int, bytes]] = field(default_factory=list)  # (index, ModelInferResponse bytes)
    failed: list[tuple[int, int, str, str]] = field(default_factory=list)  # (index, code, reason, message)
    transient: list[tuple[int, int, str]] = field(default_factory=list)  # (index, code, message)


@dataclass(frozen=True)
class Recorded:
    """What a worker round's transaction changed: counts really written, and the job's end if it ended."""

    succeeded: int
    failed: int
    retried: int
    job_state: int
    ended: bool
    duration_s: float | None


def request_digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


class BatchStore:
    """Every query the batch service and its workers run, over one async connection pool."""

    def __init__(self, database_url: str, schema: str, *, max_size: int = 8) -> None:
        self.schema = schema
        self._database_url = database_url
        self._pool = AsyncConnectionPool(
            database_url,
            min_size=1,
            max_size=max_size,
            open=False,
            kwargs={"autocommit": True, "options": f"-c search_path={schema}"},
        )

    async def open(self) -> None:
        await self._pool.open(wait=True, timeout=15)

    async def close(self) -> None:
        await self._pool.close()

    async def ping(self) -> None:
        async with self._pool.connection() as conn:
            await conn.execute("SELECT 1")

    @property
    def due_channel(self) -> str:
        """The LISTEN/NOTIFY channel that says "the outbox has new due work" (one per schema)."""
        return f"{self.schema}.due"

    async def _notify_due(self, conn: Any) -> None:
        # Delivered at commit, to every relay listening (any replica): items became due, were scheduled
        # for a retry, or wait for the dead-letter topic.
        await conn.execute("SELECT pg_notify(%s, '')", (self.due_channel,))

    async def due_notifications(self) -> AsyncIterator[None]:
        """Yield once per NOTIFY on due_channel, on a connection of its own (not the pool's)."""
        listener = await Listener.open(self._database_url, self.due_channel)
        try:
            async for _ in listener.notifications():
                yield None
        finally:
            await listener.close()

    async def next_due_in_s(self) -> float | None:
        """Seconds until the earliest scheduled item is due (0: one is due now); None when none is."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """SELECT EXTRACT(EPOCH FROM (min(i.due_at) - now())) FROM items i JOIN jobs j USING (job_id)
                   WHERE i.state = %s AND i.due_at IS NOT NULL AND j.state IN (%s, %s)""",
                (ITEM_PENDING, JOB_QUEUED, JOB_RUNNING),
            )
            row = await cur.fetchone()
            return None if row is None or row[0] is None else max(float(row[0]), 0.0)

    async def migrate(self) -> list[int]:
        """Apply migrations/*.sql once each (services/runtime/migrations.py)."""
        async with self._pool.connection() as conn:
            return await apply_migrations(conn, self.schema, MIGRATIONS_DIR, component="batch")

    # --- jobs -------------------------------------------------------------------------------------

    async def create_job(self, new: NewJob, items: Sequence[tuple[str, bytes]]) -> tuple[Job, bool]:
        """Job and items in one transaction (COPY for the items); an existing key returns its job."""
        job_id = uuid.uuid4()
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                sql.SQL("""INSERT INTO jobs (job_id, tenant, idempotency_key, request_sha256, model_id, version,
                        priority, labels, state, total_items, trace_context, request_id)
                    VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                    ON CONFLICT (tenant, idempotency_key) DO NOTHING RETURNING {}""").format(_COLUMNS),
                (
                    job_id,
                    new.tenant,
                    new.idempotency_key,
                    new.request_sha256,
                    new.model_id,
                    new.version,
                    new.priority,
                    json.dumps(new.labels),
                    JOB_QUEUED,
                    len(items),
                    json.dumps(new.trace_context),
                    new.request_id,
                ),
            )
            row = await cur.fetchone()
            if row is None:
                # The key was used before (a concurrent insert of it waited for that commit above).
                cur = await conn.execute(
                    sql.SQL("SELECT {}, request_sha256 FROM jobs WHERE tenant = %s AND idempotency_key = %s").format(
                        _COLUMNS
                    ),
                    (new.tenant, new.idempotency_key),
                )
                existing = await cur.fetchone()
                assert existing is not None
                if bytes(existing[15]) != new.request_sha256:
                    raise AlreadyExists(
                        f"idempotency key {new.idempotency_key!r} was used for a different request",
                        reason="IDEMPOTENCY_KEY_REUSED",
                        metadata={"job_id": str(existing[0]), "idempotency_key": new.idempotency_key},
                    )
                return Job.from_row(existing), False
            async with (
                conn.cursor() as copy_cur,
                copy_cur.copy("COPY items (job_id, item_index, item_id, request) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.set_types(["uuid", "int8", "text", "bytea"])
                for index, (item_id, request) in enumerate(items):
                    await copy.write_row((job_id, index, item_id, request))
            return Job.from_row(row), True

    async def get_job(self, tenant: str, job_id: uuid.UUID) -> Job:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                sql.SQL("SELECT {} FROM jobs WHERE job_id = %s AND tenant = %s").format(_COLUMNS),
                (job_id, tenant),
            )
            row = await cur.fetchone()
        if row is None:
            raise _job_not_found(job_id)
        return Job.from_row(row)

    async def list_jobs(self, tenant: str, limit: int, after: tuple[dt.datetime, uuid.UUID] | None) -> list[Job]:
        """Newest first; keyset pagination on (create_time, job_id) so pages never shift."""
        async with self._pool.connection() as conn:
            if after is None:
                cur = await conn.execute(
                    sql.SQL("""SELECT {} FROM jobs WHERE tenant = %s
                        ORDER BY create_time DESC, job_id DESC LIMIT %s""").format(_COLUMNS),
                    (tenant, limit),
                )
            else:
                cur = await conn.execute(
                    sql.SQL("""SELECT {} FROM jobs WHERE tenant = %s AND (create_time, job_id) < (%s, %s)
                        ORDER BY create_time DESC, job_id DESC LIMIT %s""").format(_COLUMNS),
                    (tenant, after[0], after[1], limit),
                )
            return [Job.from_row(r) for r in await cur.fetchall()]

    async def cancel_job(self, tenant: str, job_id: uuid.UUID) -> Job:
        """Pending items become CANCELLED under the job's lock, so no worker can write a result after this."""
        async with self._pool.connection() as conn, conn.transaction():
            job = await self._lock_job(conn, tenant, job_id)
            if job.state == JOB_CANCELLED:
                return job
            if job.terminal:
                raise FailedPrecondition(
                    f"job {job_id} has already ended", reason="JOB_NOT_CANCELLABLE", metadata={"job_id": str(job_id)}
                )
            cur = await conn.execute(
                "UPDATE items SET state = %s, due_at = NULL, lease_until = NULL WHERE job_id = %s AND state = %s",
                (ITEM_CANCELLED, job_id, ITEM_PENDING),
            )
            cur = await conn.execute(
                sql.SQL("""UPDATE jobs SET state = %s, cancelled_items = cancelled_items + %s, end_time = now()
                    WHERE job_id = %s RETURNING {}""").format(_COLUMNS),
                (JOB_CANCELLED, cur.rowcount, job_id),
            )
            row = await cur.fetchone()
            assert row is not None
            return Job.from_row(row)

    async def retry_job(self, tenant: str, job_id: uuid.UUID) -> tuple[Job, int]:
        """Failed items go back to the outbox; their failed results are removed so the next result can win."""
        async with self._pool.connection() as conn, conn.transaction():
            job = await self._lock_job(conn, tenant, job_id)
            if job.state in (JOB_CANCELLING, JOB_CANCELLED):
                raise FailedPrecondition(
                    f"job {job_id} was cancelled", reason="JOB_NOT_RETRYABLE", metadata={"job_id": str(job_id)}
                )
            await conn.execute("DELETE FROM results WHERE job_id = %s AND state = %s", (job_id, ITEM_FAILED))
            cur = await conn.execute(
                """UPDATE items SET state = %s, attempts = 0, due_at = now(), lease_until = NULL, dlq_due = false
                   WHERE job_id = %s AND state = %s""",
                (ITEM_PENDING, job_id, ITEM_FAILED),
            )
            requeued = cur.rowcount
            if requeued == 0:
                return job, 0
            await self._notify_due(conn)
            cur = await conn.execute(
                sql.SQL("""UPDATE jobs SET failed_items = failed_items - %s, state = %s, end_time = NULL
                    WHERE job_id = %s RETURNING {}""").format(_COLUMNS),
                (requeued, JOB_RUNNING, job_id),
            )
            row = await cur.fetchone()
            assert row is not None
            return Job.from_row(row), requeued

    async def list_results(
        self, tenant: str, job_id: uuid.UUID, limit: int, after_index: int, state: int | None
    ) -> list[ResultRow]:
        await self.get_job(tenant, job_id)
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """SELECT i.item_index, i.item_id, i.state, COALESCE(r.attempts, i.attempts), r.response,
                          r.error_code, r.error_reason, r.error_message, r.complete_time
                   FROM items i LEFT JOIN results r USING (job_id, item_index)
                   WHERE i.job_id = %s AND i.item_index > %s AND i.state <> %s
                     AND (%s::smallint IS NULL OR i.state = %s::smallint)
                   ORDER BY i.item_index LIMIT %s""",
                (job_id, after_index, ITEM_PENDING, state, state, limit),
                binary=True,
            )
            return [ResultRow(*r) for r in await cur.fetchall()]

    async def _lock_job(self, conn: psycopg.AsyncConnection[Any], tenant: str, job_id: uuid.UUID) -> Job:
        cur = await conn.execute(
            sql.SQL("SELECT {} FROM jobs WHERE job_id = %s AND tenant = %s FOR UPDATE").format(_COLUMNS),
            (job_id, tenant),
        )
        row = await cur.fetchone()
        if row is None:
            raise _job_not_found(job_id)
        return Job.from_row(row)

    # --- outbox relay and reconciler ----------------------------------------------------------------

    async def leased_items(self) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM items WHERE state = %s AND due_at IS NULL AND lease_until > now()",
                (ITEM_PENDING,),
            )
            row = await cur.fetchone()
            return int(row[0]) if row else 0

    async def publish_due(
        self,
        limit: int,
        chunk_size: int,
        lease_s: float,
        publish: Callable[[list[DueChunk]], Awaitable[None]],
    ) -> int:
        """Claim due items, `publish` them, then lease them; a failed publish rolls the claim back."""
        if limit <= 0:
            return 0
        async with self._pool.connection() as conn:
            async with conn.transaction():
                cur = await conn.execute(
                    """SELECT i.job_id, i.item_index, j.trace_context, j.request_id
                       FROM items i JOIN jobs j USING (job_id)
                       WHERE i.state = %s AND i.due_at <= now() AND j.state IN (%s, %s)
                       ORDER BY j.priority DESC, i.due_at, i.job_id, i.item_index
                       LIMIT %s FOR UPDATE OF i SKIP LOCKED""",
                    (ITEM_PENDING, JOB_QUEUED, JOB_RUNNING, limit),
                )
                rows = await cur.fetchall()
                if not rows:
                    return 0
                chunks: list[DueChunk] = []
                by_job: dict[uuid.UUID, list[int]] = {}
                context: dict[uuid.UUID, tuple[dict[str, str], str]] = {}
                for job_id, index, trace_context, request_id in rows:
                    by_job.setdefault(job_id, []).append(int(index))
                    context[job_id] = (dict(trace_context or {}), request_id or "")
                for job_id, indices in by_job.items():
                    for start in range(0, len(indices), chunk_size):
                        chunks.append(DueChunk(job_id, indices[start : start + chunk_size], *context[job_id]))
                await publish(chunks)
                await conn.execute(
                    """UPDATE items SET due_at = NULL, taken_at = NULL, lease_until = now() + make_interval(secs => %s)
                       FROM unnest(%s::uuid[], %s::bigint[]) AS claimed(job_id, item_index)
                       WHERE items.job_id = claimed.job_id AND items.item_index = claimed.item_index""",
                    (lease_s, [r[0] for r in rows], [r[1] for r in rows]),
                )
            # Outside the items transaction: job rows are only ever locked before item rows.
            await conn.execute(
                """UPDATE jobs SET state = %s, start_time = COALESCE(start_time, now())
                   WHERE job_id = ANY(%s) AND state = %s""",
                (JOB_RUNNING, list(by_job), JOB_QUEUED),
            )
        return len(rows)

    async def publish_dead_letters(self, limit: int, publish: Callable[[list[DeadLetter]], Awaitable[None]]) -> int:
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute(
                """SELECT i.job_id, i.item_index, i.item_id, j.tenant, j.model_id, j.version, r.attempts,
                          r.error_code, r.error_reason, r.error_message, j.trace_context, j.request_id
                   FROM items i JOIN results r USING (job_id, item_index) JOIN jobs j USING (job_id)
                   WHERE i.dlq_due LIMIT %s FOR UPDATE OF i SKIP LOCKED""",
                (limit,),
            )
            letters = [DeadLetter(*r) for r in await cur.fetchall()]  # jsonb arrives as a dict
            if not letters:
                return 0
            await publish(letters)
            await conn.execute(
                """UPDATE items SET dlq_due = false FROM unnest(%s::uuid[], %s::bigint[]) AS d(job_id, item_index)
                   WHERE items.job_id = d.job_id AND items.item_index = d.item_index""",
                ([d.job_id for d in letters], [d.item_index for d in letters]),
            )
        return len(letters)

    async def expire_leases(self, limit: int) -> tuple[int, dict[uuid.UUID, list[int]]]:
        """Deal with items whose lease ran out without a result.

        Not taken by any worker (the message was lost, or no worker was up): due again at once, no
        attempt counted; the count of those is returned. Taken (the worker died on it): returned by
        job, for the caller to record as a failed attempt, so an item that keeps killing its worker
        ends in the dead-letter topic instead of going round forever."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                """UPDATE items SET due_at = now(), lease_until = NULL
                   WHERE (job_id, item_index) IN (
                       SELECT job_id, item_index FROM items
                       WHERE state = %s AND due_at IS NULL AND lease_until < now() AND taken_at IS NULL
                       LIMIT %s FOR UPDATE SKIP LOCKED)""",
                (ITEM_PENDING, limit),
            )
            lost = cur.rowcount
            cur = await conn.execute(
                """SELECT job_id, item_index FROM items
                   WHERE state = %s AND due_at IS NULL AND lease_until < now() AND taken_at IS NOT NULL
                   ORDER BY job_id LIMIT %s""",
                (ITEM_PENDING, limit),
            )
            crashed: dict[uuid.UUID, list[int]] = {}
            for job_id, index in await cur.fetchall():
                crashed.setdefault(job_id, []).append(int(index))
            return lost, crashed

    # --- workers --------------------------------------------------------------------------------------

    async def load_pending(self, keys: Sequence[tuple[uuid.UUID, int]]) -> list[PendingItem]:
        """The items of a worker round that still want a result (duplicates and cancelled ones drop out here)."""
        async with self._pool.connection() as conn:
            # Marks the take as it reads: a lease that expires from here on counts as an attempt.
            cur = await conn.execute(
                """UPDATE items i SET taken_at = now()
                   FROM unnest(%s::uuid[], %s::bigint[]) AS k(job_id, item_index), jobs j
                   WHERE i.job_id = k.job_id AND i.item_index = k.item_index AND j.job_id = i.job_id
                     AND i.state = %s AND j.state IN (%s, %s)
                   RETURNING i.job_id, i.item_index, i.request, j.model_id, j.version, i.attempts""",
                ([k[0] for k in keys], [k[1] for k in keys], ITEM_PENDING, JOB_QUEUED, JOB_RUNNING),
                # Binary results: text format would hex-encode every stored tensor (2x the bytes, then decode).
                binary=True,
            )
            return [PendingItem(r[0], int(r[1]), bytes(r[2]), r[3], int(r[4]), int(r[5])) for r in await cur.fetchall()]

    async def record(
        self, job_id: uuid.UUID, outcomes: Outcomes, *, max_attempts: int, backoff_s: float, backoff_max_s: float
    ) -> Recorded:
        """Write one round's outcomes for a job in one transaction. Only items still PENDING change, and a
        result row is inserted with ON CONFLICT DO NOTHING, so a redelivered or republished item can
        never produce a second result, and nothing is written once the job is cancelled."""
        async with self._pool.connection() as conn, conn.transaction():
            cur = await conn.execute("SELECT state FROM jobs WHERE job_id = %s FOR UPDATE", (job_id,))
            row = await cur.fetchone()
            if row is None or row[0] not in ACTIVE_JOB_STATES:
                return Recorded(0, 0, 0, row[0] if row else 0, False, None)
            succeeded = await _write_successes(conn, job_id, outcomes.succeeded)
            tries = await _next_attempts(conn, job_id, [i for i, _, _ in outcomes.transient])
            given_up, again = retry_plan(outcomes.transient, tries, max_attempts, backoff_s, backoff_max_s)
            retried = await _schedule_retries(conn, job_id, again)
            failed = await _write_failures(conn, job_id, [*outcomes.failed, *given_up])
            if retried or failed:
                await self._notify_due(conn)  # retries due after their backoff; dead letters to publish
            if not (succeeded or failed):
                return Recorded(0, 0, retried, row[0], False, None)
            state, duration_s = await _count_results(conn, job_id, succeeded, failed)
            ended = state in TERMINAL_JOB_STATES
            return Recorded(succeeded, failed, retried, state, ended, duration_s if ended else None)


# --- record(): one statement per kind of outcome, inside the caller's transaction --------------------


def retry_plan(
    transient: Sequence[tuple[int, int, str]],
    tries: dict[int, int],
    max_attempts: int,
    backoff_s: float,
    backoff_max_s: float,
) -> tuple[list[tuple[int, int, str, str]], list[tuple[int, float]]]:
    """Split a round's transient failures by the attempt each would be (`tries`; items missing from it are
    no longer pending and drop out): (failures for good, RETRIES_EXHAUSTED; (index, backoff delay) to retry),
    the delay doubling from `backoff_s` per attempt up to `backoff_max_s`."""
    given_up: list[tuple[int, int, str, str]] = []
    again: list[tuple[int, float]] = []
    for index, code, message in transient:
        if index not in tries:
            continue
        if tries[index] >= max_attempts:
            given_up.append((index, code, "RETRIES_EXHAUSTED", f"failed {tries[index]} times; last error: {message}"))
        else:
            again.append((index, min(backoff_max_s, backoff_s * 2 ** (tries[index] - 1))))
    return given_up, again


async def _write_successes(conn: Any, job_id: uuid.UUID, succeeded: Sequence[tuple[int, bytes]]) -> int:
    """Mark pending items succeeded and store their responses; the number of results written."""
    if not succeeded:
        return 0
    indexes = [i for i, _ in succeeded]
    cur = await conn.execute(
        """WITH done AS (
               UPDATE items SET state = %s, attempts = attempts + 1, due_at = NULL, lease_until = NULL
               FROM unnest(%s::bigint[]) AS o(item_index)
               WHERE items.job_id = %s AND items.item_index = o.item_index AND items.state = %s
               RETURNING items.item_index, items.attempts)
           INSERT INTO results (job_id, item_index, state, response, attempts)
           SELECT %s, done.item_index, %s, o.response, done.attempts
           FROM done JOIN unnest(%s::bigint[], %s::bytea[]) AS o(item_index, response) USING (item_index)
           ON CONFLICT (job_id, item_index) DO NOTHING""",
        (ITEM_SUCCEEDED, indexes, job_id, ITEM_PENDING, job_id, ITEM_SUCCEEDED, indexes, [r for _, r in succeeded]),
    )
    return int(cur.rowcount)


async def _next_attempts(conn: Any, job_id: uuid.UUID, indexes: Sequence[int]) -> dict[int, int]:
    """The attempt number this round was, for each of `indexes` still pending."""
    if not indexes:
        return {}
    cur = await conn.execute(
        "SELECT item_index, attempts FROM items WHERE job_id = %s AND item_index = ANY(%s) AND state = %s",
        (job_id, list(indexes), ITEM_PENDING),
    )
    return {int(i): int(a) + 1 for i, a in await cur.fetchall()}


async def _schedule_retries(conn: Any, job_id: uuid.UUID, again: Sequence[tuple[int, float]]) -> int:
    """Put items back in the outbox, each due after its backoff delay; the number requeued."""
    if not again:
        return 0
    cur = await conn.execute(
        """UPDATE items SET attempts = attempts + 1, lease_until = NULL,
                  due_at = now() + make_interval(secs => o.delay)
           FROM unnest(%s::bigint[], %s::float8[]) AS o(item_index, delay)
           WHERE items.job_id = %s AND items.item_index = o.item_index AND items.state = %s""",
        ([i for i, _ in again], [d for _, d in again], job_id, ITEM_PENDING),
    )
    return int(cur.rowcount)


async def _write_failures(conn: Any, job_id: uuid.UUID, failures: Sequence[tuple[int, int, str, str]]) -> int:
    """Fail pending items for good (due for the dead-letter topic) with their errors; the number written."""
    if not failures:
        return 0
    indexes = [f[0] for f in failures]
    cur = await conn.execute(
        """WITH done AS (
               UPDATE items SET state = %s, attempts = attempts + 1, due_at = NULL, lease_until = NULL,
                      dlq_due = true
               FROM unnest(%s::bigint[]) AS o(item_index)
               WHERE items.job_id = %s AND items.item_index = o.item_index AND items.state = %s
               RETURNING items.item_index, items.attempts)
           INSERT INTO results
               (job_id, item_index, state, error_code, error_reason, error_message, attempts)
           SELECT %s, done.item_index, %s, o.code, o.reason, o.message, done.attempts
           FROM done JOIN unnest(%s::bigint[], %s::int[], %s::text[], %s::text[])
               AS o(item_index, code, reason, message) USING (item_index)
           ON CONFLICT (job_id, item_index) DO NOTHING""",
        (
            ITEM_FAILED,
            indexes,
            job_id,
            ITEM_PENDING,
            job_id,
            ITEM_FAILED,
            indexes,
            [f[1] for f in failures],
            [f[2] for f in failures],
            [f[3] for f in failures],
        ),
    )
    return int(cur.rowcount)


async def _count_results(conn: Any, job_id: uuid.UUID, succeeded: int, failed: int) -> tuple[int, float]:
    """Add the round's results to the job's counts and end it when none is left: (its state, seconds since
    it was created, meaningful once it ended)."""
    cur = await conn.execute(
        """UPDATE jobs SET succeeded_items = succeeded_items + %(ok)s, failed_items = failed_items + %(bad)s,
               state = CASE WHEN succeeded_items + %(ok)s + failed_items + %(bad)s + cancelled_items < total_items
                            THEN %(running)s WHEN failed_items + %(bad)s > 0 THEN %(failed)s ELSE %(succeeded)s END,
               start_time = COALESCE(start_time, now()),
               end_time = CASE WHEN succeeded_items + %(ok)s + failed_items + %(bad)s + cancelled_items < total_items
                               THEN NULL ELSE now() END
           WHERE job_id = %(job)s
           RETURNING state, EXTRACT(EPOCH FROM (end_time - create_time))""",
        {
            "ok": succeeded,
            "bad": failed,
            "running": JOB_RUNNING,
            "failed": JOB_FAILED,
            "succeeded": JOB_SUCCEEDED,
            "job": job_id,
        },
    )
    end = await cur.fetchone()
    assert end is not None
    return int(end[0]), float(end[1] or 0.0)


def _job_not_found(job_id: uuid.UUID) -> NotFound:
    return NotFound(f"job {job_id} not found", reason="JOB_NOT_FOUND", metadata={"job_id": str(job_id)})
