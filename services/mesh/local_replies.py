"""Envoy's own replies in the services' error shape: the listeners' local_reply_config.

Every reply Envoy writes itself (a filter's denial, a direct response, an upstream it could not reach)
goes through these mappers, which give it the error shape of services/mesh/replies.py in each caller's
form (gRPC, KServe v2 REST, servegrid REST). The first mapper that matches wins, so the narrow ones
come first; CEL filters (on response.code_details) run only after a cheap status or flag filter.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from typing import Any

from google.rpc import code_pb2

from services.mesh import quota, replies
from services.mesh.auth import (
    JWT_METADATA_KEY,
    admin_paths,
    subject_bad_chars,
    subject_too_long,
    tenant_chars,
    tenant_too_long,
)
from services.mesh.names import JWT_FILTER, MAX_NAME_BYTES, MODEL_HEADER, SUBJECT_HEADER, TENANT_HEADER
from services.mesh.params import EnvoyParams
from services.mesh.routes import NOT_FOUND_ROUTE, header, typed


def _header_filter(name: str, match: dict[str, Any]) -> dict[str, Any]:
    return {"header_filter": {"header": {"name": name, **match}}}


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
                    header("grpc-status", str(refusal.grpc_code)),
                    header("grpc-status-details-bin", refusal.grpc_status_details),
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


def _subject_cases() -> list[_Case]:
    """RBAC's 403 for a subject no header can carry (auth._subject_valid) is a bad token: 401."""
    bad_subject = {
        "or_filter": {
            "filters": [
                _header_filter(SUBJECT_HEADER, {"string_match": subject_bad_chars()}),
                _header_filter(SUBJECT_HEADER, {"string_match": subject_too_long()}),
            ]
        }
    }
    message = f"the token's sub claim must be 1-{MAX_NAME_BYTES} printable ASCII characters; get another token"
    refusal = replies.Refusal(401, code_pb2.UNAUTHENTICATED, "UNAUTHENTICATED_TOKEN_INVALID", message)
    return [_Case((_status_is(403), bad_subject), refusal)]


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
    """CEL: the request's path is one rbac keeps for the admin role (auth.admin_paths, read, not repeated)."""
    tests = []
    for rule in admin_paths()["or_rules"]["rules"]:
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
        _Case((_status_is(429),), replies.RATE_LIMITED, headers=tuple(quota.reply_headers(params))),
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


def local_reply_config(params: EnvoyParams) -> dict[str, Any]:
    """Envoy's own replies in the services' error shape (see _case_mappers). Not mapped: replies that
    already have it (the API-key check's denials, the routes' direct responses) and 2xx."""
    cases = [*_subject_cases(), *_token_cases(), *_permission_cases(params), *_request_cases(params)]
    return {
        "mappers": [
            *_tenant_reply_mappers(params.tenant_claim),  # first: RBAC's 403 for a bad tenant is a 401
            *(mapper for case in cases for mapper in _case_mappers(case)),
            *_kserve_no_backend_mappers(),
            *(mapper for case in _availability_cases() for mapper in _case_mappers(case)),
        ]
    }


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
                _header_filter(TENANT_HEADER, {"string_match": tenant_chars(), "invert_match": True}),
                _header_filter(TENANT_HEADER, {"string_match": tenant_too_long()}),
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
                header("grpc-status", str(code_pb2.UNAUTHENTICATED)),
                header("grpc-status-details-bin", replies.status_details(code_pb2.UNAUTHENTICATED, message, reason)),
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
