"""servegrid's own metrics follow Prometheus' naming conventions, carry no per-tenant labels and no `_created`
series, and show states as one 0/1 series per named state."""

from __future__ import annotations

import importlib

import pytest
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from services.router import metrics as router_metrics

MODULES = (
    "services.runtime.metrics",
    "services.router.metrics",
    "services.router.xds",
    "services.registry.metrics",
    "services.batch.metrics",
    "services.edge.metrics",
)
# Units a servegrid histogram may measure in (a count of things names the thing), and the one without a unit:
# a difference between two model outputs, in whatever unit the model's outputs have.
HISTOGRAM_UNITS = ("_seconds", "_items")
UNITLESS = {"servegrid_router_shadow_max_abs_diff"}
# Labels whose values come from requests or tenants: a series per value, without bound.
UNBOUNDED = {"tenant", "subject", "request_id", "item_id", "job_id", "api_key", "key_id", "trace_id"}


def _servegrid_metrics() -> list[MetricWrapperBase]:
    for module in MODULES:
        importlib.import_module(module)
    collectors = getattr(REGISTRY, "_collector_to_names", {})
    return [c for c in collectors if isinstance(c, MetricWrapperBase) and c._name.startswith("servegrid_")]


def test_names_carry_their_type_and_unit() -> None:
    found = _servegrid_metrics()
    assert len(found) > 30
    for metric in found:
        kind, name = metric._type, metric._name
        if kind == "counter":
            # prometheus_client exposes a counter as `<name>_total` whatever it was declared as.
            assert not name.endswith(("_count", "_sum", "_seconds")), f"{name}: a counter counts events"
        elif kind == "histogram":
            assert name.endswith(HISTOGRAM_UNITS) or name in UNITLESS, f"{name}: a histogram's name ends with its unit"
        assert not name.endswith("_created"), name


def test_no_label_grows_with_tenants_or_requests() -> None:
    for metric in _servegrid_metrics():
        assert not UNBOUNDED & set(metric._labelnames), f"{metric._name} has {UNBOUNDED & set(metric._labelnames)}"


def test_no_created_series_are_exported() -> None:
    _servegrid_metrics()
    text = generate_latest(REGISTRY).decode()
    assert "servegrid_rpc_requests_total" in text or "servegrid_router_xds_rejections_total" in text
    assert "_created" not in text


def _backend_series(backend: str) -> dict[str, float]:
    return {
        s.labels["state"]: s.value
        for family in router_metrics.BACKEND_STATE.collect()
        for s in family.samples
        if s.labels["backend"] == backend
    }


@pytest.mark.parametrize("state", router_metrics.BACKEND_STATES)
def test_a_backend_state_is_one_series_per_named_state(state: str) -> None:
    router_metrics.set_backend_state("triton-test", state)
    series = _backend_series("triton-test")
    assert series == {s: (1.0 if s == state else 0.0) for s in router_metrics.BACKEND_STATES}
    router_metrics.forget_backend("triton-test")
    assert _backend_series("triton-test") == {}


def test_xds_rejections_are_exported_before_the_first_nack() -> None:
    importlib.import_module("services.router.xds")
    types = {
        s.labels["type"]
        for family in router_metrics.XDS_REJECTIONS.collect()
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert {"clusters", "endpoints", "listeners", "routes"} <= types
