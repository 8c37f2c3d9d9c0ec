"""What differs between Envoy deployments (local, Kubernetes, a test's), in one frozen dataclass."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from services.mesh import names

# Where a Kubernetes-profile config reads the transcoder's descriptor set: the Helm chart's Envoy pod
# writes it there at start (`--descriptor-set-out`), from the image the services run.
CHART_DESCRIPTORS = "/etc/envoy/descriptors.binpb"
TRACE_SERVICE_NAME = "servegrid-envoy"  # `service.name` of Envoy's spans, in every deployment
Profile = Literal["local", "kubernetes"]


def repo_root() -> Path:
    """The source checkout this module runs from (only the CLI's --write-defaults needs one)."""
    return Path(__file__).resolve().parents[2]


def default_descriptors() -> Path:
    """The descriptor set generated with the contracts (package data of `servegrid`, so a wheel has it
    too); a deployment may pass its own with `--descriptors`."""
    return Path(str(resources.files("servegrid").joinpath("descriptors.binpb")))


@dataclass(frozen=True)
class EnvoyParams:
    """Everything that differs between deployments."""

    profile: Profile = "local"
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    # The internal mesh listener (gateway, batch workers; no auth): never exposed by a public Service.
    mesh_host: str = "127.0.0.1"
    mesh_port: int = 8090
    # Admin serves /quitquitquit and config dumps: loopback only, in every profile.
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    # A listener exposing only /ready and /stats/prometheus from admin (Kubernetes probes and scrapes
    # reach the pod's address, which admin no longer listens on); port 0: none.
    stats_host: str = "0.0.0.0"
    stats_port: int = 0
    gateway: str = "127.0.0.1:50051"
    # The router replicas serving ADS (xDS v3). A DNS name resolving to several (a headless Service)
    # gives every replica; Envoy's ADS stream moves to another when one goes.
    xds: tuple[str, ...] = ("127.0.0.1:50052",)
    registry: str = "127.0.0.1:50053"
    edge: str = "127.0.0.1:50055"
    node_id: str = ""  # empty: servegrid-envoy-<profile> (Kubernetes: pass --service-node per pod)
    node_cluster: str = "servegrid-envoy"
    issuer: str = "https://auth.servegrid.local"
    audience: str = "servegrid"
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    admin_role: str = "admin"
    jwks_file: str = ".servegrid/edge/jwks.json"  # local profile
    jwks_uri: str = ""  # kubernetes profile: the identity provider's JWKS endpoint
    # Every token must carry `exp`; this bounds how far ahead it may lie (exp - now), so a leaked
    # long-lived token cannot be used for months. 0: no bound beyond requiring `exp`.
    jwt_max_lifetime_s: int = 24 * 3600
    # The edge's own short-lived tokens (an API key exchanged for a JWT, services/edge/tokens.py):
    # their issuer, the JWKS of the edge's signing key, and their longest accepted lifetime.
    # An empty token_jwks_file: Envoy trusts no exchanged token.
    token_issuer: str = names.TOKEN_ISSUER
    token_jwks_file: str = ".servegrid/edge/token-jwks.json"
    token_max_lifetime_s: int = 3600
    ratelimit_domain: str = "servegrid"
    # The edge's limit window (SERVEGRID_EDGE_LIMIT_UNIT in seconds): a 429's retry-after counts down
    # to its end. Windows start on multiples of it since the epoch, so Envoy needs no call to know.
    ratelimit_window_s: int = 60
    # Fail open: a bucket the edge has not assigned (a new one, or one whose assignment expired because
    # the edge is gone) passes unlimited; an outage of the edge or its Redis must not take the API down
    # (the edge counts Redis outages, Envoy the edge's: cluster.edge_quota.*). Authentication still
    # fails closed. True: such buckets deny instead (a new bucket's first request too).
    ratelimit_fail_closed: bool = False
    ext_authz_timeout_s: float = 1.0
    max_request_body_bytes: int = 8 * 1024 * 1024
    # Mutual TLS inside the mesh (services/runtime/tls.py): Envoy's certificate and key and the CA of
    # every mesh certificate. Set, Envoy presents its certificate to gateway/registry/edge/router and
    # checks theirs, and the mesh listener accepts only gateway, batch and router certificates.
    # Empty: plaintext (tests, simple deployments). Triton's clusters stay plaintext either way.
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_ca_file: str = ""
    # TLS on the public listener: the server certificate (chain) and key clients see on the API port.
    # Both set: HTTPS and gRPC over TLS on one port (ALPN h2 and http/1.1), TLS 1.2 or later. Empty:
    # plaintext, which only a deployment that asks for it (or terminates TLS in front) should run.
    public_tls_cert_file: str = ""
    public_tls_key_file: str = ""
    access_log_path: str = "/dev/stdout"
    # OpenTelemetry: the OTLP/gRPC collector Envoy exports its spans to (host:port, or an http:// or
    # https:// URL). Set, both listeners trace (service name TRACE_SERVICE_NAME) and pass W3C
    # traceparent on to every upstream (gateway, Triton); empty: no tracer, headers pass untouched.
    otlp_endpoint: str = ""
    # Share of requests Envoy traces (the connection managers' random_sampling), in percent.
    trace_sampling_percent: float = 100.0
    descriptors: Path | None = None  # None: default_descriptors()
    # Where Envoy reads the descriptor set at run time; empty: inline in the config (proto_descriptor_bin).
    # The Kubernetes profile reads a file beside the config (CHART_DESCRIPTORS) instead of embedding ~100 KB.
    descriptor_file: str = ""
    extra_descriptor_files: tuple[str, ...] = field(default=("google/rpc/error_details.proto",))

    @classmethod
    def for_profile(cls, profile: Profile, **overrides: Any) -> EnvoyParams:
        """The profile's defaults with `overrides` (None values ignored). `router="host:port"` is
        accepted for `xds=("host:port",)`: the router is the xDS server."""
        base = cls()
        if profile == "kubernetes":
            base = replace(
                base,
                profile="kubernetes",
                mesh_host="0.0.0.0",
                admin_port=9900,
                stats_port=9901,
                gateway="servegrid-gateway:50051",
                xds=("servegrid-router:50052",),
                registry="servegrid-registry:50053",
                edge="servegrid-edge:50055",
                jwks_file="",
                jwks_uri="https://auth.servegrid.example/.well-known/jwks.json",
                # None by default (Envoy refuses to start on a missing JWKS file); the chart passes
                # --token-jwks-file when `tokens.existingSecret` is set.
                token_jwks_file="",
                descriptor_file=CHART_DESCRIPTORS,
            )
        router = overrides.pop("router", None)
        if router is not None and overrides.get("xds") is None:
            overrides["xds"] = (router,)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def mtls(self) -> bool:
        return bool(self.tls_cert_file and self.tls_key_file and self.tls_ca_file)

    @property
    def public_tls(self) -> bool:
        return bool(self.public_tls_cert_file and self.public_tls_key_file)

    @property
    def node(self) -> str:
        return self.node_id or f"servegrid-envoy-{self.profile}"
