"""Typed service settings read from environment variables with a per-service prefix."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.runtime.tls import CertFiles


class ServiceSettings(BaseSettings):
    """What every servegrid service can be told. Subclasses set `env_prefix`, e.g. SERVEGRID_REGISTRY_."""

    # populate_by_name: code may pass `database_url=...` even where the environment uses aliases.
    model_config = SettingsConfigDict(env_prefix="SERVEGRID_", extra="ignore", frozen=True, populate_by_name=True)

    host: str = Field("127.0.0.1", description="Interface the gRPC server binds; 0.0.0.0 in containers.")
    port: int = Field(0, ge=0, le=65535, description="gRPC port; 0 picks a free one (see ready_file).")
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Prometheus /metrics port; 0 picks a free one, unset disables."
    )
    grace_period_s: float = Field(
        10.0, ge=0, description="On SIGTERM, how long calls in flight may take to finish before they are cut."
    )
    shutdown_delay_s: float = Field(
        0.0,
        ge=0,
        description="On SIGTERM, how long to report NOT_SERVING while still serving, so balancers notice first.",
    )
    health_interval_s: float = Field(
        5.0, gt=0, description="How often component health checks run (a readiness probe's usual period)."
    )
    log_level: str = Field("INFO", description="Log level: DEBUG, INFO, WARNING, ERROR.")
    log_format: Literal["json", "text"] = Field("json", description="json for machines, text for people.")
    ready_file: Path | None = Field(
        None, description="Once serving, write {'port', 'metrics_port', 'health_port', 'pid'} as JSON to this file."
    )
    use_uvloop: bool = Field(True, description="Run the event loop on uvloop (a few percent more throughput).")
    max_message_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Largest gRPC message accepted or sent, in bytes."
    )
    tls_cert_file: Path | None = Field(
        None,
        description="This component's certificate (PEM). With the key and CA set, the port speaks mutual TLS only.",
    )
    tls_key_file: Path | None = Field(None, description="Private key of tls_cert_file (PEM).")
    tls_ca_file: Path | None = Field(
        None, description="CA (PEM) that signs every mesh certificate: clients without one it signed are refused."
    )
    tls_allowed_peers: list[str] = Field(
        [],
        description="With TLS, the component names (certificate DNS SANs) that may call this service, as a JSON list; "
        "empty: any certificate from the CA. Health and reflection stay open to every certified caller.",
    )
    health_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="Plaintext port serving only grpc.health.v1.Health, for probes that cannot present a certificate "
        "(Kubernetes grpc probes); unset: none.",
    )

    @model_validator(mode="after")
    def _tls_all_or_none(self) -> ServiceSettings:
        given = [self.tls_cert_file, self.tls_key_file, self.tls_ca_file]
        if any(given) and not all(given):
            raise ValueError("TLS needs all of tls_cert_file, tls_key_file and tls_ca_file, or none of them")
        return self

    @property
    def tls(self) -> CertFiles | None:
        """The certificate this service serves and calls with; None: plaintext (local tests, simple setups)."""
        if self.tls_cert_file and self.tls_key_file and self.tls_ca_file:
            return CertFiles(self.tls_cert_file, self.tls_key_file, self.tls_ca_file)
        return None
