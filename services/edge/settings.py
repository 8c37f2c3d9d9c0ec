"""Settings for the edge service (Envoy's rate limit and API-key helpers), from SERVEGRID_EDGE_* variables."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import SettingsConfigDict

from services.mesh import names
from services.runtime import ServiceSettings


class EdgeSettings(ServiceSettings):
    """What the edge service can be told; database and Redis also read the stack-wide names."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRID_EDGE_", extra="ignore", frozen=True)

    port: int = Field(
        50055, ge=0, le=65535, description="gRPC port of ext_authz and the rate-limit quota server (Envoy calls both)."
    )
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
    ratelimit_domain: str = Field(
        "servegrid", description="Rate-limit quota domain Envoy reports under; a stream naming another is refused."
    )
    default_limit: int = Field(100, ge=0, description="Per-tenant requests per `limit_unit` when no override names it.")
    limit_unit: Literal["second", "minute", "hour", "day"] = Field(
        "minute", description="Fixed window the limits count in: 100 with minute is 100 requests/minute."
    )
    tenant_limits: dict[str, int] = Field(
        default_factory=dict, description='Per-tenant overrides of default_limit, JSON: {"acme": 1000}.'
    )
    route_limits: dict[str, int] = Field(
        default_factory=dict,
        description='Extra per-route limits, JSON keyed "route" or "tenant/route": {"infer": 50, "acme/infer": 500}. '
        "Routes: infer, gateway, admin, kserve, auth-token (token exchanges, charged by the edge). A route's requests "
        "count against the tenant's limit too.",
    )
    quota_lease_fraction: float = Field(
        0.1,
        gt=0,
        le=1,
        description="Smallest lease of tokens sent to one Envoy, as a share of the limit; larger leases follow demand.",
    )
    quota_demand_reports: int = Field(
        2, ge=1, description="A lease covers this many usage reports' (5 s each) worth of an Envoy's last demand."
    )
    quota_assignment_ttl_s: int = Field(
        15,
        ge=6,
        description="How long Envoy keeps an assignment without news from the edge; past it, limits fail open.",
    )
    key_cache_ttl_s: int = Field(
        30, ge=1, description="How long a key lookup stays cached in Redis; bounds how stale a revocation can be."
    )
    # --- API key → token exchange (services/edge/tokens.py) ---
    token_signing_key_file: str = Field(
        "",
        description="PEM private key (EC P-256 or RSA) that signs exchanged tokens; its JWKS goes to Envoy. "
        "Empty: no exchange (CreateAccessToken answers UNIMPLEMENTED; API keys still work per request).",
    )
    token_issuer: str = Field(names.TOKEN_ISSUER, description="`iss` of exchanged tokens; Envoy trusts it.")
    token_audience: str = Field("servegrid", description="`aud` of exchanged tokens: the API's audience.")
    token_ttl_s: int = Field(
        300,
        ge=10,
        le=3600,
        description="Lifetime of an exchanged token; a revoked key's tokens stay valid at most this long.",
    )
