"""Names shared by the data plane's config and its control plane: headers, clusters, route configs, metadata."""

from __future__ import annotations

from typing import Literal

# --- headers ---------------------------------------------------------------------------------
# Set by the client (the SDKs do) or by the kserve Lua filter from the request body; the routes match them.
MODEL_HEADER = "x-servegrid-model"
VERSION_HEADER = "x-servegrid-model-version"
# The caller's documented retry opt-in (`true`): the request is safe to repeat.
RETRY_HEADER = "x-servegrid-retry"
# Identity: set only by Envoy (jwt_authn claim_to_headers) or the edge (ext_authz); scrubbed from clients.
# Identity headers: only Envoy (jwt_authn, ext_authz) sets them; the scrub removes a client's copies.
TENANT_HEADER = "x-servegrid-tenant"
SUBJECT_HEADER = "x-servegrid-subject"
ROLES_HEADER = "x-servegrid-roles"
AUTH_METHOD_HEADER = "x-servegrid-auth"
# A caller's API key (checked by ext_authz, or exchanged for a token); removed before any service sees it.
API_KEY_HEADER = "x-api-key"
# The API key on the token-exchange route only: Envoy copies x-api-key here for the edge, because the
# public listener strips x-api-key before any upstream sees it.
EXCHANGE_KEY_HEADER = "x-servegrid-exchange-key"
# What a tenant (and a role) name may be: they travel as header values and key rate-limit counters.
# TENANT_PATTERN is matched against the whole value (Python: re.fullmatch). Envoy checks the same rule
# as two smaller regexes (its RE2 program-size limit of 100 refuses `{1,64}`): TENANT_CHARS one or more
# times, and not TENANT_MAX_LENGTH + 1 ASCII bytes or more.
TENANT_CHARS = "[a-z0-9_:.-]"
TENANT_MAX_LENGTH = 64
TENANT_PATTERN = f"{TENANT_CHARS}{{1,{TENANT_MAX_LENGTH}}}"
JWT_HEADER_PREFIX = "x-jwt-"  # Envoy's own payload-forwarding headers
# Internal to the data plane: the mirror policy marks a mirrored request (value: the shadow version),
# and the router's comparison re-asks carry the compare header (see services/router/shadow.py).
MIRROR_HEADER = "x-servegrid-mirror"
SHADOW_COMPARE_HEADER = "x-servegrid-shadow-compare"
# Removed from every client request on the public listener before anything reads them. The client's
# own MODEL_HEADER, VERSION_HEADER and RETRY_HEADER pass; a new internal x-servegrid-* header goes here.
SCRUBBED_HEADERS = (
    TENANT_HEADER,
    SUBJECT_HEADER,
    ROLES_HEADER,
    AUTH_METHOD_HEADER,
    EXCHANGE_KEY_HEADER,
    MIRROR_HEADER,
    SHADOW_COMPARE_HEADER,
)

# Correlation: the request id Envoy makes for every request (and returns in every response), and the
# W3C trace context. Services log the request id and pass all three on to the next hop.
REQUEST_ID_HEADER = "x-request-id"
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

# --- clusters --------------------------------------------------------------------------------
Protocol = Literal["grpc", "http"]
PROTOCOLS: tuple[Protocol, ...] = ("grpc", "http")
# `|` never occurs in a model id ([a-z][a-z0-9_-]*), is legal in Envoy cluster and stat names, and keeps
# the parts readable in `/clusters` and `cluster.<name>.*` stats (Prometheus output sanitizes it to `_`).
SEPARATOR = "|"
CLUSTER_PREFIX = "kserve"
# Static clusters in the bootstrap (the router renders routes to them, so the names are shared).
GATEWAY_CLUSTER = "gateway"
REGISTRY_CLUSTER = "registry"
EDGE_CLUSTER = "edge"
XDS_CLUSTER = "xds"  # the router(s): ADS, and the comparing mirror target for shadow traffic
JWKS_CLUSTER = "jwks"
OTEL_CLUSTER = "otel"


def version_cluster(model_id: str, version: int, protocol: Protocol) -> str:
    """`kserve|{model_id}|v{version}|{protocol}`: the backends serving one version of a model."""
    return SEPARATOR.join((CLUSTER_PREFIX, model_id, f"v{version}", protocol))


def server_cluster(protocol: Protocol) -> str:
    """`kserve|server|{protocol}`: every backend (ServerLive/ServerReady/ServerMetadata, /v2/health/*).

    Three parts, never four, so it cannot collide with a model called `server`."""
    return SEPARATOR.join((CLUSTER_PREFIX, "server", protocol))


# --- listeners and route configurations --------------------------------------------------------
PUBLIC = "public"  # the listener clients reach, and its RouteConfiguration
MESH = "mesh"  # the internal listener (gateway, batch workers), and its RouteConfiguration
ROUTE_CONFIGS = (PUBLIC, MESH)

# --- metadata --------------------------------------------------------------------------------
METADATA_NAMESPACE = "servegrid"  # cluster filter_metadata: model_id, version, triton_model_name, ...

# --- exchanged tokens ------------------------------------------------------------------------
# The `iss` of the short-lived JWTs the edge mints for an API key (services/edge/tokens.py); Envoy's
# second jwt_authn provider trusts this issuer with the edge's JWKS.
TOKEN_ISSUER = "servegrid-edge"

# --- errors ----------------------------------------------------------------------------------
ERROR_DOMAIN = "servegrid.dev"

# --- services and filters --------------------------------------------------------------------
KSERVE_SERVICE = "inference.GRPCInferenceService"
GATEWAY_SERVICE = "servegrid.gateway.v1.GatewayService"
AUTH_SERVICE = "servegrid.gateway.v1.AuthService"  # served by the edge (API key → token exchange)
REGISTRY_SERVICE = "servegrid.registry.v1.RegistryService"
ROUTER_ADMIN_SERVICE = "servegrid.router.v1.RouterAdminService"  # served by every router replica
# The services whose google.api.http mappings Envoy transcodes (the REST API, and its OpenAPI document).
TRANSCODED_SERVICES = (GATEWAY_SERVICE, AUTH_SERVICE, REGISTRY_SERVICE, ROUTER_ADMIN_SERVICE)
# Admin-only paths (the RBAC filter asks for the admin role on them): gRPC package and REST prefix of each.
REGISTRY_PACKAGE_PREFIX = "/servegrid.registry.v1."
ADMIN_REST_PREFIX = "/v1/admin/"
ROUTER_PACKAGE_PREFIX = "/servegrid.router.v1."
ROUTER_REST_PREFIX = "/v1/router/"
HEALTH_SERVICE = "grpc.health.v1.Health"
REFLECTION_PREFIX = "/grpc.reflection."  # v1 and v1alpha, both answered by the gateway for the public port
# Every gRPC service a client may call on the public listener: what its routes send somewhere other than
# not-found (services/mesh/routes.py; a unit test keeps the two equal). The gateway's reflection lists and
# describes exactly these, so `grpcurl list` through Envoy shows what Envoy routes.
PUBLIC_GRPC_SERVICES = (
    GATEWAY_SERVICE,
    AUTH_SERVICE,
    REGISTRY_SERVICE,
    ROUTER_ADMIN_SERVICE,
    KSERVE_SERVICE,
    HEALTH_SERVICE,
)

CORS_FILTER = "envoy.filters.http.cors"
HEADER_SCRUB_FILTER = "servegrid.header_scrub"
JWT_FILTER = "envoy.filters.http.jwt_authn"
EXT_AUTHZ_FILTER = "envoy.filters.http.ext_authz"
RBAC_FILTER = "envoy.filters.http.rbac"
# Rate limits: the quota filter's buckets are (tenant, route); each limited route names itself in this
# header through the tag filter's per-route config (a client's copy is removed first).
RATELIMIT_TAG_FILTER = "servegrid.ratelimit_route"
RATELIMIT_ROUTE_HEADER = "x-servegrid-ratelimit-route"
# The token exchange's rate-limit route name. Envoy knows no tenant on that route (the key is checked by
# the edge itself), so the edge charges each exchange to the key's tenant under this name.
EXCHANGE_ROUTE = "auth-token"
BUFFER_FILTER = "envoy.filters.http.buffer"
TRANSCODER_FILTER = "envoy.filters.http.grpc_json_transcoder"
# Counts every gRPC call per cluster by its grpc-status (the router's own stats see only HTTP 200 for a
# gRPC error in the trailers); the stats tag turns `cluster.<c>.grpc.<code>` into `envoy_cluster_grpc`
# with this label, what the SLO rules and `servegrid top` read.
GRPC_STATS_FILTER = "envoy.filters.http.grpc_stats"
GRPC_STATUS_TAG = "grpc_status"
ROUTER_FILTER = "envoy.filters.http.router"


def model_headers(model: str, version: str = "") -> list[tuple[str, str]]:
    """The headers Envoy routes KServe v2 calls on, as a client that knows its model sends them.

    With them, the mesh listener routes without reading the body; a servegrid client always sends them.
    """
    headers = [(MODEL_HEADER, model)]
    if version:
        headers.append((VERSION_HEADER, version))
    return headers


# Longest model id, version or tensor name accepted anywhere (bytes): longer is INVALID_ARGUMENT
# (NAME_TOO_LONG) at the first hop, instead of an echo in an error that overflows a client's 8 KiB
# metadata limit. kserve.lua carries the same number (a unit test keeps them equal).
MAX_NAME_BYTES = 256


def name_too_long(value: str) -> bool:
    return len(value.encode()) > MAX_NAME_BYTES
