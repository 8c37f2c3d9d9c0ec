"""Every route of the data plane as a dict in Envoy's JSON shape: the fixed API routes and each model's KServe ones."""

# Envoy evaluates routes in order and takes the first match, so the order below is part of the policy:
#   public: health, API docs → gateway/registry/router admin/reflection (gRPC, then REST) → KServe → not-found
#   mesh:   KServe → not-found
# KServe, per protocol: server-wide methods → methods never served (UNIMPLEMENTED / 403) → one block of
# routes per model (explicit version → that version; other version → VERSION_NOT_FOUND; no version →
# weighted / PRODUCTION / "name a version") → unknown model (MODEL_NOT_FOUND).
# Nothing here depends on the deployment except the CORS origins, so the router renders these and
# every Envoy (public or mesh, local or Kubernetes) gets the same ones.

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# Imported for its descriptor: the router's ParseDict resolves _rate_limits' HeaderMutationPerRoute through it.
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2  # noqa: F401
from google.rpc import code_pb2

from services.mesh import api_docs, names, replies
from services.mesh.names import (
    BUFFER_FILTER,
    EXT_AUTHZ_FILTER,
    KSERVE_SERVICE,
    MODEL_HEADER,
    RBAC_FILTER,
    TRANSCODER_FILTER,
    VERSION_HEADER,
)
from services.router.settings import RouterSettings
from services.router.table import CompiledRoute, VersionTarget

Route = dict[str, Any]
KSERVE_PREFIX = f"/{KSERVE_SERVICE}/"
# The model-scoped methods a model's routes serve; every other KServe method is UNIMPLEMENTED here
# (an allowlist, so a method Triton adds later is not reachable until someone decides it should be).
MODEL_METHODS = ("ModelInfer", "ModelStreamInfer", "ModelMetadata", "ModelReady", "ModelConfig", "ModelStatistics")
SERVER_METHODS = ("ServerLive", "ServerReady", "ServerMetadata")
# KServe REST paths that stay unreachable: repository, shared memory, trace and log settings, statistics.
# (Two regexes: RE2's default program-size limit in Envoy is 100, and one alternation exceeds it.)
REST_NOT_SERVED = (
    r"^/v2/(repository|systemsharedmemory|cudasharedmemory|trace|logging)(/.*)?$",
    r"^/v2/models/[^/]+(/versions/[^/]+)?/(stats|trace)(/.*)?$",
)
MILLION = 1_000_000
REST_TIMEOUT_S: float = RouterSettings.model_fields["rest_timeout_s"].default


@dataclass(frozen=True)
class KservePolicy:
    """What every model's routes share: retries and where shadow copies go (from the router's settings)."""

    num_retries: int = 2
    per_try_timeout_s: float = 0.0  # 0: each try may take the caller's whole deadline
    retry_backoff_base_s: float = 0.002
    retry_backoff_max_s: float = 0.1
    mirror_cluster: str = names.XDS_CLUSTER  # the router: it answers mirrors at once and compares off-path
    rest_timeout_s: float = REST_TIMEOUT_S  # gRPC has none: the caller's deadline rules


# --- building blocks -------------------------------------------------------------------------


def typed(type_name: str, **config: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **config}


def disabled() -> dict[str, Any]:
    return typed("envoy.config.route.v3.FilterConfig", disabled=True)


def duration(seconds: float) -> str:
    return f"{seconds:g}s"


def header(key: str, value: str) -> dict[str, Any]:
    """A header Envoy sets, replacing any value already there (routes, local replies, deny settings)."""
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def _streaming() -> dict[str, Any]:
    """Streams pass untouched (a 600 KB tensor needs no buffering) and nothing is transcoded.

    Fresh dicts per route: json_format.ParseDict deletes and restores `@type` in every Any it parses,
    so a dict shared between routes breaks when two snapshots are built at once (two router replicas
    in one process)."""
    return {BUFFER_FILTER: disabled(), TRANSCODER_FILTER: disabled()}


# Rate limits (services/edge/quota.py): Envoy's rate_limit_quota filter keys its buckets by (tenant,
# route). The route part is the rate-limit name each limited route tags its requests with: a
# header_mutation filter (RATELIMIT_TAG_FILTER, just before the quota filter) removes any client copy
# of the header, and these per-route settings write it. A route without a tag is not limited.
RATELIMIT_TAG_FILTER = names.RATELIMIT_TAG_FILTER
RATELIMIT_ROUTE_HEADER = names.RATELIMIT_ROUTE_HEADER


def _rate_limits(route_name: str) -> dict[str, Any]:
    """Per-route filter config naming the route for the quota filter's bucket (infer, gateway, admin,
    kserve: the names SERVEGRID_EDGE_ROUTE_LIMITS uses). Fresh dicts per route (see _streaming)."""
    tag = {"append": header(RATELIMIT_ROUTE_HEADER, route_name)}
    return {
        RATELIMIT_TAG_FILTER: typed(
            "envoy.extensions.filters.http.header_mutation.v3.HeaderMutationPerRoute",
            mutations={"request_mutations": [tag]},
        )
    }


def grpc_reply(name: str, match: dict[str, Any], code: int, message: str, reason: str = "") -> Route:
    """A trailers-only gRPC reply: HTTP 200, no body, the status in the headers that end the stream.

    `message` may use Envoy's formatter (`%REQ(x-servegrid-model)%`). The ErrorInfo's own message is the
    static part of it, because its bytes cannot be formatted per request."""
    headers = [header("content-type", "application/grpc"), header("grpc-status", str(code))]
    headers.append(header("grpc-message", message))
    if reason:
        static = re.sub(r"\s*'%[^%]+%'", "", message)
        headers.append(header("grpc-status-details-bin", replies.status_details(code, static, reason)))
    return {
        "name": name,
        "match": match,
        "direct_response": {"status": 200},
        "response_headers_to_add": headers,
        "typed_per_filter_config": _streaming(),
    }


def json_reply(name: str, match: dict[str, Any], status: int, error: str) -> Route:
    """A KServe REST error: `{"error": "..."}` (the formatter may fill in the path)."""
    return {
        "name": name,
        "match": match,
        "direct_response": {
            "status": status,
            "body_format": {"json_format": {"error": error}, "content_type": "application/json"},
        },
        "typed_per_filter_config": _streaming(),
    }


# --- fixed routes (public listener) ----------------------------------------------------------


def _api_route(
    name: str,
    match: dict[str, Any],
    cluster: str,
    *,
    grpc: bool,
    rest_timeout_s: float = REST_TIMEOUT_S,
    limited: bool = True,
) -> Route:
    """A route to a service; `limited` routes count against the tenant's rate limit under `name`."""
    action: dict[str, Any] = {"cluster": cluster}
    route: Route = {
        "name": name,
        "match": match,
        "route": action,
        "typed_per_filter_config": _rate_limits(name) if limited else {},
    }
    if grpc:
        # gRPC calls carry their own deadline (grpc-timeout); no fixed route timeout cuts them.
        action["timeout"] = "0s"
        action["max_stream_duration"] = {"grpc_timeout_header_max": "300s"}
        # gRPC streams through untouched (grpc.max_receive_message_length in each service bounds it).
        route["typed_per_filter_config"][BUFFER_FILTER] = disabled()
    else:
        action["timeout"] = duration(rest_timeout_s)
    return route


def _open_route() -> dict[str, Any]:
    """Per-route filter config of a route anyone may call: no API-key check, no RBAC, no buffering (and no
    rate-limit tag). jwt_authn skips the same paths (services/mesh/auth.py jwt_filter's rules)."""
    return {
        EXT_AUTHZ_FILTER: typed("envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", disabled=True),
        RBAC_FILTER: typed("envoy.extensions.filters.http.rbac.v3.RBACPerRoute"),
        BUFFER_FILTER: disabled(),
    }


def health_routes() -> list[Route]:
    """Health needs no credential: no auth, no RBAC, no limits."""
    open_route = _open_route()
    return [
        {
            "name": "health-grpc",
            "match": {"prefix": f"/{names.HEALTH_SERVICE}/", "grpc": {}},
            "route": {"cluster": names.GATEWAY_CLUSTER, "timeout": "5s"},
            "typed_per_filter_config": open_route,
        },
        {
            "name": "health-http",
            "match": {"path": "/healthz"},
            "direct_response": {"status": 200, "body": {"inline_string": '{"status":"SERVING"}\n'}},
            "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
            # Not an API method: the transcoder (reject_unknown_method) would 404 it.
            "typed_per_filter_config": {**open_route, TRANSCODER_FILTER: disabled()},
        },
    ]


def _page(name: str, path: str, body: str, content_type: str, *headers: dict[str, Any]) -> Route:
    """A fixed body Envoy answers itself at `path`, to anyone (see _open_route)."""
    return {
        "name": name,
        "match": {"path": path},
        "direct_response": {"status": 200, "body": {"inline_string": body}},
        "response_headers_to_add": [
            header("content-type", content_type),
            header("x-content-type-options", "nosniff"),
            *headers,
        ],
        # Not API methods: the transcoder (reject_unknown_method) would 404 them.
        "typed_per_filter_config": {**_open_route(), TRANSCODER_FILTER: disabled()},
    }


def doc_routes() -> list[Route]:
    """/openapi.json (the REST API's OpenAPI 3.1 document) and /docs (a page listing the operations),
    answered by Envoy itself with no credential, like /healthz. The bodies are inline, so the public route
    configuration raises Envoy's 4 KB direct-response limit to fit them (public_route_config)."""
    no_fetching = header("content-security-policy", "default-src 'none'; style-src 'unsafe-inline'")
    return [
        _page("openapi-json", api_docs.OPENAPI_PATH, api_docs.openapi_json(), "application/json"),
        _page("docs", api_docs.DOCS_PATH, api_docs.docs_html(), "text/html; charset=utf-8", no_fetching),
    ]


def token_exchange_routes(rest_timeout_s: float = REST_TIMEOUT_S) -> list[Route]:
    """AuthService.CreateAccessToken (gRPC, and REST `POST /v1/auth:token`) to the edge, which checks the
    key itself against PostgreSQL: no ext_authz call first, and no RBAC (no tenant is known yet).

    The listener strips x-api-key before any upstream (public_route_config); route-level headers are
    evaluated before the virtual host's, so the key is copied for the edge into EXCHANGE_KEY_HEADER
    (scrubbed from clients like the identity headers). The routes carry the usual rate-limit tag, but
    with no tenant header Envoy's quota filter leaves them alone: the edge charges each exchange to the
    key's tenant itself (services/edge/quota.py DirectCharge)."""
    routes = [
        _api_route(
            names.EXCHANGE_ROUTE,
            {"path": f"/{names.AUTH_SERVICE}/CreateAccessToken", "grpc": {}},
            names.EDGE_CLUSTER,
            grpc=True,
        ),
        _api_route(
            names.EXCHANGE_ROUTE,
            {"path": "/v1/auth:token"},
            names.EDGE_CLUSTER,
            grpc=False,
            rest_timeout_s=rest_timeout_s,
        ),
    ]
    for route in routes:  # fresh dicts per route (see _streaming)
        route["typed_per_filter_config"] = {
            **route.get("typed_per_filter_config", {}),
            EXT_AUTHZ_FILTER: typed("envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute", disabled=True),
            RBAC_FILTER: typed("envoy.extensions.filters.http.rbac.v3.RBACPerRoute"),
        }
        route["request_headers_to_add"] = [header(names.EXCHANGE_KEY_HEADER, "%REQ(x-api-key)%")]
    return routes


def fixed_routes(rest_timeout_s: float = REST_TIMEOUT_S) -> list[Route]:
    """Health, the gateway's API (Infer first: its own rate-limit descriptor), the registry and router
    admin APIs (the listener's RBAC filter requires the admin role by path), reflection; gRPC then REST.

    Router admin calls go to the xds cluster (every router replica), so each reaches one replica: its
    reads answer for that replica, and its drains are stored in the registry for all of them
    (services/router/admin.py)."""
    gateway, registry, router = names.GATEWAY_CLUSTER, names.REGISTRY_CLUSTER, names.XDS_CLUSTER
    gateway_service = f"/{names.GATEWAY_SERVICE}/"
    return [
        *health_routes(),
        *doc_routes(),
        *token_exchange_routes(rest_timeout_s),
        _api_route("infer", {"path": f"{gateway_service}Infer", "grpc": {}}, gateway, grpc=True),
        _api_route("gateway", {"prefix": gateway_service, "grpc": {}}, gateway, grpc=True),
        _api_route("admin", {"prefix": names.REGISTRY_PACKAGE_PREFIX, "grpc": {}}, registry, grpc=True),
        _api_route("admin", {"prefix": names.ROUTER_PACKAGE_PREFIX, "grpc": {}}, router, grpc=True),
        # grpcurl and other tools discover the public API through the gateway's reflection service (v1 and
        # v1alpha), which describes every service routed here (names.PUBLIC_GRPC_SERVICES). Discovery is
        # not inference: it needs a credential but spends none of the tenant's limit (no rate-limit tag).
        _api_route("reflection", {"prefix": names.REFLECTION_PREFIX, "grpc": {}}, gateway, grpc=True, limited=False),
        # REST (the transcoder turns these into the gRPC calls above; unmapped ones get 404)
        _api_route("admin", {"prefix": names.ADMIN_REST_PREFIX}, registry, grpc=False, rest_timeout_s=rest_timeout_s),
        _api_route("admin", {"prefix": names.ROUTER_REST_PREFIX}, router, grpc=False, rest_timeout_s=rest_timeout_s),
        _api_route(
            "infer",
            {"safe_regex": {"regex": r"/v1/models/[^/]+(/versions/[^/]+)?:infer"}},
            gateway,
            grpc=False,
            rest_timeout_s=rest_timeout_s,
        ),
        _api_route("gateway", {"prefix": "/v1/"}, gateway, grpc=False, rest_timeout_s=rest_timeout_s),
    ]


NOT_FOUND_ROUTE = "not-found"


def not_found_route() -> Route:
    """Everything else is 404 (UNIMPLEMENTED over gRPC: a local-reply mapper keyed on this route's name
    gives gRPC callers their status, services/mesh/local_replies.py), at once.

    Without a route, the buffer filter would hold an unknown streaming gRPC call open waiting for
    its end; here no filter past authentication touches it.
    """
    return {
        "name": NOT_FOUND_ROUTE,
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": replies.UNKNOWN_PATH.rest_json()}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
        "typed_per_filter_config": _streaming(),
    }


# --- KServe: one model -----------------------------------------------------------------------


def _grpc_match(*headers: dict[str, Any]) -> dict[str, Any]:
    return {"prefix": KSERVE_PREFIX, "grpc": {}, "headers": list(headers)}


def _exact(name: str, value: str) -> dict[str, Any]:
    return {"name": name, "string_match": {"exact": value}}


def _present(name: str) -> dict[str, Any]:
    return {"name": name, "present_match": True}


def _non_empty(name: str) -> dict[str, Any]:
    # An empty version (tritonclient's default) means "no version named", like an absent header.
    return {"name": name, "string_match": {"safe_regex": {"regex": ".+"}}}


def _retry_policy(policy: KservePolicy, grpc: bool) -> dict[str, Any]:
    retry: dict[str, Any] = {
        # The backend is gone or refused (a killed Triton resets its streams): repeat on another one.
        # Inference has no side effects; the budget (cluster retry_budget) bounds a retry storm. A
        # caller's opt-in (x-servegrid-retry) widens this per request (the kserve Lua filter).
        "retry_on": "unavailable,connect-failure,refused-stream,reset"
        if grpc
        else "connect-failure,refused-stream,reset,retriable-status-codes",
        "num_retries": policy.num_retries,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
            }
        ],
        "host_selection_retry_max_attempts": "3",
        "retry_back_off": {
            "base_interval": duration(max(policy.retry_backoff_base_s, 0.001)),
            "max_interval": duration(max(policy.retry_backoff_max_s, policy.retry_backoff_base_s, 0.001)),
        },
    }
    if not grpc:
        retry["retriable_status_codes"] = [503]
    if policy.per_try_timeout_s > 0:
        retry["per_try_timeout"] = duration(policy.per_try_timeout_s)
    return retry


def _mirror(route: CompiledRoute, policy: KservePolicy) -> list[dict[str, Any]]:
    if route.shadow is None or route.shadow_rate <= 0:
        return []
    marker = {"append": header(names.MIRROR_HEADER, route.shadow.version_str)}
    return [
        {
            "cluster": policy.mirror_cluster,
            "runtime_fraction": {
                "default_value": {"numerator": round(route.shadow_rate * MILLION), "denominator": "MILLION"}
            },
            "request_headers_mutations": [marker],
        }
    ]


def _action(route: CompiledRoute, policy: KservePolicy, *, grpc: bool, mirror: bool = True) -> dict[str, Any]:
    """What every routed KServe request shares: retries, deadline, sticky hashing, shadow (gRPC, unless
    `mirror` is off)."""
    action: dict[str, Any] = {"retry_policy": _retry_policy(policy, grpc)}
    if grpc:
        # The caller's grpc-timeout is the deadline, unmodified; no route timeout cuts a stream short.
        action["timeout"] = "0s"
        action["max_stream_duration"] = {"grpc_timeout_header_max": "0s"}
        mirrors = _mirror(route, policy) if mirror else []  # the router compares gRPC only
        if mirrors:
            action["request_mirror_policies"] = mirrors
    else:
        action["timeout"] = duration(policy.rest_timeout_s)
    if route.sticky_header:
        action["hash_policy"] = [{"header": {"header_name": route.sticky_header}}]
    return action


def _to_version(target: VersionTarget, protocol: names.Protocol) -> dict[str, Any]:
    return {"cluster": names.version_cluster(target.model_id, target.version, protocol)}


def _default_targets(route: CompiledRoute) -> tuple[VersionTarget, ...]:
    """Who serves requests naming no version: the weighted versions, else the PRODUCTION one, else nobody."""
    if route.weighted:
        return route.weighted
    return (route.default,) if route.default is not None else ()


def _weighted(route: CompiledRoute, protocol: names.Protocol) -> dict[str, Any]:
    # Each pick names its version in a header, so the router's shadow comparison asks the same one again.
    clusters = [
        {
            "name": names.version_cluster(target.model_id, target.version, protocol),
            "weight": target.weight,
            "request_headers_to_add": [header(VERSION_HEADER, target.version_str)],
        }
        for target in route.weighted
    ]
    weighted: dict[str, Any] = {"clusters": clusters}
    if route.sticky_header:
        weighted["use_hash_policy"] = True  # the sticky header's hash picks the version
    return {"weighted_clusters": weighted}


def _route_to(
    name: str, match: dict[str, Any], action: dict[str, Any], headers: Sequence[dict] = (), *, limited: bool = True
) -> Route:
    """A routed KServe request; `limited` ones count against the tenant's limit as route "kserve"."""
    filters = {**_streaming(), **_rate_limits("kserve")} if limited else _streaming()
    route: Route = {"name": name, "match": match, "route": action, "typed_per_filter_config": filters}
    if headers:
        route["request_headers_to_add"] = list(headers)
    return route


def grpc_model_routes(route: CompiledRoute, policy: KservePolicy) -> list[Route]:
    """One model's gRPC routes (x-servegrid-model names it; the kserve Lua filter sets it from the body).

    A shadowed model's routes come twice: first for the router's own comparison calls (they carry
    SHADOW_COMPARE_HEADER, which the public listener scrubs from clients) without the mirror policy,
    so a comparison never mirrors itself; Envoy's mirror policy has no per-request condition but a
    runtime fraction, and a header match costs nothing on the routes that do not need it."""
    model = _exact(MODEL_HEADER, route.model_id)
    routes: list[Route] = []
    if _mirror(route, policy):
        unmirrored = _action(route, policy, grpc=True, mirror=False)
        routes += _grpc_routes(route, unmirrored, [model, _present(names.SHADOW_COMPARE_HEADER)], "|compare")
    return routes + _grpc_routes(route, _action(route, policy, grpc=True), [model], "")


def _grpc_routes(route: CompiledRoute, base: dict[str, Any], headers: list[dict[str, Any]], suffix: str) -> list[Route]:
    """Explicit version → that version; another version → VERSION_NOT_FOUND; none → the default route."""
    routes = [
        _route_to(
            f"kserve|{route.model_id}|v{v}|grpc{suffix}",
            _grpc_match(*headers, _exact(VERSION_HEADER, str(v))),
            {**base, **_to_version(route.versions[v], "grpc")},
        )
        for v in sorted(route.versions)
    ]
    routes.append(
        grpc_reply(
            f"kserve|{route.model_id}|unknown-version|grpc{suffix}",
            _grpc_match(*headers, _non_empty(VERSION_HEADER)),
            code_pb2.NOT_FOUND,
            f"model '{route.model_id}' has no servable version '%REQ({VERSION_HEADER})%'",
            "VERSION_NOT_FOUND",
        )
    )
    routes.append(_default_route(route, base, _grpc_match(*headers), "grpc", suffix))
    return routes


def _default_route(
    route: CompiledRoute, base: dict[str, Any], match: dict[str, Any], protocol: names.Protocol, suffix: str = ""
) -> Route:
    name = f"kserve|{route.model_id}|default|{protocol}{suffix}"
    targets = _default_targets(route)
    if len(targets) > 1:
        return _route_to(name, match, {**base, **_weighted(route, protocol)})
    if targets:
        (target,) = targets
        return _route_to(
            name, match, {**base, **_to_version(target, protocol)}, [header(VERSION_HEADER, target.version_str)]
        )
    message = f"model '{route.model_id}' has no version taking default traffic; name a version"
    if protocol == "grpc":
        return grpc_reply(name, match, code_pb2.NOT_FOUND, message, "VERSION_NOT_FOUND")
    return json_reply(name, match, 404, message)


def rest_model_routes(route: CompiledRoute, policy: KservePolicy) -> list[Route]:
    """One model's KServe v2 REST routes, by path: /v2/models/{m}[/versions/{v}][/ready|/infer|/config]."""
    prefix = f"/v2/models/{route.model_id}"
    base = _action(route, policy, grpc=False)
    routes = [
        _route_to(
            f"kserve|{route.model_id}|v{v}|http",
            {"path_separated_prefix": f"{prefix}/versions/{v}"},
            {**base, **_to_version(route.versions[v], "http")},
        )
        for v in sorted(route.versions)
    ]
    routes.append(
        json_reply(
            f"kserve|{route.model_id}|unknown-version|http",
            {"path_separated_prefix": f"{prefix}/versions"},
            404,
            f"model '{route.model_id}' has no servable version at %REQ(:PATH)%",
        )
    )
    routes.append(_default_route(route, base, {"path_separated_prefix": prefix}, "http"))
    return routes


def model_routes(route: CompiledRoute, policy: KservePolicy | None = None) -> tuple[list[Route], list[Route]]:
    """(gRPC routes, REST routes) of one compiled model route."""
    policy = policy or KservePolicy()
    return grpc_model_routes(route, policy), rest_model_routes(route, policy)


# --- KServe: server-wide, guards, catch-alls -------------------------------------------------


def _server_route(name: str, match: dict[str, Any], protocol: names.Protocol) -> Route:
    action: dict[str, Any] = {"cluster": names.server_cluster(protocol), "timeout": "5s"}
    action["retry_policy"] = {"retry_on": "unavailable,connect-failure,refused-stream,reset,5xx", "num_retries": 2}
    return _route_to(name, match, action, limited=False)  # server health and metadata: never limited


def grpc_guard_routes() -> list[Route]:
    """Server-wide methods to any healthy backend; every non-model-scoped method → UNIMPLEMENTED."""
    server = [
        _server_route(f"kserve|server|{m}", {"path": f"{KSERVE_PREFIX}{m}", "grpc": {}}, "grpc") for m in SERVER_METHODS
    ]
    allowed = "|".join(MODEL_METHODS)
    not_model_scoped = {
        "name": ":path",
        "string_match": {"safe_regex": {"regex": f"^{re.escape(KSERVE_PREFIX)}({allowed})$"}},
        "invert_match": True,
    }
    unimplemented = grpc_reply(
        "kserve|unimplemented|grpc",
        _grpc_match(not_model_scoped),
        code_pb2.UNIMPLEMENTED,
        "this KServe method is not served here",
        "METHOD_NOT_SERVED",
    )
    return [*server, unimplemented]


def rest_guard_routes() -> list[Route]:
    server = [
        _server_route(f"kserve|server|{path}", {"path": path}, "http")
        for path in ("/v2/health/live", "/v2/health/ready", "/v2")
    ]
    forbidden = [
        json_reply(
            f"kserve|not-served-{i}|http", {"safe_regex": {"regex": regex}}, 403, "this KServe API is not served"
        )
        for i, regex in enumerate(REST_NOT_SERVED)
    ]
    return [*server, *forbidden]


def kserve_catch_all() -> list[Route]:
    """An unknown model: NOT_FOUND (MODEL_NOT_FOUND) over gRPC, 404 JSON over REST."""
    return [
        grpc_reply(
            "kserve|unknown-model|grpc",
            _grpc_match({"name": MODEL_HEADER, "present_match": True}),
            code_pb2.NOT_FOUND,
            f"model '%REQ({MODEL_HEADER})%' is not served",
            "MODEL_NOT_FOUND",
        ),
        grpc_reply(
            "kserve|no-model|grpc",
            _grpc_match(),
            code_pb2.INVALID_ARGUMENT,
            f"the request names no model (model_name, or the {MODEL_HEADER} header)",
            "MODEL_NOT_NAMED",
        ),
        json_reply("kserve|unknown-model|http", {"prefix": "/v2/models/"}, 404, "no model is served at %REQ(:PATH)%"),
    ]


def kserve_routes(routes: Sequence[CompiledRoute], policy: KservePolicy | None = None) -> list[Route]:
    """Every KServe route for these models, in match order (catch-alls last)."""
    grpc: list[Route] = grpc_guard_routes()
    rest: list[Route] = rest_guard_routes()
    for route in sorted(routes, key=lambda r: r.model_id):
        model_grpc, model_rest = model_routes(route, policy)
        grpc.extend(model_grpc)
        rest.extend(model_rest)
    return [*grpc, *rest, *kserve_catch_all()]


# --- route configurations --------------------------------------------------------------------


def _cors_policy(origins: Sequence[str]) -> dict[str, Any]:
    matchers = [{"safe_regex": {"regex": ".*"}} if o == "*" else {"exact": o} for o in origins]
    return typed(
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        allow_origin_string_match=matchers,
        allow_methods="GET, POST, PATCH, DELETE, OPTIONS",
        allow_headers=(
            "authorization, content-type, x-api-key, x-request-id, traceparent, tracestate, grpc-timeout, "
            f"{MODEL_HEADER}, {VERSION_HEADER}, {names.RETRY_HEADER}"
        ),
        expose_headers=(
            "x-request-id, retry-after, x-ratelimit-remaining, x-ratelimit-reset, grpc-status, grpc-message"
        ),
        max_age="600",
    )


def public_route_config(
    kserve: Sequence[Route], *, cors_origins: Sequence[str] = ("*",), rest_timeout_s: float = REST_TIMEOUT_S
) -> dict[str, Any]:
    """RouteConfiguration `public`: the fixed API routes, then KServe's (`kserve_routes(...)`), then not-found."""
    return {
        "name": names.PUBLIC,
        # The inline OpenAPI document and docs page (doc_routes) are larger than Envoy's 4 KB default.
        "max_direct_response_body_size_bytes": api_docs.max_body_bytes(),
        "virtual_hosts": [
            {
                "name": names.PUBLIC,
                "domains": ["*"],
                "routes": [*fixed_routes(rest_timeout_s), *kserve, not_found_route()],
                # Scrubbed at the end too: a JWT caller's stray API key never reaches a service.
                "request_headers_to_remove": [names.API_KEY_HEADER],
                "typed_per_filter_config": {names.CORS_FILTER: _cors_policy(cors_origins)},
            }
        ],
    }


def mesh_route_config(kserve: Sequence[Route]) -> dict[str, Any]:
    """RouteConfiguration `mesh`: KServe only (the gateway's Infer and batch workers), then not-found."""
    return {
        "name": names.MESH,
        "virtual_hosts": [{"name": names.MESH, "domains": ["*"], "routes": [*kserve, not_found_route()]}],
    }
