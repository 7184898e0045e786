"""Who said what in a secure-aggregation round: each institution signs its keys, its
seed commitments and the survivor list it is shown with its mTLS certificate's private
key (ECDSA P-256, SHA-256), and ships the certificate along; every peer checks that the
certificate was issued by the federation CA it trusts, is valid now, names the peer
(SAN URI urn:fedcollab:institution:<name>) and that the signature verifies.

This is what stops a coordinator that substitutes keys: it relays the keys, but it
cannot sign for an institution, so a key it made up fails here before any share is
encrypted to it. Revocation is not checked here (institutions hold no CRL); the
coordinator refuses revoked certificates at the TLS handshake and in the session.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from fedcollab.errors import PkiError
from fedcollab.pki._identity import Identity, identity_from_certificate


class SignatureProblem(Exception):
    """`reason` is UPPER_SNAKE: SECAGG_UNSIGNED, SECAGG_BAD_CERTIFICATE or SECAGG_BAD_SIGNATURE."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message


def encode_fields(*parts: bytes | str | int) -> bytes:
    """An unambiguous byte string of `parts` (each length-prefixed), for hashing and signing."""
    out = bytearray()
    for p in parts:
        b = p.encode() if isinstance(p, str) else p.to_bytes(8, "big", signed=True) if isinstance(p, int) else p
        out += len(b).to_bytes(4, "big") + b
    return bytes(out)


def digest(*parts: bytes | str | int) -> bytes:
    return hashlib.sha256(encode_fields(*parts)).digest()


def names_digest(names: Sequence[str]) -> bytes:
    return digest(b"fedcollab/secagg/names/v1", *names)


@dataclass(frozen=True)
class SigningIdentity:
    """This institution's certificate (PEM) and its private key."""

    certificate_pem: bytes
    key: ec.EllipticCurvePrivateKey = field(repr=False)

    @classmethod
    def from_files(cls, *, cert: Path, key: Path) -> SigningIdentity:
        from fedcollab.pki._files import load_private_key

        pem = Path(cert).read_bytes()
        private = load_private_key(Path(key))
        certificate = x509.load_pem_x509_certificate(pem)
        public = certificate.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey) or public.public_numbers() != \
                private.public_key().public_numbers():
            raise PkiError(f"{key} is not the private key of {cert}")
        return cls(certificate_pem=pem, key=private)

    def sign(self, data: bytes) -> bytes:
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


class PeerVerifier:
    """Checks peers' signatures against the federation CA; a certificate that passed
    once is remembered (by its bytes), so each round verifies each chain once."""

    def __init__(self, *, ca_pem: bytes) -> None:
        self._ca = x509.load_pem_x509_certificate(ca_pem)
        self._known: dict[bytes, tuple[Identity, ec.EllipticCurvePublicKey]] = {}

    @classmethod
    def from_file(cls, ca_cert: Path) -> PeerVerifier:
        return cls(ca_pem=Path(ca_cert).read_bytes())

    def _certificate(self, pem: bytes, name: str) -> ec.EllipticCurvePublicKey:
        known = self._known.get(pem)
        if known is None:
            try:
                cert = x509.load_pem_x509_certificate(pem)
            except ValueError:
                raise SignatureProblem("SECAGG_BAD_CERTIFICATE", f"{name}'s certificate is not a PEM "
                                                                 "certificate") from None
            try:
                cert.verify_directly_issued_by(self._ca)
            except (ValueError, TypeError, InvalidSignature):
                raise SignatureProblem("SECAGG_BAD_CERTIFICATE", f"{name}'s certificate was not issued by this "
                                                                 "institution's federation CA") from None
            now = dt.datetime.now(dt.UTC)
            if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
                raise SignatureProblem("SECAGG_BAD_CERTIFICATE", f"{name}'s certificate is not valid now")
            try:
                identity = identity_from_certificate(cert)
            except PkiError as e:
                raise SignatureProblem("SECAGG_BAD_CERTIFICATE", f"{name}'s certificate: {e}") from None
            public = cert.public_key()
            if not isinstance(public, ec.EllipticCurvePublicKey):
                raise SignatureProblem("SECAGG_BAD_CERTIFICATE", f"{name}'s certificate has no ECDSA key")
            known = (identity, public)
            self._known[pem] = known
        identity, public = known
        if identity != Identity(role="institution", name=name):
            raise SignatureProblem("SECAGG_BAD_CERTIFICATE", f"the certificate shipped as {name}'s names "
                                                             f"{identity.uri}, not urn:fedcollab:institution:{name}")
        return public

    def check(self, *, name: str, certificate_pem: bytes, data: bytes, signature: bytes, what: str) -> None:
        """Raises SignatureProblem unless `signature` over `data` is `name`'s."""
        if not certificate_pem or not signature:
            raise SignatureProblem("SECAGG_UNSIGNED", f"{name}'s {what} came unsigned; an institution with a "
                                                      "federation certificate accepts only signed ones")
        public = self._certificate(bytes(certificate_pem), name)
        try:
            public.verify(bytes(signature), data, ec.ECDSA(hashes.SHA256()))
        except InvalidSignature:
            raise SignatureProblem("SECAGG_BAD_SIGNATURE", f"{name}'s signature on its {what} does not verify "
                                                           "(relayed keys or lists were altered)") from None


def signed_by_sender(*, name: str, certificate_pem: bytes, data: bytes, signature: bytes) -> bool:
    """The coordinator's cheap check of a submission: the certificate names the
    authenticated sender and the signature verifies with it (no chain check: the
    sender's TLS handshake already proved the chain)."""
    try:
        cert = x509.load_pem_x509_certificate(bytes(certificate_pem))
        if identity_from_certificate(cert) != Identity(role="institution", name=name):
            return False
        public = cert.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            return False
        public.verify(bytes(signature), data, ec.ECDSA(hashes.SHA256()))
        return True
    except (ValueError, TypeError, PkiError, InvalidSignature):
        return False
