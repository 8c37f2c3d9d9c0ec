"""The chart's monitoring objects: scrape configs that find every metrics port, the generated rules as a
PrometheusRule, and the dashboards as ConfigMaps for Grafana's sidecar."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from tests.support.chart import CHART, KUBE_VERSION, by_kind, render

OBSERVABILITY = Path(__file__).resolve().parents[2] / "deploy" / "observability"
SERVICES = ("gateway", "router", "registry", "batch", "edge")
ALL_ON = {
    "observability": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "prometheusRule": {"enabled": True},
        "dashboards": {"enabled": True},
    }
}
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


def test_nothing_is_rendered_until_enabled() -> None:
    docs = render()
    assert not [d for d in docs if d["kind"] in CRD_KINDS]
    assert not [name for name in by_kind(docs, "ConfigMap") if "dashboard" in name]


def test_the_chart_lints_and_renders_valid_objects_with_everything_on() -> None:
    report = helm.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}", values=ALL_ON)
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []
    for doc in render(ALL_ON):
        if doc["kind"] in CRD_KINDS:
            # Not in kubernetes-validate's schemas: the fields the Prometheus Operator requires.
            assert doc["apiVersion"] == "monitoring.coreos.com/v1" and doc["metadata"]["name"] and doc["spec"]
        else:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


def test_every_metrics_port_is_scraped() -> None:
    docs = render(ALL_ON)
    services = by_kind(docs, "Service")
    monitors = by_kind(docs, "ServiceMonitor")
    assert set(monitors) == {f"servegrid-{name}" for name in (*SERVICES, "triton")}
    for name, monitor in monitors.items():
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        # The monitor selects exactly its component's Service, and scrapes a port that Service names.
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [s for s in services.values() if selector.items() <= s["metadata"]["labels"].items()]
        assert [s["metadata"]["name"] for s in matched] == [name]
        (endpoint,) = monitor["spec"]["endpoints"]
        assert endpoint["path"] == "/metrics"
        assert endpoint["port"] in {p["name"] for p in matched[0]["spec"]["ports"]}
    (envoy_monitor,) = by_kind(docs, "PodMonitor").values()
    (endpoint,) = envoy_monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/stats/prometheus"
    envoy = by_kind(docs, "Deployment")["servegrid-envoy"]["spec"]["template"]
    assert envoy_monitor["spec"]["selector"]["matchLabels"].items() <= envoy["metadata"]["labels"].items()
    ports = {p["name"]: p["containerPort"] for p in envoy["spec"]["containers"][0]["ports"]}
    assert endpoint["port"] in ports


def test_a_disabled_service_gets_no_monitor() -> None:
    values = {**ALL_ON, "services": {"batch": {"enabled": False}}, "triton": {"enabled": False}}
    assert set(by_kind(render(values), "ServiceMonitor")) == {f"servegrid-{n}" for n in SERVICES if n != "batch"}


def test_the_prometheus_rule_is_the_generated_rules_file() -> None:
    (rule,) = by_kind(render(ALL_ON), "PrometheusRule").values()
    generated = yaml.safe_load((OBSERVABILITY / "rules" / "servegrid.rules.yaml").read_text())
    assert rule["spec"] == generated


def test_runbook_links_can_point_at_another_copy_of_the_runbooks() -> None:
    values = {"observability": {"prometheusRule": {"enabled": True, "runbookUrl": "https://wiki.example/ml/runbooks"}}}
    (rule,) = by_kind(render(values), "PrometheusRule").values()
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
    assert urls and all(u.startswith("https://wiki.example/ml/runbooks#") for u in urls)
    assert "https://wiki.example/ml/runbooks#backenddown" in urls


@pytest.mark.parametrize("folder", ["servegrid", ""])
def test_each_dashboard_is_a_configmap_for_the_grafana_sidecar(folder: str) -> None:
    values = {"observability": {"dashboards": {"enabled": True, "folder": folder}}}
    maps = {n: m for n, m in by_kind(render(values), "ConfigMap").items() if "dashboard" in n}
    shipped = sorted((OBSERVABILITY / "dashboards").glob("*.json"))
    assert len(maps) == len(shipped) == 5
    for path in shipped:
        (config_map,) = [m for m in maps.values() if path.name in m["data"]]
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"].get("annotations", {}).get("grafana_folder") == (folder or None)
        assert json.loads(config_map["data"][path.name]) == json.loads(path.read_text())
