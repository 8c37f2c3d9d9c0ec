"""The xDS resources the router serves every Envoy: clusters, endpoints and route configs from the route table."""

# One cluster per (model, version, protocol): `kserve|{model}|v{version}|{grpc,http}` (names.py), whose
# endpoints (EDS over ADS) are the backends serving that version's Triton model, each with the health
# the router's probes and drains decided. `kserve|server|{grpc,http}` hold every backend, for the
# server-wide methods. Balancing, passive ejection, breakers and the retry budget come from the
# route's load_balancing and the router's settings; healthy_panic_threshold 0 keeps traffic off every
# unhealthy endpoint even when none is left (the caller gets UNAVAILABLE naming the model, not a
# request to a backend that cannot serve it).
#
# Everything is built as dicts in Envoy's JSON shape and parsed into the xds-protos messages, so a
# wrong field name fails here (json_format.ParseDict), and the unit tests feed the same dicts to
# `envoy --mode validate`.

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any

# Imported for their descriptors: ParseDict resolves every typed_config `@type` through them.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2  # noqa: F401  (FilterConfig)
from envoy.extensions.filters.http.cors.v3 import cors_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_authz.v3 import ext_authz_pb2  # noqa: F401
from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401
from envoy.extensions.filters.http.rbac.v3 import rbac_pb2  # noqa: F401
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2  # noqa: F401
from envoy.extensions.retry.host.previous_hosts.v3 import previous_hosts_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format
from google.protobuf.message import Message
from servegrid.registry.v1 import registry_pb2

from services.mesh import lua, names
from services.mesh.routes import KservePolicy, duration, kserve_routes, mesh_route_config, public_route_config, typed
from services.router.backends import EndpointState, EndpointStates, address_host
from services.router.settings import RouterSettings
from services.router.table import CompiledRoute, RouteTable, VersionTarget
from services.router.xds import TYPE_CLUSTER, TYPE_ENDPOINT, TYPE_ROUTE, XdsSnapshot

# EndpointStates (services.router.backends): (backend_id, triton_model_name, triton_model_version) ->
# EndpointState. A backend's server-wide state may be given under (backend_id, "", ""); without it, it
# is derived from the backend's model states (server_state). A key that is absent means "not probed
# yet": the endpoint goes out with health UNKNOWN, which Envoy routes to (passive ejection still guards
# it), so a router that just started does not black-hole traffic before its first probe round.
# host -> IP literal, or None while it does not resolve (EDS endpoints must be addresses, not names).
Resolve = Callable[[str], str | None]

log = logging.getLogger(__name__)

HEALTHY, UNHEALTHY, DRAINING = EndpointState.HEALTHY, EndpointState.UNHEALTHY, EndpointState.DRAINING
_EDS_CONFIG = {"eds_config": {"ads": {}, "resource_api_version": "V3"}}
_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


# --- clusters --------------------------------------------------------------------------------


def _lb(load_balancing: int) -> dict[str, Any]:
    """P2C (the default) → least-request of two random choices; ROUND_ROBIN; WEIGHTED → round robin
    over the endpoints' load_balancing_weight (set per endpoint)."""
    if load_balancing in (registry_pb2.LOAD_BALANCING_ROUND_ROBIN, registry_pb2.LOAD_BALANCING_WEIGHTED):
        return {"lb_policy": "ROUND_ROBIN"}
    return {"lb_policy": "LEAST_REQUEST", "least_request_lb_config": {"choice_count": 2}}


def _outlier_detection(settings: RouterSettings) -> dict[str, Any]:
    """Passive ejection (eject_*: connection failures, gateway errors) and the breakers (breaker_*:
    consecutive failures, failure share over a minimum of requests)."""
    return {
        "consecutive_gateway_failure": settings.eject_consecutive_failures,
        "enforcing_consecutive_gateway_failure": 100,
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": settings.eject_consecutive_failures,
        "enforcing_consecutive_local_origin_failure": 100,
        "consecutive_5xx": settings.breaker_consecutive_failures,
        "enforcing_consecutive_5xx": 100,
        "failure_percentage_threshold": round(settings.breaker_error_rate * 100),
        "enforcing_failure_percentage": 100,
        "enforcing_failure_percentage_local_origin": 100,
        "failure_percentage_request_volume": settings.breaker_min_requests,
        "failure_percentage_minimum_hosts": 1,  # Envoy's default (5) would never judge a small pool
        "enforcing_success_rate": 0,
        "interval": duration(settings.outlier_interval_s),
        "base_ejection_time": duration(settings.eject_base_s),
        "max_ejection_time": duration(settings.eject_max_s),
        "max_ejection_percent": 100,
    }


def _circuit_breakers(settings: RouterSettings) -> dict[str, Any]:
    most = settings.max_requests_per_cluster
    budget = {
        "budget_percent": {"value": settings.retry_budget_ratio * 100},
        "min_retry_concurrency": max(1, round(settings.retry_budget_min_per_s)),
    }
    return {"thresholds": [{"max_requests": most, "max_pending_requests": most, "retry_budget": budget}]}


def _http_options(protocol: names.Protocol, settings: RouterSettings) -> dict[str, Any]:
    """How Envoy talks to a backend: HTTP/2 with keepalive for gRPC, HTTP/1.1 for KServe REST."""
    if protocol == "grpc":
        http2 = {
            "max_concurrent_streams": settings.max_concurrent_streams,
            "connection_keepalive": {"interval": "10s", "timeout": "3s"},
        }
        return {"explicit_http_config": {"http2_protocol_options": http2}}
    return {"explicit_http_config": {"http_protocol_options": {}}}


def _protocol_options(target: VersionTarget, protocol: names.Protocol, settings: RouterSettings) -> dict[str, Any]:
    options = _http_options(protocol, settings)
    triton = (target.triton_model_name, target.triton_model_version)
    if lua.needs_rename(*triton, target.model_id, target.version_str):
        # Only where the names differ: the rename copies the request's head (never the tensors).
        options["http_filters"] = lua.upstream_rename_filters(*triton, target.model_id, target.version_str)
    return {_HTTP_OPTIONS: typed(_HTTP_OPTIONS, **options)}


def _metadata(target: VersionTarget) -> dict[str, Any]:
    return {
        "filter_metadata": {
            names.METADATA_NAMESPACE: {
                "model_id": target.model_id,
                "version": target.version_str,
                "triton_model_name": target.triton_model_name,
                "triton_model_version": target.triton_model_version,
            }
        }
    }


def _base_cluster(name: str, load_balancing: int, settings: RouterSettings) -> dict[str, Any]:
    return {
        "name": name,
        "type": "EDS",
        "eds_cluster_config": _EDS_CONFIG,
        "connect_timeout": "1s",
        **_lb(load_balancing),
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}},
        "outlier_detection": _outlier_detection(settings),
        "circuit_breakers": _circuit_breakers(settings),
    }


def version_cluster(
    target: VersionTarget, protocol: names.Protocol, load_balancing: int, settings: RouterSettings
) -> dict[str, Any]:
    cluster = _base_cluster(names.version_cluster(target.model_id, target.version, protocol), load_balancing, settings)
    cluster["typed_extension_protocol_options"] = _protocol_options(target, protocol, settings)
    cluster["metadata"] = _metadata(target)
    return cluster


def server_cluster(protocol: names.Protocol, settings: RouterSettings) -> dict[str, Any]:
    cluster = _base_cluster(names.server_cluster(protocol), registry_pb2.LOAD_BALANCING_ROUND_ROBIN, settings)
    cluster["typed_extension_protocol_options"] = {
        _HTTP_OPTIONS: typed(_HTTP_OPTIONS, **_http_options(protocol, settings))
    }
    return cluster


def _targets(route: CompiledRoute) -> list[VersionTarget]:
    """Every version with a cluster: the servable ones, and the shadow when it is not one of them."""
    targets = [route.versions[v] for v in sorted(route.versions)]
    if route.shadow is not None and route.shadow.version not in route.versions:
        targets.append(route.shadow)
    return targets


# --- endpoints -------------------------------------------------------------------------------


def server_state(backend_id: str, states: EndpointStates) -> int | None:
    """A backend's state for the server-wide clusters: given, or drained if any model of it is, healthy
    if any model is, else unhealthy; None when nothing is known yet."""
    given = states.get((backend_id, "", ""))
    if given is not None:
        return given
    found = {state for (b, _, _), state in states.items() if b == backend_id}
    if not found:
        return None
    for state in (DRAINING, HEALTHY):
        if state in found:
            return state
    return UNHEALTHY


def _socket(address: str, resolve: Resolve | None) -> dict[str, Any] | None:
    """The endpoint address; None for a name that does not resolve now (the endpoint is left out)."""
    _, _, port = address.rpartition(":")
    name = address_host(address)
    host: str | None = name
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if resolve is None:
            raise ValueError(f"backend address {address!r} is not an IP address; pass resolve=") from None
        host = resolve(name)
        if host is None:
            return None
    return {"socket_address": {"address": host, "port_value": int(port)}}


def _lb_endpoint(
    backend_id: str, address: str, state: int | None, weight: int | None, resolve: Resolve | None
) -> dict[str, Any] | None:
    socket_address = _socket(address, resolve)
    if socket_address is None:
        log.warning("backend %s: %s does not resolve; Envoy gets no endpoint for it", backend_id, address)
        return None
    endpoint: dict[str, Any] = {
        "endpoint": {"address": socket_address, "hostname": backend_id},
        # EndpointState's names are Envoy's HealthStatus names.
        "health_status": EndpointState(state).name if state else "UNKNOWN",
        "metadata": {"filter_metadata": {names.METADATA_NAMESPACE: {"backend_id": backend_id}}},
    }
    if weight is not None:
        endpoint["load_balancing_weight"] = max(1, weight)
    return endpoint


def version_endpoints(
    target: VersionTarget,
    protocol: names.Protocol,
    load_balancing: int,
    states: EndpointStates,
    resolve: Resolve | None = None,
) -> dict[str, Any]:
    """The backends of one version; a backend with no HTTP address has no place in the http cluster."""
    weighted = load_balancing == registry_pb2.LOAD_BALANCING_WEIGHTED
    endpoints = []
    for ref in target.backends:
        address = ref.address if protocol == "grpc" else ref.http_address
        if not address:
            continue
        state = states.get((ref.backend_id, *target.backend_key))
        endpoint = _lb_endpoint(ref.backend_id, address, state, ref.weight if weighted else None, resolve)
        if endpoint is not None:
            endpoints.append(endpoint)
    name = names.version_cluster(target.model_id, target.version, protocol)
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}] if endpoints else []}


def server_endpoints(
    table: RouteTable, protocol: names.Protocol, states: EndpointStates, resolve: Resolve | None = None
) -> dict[str, Any]:
    endpoints = []
    for backend_id, spec in sorted(table.backends().items()):
        address = spec.address if protocol == "grpc" else spec.http_address
        endpoint = address and _lb_endpoint(backend_id, address, server_state(backend_id, states), None, resolve)
        if endpoint:
            endpoints.append(endpoint)
    name = names.server_cluster(protocol)
    return {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}] if endpoints else []}


# --- the snapshot ----------------------------------------------------------------------------


def kserve_policy(settings: RouterSettings) -> KservePolicy:
    return KservePolicy(
        num_retries=max(0, settings.retry_max_attempts - 1),
        per_try_timeout_s=settings.retry_per_try_timeout_s,
        retry_backoff_base_s=settings.retry_backoff_base_s,
        retry_backoff_max_s=settings.retry_backoff_max_s,
        rest_timeout_s=settings.rest_timeout_s,
    )


def cluster_dicts(table: RouteTable, settings: RouterSettings) -> list[dict[str, Any]]:
    clusters = [server_cluster(p, settings) for p in names.PROTOCOLS]
    for model_id in sorted(table.routes):
        route = table.routes[model_id]
        for target in _targets(route):
            clusters.extend(version_cluster(target, p, route.load_balancing, settings) for p in names.PROTOCOLS)
    return clusters


def endpoint_dicts(table: RouteTable, states: EndpointStates, resolve: Resolve | None = None) -> list[dict[str, Any]]:
    assignments = [server_endpoints(table, p, states, resolve) for p in names.PROTOCOLS]
    for model_id in sorted(table.routes):
        route = table.routes[model_id]
        for target in _targets(route):
            assignments.extend(
                version_endpoints(target, p, route.load_balancing, states, resolve) for p in names.PROTOCOLS
            )
    return assignments


def route_config_dicts(table: RouteTable, settings: RouterSettings) -> list[dict[str, Any]]:
    kserve = kserve_routes(list(table.routes.values()), kserve_policy(settings))
    public = public_route_config(
        kserve, cors_origins=tuple(settings.cors_origins), rest_timeout_s=settings.rest_timeout_s
    )
    return [public, mesh_route_config(kserve)]


def _parse(dicts: Iterable[dict[str, Any]], message: type[Message], key: str) -> dict[str, Message]:
    return {d[key]: json_format.ParseDict(d, message()) for d in dicts}


def build_snapshot(
    table: RouteTable, endpoints: EndpointStates, settings: RouterSettings, *, resolve: Resolve | None = None
) -> XdsSnapshot:
    """CDS, EDS and RDS for `table` with the endpoint health in `endpoints`; versions
    `{table.revision}.{sha12}` per type (XdsSnapshot.build), the same on every replica."""
    resources: dict[str, dict[str, Message]] = {
        TYPE_CLUSTER: _parse(cluster_dicts(table, settings), cluster_pb2.Cluster, "name"),
        TYPE_ENDPOINT: _parse(
            endpoint_dicts(table, endpoints, resolve), endpoint_pb2.ClusterLoadAssignment, "cluster_name"
        ),
        TYPE_ROUTE: _parse(route_config_dicts(table, settings), route_pb2.RouteConfiguration, "name"),
    }
    return XdsSnapshot.build(table.revision, resources)
