"""Router settings, read from SERVEGRID_ROUTER_* environment variables."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.runtime.settings import ServiceSettings


class RouterSettings(ServiceSettings):
    """What a router replica can be told; every field has a safe default for a laptop."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRID_ROUTER_", extra="ignore", frozen=True)

    port: int = Field(50052, ge=0, le=65535, description="gRPC port for KServe v2 and the admin API; 0 picks one.")
    metrics_port: int | None = Field(9152, ge=0, le=65535, description="Prometheus /metrics port; unset disables.")
    registry_address: str = Field("", description="Registry host:port to watch routes from; empty runs without one.")
    routes_file: Path | None = Field(
        None, description="Static routing table (WatchRoutesResponse as proto JSON) loaded at start."
    )
    watcher_name: str = Field("router", description="Name this replica gives the registry in WatchRoutes.")
    registry_backoff_initial_s: float = Field(0.1, gt=0, description="First wait before reconnecting to the registry.")
    registry_backoff_max_s: float = Field(5.0, gt=0, description="Longest wait between registry reconnects.")

    probe_interval_s: float = Field(0.5, gt=0, description="How often each backend gets ServerReady/ModelReady probes.")
    probe_timeout_s: float = Field(0.5, gt=0, description="Deadline of one probe call.")
    eject_consecutive_failures: int = Field(
        3, ge=1, description="Consecutive connection failures (UNAVAILABLE) that eject a backend."
    )
    eject_base_s: float = Field(1.0, gt=0, description="First ejection cool-down; doubles per repeat ejection.")
    eject_max_s: float = Field(30.0, gt=0, description="Longest ejection cool-down.")

    breaker_consecutive_failures: int = Field(5, ge=1, description="Consecutive failures that open a breaker.")
    breaker_error_rate: float = Field(
        0.5, gt=0, le=1, description="Failure share over the window that opens a breaker."
    )
    breaker_window: int = Field(50, ge=1, description="Requests per window when judging the failure share.")
    breaker_min_requests: int = Field(20, ge=1, description="Fewest requests in a window before the share counts.")
    breaker_open_s: float = Field(2.0, gt=0, description="How long an open breaker rejects before half-open trials.")
    breaker_half_open_trials: int = Field(3, ge=1, description="Successful trials in half-open that close a breaker.")

    retry_max_attempts: int = Field(3, ge=1, description="Most attempts per request, the first included.")
    retry_budget_ratio: float = Field(0.2, ge=0, description="Retries allowed as a share of requests.")
    retry_budget_min_per_s: float = Field(10.0, ge=0, description="Retries always allowed per second (the floor).")
    retry_budget_cap: float = Field(100.0, gt=0, description="Most retry tokens that can be saved up.")
    retry_backoff_base_s: float = Field(0.002, ge=0, description="Backoff before the first retry (full jitter).")
    retry_backoff_max_s: float = Field(0.1, ge=0, description="Longest backoff between attempts.")

    ewma_decay_s: float = Field(
        2.0, gt=0, description="Time constant of the latency EWMA; idle backends' scores decay with it."
    )
    default_timeout_s: float = Field(60.0, gt=0, description="Backend deadline when the caller sets none.")
    deadline_margin_s: float = Field(
        0.01, ge=0, description="Taken off the caller's deadline so the router's own status reaches it first."
    )
    shadow_max_in_flight: int = Field(16, ge=0, description="Most shadow copies in flight; extra copies are dropped.")
