"""The Helm chart lints, renders valid Kubernetes objects, and its values do what they say."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from yamllint import linter
from yamllint.config import YamlLintConfig

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "servegrid"
KUBE_VERSION = "1.30.0"
SERVICES = ("gateway", "router", "registry", "batch", "edge")


def render(values: dict[str, Any] | None = None, name: str = "servegrid") -> list[dict[str, Any]]:
    rendered = helm.Chart.load(CHART).render(values, name=name, namespace="ml")
    return [doc for text in rendered.values() for doc in yaml.safe_load_all(text) if doc]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_chart_lints_clean_in_strict_mode() -> None:
    report = helm.lint(CHART, strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", [None, {"triton": {"gpu": {"enabled": True}}}], ids=["default", "gpu"])
def test_rendered_manifests_are_valid_kubernetes_and_yaml(values: dict[str, Any] | None) -> None:
    rendered = helm.Chart.load(CHART).render(values, name="servegrid", namespace="ml")
    # Blank lines inside the embedded Envoy config come out of `nindent` as indentation only:
    # harmless inside a block scalar, so trailing spaces are not held against the chart.
    config = YamlLintConfig("extends: relaxed\nrules: {line-length: disable, trailing-spaces: disable}")
    for path, text in rendered.items():
        problems = [p for p in linter.run(text, config) if p.level == "error"]
        assert problems == [], path
        for doc in yaml.safe_load_all(text):
            if doc:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)


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
        assert container["readinessProbe"]["grpc"]["port"] == port
        grace = float(env[f"SERVEGRID_{name.upper()}_GRACE_PERIOD_S"])
        delay = float(env[f"SERVEGRID_{name.upper()}_SHUTDOWN_DELAY_S"])
        assert pod["terminationGracePeriodSeconds"] > grace + delay
        assert env["SERVEGRID_DATABASE_URL"]["secretKeyRef"]["name"] == "servegrid-connections"
    gateway_env = env_of(deployments["servegrid-gateway"]["spec"]["template"]["spec"]["containers"][0])
    assert gateway_env["SERVEGRID_GATEWAY_INFERENCE_ADDRESS"] == "servegrid-envoy-mesh:8090"


def test_gpu_values_request_gpus_and_tolerate_gpu_nodes() -> None:
    cpu = by_kind(render(), "StatefulSet")["servegrid-triton"]["spec"]["template"]["spec"]
    assert "nvidia.com/gpu" not in cpu["containers"][0]["resources"]["limits"]
    gpu = by_kind(render({"triton": {"gpu": {"enabled": True, "count": 2}}}), "StatefulSet")["servegrid-triton"]
    spec = gpu["spec"]["template"]["spec"]
    assert spec["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]


def test_existing_secrets_replace_the_generated_one() -> None:
    docs = render(
        {"database": {"existingSecret": "pg", "urlKey": "uri"}, "redis": {"existingSecret": "cache", "urlKey": "url"}}
    )
    assert by_kind(docs, "Secret") == {}
    env = env_of(by_kind(docs, "Deployment")["servegrid-registry"]["spec"]["template"]["spec"]["containers"][0])
    assert env["SERVEGRID_DATABASE_URL"]["secretKeyRef"] == {"name": "pg", "key": "uri"}


def test_disabling_a_service_removes_its_objects() -> None:
    docs = render(
        {"services": {"batch": {"enabled": False}}, "triton": {"enabled": False}, "envoy": {"enabled": False}}
    )
    names = {d["metadata"]["name"] for d in docs}
    assert not any("batch" in n or "triton" in n for n in names)


def test_envoy_config_matches_the_chart_services_and_can_be_replaced() -> None:
    docs = render()
    config = yaml.safe_load(by_kind(docs, "ConfigMap")["servegrid-envoy"]["data"]["envoy.yaml"])
    services = set(by_kind(docs, "Service"))
    for cluster in config["static_resources"]["clusters"]:
        for endpoint in cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]:
            host = endpoint["endpoint"]["address"]["socket_address"]["address"]
            if host.startswith("servegrid-"):
                assert host in services, f"Envoy routes to {host}, which the chart does not create"
    custom = by_kind(render({"envoy": {"config": "admin: {}\n"}}, name="other"), "ConfigMap")
    assert custom["other-servegrid-envoy"]["data"]["envoy.yaml"].strip() == "admin: {}"


def test_another_release_name_without_a_config_fails_with_a_clear_message() -> None:
    with pytest.raises(helm.HelmError, match=r"set-file envoy\.config"):
        render(name="other")


def test_the_token_secret_gives_the_edge_its_key_and_envoy_only_the_jwks_and_a_config_trusting_it() -> None:
    plain = by_kind(render(), "ConfigMap")["servegrid-envoy"]["data"]["envoy.yaml"]
    assert "token-jwks" not in plain  # without the Secret, Envoy trusts no exchanged token
    docs = render({"tokens": {"existingSecret": "servegrid-tokens", "ttlSeconds": 120}})
    for doc in docs:
        kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
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
    envoy = deployments["servegrid-envoy"]["spec"]["template"]["spec"]
    (jwks_volume,) = [v for v in envoy["volumes"] if v["name"] == "token-jwks"]
    assert jwks_volume["secret"]["items"] == [{"key": "jwks.json", "path": "jwks.json"}]
    mounts = {m["name"]: m["mountPath"] for m in envoy["containers"][0]["volumeMounts"]}
    config = by_kind(docs, "ConfigMap")["servegrid-envoy"]["data"]["envoy.yaml"]
    assert f"filename: {mounts['token-jwks']}/jwks.json" in config
    # No other pod gets the signing key.
    for name, deployment in deployments.items():
        volumes = deployment["spec"]["template"]["spec"].get("volumes", [])
        if name != "servegrid-edge":
            assert all("signing-key.pem" not in str(v) for v in volumes), name


def _peers(rule: dict[str, Any]) -> set[str]:
    """The components (or 'monitoring' / 'anyone') one NetworkPolicy ingress rule admits."""
    if "from" not in rule:
        return {"anyone"}
    names = set()
    for peer in rule["from"]:
        if "podSelector" in peer:
            names.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
        else:
            names.add("monitoring")
    return names


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
    envoy = by_kind(docs, "Deployment")["servegrid-envoy"]["spec"]["template"]["spec"]
    triton = by_kind(docs, "StatefulSet")["servegrid-triton"]["spec"]["template"]["spec"]
    for pod in (envoy, triton):
        assert pod["securityContext"]["runAsNonRoot"] is True
        container = pod["containers"][0]["securityContext"]
        assert container["allowPrivilegeEscalation"] is False and container["capabilities"] == {"drop": ["ALL"]}
    assert envoy["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is True
    assert {p["name"] for p in envoy["containers"][0]["ports"]} == {"http", "mesh", "stats"}  # admin: loopback


def test_the_mtls_secret_gives_each_pod_its_own_certificate_and_envoy_a_config_speaking_tls() -> None:
    plain = by_kind(render(), "Deployment")
    assert "TLS" not in str(env_of(plain["servegrid-gateway"]["spec"]["template"]["spec"]["containers"][0]))
    for tokens in ("", "servegrid-tokens"):
        docs = render({"tls": {"existingSecret": "servegrid-mtls"}, "tokens": {"existingSecret": tokens}})
        for doc in docs:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
        config = by_kind(docs, "ConfigMap")["servegrid-envoy"]["data"]["envoy.yaml"]
        assert "require_client_certificate: true" in config
        assert "filename: /etc/servegrid/mtls/envoy.key" in config
        assert ("/etc/servegrid/token-jwks/jwks.json" in config) == bool(tokens)
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
        assert container["readinessProbe"]["grpc"]["port"] == health != int(env[f"{prefix}PORT"])
        assert container["livenessProbe"]["grpc"]["port"] == health
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
    envoy = deployments["servegrid-envoy"]["spec"]["template"]["spec"]
    (volume,) = [v for v in envoy["volumes"] if v["name"] == "mtls"]
    assert [i["key"] for i in volume["secret"]["items"]] == ["ca.crt", "envoy.crt", "envoy.key"]


def test_the_public_tls_secret_mounts_into_envoy_and_switches_the_public_listener_to_tls() -> None:
    plain = by_kind(render(), "ConfigMap")["servegrid-envoy"]["data"]["envoy.yaml"]
    assert "/etc/servegrid/public-tls" not in plain  # no Secret: plain HTTP, as values.yaml says
    for tokens in ("", "servegrid-tokens"):
        for mtls in ("", "servegrid-mtls"):
            values = {
                "publicTls": {"existingSecret": "servegrid-public-tls"},
                "tokens": {"existingSecret": tokens},
                "tls": {"existingSecret": mtls},
            }
            docs = render(values)
            for doc in docs:
                kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
            config = yaml.safe_load(by_kind(docs, "ConfigMap")["servegrid-envoy"]["data"]["envoy.yaml"])
            (public,) = [
                listener for listener in config["static_resources"]["listeners"] if listener["name"] == "public"
            ]
            context = public["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
            assert context["alpn_protocols"] == ["h2", "http/1.1"]
            (cert,) = context["tls_certificates"]
            assert cert["certificate_chain"]["filename"] == "/etc/servegrid/public-tls/tls.crt"
            assert cert["private_key"]["filename"] == "/etc/servegrid/public-tls/tls.key"
            text = yaml.safe_dump(config)
            assert ("/etc/servegrid/mtls/envoy.key" in text) == bool(mtls)
            assert ("/etc/servegrid/token-jwks/jwks.json" in text) == bool(tokens)
            envoy = by_kind(docs, "Deployment")["servegrid-envoy"]["spec"]["template"]["spec"]
            (volume,) = [v for v in envoy["volumes"] if v["name"] == "public-tls"]
            assert volume["secret"]["secretName"] == "servegrid-public-tls"
            assert [i["key"] for i in volume["secret"]["items"]] == ["tls.crt", "tls.key"]
            mounts = {m["name"]: m["mountPath"] for m in envoy["containers"][0]["volumeMounts"]}
            assert mounts["public-tls"] == "/etc/servegrid/public-tls"


def test_every_bundled_config_reads_the_one_descriptor_set_the_configmap_carries() -> None:
    import base64

    from google.protobuf import descriptor_pb2

    config_map = by_kind(render(), "ConfigMap")["servegrid-envoy"]
    descriptors = descriptor_pb2.FileDescriptorSet.FromString(
        base64.b64decode(config_map["binaryData"]["descriptors.binpb"])
    )
    assert "servegrid/gateway/v1/gateway.proto" in {f.name for f in descriptors.file}
    for path in (CHART / "files").glob("envoy*.yaml"):
        text = path.read_text()
        assert "proto_descriptor: /etc/envoy/descriptors.binpb" in text and "proto_descriptor_bin" not in text, path
