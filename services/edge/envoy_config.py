"""Renders Envoy's front-door config (local or Kubernetes) from one source: `python -m services.edge.envoy_config`."""

# One function builds the whole bootstrap as a dict; the two profiles differ only in parameters
# (addresses, where the JWKS comes from, CORS origins), never in structure. envoy/*.yaml are this
# module's output with the default parameters, kept for reading and for the Helm chart; a test
# fails when they drift.
#
# Filter order (each step trusts only what the steps before it established):
#   cors → header scrub → jwt_authn → ext_authz (API keys; skipped when a JWT verified)
#        → rbac (audience, tenant present, admin role) → ratelimit → buffer (REST body cap)
#        → grpc_json_transcoder → router
# The transcoder comes after everything path-based, so the auth and limit filters see the path the
# client sent; it re-routes on the gRPC path afterwards.

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2

ROOT = Path(__file__).resolve().parents[2]
DESCRIPTORS = ROOT / "gen" / "descriptors.binpb"
HELM_CHART_COPY = ROOT / "deploy" / "helm" / "servegrid" / "files" / "envoy.yaml"
RENDERED_DIR = ROOT / "envoy"

TENANT_HEADER = "x-servegrid-tenant"
SUBJECT_HEADER = "x-servegrid-subject"
ROLES_HEADER = "x-servegrid-roles"
JWT_PROVIDER = "servegrid"
JWT_METADATA_KEY = "jwt_payload"
JWT_FILTER = "envoy.filters.http.jwt_authn"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
RBAC_FILTER = "envoy.filters.http.rbac"
CORS_FILTER = "envoy.filters.http.cors"
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
BUFFER_FILTER = "envoy.filters.http.buffer"
# Only these identity headers are trusted downstream, so every client-sent header with these
# prefixes goes before anything reads them (x-jwt-* covers Envoy's own payload-forwarding headers).
SCRUBBED_PREFIXES = ("x-servegrid-", "x-jwt-")
GATEWAY_SERVICE = "servegrid.gateway.v1.GatewayService"
REGISTRY_SERVICE = "servegrid.registry.v1.RegistryService"
KSERVE_SERVICE = "inference.GRPCInferenceService"
HEALTH_SERVICE = "grpc.health.v1.Health"
Profile = Literal["local", "kubernetes"]


@dataclass(frozen=True)
class EnvoyParams:
    """Everything that differs between deployments."""

    profile: Profile = "local"
    listen_host: str = "0.0.0.0"
    listen_port: int = 8080
    admin_host: str = "127.0.0.1"
    admin_port: int = 9901
    gateway: str = "127.0.0.1:50051"
    router: str = "127.0.0.1:50052"
    registry: str = "127.0.0.1:50053"
    edge: str = "127.0.0.1:50055"
    issuer: str = "https://auth.servegrid.local"
    audience: str = "servegrid"
    tenant_claim: str = "tenant"
    roles_claim: str = "roles"
    admin_role: str = "admin"
    jwks_file: str = ".servegrid/edge/jwks.json"  # local profile
    jwks_uri: str = ""  # kubernetes profile: the identity provider's JWKS endpoint
    cors_origins: tuple[str, ...] = ("*",)
    ratelimit_domain: str = "servegrid"
    # Past this the request passes unlimited (fail open): long enough for a busy edge, short
    # enough that a hung one adds at most this much latency.
    ratelimit_timeout_s: float = 0.5
    # Fail open: when the edge or its Redis cannot answer, requests pass unlimited (and are
    # counted in Envoy's ratelimit.error stat and the edge's decisions metric): an outage of the
    # counter store must not take the API down. Authentication still fails closed.
    ratelimit_fail_closed: bool = False
    ext_authz_timeout_s: float = 1.0
    max_request_body_bytes: int = 8 * 1024 * 1024
    access_log_path: str = "/dev/stdout"
    otlp_endpoint: str = ""  # host:port of an OTLP/gRPC collector; empty disables Envoy's own spans
    descriptors: Path = DESCRIPTORS
    extra_descriptor_files: tuple[str, ...] = field(default=("google/rpc/error_details.proto",))

    @classmethod
    def for_profile(cls, profile: Profile, **overrides: Any) -> EnvoyParams:
        base = cls()
        if profile == "kubernetes":
            base = replace(
                base,
                profile="kubernetes",
                admin_host="0.0.0.0",
                gateway="servegrid-gateway:50051",
                router="servegrid-router:50052",
                registry="servegrid-registry:50053",
                edge="servegrid-edge:50055",
                jwks_file="",
                jwks_uri="https://auth.servegrid.example/.well-known/jwks.json",
                cors_origins=("https://app.servegrid.example",),
            )
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _any(type_name: str, **config: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **config}


def _duration(seconds: float) -> str:
    return f"{seconds:g}s"


def _cluster(name: str, address: str, *, http2: bool = True, tls_sni: str = "") -> dict[str, Any]:
    host, port = _host_port(address)
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "1s",
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}]}
            ],
        },
    }
    if http2:
        # gRPC upstreams must be told HTTP/2 explicitly; Envoy would speak HTTP/1.1 to them otherwise.
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _any(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {"max_concurrent_streams": 1024}},
            )
        }
        # Many streams share a few connections; without this a burst queues behind the default 1024.
        cluster["circuit_breakers"] = {"thresholds": [{"max_requests": 100000, "max_pending_requests": 100000}]}
    if tls_sni:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": _any("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", sni=tls_sni),
        }
    return cluster


def descriptor_set_bytes(params: EnvoyParams) -> bytes:
    """gen/descriptors.binpb plus the error-detail types, so convert_grpc_status can print them."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(params.descriptors.read_bytes())
    present = {f.name for f in fds.file}
    for module in (error_details_pb2,):
        if module.DESCRIPTOR.name in params.extra_descriptor_files and module.DESCRIPTOR.name not in present:
            for dependency in module.DESCRIPTOR.dependencies:
                if dependency.name not in present:
                    proto = descriptor_pb2.FileDescriptorProto()
                    dependency.CopyToProto(proto)
                    fds.file.append(proto)
                    present.add(dependency.name)
            proto = descriptor_pb2.FileDescriptorProto()
            module.DESCRIPTOR.CopyToProto(proto)
            fds.file.append(proto)
    return fds.SerializeToString(deterministic=True)


# --- RBAC principals -------------------------------------------------------------------------


def _metadata(filter_name: str, path: Sequence[str], value: dict[str, Any]) -> dict[str, Any]:
    """A principal matching the request's dynamic metadata (what jwt_authn and ext_authz wrote)."""
    matcher = {"filter": filter_name, "path": [{"key": k} for k in path], "value": value}
    return {"sourced_metadata": {"metadata_matcher": matcher, "metadata_source": "DYNAMIC"}}


def _jwt_claim(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return _metadata(JWT_FILTER, [JWT_METADATA_KEY, key], value)


def _audience_ok(audience: str) -> dict[str, Any]:
    """No JWT (an API key, which ext_authz checked), or a JWT whose aud names us (string or list)."""
    no_jwt = {"not_id": _metadata(JWT_FILTER, [JWT_METADATA_KEY], {"present_match": True})}
    return {
        "or_ids": {
            "ids": [
                no_jwt,
                _jwt_claim("aud", {"string_match": {"exact": audience}}),
                _jwt_claim("aud", {"list_match": {"one_of": {"string_match": {"exact": audience}}}}),
            ]
        }
    }


def _tenant_present() -> dict[str, Any]:
    # A credential without a tenant cannot be rate limited or attributed: refuse it.
    return {"header": {"name": TENANT_HEADER, "present_match": True}}


def _has_role(params: EnvoyParams, role: str) -> dict[str, Any]:
    return {
        "or_ids": {
            "ids": [
                _jwt_claim(params.roles_claim, {"list_match": {"one_of": {"string_match": {"exact": role}}}}),
                _jwt_claim(params.roles_claim, {"string_match": {"exact": role}}),
                _metadata(EXT_AUTHZ_FILTER, ["roles"], {"list_match": {"one_of": {"string_match": {"exact": role}}}}),
            ]
        }
    }


def _rbac(principal: dict[str, Any], policy: str) -> dict[str, Any]:
    return {"action": "ALLOW", "policies": {policy: {"permissions": [{"any": True}], "principals": [principal]}}}


# --- routes ----------------------------------------------------------------------------------


def _rate_limits(route_name: str) -> list[dict[str, Any]]:
    tenant = {"request_headers": {"header_name": TENANT_HEADER, "descriptor_key": "tenant"}}
    return [
        {"actions": [tenant]},
        {"actions": [tenant, {"generic_key": {"descriptor_key": "route", "descriptor_value": route_name}}]},
    ]


def _route(
    name: str,
    match: dict[str, Any],
    cluster: str,
    *,
    grpc: bool,
    admin: bool = False,
    params: EnvoyParams,
) -> dict[str, Any]:
    action: dict[str, Any] = {"cluster": cluster, "rate_limits": _rate_limits(name)}
    per_filter: dict[str, Any] = {}
    if grpc:
        # gRPC calls carry their own deadline (grpc-timeout); no fixed route timeout cuts them.
        action["timeout"] = "0s"
        action["max_stream_duration"] = {"grpc_timeout_header_max": "300s"}
        # gRPC streams through untouched (a 600 KB image needs no JSON buffering, and
        # grpc.max_receive_message_length in each service bounds it).
        per_filter[BUFFER_FILTER] = _disabled()
    else:
        action["timeout"] = "60s"
    route: dict[str, Any] = {"name": name, "match": match, "route": action}
    if per_filter:
        route["typed_per_filter_config"] = per_filter
    if admin:
        principal = {
            "and_ids": {"ids": [_audience_ok(params.audience), _tenant_present(), _has_role(params, params.admin_role)]}
        }
        route["typed_per_filter_config"] = {
            **per_filter,
            RBAC_FILTER: _any(
                "envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
                rbac={"rules": _rbac(principal, "admin-only")},
            ),
        }
    return route


def _disabled() -> dict[str, Any]:
    return _any("envoy.config.route.v3.FilterConfig", disabled=True)


def _health_routes() -> list[dict[str, Any]]:
    """Health needs no credential: no auth, no RBAC, no limits."""
    open_route = {
        EXT_AUTHZ_FILTER: _any("envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", disabled=True),
        RBAC_FILTER: _any("envoy.extensions.filters.http.rbac.v3.RBACPerRoute"),
        BUFFER_FILTER: _disabled(),
    }
    return [
        {
            "name": "health-grpc",
            "match": {"prefix": f"/{HEALTH_SERVICE}/", "grpc": {}},
            "route": {"cluster": "gateway", "timeout": "5s"},
            "typed_per_filter_config": open_route,
        },
        {
            "name": "health-http",
            "match": {"path": "/healthz"},
            "direct_response": {"status": 200, "body": {"inline_string": '{"status":"SERVING"}\n'}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            # Not an API method: the transcoder (reject_unknown_method) would 404 it.
            "typed_per_filter_config": {
                **open_route,
                TRANSCODER_FILTER: _disabled(),
            },
        },
    ]


def _routes(params: EnvoyParams) -> list[dict[str, Any]]:
    return [
        *_health_routes(),
        # gRPC
        _route("infer", {"path": f"/{GATEWAY_SERVICE}/Infer", "grpc": {}}, "gateway", grpc=True, params=params),
        _route("gateway", {"prefix": f"/{GATEWAY_SERVICE}/", "grpc": {}}, "gateway", grpc=True, params=params),
        _route("kserve", {"prefix": f"/{KSERVE_SERVICE}/", "grpc": {}}, "router", grpc=True, params=params),
        _route(
            "admin", {"prefix": f"/{REGISTRY_SERVICE}/", "grpc": {}}, "registry", grpc=True, admin=True, params=params
        ),
        # grpcurl and other tools discover the public API through the gateway's reflection service.
        _route("gateway", {"prefix": "/grpc.reflection.", "grpc": {}}, "gateway", grpc=True, params=params),
        # REST (the transcoder turns these into the gRPC calls above; unmapped ones get 404)
        _route("admin", {"prefix": "/v1/admin/"}, "registry", grpc=False, admin=True, params=params),
        _route(
            "infer",
            {"safe_regex": {"regex": r"/v1/models/[^/]+(/versions/[^/]+)?:infer"}},
            "gateway",
            grpc=False,
            params=params,
        ),
        _route("gateway", {"prefix": "/v1/"}, "gateway", grpc=False, params=params),
        _not_found_route(),
    ]


def _not_found_route() -> dict[str, Any]:
    """Everything else is 404 (UNIMPLEMENTED over gRPC), at once.

    Without a route, the buffer filter would hold an unknown streaming gRPC call open waiting for
    its end; here no filter past authentication touches it.
    """
    return {
        "name": "not-found",
        "match": {"prefix": "/"},
        "direct_response": {
            "status": 404,
            "body": {"inline_string": '{"code":5,"message":"no such API path or method"}\n'},
        },
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        "typed_per_filter_config": {BUFFER_FILTER: _disabled(), TRANSCODER_FILTER: _disabled()},
    }


# --- filters ---------------------------------------------------------------------------------


def _jwks_source(params: EnvoyParams) -> dict[str, Any]:
    if params.jwks_uri:
        return {
            "remote_jwks": {
                "http_uri": {"uri": params.jwks_uri, "cluster": "jwks", "timeout": "5s"},
                "cache_duration": "300s",
                # Fetch at startup and refresh in the background, so no request waits on the IdP.
                "async_fetch": {"fast_listener": False},
                "retry_policy": {"num_retries": 3},
            }
        }
    if not params.jwks_file:
        raise ValueError("set jwks_file (local) or jwks_uri (kubernetes)")
    return {"local_jwks": {"filename": params.jwks_file}}


def _filters(params: EnvoyParams, descriptor_bin: bytes) -> list[dict[str, Any]]:
    header_scrub = {
        "name": "servegrid.header_scrub",
        "typed_config": _any(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={
                "request_mutations": [
                    {"remove_on_match": {"key_matcher": {"prefix": prefix}}} for prefix in SCRUBBED_PREFIXES
                ]
            },
        ),
    }
    jwt = {
        "name": JWT_FILTER,
        "typed_config": _any(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers={
                JWT_PROVIDER: {
                    "issuer": params.issuer,
                    # No `audiences` here on purpose: jwt_authn answers a wrong audience with 401,
                    # but a valid token for another service is a 403; the rbac filter checks it.
                    **_jwks_source(params),
                    "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
                    "forward": False,
                    "payload_in_metadata": JWT_METADATA_KEY,
                    "clock_skew_seconds": 30,
                    # Verified tokens are cached (keyed by the token): a client reusing its token pays
                    # for the RS256 check once, not on every request.
                    "jwt_cache_config": {"jwt_cache_size": 10000},
                    "claim_to_headers": [
                        {"header_name": TENANT_HEADER, "claim_name": params.tenant_claim},
                        {"header_name": SUBJECT_HEADER, "claim_name": "sub"},
                        {"header_name": ROLES_HEADER, "claim_name": params.roles_claim},
                    ],
                }
            },
            rules=[
                {"match": {"prefix": f"/{HEALTH_SERVICE}/"}},
                {"match": {"path": "/healthz"}},
                # A token, when sent, must verify; without one the request goes on to the API-key
                # check, which refuses it unless a valid x-api-key is there.
                {
                    "match": {"prefix": "/"},
                    "requires": {
                        "requires_any": {"requirements": [{"provider_name": JWT_PROVIDER}, {"allow_missing": {}}]}
                    },
                },
            ],
        ),
    }
    ext_authz = {
        "name": EXT_AUTHZ_FILTER,
        "typed_config": _any(
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            grpc_service={"envoy_grpc": {"cluster_name": "edge"}, "timeout": _duration(params.ext_authz_timeout_s)},
            transport_api_version="V3",
            # Fail closed: when keys cannot be checked, nobody gets in on a key (JWTs still work).
            failure_mode_allow=False,
            status_on_error={"code": 503},
            allowed_headers={"patterns": [{"exact": "x-api-key"}]},
            # Only requests without a verified JWT need an API key, so only they pay for the call.
            filter_enabled_metadata={
                "filter": JWT_FILTER,
                "path": [{"key": JWT_METADATA_KEY}],
                "value": {"present_match": True},
                "invert": True,
            },
        ),
    }
    rbac = {
        "name": RBAC_FILTER,
        "typed_config": _any(
            "envoy.extensions.filters.http.rbac.v3.RBAC",
            rules=_rbac(
                {"and_ids": {"ids": [_audience_ok(params.audience), _tenant_present()]}}, "authenticated-tenant"
            ),
        ),
    }
    ratelimit = {
        "name": "envoy.filters.http.ratelimit",
        "typed_config": _any(
            "envoy.extensions.filters.http.ratelimit.v3.RateLimit",
            domain=params.ratelimit_domain,
            timeout=_duration(params.ratelimit_timeout_s),
            failure_mode_deny=params.ratelimit_fail_closed,
            enable_x_ratelimit_headers="DRAFT_VERSION_03",
            rate_limited_as_resource_exhausted=True,
            rate_limit_service={
                "grpc_service": {"envoy_grpc": {"cluster_name": "edge"}},
                "transport_api_version": "V3",
            },
        ),
    }
    transcoder = {
        "name": TRANSCODER_FILTER,
        "typed_config": _any(
            "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            proto_descriptor_bin=base64.b64encode(descriptor_bin).decode(),
            services=[GATEWAY_SERVICE, REGISTRY_SERVICE],
            # Server streams come out as newline-delimited JSON, one message per line.
            print_options={
                "add_whitespace": False,
                # Off: a tensor would otherwise print all eight of TensorData's lists, seven empty.
                "always_print_primitive_fields": False,
                "stream_newline_delimited": True,
            },
            convert_grpc_status=True,
            # Unmapped paths are 404 (the default passes them on and they come back 503).
            request_validation_options={"reject_unknown_method": True, "reject_unknown_query_parameters": True},
            max_request_body_size=params.max_request_body_bytes,
        ),
    }
    # The transcoder's own max_request_body_size does not bite while it streams JSON into protobuf
    # (checked on 1.40: an 8 MB body went through), so REST bodies are capped here: 413 past it.
    body_limit = {
        "name": BUFFER_FILTER,
        "typed_config": _any(
            "envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=params.max_request_body_bytes
        ),
    }
    cors = {"name": CORS_FILTER, "typed_config": _any("envoy.extensions.filters.http.cors.v3.Cors")}
    router = {
        "name": "envoy.filters.http.router",
        "typed_config": _any("envoy.extensions.filters.http.router.v3.Router"),
    }
    return [cors, header_scrub, jwt, ext_authz, rbac, ratelimit, body_limit, transcoder, router]


def _cors_policy(params: EnvoyParams) -> dict[str, Any]:
    origins = [{"safe_regex": {"regex": ".*"}} if o == "*" else {"exact": o} for o in params.cors_origins]
    return _any(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        allow_origin_string_match=origins,
        allow_methods="GET, POST, PATCH, DELETE, OPTIONS",
        allow_headers="authorization, content-type, x-api-key, x-request-id, traceparent, tracestate, grpc-timeout",
        expose_headers=(
            "x-request-id, x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset, grpc-status, grpc-message"
        ),
        max_age="600",
    )


def _access_log(params: EnvoyParams) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": _any(
                "envoy.extensions.access_loggers.file.v3.FileAccessLog",
                path=params.access_log_path,
                log_format={
                    "json_format": {
                        "time": "%START_TIME%",
                        "method": "%REQ(:METHOD)%",
                        "path": "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%",
                        "protocol": "%PROTOCOL%",
                        "status": "%RESPONSE_CODE%",
                        "grpc_status": "%GRPC_STATUS%",
                        "details": "%RESPONSE_CODE_DETAILS%",
                        "flags": "%RESPONSE_FLAGS%",
                        "duration_ms": "%DURATION%",
                        "upstream": "%UPSTREAM_CLUSTER%",
                        "request_id": "%REQ(X-REQUEST-ID)%",
                        "trace_id": "%TRACE_ID%",
                        "traceparent": "%REQ(TRACEPARENT)%",
                        "tenant": "%REQ(X-SERVEGRID-TENANT)%",
                        "bytes_in": "%BYTES_RECEIVED%",
                        "bytes_out": "%BYTES_SENT%",
                    }
                },
            ),
        }
    ]


def render_config(params: EnvoyParams) -> dict[str, Any]:
    """The whole Envoy bootstrap for `params`, as a dict ready for YAML."""
    hcm: dict[str, Any] = {
        "stat_prefix": "public",
        "codec_type": "AUTO",  # HTTP/1.1 JSON and HTTP/2 gRPC on one port
        "generate_request_id": True,
        "always_set_request_id_in_response": True,
        "preserve_external_request_id": True,
        "use_remote_address": True,
        "access_log": _access_log(params),
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "common_http_protocol_options": {"idle_timeout": "300s"},
        "route_config": {
            "name": "servegrid",
            "virtual_hosts": [
                {
                    "name": "servegrid",
                    "domains": ["*"],
                    "routes": _routes(params),
                    # Scrubbed at the end too: a JWT caller's stray API key never reaches a service.
                    "request_headers_to_remove": ["x-api-key"],
                    "typed_per_filter_config": {CORS_FILTER: _cors_policy(params)},
                }
            ],
        },
        "http_filters": _filters(params, descriptor_set_bytes(params)),
    }
    clusters = [
        _cluster("gateway", params.gateway),
        _cluster("router", params.router),
        _cluster("registry", params.registry),
        _cluster("edge", params.edge),
    ]
    if params.jwks_uri:
        parts = urlsplit(params.jwks_uri)
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        clusters.append(
            _cluster("jwks", f"{parts.hostname}:{port}", http2=False, tls_sni=parts.hostname or "" if https else "")
        )
    if params.otlp_endpoint:
        hcm["tracing"] = {
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": _any(
                    "envoy.config.trace.v3.OpenTelemetryConfig",
                    grpc_service={"envoy_grpc": {"cluster_name": "otel"}, "timeout": "1s"},
                    service_name="servegrid-envoy",
                ),
            }
        }
        clusters.append(_cluster("otel", params.otlp_endpoint))
    return {
        "node": {"id": f"servegrid-envoy-{params.profile}", "cluster": "servegrid-envoy"},
        "admin": {"address": {"socket_address": {"address": params.admin_host, "port_value": params.admin_port}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "public",
                    "address": {"socket_address": {"address": params.listen_host, "port_value": params.listen_port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": _any(
                                        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                                        **hcm,
                                    ),
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": clusters,
        },
        # Envoy's recommended edge settings: bound what one client can make Envoy buffer.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": _any(
                        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        max_active_downstream_connections=50000,
                    ),
                }
            ]
        },
    }


def render_yaml(params: EnvoyParams) -> str:
    header = (
        f"# Envoy front door, profile {params.profile!r}. Generated by `python -m services.edge.envoy_config`;\n"
        "# edit the renderer, not this file.\n"
    )
    return header + yaml.safe_dump(render_config(params), sort_keys=False, width=120)


def rendered_defaults() -> dict[Path, str]:
    """envoy/envoy.<profile>.yaml as the default parameters render them, and the Helm chart's copy of
    the Kubernetes one (a chart can only read files inside itself)."""
    profiles: tuple[Profile, ...] = ("local", "kubernetes")
    rendered = {RENDERED_DIR / f"envoy.{p}.yaml": render_yaml(EnvoyParams.for_profile(p)) for p in profiles}
    rendered[HELM_CHART_COPY] = rendered[RENDERED_DIR / "envoy.kubernetes.yaml"]
    return rendered


def write_defaults(check: bool) -> int:
    stale = []
    for path, text in rendered_defaults().items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.relative_to(ROOT))
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(map(str, stale))}; run python -m services.edge.envoy_config --write-defaults")
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.edge.envoy_config", description=__doc__)
    parser.add_argument(
        "--write-defaults", action="store_true", help="rewrite envoy/envoy.{local,kubernetes}.yaml and exit"
    )
    parser.add_argument("--check", action="store_true", help="with --write-defaults: fail if they are stale")
    parser.add_argument("--profile", choices=["local", "kubernetes"], default="local")
    parser.add_argument("--out", type=Path, help="file to write; stdout when absent")
    parser.add_argument("--listen-host")
    parser.add_argument("--listen-port", type=int)
    parser.add_argument("--admin-host")
    parser.add_argument("--admin-port", type=int)
    parser.add_argument("--gateway", help="host:port")
    parser.add_argument("--router", help="host:port")
    parser.add_argument("--registry", help="host:port")
    parser.add_argument("--edge", help="host:port")
    parser.add_argument("--issuer")
    parser.add_argument("--audience")
    parser.add_argument("--jwks-file", help="local JWKS file (local profile)")
    parser.add_argument("--jwks-uri", help="remote JWKS URL (kubernetes profile)")
    parser.add_argument("--cors-origin", action="append", help="allowed CORS origin; repeat; '*' for any")
    parser.add_argument("--ratelimit-fail-closed", action="store_true", default=None)
    parser.add_argument("--max-request-body-bytes", type=int)
    parser.add_argument("--access-log-path")
    parser.add_argument("--otlp-endpoint", help="host:port of an OTLP/gRPC collector")
    args = parser.parse_args(argv)
    if args.write_defaults:
        return write_defaults(args.check)
    params = EnvoyParams.for_profile(
        args.profile,
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        gateway=args.gateway,
        router=args.router,
        registry=args.registry,
        edge=args.edge,
        issuer=args.issuer,
        audience=args.audience,
        jwks_file=args.jwks_file,
        jwks_uri=args.jwks_uri,
        cors_origins=tuple(args.cors_origin) if args.cors_origin else None,
        ratelimit_fail_closed=args.ratelimit_fail_closed,
        max_request_body_bytes=args.max_request_body_bytes,
        access_log_path=args.access_log_path,
        otlp_endpoint=args.otlp_endpoint,
    )
    if params.jwks_uri and args.jwks_uri:
        params = replace(params, jwks_file="")
    text = render_yaml(params)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
