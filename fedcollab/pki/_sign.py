"""The operator's side: check a CSR against the identity convention and sign it.

Nothing in the certificate is copied from the CSR blindly: the subject, the usages and
the SANs are rebuilt from values that passed validation; other requested extensions
are ignored.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcollab.errors import PkiError
from fedcollab.pki._ca import CERTS, CLOCK_SKEW, IssuedCertificate, load_ca, now, read_issued, serial_hex, write_issued
from fedcollab.pki._crl import write_crl
from fedcollab.pki._files import atomic_write, locked
from fedcollab.pki._identity import (
    URI_PREFIX,
    Identity,
    fingerprint,
    identity_from_uri,
    name_problems,
    public_key_fingerprint,
)
from fedcollab.pki._request import dns_name_problem

_USAGE = {"institution": ExtendedKeyUsageOID.CLIENT_AUTH, "operator": ExtendedKeyUsageOID.CLIENT_AUTH,
          "coordinator": ExtendedKeyUsageOID.SERVER_AUTH}
_USAGE_NAMES = {ExtendedKeyUsageOID.CLIENT_AUTH: "clientAuth", ExtendedKeyUsageOID.SERVER_AUTH: "serverAuth"}


@dataclass(frozen=True)
class SignedCertificate:
    cert_pem: bytes
    identity: Identity
    serial: int
    fingerprint: str
    public_key_fingerprint: str
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    not_before: dt.datetime
    not_after: dt.datetime
    path: Path  # the CA's copy, certs/<serial>.pem (and `out` when given)
    replaced: tuple[int, ...] = ()  # serials revoked as superseded (replace=True)


@dataclass(frozen=True)
class _Request:
    """What a CSR asks for, once it has passed validation."""

    identity: Identity
    public_key: ec.EllipticCurvePublicKey
    dns_names: tuple[str, ...]
    ip_addresses: tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, ...]


def sign_request(
    *, ca_dir: Path, csr_pem: bytes, days: int = 365, out: Path | None = None, replace: bool = False
) -> SignedCertificate:
    """Signs a CSR made by `fedcollab pki request`. Refuses (PkiError, listing every
    problem) a CSR whose signature does not verify, that is not ECDSA P-256, that asks
    for another identity form, a CA, host names for a client, or a usage its role does
    not get; and a role+name that already holds a valid certificate unless `replace`,
    which revokes that one as superseded."""
    if days < 1:
        raise PkiError(f"--days {days}: a certificate must be valid for at least one day")
    request = _validate(csr_pem)
    ca = load_ca(ca_dir)
    start = now()
    not_after = start + dt.timedelta(days=days)
    if not_after > ca.cert.not_valid_after_utc:
        left = (ca.cert.not_valid_after_utc - start).days
        raise PkiError(f"the federation CA expires on {ca.cert.not_valid_after_utc:%Y-%m-%d}, before this certificate "
                       f"would: sign with --days {left} or less, or make a new CA")
    identity = request.identity
    key_fp = public_key_fingerprint(request.public_key)
    with locked(ca.directory):
        records = read_issued(ca.directory)
        _check_key_reuse(records, identity, key_fp)
        current = [r for r in records if (r.role, r.name) == (identity.role, identity.name) and r.status == "valid"]
        if current and not replace:
            serials = ", ".join(serial_hex(r.serial) for r in current)
            raise PkiError(f"{identity.role} {identity.name!r} already has a valid certificate (serial {serials}, "
                           f"until {current[0].not_after[:10]}). Revoke it first (`fedcollab pki revoke --serial "
                           f"{serial_hex(current[0].serial)}`), or pass --replace to revoke it as superseded and "
                           "issue this one")
        cert = _build(ca.cert, ca.key, request, start=start, not_after=not_after)
        cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        copy = ca.directory / CERTS / f"{serial_hex(cert.serial_number)}.pem"
        atomic_write(copy, cert_pem)
        replaced = {r.serial for r in current}
        records = [dataclasses.replace(r, revoked=True, revoked_at=start.isoformat(), reason="superseded")
                   if r.serial in replaced else r for r in records]
        records.append(IssuedCertificate(
            serial=cert.serial_number, role=identity.role, name=identity.name,
            not_before=cert.not_valid_before_utc.isoformat(), not_after=cert.not_valid_after_utc.isoformat(),
            fingerprint=fingerprint(cert), public_key_fingerprint=key_fp,
            dns_names=request.dns_names, ip_addresses=tuple(map(str, request.ip_addresses))))
        write_issued(ca.directory, records)
        if replaced:
            write_crl(ca, records)
    if out is not None:
        atomic_write(Path(out), cert_pem)
    return SignedCertificate(
        cert_pem=cert_pem, identity=identity, serial=cert.serial_number, fingerprint=fingerprint(cert),
        public_key_fingerprint=key_fp, dns_names=request.dns_names,
        ip_addresses=tuple(map(str, request.ip_addresses)), not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc, path=Path(out) if out is not None else copy,
        replaced=tuple(sorted(replaced)))


def _validate(csr_pem: bytes) -> _Request:
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as e:
        raise PkiError(f"not a PEM certificate signing request ({e}); send the .csr file `fedcollab pki request` "
                       "wrote") from None
    if not csr.is_signature_valid:
        raise PkiError("the CSR's signature does not verify: it was altered after it was made. Ask its sender for a "
                       "fresh one (`fedcollab pki request`) and compare the public-key fingerprint by phone")
    problems: list[str] = []
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        problems.append(f"the key is {type(key).__name__} {getattr(getattr(key, 'curve', None), 'name', '')}, "
                        "not ECDSA P-256 (what the federation's TLS uses): make the request with `fedcollab pki "
                        "request`")
    attributes = list(csr.subject)
    cns = [a.value for a in attributes if a.oid == NameOID.COMMON_NAME]
    if len(cns) != 1 or len(attributes) != 1:
        problems.append(f"the subject must be exactly one CN (the name), not {csr.subject.rfc4514_string()!r}")
    try:
        extensions = list(csr.extensions)
    except ValueError as e:
        raise PkiError(f"the CSR has a malformed extension ({e}); make it with `fedcollab pki request`") from None
    uris: list[str] = []
    dns: list[str] = []
    ips: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    usages: list[x509.ObjectIdentifier] = []
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.SubjectAlternativeName):
            for general in value:
                if isinstance(general, x509.UniformResourceIdentifier):
                    uris.append(general.value)
                elif isinstance(general, x509.DNSName):
                    dns.append(general.value)
                elif isinstance(general, x509.IPAddress) and not isinstance(general.value, (ipaddress.IPv4Network,
                                                                                          ipaddress.IPv6Network)):
                    ips.append(general.value)
                else:
                    problems.append(f"the SAN {general} is not a URI, DNS name or IP address")
        elif isinstance(value, x509.ExtendedKeyUsage):
            usages += list(value)
        elif isinstance(value, x509.BasicConstraints) and value.ca:
            problems.append("the CSR asks to be a CA; the federation CA signs leaf certificates only")
        elif isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            problems.append("the CSR asks for keyCertSign/cRLSign; the federation CA signs leaf certificates only")
    ours = [u for u in uris if u.startswith(URI_PREFIX)]
    if len(ours) != 1 or len(uris) != 1:
        problems.append(f"the CSR must carry exactly one SAN URI {URI_PREFIX}<role>:<name>, not {uris}")
        raise PkiError("refusing the CSR: " + "; ".join(problems))
    try:
        identity = identity_from_uri(ours[0])
    except PkiError as e:
        problems.append(str(e))
        raise PkiError("refusing the CSR: " + "; ".join(problems)) from None
    problems += name_problems(identity.role, identity.name)
    if cns and cns[0] != identity.name:
        problems.append(f"the CN {cns[0]!r} differs from the name in the SAN URI {identity.uri!r}")
    expected = _USAGE[identity.role]
    wrong = [_USAGE_NAMES.get(u, u.dotted_string) for u in usages if u != expected]
    if wrong:
        problems.append(f"a {identity.role}'s certificate is for {_USAGE_NAMES[expected]} only; the CSR asks for "
                        f"{', '.join(wrong)}")
    if identity.role == "coordinator":
        if not dns and not ips:
            problems.append("a coordinator's certificate must name the hosts it is reached by (DNS names or IPs)")
        problems += [p for p in map(dns_name_problem, dns) if p]
    elif dns or ips:
        problems.append(f"a {identity.role}'s certificate is a client certificate and names no hosts; the CSR asks "
                        f"for {', '.join([*dns, *map(str, ips)])}")
    if problems:
        raise PkiError(f"refusing the CSR for {identity.role} {identity.name!r}: " + "; ".join(problems))
    return _Request(identity=identity, public_key=key, dns_names=tuple(dict.fromkeys(dns)),  # type: ignore[arg-type]
                    ip_addresses=tuple(dict.fromkeys(ips)))


def _check_key_reuse(records: list[IssuedCertificate], identity: Identity, key_fp: str) -> None:
    for r in records:
        if r.public_key_fingerprint != key_fp:
            continue
        if (r.role, r.name) != (identity.role, identity.name):
            raise PkiError(f"this key is already certified for {r.role} {r.name!r} (serial {serial_hex(r.serial)}); "
                           "each party needs its own key: make a new request")
        if r.revoked and r.reason == "key_compromise":
            raise PkiError(f"this key's certificate (serial {serial_hex(r.serial)}) was revoked for key compromise: "
                           f"move {identity.name}-key.pem away and make a new request, which makes a new key")


def _build(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, request: _Request, *,
           start: dt.datetime, not_after: dt.datetime) -> x509.Certificate:
    identity = request.identity
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
    sans += [x509.DNSName(d) for d in request.dns_names] + [x509.IPAddress(ip) for ip in request.ip_addresses]
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.name)]))
        .issuer_name(ca_cert.subject)
        .public_key(request.public_key).serial_number(x509.random_serial_number())
        .not_valid_before(start - CLOCK_SKEW).not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([_USAGE[identity.role]]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(request.public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
