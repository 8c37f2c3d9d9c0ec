"""Renders Envoy's bootstrap (local or Kubernetes) from one source: `python -m services.mesh.bootstrap`."""

# One function builds the whole bootstrap as a dict; the two profiles differ only in parameters
# (addresses, where the JWKS comes from), never in structure. envoy/*.yaml are this module's output
# with the default parameters, kept for reading and for the Helm chart; a test fails when they drift.
#
# What is static here and what comes over ADS from the router (services/mesh/resources.py):
#   static:  listeners `public` and `mesh` (their filter chains), clusters gateway/registry/edge/xds
#            (+ jwks, otel), admin, the stats listener (Kubernetes)
#   dynamic: every KServe cluster and its endpoints (CDS/EDS), RouteConfigurations `public` and
#            `mesh` (RDS) — so a registry change never needs a new bootstrap or an Envoy restart.
#
# Public filter order (each step trusts only what the steps before it established):
#   cors → header scrub (identity headers) → grpc_field_extraction (ModelStreamInfer's first message)
#        → kserve Lua (model name from header or body; before any per-route auth decision, because it
#          clears the route cache) → jwt_authn → ext_authz (API keys; skipped when a JWT verified)
#        → rbac (audience, tenant present; admin role by path) → route tag + rate_limit_quota → buffer (REST body cap)
#        → grpc_json_transcoder → router
# The transcoder comes after everything path-based, so the auth and limit filters see the path the
# client sent; it re-routes on the gRPC path afterwards. The mesh listener (gateway, batch workers;
# internal only) runs the same KServe routes with no auth: field extraction → kserve Lua → router.

from __future__ import annotations

import argparse
import base64
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2, error_details_pb2

from services.mesh import lua, names, replies
from services.mesh.names import (
    BUFFER_FILTER,
    CORS_FILTER,
    EXT_AUTHZ_FILTER,
    JWT_FILTER,
    MODEL_HEADER,
    RBAC_FILTER,
    ROLES_HEADER,
    SUBJECT_HEADER,
    TENANT_HEADER,
    TRANSCODER_FILTER,
)
from services.mesh.routes import NOT_FOUND_ROUTE, RATELIMIT_ROUTE_HEADER, RATELIMIT_TAG_FILTER, duration, typed

JWT_PROVIDER = "servegrid"
TOKEN_PROVIDER = "servegrid-edge"  # tokens the edge minted in exchange for an API key
CHART_TOKEN_JWKS = "/etc/servegrid/token-jwks/jwks.json"  # where the Helm chart mounts the edge's JWKS
JWT_METADATA_KEY = "jwt_payload"
HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
Profile = Literal["local", "kubernetes"]


def repo_root() -> Path:
    """The source checkout this module runs from (only the CLI's --write-defaults needs one)."""
    return Path(__file__).resolve().parents[2]


def default_descriptors() -> Path:
    """gen/descriptors.binpb of the checkout; a deployment passes its own with `--descriptors`."""
    return repo_root() / "gen" / "descriptors.binpb"


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
    access_log_path: str = "/dev/stdout"
    otlp_endpoint: str = ""  # host:port of an OTLP/gRPC collector; empty disables Envoy's own spans
    descriptors: Path | None = None  # None: default_descriptors()
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
                # The chart mounts the edge's JWKS here when `tokens.existingSecret` is set; the bundled
                # config trusts none (Envoy refuses to start on a missing JWKS file).
                token_jwks_file="",
            )
        router = overrides.pop("router", None)
        if router is not None and overrides.get("xds") is None:
            overrides["xds"] = (router,)
        return replace(base, **{k: v for k, v in overrides.items() if v is not None})

    @property
    def node(self) -> str:
        return self.node_id or f"servegrid-envoy-{self.profile}"


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
    """gen/descriptors.binpb plus the error-detail types, so convert_grpc_status can print them."""
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


# --- RBAC ------------------------------------------------------------------------------------


def _metadata(filter_name: str, path: Sequence[str], value: dict[str, Any]) -> dict[str, Any]:
    """A principal matching the request's dynamic metadata (what jwt_authn and ext_authz wrote)."""
    matcher = {"filter": filter_name, "path": [{"key": k} for k in path], "value": value}
    return {"sourced_metadata": {"metadata_matcher": matcher, "metadata_source": "DYNAMIC"}}


def _jwt_claim(key: str, value: dict[str, Any]) -> dict[str, Any]:
    return _metadata(JWT_FILTER, [JWT_METADATA_KEY, key], value)


def _no_jwt() -> dict[str, Any]:
    """No JWT verified on this request: the caller came with an API key, which ext_authz checked."""
    return {"not_id": _metadata(JWT_FILTER, [JWT_METADATA_KEY], {"present_match": True})}


def _audience_ok(audience: str) -> dict[str, Any]:
    """No JWT (an API key, which ext_authz checked), or a JWT whose aud names us (string or list)."""
    no_jwt = _no_jwt()
    return {
        "or_ids": {
            "ids": [
                no_jwt,
                _jwt_claim("aud", {"string_match": {"exact": audience}}),
                _jwt_claim("aud", {"list_match": {"one_of": {"string_match": {"exact": audience}}}}),
            ]
        }
    }


def _tenant_chars() -> dict[str, Any]:
    return {"safe_regex": {"regex": f"{names.TENANT_CHARS}+"}}


def _tenant_too_long() -> dict[str, Any]:
    # One byte range per position keeps RE2's program small; the charset check makes bytes = characters.
    return {"safe_regex": {"regex": f"[\\x00-\\x7f]{{{names.TENANT_MAX_LENGTH + 1},}}"}}


def _tenant_valid(params: EnvoyParams) -> dict[str, Any]:
    """The tenant is a plain tenant id (names.TENANT_PATTERN), in the header and, for a JWT, in the claim.

    A credential without one cannot be rate limited or attributed. The claim is checked as well as the
    header because claim_to_headers writes a number claim as its digits (a valid-looking id) and a
    list or object as base64 of its JSON; a metadata string match only matches a claim that is a string.
    Checked in Envoy, per request, with no call to a service. Refused as 401 (_tenant_reply_mappers)."""
    header = {
        "and_ids": {
            "ids": [
                {"header": {"name": TENANT_HEADER, "string_match": _tenant_chars()}},
                {"not_id": {"header": {"name": TENANT_HEADER, "string_match": _tenant_too_long()}}},
            ]
        }
    }
    claim = {
        "and_ids": {
            "ids": [
                _jwt_claim(params.tenant_claim, {"string_match": _tenant_chars()}),
                {"not_id": _jwt_claim(params.tenant_claim, {"string_match": _tenant_too_long()})},
            ]
        }
    }
    return {"and_ids": {"ids": [header, {"or_ids": {"ids": [_no_jwt(), claim]}}]}}


def _claim_not_a_string(tenant_claim: str) -> dict[str, Any]:
    """An access-log filter: the JWT's tenant claim is a number or a boolean.

    Those are the claims whose header (claim_to_headers: digits, "true") could pass for a tenant id;
    a list's or an object's header is base64 of its JSON, which always has an upper-case letter among
    its first three characters, so the header checks catch them. (This filter cannot invert a match:
    Envoy's access-log metadata filter ignores the matcher's `invert`.)"""
    any_number = {"double_match": {"range": {"start": -sys.float_info.max, "end": sys.float_info.max}}}
    kinds = [any_number, {"bool_match": True}, {"bool_match": False}]
    matcher = {"filter": JWT_FILTER, "path": [{"key": JWT_METADATA_KEY}, {"key": tenant_claim}]}
    # No JWT (no such key): the API key's tenant came from the edge, which only stores valid ones.
    return {
        "metadata_filter": {
            "matcher": {**matcher, "value": {"or_match": {"value_matchers": kinds}}},
            "match_if_key_not_found": False,
        }
    }


def _tenant_reply_mappers(tenant_claim: str) -> list[dict[str, Any]]:
    """Local-reply mappers turning RBAC's 403 into 401 UNAUTHENTICATED when the tenant is what failed.

    A bad tenant is a bad credential, not a missing permission: the caller needs another token, not
    another role. The condition is _tenant_valid's negation (no tenant header, a header that is not a
    tenant id, a JWT claim that is not a string); these mappers must come before any generic 403 mapper.
    `tenant_claim` is EnvoyParams.tenant_claim."""
    bad_tenant = {
        "or_filter": {
            "filters": [
                _header_filter(TENANT_HEADER, {"present_match": False}),
                _header_filter(TENANT_HEADER, {"string_match": _tenant_chars(), "invert_match": True}),
                _header_filter(TENANT_HEADER, {"string_match": _tenant_too_long()}),
                _claim_not_a_string(tenant_claim),
            ]
        }
    }
    denied = {
        "status_code_filter": {
            "comparison": {"op": "EQ", "value": {"default_value": 403, "runtime_key": "servegrid.tenant_denied_status"}}
        }
    }
    message = "the credential's tenant must be a string of 1-64 of [a-z0-9-_:.]; get a token with a valid tenant"
    reason = "UNAUTHENTICATED_TENANT_INVALID"
    grpc = _header_filter("content-type", {"string_match": {"prefix": "application/grpc"}})
    challenge = {"header": {"key": "www-authenticate", "value": 'Bearer realm="servegrid", error="invalid_token"'}}
    return [
        {
            # gRPC: the body becomes grpc-message, 401 becomes UNAUTHENTICATED; the ErrorInfo rides along.
            "filter": {"and_filter": {"filters": [denied, bad_tenant, grpc]}},
            "status_code": 401,
            "headers_to_add": [
                challenge,
                _static_header("grpc-status", str(code_pb2.UNAUTHENTICATED)),
                _static_header(
                    "grpc-status-details-bin", replies.status_details(code_pb2.UNAUTHENTICATED, message, reason)
                ),
            ],
            "body_format_override": {"text_format_source": {"inline_string": message}},
        },
        {
            "filter": {"and_filter": {"filters": [denied, bad_tenant]}},
            "status_code": 401,
            "headers_to_add": [challenge],
            "body_format_override": {
                "text_format_source": {"inline_string": replies.error_json(code_pb2.UNAUTHENTICATED, message, reason)},
                "content_type": "application/json",
            },
        },
    ]


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


def _admin_paths() -> dict[str, Any]:
    """The registry admin API (its gRPC package and REST prefix) and KServe's ModelStatistics: paths as
    the client sent them, normalized by the HCM; the transcoder runs after RBAC."""
    prefixes = (names.REGISTRY_PACKAGE_PREFIX, names.ADMIN_REST_PREFIX)
    rules: list[dict[str, Any]] = [{"url_path": {"path": {"prefix": p}}} for p in prefixes]
    # Triton's statistics count every tenant's requests to a model: operators only. (Over REST the
    # statistics paths are not served at all: routes.REST_NOT_SERVED.)
    rules.append({"url_path": {"path": {"exact": f"/{names.KSERVE_SERVICE}/ModelStatistics"}}})
    return {"or_rules": {"rules": rules}}


def _rbac_rules(params: EnvoyParams) -> dict[str, Any]:
    """ALLOW when a policy matches: any authenticated tenant off the admin paths, admins on them."""
    tenant = [_audience_ok(params.audience), _tenant_valid(params)]
    return {
        "action": "ALLOW",
        "policies": {
            "authenticated-tenant": {
                "permissions": [{"not_rule": _admin_paths()}],
                "principals": [{"and_ids": {"ids": tenant}}],
            },
            "admin-only": {
                "permissions": [_admin_paths()],
                "principals": [{"and_ids": {"ids": [*tenant, _has_role(params, params.admin_role)]}}],
            },
        },
    }


# --- filters ---------------------------------------------------------------------------------


def _jwks_source(params: EnvoyParams) -> dict[str, Any]:
    if params.jwks_uri:
        return {
            "remote_jwks": {
                "http_uri": {"uri": params.jwks_uri, "cluster": names.JWKS_CLUSTER, "timeout": "5s"},
                "cache_duration": "300s",
                # Fetch at startup and refresh in the background, so no request waits on the IdP.
                "async_fetch": {"fast_listener": False},
                "retry_policy": {"num_retries": 3},
            }
        }
    if not params.jwks_file:
        raise ValueError("set jwks_file (local) or jwks_uri (kubernetes)")
    return {"local_jwks": {"filename": params.jwks_file}}


def _header_scrub() -> dict[str, Any]:
    # Only Envoy and the edge set identity headers; a client's are removed before anything reads them.
    # The client's own model, version and retry opt-in headers pass (names.SCRUBBED_HEADERS).
    removals = [{"remove_on_match": {"key_matcher": {"exact": h}}} for h in names.SCRUBBED_HEADERS]
    removals.append({"remove_on_match": {"key_matcher": {"prefix": names.JWT_HEADER_PREFIX}}})
    return {
        "name": names.HEADER_SCRUB_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={"request_mutations": removals},
        ),
    }


def _jwt_provider(params: EnvoyParams, issuer: str, jwks: dict[str, Any], max_lifetime_s: int) -> dict[str, Any]:
    """One trusted issuer. Both providers write the same metadata and headers, so RBAC, limits and
    the services treat an exchanged token exactly like the identity provider's."""
    provider: dict[str, Any] = {
        "issuer": issuer,
        # No `audiences` here on purpose: jwt_authn answers a wrong audience with 401,
        # but a valid token for another service is a 403; the rbac filter checks it.
        **jwks,
        "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
        "forward": False,
        "payload_in_metadata": JWT_METADATA_KEY,
        "clock_skew_seconds": 30,
        # A token without `exp` would be valid forever: refused (401).
        "require_expiration": True,
        # Verified tokens are cached (keyed by the token): a client reusing its token pays
        # for the signature check once, not on every request.
        "jwt_cache_config": {"jwt_cache_size": 10000},
        "claim_to_headers": [
            {"header_name": TENANT_HEADER, "claim_name": params.tenant_claim},
            {"header_name": SUBJECT_HEADER, "claim_name": "sub"},
            {"header_name": ROLES_HEADER, "claim_name": params.roles_claim},
        ],
    }
    if max_lifetime_s > 0:
        # exp may lie at most this far ahead (it implies require_expiration).
        provider["max_lifetime"] = duration(max_lifetime_s)
    return provider


def _jwt_filter(params: EnvoyParams) -> dict[str, Any]:
    providers = {JWT_PROVIDER: _jwt_provider(params, params.issuer, _jwks_source(params), params.jwt_max_lifetime_s)}
    if params.token_jwks_file:
        # The edge's exchanged tokens (an API key swapped for a short-lived JWT): verified here like
        # any other, so an API-key client that exchanged once costs no call to the edge per request.
        providers[TOKEN_PROVIDER] = _jwt_provider(
            params,
            params.token_issuer,
            {"local_jwks": {"filename": params.token_jwks_file}},
            params.token_max_lifetime_s,
        )
    # Any one trusted issuer (a provider whose issuer differs from the token's fails, and the next is
    # tried); no token at all passes on to the API-key check. The order costs: a token of the second
    # provider pays for the first one's failed attempt (~30 us of Envoy CPU measured on 1.40, bench
    # path public-token), so the identity provider's tokens, the common case, go first.
    requirements: list[dict[str, Any]] = [{"provider_name": name} for name in providers]
    requires_any = {"requirements": [*requirements, {"allow_missing": {}}]}
    return {
        "name": JWT_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers=providers,
            rules=[
                {"match": {"prefix": f"/{names.HEALTH_SERVICE}/"}},
                {"match": {"path": "/healthz"}},
                # A token, when sent, must verify; without one the request goes on to the API-key
                # check, which refuses it unless a valid x-api-key is there.
                {"match": {"prefix": "/"}, "requires": {"requires_any": requires_any}},
            ],
        ),
    }


def _ext_authz_filter(params: EnvoyParams) -> dict[str, Any]:
    return {
        "name": EXT_AUTHZ_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
            grpc_service={
                "envoy_grpc": {"cluster_name": names.EDGE_CLUSTER},
                "timeout": duration(params.ext_authz_timeout_s),
            },
            transport_api_version="V3",
            # Fail closed: when keys cannot be checked, nobody gets in on a key (JWTs still work).
            failure_mode_allow=False,
            status_on_error={"code": 503},
            # content-type: the edge answers a gRPC caller in gRPC's shape (services/edge/authz.py).
            allowed_headers={"patterns": [{"exact": "x-api-key"}, {"exact": "content-type"}]},
            # Only requests without a verified JWT need an API key, so only they pay for the call.
            filter_enabled_metadata={
                "filter": JWT_FILTER,
                "path": [{"key": JWT_METADATA_KEY}],
                "value": {"present_match": True},
                "invert": True,
            },
        ),
    }


# --- rate limits (the edge is the quota server: services/edge/quota.py) -------------------------

QUOTA_FILTER = "envoy.filters.http.rate_limit_quota"
QUOTA_CLUSTER = "edge_quota"  # its own cluster: one long-lived stream per Envoy, its own stats
RATE_LIMITED_MESSAGE = replies.RATE_LIMITED.message
RATE_LIMITED_REASON = replies.RATE_LIMITED.reason
# Envoy's response code details on a quota denial (rate_limit_quota filter, 1.40).
QUOTA_DENIED_DETAILS = "rate_limited_by_quota"


def _quota_cluster(params: EnvoyParams) -> dict[str, Any]:
    """The edge again, for the quota stream: keepalive notices an edge that vanished without a FIN, so
    Envoy reopens the stream (to another replica) instead of reporting into a dead one."""
    cluster = _cluster(QUOTA_CLUSTER, [params.edge], connect_timeout="0.5s")
    cluster["typed_extension_protocol_options"] = _http2_options(
        connection_keepalive={"interval": "5s", "timeout": "3s"}
    )
    return cluster


def _header_input(header: str) -> dict[str, Any]:
    return {
        "custom_value": {
            "name": header,
            "typed_config": typed("envoy.type.matcher.v3.HttpRequestHeaderMatchInput", header_name=header),
        }
    }


def _static_header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _deny_settings(grpc: bool) -> dict[str, Any]:
    """The 429 / RESOURCE_EXHAUSTED reply in the API's error shape (services/mesh/replies.py).

    Envoy sends these bytes as they are (no formatter), and uses a gRPC message, when one is set, as the
    HTTP body too: so gRPC and REST callers get separate settings. retry-after and x-ratelimit-reset
    need the clock: _ratelimit_reply_headers adds them."""
    code = code_pb2.RESOURCE_EXHAUSTED
    headers = [_static_header("x-ratelimit-remaining", "0")]
    settings: dict[str, Any] = {"http_status": {"code": 429}}
    if grpc:
        settings["grpc_status"] = {"code": code, "message": RATE_LIMITED_MESSAGE}
        details = replies.status_details(code, RATE_LIMITED_MESSAGE, RATE_LIMITED_REASON)
        headers.append(_static_header("grpc-status-details-bin", details))
    else:
        body = replies.error_json(code, RATE_LIMITED_MESSAGE, RATE_LIMITED_REASON)
        settings["http_body"] = {"value": base64.b64encode(body.encode()).decode()}
        headers.append(_static_header("content-type", "application/json"))
    settings["response_headers_to_add"] = headers
    return settings


def _bucket_settings(params: EnvoyParams, grpc: bool) -> dict[str, Any]:
    """One bucket per (tenant, route): the tenant Envoy established (jwt_authn or ext_authz), the route's
    rate-limit name (routes.RATELIMIT_ROUTE_HEADER). A request missing either is not limited (health)."""
    builder = {"tenant": _header_input(TENANT_HEADER), "route": _header_input(RATELIMIT_ROUTE_HEADER)}
    unassigned = "DENY_ALL" if params.ratelimit_fail_closed else "ALLOW_ALL"
    return {
        "name": "grpc" if grpc else "http",
        "typed_config": typed(
            "envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaBucketSettings",
            bucket_id_builder={"bucket_id_builder": builder},
            # Envoy 1.40 reports every 5 s whatever this says (and a new bucket at once); kept equal.
            reporting_interval="5s",
            deny_response_settings=_deny_settings(grpc),
            # No assignment yet, or an expired one (no expired_assignment_behavior: the bucket goes
            # back to this): fail open, so an edge outage degrades limits, never the API.
            no_assignment_behavior={"fallback_rate_limit": {"blanket_rule": unassigned}},
        ),
    }


def _ratelimit_reply_headers(params: EnvoyParams) -> list[dict[str, Any]]:
    """retry-after and x-ratelimit-reset (draft 03: seconds) on a quota denial: seconds to the window's
    end, from Envoy's clock (windows are epoch-aligned). CEL, because the quota filter's own headers are
    static. Added by the 429 local-reply mapper, so only a denial evaluates them (as a response header
    mutation they cost ~5 µs of Envoy CPU on every response)."""
    window = params.ratelimit_window_s
    seconds = f"%CEL(response.code_details == '{QUOTA_DENIED_DETAILS}' ? {window} - int(request.time) % {window} : '')%"
    return [_static_header(key, seconds) for key in ("retry-after", "x-ratelimit-reset")]


def _ratelimit_filters(params: EnvoyParams) -> list[dict[str, Any]]:
    """The route tag (a client's copy removed; the route's own written by its per-route config) and
    the quota filter, which enforces the leases the edge assigns with no call per request."""
    tag = {
        "name": RATELIMIT_TAG_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            mutations={"request_mutations": [{"remove": RATELIMIT_ROUTE_HEADER}]},
        ),
    }
    grpc_request = {
        "single_predicate": {
            "input": {
                "name": "content-type",
                "typed_config": typed("envoy.type.matcher.v3.HttpRequestHeaderMatchInput", header_name="content-type"),
            },
            "value_match": {"prefix": "application/grpc"},
        }
    }
    matchers = {
        "matcher_list": {
            "matchers": [{"predicate": grpc_request, "on_match": {"action": _bucket_settings(params, True)}}]
        },
        "on_no_match": {"action": _bucket_settings(params, False)},
    }
    quota = {
        "name": QUOTA_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.rate_limit_quota.v3.RateLimitQuotaFilterConfig",
            rlqs_server={"envoy_grpc": {"cluster_name": QUOTA_CLUSTER}},
            domain=params.ratelimit_domain,
            bucket_matchers=matchers,
        ),
    }
    return [tag, quota]


def _transcoder_filter(params: EnvoyParams, descriptor_bin: bytes) -> dict[str, Any]:
    return {
        "name": TRANSCODER_FILTER,
        "typed_config": typed(
            "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            proto_descriptor_bin=base64.b64encode(descriptor_bin).decode(),
            services=[names.GATEWAY_SERVICE, names.AUTH_SERVICE, names.REGISTRY_SERVICE],
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


def _kserve_filters() -> list[dict[str, Any]]:
    """Model name into the headers (from the header, the body, or a stream's first message)."""
    return [lua.stream_extraction_filter(), lua.downstream_filter()]


def _public_filters(params: EnvoyParams, descriptor_bin: bytes) -> list[dict[str, Any]]:
    rbac = {
        "name": RBAC_FILTER,
        "typed_config": typed("envoy.extensions.filters.http.rbac.v3.RBAC", rules=_rbac_rules(params)),
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
        _header_scrub(),
        *_kserve_filters(),
        _jwt_filter(params),
        _ext_authz_filter(params),
        rbac,
        *_ratelimit_filters(params),
        body_limit,
        _transcoder_filter(params, descriptor_bin),
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


def _header_filter(name: str, match: dict[str, Any]) -> dict[str, Any]:
    return {"header_filter": {"header": {"name": name, **match}}}


# --- Envoy's own replies ---------------------------------------------------------------------
# Every reply Envoy writes itself (a filter's denial, a direct response, an upstream it could not
# reach) goes through the listener's local_reply_config. The mappers below give each such reply the
# services' error shape; the first that matches wins, so the narrow ones come first.

CEL_FILTER = "envoy.access_loggers.extension_filters.cel"
# Why a request to the gateway, registry or edge got a 503 from Envoy: no healthy host, connect
# failure, overflow, no cluster yet, retries used up, reset by the upstream or its connection.
UPSTREAM_FAILURE_FLAGS = ("UH", "UF", "UO", "NC", "URX", "UC", "UR")
CALLERS: tuple[replies.Caller, ...] = ("grpc", "kserve", "rest")


@dataclass(frozen=True)
class _Case:
    """Which local replies (all of `when`) get `refusal`, and in which callers' shapes."""

    when: tuple[dict[str, Any], ...]
    refusal: replies.Refusal
    callers: tuple[replies.Caller, ...] = CALLERS
    headers: tuple[dict[str, Any], ...] = ()  # added to every caller's reply (formatters allowed)


def _cel(expression: str) -> dict[str, Any]:
    """A mapper filter on a CEL expression: response.code_details names the filter and its reason
    (`jwt_authn_access_denied{Jwt_is_expired}`), which no other mapper filter can see."""
    config = typed("envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter", expression=expression)
    return {"extension_filter": {"name": CEL_FILTER, "typed_config": config}}


def _details(*prefixes: str) -> dict[str, Any]:
    return _cel(" || ".join(f"response.code_details.startsWith({json.dumps(p)})" for p in prefixes))


def _status_is(code: int) -> dict[str, Any]:
    # First in each case: a reply with another status never evaluates the CEL after it.
    value = {"default_value": code, "runtime_key": "servegrid.local_reply.status"}
    return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}


def _all(*filters: dict[str, Any]) -> dict[str, Any]:
    return filters[0] if len(filters) == 1 else {"and_filter": {"filters": list(filters)}}


def _grpc_caller() -> tuple[dict[str, Any], ...]:
    """A gRPC client. A REST request the transcoder took on carries application/grpc by the time a body
    error is answered (it rewrote the headers) and x-envoy-original-path, so that one is REST's."""
    grpc = _header_filter("content-type", {"string_match": {"prefix": "application/grpc"}})
    return grpc, _header_filter("x-envoy-original-path", {"present_match": False})


def _overwrite(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _case_mappers(case: _Case) -> list[dict[str, Any]]:
    """One case in each caller's shape. gRPC: Envoy turns the body into grpc-message, so it is the
    sentence (Refusal.grpc_message), and the ErrorInfo rides in grpc-status-details-bin. KServe v2 REST:
    `{"error": ...}` (tritonclient). servegrid REST: `{"code", "message", "details"}`."""
    refusal = case.refusal
    mappers: list[dict[str, Any]] = []
    if "grpc" in case.callers:
        mappers.append(
            {
                "filter": _all(*case.when, *_grpc_caller()),
                "headers_to_add": [
                    _overwrite("grpc-status", str(refusal.grpc_code)),
                    _overwrite("grpc-status-details-bin", refusal.grpc_status_details),
                    *case.headers,
                ],
                "body_format_override": {"text_format_source": {"inline_string": refusal.grpc_message}},
            }
        )
    if "kserve" in case.callers:
        kserve = _header_filter(":path", {"string_match": {"prefix": "/v2"}})
        mappers.append(
            {
                "filter": _all(*case.when, kserve),
                "status_code": refusal.http_status,
                **({"headers_to_add": list(case.headers)} if case.headers else {}),
                "body_format_override": {"json_format": {"error": refusal.message}, "content_type": "application/json"},
            }
        )
    if "rest" in case.callers:
        mappers.append(
            {
                "filter": _all(*case.when),
                "status_code": refusal.http_status,
                **({"headers_to_add": list(case.headers)} if case.headers else {}),
                "body_format_override": {"json_format": refusal.rest_body(), "content_type": "application/json"},
            }
        )
    return mappers


def _token_cases() -> list[_Case]:
    """jwt_authn's 401s, by the reason it writes into the response code details."""
    denied = "jwt_authn_access_denied"
    unauthenticated = code_pb2.UNAUTHENTICATED
    return [
        _Case(
            (_status_is(401), _cel(f"response.code_details == '{denied}{{Jwt_is_expired}}'")),
            replies.Refusal(
                401, unauthenticated, "UNAUTHENTICATED_TOKEN_EXPIRED", "the bearer token has expired; get a new one"
            ),
        ),
        _Case(
            (_status_is(401), _cel(f"response.code_details == '{denied}{{Jwt_is_missing}}'")),
            replies.Refusal(401, unauthenticated, replies.UNAUTHENTICATED_MISSING, replies.MISSING_CREDENTIALS),
        ),
        _Case(
            (_status_is(401), _details(denied)),
            replies.Refusal(
                401,
                unauthenticated,
                "UNAUTHENTICATED_TOKEN_INVALID",
                "the bearer token was refused (%LOCAL_REPLY_BODY%); send a token from a trusted issuer",
            ),
        ),
    ]


def _audience_mismatch(audience: str) -> str:
    """CEL: a JWT verified but its aud (a string or a list) does not name us: rbac's 403 is about it."""
    jwt = f"metadata.filter_metadata[{json.dumps(JWT_FILTER)}]"
    payload = f"{jwt}.{JWT_METADATA_KEY}"
    aud = f"{payload}.aud"
    ours = json.dumps(audience)
    named = f"(type({aud}) == string ? {aud} == {ours} : (type({aud}) == list && {ours} in {aud}))"
    present = f"{json.dumps(JWT_FILTER)} in metadata.filter_metadata && {json.dumps(JWT_METADATA_KEY)} in {jwt}"
    return f"{present} && !({json.dumps('aud')} in {payload} && {named})"


def _admin_path_cel() -> str:
    """CEL: the request's path is one rbac keeps for the admin role (_admin_paths, read, not repeated)."""
    tests = []
    for rule in _admin_paths()["or_rules"]["rules"]:
        ((kind, value),) = rule["url_path"]["path"].items()
        tests.append(
            f"request.path.startsWith({json.dumps(value)})"
            if kind == "prefix"
            else f"request.path == {json.dumps(value)}"
        )
    return " || ".join(tests)


def _permission_cases(params: EnvoyParams) -> list[_Case]:
    """rbac's 403s: the audience, the admin role on the admin paths, or anything else it refused."""
    rbac = "response.code_details.startsWith('rbac_access_denied')"
    admin_path = _admin_path_cel()
    denied = code_pb2.PERMISSION_DENIED
    return [
        _Case(
            (_status_is(403), _cel(f"{rbac} && {_audience_mismatch(params.audience)}")),
            replies.Refusal(
                403,
                denied,
                "AUDIENCE_MISMATCH",
                f"the token was issued for another audience; get one whose aud includes '{params.audience}'",
            ),
        ),
        _Case(
            (_status_is(403), _cel(f"{rbac} && ({admin_path})")),
            replies.Refusal(403, denied, "ADMIN_ROLE_REQUIRED", f"this method needs the '{params.admin_role}' role"),
        ),
        _Case(
            (_status_is(403), _cel(rbac)),
            replies.Refusal(403, denied, "PERMISSION_DENIED", "this credential may not call this method"),
        ),
    ]


def _request_cases(params: EnvoyParams) -> list[_Case]:
    """What Envoy refuses about the request itself: no route, a body too large, JSON the transcoder
    cannot turn into the method's message (REST only: a gRPC request is never transcoded)."""
    transcoder = ("early_grpc_json_transcode_failure", "grpc_json_transcode_failure")
    return [
        # The not-found route's own 404 (not an auth filter's refusal of a request that matched it).
        _Case(
            (_status_is(404), _cel(f"xds.route_name == {json.dumps(NOT_FOUND_ROUTE)}")),
            replies.UNKNOWN_METHOD,
            ("grpc",),
        ),
        _Case((_status_is(404), _details(transcoder[0])), replies.UNKNOWN_PATH, ("rest",)),
        _Case(
            (_status_is(400), _details(*transcoder)),
            replies.Refusal(
                400,
                code_pb2.INVALID_ARGUMENT,
                "MALFORMED_REQUEST",
                "the request does not fit the method's message: %LOCAL_REPLY_BODY%",
            ),
            ("rest",),
        ),
        _Case(
            (_status_is(413),),
            replies.Refusal(
                413,
                code_pb2.RESOURCE_EXHAUSTED,
                "REQUEST_TOO_LARGE",
                f"the request body is larger than {params.max_request_body_bytes} bytes; send a smaller one",
            ),
        ),
        _Case((_status_is(429),), replies.RATE_LIMITED, headers=tuple(_ratelimit_reply_headers(params))),
    ]


def _availability_cases() -> list[_Case]:
    """503s: the API-key check could not answer (ext_authz fails closed), or the service behind a
    route cannot be reached (after the KServe mappers, which name the model)."""
    return [
        _Case(
            ({"response_flag_filter": {"flags": ["UAEX"]}}, _cel("response.code_details == 'ext_authz_error'")),
            replies.Refusal(
                503,
                code_pb2.UNAVAILABLE,
                "API_KEY_CHECK_UNAVAILABLE",
                "API keys cannot be checked right now; retry shortly, or authenticate with a bearer token",
            ),
        ),
        _Case(
            ({"response_flag_filter": {"flags": list(UPSTREAM_FAILURE_FLAGS)}},),
            replies.Refusal(
                503,
                code_pb2.UNAVAILABLE,
                "SERVICE_UNAVAILABLE",
                "the %UPSTREAM_CLUSTER% service cannot be reached; retry shortly",
            ),
        ),
    ]


def _kserve_no_backend_mappers() -> list[dict[str, Any]]:
    """No healthy backend (or a cluster not known yet) on KServe is UNAVAILABLE / 503 naming the model,
    not a bare "no healthy upstream"; REST keeps KServe's `{"error"}` shape."""
    no_backend = {"response_flag_filter": {"flags": ["UH", "NC"]}}
    grpc = [
        no_backend,
        _header_filter(MODEL_HEADER, {"present_match": True}),
        _header_filter("content-type", {"string_match": {"prefix": "application/grpc"}}),
    ]
    rest = [no_backend, _header_filter(":path", {"string_match": {"prefix": "/v2/"}})]
    message = f"model '%REQ({MODEL_HEADER})%' has no healthy backend"
    return [
        {
            # For gRPC the body becomes grpc-message; 503 becomes grpc-status UNAVAILABLE.
            "filter": {"and_filter": {"filters": grpc}},
            "body_format_override": {"text_format_source": {"inline_string": message}},
        },
        {
            "filter": {"and_filter": {"filters": rest}},
            "status_code": 503,
            "body_format_override": {
                "json_format": {"error": "no healthy backend for %REQ(:PATH)%"},
                "content_type": "application/json",
            },
        },
    ]


def _local_replies(params: EnvoyParams) -> dict[str, Any]:
    """Envoy's own replies in the services' error shape (see _case_mappers). Not mapped: replies that
    already have it (the API-key check's denials, the routes' direct responses) and 2xx."""
    cases = [*_token_cases(), *_permission_cases(params), *_request_cases(params)]
    return {
        "mappers": [
            *_tenant_reply_mappers(params.tenant_claim),  # first: RBAC's 403 for a bad tenant is a 401
            *(mapper for case in cases for mapper in _case_mappers(case)),
            *_kserve_no_backend_mappers(),
            *(mapper for case in _availability_cases() for mapper in _case_mappers(case)),
        ]
    }


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
        "local_reply_config": _local_replies(params),
        "http_filters": filters,
    }
    if params.otlp_endpoint:
        hcm["tracing"] = {
            "provider": {
                "name": "envoy.tracers.opentelemetry",
                "typed_config": typed(
                    "envoy.config.trace.v3.OpenTelemetryConfig",
                    grpc_service={"envoy_grpc": {"cluster_name": names.OTEL_CLUSTER}, "timeout": "1s"},
                    service_name="servegrid-envoy",
                ),
            }
        }
    return hcm


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
    mesh = _hcm(params, names.MESH, [*_kserve_filters(), _router_filter()])
    listeners = [
        _listener(names.PUBLIC, params.listen_host, params.listen_port, public),
        _listener(names.MESH, params.mesh_host, params.mesh_port, mesh),
    ]
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
    if params.jwks_uri:
        parts = urlsplit(params.jwks_uri)
        https = parts.scheme == "https"
        port = parts.port or (443 if https else 80)
        sni = (parts.hostname or "") if https else ""
        clusters.append(_cluster(names.JWKS_CLUSTER, [f"{parts.hostname}:{port}"], http2=False, tls_sni=sni))
    if params.otlp_endpoint:
        clusters.append(_cluster(names.OTEL_CLUSTER, [params.otlp_endpoint]))
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
    """envoy/envoy.<profile>.yaml as the default parameters render them, and the Helm chart's copy of
    the Kubernetes one (a chart can only read files inside itself)."""
    root = root or repo_root()
    profiles: tuple[Profile, ...] = ("local", "kubernetes")
    rendered = {root / "envoy" / f"envoy.{p}.yaml": render_yaml(EnvoyParams.for_profile(p)) for p in profiles}
    rendered[root / "deploy" / "helm" / "servegrid" / "files" / "envoy.yaml"] = rendered[
        root / "envoy" / "envoy.kubernetes.yaml"
    ]
    # The chart's config when `tokens.existingSecret` is set: it also trusts the edge's exchanged tokens,
    # with the JWKS the chart mounts from that Secret.
    with_tokens = EnvoyParams.for_profile("kubernetes", token_jwks_file=CHART_TOKEN_JWKS)
    rendered[root / "deploy" / "helm" / "servegrid" / "files" / "envoy-tokens.yaml"] = render_yaml(with_tokens)
    return rendered


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
    parser.add_argument("--issuer")
    parser.add_argument("--audience")
    parser.add_argument("--jwks-file", help="local JWKS file (local profile)")
    parser.add_argument("--jwks-uri", help="remote JWKS URL (kubernetes profile)")
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
    parser.add_argument("--access-log-path")
    parser.add_argument("--otlp-endpoint", help="host:port of an OTLP/gRPC collector")
    parser.add_argument("--descriptors", type=Path, help="descriptor set for the transcoder (gen/descriptors.binpb)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.write_defaults:
        return write_defaults(args.check)
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
        access_log_path=args.access_log_path,
        otlp_endpoint=args.otlp_endpoint,
        descriptors=args.descriptors,
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
