"""Settings for the gateway (the public API), from SERVEGRID_GATEWAY_* variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from services.runtime import ServiceSettings


class GatewaySettings(ServiceSettings):
    """What the gateway can be told."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRID_GATEWAY_", extra="ignore", frozen=True)

    port: int = Field(50051, ge=0, le=65535, description="gRPC port Envoy routes servegrid.gateway.v1 to.")
    metrics_port: int | None = Field(9151, ge=0, le=65535, description="Prometheus /metrics port; unset disables.")
    inference_address: str = Field(
        "127.0.0.1:8090",
        description="KServe v2 gRPC address Infer calls: Envoy's internal mesh listener (host:port), never Triton.",
    )
    registry_address: str = Field("127.0.0.1:50053", description="The registry's gRPC address, for model discovery.")
    batch_address: str = Field("", description="The batch service's gRPC address; empty when batch is not deployed.")
    default_timeout_s: float = Field(
        30.0, gt=0, description="Deadline for an inference call when the caller set none (callers' own deadlines win)."
    )
    registry_timeout_s: float = Field(5.0, gt=0, description="Deadline for each registry call.")
    max_page_size: int = Field(200, gt=0, description="Largest ListModels page served; bigger requests are capped.")
    identity_peers: list[str] = Field(
        ["envoy"],
        description="With mutual TLS, the certificate names whose x-servegrid-* identity headers are believed "
        "(JSON list); every other caller is anonymous. Without TLS every caller is believed.",
    )
