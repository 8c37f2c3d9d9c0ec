"""Settings for the edge service (Envoy's rate limit and API-key helpers), from SERVEGRID_EDGE_* variables."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.runtime import ServiceSettings


class EdgeSettings(ServiceSettings):
    """What the edge service can be told; database and Redis also read the stack-wide names."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRID_EDGE_", extra="ignore", frozen=True)

    port: int = Field(50055, ge=0, le=65535, description="gRPC port Envoy's ext_authz and ratelimit filters call.")
    metrics_port: int | None = Field(9155, ge=0, le=65535, description="Prometheus /metrics port; unset disables.")
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/test",
        validation_alias=AliasChoices("SERVEGRID_EDGE_DATABASE_URL", "SERVEGRID_DATABASE_URL"),
        description="PostgreSQL holding the hashed API keys.",
    )
    db_schema: str = Field("servegrid_edge", pattern=r"^[a-z_][a-z0-9_]*$", description="Schema for the edge's tables.")
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("SERVEGRID_EDGE_REDIS_URL", "SERVEGRID_REDIS_URL"),
        description="Redis for rate-limit counters and the API-key cache.",
    )
    redis_prefix: str = Field("servegrid:edge:", description="Prefix of every Redis key the edge writes.")
    redis_timeout_s: float = Field(
        1.0, gt=0, description="Per-command Redis timeout; short, so a dead Redis answers fast (see fail-open)."
    )
    ratelimit_domain: str = Field("servegrid", description="RLS domain Envoy sends; others are refused.")
    default_limit: int = Field(100, ge=0, description="Per-tenant requests per `limit_unit` when no override names it.")
    limit_unit: Literal["second", "minute", "hour", "day"] = Field(
        "minute", description="Fixed window the limits count in: 100 with minute is 100 requests/minute."
    )
    tenant_limits: dict[str, int] = Field(
        default_factory=dict, description='Per-tenant overrides of default_limit, JSON: {"acme": 1000}.'
    )
    route_limits: dict[str, int] = Field(
        default_factory=dict,
        description='Extra per-route limits, JSON keyed "route" or "tenant/route": {"infer": 50, "acme/infer": 500}.',
    )
    key_cache_ttl_s: int = Field(
        30, ge=1, description="How long a key lookup stays cached in Redis; bounds how stale a revocation can be."
    )
