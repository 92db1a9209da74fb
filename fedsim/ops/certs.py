"""``fedsim certs``: a private CA and a server certificate for TLS between Flower processes (the CLI is
:mod:`fedsim.cli.certs`).

Made with ``cryptography`` (no openssl binary needed). The server certificate's subject
alternative names cover the loopback addresses the local clusters use.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import TYPE_CHECKING

from fedsim.checkpoint import atomic_write_bytes

if TYPE_CHECKING:  # imported where used: `fedsim --help` and every other command work without it
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

DEFAULT_HOSTS = ("localhost", *(f"127.0.0.{i}" for i in range(1, 10)))


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str) -> x509.Name:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedsim"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _san(host: str) -> x509.GeneralName:
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def make_certificates(folder: str | Path, hosts: tuple[str, ...] = DEFAULT_HOSTS, days: int = 365) -> dict[str, Path]:
    """Write ``ca.crt``, ``ca.key``, ``server.pem`` and ``server.key`` (PEM) into ``folder``."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    folder = Path(folder)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder().subject_name(_name("fedsim local CA")).issuer_name(_name("fedsim local CA"))
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
        .public_key(server_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    paths = {"ca_cert": folder / "ca.crt", "ca_key": folder / "ca.key",
             "server_cert": folder / "server.pem", "server_key": folder / "server.key"}
    atomic_write_bytes(paths["ca_cert"], ca_cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(paths["ca_key"], _key_pem(ca_key))
    atomic_write_bytes(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    atomic_write_bytes(paths["server_key"], _key_pem(server_key))
    for key in ("ca_key", "server_key"):
        paths[key].chmod(0o600)
    return paths
