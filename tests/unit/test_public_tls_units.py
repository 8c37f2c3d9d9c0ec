"""TLS on the public listener: the rendered listener, the local certificate, and what `servegrid up` passes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from services.edge.devkeys import DevIssuer
from services.mesh import bootstrap, names
from services.mesh.bootstrap import EnvoyParams, render_config, render_yaml
from services.stack import certs
from services.stack.local import StackSettings, envoy_part, public_ca, public_grpc_credentials, public_url
from tests.support.envoy import validate_config


def _public(config: dict[str, Any]) -> dict[str, Any]:
    (found,) = [x for x in config["static_resources"]["listeners"] if x["name"] == names.PUBLIC]
    return found


def _params(directory: Path, **overrides: object) -> EnvoyParams:
    files = certs.generate_public(directory)
    return EnvoyParams.for_profile(
        "local", public_tls_cert_file=str(files.cert), public_tls_key_file=str(files.key), **overrides
    )


def test_without_a_certificate_the_public_listener_is_plaintext() -> None:
    assert "transport_socket" not in _public(render_config(EnvoyParams()))["filter_chains"][0]
    # Only one of the two files is not enough either.
    half = EnvoyParams(public_tls_cert_file="server.crt")
    assert "transport_socket" not in _public(render_config(half))["filter_chains"][0]


def test_the_tls_listener_offers_h2_and_http11_with_the_certificate_and_tls12_or_later(tmp_path: Path) -> None:
    socket = _public(render_config(_params(tmp_path)))["filter_chains"][0]["transport_socket"]
    tls = socket["typed_config"]
    assert tls["@type"].endswith("DownstreamTlsContext")
    assert "require_client_certificate" not in tls  # callers authenticate with tokens, not certificates
    context = tls["common_tls_context"]
    assert context["alpn_protocols"] == ["h2", "http/1.1"]
    assert context["tls_params"]["tls_minimum_protocol_version"] == "TLSv1_2"
    (pair,) = context["tls_certificates"]
    assert pair["certificate_chain"]["filename"] == str(tmp_path / "public.crt")
    assert pair["private_key"]["filename"] == str(tmp_path / "public.key")
    assert "validation_context" not in context


def test_the_bootstrap_cli_takes_the_public_certificate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = certs.generate_public(tmp_path)
    assert bootstrap.main(["--public-tls-cert", str(files.cert), "--public-tls-key", str(files.key)]) == 0
    out = capsys.readouterr().out
    assert "DownstreamTlsContext" in out and f"filename: {files.key}" in out


def test_a_public_tls_bootstrap_passes_envoy_validate(tmp_path: Path) -> None:
    jwks = DevIssuer.generate().write(tmp_path / "jwks")
    path = tmp_path / "envoy.yaml"
    path.write_text(render_yaml(_params(tmp_path / "certs", jwks_file=str(jwks), token_jwks_file="")))
    result = validate_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


def _sans(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return set(sans.get_values_for_type(x509.DNSName)) | {str(i) for i in sans.get_values_for_type(x509.IPAddress)}


def test_the_public_certificate_names_local_addresses_and_the_host_and_serves_only(tmp_path: Path) -> None:
    files = certs.generate_public(tmp_path, (*certs.LOCAL_NAMES, "10.1.2.3", "api.example"))
    assert {"localhost", "127.0.0.1", "::1", "10.1.2.3", "api.example"} <= _sans(files.cert)
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.SERVER_AUTH]
    ca = x509.load_pem_x509_certificate(files.ca.read_bytes())
    cert.verify_directly_issued_by(ca)
    # An IP SAN, not a DNS one: clients dialling the address match it only that way.
    dns = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert "10.1.2.3" not in dns


def test_the_public_certificate_is_kept_and_reissued_for_a_new_host(tmp_path: Path) -> None:
    first = certs.generate_public(tmp_path)
    before = first.cert.read_bytes()
    assert certs.generate_public(tmp_path).cert.read_bytes() == before
    again = certs.generate_public(tmp_path, (*certs.LOCAL_NAMES, "192.0.2.7"))
    assert again.cert.read_bytes() != before and "192.0.2.7" in _sans(again.cert)


def test_servegrid_up_serves_tls_on_the_public_port_by_default(tmp_path: Path) -> None:
    settings = StackSettings(home=tmp_path, mtls=False)
    envoy = envoy_part(settings)
    assert envoy.prepare is not None
    envoy.prepare()
    rendered = yaml.safe_load((tmp_path / "envoy" / "envoy.yaml").read_text())
    tls = _public(rendered)["filter_chains"][0]["transport_socket"]["typed_config"]["common_tls_context"]
    assert tls["tls_certificates"][0]["private_key"]["filename"] == str((tmp_path / "certs" / "public.key").resolve())
    assert public_url(settings, "/v1/x") == f"https://127.0.0.1:{settings.envoy_port}/v1/x"
    assert public_ca(settings) == tmp_path / "certs" / "ca.crt"
    assert public_grpc_credentials(settings) is not None


def test_plain_http_only_when_asked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SERVEGRID_STACK_PUBLIC_TLS", "false")
    monkeypatch.delenv("SERVEGRID_CA_FILE", raising=False)
    settings = StackSettings(home=tmp_path, mtls=False)
    assert settings.public_tls is False
    envoy = envoy_part(settings)
    assert envoy.prepare is not None
    envoy.prepare()
    assert "DownstreamTlsContext" not in (tmp_path / "envoy" / "envoy.yaml").read_text()
    assert public_url(settings).startswith("http://")
    assert public_grpc_credentials(settings) is None


def test_a_given_ca_file_wins_over_the_local_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    other = certs.generate_public(tmp_path / "elsewhere").ca
    monkeypatch.setenv("SERVEGRID_CA_FILE", str(other))
    settings = StackSettings(home=tmp_path / "home", mtls=False)
    assert public_ca(settings) == other
    assert public_ca(settings, ca_file="/explicit/ca.pem") == Path("/explicit/ca.pem")
    monkeypatch.delenv("SERVEGRID_CA_FILE")
    assert public_ca(settings) is None  # no local CA made yet: the system's roots verify
    assert public_grpc_credentials(settings) is not None  # still TLS
