"""Who may call: the identity header scrub, jwt_authn (the identity provider's tokens and the edge's
exchanged ones), ext_authz for plain API keys, and the listener-wide RBAC policy (tenant rule, audience,
admin role by path). Everything here runs in Envoy, per request, with no call to a service except
ext_authz for a request that brings an API key instead of a token."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from services.mesh import api_docs, names
from services.mesh.names import (
    EXT_AUTHZ_FILTER,
    JWT_FILTER,
    ROLES_HEADER,
    SUBJECT_HEADER,
    TENANT_HEADER,
)
from services.mesh.params import EnvoyParams
from services.mesh.routes import duration, typed

JWT_PROVIDER = "servegrid"
TOKEN_PROVIDER = "servegrid-edge"  # tokens the edge minted in exchange for an API key
JWT_METADATA_KEY = "jwt_payload"


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


def tenant_chars() -> dict[str, Any]:
    return {"safe_regex": {"regex": f"{names.TENANT_CHARS}+"}}


def tenant_too_long() -> dict[str, Any]:
    # One byte range per position keeps RE2's program small; the charset check makes bytes = characters.
    return {"safe_regex": {"regex": f"[\\x00-\\x7f]{{{names.TENANT_MAX_LENGTH + 1},}}"}}


def subject_bad_chars() -> dict[str, Any]:
    """A subject (the JWT's sub, copied into x-servegrid-subject) with anything but printable ASCII:
    CR/LF or NUL would make an invalid upstream header (a 503), so it is a bad token instead."""
    return {"safe_regex": {"regex": "(?s).*[^\\x20-\\x7e].*"}}


def subject_too_long() -> dict[str, Any]:
    """Longer than names.MAX_NAME_BYTES: a header the services' metadata limits would refuse."""
    return {"safe_regex": {"regex": f"(?s).{{{names.MAX_NAME_BYTES + 1},}}"}}


def _subject_valid() -> dict[str, Any]:
    """No subject header (an IdP token without sub), or one a header can carry: refused as 401
    UNAUTHENTICATED_TOKEN_INVALID (local_replies)."""
    bad = [
        {"header": {"name": SUBJECT_HEADER, "string_match": subject_bad_chars()}},
        {"header": {"name": SUBJECT_HEADER, "string_match": subject_too_long()}},
    ]
    return {"not_id": {"or_ids": {"ids": bad}}}


def _tenant_valid(params: EnvoyParams) -> dict[str, Any]:
    """The tenant is a plain tenant id (names.TENANT_PATTERN), in the header and, for a JWT, in the claim.

    A credential without one cannot be rate limited or attributed. The claim is checked as well as the
    header because claim_to_headers writes a number claim as its digits (a valid-looking id) and a
    list or object as base64 of its JSON; a metadata string match only matches a claim that is a string.
    Checked in Envoy, per request, with no call to a service. Refused as 401 (local_replies: _tenant_cases)."""
    header = {
        "and_ids": {
            "ids": [
                {"header": {"name": TENANT_HEADER, "string_match": tenant_chars()}},
                {"not_id": {"header": {"name": TENANT_HEADER, "string_match": tenant_too_long()}}},
            ]
        }
    }
    claim = {
        "and_ids": {
            "ids": [
                _jwt_claim(params.tenant_claim, {"string_match": tenant_chars()}),
                {"not_id": _jwt_claim(params.tenant_claim, {"string_match": tenant_too_long()})},
            ]
        }
    }
    return {"and_ids": {"ids": [header, {"or_ids": {"ids": [_no_jwt(), claim]}}]}}


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


def admin_paths() -> dict[str, Any]:
    """The registry and router admin APIs (each one's gRPC package and REST prefix) and KServe's
    ModelStatistics: paths as the client sent them, normalized by the HCM; the transcoder runs after RBAC."""
    prefixes = (
        names.REGISTRY_PACKAGE_PREFIX,
        names.ADMIN_REST_PREFIX,
        names.ROUTER_PACKAGE_PREFIX,
        names.ROUTER_REST_PREFIX,
    )
    rules: list[dict[str, Any]] = [{"url_path": {"path": {"prefix": p}}} for p in prefixes]
    # Triton's statistics count every tenant's requests to a model: operators only. (Over REST the
    # statistics paths are not served at all: routes.REST_NOT_SERVED.)
    rules.append({"url_path": {"path": {"exact": f"/{names.KSERVE_SERVICE}/ModelStatistics"}}})
    return {"or_rules": {"rules": rules}}


def rbac_rules(params: EnvoyParams) -> dict[str, Any]:
    """ALLOW when a policy matches: any authenticated tenant off the admin paths, admins on them."""
    tenant = [_audience_ok(params.audience), _tenant_valid(params), _subject_valid()]
    return {
        "action": "ALLOW",
        "policies": {
            "authenticated-tenant": {
                "permissions": [{"not_rule": admin_paths()}],
                "principals": [{"and_ids": {"ids": tenant}}],
            },
            "admin-only": {
                "permissions": [admin_paths()],
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


def header_scrub() -> dict[str, Any]:
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


def jwt_filter(params: EnvoyParams) -> dict[str, Any]:
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
                # The API's description and docs page (routes.doc_routes): public, like health.
                {"match": {"path": api_docs.OPENAPI_PATH}},
                {"match": {"path": api_docs.DOCS_PATH}},
                # A token, when sent, must verify; without one the request goes on to the API-key
                # check, which refuses it unless a valid x-api-key is there.
                {"match": {"prefix": "/"}, "requires": {"requires_any": requires_any}},
            ],
        ),
    }


def ext_authz_filter(params: EnvoyParams) -> dict[str, Any]:
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
            allowed_headers={"patterns": [{"exact": names.API_KEY_HEADER}, {"exact": "content-type"}]},
            # Only requests without a verified JWT need an API key, so only they pay for the call.
            filter_enabled_metadata={
                "filter": JWT_FILTER,
                "path": [{"key": JWT_METADATA_KEY}],
                "value": {"present_match": True},
                "invert": True,
            },
        ),
    }
