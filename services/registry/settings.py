"""Registry settings from SERVEGRID_REGISTRY_* environment variables (shared URLs also from SERVEGRID_*)."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class RegistrySettings(ServiceSettings):
    """What the registry can be told; every field is SERVEGRID_REGISTRY_<FIELD>."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRID_REGISTRY_", extra="ignore", frozen=True)

    port: int = Field(50053, ge=0, le=65535, description="gRPC port; 0 picks a free one (see ready_file).")
    metrics_port: int | None = Field(
        9153, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one, unset disables."
    )
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/test",
        validation_alias=AliasChoices("SERVEGRID_REGISTRY_DATABASE_URL", "SERVEGRID_DATABASE_URL", "database_url"),
        description="PostgreSQL conninfo or URL; falls back to SERVEGRID_DATABASE_URL.",
    )
    db_schema: str = Field(
        "servegrid_registry",
        min_length=1,
        max_length=50,
        pattern=r"^[a-z_][a-z0-9_]*$",
        description="Schema that holds every registry table; migrations create it.",
    )
    db_pool_min: int = Field(1, ge=0, description="Connections the pool keeps open.")
    db_pool_max: int = Field(10, ge=1, description="Most connections the pool opens.")
    db_pool_timeout_s: float = Field(5.0, gt=0, description="Longest wait for a pooled connection before UNAVAILABLE.")
    db_statement_timeout_s: float = Field(10.0, gt=0, description="PostgreSQL statement_timeout for registry queries.")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("SERVEGRID_REGISTRY_REDIS_URL", "SERVEGRID_REDIS_URL", "redis_url"),
        description="Redis URL for the read-through cache; falls back to SERVEGRID_REDIS_URL.",
    )
    redis_prefix: str = Field(
        "servegrid:registry:", min_length=1, description="Prefix of every Redis key the registry reads or writes."
    )
    cache_ttl_s: float = Field(
        60.0, gt=0, description="Lifetime of a cached model or route (bounds staleness if an invalidation is lost)."
    )
    cache_timeout_s: float = Field(
        0.1, gt=0, description="Redis connect and command timeout; a slower cache is skipped."
    )
    cache_retry_after_s: float = Field(
        2.0, ge=0, description="After a Redis error, how long to go straight to PostgreSQL."
    )
    watch_queue_size: int = Field(1000, ge=1, description="Changes buffered per WatchRoutes stream before it is reset.")
    listen_reconnect_s: float = Field(1.0, gt=0, description="Pause before reopening a lost LISTEN connection.")
    triton_load_timeout_s: float = Field(120.0, gt=0, description="Longest a Triton backend may take to load a model.")
