"""Who a certificate names: its role and name, and the fingerprints people compare.

The convention others rely on: Subject CN = name, and exactly one SubjectAlternativeName
URI `urn:fedcollab:<role>:<name>`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from fedcollab.errors import PkiError

ROLES = ("institution", "operator", "coordinator")
# Always used with fullmatch: `match` with `$` lets a trailing newline through ("hospital-a\n").
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# RFC 5280 bounds a CN at 64 characters (cryptography enforces it), so the PKI issues
# names up to 64 even though the convention's pattern reads names up to 128.
MAX_ISSUED_NAME = 64
URI_PREFIX = "urn:fedcollab:"


@dataclass(frozen=True)
class Identity:
    role: str
    name: str

    @property
    def uri(self) -> str:
        return f"{URI_PREFIX}{self.role}:{self.name}"


def name_problems(role: str, name: str) -> list[str]:
    """Every reason `role`/`name` cannot be certified (empty when it can)."""
    problems = []
    if role not in ROLES:
        problems.append(f"role {role!r} is not one of {', '.join(ROLES)}")
    if not NAME_RE.fullmatch(name):
        problems.append(f"name {name!r} must be a letter or digit followed by up to 127 letters, digits, "
                        "'.', '_' or '-'")
    elif len(name) > MAX_ISSUED_NAME:
        problems.append(f"name {name!r} has {len(name)} characters; a certificate's CN holds at most "
                        f"{MAX_ISSUED_NAME} (RFC 5280): choose a shorter name")
    return problems


def identity_from_uri(uri: str) -> Identity:
    if not uri.startswith(URI_PREFIX):
        raise PkiError(f"SAN URI {uri!r} is not a fedcollab identity (expected {URI_PREFIX}<role>:<name>)")
    role, sep, name = uri[len(URI_PREFIX):].partition(":")
    if not sep or role not in ROLES or not NAME_RE.fullmatch(name):
        raise PkiError(f"SAN URI {uri!r} is malformed: expected {URI_PREFIX}<role>:<name> with role one of "
                       f"{', '.join(ROLES)} and name matching {NAME_RE.pattern}")
    return Identity(role=role, name=name)


def identity_from_certificate(cert: x509.Certificate) -> Identity:
    """The role and name a certificate carries; PkiError when it carries none, or
    carries them inconsistently (a certificate the federation CA would not issue)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("the certificate has no SubjectAlternativeName, so no fedcollab identity: issue it with "
                       "`fedcollab pki sign`") from None
    uris = [u for u in san.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith(URI_PREFIX)]
    if len(uris) != 1:
        raise PkiError(f"the certificate has {len(uris)} {URI_PREFIX} SAN URIs, not exactly one: issue it with "
                       "`fedcollab pki sign`")
    identity = identity_from_uri(uris[0])
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(cns) != 1 or cns[0].value != identity.name:
        found = [c.value for c in cns]
        raise PkiError(f"the certificate's subject CN {found} does not equal the name in its SAN URI "
                       f"{identity.uri!r}: issue it with `fedcollab pki sign`")
    return identity


def identity_from_pem(pem: bytes) -> Identity:
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise PkiError(f"not a PEM certificate: {e}") from None
    return identity_from_certificate(cert)


def _colon_hex(digest: bytes) -> str:
    return "SHA256:" + ":".join(f"{b:02X}" for b in digest)


def _load_pem(pem: bytes) -> x509.Certificate | x509.CertificateSigningRequest:
    try:
        if b"CERTIFICATE REQUEST" in pem:
            return x509.load_pem_x509_csr(pem)
        return x509.load_pem_x509_certificate(pem)
    except ValueError as e:
        raise PkiError(f"not a PEM certificate or CSR: {e}") from None


def fingerprint(cert_or_pem: x509.Certificate | bytes) -> str:
    """SHA-256 over the DER certificate, as `SHA256:AB:CD:...`; the same value as
    `openssl x509 -noout -fingerprint -sha256`, so it can be checked without fedcollab."""
    cert = _load_pem(cert_or_pem) if isinstance(cert_or_pem, bytes) else cert_or_pem
    if not isinstance(cert, x509.Certificate):
        raise PkiError("fingerprint() takes a certificate; for a CSR use public_key_fingerprint()")
    return _colon_hex(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def public_key_fingerprint(
    csr_or_cert: x509.CertificateSigningRequest | x509.Certificate | CertificatePublicKeyTypes | bytes,
) -> str:
    """SHA-256 over the DER SubjectPublicKeyInfo: equal for a CSR and the certificate
    made from it, so the institution and the operator can compare them by phone."""
    obj = _load_pem(csr_or_cert) if isinstance(csr_or_cert, bytes) else csr_or_cert
    key = obj.public_key() if isinstance(obj, (x509.Certificate, x509.CertificateSigningRequest)) else obj
    spki = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return _colon_hex(hashlib.sha256(spki).digest())
