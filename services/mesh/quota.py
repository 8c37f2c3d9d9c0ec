"""Rate limits with no call per request: Envoy's rate_limit_quota filter, the edge its quota server.

Buckets are (tenant, route): the tenant Envoy established, the rate-limit name each limited route tags
its requests with (routes._rate_limits). The edge hands each Envoy token-bucket leases over one stream
and charges them to the window's Redis counters in advance (services/edge/quota.py)."""

from __future__ import annotations

import base64
from typing import Any

from google.rpc import code_pb2

from services.mesh import replies
from services.mesh.names import RATELIMIT_ROUTE_HEADER, RATELIMIT_TAG_FILTER, TENANT_HEADER
from services.mesh.params import EnvoyParams
from services.mesh.routes import header, typed

QUOTA_FILTER = "envoy.filters.http.rate_limit_quota"
QUOTA_CLUSTER = "edge_quota"  # its own cluster: one long-lived stream per Envoy, its own stats
# Envoy's response code details on a quota denial (rate_limit_quota filter, 1.40).
QUOTA_DENIED_DETAILS = "rate_limited_by_quota"


def _header_input(header: str) -> dict[str, Any]:
    return {
        "custom_value": {
            "name": header,
            "typed_config": typed("envoy.type.matcher.v3.HttpRequestHeaderMatchInput", header_name=header),
        }
    }


def _deny_settings(grpc: bool) -> dict[str, Any]:
    """The 429 / RESOURCE_EXHAUSTED reply in the API's error shape (services/mesh/replies.py).

    Envoy sends these bytes as they are (no formatter), and uses a gRPC message, when one is set, as the
    HTTP body too: so gRPC and REST callers get separate settings. retry-after and x-ratelimit-reset
    need the clock: reply_headers gives them."""
    code = code_pb2.RESOURCE_EXHAUSTED
    headers = [header("x-ratelimit-remaining", "0")]
    settings: dict[str, Any] = {"http_status": {"code": 429}}
    if grpc:
        settings["grpc_status"] = {"code": code, "message": replies.RATE_LIMITED.message}
        details = replies.status_details(code, replies.RATE_LIMITED.message, replies.RATE_LIMITED.reason)
        headers.append(header("grpc-status-details-bin", details))
    else:
        body = replies.error_json(code, replies.RATE_LIMITED.message, replies.RATE_LIMITED.reason)
        settings["http_body"] = {"value": base64.b64encode(body.encode()).decode()}
        headers.append(header("content-type", "application/json"))
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


def reply_headers(params: EnvoyParams) -> list[dict[str, Any]]:
    """retry-after and x-ratelimit-reset (draft 03: seconds) on a quota denial: seconds to the window's
    end, from Envoy's clock (windows are epoch-aligned). CEL, because the quota filter's own headers are
    static. Added by the 429 local-reply mapper, so only a denial evaluates them (as a response header
    mutation they cost ~5 µs of Envoy CPU on every response)."""
    window = params.ratelimit_window_s
    seconds = f"%CEL(response.code_details == '{QUOTA_DENIED_DETAILS}' ? {window} - int(request.time) % {window} : '')%"
    return [header(key, seconds) for key in ("retry-after", "x-ratelimit-reset")]


def ratelimit_filters(params: EnvoyParams) -> list[dict[str, Any]]:
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
