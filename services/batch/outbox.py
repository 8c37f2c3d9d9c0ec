"""OutboxRelay: publishes due items (and dead letters) from PostgreSQL to Kafka, then leases them."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
from collections.abc import Mapping, Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.batch.metrics import DEAD_LETTERS, ITEMS_PUBLISHED
from services.batch.settings import BatchSettings
from services.batch.store import BatchStore, DeadLetter, DueChunk
from services.mesh.names import REQUEST_ID_HEADER
from services.runtime.tracing import TRACE_HEADERS

log = logging.getLogger(__name__)

_TOPIC_ALREADY_EXISTS = 36
_PUBLISH_TIMEOUT_S = 15.0
_DLQ_BATCH = 1000


def encode_chunk(chunk: DueChunk) -> bytes:
    """A work message names items, never carries their tensors: a 64-image chunk would pass Kafka's 1 MB
    default, and the worker reads the inputs anyway to learn whether the item still wants a result."""
    return json.dumps({"job_id": str(chunk.job_id), "items": chunk.item_indices}, separators=(",", ":")).encode()


# Kafka record headers of a job's messages (its work chunks and its dead letters): the job's W3C trace
# context (traceparent, tracestate) and the submitting request's id, so the worker's spans and log
# lines, and whoever reads the dead-letter topic, can find that request.
Headers = list[tuple[str, bytes]]


def context_headers(trace_context: Mapping[str, str], request_id: str) -> Headers:
    headers = [(key, value.encode()) for key, value in trace_context.items() if key in TRACE_HEADERS]
    if request_id:
        headers.append((REQUEST_ID_HEADER, request_id.encode()))
    return headers


def context_from_headers(headers: Sequence[tuple[str, bytes]] | None) -> tuple[dict[str, str], str]:
    """(trace context, request id) from a message's headers (context_headers'); empty for one without."""
    trace_context: dict[str, str] = {}
    request_id = ""
    for key, value in headers or ():
        text = value.decode(errors="replace") if isinstance(value, bytes) else ""
        if key in TRACE_HEADERS:
            trace_context[key] = text
        elif key == REQUEST_ID_HEADER:
            request_id = text
    return trace_context, request_id


def encode_dead_letter(letter: DeadLetter) -> bytes:
    return json.dumps(
        {
            "job_id": str(letter.job_id),
            "item_index": letter.item_index,
            "item_id": letter.item_id,
            "tenant": letter.tenant,
            "model_id": letter.model_id,
            "version": letter.version,
            "attempts": letter.attempts,
            "error": {"code": letter.error_code, "reason": letter.error_reason, "message": letter.error_message},
        },
        separators=(",", ":"),
    ).encode()


async def ensure_topics(settings: BatchSettings) -> None:
    """Create the items and dead-letter topics if missing (a fresh or restarted in-memory broker has none)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        response = await admin.create_topics(
            [
                NewTopic(settings.items_topic, settings.topic_partitions, 1),
                NewTopic(settings.dlq_topic, settings.topic_partitions, 1),
            ]
        )
        for topic, code, *_ in getattr(response, "topic_errors", []):
            if code not in (0, _TOPIC_ALREADY_EXISTS):
                raise RuntimeError(f"could not create topic {topic}: error code {code}")
    finally:
        await admin.close()


# How soon the relay looks again when items are due but held back by max_in_flight_items.
_HELD_BACK_POLL_S = 0.05


class OutboxRelay:
    """The only Kafka producer. Items are claimed, published and leased in one database transaction: a
    crash or broker error before the commit leaves them due (published twice at worst, never lost)."""

    def __init__(self, settings: BatchSettings, store: BatchStore) -> None:
        self._settings = settings
        self._store = store
        self._producer: AIOKafkaProducer | None = None
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener: asyncio.Task[None] | None = None
        self._sequence = itertools.count()
        self._topics_ok = False

    def wake(self) -> None:
        """New work is due (a job was created or retried): look now rather than at the next tick."""
        self._wakeup.set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="outbox-relay")
        self._listener = asyncio.create_task(self._listen(), name="outbox-notifications")

    async def stop(self) -> None:
        for task in (self._task, self._listener):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self._close_producer()

    async def _listen(self) -> None:
        """Wake on the store's NOTIFY (a worker in another process scheduled a retry or failed an item
        for the dead-letter topic). Without the connection, the relay still looks every idle_max_s."""
        while True:
            try:
                async for _ in self._store.due_notifications():
                    self._wakeup.set()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                log.warning(
                    "outbox notifications lost; reconnecting", extra={"error": f"{type(error).__name__}: {error}"}
                )
            await asyncio.sleep(1.0)

    async def _idle_wait_s(self) -> float:
        """How long nothing can become due without a wake-up: until the earliest scheduled retry, at
        most relay_idle_max_s (which bounds what a missed notification can delay)."""
        most = self._settings.relay_idle_max_s
        next_due = await self._store.next_due_in_s()
        if next_due is None:
            return most
        # Due now yet not published: the in-flight cap holds it until results come back; look again soon.
        return min(max(next_due, _HELD_BACK_POLL_S), most)

    async def ping(self) -> None:
        """Broker health: a metadata round trip."""
        if self._producer is None:
            raise ConnectionError("producer not connected")
        await self._producer.client.fetch_all_metadata()

    async def _close_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await producer.stop()

    async def _connect(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self._settings.kafka_bootstrap,
                linger_ms=2,
                acks="all",
                request_timeout_ms=10_000,
                metadata_max_age_ms=5_000,
            )
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await producer.stop()
                raise
            self._producer = producer
        if not self._topics_ok:
            await ensure_topics(self._settings)
            self._topics_ok = True
        return self._producer

    async def _run(self) -> None:
        s = self._settings
        while True:
            try:
                await self._connect()
                in_flight = await self._store.leased_items()
                published = await self._store.publish_due(
                    min(s.relay_batch, s.max_in_flight_items - in_flight), s.chunk_size, s.lease_s, self._publish_chunks
                )
                dead = await self._store.publish_dead_letters(_DLQ_BATCH, self._publish_dead_letters)
                if published or dead:
                    continue
                wait_s = await self._idle_wait_s()
                if wait_s > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wakeup.wait(), wait_s)
                self._wakeup.clear()
            except asyncio.CancelledError:
                raise
            except Exception as error:
                # Broker gone or restarted (topics lost), or the database blipped: nothing was leased, so
                # the same items are due on the next pass. Rebuild the producer and the topics first.
                log.warning("outbox relay pass failed; retrying", extra={"error": f"{type(error).__name__}: {error}"})
                self._topics_ok = False
                await self._close_producer()
                await asyncio.sleep(0.5)

    async def _send_all(self, topic: str, messages: list[tuple[bytes, bytes, Headers]]) -> None:
        producer = self._producer
        if producer is None:
            raise ConnectionError("producer not connected")
        deadline = time.monotonic() + _PUBLISH_TIMEOUT_S
        pending = [
            await producer.send(topic, value, key=key, headers=headers or None) for key, value, headers in messages
        ]
        await asyncio.wait_for(asyncio.gather(*pending), max(0.1, deadline - time.monotonic()))

    async def _publish_chunks(self, chunks: list[DueChunk]) -> None:
        # Keyed per chunk (job, first item, publish sequence), not per job: one job's chunks hash to every
        # partition, so every worker in the group shares a big job, and a republished chunk usually lands on
        # a different partition from the one that lost it or whose consumer died.
        sequence = next(self._sequence)
        await self._send_all(
            self._settings.items_topic,
            [
                (
                    f"{c.job_id}:{c.item_indices[0]}:{sequence}".encode(),
                    encode_chunk(c),
                    context_headers(c.trace_context, c.request_id),
                )
                for c in chunks
            ],
        )
        ITEMS_PUBLISHED.inc(sum(len(c.item_indices) for c in chunks))

    async def _publish_dead_letters(self, letters: list[DeadLetter]) -> None:
        await self._send_all(
            self._settings.dlq_topic,
            [
                (str(d.job_id).encode(), encode_dead_letter(d), context_headers(d.trace_context, d.request_id))
                for d in letters
            ],
        )
        DEAD_LETTERS.inc(len(letters))
