"""The local mesh's certificates: one CA and one certificate per component (EC P-256), made once.

`servegrid up` calls `generate` under its home; operators run `python -m services.stack.certs DIR`
(or bring their own: any CA will do, as long as each certificate names its component in a DNS SAN,
see services/runtime/tls.py).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.runtime.tls import CertFiles

# Every component that opens or accepts an internal connection; `cli` is the operator's tools
# (`servegrid up` seeding the registry, `servegrid models`, readiness checks).
COMPONENTS = ("envoy", "gateway", "registry", "router", "edge", "batch", "cli")
# Local addresses every certificate also names, so an operator's grpcurl to 127.0.0.1 verifies.
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
CA_NAME = "ca"
# The public listener's server certificate (`servegrid up` with public TLS): what API clients verify.
PUBLIC_NAME = "public"
_CA_DAYS = 3650
_LEAF_DAYS = 825
# `generate` reissues what expires sooner than this (the CA too: then every certificate it signed), so a
# stack restarted now and then never runs into an expiry.
RENEW_BEFORE = datetime.timedelta(days=30)


def files_for(directory: Path, component: str) -> CertFiles:
    """Where `generate` puts a component's files: DIR/<component>.crt, DIR/<component>.key, DIR/ca.crt."""
    return CertFiles(directory / f"{component}.crt", directory / f"{component}.key", directory / f"{CA_NAME}.crt")


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _expiring(cert: x509.Certificate) -> bool:
    """Whether `cert` ends within RENEW_BEFORE."""
    return cert.not_valid_after_utc - _now() < RENEW_BEFORE


def _current(files: CertFiles, ca: x509.Certificate) -> bool:
    """Whether a component's certificate and key are there, signed by `ca` and not near their end (a CA
    renewed or replaced since invalidates every certificate the old one signed)."""
    if not (files.cert.exists() and files.key.exists()):
        return False
    cert = x509.load_pem_x509_certificate(files.cert.read_bytes())
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return not _expiring(cert)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    # Created owner-only, so the key is never readable by others, not even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(pem)


def _subject_names(names: Iterable[str]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for name in names:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            out.append(x509.DNSName(name))
    return out


def _load_or_create_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA in `directory`, made when missing or near its end."""
    cert_path, key_path = directory / f"{CA_NAME}.crt", directory / f"{CA_NAME}.key"
    if cert_path.exists() and key_path.exists():
        existing = x509.load_pem_x509_certificate(cert_path.read_bytes())
        if not _expiring(existing):
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ValueError(f"{key_path} is not an EC private key")
            return existing, key
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "servegrid local CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=_CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(key, hashes.SHA256())
    )
    _write_key(key_path, key)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _issue(
    component: str,
    names: Sequence[str],
    ca: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    usages: Sequence[x509.ObjectIdentifier] = (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, component)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - datetime.timedelta(minutes=5))
        .not_valid_after(_now() + datetime.timedelta(days=_LEAF_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(_subject_names([component, *names])), critical=False)
        # Every component is both a server (its port) and a client (its calls to the others).
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def generate(
    directory: Path, components: Sequence[str] = COMPONENTS, extra_names: Sequence[str] = LOCAL_NAMES
) -> dict[str, CertFiles]:
    """Make the CA and each component's certificate under `directory`, keeping whatever already exists and
    is not near its end (so running it again, as every `servegrid up` does, changes nothing until a
    certificate is within RENEW_BEFORE of expiry); returns each component's files."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _load_or_create_ca(directory)
    out: dict[str, CertFiles] = {}
    for component in components:
        files = files_for(directory, component)
        if not _current(files, ca):
            cert, key = _issue(component, extra_names, ca, ca_key)
            _write_key(files.key, key)
            files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        out[component] = files
    return out


def _names_of(path: Path) -> set[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return {str(n) for n in sans.get_values_for_type(x509.DNSName)} | {
        str(ip) for ip in sans.get_values_for_type(x509.IPAddress)
    }


def generate_public(directory: Path, names: Sequence[str] = LOCAL_NAMES) -> CertFiles:
    """The public listener's server certificate, signed by the CA in `directory` (made when missing), naming
    `names` (addresses clients dial). Kept while the CA and the names stay; reissued when either changes,
    so a new `SERVEGRID_STACK_HOST` is covered on the next `servegrid up`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key = _load_or_create_ca(directory)
    files = files_for(directory, PUBLIC_NAME)
    wanted = {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in names}
    if not _current(files, ca) or not wanted <= _names_of(files.cert):
        cert, key = _issue(PUBLIC_NAME, list(dict.fromkeys(names)), ca, ca_key, (ExtendedKeyUsageOID.SERVER_AUTH,))
        _write_key(files.key, key)
        files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m services.stack.certs", description=__doc__.splitlines()[0])
    parser.add_argument("directory", type=Path, help="where the CA and certificates go (existing ones are kept)")
    parser.add_argument(
        "--component", action="append", help=f"component to issue for; repeat (default: {', '.join(COMPONENTS)})"
    )
    parser.add_argument(
        "--name",
        action="append",
        help="extra DNS name or IP every certificate carries, e.g. a Service's DNS name; repeat "
        "(default: localhost, 127.0.0.1, ::1)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    made = generate(args.directory, tuple(args.component or COMPONENTS), tuple(args.name or LOCAL_NAMES))
    for component, files in made.items():
        print(f"{component}: {files.cert} {files.key}")
    print(f"ca: {args.directory / (CA_NAME + '.crt')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
