"""The xDS resources from a route table: clusters, endpoint health, routes — and Envoy itself accepts them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from servegrid.registry.v1 import registry_pb2

from services.edge.devkeys import DevIssuer
from services.mesh import names
from services.mesh.bootstrap import EnvoyParams, render_config
from services.mesh.resources import DRAINING, HEALTHY, UNHEALTHY, build_snapshot
from services.mesh.routes import (
    RATELIMIT_ROUTE_HEADER,
    RATELIMIT_TAG_FILTER,
    KservePolicy,
    kserve_routes,
    public_route_config,
)
from services.router.settings import RouterSettings
from services.router.table import RouteTable
from services.router.xds import TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_ROUTE, XdsSnapshot
from tests.support.envoy import validate_config

PRODUCTION, STAGING = registry_pb2.STAGE_PRODUCTION, registry_pb2.STAGE_STAGING


def _backend(n: int, http: bool = True) -> registry_pb2.RouteBackend:
    return registry_pb2.RouteBackend(
        backend_id=f"b{n}",
        address=f"127.0.0.1:{8000 + n}",
        weight=n,
        http_address=f"127.0.0.1:{9000 + n}" if http else "",
    )


def _version(
    version: int, stage: registry_pb2.Stage.ValueType, triton: str, weight: int, *backends: int
) -> registry_pb2.RouteVersion:
    return registry_pb2.RouteVersion(
        version=version,
        stage=stage,
        triton_model_name=triton,
        weight=weight,
        backends=[_backend(b, http=b != 3) for b in backends],
    )


def _routes() -> list[registry_pb2.Route]:
    affine = registry_pb2.Route(
        model_id="affine",
        versions=[
            _version(1, PRODUCTION, "affine_batched", 90, 1, 2),  # renamed in Triton
            _version(2, STAGING, "affine", 10, 2),  # the canary
            _version(3, STAGING, "affine", 0, 3),  # explicit version only; b3 has no HTTP address
        ],
        shadow=registry_pb2.RouteShadow(target=_version(4, STAGING, "affine_next", 0, 3), sample_rate=0.25),
        sticky_header="X-User-Id",
    )
    plain = registry_pb2.Route(
        model_id="plain",
        versions=[_version(1, PRODUCTION, "plain", 0, 1)],
        load_balancing=registry_pb2.LOAD_BALANCING_WEIGHTED,
    )
    staged = registry_pb2.Route(model_id="staged", versions=[_version(1, STAGING, "staged", 0, 1)])
    return [affine, plain, staged]


STATES = {
    ("b1", "affine_batched", ""): HEALTHY,
    ("b2", "affine_batched", ""): DRAINING,  # an operator drained b2
    ("b2", "affine", ""): DRAINING,
    ("b3", "affine", ""): UNHEALTHY,  # the model is not loaded on b3
    ("b1", "plain", ""): HEALTHY,
}


def _table(revision: int = 7) -> RouteTable:
    table = RouteTable()
    table.reset(_routes(), revision)
    return table


@pytest.fixture(scope="module")
def snapshot() -> XdsSnapshot:
    return build_snapshot(_table(), STATES, RouterSettings())


def _dict(snapshot: XdsSnapshot, type_url: str, name: str) -> dict[str, Any]:
    return json_format.MessageToDict(snapshot.resources[type_url][name], preserving_proto_field_name=True)


def _routes_of(snapshot: XdsSnapshot, config: str) -> dict[str, dict[str, Any]]:
    (vhost,) = _dict(snapshot, TYPE_ROUTE, config)["virtual_hosts"]
    return {r["name"]: r for r in vhost["routes"]}


def _lb_endpoints(snapshot: XdsSnapshot, cluster: str) -> dict[str, dict[str, Any]]:
    assignment = _dict(snapshot, TYPE_ENDPOINT, cluster)
    return {e["endpoint"]["hostname"]: e for group in assignment.get("endpoints", []) for e in group["lb_endpoints"]}


def test_one_cluster_per_model_version_and_protocol(snapshot: XdsSnapshot) -> None:
    expected = {"kserve|server|grpc", "kserve|server|http"}
    for model, versions in (("affine", (1, 2, 3, 4)), ("plain", (1,)), ("staged", (1,))):
        expected |= {f"kserve|{model}|v{v}|{p}" for v in versions for p in ("grpc", "http")}
    assert set(snapshot.resources[TYPE_CLUSTER]) == expected
    assert set(snapshot.resources[TYPE_ENDPOINT]) == expected
    assert set(snapshot.resources[TYPE_ROUTE]) == {"public", "mesh"}


def test_clusters_carry_balancing_ejection_breakers_and_metadata(snapshot: XdsSnapshot) -> None:
    settings = RouterSettings()
    cluster = _dict(snapshot, TYPE_CLUSTER, "kserve|affine|v1|grpc")
    assert cluster["type"] == "EDS" and "ads" in cluster["eds_cluster_config"]["eds_config"]
    assert cluster["lb_policy"] == "LEAST_REQUEST" and cluster["least_request_lb_config"]["choice_count"] == 2
    panic = snapshot.resources[TYPE_CLUSTER]["kserve|affine|v1|grpc"].common_lb_config  # type: ignore[attr-defined]
    assert panic.HasField("healthy_panic_threshold") and panic.healthy_panic_threshold.value == 0
    outlier = cluster["outlier_detection"]
    assert outlier["consecutive_gateway_failure"] == settings.eject_consecutive_failures
    assert outlier["consecutive_5xx"] == settings.breaker_consecutive_failures
    assert outlier["max_ejection_percent"] == 100
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    assert thresholds["retry_budget"]["budget_percent"]["value"] == pytest.approx(settings.retry_budget_ratio * 100)
    assert cluster["metadata"]["filter_metadata"]["servegrid"] == {
        "model_id": "affine",
        "version": "1",
        "triton_model_name": "affine_batched",
        "triton_model_version": "",
    }
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert options["explicit_http_config"]["http2_protocol_options"]["max_concurrent_streams"] == 1024
    assert _dict(snapshot, TYPE_CLUSTER, "kserve|plain|v1|grpc").get("lb_policy", "ROUND_ROBIN") == "ROUND_ROBIN"


def test_only_renamed_models_get_the_upstream_rename_filter(snapshot: XdsSnapshot) -> None:
    def filters(cluster: str) -> list[str]:
        options = _dict(snapshot, TYPE_CLUSTER, cluster)["typed_extension_protocol_options"]
        return [
            f["name"] for f in options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"].get("http_filters", [])
        ]

    for protocol in ("grpc", "http"):
        assert filters(f"kserve|affine|v1|{protocol}") == [
            "envoy.filters.http.lua",
            "envoy.filters.http.upstream_codec",
        ]
        assert filters(f"kserve|affine|v4|{protocol}")  # the shadow runs as affine_next
        assert filters(f"kserve|plain|v1|{protocol}") == []


def test_endpoint_health_follows_probes_and_drains(snapshot: XdsSnapshot) -> None:
    v1 = _lb_endpoints(snapshot, "kserve|affine|v1|grpc")
    assert {b: e["health_status"] for b, e in v1.items()} == {"b1": "HEALTHY", "b2": "DRAINING"}
    assert v1["b1"]["endpoint"]["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8001}
    assert (
        _lb_endpoints(snapshot, "kserve|affine|v1|http")["b1"]["endpoint"]["address"]["socket_address"]["port_value"]
        == 9001
    )
    assert _lb_endpoints(snapshot, "kserve|affine|v3|grpc")["b3"]["health_status"] == "UNHEALTHY"
    assert _lb_endpoints(snapshot, "kserve|affine|v3|http") == {}  # no HTTP address: 503
    assert (
        _lb_endpoints(snapshot, "kserve|staged|v1|grpc")["b1"].get("health_status", "UNKNOWN") == "UNKNOWN"
    )  # not probed yet
    assert _lb_endpoints(snapshot, "kserve|plain|v1|grpc")["b1"]["load_balancing_weight"] == 1  # WEIGHTED
    server = _lb_endpoints(snapshot, "kserve|server|grpc")
    assert {b: e["health_status"] for b, e in server.items()} == {"b1": "HEALTHY", "b2": "DRAINING", "b3": "UNHEALTHY"}
    assert set(_lb_endpoints(snapshot, "kserve|server|http")) == {"b1", "b2"}


def test_default_traffic_is_weighted_sticky_and_shadowed(snapshot: XdsSnapshot) -> None:
    default = _routes_of(snapshot, "mesh")["kserve|affine|default|grpc"]
    assert default["match"]["headers"] == [{"name": "x-servegrid-model", "string_match": {"exact": "affine"}}]
    action = default["route"]
    weights = {c["name"]: c["weight"] for c in action["weighted_clusters"]["clusters"]}
    assert weights == {"kserve|affine|v1|grpc": 90, "kserve|affine|v2|grpc": 10}
    assert action["weighted_clusters"]["use_hash_policy"] is True
    assert action["hash_policy"] == [{"header": {"header_name": "x-user-id"}}]
    (mirror,) = action["request_mirror_policies"]
    assert mirror["cluster"] == names.XDS_CLUSTER
    assert mirror["runtime_fraction"]["default_value"] == {"numerator": 250000, "denominator": "MILLION"}
    assert action["max_stream_duration"]["grpc_timeout_header_max"] == "0s" and action["timeout"] == "0s"
    assert action["retry_policy"]["num_retries"] == RouterSettings().retry_max_attempts - 1
    filters = default["typed_per_filter_config"]
    assert filters.keys() == {names.BUFFER_FILTER, names.TRANSCODER_FILTER, RATELIMIT_TAG_FILTER}
    (tag,) = filters[RATELIMIT_TAG_FILTER]["mutations"]["request_mutations"]
    assert tag["append"]["header"] == {"key": RATELIMIT_ROUTE_HEADER, "value": "kserve"}  # counted as route kserve


def test_the_routers_comparison_calls_are_never_mirrored(snapshot: XdsSnapshot) -> None:
    compare_header = {"name": names.SHADOW_COMPARE_HEADER, "present_match": True}
    for config in ("public", "mesh"):
        routes = _routes_of(snapshot, config)
        order = list(routes)
        mirrored = [n for n, r in routes.items() if "request_mirror_policies" in r.get("route", {})]
        assert mirrored and all(n.startswith("kserve|affine|") for n in mirrored)
        affine_grpc = [n for n in order if n.startswith("kserve|affine|") and n.endswith("|grpc")]
        for name in affine_grpc:
            twin = routes[f"{name}|compare"]
            assert order.index(f"{name}|compare") < order.index(affine_grpc[0])  # matched first
            model, *version = routes[name]["match"]["headers"]
            assert twin["match"]["headers"] == [model, compare_header, *version]
            if "route" in routes[name]:
                unmirrored = {k: v for k, v in routes[name]["route"].items() if k != "request_mirror_policies"}
                assert twin["route"] == unmirrored
        assert not [n for n in order if n.endswith("|compare") and not n.startswith("kserve|affine|")]


def test_rest_routes_take_the_configured_timeout(snapshot: XdsSnapshot) -> None:
    default = f"{RouterSettings().rest_timeout_s:g}s"
    assert _routes_of(snapshot, "public")["kserve|affine|v1|http"]["route"]["timeout"] == default
    kserve = kserve_routes(list(_table().routes.values()), KservePolicy(rest_timeout_s=7.5))
    (vhost,) = public_route_config(kserve, rest_timeout_s=7.5)["virtual_hosts"]
    timeouts = {r["name"]: r["route"]["timeout"] for r in vhost["routes"] if "route" in r}
    assert timeouts["kserve|affine|v1|http"] == timeouts["kserve|plain|default|http"] == "7.5s"
    assert timeouts["gateway"] == "7.5s"  # the last route named gateway is REST /v1/
    assert timeouts["kserve|affine|v1|grpc"] == "0s"  # gRPC: the caller's deadline


def test_explicit_versions_and_their_errors(snapshot: XdsSnapshot) -> None:
    routes = _routes_of(snapshot, "public")
    assert routes["kserve|affine|v3|grpc"]["route"]["cluster"] == "kserve|affine|v3|grpc"  # STAGING, by name only
    assert routes["kserve|affine|v3|http"]["match"] == {"path_separated_prefix": "/v2/models/affine/versions/3"}
    unknown = {
        h["header"]["key"]: h["header"]["value"]
        for h in routes["kserve|affine|unknown-version|grpc"]["response_headers_to_add"]
    }
    assert unknown["grpc-status"] == "5" and "grpc-status-details-bin" in unknown
    assert routes["kserve|plain|default|grpc"]["route"]["cluster"] == "kserve|plain|v1|grpc"
    staged = {
        h["header"]["key"]: h["header"]["value"]
        for h in routes["kserve|staged|default|grpc"]["response_headers_to_add"]
    }
    assert staged["grpc-status"] == "5" and "name a version" in staged["grpc-message"]


def test_unknown_models_and_unserved_methods(snapshot: XdsSnapshot) -> None:
    for config in ("public", "mesh"):
        routes = _routes_of(snapshot, config)
        unknown = {
            h["header"]["key"]: h["header"]["value"]
            for h in routes["kserve|unknown-model|grpc"]["response_headers_to_add"]
        }
        assert unknown["grpc-status"] == "5"
        assert unknown["grpc-message"] == "model '%REQ(x-servegrid-model)%' is not served"
        unimplemented = routes["kserve|unimplemented|grpc"]["response_headers_to_add"]
        assert {"key": "grpc-status", "value": "12"} in [h["header"] for h in unimplemented]
        assert routes["kserve|server|ServerReady"]["route"]["cluster"] == "kserve|server|grpc"
        assert routes["kserve|not-served-0|http"]["direct_response"]["status"] == 403
        assert list(routes)[-1] == "not-found"
    assert "infer" in _routes_of(snapshot, "public") and "infer" not in _routes_of(snapshot, "mesh")


def test_versions_are_deterministic_and_follow_the_revision(snapshot: XdsSnapshot) -> None:
    again = build_snapshot(_table(), dict(STATES), RouterSettings())
    assert again.versions == snapshot.versions
    later = build_snapshot(_table(revision=8), STATES, RouterSettings())
    for type_url, version in later.versions.items():
        assert int(version.split(".")[0]) > int(snapshot.versions[type_url].split(".")[0])
    drained = build_snapshot(_table(), {**STATES, ("b1", "affine_batched", ""): DRAINING}, RouterSettings())
    assert drained.versions[TYPE_ENDPOINT] != snapshot.versions[TYPE_ENDPOINT]
    assert drained.versions[TYPE_CLUSTER] == snapshot.versions[TYPE_CLUSTER]


def _static_bootstrap(snapshot: XdsSnapshot, jwks: Path) -> dict[str, Any]:
    """The bootstrap with every pushed resource inlined: clusters static with their endpoints, each
    listener's route config in place of its RDS source."""
    config = render_config(EnvoyParams.for_profile("local", jwks_file=str(jwks), token_jwks_file=str(jwks)))
    config.pop("dynamic_resources")
    for name, message in snapshot.resources[TYPE_CLUSTER].items():
        cluster = json_format.MessageToDict(message, preserving_proto_field_name=True)
        cluster["type"] = "STATIC"
        cluster.pop("eds_cluster_config")
        cluster["load_assignment"] = _dict(snapshot, TYPE_ENDPOINT, name)
        config["static_resources"]["clusters"].append(cluster)
    for listener in config["static_resources"]["listeners"]:
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        hcm["route_config"] = _dict(snapshot, TYPE_ROUTE, hcm.pop("rds")["route_config_name"])
    return config


def test_envoy_accepts_every_resource(snapshot: XdsSnapshot, tmp_path: Path) -> None:
    jwks = DevIssuer.generate().write(tmp_path)
    path = tmp_path / "envoy.yaml"
    path.write_text(json.dumps(_static_bootstrap(snapshot, jwks)))  # JSON is YAML
    result = validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_backends_by_dns_name_go_to_envoy_as_resolved_addresses() -> None:
    named = registry_pb2.RouteBackend(
        backend_id="t0", address="triton-0.triton:8001", http_address="triton-0.triton:8000"
    )
    gone = registry_pb2.RouteBackend(backend_id="t1", address="triton-1.triton:8001")
    version = registry_pb2.RouteVersion(version=1, stage=PRODUCTION, triton_model_name="m", backends=[named, gone])
    table = RouteTable()
    table.reset([registry_pb2.Route(model_id="m", versions=[version])], revision=1)
    addresses = {"triton-0.triton": "10.1.2.3"}  # triton-1 does not resolve (its pod is being rescheduled)
    snapshot = build_snapshot(table, {}, RouterSettings(), resolve=addresses.get)
    assignment: Any = snapshot.resources[TYPE_ENDPOINT][names.version_cluster("m", 1, "grpc")]
    grpc_lbs = assignment.endpoints[0].lb_endpoints
    assert [(e.endpoint.hostname, e.endpoint.address.socket_address.address) for e in grpc_lbs] == [("t0", "10.1.2.3")]
    with pytest.raises(ValueError, match="not an IP address"):
        build_snapshot(table, {}, RouterSettings())  # a name with no resolver is a wiring mistake, said loudly


def _any_dicts(value: Any) -> list[dict[str, Any]]:
    """Every dict holding an `@type` (a packed Any) inside `value`."""
    if isinstance(value, dict):
        return ([value] if "@type" in value else []) + [d for v in value.values() for d in _any_dicts(v)]
    if isinstance(value, list):
        return [d for v in value for d in _any_dicts(v)]
    return []


def test_two_builds_share_no_any_dict() -> None:
    # ParseDict deletes and restores `@type` while it parses an Any: a dict two builds share breaks
    # when two router replicas in one process build at the same moment (seen as a flaky CI run).
    from services.mesh.resources import cluster_dicts, route_config_dicts

    table, settings = _table(), RouterSettings()
    first = _any_dicts([route_config_dicts(table, settings), cluster_dicts(table, settings)])
    second = _any_dicts([route_config_dicts(table, settings), cluster_dicts(table, settings)])
    assert first and not {id(d) for d in first} & {id(d) for d in second}


def test_reflection_needs_a_credential_but_spends_no_rate_limit() -> None:
    from services.mesh.routes import fixed_routes

    routes = {r["name"]: r for r in fixed_routes()}
    assert RATELIMIT_TAG_FILTER not in routes["reflection"]["typed_per_filter_config"]
    assert RATELIMIT_TAG_FILTER in routes["gateway"]["typed_per_filter_config"]
    assert names.EXT_AUTHZ_FILTER not in routes["reflection"]["typed_per_filter_config"]  # auth still applies
