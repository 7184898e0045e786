"""A throwaway CA with server and client certificates, so integration tests run over
real mutual TLS. (The federation PKI proper is `fedcollab pki`, a later issue.)"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pem:
    cert: bytes
    key: bytes


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


class TestCA:
    __test__ = False  # not a pytest class

    def __init__(self, name: str = "fedcollab test CA") -> None:
        self._key = _key()
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, *, server: bool, role: str | None = None, days: float = 1.0,
              not_before_days: float = -5 / 1440) -> Pem:
        """A leaf in fedcollab's identity convention (URI SAN urn:fedcollab:<role>:<name>);
        `days`/`not_before_days` make expired or not-yet-valid ones for tests."""
        key = _key()
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(self._name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=not_before_days))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        uri = x509.UniformResourceIdentifier(f"urn:fedcollab:{role or ('coordinator' if server else 'institution')}:"
                                             f"{common_name}")
        names: list[x509.GeneralName] = [uri]
        if server:
            names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Pem(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))

    def mutual_tls(self, names: list[str]) -> tuple[Any, dict[str, Any]]:
        """gRPC credentials: the coordinator's (client certificates required) and one
        set per institution name."""
        import grpc

        server = self.issue("coordinator", server=True)
        server_creds = grpc.ssl_server_credentials([(server.key, server.cert)], root_certificates=self.pem,
                                                   require_client_auth=True)
        clients = {}
        for n in names:
            pem = self.issue(n, server=False)
            clients[n] = grpc.ssl_channel_credentials(root_certificates=self.pem, private_key=pem.key,
                                                      certificate_chain=pem.cert)
        return server_creds, clients

    def write(self, folder: Path, name: str, pem: Pem) -> tuple[Path, Path, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        ca, cert, key = folder / "ca.pem", folder / f"{name}.pem", folder / f"{name}.key"
        ca.write_bytes(self.pem)
        cert.write_bytes(pem.cert)
        key.write_bytes(pem.key)
        return ca, cert, key


def issue_with(*, ca_cert: Path, ca_key: Path, name: str, days: float, not_before_days: float,
               role: str = "institution") -> Pem:
    """A client certificate signed by a real CA's key with any validity, e.g. expired
    (the federation PKI refuses to make those)."""
    ca = x509.load_pem_x509_certificate(Path(ca_cert).read_bytes())
    signer = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    key = _key()
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now + dt.timedelta(days=not_before_days)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(
            [x509.UniformResourceIdentifier(f"urn:fedcollab:{role}:{name}")]), critical=False)
        .sign(signer, hashes.SHA256())  # type: ignore[arg-type]
    )
    return Pem(cert.public_bytes(serialization.Encoding.PEM), _pem_key(key))
