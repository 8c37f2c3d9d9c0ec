"""RouteTable: version selection (explicit, canary weights, sticky), errors, and watch deltas."""

from __future__ import annotations

from collections import Counter

import pytest
from servegrid.registry.v1 import registry_pb2 as rpb

from services.router.table import RouteTable, compile_route
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
                backends=[rpb.RouteBackend(backend_id="a", address="127.0.0.1:1")],
            )
            for v, w in weights.items()
        ],
    )


def test_explicit_version_and_unknown_versions() -> None:
    compiled = compile_route(route(weights={1: 100, 2: 0}))
    target = compiled.pick_version("2")
    assert (target.version, target.triton_model_name, target.triton_model_version) == (2, "m_v2", "2")
    assert compiled.pick_version("1").triton_model_version == ""  # 0 -> Triton's latest
    for bad in ("9", "latest"):
        with pytest.raises(NotFound) as caught:
            compiled.pick_version(bad)
        assert caught.value.reason == "VERSION_NOT_FOUND"


def test_canary_weights_split_default_traffic() -> None:
    compiled = compile_route(route(weights={1: 90, 2: 10}))
    picks = Counter(compiled.pick_version("").version for _ in range(20_000))
    assert abs(picks[2] / 20_000 - 0.10) < 0.015


def test_sticky_header_value_always_picks_the_same_version() -> None:
    compiled = compile_route(route(weights={1: 50, 2: 50}, sticky="X-User"))
    assert compiled.sticky_header == "x-user"  # gRPC metadata keys are lower case
    for user in ("alice", "bob", "carol", "dave"):
        first = compiled.pick_version("", user).version
        assert all(compiled.pick_version("", user).version == first for _ in range(50))
    spread = Counter(compiled.pick_version("", f"user-{i}").version for i in range(2000))
    assert 0.4 < spread[1] / 2000 < 0.6


def test_no_weights_falls_back_to_production() -> None:
    compiled = compile_route(route(weights={1: 0, 2: 0}))
    assert compiled.pick_version("").version == 1


def test_unknown_model_is_model_not_found() -> None:
    with pytest.raises(NotFound) as caught:
        RouteTable().get("nope")
    assert caught.value.reason == "MODEL_NOT_FOUND"


def test_watch_reset_then_deltas() -> None:
    table = RouteTable()
    seen: list[int] = []
    table.on_change(lambda: seen.append(table.revision))
    table.apply_watch(rpb.WatchRoutesResponse(reset=True, routes=[route("a"), route("b")], revision=5))
    assert set(table.routes) == {"a", "b"}
    table.apply_watch(rpb.WatchRoutesResponse(routes=[route("c")], removed_model_ids=["a"], revision=6))
    assert set(table.routes) == {"b", "c"}
    table.apply_watch(rpb.WatchRoutesResponse(reset=True, routes=[route("z")], revision=7))
    assert set(table.routes) == {"z"}
    assert seen == [5, 6, 7]
    assert table.backends() == {"a": ("127.0.0.1:1", 1, {("z_v1", "")})}
