"""Revoking certificates: the record in issued.json and the CRL the coordinator reads.

crl.pem is rebuilt from issued.json on every change (never appended to), signed by the
CA, and replaced atomically so a coordinator reading it mid-write sees a whole file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from fedcollab.errors import PkiError
from fedcollab.pki._ca import CRL, Ca, IssuedCertificate, load_ca, now, read_issued, serial_hex, write_issued
from fedcollab.pki._files import atomic_write, locked

# A CRL past its next_update is stale: the coordinator warns. `fedcollab pki crl`
# re-signs it; every revocation does too.
CRL_DAYS = 30
# Reasons a revocation may give (RFC 5280); certificate_hold and remove_from_crl are
# left out because a fedcollab revocation is permanent.
REASONS = {f.name: f for f in x509.ReasonFlags if f.name not in ("certificate_hold", "remove_from_crl")}


def parse_reason(reason: str) -> x509.ReasonFlags:
    """Takes `key_compromise`, `key-compromise` or RFC 5280's `keyCompromise`."""
    key = reason.strip().replace("-", "_")
    for name, flag in REASONS.items():
        if key in (name, flag.value):
            return flag
    raise PkiError(f"revocation reason {reason!r} is not one of: {', '.join(REASONS)}")


def write_crl(ca: Ca, records: list[IssuedCertificate]) -> Path:
    """Signs a CRL listing every revoked record, with its date and reason. Caller holds the lock."""
    path = ca.directory / CRL
    number = _next_crl_number(path)
    start = now()
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(start)
        .next_update(start + dt.timedelta(days=CRL_DAYS))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    for r in records:
        if not r.revoked:
            continue
        entry = (x509.RevokedCertificateBuilder().serial_number(r.serial)
                 .revocation_date(dt.datetime.fromisoformat(r.revoked_at or r.not_before)))
        reason = parse_reason(r.reason or "unspecified")
        if reason is not x509.ReasonFlags.unspecified:  # RFC 5280: omit rather than say "unspecified"
            entry = entry.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(ca.key, hashes.SHA256())
    atomic_write(path, crl.public_bytes(serialization.Encoding.PEM))
    return path


def _next_crl_number(path: Path) -> int:
    try:
        crl = x509.load_pem_x509_crl(path.read_bytes())
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number) + 1
    except (OSError, ValueError, x509.ExtensionNotFound):
        return 1


def refresh_crl(*, ca_dir: Path) -> Path:
    """Re-signs crl.pem with a fresh next_update (run it before the old one goes stale)."""
    ca = load_ca(ca_dir)
    with locked(ca.directory):
        return write_crl(ca, read_issued(ca.directory))


def revoke(
    *,
    ca_dir: Path,
    serial: int | None = None,
    cert_pem: bytes | None = None,
    name: str | None = None,
    role: str | None = None,
    reason: str = "unspecified",
) -> Path:
    """Revokes one certificate (by `serial` or by its PEM) or every unrevoked certificate
    of `name` (narrowed by `role` when the name is used by several roles), and rewrites
    crl.pem. Returns its path: copy it to where the coordinator's `server.tls.crl` points
    (the coordinator re-reads it on the next call, no restart)."""
    if sum(x is not None for x in (serial, cert_pem, name)) != 1:
        raise PkiError("revoke takes exactly one of serial, cert_pem or name")
    if role is not None and name is None:
        raise PkiError("role only narrows a revocation by name; drop it or pass name")
    flag = parse_reason(reason)
    ca = load_ca(ca_dir)
    with locked(ca.directory):
        records = read_issued(ca.directory)
        if cert_pem is not None:
            records, serials = _by_certificate(ca, records, cert_pem)
        elif serial is not None:
            serials = _by_serial(records, serial)
        else:
            assert name is not None
            serials = _by_name(records, name, role)
        at = now().isoformat()
        records = [dataclasses.replace(r, revoked=True, revoked_at=at, reason=flag.name) if r.serial in serials else r
                   for r in records]
        write_issued(ca.directory, records)
        return write_crl(ca, records)


def _by_serial(records: list[IssuedCertificate], serial: int) -> set[int]:
    match = [r for r in records if r.serial == serial]
    if not match:
        raise PkiError(f"this CA issued no certificate with serial {serial_hex(serial)} (per issued.json); "
                       "check `fedcollab pki list`, or revoke with --cert FILE")
    if match[0].revoked:
        raise PkiError(f"serial {serial_hex(serial)} ({match[0].role} {match[0].name}) is already revoked "
                       f"(since {match[0].revoked_at}); nothing to do")
    return {serial}


def _by_name(records: list[IssuedCertificate], name: str, role: str | None) -> set[int]:
    match = [r for r in records if r.name == name and not r.revoked and role in (None, r.role)]
    if not match:
        raise PkiError(f"no unrevoked certificate for {role or 'any role'} named {name!r}; "
                       "check `fedcollab pki list`")
    roles = sorted({r.role for r in match})
    if len(roles) > 1:
        raise PkiError(f"{name!r} has unrevoked certificates as {' and '.join(roles)}: say which with role "
                       "(--role)")
    return {r.serial for r in match}


def _by_certificate(ca: Ca, records: list[IssuedCertificate],
                    cert_pem: bytes) -> tuple[list[IssuedCertificate], set[int]]:
    from fedcollab.pki._identity import fingerprint, identity_from_certificate, public_key_fingerprint

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as e:
        raise PkiError(f"not a PEM certificate: {e}") from None
    try:
        cert.verify_directly_issued_by(ca.cert)
    except Exception as e:  # ValueError (issuer name), InvalidSignature, TypeError: not ours
        raise PkiError(f"this certificate was not issued by the CA in {ca.directory} ({type(e).__name__}); "
                       "revoke it with the CA that issued it") from None
    if any(r.serial == cert.serial_number for r in records):
        return records, _by_serial(records, cert.serial_number)
    # Signed by this CA but missing from issued.json (restored from an old backup): record it, then revoke.
    identity = identity_from_certificate(cert)
    record = IssuedCertificate(
        serial=cert.serial_number, role=identity.role, name=identity.name,
        not_before=cert.not_valid_before_utc.isoformat(), not_after=cert.not_valid_after_utc.isoformat(),
        fingerprint=fingerprint(cert), public_key_fingerprint=public_key_fingerprint(cert))
    return [*records, record], {cert.serial_number}
