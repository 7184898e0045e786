"""The federation CA: its folder, its key, and the record of what it issued.

A CA folder holds ca.pem, ca-key.pem (0600), crl.pem, issued.json and certs/<serial>.pem
(a copy of every certificate issued, for audit and for revoking by file).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from fedcollab.errors import PkiError
from fedcollab.pki._files import atomic_write, load_private_key, locked, write_private_key

CA_CERT, CA_KEY, CRL, ISSUED, CERTS = "ca.pem", "ca-key.pem", "crl.pem", "issued.json", "certs"
# Starts a few minutes back so a peer whose clock is slightly behind accepts it.
CLOCK_SKEW = dt.timedelta(minutes=5)


def now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def serial_hex(serial: int) -> str:
    """How serials are written everywhere (issued.json, `pki list`, coordinator logs)."""
    return f"{serial:x}"


@dataclass(frozen=True)
class CaFiles:
    directory: Path
    ca_cert: Path
    ca_key: Path
    crl: Path
    issued: Path
    fingerprint: str


@dataclass(frozen=True)
class IssuedCertificate:
    """One row of issued.json."""

    serial: int
    role: str
    name: str
    not_before: str  # ISO 8601, UTC
    not_after: str
    fingerprint: str
    public_key_fingerprint: str
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()
    revoked: bool = False
    revoked_at: str | None = None
    reason: str | None = None

    @property
    def expired(self) -> bool:
        return dt.datetime.fromisoformat(self.not_after) <= now()

    @property
    def status(self) -> str:
        return "revoked" if self.revoked else "expired" if self.expired else "valid"

    def to_json(self) -> dict[str, object]:
        d = dataclasses.asdict(self)
        del d["serial"]  # the key
        d["dns_names"], d["ip_addresses"] = list(self.dns_names), list(self.ip_addresses)
        return d

    @classmethod
    def from_json(cls, serial: str, d: dict[str, object]) -> IssuedCertificate:
        fields = {f.name for f in dataclasses.fields(cls)}
        d = {k: v for k, v in d.items() if k in fields}
        d["dns_names"] = tuple(d.get("dns_names", ()))  # type: ignore[arg-type]
        d["ip_addresses"] = tuple(d.get("ip_addresses", ()))  # type: ignore[arg-type]
        return cls(serial=int(serial, 16), **d)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Ca:
    """A loaded CA: what signing and revoking need."""

    directory: Path
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def init_ca(*, directory: Path, federation: str, days: int = 3650) -> CaFiles:
    """Makes the federation CA: an ECDSA P-256 key and a self-signed certificate that
    may sign leaf certificates only (path length 0), an empty CRL and an empty record."""
    from fedcollab.pki._crl import write_crl
    from fedcollab.pki._identity import fingerprint

    directory = Path(directory)
    if not 1 <= len(federation) <= 64 or not federation.isprintable():
        raise PkiError(f"federation name {federation!r} must be 1 to 64 printable characters")
    if days < 1:
        raise PkiError(f"--days {days}: a CA must be valid for at least one day")
    existing = [p for p in (CA_CERT, CA_KEY, ISSUED) if (directory / p).exists()]
    if existing:
        raise PkiError(f"{directory} already holds a federation CA ({', '.join(existing)}); refusing to overwrite "
                       "it. To start over, move that folder away (every certificate it issued stops being "
                       "trusted once the coordinator has the new ca.pem), or pick another --dir")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, federation),
        x509.NameAttribute(NameOID.COMMON_NAME, "fedcollab federation CA"),
    ])
    start = now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW).not_valid_after(start + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private_key(directory / CA_KEY, key)  # first: it refuses to overwrite, so a race loses here
    atomic_write(directory / CA_CERT, cert.public_bytes(serialization.Encoding.PEM))
    ca = Ca(directory=directory, cert=cert, key=key)
    with locked(directory):
        write_issued(directory, [])
        write_crl(ca, [])
    return CaFiles(directory=directory, ca_cert=directory / CA_CERT, ca_key=directory / CA_KEY,
                   crl=directory / CRL, issued=directory / ISSUED, fingerprint=fingerprint(cert))


def load_ca(directory: Path) -> Ca:
    directory = Path(directory)
    if not (directory / CA_CERT).is_file() or not (directory / CA_KEY).is_file():
        raise PkiError(f"{directory} holds no federation CA ({CA_CERT} and {CA_KEY}); "
                       "make one with `fedcollab pki init`, or check --ca-dir")
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT).read_bytes())
    except ValueError as e:
        raise PkiError(f"{directory / CA_CERT} is not a PEM certificate: {e}") from None
    key = load_private_key(directory / CA_KEY)
    if key.public_key() != cert.public_key():
        raise PkiError(f"{directory / CA_KEY} is not the key of {directory / CA_CERT}: the CA folder is mixed up; "
                       "restore both from the same backup")
    return Ca(directory=directory, cert=cert, key=key)


def read_issued(directory: Path) -> list[IssuedCertificate]:
    path = Path(directory) / ISSUED
    try:
        raw = json.loads(path.read_text())
        return [IssuedCertificate.from_json(serial, d) for serial, d in raw.items()]
    except FileNotFoundError:
        raise PkiError(f"{path} is missing: is {directory} a CA folder made by `fedcollab pki init`?") from None
    except (ValueError, TypeError, AttributeError) as e:
        raise PkiError(f"{path} is damaged ({e}); restore it from a backup (certs/ holds every issued "
                       "certificate)") from None


def write_issued(directory: Path, records: list[IssuedCertificate]) -> None:
    data = {serial_hex(r.serial): r.to_json() for r in records}  # issue order
    atomic_write(Path(directory) / ISSUED, (json.dumps(data, indent=2) + "\n").encode())


def issued_certificates(*, ca_dir: Path) -> list[IssuedCertificate]:
    """Everything the CA issued, oldest first, with its status."""
    return read_issued(ca_dir)
