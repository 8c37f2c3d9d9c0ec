"""Router settings, read from SERVEGRID_ROUTER_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    """What a router replica can be told; every field has a safe default for a laptop."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRID_ROUTER_", extra="ignore", frozen=True)

    port: int = Field(
        50052, ge=0, le=65535, description="gRPC port for ADS (xDS), the admin API and shadow mirrors; 0 picks one."
    )
    metrics_port: int | None = Field(9152, ge=0, le=65535, description="Prometheus /metrics port; unset disables.")
    registry_address: str = Field("", description="Registry host:port to watch routes from; empty runs without one.")
    routes_file: Path | None = Field(
        None, description="Static routing table (WatchRoutesResponse as proto JSON) loaded at start."
    )
    watcher_name: str = Field("router", description="Name this replica gives the registry in WatchRoutes.")
    registry_backoff_initial_s: float = Field(0.1, gt=0, description="First wait before reconnecting to the registry.")
    registry_backoff_max_s: float = Field(5.0, gt=0, description="Longest wait between registry reconnects.")
    drain_timeout_s: float = Field(
        10.0,
        gt=0,
        description="How long DrainBackend/UndrainBackend wait for the registry to store the flag and this"
        " replica to receive it back over WatchRoutes (UNAVAILABLE past it; the stored flag still applies).",
    )
    mesh_address: str = Field(
        "", description="Envoy's mesh listener host:port, where shadow comparisons re-ask; empty turns them off."
    )
    snapshot_coalesce_s: float = Field(
        0.005, ge=0, description="Changes within this window after the first one go into one xDS snapshot."
    )

    probe_interval_s: float = Field(
        5.0,
        gt=0,
        description="How often each backend gets ServerReady/ModelReady probes (EDS health); a backend whose"
        " connection drops is probed at once. Live traffic does not wait for them: Envoy's outlier detection"
        " and retries move off a failing host at once.",
    )
    probe_timeout_s: float = Field(0.5, gt=0, description="Deadline of one probe call.")
    eject_consecutive_failures: int = Field(
        3,
        ge=1,
        description="Envoy outlier detection: consecutive gateway errors or connect failures that eject a host.",
    )
    eject_base_s: float = Field(
        1.0, gt=0, description="Envoy outlier detection: base ejection time, multiplied by the host's ejections."
    )
    eject_max_s: float = Field(30.0, gt=0, description="Envoy outlier detection: longest ejection time.")
    outlier_interval_s: float = Field(
        1.0, gt=0, description="Envoy outlier detection: how often ejections are judged and lifted."
    )

    breaker_consecutive_failures: int = Field(
        5, ge=1, description="Envoy outlier detection: consecutive 5xx (any failure) that eject a host."
    )
    breaker_error_rate: float = Field(
        0.5, gt=0, le=1, description="Envoy outlier detection: failure share over one interval that ejects a host."
    )
    breaker_min_requests: int = Field(
        20,
        ge=1,
        description="Envoy outlier detection: fewest requests to a host in an interval before the share counts.",
    )
    max_requests_per_cluster: int = Field(
        100_000, ge=1, description="Envoy circuit breaker: most requests (and pending requests) per version cluster."
    )

    retry_max_attempts: int = Field(3, ge=1, description="Envoy retry policy: most attempts, the first included.")
    retry_per_try_timeout_s: float = Field(
        0.0,
        ge=0,
        description="Envoy retry policy: deadline of each attempt; 0 lets one take the caller's whole deadline.",
    )
    retry_budget_ratio: float = Field(
        0.2, ge=0, description="Envoy retry budget: retries in flight as a share of requests in flight."
    )
    retry_budget_min_per_s: float = Field(
        10.0, ge=0, description="Envoy retry budget: retries always allowed in flight (min_retry_concurrency)."
    )
    retry_backoff_base_s: float = Field(0.002, ge=0, description="Envoy retry policy: base backoff (full jitter).")
    retry_backoff_max_s: float = Field(0.1, ge=0, description="Envoy retry policy: longest backoff between attempts.")
    max_concurrent_streams: int = Field(
        1024, ge=1, description="Envoy: most HTTP/2 streams per connection to one backend."
    )
    rest_timeout_s: float = Field(
        60.0, gt=0, description="Envoy: longest a REST request (KServe v2 or API) may take, to the end of its answer."
    )
    cors_origins: tuple[str, ...] = Field(
        ("*",), description="Origins the public listener's KServe REST routes allow (CORS); JSON list in the env."
    )

    shadow_max_in_flight: int = Field(
        16, ge=0, description="Most shadow comparisons in flight; mirrored requests past it are dropped and counted."
    )
    shadow_timeout_s: float = Field(10.0, gt=0, description="Deadline of each call a shadow comparison makes.")
