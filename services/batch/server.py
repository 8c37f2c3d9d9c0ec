"""Composition root of the batch service: store, outbox relay, reconciler, in-process workers, servicer."""

from __future__ import annotations

from servegrid.batch.v1 import batch_pb2, batch_pb2_grpc

from services.batch.inference import KServeBatchClient
from services.batch.outbox import OutboxRelay
from services.batch.reconciler import Reconciler
from services.batch.servicer import BatchServicer
from services.batch.settings import BatchSettings
from services.batch.store import BatchStore
from services.batch.worker import WorkerPool
from services.runtime.server import ServiceApp

SERVICE = batch_pb2.DESCRIPTOR.services_by_name["BatchService"].full_name


def build_app(settings: BatchSettings) -> ServiceApp:
    store = BatchStore(settings.database_url, settings.db_schema, max_size=settings.db_pool_max)
    relay = OutboxRelay(settings, store)
    reconciler = Reconciler(store, settings, relay.wake)
    inference = KServeBatchClient(
        settings.inference_address,
        timeout_s=settings.request_timeout_s,
        config_ttl_s=settings.model_config_ttl_s,
        tls=settings.tls,
    )
    workers = WorkerPool(settings, store, inference, consumers=settings.workers) if settings.workers else None

    app = ServiceApp("batch", settings)
    app.add_servicer(
        batch_pb2_grpc.add_BatchServiceServicer_to_server, BatchServicer(store, settings, relay.wake), SERVICE
    )
    app.health.add_component("database", store.ping)
    # Optional: with the broker down, jobs are still accepted and stored (the outbox holds them), and
    # they flow as soon as it is back; only the database makes the service useless.
    app.health.add_component("broker", relay.ping, required=False)

    async def migrate() -> None:
        await store.migrate()

    app.on_startup(store.open)
    app.on_startup(migrate)
    app.on_startup(relay.start)
    app.on_startup(reconciler.start)
    # Shutdown hooks run in reverse: workers stop first, the pool closes last.
    app.on_shutdown(store.close)
    app.on_shutdown(inference.close)
    app.on_shutdown(relay.stop)
    app.on_shutdown(reconciler.stop)
    if workers is not None:
        app.on_startup(workers.start)
        app.on_shutdown(workers.stop)
    return app
