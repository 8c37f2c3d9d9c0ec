"""The Envoy renderer: both profiles validate with the real binary, and the committed copies are fresh."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from services.edge.devkeys import DevIssuer
from services.edge.envoy_config import (
    EnvoyParams,
    descriptor_set_bytes,
    render_config,
    render_yaml,
    write_defaults,
)
from tests.support.envoy import validate_config


def _hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


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
    names = [f["name"] for f in _hcm(render_config(EnvoyParams()))["http_filters"]]
    assert names == [
        "envoy.filters.http.cors",
        "servegrid.header_scrub",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.ext_authz",
        "envoy.filters.http.rbac",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.buffer",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]


def test_profiles_differ_only_in_parameters() -> None:
    local = render_config(EnvoyParams.for_profile("local"))
    kube = render_config(EnvoyParams.for_profile("kubernetes"))
    local_jwt = _hcm(local)["http_filters"][2]["typed_config"]["providers"]["servegrid"]
    kube_jwt = _hcm(kube)["http_filters"][2]["typed_config"]["providers"]["servegrid"]
    assert "local_jwks" in local_jwt and "remote_jwks" in kube_jwt
    assert "audiences" not in kube_jwt  # audience is rbac's job, so a wrong one is 403
    kube_clusters = {c["name"]: c for c in kube["static_resources"]["clusters"]}
    assert kube_clusters["jwks"]["transport_socket"]["name"] == "envoy.transport_sockets.tls"
    for name in ("gateway", "router", "registry", "edge"):
        options = kube_clusters[name]["typed_extension_protocol_options"]
        assert "http2_protocol_options" in str(options), name
    assert [f["name"] for f in _hcm(local)["http_filters"]] == [f["name"] for f in _hcm(kube)["http_filters"]]


def test_rate_limits_fail_open_unless_told_otherwise() -> None:
    def deny(params: EnvoyParams) -> bool:
        (ratelimit,) = [f for f in _hcm(render_config(params))["http_filters"] if f["name"].endswith("ratelimit")]
        return bool(ratelimit["typed_config"]["failure_mode_deny"])

    assert deny(EnvoyParams()) is False
    assert deny(EnvoyParams(ratelimit_fail_closed=True)) is True


def test_descriptor_set_carries_the_error_details_for_convert_grpc_status() -> None:
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set_bytes(EnvoyParams()))
    names = {f.name for f in fds.file}
    assert {"google/rpc/error_details.proto", "servegrid/gateway/v1/gateway.proto"} <= names
