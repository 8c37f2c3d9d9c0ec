"""Mutual TLS inside the mesh: gRPC credentials from a component's certificate, and who a verified peer is.

Every internal connection (Envoy → services, service → service, services → Envoy's mesh listener)
presents a certificate signed by one CA, whose subject alternative name is the component's name
(`envoy`, `gateway`, ...). A server learns who is calling from that name (see `peer_names`), which is
how the gateway knows a request's identity headers were set by Envoy and not by someone else.

services/stack/certs.py makes such a CA and certificates (`servegrid up` does, once, under its home).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509


@dataclass(frozen=True)
class CertFiles:
    """One component's certificate and key, and the CA it trusts its peers by."""

    cert: Path
    key: Path
    ca: Path

    def read(self) -> tuple[bytes, bytes, bytes]:
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()

    def not_after(self) -> float:
        """When the certificate stops being valid (its notAfter), as a Unix time."""
        certificate = x509.load_pem_x509_certificate(self.cert.read_bytes())
        return certificate.not_valid_after_utc.timestamp()


def server_credentials(files: CertFiles) -> grpc.ServerCredentials:
    """A server that refuses any client without a certificate from the CA."""
    cert, key, ca = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(files: CertFiles) -> grpc.ChannelCredentials:
    """A client that presents its component's certificate and trusts only servers the CA signed."""
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def peer_common_name(auth_context: dict[str, list[bytes]] | None) -> str:
    """The verified certificate's common name (the component, for the stack's certificates); "" without TLS."""
    values = (auth_context or {}).get("x509_common_name", [])
    return values[0].decode("utf-8", "replace") if values else ""


def peer_names(auth_context: dict[str, list[bytes]] | None) -> frozenset[str]:
    """The names a TLS peer's verified certificate carries (SANs and CN); empty without TLS.

    gRPC only fills these after verifying the chain against the server's CA, so a name here is proof.
    """
    if not auth_context:
        return frozenset()
    values = [*auth_context.get("x509_subject_alternative_name", []), *auth_context.get("x509_common_name", [])]
    return frozenset(v.decode("utf-8", "replace") for v in values)
