"""The federation PKI: a CA run by the operator, keys made where they are used.

Flow (the `fedcollab pki` commands): the operator runs `init`; each institution runs
`request`, which writes its private key and a CSR locally (the key never leaves it);
the operator runs `sign` and both sides compare the public-key fingerprint out of band;
`revoke` rewrites the CRL, which the coordinator re-reads without a restart.

Identity convention: Subject CN = name and one SAN URI `urn:fedcollab:<role>:<name>`,
role one of institution, operator, coordinator. Keys are ECDSA P-256 and signatures
SHA-256, which gRPC's TLS (BoringSSL) accepts.
"""

from fedcollab.errors import PkiError
from fedcollab.pki._ca import CaFiles, IssuedCertificate, init_ca, issued_certificates, serial_hex
from fedcollab.pki._crl import REASONS, refresh_crl, revoke
from fedcollab.pki._ephemeral import EphemeralPki, issue_ephemeral
from fedcollab.pki._identity import (
    NAME_RE,
    ROLES,
    Identity,
    fingerprint,
    identity_from_certificate,
    identity_from_pem,
    public_key_fingerprint,
)
from fedcollab.pki._request import RequestFiles, request_certificate
from fedcollab.pki._revocation import RevocationList
from fedcollab.pki._sign import SignedCertificate, sign_request

__all__ = [
    "NAME_RE",
    "REASONS",
    "ROLES",
    "CaFiles",
    "EphemeralPki",
    "Identity",
    "IssuedCertificate",
    "PkiError",
    "RequestFiles",
    "RevocationList",
    "SignedCertificate",
    "fingerprint",
    "identity_from_certificate",
    "identity_from_pem",
    "init_ca",
    "issue_ephemeral",
    "issued_certificates",
    "public_key_fingerprint",
    "refresh_crl",
    "request_certificate",
    "revoke",
    "serial_hex",
    "sign_request",
]
