"""Mutual TLS pieces without a network: the certificates the stack makes, whose identity the gateway
believes, what Envoy's bootstrap says with and without certificates, and what `servegrid up` passes on."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from pydantic import ValidationError

from services.edge.devkeys import DevIssuer
from services.gateway.identity import IdentityPolicy
from services.mesh import names
from services.mesh.bootstrap import EnvoyParams, render_config, render_yaml
from services.mesh.quota import QUOTA_CLUSTER
from services.runtime import ServiceSettings
from services.runtime.tls import peer_names
from services.stack import certs
from services.stack.local import StackSettings, component_tls, envoy_part, python_service_part
from tests.support.envoy import validate_config


def _load(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def test_every_component_gets_a_certificate_naming_it_signed_by_the_ca(tmp_path: Path) -> None:
    made = certs.generate(tmp_path)
    assert set(made) == set(certs.COMPONENTS)
    ca = _load(tmp_path / "ca.crt")
    for component, files in made.items():
        cert = _load(files.cert)
        cert.verify_directly_issued_by(ca)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert sans.get_values_for_type(x509.DNSName) == [component, "localhost"]
        assert ipaddress.ip_address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(usages)
        assert files.key.stat().st_mode & 0o077 == 0  # keys are the owner's alone
    assert (tmp_path / "ca.key").stat().st_mode & 0o077 == 0


def test_running_again_keeps_every_file(tmp_path: Path) -> None:
    certs.generate(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    certs.generate(tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_new_ca_reissues_the_certificates_the_old_one_signed(tmp_path: Path) -> None:
    certs.generate(tmp_path)
    old = (tmp_path / "gateway.crt").read_bytes()
    (tmp_path / "ca.crt").unlink()
    certs.generate(tmp_path)
    assert (tmp_path / "gateway.crt").read_bytes() != old
    _load(tmp_path / "gateway.crt").verify_directly_issued_by(_load(tmp_path / "ca.crt"))


def test_certificates_near_their_end_are_reissued_and_the_rest_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    certs.generate(tmp_path)
    certs.generate_public(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    leaf_end = _load(tmp_path / "gateway.crt").not_valid_after_utc
    # Three weeks before the leaves' end: they are reissued under the same CA, which has years left.
    soon = leaf_end - datetime.timedelta(days=21)
    monkeypatch.setattr(certs, "_now", lambda: soon)
    certs.generate(tmp_path)
    certs.generate_public(tmp_path)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert after["ca.crt"] == before["ca.crt"] and after["ca.key"] == before["ca.key"]
    for name in ("gateway.crt", "gateway.key", "public.crt"):
        assert after[name] != before[name], name
    renewed = _load(tmp_path / "gateway.crt")
    renewed.verify_directly_issued_by(_load(tmp_path / "ca.crt"))
    assert renewed.not_valid_after_utc - soon > certs.RENEW_BEFORE
    # Near the CA's own end: a new CA, and every certificate it signs reissued, the public one included.
    ca_near_end = _load(tmp_path / "ca.crt").not_valid_after_utc - datetime.timedelta(days=1)
    monkeypatch.setattr(certs, "_now", lambda: ca_near_end)
    certs.generate(tmp_path)
    certs.generate_public(tmp_path)
    assert (tmp_path / "ca.crt").read_bytes() != before["ca.crt"]
    for name in ("gateway.crt", "public.crt"):
        _load(tmp_path / name).verify_directly_issued_by(_load(tmp_path / "ca.crt"))


def test_the_operator_command_takes_components_and_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert certs.main([str(tmp_path), "--component", "gateway", "--name", "servegrid-gateway"]) == 0
    sans = _load(tmp_path / "gateway.crt").extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["gateway", "servegrid-gateway"]
    assert not (tmp_path / "envoy.crt").exists()
    assert "gateway:" in capsys.readouterr().out


def test_peer_names_are_the_certificates_sans_and_common_name() -> None:
    context = {"x509_subject_alternative_name": [b"envoy", b"localhost"], "x509_common_name": [b"envoy"]}
    assert peer_names(context) == {"envoy", "localhost"}
    assert peer_names({}) == frozenset()
    assert peer_names(None) == frozenset()


@dataclass
class FakeContext:
    """What IdentityPolicy reads of a grpc.aio ServicerContext."""

    metadata: tuple[tuple[str, str], ...]
    auth: dict[str, list[bytes]] = field(default_factory=dict)

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return self.auth


HEADERS = (("x-servegrid-tenant", "acme"), ("x-servegrid-roles", "admin,user"))


@pytest.mark.parametrize(
    ("mtls", "peer", "tenant"),
    [
        (True, [b"envoy"], "acme"),  # Envoy set them: believed
        (True, [b"gateway"], ""),  # another component's valid certificate: anonymous
        (True, [], ""),  # no certificate names (cannot happen on a TLS-only port; still anonymous)
        (False, [], "acme"),  # no TLS at all: today's behaviour
    ],
)
def test_identity_headers_count_only_from_envoy_when_mtls_is_on(mtls: bool, peer: list[bytes], tenant: str) -> None:
    context = FakeContext(HEADERS, {"x509_subject_alternative_name": peer} if peer else {})
    identity = IdentityPolicy(mtls=mtls).identity(context)
    assert identity.tenant == tenant
    assert identity.roles == (frozenset({"admin", "user"}) if tenant else frozenset())


def test_without_tls_the_gateway_warns_that_anyone_may_assert_an_identity(caplog: pytest.LogCaptureFixture) -> None:
    IdentityPolicy(mtls=True).warn_if_open()
    assert not caplog.records
    IdentityPolicy(mtls=False).warn_if_open()
    assert "trusted from any caller" in caplog.text


def test_tls_settings_come_all_together_or_not_at_all(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="all of tls_cert_file"):
        ServiceSettings(tls_cert_file=tmp_path / "a.crt")
    assert ServiceSettings().tls is None
    full = ServiceSettings(
        tls_cert_file=tmp_path / "a.crt", tls_key_file=tmp_path / "a.key", tls_ca_file=tmp_path / "ca.crt"
    )
    assert full.tls is not None and full.tls.ca == tmp_path / "ca.crt"


def _cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [c for c in config["static_resources"]["clusters"] if c["name"] == name]
    return found


def _mesh_listener(config: dict[str, Any]) -> dict[str, Any]:
    (found,) = [x for x in config["static_resources"]["listeners"] if x["name"] == names.MESH]
    return found


def _tls_params(directory: Path, **overrides: object) -> EnvoyParams:
    files = certs.generate(directory)["envoy"]
    return EnvoyParams.for_profile(
        "local", tls_cert_file=str(files.cert), tls_key_file=str(files.key), tls_ca_file=str(files.ca), **overrides
    )


def test_without_certificates_nothing_inside_speaks_tls() -> None:
    config = render_config(EnvoyParams())
    for name in (names.GATEWAY_CLUSTER, names.REGISTRY_CLUSTER, names.EDGE_CLUSTER, QUOTA_CLUSTER, names.XDS_CLUSTER):
        assert "transport_socket" not in _cluster(config, name)
    assert "transport_socket" not in _mesh_listener(config)["filter_chains"][0]


def test_with_certificates_envoy_checks_each_services_name_and_the_mesh_listener_its_clients(tmp_path: Path) -> None:
    config = render_config(_tls_params(tmp_path))
    expected = {
        names.GATEWAY_CLUSTER: "gateway",
        names.REGISTRY_CLUSTER: "registry",
        names.EDGE_CLUSTER: "edge",
        QUOTA_CLUSTER: "edge",
        names.XDS_CLUSTER: "router",
    }
    for cluster, peer in expected.items():
        tls = _cluster(config, cluster)["transport_socket"]["typed_config"]
        assert tls["sni"] == peer
        context = tls["common_tls_context"]
        assert context["tls_certificates"][0]["certificate_chain"]["filename"].endswith("envoy.crt")
        assert context["validation_context"]["match_typed_subject_alt_names"] == [
            {"san_type": "DNS", "matcher": {"exact": peer}}
        ]
        assert context["alpn_protocols"] == ["h2"]
    mesh = _mesh_listener(config)["filter_chains"][0]["transport_socket"]["typed_config"]
    assert mesh["require_client_certificate"] is True
    allowed = mesh["common_tls_context"]["validation_context"]["match_typed_subject_alt_names"]
    assert [m["matcher"]["exact"] for m in allowed] == ["gateway", "batch", "router"]
    # The public listener is unchanged: clients reach it without certificates.
    (public,) = [x for x in config["static_resources"]["listeners"] if x["name"] == names.PUBLIC]
    assert "transport_socket" not in public["filter_chains"][0]


def test_the_tls_bootstrap_passes_envoy_validate(tmp_path: Path) -> None:
    jwks = DevIssuer.generate().write(tmp_path / "jwks")
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(_tls_params(tmp_path / "certs", jwks_file=str(jwks), token_jwks_file="")))
    result = validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_servegrid_up_gives_each_service_and_envoy_their_own_certificate(tmp_path: Path) -> None:
    settings = StackSettings(home=tmp_path)
    part = python_service_part("gateway", 50051, 9151, {}, settings)
    gateway = component_tls(settings, "gateway")
    assert gateway is not None
    assert part.env["SERVEGRID_GATEWAY_TLS_CERT_FILE"] == str(gateway.cert)
    assert part.env["SERVEGRID_GATEWAY_TLS_KEY_FILE"] == str(gateway.key)
    assert part.env["SERVEGRID_GATEWAY_TLS_CA_FILE"] == str(tmp_path / "certs" / "ca.crt")
    envoy = envoy_part(settings)
    assert envoy.prepare is not None
    envoy.prepare()
    rendered = (tmp_path / "envoy" / "envoy.yaml").read_text()
    assert str((tmp_path / "certs" / "envoy.key").resolve()) in rendered
    assert (tmp_path / "certs" / "gateway.crt").exists()  # made on the way


def test_servegrid_up_without_mtls_passes_no_certificates(tmp_path: Path) -> None:
    settings = StackSettings(home=tmp_path, mtls=False, public_tls=False)
    part = python_service_part("gateway", 50051, 9151, {}, settings)
    assert not any("TLS" in key for key in part.env)
    envoy = envoy_part(settings)
    assert envoy.prepare is not None
    envoy.prepare()
    rendered = (tmp_path / "envoy" / "envoy.yaml").read_text()
    assert "UpstreamTlsContext" not in rendered and "DownstreamTlsContext" not in rendered
    assert not (tmp_path / "certs").exists()
