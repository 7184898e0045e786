"""An institution's (or operator's, or the coordinator's) side: a private key that
never leaves it, and a certificate signing request to send to the operator."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcollab.errors import PkiError
from fedcollab.pki._files import atomic_write, load_private_key, write_private_key
from fedcollab.pki._identity import Identity, name_problems, public_key_fingerprint

DEFAULT_COORDINATOR_HOSTS = ("localhost", "127.0.0.1")
_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")  # fullmatch: no trailing newline


@dataclass(frozen=True)
class RequestFiles:
    key: Path
    csr: Path
    identity: Identity
    public_key_fingerprint: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    reused_key: bool  # the key file was already there (a renewal): it was kept, not replaced


def dns_name_problem(host: str) -> str | None:
    """Why `host` cannot be a DNS SAN (None when it can). No wildcards: every host the
    coordinator is reached by is named."""
    labels = host.split(".")
    if len(host) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        return f"{host!r} is not a host name (letters, digits and '-' in dot-separated labels; no wildcards)"
    return None


def split_hosts(hosts: Sequence[str]) -> tuple[list[str], list[str]]:
    """Host strings into (DNS names, IP addresses)."""
    dns, ips = [], []
    for host in hosts:
        try:
            ips.append(str(ipaddress.ip_address(host)))
        except ValueError:
            dns.append(host)
    return dns, ips


def request_certificate(
    *,
    directory: Path,
    role: str,
    name: str,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
) -> RequestFiles:
    """Writes `<name>-key.pem` (0600; an existing one is reused, never overwritten) and
    `<name>.csr` asking for `urn:fedcollab:<role>:<name>`. Only a coordinator names
    hosts; with none given it gets localhost and 127.0.0.1."""
    directory = Path(directory)
    problems = name_problems(role, name)
    if role != "coordinator" and (dns_names or ip_addresses):
        problems.append(f"only a coordinator certificate names hosts; a {role}'s is a client certificate: "
                        "drop --dns/--ip")
    if role == "coordinator" and not dns_names and not ip_addresses:
        dns_names, ip_addresses = split_hosts(DEFAULT_COORDINATOR_HOSTS)
    problems += [p for p in map(dns_name_problem, dns_names) if p]
    ips = []
    for ip in ip_addresses:
        try:
            ips.append(ipaddress.ip_address(ip))
        except ValueError:
            problems.append(f"{ip!r} is not an IP address")
    if problems:
        raise PkiError("cannot make this request: " + "; ".join(problems))

    key_path, csr_path = directory / f"{name}-key.pem", directory / f"{name}.csr"
    reused = key_path.exists()
    if reused:
        key = load_private_key(key_path)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        write_private_key(key_path, key)
    identity = Identity(role=role, name=name)
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(d) for d in dns_names] + [x509.IPAddress(ip) for ip in ips]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if role == "coordinator" else ExtendedKeyUsageOID.CLIENT_AUTH
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .sign(key, hashes.SHA256())
    )
    atomic_write(csr_path, csr.public_bytes(serialization.Encoding.PEM))
    return RequestFiles(key=key_path, csr=csr_path, identity=identity,
                        public_key_fingerprint=public_key_fingerprint(csr),
                        dns_names=tuple(dns_names), ip_addresses=tuple(str(ip) for ip in ips), reused_key=reused)
