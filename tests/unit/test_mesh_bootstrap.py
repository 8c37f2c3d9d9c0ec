"""The Envoy bootstrap renderer: both profiles validate with the real binary, and the committed copies are fresh."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from services.edge.devkeys import DevIssuer
from services.mesh import names
from services.mesh.bootstrap import (
    EnvoyParams,
    descriptor_set_bytes,
    render_config,
    render_yaml,
    write_defaults,
)
from services.mesh.quota import QUOTA_CLUSTER, QUOTA_FILTER
from tests.support.envoy import chart_descriptors, validate_config


def _hcm(config: dict[str, Any], listener: str = "public") -> dict[str, Any]:
    (found,) = [x for x in config["static_resources"]["listeners"] if x["name"] == listener]
    return found["filter_chains"][0]["filters"][0]["typed_config"]


def _filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [f for f in _hcm(config)["http_filters"] if f["name"] == name]
    return found["typed_config"]


@pytest.fixture(scope="module")
def jwks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return DevIssuer.generate().write(tmp_path_factory.mktemp("jwks"))


@pytest.mark.parametrize("profile", ["local", "kubernetes"])
def test_profile_passes_envoy_validate(profile: str, jwks: Path, tmp_path: Path) -> None:
    # The local profile also trusts the edge's exchanged tokens: it needs that JWKS too.
    overrides = (
        {"jwks_file": str(jwks), "token_jwks_file": str(jwks)}
        if profile == "local"
        else {"descriptor_file": chart_descriptors(tmp_path)}  # what the chart's ConfigMap mounts
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(EnvoyParams.for_profile(profile, **overrides)))  # type: ignore[arg-type]
    result = validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_committed_configs_match_the_renderer() -> None:
    assert write_defaults(check=True) == 0


def test_filters_run_in_the_order_that_keeps_identity_trustworthy() -> None:
    config = render_config(EnvoyParams())
    assert [f["name"] for f in _hcm(config)["http_filters"]] == [
        "envoy.filters.http.cors",
        "servegrid.header_scrub",
        "envoy.filters.http.grpc_field_extraction",
        "envoy.filters.http.lua",  # the model name, before any per-route auth decision
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.rbac",
        "servegrid.ratelimit_route",  # the route's rate-limit name, a client's copy removed
        "envoy.filters.http.rate_limit_quota",  # no call per request: enforces the edge's leases
        "envoy.filters.http.buffer",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.grpc_stats",  # counts by grpc-status, what the SLO rules read
        "envoy.filters.http.router",
    ]
    assert [f["name"] for f in _hcm(config, "mesh")["http_filters"]] == [
        "envoy.filters.http.grpc_field_extraction",
        "envoy.filters.http.lua",
        "envoy.filters.http.grpc_stats",
        "envoy.filters.http.router",
    ]


def test_routes_come_over_ads_for_both_listeners() -> None:
    config = render_config(EnvoyParams())
    for listener in ("public", "mesh"):
        hcm = _hcm(config, listener)
        assert "route_config" not in hcm
        assert hcm["rds"] == {
            "config_source": {"ads": {}, "resource_api_version": "V3"},
            "route_config_name": listener,
        }
        flags = [m["filter"] for m in hcm["local_reply_config"]["mappers"]]
        assert "UH" in str(flags)
    ads = config["dynamic_resources"]["ads_config"]
    assert ads["api_type"] == "GRPC" and ads["transport_api_version"] == "V3"
    assert ads["grpc_services"][0]["envoy_grpc"]["cluster_name"] == names.XDS_CLUSTER
    assert ads["set_node_on_first_message_only"] is True
    assert config["dynamic_resources"]["cds_config"] == {"ads": {}, "resource_api_version": "V3"}


def test_header_scrub_removes_identity_but_lets_the_routing_headers_through() -> None:
    mutations = _filter(render_config(EnvoyParams()), names.HEADER_SCRUB_FILTER)["mutations"]["request_mutations"]
    matchers = [m["remove_on_match"]["key_matcher"] for m in mutations]
    exact = {m["exact"] for m in matchers if "exact" in m}
    assert {"x-servegrid-tenant", "x-servegrid-subject", "x-servegrid-roles", "x-servegrid-auth"} <= exact
    assert {"prefix": "x-jwt-"} in matchers
    for kept in (names.MODEL_HEADER, names.VERSION_HEADER, names.RETRY_HEADER):
        assert kept not in exact
        assert not any(kept.startswith(m.get("prefix", "\0")) for m in matchers)


def test_the_admin_api_needs_the_admin_role_by_path_listener_wide() -> None:
    policies = _filter(render_config(EnvoyParams()), names.RBAC_FILTER)["rules"]["policies"]
    admin_paths = policies["admin-only"]["permissions"][0]["or_rules"]["rules"]
    assert [p["url_path"]["path"] for p in admin_paths] == [
        {"prefix": "/servegrid.registry.v1."},
        {"prefix": "/v1/admin/"},
        {"prefix": "/servegrid.router.v1."},  # the router admin API: drains, backends, the route table
        {"prefix": "/v1/router/"},
        {"exact": "/inference.GRPCInferenceService/ModelStatistics"},  # every tenant's counts
    ]
    assert "admin" in str(policies["admin-only"]["principals"])
    assert policies["authenticated-tenant"]["permissions"] == [{"not_rule": policies["admin-only"]["permissions"][0]}]


def test_profiles_differ_only_in_parameters() -> None:
    local = render_config(EnvoyParams.for_profile("local"))
    kube = render_config(EnvoyParams.for_profile("kubernetes"))
    local_jwt = _filter(local, names.JWT_FILTER)["providers"]["servegrid"]
    kube_jwt = _filter(kube, names.JWT_FILTER)["providers"]["servegrid"]
    assert "local_jwks" in local_jwt and "remote_jwks" in kube_jwt
    assert "audiences" not in kube_jwt  # audience is rbac's job, so a wrong one is 403
    kube_clusters = {c["name"]: c for c in kube["static_resources"]["clusters"]}
    assert "router" not in kube_clusters
    assert kube_clusters["jwks"]["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    for name in ("gateway", "registry", "edge", "xds"):
        options = kube_clusters[name]["typed_extension_protocol_options"]
        assert "http2_protocol_options" in str(options), name
    xds = kube_clusters["xds"]
    assert xds["type"] == "STRICT_DNS"  # a headless Service: every router replica
    assert xds["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"] == {
        "address": "servegrid-router",
        "port_value": 50052,
    }
    assert [f["name"] for f in _hcm(local)["http_filters"]] == [f["name"] for f in _hcm(kube)["http_filters"]]
    for config in (local, kube):  # admin can stop Envoy: loopback only
        assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    kube_listeners = {x["name"] for x in kube["static_resources"]["listeners"]}
    assert kube_listeners == {"public", "mesh", "stats"}


def test_the_router_override_names_the_xds_server() -> None:
    params = EnvoyParams.for_profile("local", router="127.0.0.1:6000")
    assert params.xds == ("127.0.0.1:6000",)
    two = EnvoyParams.for_profile("local", xds=("127.0.0.1:6000", "127.0.0.1:6001"))
    (xds,) = [c for c in render_config(two)["static_resources"]["clusters"] if c["name"] == "xds"]
    assert len(xds["load_assignment"]["endpoints"][0]["lb_endpoints"]) == 2


def test_rate_limits_fail_open_unless_told_otherwise() -> None:
    def unassigned(params: EnvoyParams) -> set[str]:
        quota = _filter(render_config(params), QUOTA_FILTER)["bucket_matchers"]
        actions = [quota["on_no_match"]["action"], quota["matcher_list"]["matchers"][0]["on_match"]["action"]]
        return {a["typed_config"]["no_assignment_behavior"]["fallback_rate_limit"]["blanket_rule"] for a in actions}

    assert unassigned(EnvoyParams()) == {"ALLOW_ALL"}
    assert unassigned(EnvoyParams(ratelimit_fail_closed=True)) == {"DENY_ALL"}


def test_quota_denials_speak_the_api_error_shape() -> None:
    quota = _filter(render_config(EnvoyParams()), QUOTA_FILTER)
    assert quota["rlqs_server"]["envoy_grpc"]["cluster_name"] == QUOTA_CLUSTER
    rest = quota["bucket_matchers"]["on_no_match"]["action"]["typed_config"]
    grpc_ = quota["bucket_matchers"]["matcher_list"]["matchers"][0]["on_match"]["action"]["typed_config"]
    assert rest["bucket_id_builder"] == grpc_["bucket_id_builder"]  # one bucket, whatever the protocol
    assert set(rest["bucket_id_builder"]["bucket_id_builder"]) == {"tenant", "route"}
    body = json.loads(base64.b64decode(rest["deny_response_settings"]["http_body"]["value"]))
    assert body["code"] == 8 and body["details"][0]["reason"] == "RATE_LIMITED"
    added = rest["deny_response_settings"]["response_headers_to_add"]
    rest_headers = {h["header"]["key"]: h["header"]["value"] for h in added}
    assert rest_headers["content-type"] == "application/json" and rest_headers["x-ratelimit-remaining"] == "0"
    assert grpc_["deny_response_settings"]["grpc_status"]["code"] == 8
    grpc_headers = {h["header"]["key"] for h in grpc_["deny_response_settings"]["response_headers_to_add"]}
    assert "grpc-status-details-bin" in grpc_headers and "content-type" not in grpc_headers
    # retry-after counts down to the window's end, added by the 429 local-reply mappers only (a
    # response mutation would evaluate its CEL on every response).
    tag = _filter(render_config(EnvoyParams()), "servegrid.ratelimit_route")
    assert "response_mutations" not in tag["mutations"]
    hcm = render_config(EnvoyParams(ratelimit_window_s=3600))["static_resources"]["listeners"][0]
    mappers = hcm["filter_chains"][0]["filters"][0]["typed_config"]["local_reply_config"]["mappers"]
    limited = [m for m in mappers if "429" in json.dumps(m["filter"])]
    assert len(limited) == 3  # gRPC, KServe REST, servegrid REST
    for mapper in limited:
        resets = {h["header"]["key"]: h["header"]["value"] for h in mapper["headers_to_add"]}
        assert "3600 - int(request.time) % 3600" in resets["retry-after"]
        assert resets["x-ratelimit-reset"] == resets["retry-after"]


def test_descriptor_set_carries_the_error_details_for_convert_grpc_status() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes(EnvoyParams()))
    names_ = {f.name for f in fds.file}
    assert {"google/rpc/error_details.proto", "servegrid/gateway/v1/gateway.proto"} <= names_


def test_descriptor_set_can_come_from_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "d.binpb"
    path.write_bytes(descriptor_pb2.FileDescriptorSet().SerializeToString())
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes(EnvoyParams(descriptors=path)))
    assert "servegrid/gateway/v1/gateway.proto" not in {f.name for f in fds.file}


# --- Envoy's own replies ---------------------------------------------------------------------


def _mappers(params: EnvoyParams | None = None) -> list[dict[str, Any]]:
    return _hcm(render_config(params or EnvoyParams()))["local_reply_config"]["mappers"]


def _grpc_details(mapper: dict[str, Any]) -> tuple[str, str] | None:
    headers = {h["header"]["key"]: h["header"]["value"] for h in mapper.get("headers_to_add", [])}
    if "grpc-status-details-bin" not in headers or "grpc-status" not in headers:
        return None
    return headers["grpc-status"], headers["grpc-status-details-bin"]


def test_grpc_local_replies_say_in_grpc_message_what_their_details_say() -> None:
    """grpc_status.rpc_status.from_call refuses a Status whose code or message differ from the call's:
    each gRPC mapper's body (Envoy's grpc-message) is exactly its Status message, and has no formatter."""
    from google.rpc import error_details_pb2, status_pb2

    reasons = set()
    for mapper in _mappers():
        found = _grpc_details(mapper)
        if found is None:
            continue
        code, encoded = found
        status = status_pb2.Status.FromString(base64.b64decode(encoded))
        message = mapper["body_format_override"]["text_format_source"]["inline_string"]
        assert (str(status.code), status.message) == (code, message)
        assert "%" not in message and not message.startswith("{")
        info = error_details_pb2.ErrorInfo()
        (detail,) = status.details
        assert detail.Unpack(info) and info.domain == names.ERROR_DOMAIN
        reasons.add(info.reason)
    assert {
        "UNAUTHENTICATED_TOKEN_EXPIRED",
        "UNAUTHENTICATED_MISSING",
        "UNAUTHENTICATED_TOKEN_INVALID",
        "AUDIENCE_MISMATCH",
        "ADMIN_ROLE_REQUIRED",
        "PERMISSION_DENIED",
        "UNKNOWN_METHOD",
        "REQUEST_TOO_LARGE",
        "RATE_LIMITED",
        "API_KEY_CHECK_UNAVAILABLE",
        "SERVICE_UNAVAILABLE",
    } <= reasons


def test_every_refusal_comes_in_each_callers_shape() -> None:
    """REST mappers write the services' JSON (reason, domain), KServe REST ones `{"error"}` on /v2."""
    mappers = _mappers()
    rest = [m for m in mappers if "details" in m.get("body_format_override", {}).get("json_format", {})]
    kserve = [m for m in mappers if set(m.get("body_format_override", {}).get("json_format", {})) == {"error"}]
    reasons = {m["body_format_override"]["json_format"]["details"][0]["reason"] for m in rest}
    assert {
        "UNAUTHENTICATED_TOKEN_EXPIRED",
        "UNAUTHENTICATED_TOKEN_INVALID",
        "AUDIENCE_MISMATCH",
        "ADMIN_ROLE_REQUIRED",
        "PERMISSION_DENIED",
        "UNKNOWN_PATH",
        "MALFORMED_REQUEST",
        "REQUEST_TOO_LARGE",
        "RATE_LIMITED",
        "API_KEY_CHECK_UNAVAILABLE",
        "SERVICE_UNAVAILABLE",
    } <= reasons
    for mapper in rest + kserve:
        assert mapper["body_format_override"]["content_type"] == "application/json"
        assert 400 <= mapper["status_code"] < 600
    assert len(kserve) >= 8  # one per refusal a KServe caller can meet, and the no-backend one


def test_kserve_no_backend_replies_keep_naming_the_model() -> None:
    mappers = _mappers()
    kserve = [m for m in mappers if "UH" in json.dumps(m["filter"]) and names.MODEL_HEADER in json.dumps(m["filter"])]
    assert (
        kserve and "has no healthy backend" in kserve[0]["body_format_override"]["text_format_source"]["inline_string"]
    )
    rest = [
        m
        for m in mappers
        if m.get("body_format_override", {}).get("json_format", {}).get("error", "").startswith("no healthy")
    ]
    assert rest and rest[0]["status_code"] == 503
    # Before the generic unreachable-service mappers, which would otherwise take them.
    generic = next(i for i, m in enumerate(mappers) if "SERVICE_UNAVAILABLE" in json.dumps(m))
    assert mappers.index(kserve[0]) < generic and mappers.index(rest[0]) < generic


def test_reply_messages_follow_the_parameters() -> None:
    params = EnvoyParams(max_request_body_bytes=1234, audience="other-api", admin_role="operator")
    text = json.dumps(_mappers(params))
    assert "larger than 1234 bytes" in text
    assert "aud includes 'other-api'" in text and '\\"other-api\\" in' in text  # the message and the CEL check
    assert "needs the 'operator' role" in text


# --- tracing and request ids -------------------------------------------------------------------


def _clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def _address(cluster: dict[str, Any]) -> dict[str, Any]:
    address: dict[str, Any] = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
    return address["socket_address"]


def test_no_tracer_unless_a_collector_is_given() -> None:
    for profile in ("local", "kubernetes"):
        config = render_config(EnvoyParams.for_profile(profile))
        assert all("tracing" not in _hcm(config, listener) for listener in ("public", "mesh"))
        assert names.OTEL_CLUSTER not in _clusters(config)


def test_with_a_collector_both_listeners_trace_and_export_to_it() -> None:
    config = render_config(EnvoyParams(otlp_endpoint="otel-collector:4317", trace_sampling_percent=25.0))
    for listener in ("public", "mesh"):
        tracing = _hcm(config, listener)["tracing"]
        provider = tracing["provider"]
        assert provider["name"] == "envoy.tracers.opentelemetry"
        assert provider["typed_config"]["service_name"] == "servegrid-envoy"
        assert provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == names.OTEL_CLUSTER
        # A span per upstream call, whose id is the traceparent the gateway and Triton continue.
        assert tracing["spawn_upstream_span"] is True
        assert tracing["random_sampling"] == {"value": 25.0}
    otel = _clusters(config)[names.OTEL_CLUSTER]
    assert _address(otel) == {"address": "otel-collector", "port_value": 4317}
    assert "http2_protocol_options" in str(otel["typed_extension_protocol_options"])  # OTLP/gRPC
    assert "transport_socket" not in otel


@pytest.mark.parametrize(
    ("endpoint", "address", "sni"),
    [
        ("http://collector.monitoring:4317", {"address": "collector.monitoring", "port_value": 4317}, None),
        ("https://otlp.example.com", {"address": "otlp.example.com", "port_value": 443}, "otlp.example.com"),
    ],
)
def test_the_collector_may_be_given_as_an_otlp_url(endpoint: str, address: dict[str, Any], sni: str | None) -> None:
    otel = _clusters(render_config(EnvoyParams(otlp_endpoint=endpoint)))[names.OTEL_CLUSTER]
    assert _address(otel) == address
    assert (otel["transport_socket"]["typed_config"]["sni"] if sni else otel.get("transport_socket")) == sni


def test_a_traced_config_passes_envoy_validate(jwks: Path, tmp_path: Path) -> None:
    params = EnvoyParams.for_profile(
        "local", jwks_file=str(jwks), token_jwks_file=str(jwks), otlp_endpoint="http://127.0.0.1:4317"
    )
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(params))
    result = validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_response_carries_the_request_id_that_the_access_log_records() -> None:
    config = render_config(EnvoyParams())
    for listener in ("public", "mesh"):
        hcm = _hcm(config, listener)
        assert hcm["generate_request_id"] and hcm["always_set_request_id_in_response"]
        # The mesh listener keeps the id the gateway or a batch worker forwards: one id across both hops.
        assert hcm["preserve_external_request_id"]
        logged = hcm["access_log"][0]["typed_config"]["log_format"]["json_format"]
        assert logged["request_id"] == "%REQ(X-REQUEST-ID)%" and logged["trace_id"] == "%TRACE_ID%"
