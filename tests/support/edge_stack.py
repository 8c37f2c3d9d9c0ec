"""The front door for integration tests: edge, gateway, a stand-in registry and Envoy, as real processes."""

from __future__ import annotations

import contextlib
import json
import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import redis

from services.edge.devkeys import DevIssuer
from services.edge.tokens import SIGNING_KEY_FILE, load_or_create_signing_key
from services.mesh.bootstrap import EnvoyParams
from services.runtime.tls import CertFiles
from tests.support.datastores import SessionDatastores
from tests.support.envoy import EnvoyProcess, start_envoy
from tests.support.processes import REPO, ServiceProcess, start_service


@dataclass
class EdgeStack:
    """Everything one test module talks to; names are random so parallel sessions never collide."""

    state_dir: Path
    datastores: SessionDatastores
    issuer: DevIssuer
    schema: str
    redis_prefix: str
    tenant_limits: dict[str, int]
    edge: ServiceProcess
    gateway: ServiceProcess
    registry: ServiceProcess
    envoy: EnvoyProcess
    params: EnvoyParams
    extra: list[ServiceProcess | EnvoyProcess] = field(default_factory=list)
    edge_settings: dict[str, str] = field(default_factory=dict)  # SERVEGRID_EDGE_* every edge here gets

    def edge_env(self, **overrides: str) -> dict[str, str]:
        return {
            "SERVEGRID_EDGE_DATABASE_URL": self.datastores.database_url,
            "SERVEGRID_EDGE_REDIS_URL": self.datastores.redis_url,
            "SERVEGRID_EDGE_DB_SCHEMA": self.schema,
            "SERVEGRID_EDGE_REDIS_PREFIX": self.redis_prefix,
            "SERVEGRID_EDGE_TENANT_LIMITS": json.dumps(self.tenant_limits),
            # Tests share tenants across many calls; the production default (100/minute) is
            # asserted in a unit test, and the limits that must bite are set per tenant above.
            "SERVEGRID_EDGE_DEFAULT_LIMIT": "100000",
            "SERVEGRID_EDGE_USE_UVLOOP": "false",
            # The edge mints exchanged tokens with this key; Envoy trusts its JWKS (params.token_jwks_file).
            "SERVEGRID_EDGE_TOKEN_SIGNING_KEY_FILE": str(self.state_dir / "tokens" / SIGNING_KEY_FILE),
            **self.edge_settings,
            **overrides,
        }

    def start_edge(self, name: str, **env: str) -> ServiceProcess:
        process = start_service(name, "services.edge", "SERVEGRID_EDGE_", self.state_dir, self.edge_env(**env))
        self.extra.append(process)
        return process

    def start_envoy(self, name: str, edge: ServiceProcess, **overrides: Any) -> EnvoyProcess:
        envoy = start_envoy(self.state_dir / name, self.params, edge=edge.address, **overrides)
        self.extra.append(envoy)
        return envoy

    def keys_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`python -m services.edge.keys ...` against this stack's schema and Redis prefix."""
        import os

        env = {
            **os.environ,
            **self.edge_env(),
            "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "gen" / "python")]),
        }
        return subprocess.run(
            [sys.executable, "-m", "services.edge.keys", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def create_key(self, tenant: str, *roles: str) -> tuple[str, str]:
        """(key_id, api_key) made through the CLI, exactly as an operator would."""
        role_args = [arg for role in roles for arg in ("--role", role)]
        result = self.keys_cli("create", "--tenant", tenant, *role_args)
        assert result.returncode == 0, result.stderr
        record = json.loads(result.stdout)
        return record["key_id"], record["api_key"]

    def counter_keys(self, tenant: str) -> list[str]:
        client = redis.Redis.from_url(self.datastores.redis_url)
        try:
            return [k.decode() for k in client.scan_iter(f"{self.redis_prefix}rl:*:t={tenant}:*")]
        finally:
            client.close()

    def stop(self) -> None:
        for process in reversed(self.extra):
            process.stop()
        for process in (self.envoy, self.gateway, self.registry, self.edge):
            process.stop()
        with contextlib.suppress(psycopg.Error):
            self.datastores.drop_schema(self.schema)
        self.datastores.delete_keys(self.redis_prefix)


# Every Triton model served under its own name: the edge tests call Triton's models through Envoy.
EDGE_MODELS = ("affine", "affine_batched", "digits", "resnet18")


def tls_env(prefix: str, files: CertFiles | None, *allowed_peers: str) -> dict[str, str]:
    """A service's mTLS settings (services/runtime/settings.py) as its environment; {} without certificates."""
    if files is None:
        return {}
    env = {f"{prefix}TLS_CERT_FILE": str(files.cert), f"{prefix}TLS_KEY_FILE": str(files.key)}
    env[f"{prefix}TLS_CA_FILE"] = str(files.ca)
    if allowed_peers:
        env[f"{prefix}TLS_ALLOWED_PEERS"] = json.dumps(list(allowed_peers))
    return env


def _control_plane(state_dir: Path, triton_grpc: str, triton_http: str, tls: CertFiles | None = None) -> Any:
    """A real router serving Envoy's xDS from a static table: each model on the one Triton."""
    from services.router.settings import RouterSettings
    from tests.support.router_harness import RouterThread, route, write_routes

    backend = [("triton", triton_grpc, triton_http)]
    routes = write_routes(state_dir / "routes.json", [route(m, [(1, m, 100, backend)]) for m in EDGE_MODELS])
    settings = RouterSettings(
        port=0,
        metrics_port=None,
        use_uvloop=False,
        grace_period_s=0.2,
        routes_file=routes,
        tls_cert_file=tls.cert if tls else None,
        tls_key_file=tls.key if tls else None,
        tls_ca_file=tls.ca if tls else None,
    )
    return RouterThread(settings).start()


@contextlib.contextmanager
def edge_stack(
    state_dir: Path,
    datastores: SessionDatastores,
    triton_grpc: str,
    tenant_limits: dict[str, int],
    triton_http: str = "",
    *,
    edge_settings: dict[str, str] | None = None,
    envoy_overrides: dict[str, Any] | None = None,
    certs: dict[str, CertFiles] | None = None,
    gateway_env: dict[str, str] | None = None,
) -> Iterator[EdgeStack]:
    """Start edge, stand-in registry, a router (xDS), gateway and Envoy in front of one Triton; stop them all.

    `edge_settings` (SERVEGRID_EDGE_* variables) go to every edge of the stack; `envoy_overrides`
    (EnvoyParams fields) to every Envoy; `gateway_env` (more environment) to the gateway. `certs`
    (services/stack/certs.py's, by component): every connection inside speaks mutual TLS, the edge
    answering only Envoy, as `servegrid up` runs it."""
    from services.stack.ports import free_port

    token = secrets.token_hex(4)
    issuer = DevIssuer.generate()
    jwks = issuer.write(state_dir / "jwt")
    _, token_jwks = load_or_create_signing_key(state_dir / "tokens")
    started: list[ServiceProcess | EnvoyProcess] = []
    stack: EdgeStack | None = None
    certs = certs or {}
    router = _control_plane(state_dir, triton_grpc, triton_http, certs.get("router"))
    if certs:
        edge_settings = {**tls_env("SERVEGRID_EDGE_", certs["edge"], "envoy"), **(edge_settings or {})}
        envoy_tls = certs["envoy"]
        envoy_overrides = {
            "tls_cert_file": str(envoy_tls.cert),
            "tls_key_file": str(envoy_tls.key),
            "tls_ca_file": str(envoy_tls.ca),
            **(envoy_overrides or {}),
        }
    mesh_port = free_port()
    try:
        stack = EdgeStack(
            state_dir=state_dir,
            datastores=datastores,
            issuer=issuer,
            schema=f"servegrid_edge_{token}",
            redis_prefix=f"servegrid:edgetest:{token}:",
            tenant_limits=tenant_limits,
            edge_settings=dict(edge_settings or {}),
            edge=None,  # type: ignore[arg-type]
            gateway=None,  # type: ignore[arg-type]
            registry=None,  # type: ignore[arg-type]
            envoy=None,  # type: ignore[arg-type]
            params=EnvoyParams.for_profile("local", jwks_file=str(jwks), token_jwks_file=str(token_jwks)),
        )
        stack.edge = start_service("edge", "services.edge", "SERVEGRID_EDGE_", state_dir, stack.edge_env())
        started.append(stack.edge)
        stack.registry = start_service(
            "registry",
            "tests.support.fake_registry",
            "SERVEGRID_FAKE_REGISTRY_",
            state_dir,
            tls_env("SERVEGRID_FAKE_REGISTRY_", certs.get("registry")),
        )
        started.append(stack.registry)
        stack.gateway = start_service(
            "gateway",
            "services.gateway",
            "SERVEGRID_GATEWAY_",
            state_dir,
            {
                "SERVEGRID_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{mesh_port}",
                "SERVEGRID_GATEWAY_REGISTRY_ADDRESS": stack.registry.address,
                **tls_env("SERVEGRID_GATEWAY_", certs.get("gateway")),
                **(gateway_env or {}),
            },
        )
        started.append(stack.gateway)
        stack.params = EnvoyParams.for_profile(
            "local",
            # Generous: other suites share this box's two cores, and a timed-out key check fails
            # closed (503), flaky here.
            ext_authz_timeout_s=5.0,
            jwks_file=str(jwks),
            token_jwks_file=str(token_jwks),
            gateway=stack.gateway.address,
            xds=(router.address,),
            mesh_host="127.0.0.1",
            mesh_port=mesh_port,
            registry=stack.registry.address,
            edge=stack.edge.address,
            **(envoy_overrides or {}),
        )
        stack.envoy = start_envoy(state_dir / "envoy", stack.params)
        started.append(stack.envoy)
        yield stack
    finally:
        if stack is not None and stack.envoy is not None:
            stack.stop()
        else:
            for process in reversed(started):
                process.stop()
        router.stop()


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http(method: str, url: str, body: object | bytes | None = None, headers: dict[str, str] | None = None) -> HttpReply:
    """One HTTP/1.1 request (as curl would send it); errors come back as replies, not exceptions."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "content-type" not in {k.lower() for k in (headers or {})}:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return HttpReply(reply.status, {k.lower(): v for k, v in reply.headers.items()}, reply.read())
    except urllib.error.HTTPError as error:
        return HttpReply(error.code, {k.lower(): v for k, v in error.headers.items()}, error.read())
