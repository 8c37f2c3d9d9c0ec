"""Batch service settings from SERVEGRID_BATCH_* environment variables (the database URL also from SERVEGRID_*)."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class BatchSettings(ServiceSettings):
    """What the batch service and its workers can be told; every field is SERVEGRID_BATCH_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRID_BATCH_", extra="ignore", frozen=True, populate_by_name=True)

    port: int = Field(50054, ge=0, le=65535, description="gRPC port; 0 picks a free one (see ready_file).")
    metrics_port: int | None = Field(
        9154, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one, unset disables."
    )
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/test",
        validation_alias=AliasChoices("SERVEGRID_BATCH_DATABASE_URL", "SERVEGRID_DATABASE_URL", "database_url"),
        description="PostgreSQL conninfo or URL; falls back to SERVEGRID_DATABASE_URL.",
    )
    db_schema: str = Field(
        "servegrid_batch",
        min_length=1,
        max_length=50,
        pattern=r"^[a-z_][a-z0-9_]*$",
        description="Schema that holds every batch table; migrations create it.",
    )
    db_pool_max: int = Field(8, ge=2, description="Most PostgreSQL connections one process opens.")
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers, comma-separated host:port.")
    items_topic: str = Field("servegrid.batch.items", description="Topic the outbox relay publishes item chunks to.")
    dlq_topic: str = Field("servegrid.batch.dead-letter", description="Topic that receives items that failed for good.")
    topic_partitions: int = Field(8, ge=1, description="Partitions of the items topic when the service creates it.")
    consumer_group: str = Field("servegrid-batch-workers", description="Kafka consumer group of the worker pool.")
    kafka_session_timeout_ms: int = Field(
        10_000, ge=1000, description="How long a silent (killed) worker keeps its partitions before a rebalance."
    )
    inference_address: str = Field(
        "127.0.0.1:8090", description="KServe v2 gRPC endpoint workers call: Envoy's internal mesh listener."
    )
    workers: int = Field(1, ge=0, description="Worker-pool consumers run inside the service process; 0 for none.")
    worker_port: int = Field(
        0, ge=0, le=65535, description="gRPC health port of a standalone worker process (0: any free port)."
    )
    worker_metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus port of a standalone worker process; unset disables."
    )
    worker_concurrency: int = Field(8, ge=1, description="Inference calls one consumer keeps in flight.")
    chunk_size: int = Field(64, ge=1, le=4096, description="Items per Kafka message (one worker's unit of work).")
    pack_size: int = Field(
        64, ge=1, description="Most items packed into one inference request (capped by max_batch_size)."
    )
    lease_s: float = Field(
        30.0, gt=0, description="How long a published item may go without a result before it is republished."
    )
    max_in_flight_items: int = Field(
        20_000, ge=1, description="Most published items without a result; keeps the queue shorter than a lease."
    )
    max_attempts: int = Field(
        5, ge=1, description="Tries per item before it fails for good and goes to the dead-letter topic."
    )
    retry_backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles per attempt.")
    retry_backoff_max_s: float = Field(30.0, ge=0, description="Longest retry delay.")
    relay_idle_max_s: float = Field(
        10.0,
        gt=0,
        description="Longest the idle outbox relay waits before looking again; it wakes at once on new jobs,"
        " retries and dead letters (in-process, or LISTEN/NOTIFY from workers) and at each retry's due time.",
    )
    relay_batch: int = Field(4096, ge=1, description="Most items the relay publishes per transaction.")
    reconcile_interval_s: float = Field(
        5.0, gt=0, description="How often expired leases are looked for (an expiry is seen this much late at most)."
    )
    request_timeout_s: float = Field(60.0, gt=0, description="Deadline of one inference call.")
    model_config_ttl_s: float = Field(30.0, ge=0, description="How long a model's max_batch_size is cached.")
    watch_interval_s: float = Field(0.5, gt=0, description="How often WatchBatchJob samples progress.")
    max_items: int = Field(1_000_000, ge=1, description="Most items in one job.")
    max_inline_items: int = Field(10_000, ge=1, description="Most items in the inline `items` list.")
