"""Throw-away certificates (made with `cryptography`).

- `make_certs`: a CA and a server certificate for 127.0.0.1, ::1, localhost and relay.example.test.
- `issue`: another server certificate, for names of the test's choosing, from a CA `make_certs` made.
- `make_self_signed`: a server certificate that is its own issuer, as cert-manager's `selfSigned` Issuer makes
  them (its Secret's `ca.crt` is the certificate itself).
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_NAMES = ["localhost", "relay.example.test", "127.0.0.1", "::1"]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "herald tests"), x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
        key_agreement=False, key_cert_sign=cert_sign, crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for n in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(n)))
        except ValueError:
            entries.append(x509.DNSName(n))
    return x509.SubjectAlternativeName(entries)


def _validity(days: int) -> tuple[datetime.datetime, datetime.datetime]:
    now = datetime.datetime.now(datetime.timezone.utc)
    return now - datetime.timedelta(days=1), now + datetime.timedelta(days=days)


def _leaf(subject: x509.Name, issuer: x509.Name, public_key, names: list[str], days: int) -> x509.CertificateBuilder:
    not_before, not_after = _validity(days)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_san(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(_key_usage(cert_sign=False), critical=True)
    )


def _write(paths: dict[str, Path], cert: x509.Certificate, key) -> None:
    paths["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths["key"].write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["key"].chmod(0o600)


def make_certs(directory: Path, days: int = 30) -> dict[str, Path]:
    """Write ca.pem, ca-key.pem, cert.pem (leaf, valid for `days`), key.pem (PKCS#8) into directory; return
    their paths (keys "ca", "ca_key", "cert", "key")."""
    directory.mkdir(parents=True, exist_ok=True)
    not_before, not_after = _validity(days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("herald test CA")
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": directory / "ca.pem", "ca_key": directory / "ca-key.pem"}
    paths["ca"].write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    paths["ca_key"].write_bytes(
        ca_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    paths["ca_key"].chmod(0o600)
    return {**paths, **issue(paths, directory, DEFAULT_NAMES, days)}


def issue(ca: dict[str, Path], directory: Path, names: list[str], days: int = 30) -> dict[str, Path]:
    """A server certificate for `names` (host names or IP addresses) signed by the CA of `make_certs`: writes
    cert.pem and key.pem into directory; returns their paths and the CA's (keys "ca", "cert", "key")."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert = x509.load_pem_x509_certificate(ca["ca"].read_bytes())
    ca_key = serialization.load_pem_private_key(ca["ca_key"].read_bytes(), password=None)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        _leaf(_name(names[0]), ca_cert.subject, key.public_key(), names, days)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca": ca["ca"], "cert": directory / "cert.pem", "key": directory / "key.pem"}
    _write(paths, cert, key)
    return paths


def make_self_signed(directory: Path, names: list[str], days: int = 30) -> dict[str, Path]:
    """A server certificate for `names` signed by its own key, not a CA (as cert-manager's selfSigned Issuer
    issues one): writes cert.pem, key.pem and ca.pem (the certificate again, as the Secret's ca.crt)."""
    directory.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = _name(names[0])
    cert = _leaf(subject, subject, key.public_key(), names, days).sign(key, hashes.SHA256())
    paths = {"ca": directory / "ca.pem", "cert": directory / "cert.pem", "key": directory / "key.pem"}
    _write(paths, cert, key)
    paths["ca"].write_bytes(paths["cert"].read_bytes())
    return paths
