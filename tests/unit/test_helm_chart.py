"""The Helm chart lints, renders valid Kubernetes objects for each kind of install (any release name),
Envoy's config rendered from its flags names only what the release creates and passes `envoy --mode
validate`, every service gets the settings it needs, and its values do what they say."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from google.protobuf import descriptor_pb2
from pydantic_settings import BaseSettings
from yamllint import linter
from yamllint.config import YamlLintConfig

from scripts import gen_chart_readme
from services.batch.settings import BatchSettings
from services.edge.devkeys import DevIssuer
from services.edge.settings import EdgeSettings
from services.gateway.settings import GatewaySettings
from services.mesh import bootstrap, names
from services.registry.settings import RegistrySettings
from services.router.settings import RouterSettings
from services.stack import certs
from services.stack.triton import opentelemetry_trace_config
from tests.support.chart import CHART, KUBE_VERSION, by_kind, render, render_files
from tests.support.envoy import envoy_binary, validate_config

SERVICES = ("gateway", "router", "registry", "batch", "edge")
SETTINGS: dict[str, type[BaseSettings]] = {
    "gateway": GatewaySettings,
    "router": RouterSettings,
    "registry": RegistrySettings,
    "batch": BatchSettings,
    "edge": EdgeSettings,
}

# Everything on at once: mutual TLS inside, TLS on the public port, exchanged tokens, an identity
# provider with a JWKS endpoint, tracing, a restricted public port and the `helm test` hook.
SECURED: dict[str, Any] = {
    "tls": {"existingSecret": "servegrid-mtls"},
    "publicTls": {"existingSecret": "servegrid-public-tls"},
    "tokens": {"existingSecret": "servegrid-tokens", "ttlSeconds": 120, "issuer": "ml-edge"},
    "jwt": {
        "issuer": "https://login.example.com/",
        "audience": "api://servegrid",
        "jwksUri": "https://login.example.com/.well-known/jwks.json",
        "maxLifetimeSeconds": 3600,
    },
    "otlpEndpoint": "http://otel-collector.monitoring:4317",
    "networkPolicy": {"publicFrom": [{"namespaceSelector": {"matchLabels": {"name": "ingress"}}}]},
    "tests": {"apiKeySecret": "servegrid-test-key", "serverName": "api.example.com", "caSecret": "api-ca"},
}
INLINE_JWKS: dict[str, Any] = {
    "jwt": {"issuer": "https://idp.internal", "jwks": DevIssuer.generate().jwks()},
    "rateLimit": {"unit": "second", "defaultLimit": 20, "tenantLimits": {"acme": 200}, "failClosed": True},
}
# name → (values, release name)
VALUE_SETS: dict[str, tuple[dict[str, Any] | None, str]] = {
    "default": (None, "servegrid"),
    "external-databases": (
        {
            "database": {"existingSecret": "pg", "urlKey": "uri"},
            "redis": {"existingSecret": "cache", "urlKey": "url"},
            "kafka": {"bootstrap": "kafka-0.kafka:9092,kafka-1.kafka:9092"},
        },
        "servegrid",
    ),
    "gpu-triton": (
        {"triton": {"gpu": {"enabled": True, "count": 2, "nodeSelector": {"nvidia.com/gpu.present": "true"}}}},
        "servegrid",
    ),
    "other-release": (None, "ml"),
    "secured": (SECURED, "prod"),
    "inline-jwks": (INLINE_JWKS, "ml"),
}
ENVOY_SETS = ["default", "other-release", "secured", "inline-jwks"]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def fullname(release: str) -> str:
    return release if "servegrid" in release else f"{release}-servegrid"


def envoy_pod(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = [d for name, d in by_kind(docs, "Deployment").items() if name.endswith("-envoy")]
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def render_args(docs: list[dict[str, Any]]) -> list[str]:
    """The flags the Envoy pod's init container gives `python -m services.mesh.bootstrap`."""
    (init,) = envoy_pod(docs)["initContainers"]
    assert init["command"] == ["python", "-m", "services.mesh.bootstrap"]
    return [str(arg) for arg in init["args"]]


def _flag(args: list[str], name: str) -> str:
    return args[len(args) - 1 - args[::-1].index(name) + 1]


def run_renderer(args: list[str], directory: Path, prefixes: dict[str, Path] | None = None) -> dict[str, Any]:
    """Run exactly `args` through the renderer, the mount paths in them moved under `prefixes`; returns
    the config written to --out."""
    moved = list(args)
    for mount, local in sorted((prefixes or {}).items(), key=lambda item: -len(item[0])):
        moved = [str(local) + arg[len(mount) :] if arg.startswith(mount + "/") else arg for arg in moved]
    if prefixes is None:  # only the outputs move
        out, descriptors = directory / "envoy.yaml", directory / "descriptors.binpb"
        moved[moved.index("--out") + 1] = str(out)
        moved[moved.index("--descriptor-set-out") + 1] = str(descriptors)
    assert bootstrap.main(moved) == 0
    config: dict[str, Any] = yaml.safe_load(Path(_flag(moved, "--out")).read_text())
    return config


def envoy_config(values: dict[str, Any] | None, tmp_path: Path, name: str = "servegrid") -> dict[str, Any]:
    return run_renderer(render_args(render(values, name)), tmp_path)


def _files_read(node: Any) -> list[str]:
    """Every file path an Envoy config reads (certificates, keys, JWKS, the descriptor set)."""
    if isinstance(node, dict):
        found = [v for k, v in node.items() if k in ("filename", "proto_descriptor") and isinstance(v, str)]
        return found + [f for v in node.values() for f in _files_read(v)]
    if isinstance(node, list):
        return [f for v in node for f in _files_read(v)]
    return []


def _public_listener(config: dict[str, Any]) -> dict[str, Any]:
    (public,) = [x for x in config["static_resources"]["listeners"] if x["name"] == names.PUBLIC]
    return public


def _http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    hcm = _public_listener(config)["filter_chains"][0]["filters"][0]["typed_config"]
    (found,) = [f["typed_config"] for f in hcm["http_filters"] if f["name"] == name]
    return found


# --- the chart as a whole --------------------------------------------------------------------------


def test_chart_lints_clean_in_strict_mode() -> None:
    report = helm.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("case", list(VALUE_SETS))
def test_rendered_manifests_are_valid_kubernetes_and_yaml(case: str) -> None:
    values, name = VALUE_SETS[case]
    config = YamlLintConfig("extends: relaxed\nrules: {line-length: disable}")
    kinds = set()
    for path, text in render_files(values, name).items():
        if path.endswith("NOTES.txt"):
            continue
        problems = [p for p in linter.run(text, config) if p.level == "error"]
        assert problems == [], path
        for doc in yaml.safe_load_all(text):
            if doc:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
                kinds.add(doc["kind"])
                assert doc["metadata"]["name"].startswith(fullname(name)), doc["metadata"]["name"]
    assert {"Deployment", "Service", "StatefulSet", "NetworkPolicy", "PodDisruptionBudget"} <= kinds


def test_values_schema_rejects_a_bad_value_naming_the_key() -> None:
    chart = helm.Chart.load(CHART)
    with pytest.raises(helm.HelmValuesError, match=r"at '/services/gateway/replicas': got string, want integer"):
        chart.render({"services": {"gateway": {"replicas": "two"}}}, name="servegrid", namespace="ml")
    report = helm.lint(CHART, {"services": {"gateway": {"replicas": "two"}}}, kube_version=f"v{KUBE_VERSION}")
    assert any("/services/gateway/replicas" in error for error in report["errors"])
    cases: list[tuple[dict[str, Any], str]] = [
        ({"rateLimit": {"unit": "week"}}, r"at '/rateLimit/unit': value must be one of"),
        ({"envoy": {"replica": 2}}, r"at '/envoy': additional properties 'replica' not allowed"),
        ({"otlpEndpoint": "otel:4317"}, r"at '/otlpEndpoint'"),
        ({"tokens": {"ttlSeconds": 86400}}, r"at '/tokens/ttlSeconds'"),
    ]
    for bad, message in cases:
        with pytest.raises(helm.HelmValuesError, match=message):
            chart.validate_schema(bad)
    chart.validate_schema(None)
    # Another part of the chart owns `observability`: any object passes here.
    chart.validate_schema({"observability": {"anything": {"nested": [1, 2]}}})


def test_chart_readme_is_generated_from_the_values_comments() -> None:
    assert gen_chart_readme.main(["--check"]) == 0
    text = (CHART / "values.yaml").read_text()
    rows = {entry.path: entry for entry in gen_chart_readme.entries(text)}
    assert rows["jwt.jwksUri"].default == "" and "JWKS endpoint" in " ".join(rows["jwt.jwksUri"].comment)
    # A block list is one entry; its items are not keys of their own.
    assert rows["networkPolicy.monitoringFrom"].default[0]["namespaceSelector"]
    assert not any(path.startswith("networkPolicy.monitoringFrom.") for path in rows)
    table = gen_chart_readme.values_table(text)
    assert "| `services.gateway.replicas` | `2` |" in table
    assert "&lt;component&gt;.crt" in table  # shown, not swallowed as an HTML tag


def test_images_are_pinned_and_envoy_is_the_version_the_tests_validate_with() -> None:
    version = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, check=True).stdout
    (tested,) = set(re.findall(r"/(\d+\.\d+\.\d+)/", version))
    values = helm.Chart.load(CHART).values
    assert values["envoy"]["image"]["tag"] == f"v{tested}"
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    docs = render({"tests": {"apiKeySecret": "k"}})
    images = set()
    for doc in docs:
        pod = doc["spec"]["template"]["spec"] if "template" in doc.get("spec", {}) else doc.get("spec", {})
        for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
            images.add(container["image"])
    assert images == {
        f"servegrid/servegrid:{app_version}",
        f"envoyproxy/envoy:v{tested}",
        "nvcr.io/nvidia/tritonserver:24.10-py3",
        "curlimages/curl:8.11.1",
    }
    assert not any(image.endswith((":latest", ":")) or "-latest" in image for image in images)


def test_notes_print_the_first_call_through_this_releases_envoy() -> None:
    notes = render_files(None, "ml")["servegrid/templates/NOTES.txt"]
    assert "kubectl -n ml port-forward svc/ml-servegrid-envoy 8080:8080" in notes
    assert "exec deploy/ml-servegrid-edge -- python -m services.edge.keys create" in notes
    assert "http://127.0.0.1:8080/v1/models/affine:infer" in notes
    assert "grpcurl -plaintext" in notes and "servegrid.gateway.v1.GatewayService/Infer" in notes
    (body,) = re.findall(r"-d '(\{\"model_id\".*)'", notes)
    assert json.loads(body)["model_id"] == "affine"  # the grpcurl body is valid JSON
    secured = render_files(SECURED, "prod")["servegrid/templates/NOTES.txt"]
    assert "https://NAME:8080/v1/models/affine:infer" in secured and "--cacert CA" in secured
    assert "https://login.example.com/" in secured and "helm test prod -n ml" in secured


# --- Envoy's config: rendered in the pod from the release's names -----------------------------------


@pytest.mark.parametrize("case", ENVOY_SETS)
def test_envoy_config_names_only_services_this_release_creates(case: str, tmp_path: Path) -> None:
    values, name = VALUE_SETS[case]
    docs = render(values, name)
    config = run_renderer(render_args(docs), tmp_path)
    ports = {svc_name: {p["port"] for p in svc["spec"]["ports"]} for svc_name, svc in by_kind(docs, "Service").items()}
    named = set()
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] in ("admin", names.JWKS_CLUSTER, names.OTEL_CLUSTER):
            continue  # Envoy's own admin on loopback, and what lives outside the release
        for endpoint in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]:
            address = endpoint["endpoint"]["address"]["socket_address"]
            host, port = address["address"], address["port_value"]
            assert host in ports, f"Envoy's {cluster['name']} cluster names {host}, which the chart does not create"
            assert port in ports[host], f"{host} has no port {port}"
            named.add(host)
    assert named == {f"{fullname(name)}-{s}" for s in ("gateway", "router", "registry", "edge")}
    # The public and mesh listeners are the container ports the Services target.
    pod = envoy_pod(docs)
    container_ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
    listeners = {
        x["name"]: x["address"]["socket_address"]["port_value"] for x in config["static_resources"]["listeners"]
    }
    assert listeners == {"public": container_ports["http"], "mesh": container_ports["mesh"], "stats": 9901}
    # Every file the config reads is mounted into the Envoy container.
    mounts = [m["mountPath"] for m in pod["containers"][0]["volumeMounts"]]
    for path in _files_read(config):
        assert any(path.startswith(m + "/") for m in mounts), f"{path} is not mounted into Envoy"


@pytest.fixture(scope="module")
def secret_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, bytes]]:
    """What the Secrets the value sets name would hold: secretName → key → bytes."""
    root = tmp_path_factory.mktemp("secrets")
    mesh = certs.generate(root / "mtls", ["envoy"])["envoy"]
    public = certs.generate_public(root / "public", ["api.example.com"])
    tokens = DevIssuer.generate().write(root / "tokens")
    return {
        "servegrid-mtls": {
            "ca.crt": mesh.ca.read_bytes(),
            "envoy.crt": mesh.cert.read_bytes(),
            "envoy.key": mesh.key.read_bytes(),
        },
        "servegrid-public-tls": {"tls.crt": public.cert.read_bytes(), "tls.key": public.key.read_bytes()},
        "servegrid-tokens": {"jwks.json": tokens.read_bytes()},
    }


def _materialize(docs: list[dict[str, Any]], secrets: dict[str, dict[str, bytes]], root: Path) -> dict[str, Path]:
    """The Envoy container's volume mounts as local directories holding what the kubelet would put
    there (ConfigMap items from the rendered ConfigMap, Secret items from `secrets`): mountPath → dir."""
    pod = envoy_pod(docs)
    config_maps = by_kind(docs, "ConfigMap")
    volumes = {v["name"]: v for v in pod["volumes"]}
    out = {}
    for mount in pod["containers"][0]["volumeMounts"]:
        volume = volumes[mount["name"]]
        directory = root / mount["name"]
        directory.mkdir()
        if "configMap" in volume:
            data = config_maps[volume["configMap"]["name"]]["data"]
            for item in volume["configMap"]["items"]:
                (directory / item["path"]).write_text(data[item["key"]])
        elif "secret" in volume:
            content = secrets[volume["secret"]["secretName"]]
            for item in volume["secret"]["items"]:
                (directory / item["path"]).write_bytes(content[item["key"]])
        out[mount["mountPath"]] = directory
    return out


@pytest.mark.parametrize("case", ENVOY_SETS)
def test_envoy_validates_the_config_the_chart_asks_for(
    case: str, secret_files: dict[str, dict[str, bytes]], tmp_path: Path
) -> None:
    values, name = VALUE_SETS[case]
    docs = render(values, name)
    mounts = _materialize(docs, secret_files, tmp_path)
    run_renderer(render_args(docs), tmp_path, mounts)
    result = validate_config(mounts["/etc/envoy"] / "envoy.yaml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_init_container_writes_config_and_descriptor_set_into_the_volume_envoy_reads(tmp_path: Path) -> None:
    docs = render()
    pod = envoy_pod(docs)
    args = render_args(docs)
    assert _flag(args, "--out") == "/etc/envoy/envoy.yaml"
    assert _flag(args, "--descriptor-set-out") == "/etc/envoy/descriptors.binpb"
    (init,) = pod["initContainers"]
    envoy = pod["containers"][0]
    assert envoy["args"][:2] == ["-c", "/etc/envoy/envoy.yaml"]
    assert init["volumeMounts"] == [{"name": "rendered", "mountPath": "/etc/envoy"}]
    assert {"name": "rendered", "mountPath": "/etc/envoy", "readOnly": True} in envoy["volumeMounts"]
    assert {"name": "rendered", "emptyDir": {"sizeLimit": "16Mi"}} in pod["volumes"]
    assert (
        init["image"]
        == by_kind(docs, "Deployment")["servegrid-gateway"]["spec"]["template"]["spec"]["containers"][0]["image"]
    )
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    config = run_renderer(args, tmp_path)
    transcoder = _http_filter(config, "envoy.filters.http.grpc_json_transcoder")
    assert transcoder["proto_descriptor"] == "/etc/envoy/descriptors.binpb"
    descriptors = descriptor_pb2.FileDescriptorSet.FromString((tmp_path / "descriptors.binpb").read_bytes())
    assert "servegrid/gateway/v1/gateway.proto" in {f.name for f in descriptors.file}
    assert by_kind(docs, "ConfigMap") == {}  # nothing pre-rendered travels in the chart


def test_extra_args_reach_the_renderer_after_the_charts_own(tmp_path: Path) -> None:
    values = {"envoy": {"extraArgs": ["--max-request-body-bytes", "1048576", "--mesh-port", "8091"]}}
    args = render_args(render(values))
    assert args[-10:-6] == values["envoy"]["extraArgs"]
    config = run_renderer(args, tmp_path)
    assert _http_filter(config, "envoy.filters.http.buffer")["max_request_bytes"] == 1048576
    listeners = {
        x["name"]: x["address"]["socket_address"]["port_value"] for x in config["static_resources"]["listeners"]
    }
    assert listeners["mesh"] == 8091  # a later flag wins


def test_a_users_own_config_replaces_the_rendered_one() -> None:
    docs = render({"envoy": {"config": "admin: {}\n"}}, name="other")
    config_map = by_kind(docs, "ConfigMap")["other-servegrid-envoy"]
    assert config_map["data"]["envoy.yaml"].strip() == "admin: {}"
    pod = envoy_pod(docs)
    envoy = pod["containers"][0]
    assert envoy["args"][:2] == ["-c", "/etc/servegrid/envoy-config/envoy.yaml"]
    assert {"name": "config", "mountPath": "/etc/servegrid/envoy-config", "readOnly": True} in envoy["volumeMounts"]
    # The init container still provides the descriptor set a Kubernetes-profile config reads.
    args = render_args(docs)
    assert _flag(args, "--descriptor-set-out") == "/etc/envoy/descriptors.binpb" and _flag(args, "--out") == "/dev/null"
    assert (
        "checksum/config"
        in by_kind(docs, "Deployment")["other-servegrid-envoy"]["spec"]["template"]["metadata"]["annotations"]
    )


def test_jwt_values_configure_the_identity_provider(tmp_path: Path) -> None:
    docs = render(SECURED, "prod")
    config = run_renderer(render_args(docs), tmp_path)
    jwt = _http_filter(config, "envoy.filters.http.jwt_authn")["providers"]
    assert jwt["servegrid"]["issuer"] == "https://login.example.com/"
    assert jwt["servegrid"]["remote_jwks"]["http_uri"]["uri"] == "https://login.example.com/.well-known/jwks.json"
    assert jwt["servegrid"]["max_lifetime"] == "3600s"
    assert jwt["servegrid-edge"]["issuer"] == "ml-edge"  # tokens.issuer: the edge signs it, Envoy trusts it
    rbac = json.dumps(_http_filter(config, "envoy.filters.http.rbac"))
    assert '"exact": "api://servegrid"' in rbac and '"exact": "servegrid"' not in rbac
    jwks_cluster = [c for c in config["static_resources"]["clusters"] if c["name"] == names.JWKS_CLUSTER]
    assert jwks_cluster and jwks_cluster[0]["transport_socket"]["typed_config"]["sni"] == "login.example.com"
    # The edge signs exchanged tokens for the same audience, or RBAC would refuse them.
    edge = env_of(by_kind(docs, "Deployment")["prod-servegrid-edge"]["spec"]["template"]["spec"]["containers"][0])
    assert edge["SERVEGRID_EDGE_TOKEN_AUDIENCE"] == "api://servegrid"
    assert edge["SERVEGRID_EDGE_TOKEN_ISSUER"] == "ml-edge"


def test_an_inline_jwks_reaches_envoy_through_a_config_map(tmp_path: Path) -> None:
    docs = render(INLINE_JWKS, "ml")
    config_map = by_kind(docs, "ConfigMap")["ml-servegrid-envoy"]
    assert json.loads(config_map["data"]["idp-jwks.json"]) == INLINE_JWKS["jwt"]["jwks"]
    config = run_renderer(render_args(docs), tmp_path)
    provider = _http_filter(config, "envoy.filters.http.jwt_authn")["providers"]["servegrid"]
    assert provider == provider | {
        "issuer": "https://idp.internal",
        "local_jwks": {"filename": "/etc/servegrid/idp-jwks/jwks.json"},
    }
    assert names.JWKS_CLUSTER not in {c["name"] for c in config["static_resources"]["clusters"]}
    # As JSON text (--set-file jwt.jwks=jwks.json) it arrives the same.
    text = json.dumps(INLINE_JWKS["jwt"]["jwks"])
    as_text = by_kind(render({"jwt": {"issuer": "https://idp.internal", "jwks": text}}), "ConfigMap")
    assert json.loads(as_text["servegrid-envoy"]["data"]["idp-jwks.json"]) == INLINE_JWKS["jwt"]["jwks"]


def test_the_renderer_takes_one_jwks_source_and_says_so(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bootstrap.main(["--profile", "kubernetes", "--jwks-file", "jwks.json", "--jwks-uri", "https://idp/jwks"])
    assert exit_info.value.code == 2
    assert "--jwks-file or --jwks-uri, not both" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("jwt", "message"),
    [
        ({"issuer": "https://idp"}, r"jwt.issuer is set but no JWKS"),
        ({"jwksUri": "https://idp/jwks"}, r"jwt.issuer is empty"),
        (
            {"issuer": "https://idp", "jwksUri": "https://idp/jwks", "jwks": '{"keys": [{}]}'},
            r"jwksUri or jwks, not both",
        ),
    ],
)
def test_half_set_jwt_values_fail_with_a_clear_message(jwt: dict[str, str], message: str) -> None:
    with pytest.raises(helm.HelmError, match=message):
        render({"jwt": jwt})


def test_rate_limits_reach_the_edge_and_envoy_alike(tmp_path: Path) -> None:
    docs = render(INLINE_JWKS, "ml")
    edge = env_of(by_kind(docs, "Deployment")["ml-servegrid-edge"]["spec"]["template"]["spec"]["containers"][0])
    assert (edge["SERVEGRID_EDGE_LIMIT_UNIT"], edge["SERVEGRID_EDGE_DEFAULT_LIMIT"]) == ("second", "20")
    assert json.loads(edge["SERVEGRID_EDGE_TENANT_LIMITS"]) == {"acme": 200}
    settings = settings_from(EdgeSettings, edge)
    assert isinstance(settings, EdgeSettings)
    assert (settings.limit_unit, settings.default_limit, settings.tenant_limits) == ("second", 20, {"acme": 200})
    args = render_args(docs)
    assert _flag(args, "--ratelimit-window-s") == "1" and "--ratelimit-fail-closed" in args
    run_renderer(args, tmp_path)
    assert _flag(render_args(render()), "--ratelimit-window-s") == "60"


def test_tracing_goes_to_the_same_collector_from_envoy_and_the_services() -> None:
    docs = render(SECURED, "prod")
    assert _flag(render_args(docs), "--otlp-endpoint") == "otel-collector.monitoring:4317"
    gateway = env_of(by_kind(docs, "Deployment")["prod-servegrid-gateway"]["spec"]["template"]["spec"]["containers"][0])
    assert gateway["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://otel-collector.monitoring:4317"
    assert "--otlp-endpoint" not in render_args(render())


def test_triton_traces_to_the_collector_as_the_local_stack_has_it() -> None:
    """The chart's Triton flags are the stack's (services.stack.triton), so a trace that works locally
    works in the cluster; no URL, no tracing."""
    url = "http://otel-collector.monitoring:4318/v1/traces"

    def triton_args(values: dict[str, Any] | None) -> list[str]:
        triton = by_kind(render(values), "StatefulSet")["servegrid-triton"]["spec"]["template"]["spec"]
        return [a for a in triton["containers"][0]["args"] if a.startswith("--trace-config")]

    assert triton_args({"triton": {"tracesUrl": url}}) == [
        f"--trace-config={v}" for v in opentelemetry_trace_config(url)
    ]
    assert triton_args(None) == []


def test_the_token_secret_gives_the_edge_its_key_and_envoy_only_the_jwks(tmp_path: Path) -> None:
    plain = envoy_config(None, tmp_path / "plain")
    assert "servegrid-edge" not in _http_filter(plain, "envoy.filters.http.jwt_authn")["providers"]
    docs = render({"tokens": {"existingSecret": "servegrid-tokens", "ttlSeconds": 120}})
    deployments = by_kind(docs, "Deployment")
    edge = deployments["servegrid-edge"]["spec"]["template"]["spec"]
    env = env_of(edge["containers"][0])
    assert env["SERVEGRID_EDGE_TOKEN_SIGNING_KEY_FILE"] == "/etc/servegrid/token-key/signing-key.pem"
    assert env["SERVEGRID_EDGE_TOKEN_TTL_S"] == "120"
    (key_volume,) = [v for v in edge["volumes"] if v["name"] == "token-key"]
    assert key_volume["secret"] == {
        "secretName": "servegrid-tokens",
        "items": [{"key": "signing-key.pem", "path": "signing-key.pem"}],
    }
    envoy = envoy_pod(docs)
    (jwks_volume,) = [v for v in envoy["volumes"] if v["name"] == "token-jwks"]
    assert jwks_volume["secret"]["items"] == [{"key": "jwks.json", "path": "jwks.json"}]
    mounts = {m["name"]: m["mountPath"] for m in envoy["containers"][0]["volumeMounts"]}
    config = run_renderer(render_args(docs), tmp_path)
    provider = _http_filter(config, "envoy.filters.http.jwt_authn")["providers"]["servegrid-edge"]
    assert provider["local_jwks"]["filename"] == f"{mounts['token-jwks']}/jwks.json"
    # No other pod gets the signing key.
    for name, deployment in deployments.items():
        volumes = deployment["spec"]["template"]["spec"].get("volumes", [])
        if name != "servegrid-edge":
            assert all("signing-key.pem" not in str(v) for v in volumes), name


def test_the_mtls_secret_gives_each_pod_its_own_certificate_and_envoy_a_config_speaking_tls(tmp_path: Path) -> None:
    plain = by_kind(render(), "Deployment")
    assert "TLS" not in str(env_of(plain["servegrid-gateway"]["spec"]["template"]["spec"]["containers"][0]))
    docs = render({"tls": {"existingSecret": "servegrid-mtls"}})
    config = run_renderer(render_args(docs), tmp_path)
    text = yaml.safe_dump(config)
    assert "require_client_certificate: true" in text
    assert "filename: /etc/servegrid/mtls/envoy.key" in text
    deployments = by_kind(docs, "Deployment")
    for name in SERVICES:
        pod = deployments[f"servegrid-{name}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = env_of(container)
        prefix = f"SERVEGRID_{name.upper()}_"
        assert env[f"{prefix}TLS_CERT_FILE"] == f"/etc/servegrid/mtls/{name}.crt"
        assert env[f"{prefix}TLS_KEY_FILE"] == f"/etc/servegrid/mtls/{name}.key"
        assert env[f"{prefix}TLS_CA_FILE"] == "/etc/servegrid/mtls/ca.crt"
        # kubelet cannot present a certificate: its probes use the plaintext health-only port.
        health = int(env[f"{prefix}HEALTH_PORT"])
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == health != int(env[f"{prefix}PORT"])
        (volume,) = [v for v in pod["volumes"] if v["name"] == "mtls"]
        assert volume["secret"]["secretName"] == "servegrid-mtls"
        allowed = {
            "registry": ["envoy", "gateway", "router"],
            "router": ["envoy"],
            "edge": ["envoy"],
            "batch": ["gateway"],
        }
        assert json.loads(env.get(f"{prefix}TLS_ALLOWED_PEERS", "[]")) == allowed.get(name, [])
        assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt", f"{name}.crt", f"{name}.key"]
    (volume,) = [v for v in envoy_pod(docs)["volumes"] if v["name"] == "mtls"]
    assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt", "envoy.crt", "envoy.key"]


def test_the_public_tls_secret_mounts_into_envoy_and_switches_the_public_listener_to_tls(tmp_path: Path) -> None:
    plain = envoy_config(None, tmp_path / "plain")
    assert "transport_socket" not in _public_listener(plain)["filter_chains"][0]
    docs = render({"publicTls": {"existingSecret": "servegrid-public-tls"}})
    config = run_renderer(render_args(docs), tmp_path)
    socket = _public_listener(config)["filter_chains"][0]["transport_socket"]
    context = socket["typed_config"]["common_tls_context"]
    assert context["alpn_protocols"] == ["h2", "http/1.1"]
    (cert,) = context["tls_certificates"]
    assert cert["certificate_chain"]["filename"] == "/etc/servegrid/public-tls/tls.crt"
    assert cert["private_key"]["filename"] == "/etc/servegrid/public-tls/tls.key"
    envoy = envoy_pod(docs)
    (volume,) = [v for v in envoy["volumes"] if v["name"] == "public-tls"]
    assert volume["secret"]["secretName"] == "servegrid-public-tls"
    assert [i["key"] for i in volume["secret"]["items"]] == ["tls.crt", "tls.key"]
    mounts = {m["name"]: m["mountPath"] for m in envoy["containers"][0]["volumeMounts"]}
    assert mounts["public-tls"] == "/etc/servegrid/public-tls"
    (service,) = [s for n, s in by_kind(docs, "Service").items() if n == "servegrid-envoy"]
    assert service["spec"]["ports"][0]["appProtocol"] == "https"


# --- the services ----------------------------------------------------------------------------------


def _env_names(settings: type[BaseSettings], field: str) -> set[str]:
    """The environment variables a settings field is read from (its prefixed name and any aliases)."""
    info = settings.model_fields[field]
    prefix = str(settings.model_config.get("env_prefix", ""))
    found = {f"{prefix}{field}".upper()}
    alias = info.validation_alias
    for choice in getattr(alias, "choices", [alias] if isinstance(alias, str) else []):
        if isinstance(choice, str) and choice.isupper():
            found.add(choice)
    return found


def _must_be_set(settings: type[BaseSettings], field: str) -> bool:
    """Required, or a default that only works on a developer's machine (loopback), or another
    component's address (empty means "not deployed")."""
    info = settings.model_fields[field]
    loopback = isinstance(info.default, str) and any(h in info.default for h in ("127.0.0.1", "localhost"))
    return info.is_required() or loopback or field.endswith("_address")


def settings_from(settings: type[BaseSettings], env: dict[str, Any]) -> BaseSettings:
    """`settings` as the service builds it from this environment (Secret references left out)."""
    with pytest.MonkeyPatch.context() as patch:
        for var in [v for v in os.environ if v.startswith("SERVEGRID_")]:
            patch.delenv(var)
        for var, value in env.items():
            if isinstance(value, str):
                patch.setenv(var, value)
        return settings()


@pytest.mark.parametrize("case", ["default", "external-databases", "secured", "other-release"])
def test_every_service_gets_the_settings_it_needs_and_only_ones_it_reads(case: str) -> None:
    values, name = VALUE_SETS[case]
    deployments = by_kind(render(values, name), "Deployment")
    for service, settings in SETTINGS.items():
        env = env_of(deployments[f"{fullname(name)}-{service}"]["spec"]["template"]["spec"]["containers"][0])
        read = {var: field for field in settings.model_fields for var in _env_names(settings, field)}
        unread = {var for var in env if var.startswith("SERVEGRID_") and var not in read}
        assert unread == set(), f"{service} gets variables it never reads: {unread}"
        missing = [
            f for f in settings.model_fields if _must_be_set(settings, f) and not _env_names(settings, f) & set(env)
        ]
        assert missing == [], f"{service} lacks settings that have no usable default in a cluster: {missing}"
        # And what is set parses, as the service reads it from its environment.
        settings_from(settings, env)


def test_every_service_gets_a_deployment_with_grpc_probes_and_a_drain_window() -> None:
    docs = render()
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {f"servegrid-{name}" for name in (*SERVICES, "envoy")}
    for name in SERVICES:
        pod = deployments[f"servegrid-{name}"]["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = env_of(container)
        port = int(env[f"SERVEGRID_{name.upper()}_PORT"])
        assert container["command"] == ["python", "-m", f"services.{name}"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["grpc"]["port"] == port
        # Startup gets long enough for migrations; liveness only counts after it.
        startup = container["startupProbe"]
        assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
        assert "initialDelaySeconds" not in container["livenessProbe"]
        grace = float(env[f"SERVEGRID_{name.upper()}_GRACE_PERIOD_S"])
        delay = float(env[f"SERVEGRID_{name.upper()}_SHUTDOWN_DELAY_S"])
        assert pod["terminationGracePeriodSeconds"] > grace + delay
        if name in ("registry", "batch", "edge"):
            assert env["SERVEGRID_DATABASE_URL"]["secretKeyRef"]["name"] == "servegrid-connections"
        else:
            assert "SERVEGRID_DATABASE_URL" not in env  # no database credentials where none is read
    gateway_env = env_of(deployments["servegrid-gateway"]["spec"]["template"]["spec"]["containers"][0])
    assert gateway_env["SERVEGRID_GATEWAY_INFERENCE_ADDRESS"] == "servegrid-envoy-mesh:8090"
    envoy = envoy_pod(docs)["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert envoy[probe]["httpGet"] == {"path": "/ready", "port": "stats"}
    triton = by_kind(docs, "StatefulSet")["servegrid-triton"]["spec"]["template"]["spec"]["containers"][0]
    assert triton["startupProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_disruption_budgets_cover_every_workload_with_more_than_one_replica() -> None:
    docs = render()
    budgets = by_kind(docs, "PodDisruptionBudget")
    workloads = {**by_kind(docs, "Deployment"), **by_kind(docs, "StatefulSet")}
    assert set(budgets) == set(workloads)
    for name, budget in budgets.items():
        assert budget["spec"]["selector"]["matchLabels"] == workloads[name]["spec"]["selector"]["matchLabels"]
        assert budget["spec"]["minAvailable"] == 1
    # One replica: a budget would block every node drain, so there is none.
    single = render({"envoy": {"replicas": 1}, "triton": {"replicas": 1}, "services": {"router": {"replicas": 1}}})
    assert {"servegrid-envoy", "servegrid-triton", "servegrid-router"}.isdisjoint(
        by_kind(single, "PodDisruptionBudget")
    )
    assert "servegrid-gateway" in by_kind(single, "PodDisruptionBudget")  # autoscaled from 2
    assert by_kind(render({"podDisruptionBudget": {"enabled": False}}), "PodDisruptionBudget") == {}


def test_gpu_values_request_gpus_and_tolerate_gpu_nodes() -> None:
    cpu = by_kind(render(), "StatefulSet")["servegrid-triton"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    values, _ = VALUE_SETS["gpu-triton"]
    spec = by_kind(render(values), "StatefulSet")["servegrid-triton"]["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_existing_secrets_replace_the_generated_one() -> None:
    values, _ = VALUE_SETS["external-databases"]
    docs = render(values)
    assert by_kind(docs, "Secret") == {}
    deployments = by_kind(docs, "Deployment")
    env = env_of(deployments["servegrid-registry"]["spec"]["template"]["spec"]["containers"][0])
    assert env["SERVEGRID_DATABASE_URL"]["secretKeyRef"] == {"name": "pg", "key": "uri"}
    assert env["SERVEGRID_REDIS_URL"]["secretKeyRef"] == {"name": "cache", "key": "url"}
    batch = env_of(deployments["servegrid-batch"]["spec"]["template"]["spec"]["containers"][0])
    assert batch["SERVEGRID_BATCH_KAFKA_BOOTSTRAP"] == "kafka-0.kafka:9092,kafka-1.kafka:9092"


def test_disabling_a_service_removes_its_objects() -> None:
    docs = render(
        {"services": {"batch": {"enabled": False}}, "triton": {"enabled": False}, "envoy": {"enabled": False}}
    )
    names_ = {d["metadata"]["name"] for d in docs}
    assert not any("batch" in n or "triton" in n or "envoy" in n for n in names_)
    gateway = env_of(by_kind(docs, "Deployment")["servegrid-gateway"]["spec"]["template"]["spec"]["containers"][0])
    assert "SERVEGRID_GATEWAY_BATCH_ADDRESS" not in gateway  # empty: the gateway answers batch calls UNIMPLEMENTED


# --- helm test ------------------------------------------------------------------------------------


def test_helm_test_runs_one_inference_through_the_envoy_service() -> None:
    assert "Pod" not in {d["kind"] for d in render()}  # no API key yet: no test
    docs = render({"tests": {"apiKeySecret": "servegrid-test-key"}}, name="ml")
    (pod,) = by_kind(docs, "Pod").values()
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    url = args[-1]
    match = re.fullmatch(r"http://([^:/]+):(\d+)/v1/models/affine:infer", url)
    assert match, url
    service = by_kind(docs, "Service")[match[1]]
    assert match[1] == "ml-servegrid-envoy" and int(match[2]) in {p["port"] for p in service["spec"]["ports"]}
    assert json.loads(_flag(args, "--data"))["inputs"][0]["datatype"] == "FP32"
    assert "x-api-key: $(API_KEY)" in args and "--fail-with-body" in args
    assert env_of(container)["API_KEY"]["secretKeyRef"] == {"name": "servegrid-test-key", "key": "api-key"}


def test_helm_test_speaks_tls_to_the_certificates_name_and_passes_the_network_policy() -> None:
    docs = render(SECURED, "prod")
    (pod,) = by_kind(docs, "Pod").values()
    (container,) = pod["spec"]["containers"]
    args = container["args"]
    assert args[-1] == "https://api.example.com:8080/v1/models/affine:infer"
    assert _flag(args, "--connect-to") == "api.example.com:8080:prod-servegrid-envoy:8080"
    assert _flag(args, "--cacert") == "/etc/servegrid/test-ca/ca.crt"
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == "api-ca"
    # publicFrom restricts Envoy's public port; the test pod is let in all the same.
    public_rule = by_kind(docs, "NetworkPolicy")["prod-servegrid-envoy"]["spec"]["ingress"][0]
    labels = pod["metadata"]["labels"]
    selectors = [p["podSelector"]["matchLabels"] for p in public_rule["from"] if "podSelector" in p]
    assert any(selector.items() <= labels.items() for selector in selectors)
    assert SECURED["networkPolicy"]["publicFrom"][0] in public_rule["from"]


# --- network policies and privileges ---------------------------------------------------------------


def _peers(rule: dict[str, Any]) -> set[str]:
    """The components (or 'monitoring' / 'anyone') one NetworkPolicy ingress rule admits."""
    if "from" not in rule:
        return {"anyone"}
    found = set()
    for peer in rule["from"]:
        if "podSelector" in peer:
            found.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
        else:
            found.add("monitoring")
    return found


def test_network_policies_allow_exactly_the_data_flow() -> None:
    policies = by_kind(render(), "NetworkPolicy")
    allowed = {
        name.removeprefix("servegrid-"): {rule["ports"][0]["port"]: _peers(rule) for rule in p["spec"]["ingress"]}
        for name, p in policies.items()
    }
    assert allowed == {
        "envoy": {"http": {"anyone"}, 8090: {"gateway", "batch", "router"}, 9901: {"monitoring"}},
        "gateway": {50051: {"envoy"}, 9151: {"monitoring"}},
        "router": {50052: {"envoy"}, 9152: {"monitoring"}},
        "registry": {50053: {"envoy", "gateway", "router"}, 9153: {"monitoring"}},
        "batch": {50054: {"gateway"}, 9154: {"monitoring"}},
        "edge": {50055: {"envoy"}, 9155: {"monitoring"}},
        "triton": {8000: {"envoy"}, 8001: {"envoy", "router", "registry"}, 8002: {"monitoring"}},
    }
    for policy in policies.values():
        assert policy["spec"]["policyTypes"] == ["Ingress"]
    ingress = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}}}
    restricted = by_kind(render({"networkPolicy": {"publicFrom": [ingress]}}), "NetworkPolicy")
    assert restricted["servegrid-envoy"]["spec"]["ingress"][0]["from"] == [ingress]
    assert by_kind(render({"networkPolicy": {"enabled": False}}), "NetworkPolicy") == {}


def test_envoy_and_triton_run_unprivileged() -> None:
    docs = render()
    envoy = envoy_pod(docs)
    triton = by_kind(docs, "StatefulSet")["servegrid-triton"]["spec"]["template"]["spec"]
    for pod in (envoy, triton):
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = pod["containers"][0]["securityContext"]
        assert container["allowPrivilegeEscalation"] is False and container["capabilities"] == {"drop": ["ALL"]}
    assert envoy["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert {p["name"] for p in envoy["containers"][0]["ports"]} == {"http", "mesh", "stats"}  # admin: loopback
