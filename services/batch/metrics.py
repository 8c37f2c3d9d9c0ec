"""Prometheus metrics of the batch service and its workers."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

ITEMS_DONE = Counter(
    "servegrid_batch_items_total", "Item results written, by outcome (succeeded, failed).", ["outcome"]
)
ITEM_RETRIES = Counter("servegrid_batch_item_retries_total", "Item attempts that failed and were queued again.")
DEAD_LETTERS = Counter("servegrid_batch_dead_letters_total", "Items published to the dead-letter topic.")
ITEMS_PUBLISHED = Counter("servegrid_batch_items_published_total", "Items the outbox relay published to Kafka.")
LEASES_EXPIRED = Counter(
    "servegrid_batch_leases_expired_total", "Items republished because their lease ran out without a result."
)
DUPLICATES_DROPPED = Counter(
    "servegrid_batch_duplicate_deliveries_total", "Delivered items that already had a result or were cancelled."
)
CONSUMER_LAG = Gauge("servegrid_batch_consumer_lag", "Messages behind the high watermark, summed over partitions.")
INFER_REQUESTS = Counter(
    "servegrid_batch_infer_requests_total", "Inference calls made by workers, by status code.", ["code"]
)
PACK_SIZE = Histogram(
    "servegrid_batch_pack_items", "Items per inference call.", buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256)
)
JOB_DURATION = Histogram(
    "servegrid_batch_job_duration_seconds",
    "Time from a job's creation to its end, by final state.",
    ["state"],
    buckets=(1, 5, 15, 30, 60, 120, 300, 900, 1800, 3600, 14400),
)

# Exported at 0 from the start, so the first job's rate() sees 0 -> 1 (a series born at 1 has no rate)
# and a dashboard shows 0 before any job. The end states a worker records: services/batch/worker.py.
for _state in ("succeeded", "failed"):
    ITEMS_DONE.labels(_state)
    JOB_DURATION.labels(_state)
INFER_REQUESTS.labels("OK")
