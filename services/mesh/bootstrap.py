"""Renders Envoy's bootstrap (local or Kubernetes) from one source: `python -m services.mesh.bootstrap`."""

# One function builds the whole bootstrap as a dict; the two profiles differ only in parameters
# (addresses, where the JWKS comes from), never in structure. envoy/*.yaml are this module's output
# with the default parameters, kept for reading; a test fails when they drift. The Helm chart renders
# its own at pod start with this CLI (an init container), from the release's names and values.
#
# What is static here and what comes over ADS from the router (services/mesh/resources.py):
#   static:  listeners `public` and `mesh` (their filter chains), clusters gateway/registry/edge/xds
#            (+ jwks, otel), admin, the stats listener (Kubernetes)
#   dynamic: every KServe cluster and its endpoints (CDS/EDS), RouteConfigurations `public` and
#            `mesh` (RDS) — so a registry change never needs a new bootstrap or an Envoy restart.
# With EnvoyParams' tls_* files, the static service clusters and the mesh listener speak mutual TLS
# (services/runtime/tls.py); Triton's dynamic clusters stay plaintext. With public_tls_* files the public
# listener serves TLS (ALPN h2 + http/1.1: gRPC and REST on one port).
#
# Public filter order (each step trusts only what the steps before it established):
#   cors → header scrub (identity headers) → grpc_field_extraction (ModelStreamInfer's first message)
#        → kserve Lua (model name from header or body; before any per-route auth decision, because it
#          clears the route cache) → jwt_authn → ext_authz (API keys; skipped when a JWT verified)
#        → rbac (tenant rule, audience; admin role by path) → route tag + rate_limit_quota
#        → buffer (REST body cap) → grpc_json_transcoder → router
# The pieces live beside this module: auth.py (scrub, jwt_authn, ext_authz, RBAC), quota.py (rate
# limits), local_replies.py (Envoy's own errors in the API's shape), params.py (EnvoyParams).
# The transcoder comes after everything path-based, so the auth and limit filters see the path the
# client sent; it re-routes on the gRPC path afterwards. The mesh listener (gateway, batch workers;
# internal only) runs the same KServe routes with no auth: field extraction → kserve Lua → router.

from __future__ import annotations

import argparse
import base64
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from google.protobuf import descriptor_pb2
from google.rpc import error_details_pb2

from services.mesh import lua, names, quota
from services.mesh.auth import ext_authz_filter, header_scrub, jwt_filter, rbac_rules
from services.mesh.local_replies import local_reply_config
from services.mesh.names import (
    BUFFER_FILTER,
    CORS_FILTER,
    MODEL_HEADER,
    RBAC_FILTER,
    REQUEST_ID_HEADER,
    TRACEPARENT_HEADER,
    TRANSCODER_FILTER,
)
from services.mesh.params import (
    CHART_DESCRIPTORS,
    TRACE_SERVICE_NAME,
    EnvoyParams,
    Profile,
    default_descriptors,
    repo_root,
)
from services.mesh.routes import typed

HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
# EnvoyParams and Profile live in services/mesh/params.py; callers may import them from here.
__all__ = ["EnvoyParams", "Profile", "descriptor_set_bytes", "main", "render_config", "render_yaml", "write_defaults"]


def _host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _endpoint(address: str) -> dict[str, Any]:
    host, port = _host_port(address)
    return {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}


def _http2_options(**http2: Any) -> dict[str, Any]:
    # gRPC upstreams must be told HTTP/2 explicitly; Envoy would speak HTTP/1.1 to them otherwise.
    return {
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": {"max_concurrent_streams": 1024, **http2}},
        )
    }


def _cluster(
    name: str, addresses: Sequence[str], *, http2: bool = True, tls_sni: str = "", connect_timeout: str = "1s"
) -> dict[str, Any]:
    cluster: dict[str, Any] = {
        "name": name,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": connect_timeout,
        "lb_policy": "ROUND_ROBIN",
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [_endpoint(a) for a in addresses]}]},
    }
    if http2:
        cluster["typed_extension_protocol_options"] = _http2_options()
        # Many streams share a few connections; without this a burst queues behind the default 1024.
        cluster["circuit_breakers"] = {"thresholds": [{"max_requests": 100000, "max_pending_requests": 100000}]}
    if tls_sni:
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": typed("envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext", sni=tls_sni),
        }
    return cluster


# With mutual TLS: the name each static cluster's certificate must carry, and who may use the mesh listener.
_UPSTREAM_PEERS = {
    names.GATEWAY_CLUSTER: "gateway",
    names.REGISTRY_CLUSTER: "registry",
    names.EDGE_CLUSTER: "edge",
    quota.QUOTA_CLUSTER: "edge",
    names.XDS_CLUSTER: "router",
}
_MESH_CLIENTS = ("gateway", "batch", "router")


def _tls_context(params: EnvoyParams, peers: Sequence[str], alpn: Sequence[str]) -> dict[str, Any]:
    """Envoy's certificate, the CA its peers' certificates must chain to, and the names they must carry."""
    return {
        "tls_certificates": [
            {
                "certificate_chain": {"filename": params.tls_cert_file},
                "private_key": {"filename": params.tls_key_file},
            }
        ],
        "validation_context": {
            "trusted_ca": {"filename": params.tls_ca_file},
            "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": p}} for p in peers],
        },
        # gRPC clients refuse a TLS server that does not select h2 by ALPN.
        "alpn_protocols": list(alpn),
    }


def _upstream_tls(params: EnvoyParams, peer: str) -> dict[str, Any]:
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            common_tls_context=_tls_context(params, [peer], ["h2"]),
            sni=peer,
        ),
    }


def _mesh_tls(params: EnvoyParams) -> dict[str, Any]:
    """The mesh listener carries no JWT check, so with TLS it takes only the components that use it."""
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            common_tls_context=_tls_context(params, _MESH_CLIENTS, ["h2", "http/1.1"]),
            require_client_certificate=True,
        ),
    }


# The public listener's TLS: no TLS 1.0/1.1 (every gRPC and HTTP client of the last decade speaks 1.2).
_PUBLIC_TLS_PARAMS = {"tls_minimum_protocol_version": "TLSv1_2"}


def _public_tls(params: EnvoyParams) -> dict[str, Any]:
    """The public listener's server TLS: the operator's certificate, no client certificate (callers
    authenticate with JWTs or API keys), and ALPN h2 and http/1.1 so gRPC and REST share the port
    (gRPC clients refuse a TLS server that does not select h2)."""
    common = {
        "tls_params": dict(_PUBLIC_TLS_PARAMS),
        "tls_certificates": [
            {
                "certificate_chain": {"filename": params.public_tls_cert_file},
                "private_key": {"filename": params.public_tls_key_file},
            }
        ],
        "alpn_protocols": ["h2", "http/1.1"],
    }
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": typed(
            "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext", common_tls_context=common
        ),
    }


def _xds_cluster(params: EnvoyParams) -> dict[str, Any]:
    """The router(s): ADS, and the mirror target for shadow copies. Keepalive notices a router that vanished
    without a FIN (a killed pod) within seconds; DNS is re-resolved every 5 s (Envoy's default), so a new
    replica is found soon."""
    cluster = _cluster(names.XDS_CLUSTER, params.xds, connect_timeout="0.5s")
    cluster["typed_extension_protocol_options"] = _http2_options(
        connection_keepalive={"interval": "5s", "timeout": "3s"}
    )
    cluster["upstream_connection_options"] = {
        "tcp_keepalive": {"keepalive_time": 10, "keepalive_interval": 5, "keepalive_probes": 3}
    }
    return cluster


def _descriptor_path(params: EnvoyParams) -> Path:
    return params.descriptors if params.descriptors is not None else default_descriptors()


def descriptor_set_bytes(params: EnvoyParams) -> bytes:
    """The contracts' descriptor set plus the error-detail types, so convert_grpc_status can print them."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(_descriptor_path(params).read_bytes())
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


def _quota_cluster(params: EnvoyParams) -> dict[str, Any]:
    """The edge again, for the quota stream: keepalive notices an edge that vanished without a FIN, so
    Envoy reopens the stream (to another replica) instead of reporting into a dead one."""
    cluster = _cluster(quota.QUOTA_CLUSTER, [params.edge], connect_timeout="0.5s")
    cluster["typed_extension_protocol_options"] = _http2_options(
        connection_keepalive={"interval": "5s", "timeout": "3s"}
    )
    return cluster


def _transcoder_filter(params: EnvoyParams, descriptor_bin: bytes) -> dict[str, Any]:
    return {
        "name": TRANSCODER_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            **(
                {"proto_descriptor": params.descriptor_file}
                if params.descriptor_file
                else {"proto_descriptor_bin": base64.b64encode(descriptor_bin).decode()}
            ),
            services=list(names.TRANSCODED_SERVICES),
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


def _router_filter() -> dict[str, Any]:
    return {"name": names.ROUTER_FILTER, "typed_config": typed("envoy.extensions.filters.http.router.v3.Router")}


def _grpc_stats_filter() -> dict[str, Any]:
    """Per-cluster counts by grpc-status, all methods in one set (no per-method stats: bounded names)."""
    return {
        "name": names.GRPC_STATS_FILTER,
        "typed_config": typed("envoy.extensions.filters.http.grpc_stats.v3.FilterConfig", stats_for_all_methods=False),
    }


def _stats_config() -> dict[str, Any]:
    """`cluster.<c>.grpc.<code>` becomes `envoy_cluster_grpc{grpc_status="<code>"}`: one metric name, whatever
    codes have been seen (the cluster name is Envoy's own tag)."""
    return {"stats_tags": [{"tag_name": names.GRPC_STATUS_TAG, "regex": r"^cluster\.[^.]+\.grpc(\.(\d+))$"}]}


def _kserve_filters() -> list[dict[str, Any]]:
    """Model name into the headers (from the header, the body, or a stream's first message)."""
    return [lua.stream_extraction_filter(), lua.downstream_filter()]


def _public_filters(params: EnvoyParams, descriptor_bin: bytes) -> list[dict[str, Any]]:
    rbac = {
        "name": RBAC_FILTER,
        "typed_config": typed("envoy.extensions.filters.http.rbac.v3.RBAC", rules=rbac_rules(params)),
    }
    # The transcoder's own max_request_body_size does not bite while it streams JSON into protobuf
    # (checked on 1.40: an 8 MB body went through), so REST bodies are capped here: 413 past it.
    body_limit = {
        "name": BUFFER_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.buffer.v3.Buffer", max_request_bytes=params.max_request_body_bytes
        ),
    }
    cors = {"name": CORS_FILTER, "typed_config": typed("envoy.extensions.filters.http.cors.v3.Cors")}
    return [
        cors,
        header_scrub(),
        *_kserve_filters(),
        jwt_filter(params),
        ext_authz_filter(params),
        rbac,
        *quota.ratelimit_filters(params),
        body_limit,
        _transcoder_filter(params, descriptor_bin),
        _grpc_stats_filter(),
        _router_filter(),
    ]


def _access_log(params: EnvoyParams) -> list[dict[str, Any]]:
    return [
        {
            "name": "envoy.access_loggers.file",
            "typed_config": typed(
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
                        "upstream_host": "%UPSTREAM_HOST%",
                        "model": f"%REQ({MODEL_HEADER.upper()})%",
                        "request_id": f"%REQ({REQUEST_ID_HEADER.upper()})%",
                        "trace_id": "%TRACE_ID%",
                        "traceparent": f"%REQ({TRACEPARENT_HEADER.upper()})%",
                        "tenant": "%REQ(X-SERVEGRID-TENANT)%",
                        "bytes_in": "%BYTES_RECEIVED%",
                        "bytes_out": "%BYTES_SENT%",
                    }
                },
            ),
        }
    ]


def _rds(route_config_name: str) -> dict[str, Any]:
    return {
        "config_source": {"ads": {}, "resource_api_version": "V3"},
        "route_config_name": route_config_name,
    }


def _hcm(params: EnvoyParams, stat_prefix: str, filters: list[dict[str, Any]]) -> dict[str, Any]:
    hcm: dict[str, Any] = {
        "stat_prefix": stat_prefix,
        "codec_type": "AUTO",  # HTTP/1.1 JSON and HTTP/2 gRPC on one port
        "generate_request_id": True,
        "always_set_request_id_in_response": True,
        "preserve_external_request_id": True,
        "access_log": _access_log(params),
        "http2_protocol_options": {"max_concurrent_streams": 1024},
        "common_http_protocol_options": {"idle_timeout": "300s"},
        # Routes and RBAC match the path as the upstream will see it: `/v1//admin` cannot slip past.
        "normalize_path": True,
        "merge_slashes": True,
        "rds": _rds(stat_prefix),
        "local_reply_config": local_reply_config(params),
        "http_filters": filters,
    }
    if params.otlp_endpoint:
        hcm["tracing"] = _tracing(params)
    return hcm


def _tracing(params: EnvoyParams) -> dict[str, Any]:
    """Envoy's OpenTelemetry tracer: a server span per request (continuing a caller's traceparent), a
    client span per upstream attempt (spawn_upstream_span), and W3C traceparent/tracestate injected into
    the upstream request, so the gateway's and Triton's spans hang under Envoy's."""
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": names.OTEL_CLUSTER}, "timeout": "1s"},
                service_name=TRACE_SERVICE_NAME,
            ),
        },
        "random_sampling": {"value": params.trace_sampling_percent},
        "spawn_upstream_span": True,
    }


def _otlp_cluster(params: EnvoyParams) -> dict[str, Any]:
    """The collector Envoy exports spans to: host:port, or an http(s):// URL as OTEL_EXPORTER_OTLP_ENDPOINT
    gives it (https: TLS with SNI)."""
    endpoint = params.otlp_endpoint
    if "://" not in endpoint:
        return _cluster(names.OTEL_CLUSTER, [endpoint])
    parts = urlsplit(endpoint)
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 4317)
    return _cluster(names.OTEL_CLUSTER, [f"{parts.hostname}:{port}"], tls_sni=(parts.hostname or "") if https else "")


def _listener(name: str, host: str, port: int, hcm: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "address": {"socket_address": {"address": host, "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": typed(HCM, **hcm)}]}
        ],
    }


def _stats_listener(params: EnvoyParams) -> dict[str, Any]:
    """/ready and /stats/prometheus from admin, and nothing else of it, on the pod's address."""
    routes = [
        {"match": {"path": "/ready"}, "route": {"cluster": "admin"}},
        {"match": {"prefix": "/stats/prometheus"}, "route": {"cluster": "admin"}},
        {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
    ]
    hcm = {
        "stat_prefix": "stats",
        "route_config": {"name": "stats", "virtual_hosts": [{"name": "stats", "domains": ["*"], "routes": routes}]},
        "http_filters": [_router_filter()],
    }
    return _listener("stats", params.stats_host, params.stats_port, hcm)


def _listeners(params: EnvoyParams) -> list[dict[str, Any]]:
    public = _hcm(params, names.PUBLIC, _public_filters(params, descriptor_set_bytes(params)))
    public["use_remote_address"] = True  # the edge: x-forwarded-for from clients is not trusted
    mesh = _hcm(params, names.MESH, [*_kserve_filters(), _grpc_stats_filter(), _router_filter()])
    mesh_listener = _listener(names.MESH, params.mesh_host, params.mesh_port, mesh)
    if params.mtls:
        mesh_listener["filter_chains"][0]["transport_socket"] = _mesh_tls(params)
    public_listener = _listener(names.PUBLIC, params.listen_host, params.listen_port, public)
    if params.public_tls:
        public_listener["filter_chains"][0]["transport_socket"] = _public_tls(params)
    listeners = [public_listener, mesh_listener]
    if params.stats_port:
        listeners.append(_stats_listener(params))
    return listeners


def _static_clusters(params: EnvoyParams) -> list[dict[str, Any]]:
    clusters = [
        _cluster(names.GATEWAY_CLUSTER, [params.gateway]),
        _cluster(names.REGISTRY_CLUSTER, [params.registry]),
        _cluster(names.EDGE_CLUSTER, [params.edge]),
        _quota_cluster(params),
        _xds_cluster(params),
    ]
    if params.mtls:
        for cluster in clusters:
            cluster["transport_socket"] = _upstream_tls(params, _UPSTREAM_PEERS[cluster["name"]])
    if params.jwks_uri:
        parts = urlsplit(params.jwks_uri)
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        sni = (parts.hostname or "") if https else ""
        clusters.append(_cluster(names.JWKS_CLUSTER, [f"{parts.hostname}:{port}"], http2=False, tls_sni=sni))
    if params.otlp_endpoint:
        clusters.append(_otlp_cluster(params))
    if params.stats_port:
        admin = _cluster("admin", [f"{params.admin_host}:{params.admin_port}"], http2=False)
        admin["type"] = "STATIC"
        clusters.append(admin)
    return clusters


def _dynamic_resources() -> dict[str, Any]:
    ads = {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        # Reconnect soon after a router goes (a short, capped backoff), to whichever replica DNS gives.
        "grpc_services": [
            {
                "envoy_grpc": {
                    "cluster_name": names.XDS_CLUSTER,
                    "retry_policy": {"retry_back_off": {"base_interval": "0.1s", "max_interval": "2s"}},
                }
            }
        ],
        "set_node_on_first_message_only": True,
    }
    return {"ads_config": ads, "cds_config": {"ads": {}, "resource_api_version": "V3"}}


def render_config(params: EnvoyParams) -> dict[str, Any]:
    """The whole Envoy bootstrap for `params`, as a dict ready for YAML."""
    return {
        "node": {"id": params.node, "cluster": params.node_cluster},
        "admin": {"address": {"socket_address": {"address": params.admin_host, "port_value": params.admin_port}}},
        "static_resources": {"listeners": _listeners(params), "clusters": _static_clusters(params)},
        "dynamic_resources": _dynamic_resources(),
        "stats_config": _stats_config(),
        # RE2's default program-size cap (100) refuses the subject length check (auth.SUBJECT_MAX_LENGTH
        # repetitions of one byte class); these regexes are ours, never a client's.
        "layered_runtime": {
            "layers": [
                {
                    "name": "static",
                    "static_layer": {"re2.max_program_size.error_level": 1024, "re2.max_program_size.warn_level": 512},
                }
            ]
        },
        # Envoy's recommended edge settings: bound what one client can make Envoy buffer.
        "overload_manager": {
            "resource_monitors": [
                {
                    "name": "envoy.resource_monitors.global_downstream_max_connections",
                    "typed_config": typed(
                        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                        max_active_downstream_connections=50000,
                    ),
                }
            ]
        },
    }


def render_yaml(params: EnvoyParams) -> str:
    header = (
        f"# Envoy bootstrap, profile {params.profile!r}. Generated by `python -m services.mesh.bootstrap`;\n"
        "# edit the renderer, not this file. Routes, KServe clusters and endpoints come over ADS from the router.\n"
    )
    return header + yaml.safe_dump(render_config(params), sort_keys=False, width=120)


def rendered_defaults(root: Path | None = None) -> dict[Path, str]:
    """envoy/envoy.<profile>.yaml as the default parameters render them: committed for reading (and
    diffing in review). The Helm chart bundles no copy: its Envoy pod renders its own config at start
    with this module's CLI, from the release's names and values (deploy/helm/servegrid)."""
    root = root or repo_root()
    profiles: tuple[Profile, ...] = ("local", "kubernetes")
    return {root / "envoy" / f"envoy.{p}.yaml": render_yaml(EnvoyParams.for_profile(p)) for p in profiles}


def write_defaults(check: bool) -> int:
    root = repo_root()
    stale = []
    for path, text in rendered_defaults(root).items():
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(path.relative_to(root))
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(map(str, stale))}; run python -m services.mesh.bootstrap --write-defaults")
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.mesh.bootstrap", description=__doc__)
    parser.add_argument(
        "--write-defaults", action="store_true", help="rewrite envoy/envoy.{local,kubernetes}.yaml and exit"
    )
    parser.add_argument("--check", action="store_true", help="with --write-defaults: fail if they are stale")
    parser.add_argument("--profile", choices=["local", "kubernetes"], default="local")
    parser.add_argument("--out", type=Path, help="file to write; stdout when absent")
    parser.add_argument(
        "--descriptor-set-out",
        type=Path,
        help="also write the transcoder's descriptor set here: the file the config's --descriptor-file names",
    )
    parser.add_argument("--listen-host")
    parser.add_argument("--listen-port", type=int)
    parser.add_argument("--mesh-host")
    parser.add_argument("--mesh-port", type=int)
    parser.add_argument("--admin-host", help="keep it loopback: admin can stop Envoy")
    parser.add_argument("--admin-port", type=int)
    parser.add_argument("--stats-port", type=int, help="listener for /ready and /stats/prometheus; 0 for none")
    parser.add_argument("--gateway", help="host:port")
    parser.add_argument("--xds", action="append", help="host:port of a router serving ADS; repeat")
    parser.add_argument("--router", help="host:port (same as one --xds)")
    parser.add_argument("--registry", help="host:port")
    parser.add_argument("--edge", help="host:port")
    parser.add_argument("--node-id")
    parser.add_argument("--node-cluster")
    parser.add_argument("--issuer", help="`iss` of the identity provider's tokens")
    parser.add_argument("--audience", help="`aud` every token must name (the identity provider's and exchanged ones)")
    parser.add_argument("--jwks-file", help="the identity provider's JWKS as a local file (replaces the profile's URI)")
    parser.add_argument("--jwks-uri", help="the identity provider's JWKS URL (replaces the profile's file)")
    parser.add_argument(
        "--jwt-max-lifetime-s", type=int, help="refuse tokens whose exp lies further ahead (default 86400; 0: no bound)"
    )
    parser.add_argument(
        "--token-jwks-file", help="JWKS of the edge's token signing key (exchanged API keys); '' to trust none"
    )
    parser.add_argument("--token-issuer", help=f"issuer of exchanged tokens (default {names.TOKEN_ISSUER})")
    parser.add_argument("--token-max-lifetime-s", type=int, help="longest exchanged-token lifetime accepted (3600)")
    parser.add_argument("--ratelimit-fail-closed", action="store_true", default=None)
    parser.add_argument(
        "--ratelimit-window-s", type=int, help="the edge's limit window in seconds (SERVEGRID_EDGE_LIMIT_UNIT; 60)"
    )
    parser.add_argument("--max-request-body-bytes", type=int)
    parser.add_argument("--tls-cert-file", help="Envoy's mesh certificate (PEM); with key and CA: mutual TLS inside")
    parser.add_argument("--tls-key-file", help="key of --tls-cert-file (PEM)")
    parser.add_argument("--tls-ca-file", help="CA (PEM) every mesh certificate chains to")
    parser.add_argument("--public-tls-cert", help="certificate chain (PEM) of the public listener; with key: TLS")
    parser.add_argument("--public-tls-key", help="key of --public-tls-cert (PEM)")
    parser.add_argument("--access-log-path")
    parser.add_argument("--otlp-endpoint", help="host:port (or http[s]:// URL) of an OTLP/gRPC collector: tracing on")
    parser.add_argument("--trace-sampling-percent", type=float, help="share of new requests traced (default 100)")
    parser.add_argument(
        "--descriptors", type=Path, help="descriptor set for the transcoder (default: the generated one)"
    )
    parser.add_argument(
        "--descriptor-file",
        help=f"where Envoy reads the descriptor set at run time (kubernetes default {CHART_DESCRIPTORS}); "
        "'' embeds it in the config",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.write_defaults:
        return write_defaults(args.check)
    if args.jwks_file and args.jwks_uri:
        parser.error("give the identity provider's JWKS as --jwks-file or --jwks-uri, not both")
    params = EnvoyParams.for_profile(
        args.profile,
        listen_host=args.listen_host,
        listen_port=args.listen_port,
        mesh_host=args.mesh_host,
        mesh_port=args.mesh_port,
        admin_host=args.admin_host,
        admin_port=args.admin_port,
        stats_port=args.stats_port,
        gateway=args.gateway,
        xds=tuple(args.xds) if args.xds else None,
        router=args.router,
        registry=args.registry,
        edge=args.edge,
        node_id=args.node_id,
        node_cluster=args.node_cluster,
        issuer=args.issuer,
        audience=args.audience,
        jwks_file=args.jwks_file,
        jwks_uri=args.jwks_uri,
        jwt_max_lifetime_s=args.jwt_max_lifetime_s,
        token_jwks_file=args.token_jwks_file,
        token_issuer=args.token_issuer,
        token_max_lifetime_s=args.token_max_lifetime_s,
        ratelimit_fail_closed=args.ratelimit_fail_closed,
        ratelimit_window_s=args.ratelimit_window_s,
        max_request_body_bytes=args.max_request_body_bytes,
        tls_cert_file=args.tls_cert_file,
        tls_key_file=args.tls_key_file,
        tls_ca_file=args.tls_ca_file,
        public_tls_cert_file=args.public_tls_cert,
        public_tls_key_file=args.public_tls_key,
        access_log_path=args.access_log_path,
        otlp_endpoint=args.otlp_endpoint,
        trace_sampling_percent=args.trace_sampling_percent,
        descriptors=args.descriptors,
        descriptor_file=args.descriptor_file,
    )
    # One JWKS source for the identity provider: the one given replaces the profile's other one
    # (the local profile's file, the Kubernetes profile's URI).
    if args.jwks_uri:
        params = replace(params, jwks_file="")
    elif args.jwks_file:
        params = replace(params, jwks_uri="")
    text = render_yaml(params)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    if args.descriptor_set_out:
        args.descriptor_set_out.parent.mkdir(parents=True, exist_ok=True)
        args.descriptor_set_out.write_bytes(descriptor_set_bytes(params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
