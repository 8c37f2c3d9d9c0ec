"""RouteTable: compiled versions (default traffic, weights, shadow, sticky), errors, watch deltas, backends."""

from __future__ import annotations

import pytest
from servegrid.registry.v1 import registry_pb2 as rpb

from services.router.table import BackendSpec, RouteTable, compile_route
from services.runtime.errors import NotFound


def route(model_id: str = "m", weights: dict[int, int] | None = None, sticky: str = "") -> rpb.Route:
    weights = weights if weights is not None else {1: 100}
    return rpb.Route(
        model_id=model_id,
        sticky_header=sticky,
        versions=[
            rpb.RouteVersion(
                version=v,
                stage=rpb.STAGE_PRODUCTION if v == 1 else rpb.STAGE_STAGING,
                triton_model_name=f"{model_id}_v{v}",
                triton_model_version=v if v > 1 else 0,
                weight=w,
                backends=[rpb.RouteBackend(backend_id="a", address="127.0.0.1:1", http_address="127.0.0.1:2")],
            )
            for v, w in weights.items()
        ],
    )


def test_versions_carry_the_triton_model_and_version_they_run_as() -> None:
    compiled = compile_route(route(weights={1: 100, 2: 0}))
    two = compiled.versions[2]
    assert (two.version_str, two.triton_model_name, two.triton_model_version) == ("2", "m_v2", "2")
    assert compiled.versions[1].backend_key == ("m_v1", "")  # 0 -> Triton's latest
    assert compiled.versions[1].backends[0].http_address == "127.0.0.1:2"


def test_weighted_versions_take_default_traffic_else_production() -> None:
    canary = compile_route(route(weights={1: 90, 2: 10}))
    assert [t.version for t in canary.weighted] == [1, 2]
    fallback = compile_route(route(weights={1: 0, 2: 0}))
    assert fallback.weighted == () and fallback.default is not None and fallback.default.version == 1


def test_sticky_header_is_lower_case_and_shadow_needs_a_rate() -> None:
    message = route(weights={1: 100}, sticky="X-User")
    message.shadow.target.CopyFrom(message.versions[0])
    assert compile_route(message).sticky_header == "x-user"  # gRPC metadata keys are lower case
    assert compile_route(message).shadow is None  # sample rate 0: no shadow
    message.shadow.sample_rate = 3.0
    compiled = compile_route(message)
    assert compiled.shadow is not None and compiled.shadow_rate == 1.0


def test_unknown_model_is_model_not_found() -> None:
    with pytest.raises(NotFound) as caught:
        RouteTable().get("nope")
    assert caught.value.reason == "MODEL_NOT_FOUND"


def test_watch_reset_then_deltas() -> None:
    table = RouteTable()
    seen: list[int] = []
    table.on_change(lambda: seen.append(table.revision))
    assert not table.loaded
    table.apply_watch(rpb.WatchRoutesResponse(reset=True, routes=[route("a"), route("b")], revision=5))
    assert set(table.routes) == {"a", "b"} and table.loaded
    table.apply_watch(rpb.WatchRoutesResponse(routes=[route("c")], removed_model_ids=["a"], revision=6))
    assert set(table.routes) == {"b", "c"}
    table.apply_watch(rpb.WatchRoutesResponse(reset=True, routes=[route("z")], revision=7))
    assert set(table.routes) == {"z"}
    assert seen == [5, 6, 7]
    assert table.backends() == {"a": BackendSpec("127.0.0.1:1", 1, frozenset({("z_v1", "")}), "127.0.0.1:2")}


def test_an_empty_reset_still_counts_as_loaded() -> None:
    table = RouteTable()
    table.apply_watch(rpb.WatchRoutesResponse(reset=True, revision=3))
    assert table.loaded and table.routes == {} and table.revision == 3
