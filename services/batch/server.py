"""Composition root of the batch service: store, outbox relay, reconciler, in-process workers, servicer."""

from __future__ import annotations

from servegrid.batch.v1 import batch_pb2, batch_pb2_grpc

from services.batch.outbox import OutboxRelay
from services.batch.reconciler import Reconciler
from services.batch.servicer import BatchServicer
from services.batch.settings import BatchSettings
from services.batch.worker import WorkerPool, batch_resources
from services.runtime.server import ServiceApp

SERVICE = batch_pb2.DESCRIPTOR.services_by_name["BatchService"].full_name


def build_app(settings: BatchSettings) -> ServiceApp:
    app = ServiceApp("batch", settings)
    store, inference = batch_resources(app, settings)
    relay = OutboxRelay(settings, store)
    reconciler = Reconciler(store, settings, relay.wake)
    app.add_servicer(
        batch_pb2_grpc.add_BatchServiceServicer_to_server, BatchServicer(store, settings, relay.wake), SERVICE
    )
    # Optional: with the broker down, jobs are still accepted and stored (the outbox holds them), and
    # they flow as soon as it is back; only the database makes the service useless.
    app.health.add_component("broker", relay.ping, required=False)
    app.on_startup(relay.start)
    app.on_startup(reconciler.start)
    # Shutdown hooks run in reverse: workers stop first, the relay next, the store (batch_resources) last.
    app.on_shutdown(relay.stop)
    app.on_shutdown(reconciler.stop)
    if settings.workers:
        workers = WorkerPool(settings, store, inference, consumers=settings.workers)
        app.on_startup(workers.start)
        app.on_shutdown(workers.stop)
    return app
