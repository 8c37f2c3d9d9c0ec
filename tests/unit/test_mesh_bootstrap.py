"""The Envoy bootstrap renderer: both profiles validate with the real binary, and the committed copies are fresh."""

from __future__ import annotations

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
from tests.support.envoy import validate_config


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
    overrides = {"jwks_file": str(jwks)} if profile == "local" else {}
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
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.buffer",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    assert [f["name"] for f in _hcm(config, "mesh")["http_filters"]] == [
        "envoy.filters.http.grpc_field_extraction",
        "envoy.filters.http.lua",
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
    assert [p["url_path"]["path"]["prefix"] for p in admin_paths] == ["/servegrid.registry.v1.", "/v1/admin/"]
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
    def deny(params: EnvoyParams) -> bool:
        return bool(_filter(render_config(params), names.RATELIMIT_FILTER)["failure_mode_deny"])

    assert deny(EnvoyParams()) is False
    assert deny(EnvoyParams(ratelimit_fail_closed=True)) is True


def test_descriptor_set_carries_the_error_details_for_convert_grpc_status() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes(EnvoyParams()))
    names_ = {f.name for f in fds.file}
    assert {"google/rpc/error_details.proto", "servegrid/gateway/v1/gateway.proto"} <= names_


def test_descriptor_set_can_come_from_anywhere(tmp_path: Path) -> None:
    path = tmp_path / "d.binpb"
    path.write_bytes(descriptor_pb2.FileDescriptorSet().SerializeToString())
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes(EnvoyParams(descriptors=path)))
    assert "servegrid/gateway/v1/gateway.proto" not in {f.name for f in fds.file}
