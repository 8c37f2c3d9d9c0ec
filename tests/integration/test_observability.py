"""The shipped rules and dashboards against a real Prometheus scraping a running mesh.

`servegrid up` on free ports, a Prometheus (Debian's) scraping Envoy's /stats/prometheus, every service's
metrics port and Triton's :8002 once a second with deploy/observability/rules loaded, real traffic (gRPC and
REST inference through Envoy, a canary with a shadow, a batch job); then every dashboard panel's query and
every recording and alert rule is evaluated through Prometheus' HTTP API. A query naming a metric nobody
exports fails, and so does one that returns nothing after the traffic. `servegrid top --once` reads the same
stats.
"""

from __future__ import annotations

import functools
import json
import re
import ssl
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import yaml

from tests.support.local_stack import METRICS_SERVICES, LocalStack, local_stack
from tests.support.polling import wait_for
from tests.support.processes import REPO
from tests.support.prometheus import (
    MISSING,
    PROMETHEUS,
    Prometheus,
    finite_values,
    installed,
    metric_names,
    run_prometheus,
    scrape_config,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(600),
    pytest.mark.skipif(not installed(PROMETHEUS), reason=MISSING),
]

OBSERVABILITY = REPO / "deploy" / "observability"
RULES = OBSERVABILITY / "rules" / "servegrid.rules.yaml"
# Grafana's variables, as the panels would see them with every model selected.
VARIABLES = {"$__rate_interval": "5m", "$model": ".*", "$triton_model": ".*"}
# Triton exports GPU metrics only where it runs on GPUs; the local stack's Triton runs on CPU.
GPU_ONLY = frozenset({"nv_gpu_utilization", "nv_gpu_memory_used_bytes", "nv_gpu_memory_total_bytes"})
MODELS = ("affine", "digits", "resnet18")


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every target of every shipped dashboard, its variables filled in."""
    out = []
    for path in sorted((OBSERVABILITY / "dashboards").glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for name, value in VARIABLES.items():
                    expr = expr.replace(name, value)
                out.append((f"{path.stem}: {panel['title']} [{target['refId']}]", expr))
    return out


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def recording_queries() -> list[tuple[str, str]]:
    return [(f"record {r['record']}", r["expr"]) for r in rules() if "record" in r]


def alert_queries() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']} {r['labels']}", r["expr"]) for r in rules() if "alert" in r]


# --- the stack, Prometheus and traffic ----------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    # A limit the test's own traffic stays far below: the rate-limit panels read the reports either way.
    with local_stack(tmp_path_factory.mktemp("obs-stack"), {"SERVEGRID_EDGE_DEFAULT_LIMIT": "1000000"}) as running:
        yield running


@pytest.fixture(scope="module")
def prometheus(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    jobs = {
        "envoy": ("/stats/prometheus", [stack.envoy_admin]),
        "triton": ("/metrics", [f"127.0.0.1:{stack.ports['TRITON_METRICS_PORT']}"]),
        **{name: ("/metrics", [stack.metrics_address(name)]) for name in METRICS_SERVICES},
    }
    with run_prometheus(tmp_path_factory.mktemp("prometheus"), scrape_config(jobs, [RULES])) as server:
        wait_for(
            lambda: len(server.query("up == 1")) == len(jobs),
            60,
            poll_s=0.5,
            detail=f"for Prometheus to scrape all {len(jobs)} targets",
        )
        yield server


class Traffic:
    """Inference through Envoy's public port as clients send it: tritonclient gRPC and REST, the gateway's REST."""

    def __init__(self, stack: LocalStack, token: str) -> None:
        self.stack = stack
        self.headers = {"authorization": f"Bearer {token}"}
        self.grpc = grpcclient.InferenceServerClient(stack.envoy, ssl=True, root_certificates=str(stack.ca_file))
        self.http = httpclient.InferenceServerClient(
            stack.envoy, ssl=True, ssl_options={"ca_certs": str(stack.ca_file)}
        )
        self.inputs = {
            "affine": self._input(grpcclient, "x", (1, 4)),
            "digits": self._input(grpcclient, "pixels", (1, 64)),
            "resnet18": self._input(grpcclient, "input", (1, 3, 224, 224)),
        }

    @staticmethod
    def _input(module: Any, name: str, shape: tuple[int, ...]) -> Any:
        tensor = module.InferInput(name, list(shape), "FP32")
        tensor.set_data_from_numpy(np.random.default_rng(0).random(shape, dtype=np.float32))
        return tensor

    def infer(self, model: str) -> None:
        self.grpc.infer(model, [self.inputs[model]], headers=dict(self.headers))

    def infer_rest(self) -> None:
        # tritonclient adds its own headers to the dict it is given: a copy each time.
        self.http.infer("affine", [self._input(httpclient, "x", (1, 4))], headers=dict(self.headers))

    def gateway_rest(self) -> None:
        body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,4],"data":{"fp32":[1,2,3,4]}}]}'
        request = urllib.request.Request(
            f"https://{self.stack.envoy}/v1/models/affine:infer", data=body, headers=self.headers, method="POST"
        )
        context = ssl.create_default_context(cafile=str(self.stack.ca_file))
        with urllib.request.urlopen(request, timeout=30, context=context) as reply:
            assert reply.status == 200

    def client_mistake(self) -> None:
        """INVALID_ARGUMENT from Triton: a caller's error, which no availability SLI may count."""
        wrong = self._input(grpcclient, "x", (1, 3))
        with pytest.raises(Exception, match="INVALID_ARGUMENT"):
            self.grpc.infer("affine", [wrong], headers=dict(self.headers))

    def round(self) -> None:
        for model in MODELS:
            self.infer(model)
        self.infer_rest()


@pytest.fixture(scope="module")
def traffic(stack: LocalStack, prometheus: Prometheus, tmp_path_factory: pytest.TempPathFactory) -> Traffic:
    token = stack.cli("token", "--tenant", "obs", "--role", "user", "--role", "admin").strip()
    sent = Traffic(stack, token)
    # A canary on digits (v1/v2 half and half) with every request mirrored to v3, the shadow.
    for _ in range(2):
        version = stack.cli("models", "add-version", "digits", "--triton-model", "digits").strip()
        stack.cli("models", "promote", "digits", version, "--stage", "staging", "--load")
    stack.cli("models", "traffic", "digits", "--split", "1=50", "--split", "2=50", "--shadow", "3=1.0")
    wait_for(
        lambda: bool(
            prometheus.query('envoy_cluster_membership_healthy{envoy_cluster_name="kserve|digits|v2|grpc"} > 0')
        ),
        60,
        poll_s=0.5,
        detail="for the canary's cluster in Envoy",
    )
    for _ in range(40):
        sent.round()
    for _ in range(3):
        sent.gateway_rest()
        sent.client_mistake()
    items = tmp_path_factory.mktemp("batch") / "items.jsonl"
    items.write_text(
        "".join(
            json.dumps(
                {
                    "item_id": str(i),
                    "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": {"fp32": [i] * 4}}],
                }
            )
            + "\n"
            for i in range(50)
        )
    )
    assert "SUCCEEDED" in stack.cli("batch", "submit", str(items), "--model", "affine") + stack.cli("batch", "list")
    # Envoy publishes histograms at its stats flush (every 5 s); the rules evaluate every second.
    checks = {
        "every model's p99 from Envoy's histograms": (
            "count(model:servegrid_request_duration_seconds:p99_rate5m >= 0) >= 3"
        ),
        "both canary versions": 'count(model_version:servegrid_requests:rate5m{model="digits"} > 0) >= 2',
        "shadow comparisons": 'sum(servegrid_router_shadow_requests_total{outcome="compared"}) > 0',
        "the batch job's items": 'sum(servegrid_batch_items_total{outcome="succeeded"}) >= 50',
        "the batch job's duration": "sum(servegrid_batch_job_duration_seconds_count) >= 1",
        "the quota reports": 'sum(servegrid_edge_quota_requests_total{decision="allowed"}) > 0',
        "the objectives": "count(model:servegrid_slo_latency_threshold:seconds) >= 3",
    }
    for what, expr in checks.items():
        wait_for(functools.partial(_has_data, prometheus, expr), 90, poll_s=0.5, detail=f"for {what}")
    return sent


def _has_data(prometheus: Prometheus, expr: str) -> bool:
    return bool(prometheus.query(expr))


# --- the checks ---------------------------------------------------------------------------------


def test_every_query_names_only_metrics_something_exports(prometheus: Prometheus, traffic: Traffic) -> None:
    exported = prometheus.names()
    gpu = bool(GPU_ONLY & exported)
    unknown = []
    for where, expr in [*dashboard_queries(), *recording_queries(), *alert_queries()]:
        names = metric_names(expr)
        assert names, f"{where}: no metric found in {expr!r}"
        missing = names - exported - (set() if gpu else GPU_ONLY)
        if missing:
            unknown.append(f"{where}: {sorted(missing)}")
    assert unknown == [], "queries naming metrics nobody exports:\n" + "\n".join(unknown)


def test_every_panel_and_recording_rule_has_data_after_traffic(prometheus: Prometheus, traffic: Traffic) -> None:
    gpu = bool(GPU_ONLY & prometheus.names())
    empty = []
    for where, expr in [*dashboard_queries(), *recording_queries()]:
        if not gpu and metric_names(expr) & GPU_ONLY:
            continue  # no GPU here: Triton exports none of these
        if not finite_values(prometheus.query(expr)):
            empty.append(f"{where}:\n    {expr}")
    assert empty == [], "queries with no data after traffic:\n" + "\n".join(empty)


def test_a_healthy_stack_fires_no_alert(prometheus: Prometheus, traffic: Traffic) -> None:
    """Every alert expression evaluates (no PromQL error) and is quiet: the traffic's only errors were the
    caller's own (INVALID_ARGUMENT), which no SLO counts. promtool's tests make each one fire."""
    firing = {where: result for where, expr in alert_queries() if (result := prometheus.query(expr))}
    assert firing == {}
    assert prometheus.query('ALERTS{alertstate="firing"}') == []


def test_each_process_reports_when_its_certificate_expires(stack: LocalStack, prometheus: Prometheus) -> None:
    """What CertificateExpiring reads: each service its own mesh certificate's notAfter, Envoy the days
    left on the nearest of its certificates (real ones here: 2^32 - 1 would mean none)."""
    from cryptography import x509

    reported = {
        s["metric"]["job"]: float(s["value"][1])
        for s in prometheus.query('servegrid_tls_certificate_expiry_timestamp_seconds{certificate="mesh"}')
    }
    certificates = stack.home / "certs"
    expected = {
        name: x509.load_pem_x509_certificate(
            (certificates / f"{name}.crt").read_bytes()
        ).not_valid_after_utc.timestamp()
        for name in METRICS_SERVICES
    }
    assert reported == expected
    (envoy,) = prometheus.query("envoy_server_days_until_first_cert_expiring")
    assert 0 < float(envoy["value"][1]) <= 825  # the local stack's certificates last 825 days


def test_the_slis_see_the_traffic_and_the_objectives_reach_each_model(prometheus: Prometheus, traffic: Traffic) -> None:
    def by_model(expr: str) -> dict[str, float]:
        return {s["metric"]["model"]: float(s["value"][1]) for s in prometheus.query(expr)}

    rates = by_model("model:servegrid_requests:rate5m")
    assert set(MODELS) <= set(rates) and all(rates[m] > 0 for m in MODELS), rates
    errors = by_model("model:servegrid_request_errors:ratio_rate5m")
    assert {m: errors[m] for m in MODELS} == dict.fromkeys(MODELS, 0.0), "INVALID_ARGUMENT burns no budget"
    # deploy/observability/slo.yaml: resnet18 has a 1000 ms threshold, digits a 99.5% availability target.
    thresholds = by_model("model:servegrid_slo_latency_threshold:seconds")
    assert {m: thresholds[m] for m in MODELS} == {"affine": 0.25, "digits": 0.25, "resnet18": 1.0}
    availability = by_model("model:servegrid_slo_availability_objective:ratio")
    assert {m: availability[m] for m in MODELS} == pytest.approx({"affine": 0.999, "digits": 0.995, "resnet18": 0.999})


# --- servegrid top ------------------------------------------------------------------------------


def _top(stack: LocalStack, *args: str) -> str:
    env = {**stack.env, "COLUMNS": "160"}
    done = subprocess.run(
        [sys.executable, "-m", "services.cli.main", "top", "--once", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _row(output: str, model: str) -> list[str]:
    line = next((line for line in output.splitlines() if re.search(rf"\b{model}\b", line)), None)
    assert line is not None, output
    return [cell.strip() for cell in re.split(r"[│|]", line) if cell.strip()]


def test_servegrid_top_once_shows_live_rates_from_envoy(stack: LocalStack, traffic: Traffic) -> None:
    stop = threading.Event()

    def keep_sending() -> None:
        while not stop.is_set():
            traffic.infer("affine")

    sender = threading.Thread(target=keep_sending, daemon=True)
    sender.start()
    try:
        output = _top(stack, "--interval", "6", "--envoy", stack.envoy_admin)
    finally:
        stop.set()
        sender.join(30)
    _, rate, errors, p50, p99 = _row(output, "affine")
    assert float(rate) > 1 and errors == "0.00%", output
    assert p50.endswith("ms") and p99.endswith("ms"), output


def test_servegrid_top_reads_a_prometheus_server_too(
    stack: LocalStack, prometheus: Prometheus, traffic: Traffic
) -> None:
    output = _top(stack, "--prometheus", prometheus.url, "--window", "5m", "--versions")
    digits = [_row(line, "digits") for line in output.splitlines() if re.search(r"\bdigits\b", line)]
    # v1 and v2 split the traffic; v3 is the shadow, asked by the router's comparisons through the mesh.
    assert {version for _, version, *_ in digits} == {"v1", "v2", "v3"}, output
    assert all(float(rate) > 0 and errors == "0.00%" for _, _, rate, errors, *_ in digits), output
