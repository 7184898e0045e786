"""The federation PKI: CA, requests, signing by the identity convention, revocation and
its hot-reloaded list, and certificates that a real gRPC mutual-TLS handshake accepts."""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import logging
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcollab.errors import FedcollabError
from fedcollab.pki import (
    Identity,
    PkiError,
    RevocationList,
    fingerprint,
    identity_from_certificate,
    identity_from_pem,
    init_ca,
    issue_ephemeral,
    issued_certificates,
    public_key_fingerprint,
    request_certificate,
    revoke,
    sign_request,
)

CLIENT, SERVER = ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH


@pytest.fixture
def ca_dir(tmp_path: Path) -> Path:
    init_ca(directory=tmp_path / "ca", federation="test-federation")
    return tmp_path / "ca"


def ca_cert(ca_dir: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())


def issue(ca_dir: Path, role: str, name: str, **kwargs: Any) -> x509.Certificate:
    """request + sign, as an institution and the operator do it."""
    req = request_certificate(directory=ca_dir.parent / role, role=role, name=name, **kwargs)
    signed = sign_request(ca_dir=ca_dir, csr_pem=req.csr.read_bytes())
    return x509.load_pem_x509_certificate(signed.cert_pem)


def make_csr(*, cn: str = "hospital-a", sans: list[x509.GeneralName] | None = None,
             usages: list[x509.ObjectIdentifier] | None = None, key: Any = None,
             extra: tuple[x509.ExtensionType, ...] = (), subject: x509.Name | None = None) -> bytes:
    """A CSR built by hand, to ask for what `pki request` never would."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
    sans = [x509.UniformResourceIdentifier(f"urn:fedcollab:institution:{cn}")] if sans is None else sans
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    for ext in extra:
        builder = builder.add_extension(ext, critical=False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def uri(role: str, name: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(f"urn:fedcollab:{role}:{name}")


# --- CA, request, sign ------------------------------------------------------------------


def test_init_request_sign_round_trip(ca_dir: Path, tmp_path: Path) -> None:
    req = request_certificate(directory=tmp_path / "hospital", role="institution", name="hospital-a")
    assert req.key == tmp_path / "hospital" / "hospital-a-key.pem" and req.csr.name == "hospital-a.csr"
    out = tmp_path / "returned" / "hospital-a.pem"
    signed = sign_request(ca_dir=ca_dir, csr_pem=req.csr.read_bytes(), days=30, out=out)
    assert out.read_bytes() == signed.cert_pem
    cert = x509.load_pem_x509_certificate(signed.cert_pem)
    cert.verify_directly_issued_by(ca_cert(ca_dir))
    assert signed.identity == Identity(role="institution", name="hospital-a") == identity_from_certificate(cert)
    assert identity_from_pem(signed.cert_pem) == signed.identity
    assert signed.serial == cert.serial_number and signed.fingerprint == fingerprint(cert)
    # The fingerprint people compare by phone: the CSR's key and the certificate's key.
    assert req.public_key_fingerprint == public_key_fingerprint(req.csr.read_bytes()) == signed.public_key_fingerprint
    assert public_key_fingerprint(cert) == public_key_fingerprint(signed.cert_pem) == req.public_key_fingerprint
    assert fingerprint(signed.cert_pem).startswith("SHA256:") and len(fingerprint(cert)) == 7 + 32 * 3 - 1
    # The certificate matches the key the institution kept.
    key = serialization.load_pem_private_key(req.key.read_bytes(), password=None)
    assert key.public_key() == cert.public_key()
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc) >= dt.timedelta(days=30)
    assert cert.signature_hash_algorithm.name == "sha256"  # type: ignore[union-attr]
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    assert cert.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]
    ext = cert.extensions
    assert ext.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert ext.get_extension_for_class(x509.BasicConstraints).critical
    assert list(ext.get_extension_for_class(x509.ExtendedKeyUsage).value) == [CLIENT]
    assert ext.get_extension_for_class(x509.KeyUsage).value.digital_signature
    san = ext.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [uri("institution", "hospital-a")]
    assert cert.subject.rfc4514_string() == "CN=hospital-a"
    record = issued_certificates(ca_dir=ca_dir)[0]
    assert (record.serial, record.role, record.name, record.status) == (cert.serial_number, "institution",
                                                                          "hospital-a", "valid")
    assert (ca_dir / "certs" / f"{cert.serial_number:x}.pem").read_bytes() == signed.cert_pem


def test_the_ca_certificate(ca_dir: Path) -> None:
    cert = ca_cert(ca_dir)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).critical
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign and not usage.digital_signature
    assert (cert.not_valid_after_utc - cert.not_valid_before_utc) >= dt.timedelta(days=3650)
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "test-federation"
    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.is_signature_valid(cert.public_key()) and len(crl) == 0  # type: ignore[arg-type]
    assert json.loads((ca_dir / "issued.json").read_text()) == {}


def test_key_files_are_private_and_never_overwritten(ca_dir: Path, tmp_path: Path) -> None:
    assert stat.S_IMODE(os.stat(ca_dir / "ca-key.pem").st_mode) == 0o600
    first = request_certificate(directory=tmp_path / "h", role="institution", name="hospital-a")
    assert stat.S_IMODE(os.stat(first.key).st_mode) == 0o600 and not first.reused_key
    key_pem = first.key.read_bytes()
    again = request_certificate(directory=tmp_path / "h", role="institution", name="hospital-a")
    assert again.reused_key and first.key.read_bytes() == key_pem  # a renewal keeps the key
    assert again.public_key_fingerprint == first.public_key_fingerprint
    with pytest.raises(PkiError, match="already holds a federation CA.*move that folder away"):
        init_ca(directory=ca_dir, federation="again")
    assert (ca_dir / "ca-key.pem").read_bytes() and stat.S_IMODE(os.stat(ca_dir / "ca-key.pem").st_mode) == 0o600


def test_pki_error_is_a_fedcollab_error() -> None:
    assert issubclass(PkiError, FedcollabError)  # so `fedcollab` prints it and exits 1


def test_coordinator_certificate_names_its_hosts_and_is_for_servers(ca_dir: Path) -> None:
    cert = issue(ca_dir, "coordinator", "coordinator", dns_names=["fl.example.org", "localhost"],
                 ip_addresses=["10.1.2.3", "::1"])
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["urn:fedcollab:coordinator:coordinator"]
    assert san.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.1.2.3"), ipaddress.ip_address("::1")]
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [SERVER]
    default = issue(ca_dir, "coordinator", "other-coordinator")  # no hosts given: localhost and 127.0.0.1
    san = default.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_operator_certificate_is_a_client_certificate(ca_dir: Path) -> None:
    cert = issue(ca_dir, "operator", "alice")
    assert identity_from_certificate(cert) == Identity(role="operator", name="alice")
    assert list(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value) == [CLIENT]


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(role="institution", name="hospital-a", dns_names=["h.example.org"]), "only a coordinator",
                 id="bad: institution names a host"),
    pytest.param(dict(role="operator", name="alice", ip_addresses=["10.0.0.1"]), "only a coordinator",
                 id="bad: operator names an IP"),
    pytest.param(dict(role="admin", name="alice"), "role 'admin'", id="bad: unknown role"),
    pytest.param(dict(role="institution", name="-x"), "name '-x'", id="bad: name starts with '-'"),
    pytest.param(dict(role="institution", name="a b"), "name 'a b'", id="bad: space in name"),
    pytest.param(dict(role="institution", name="a" * 65), "at most 64", id="bad: longer than a CN holds"),
    pytest.param(dict(role="coordinator", name="c", dns_names=["*.example.org"]), "no wildcards",
                 id="bad: wildcard host"),
    pytest.param(dict(role="coordinator", name="c", ip_addresses=["10.0.0.300"]), "not an IP", id="bad: IP"),
])
def test_request_refuses_what_the_convention_does_not_allow(tmp_path: Path, kwargs: dict[str, Any],
                                                            message: str) -> None:
    with pytest.raises(PkiError, match=message):
        request_certificate(directory=tmp_path, **kwargs)
    assert not list(tmp_path.iterdir())  # no key written for a refused request


P384 = ec.generate_private_key(ec.SECP384R1())


@pytest.mark.parametrize("csr, message", [
    pytest.param(lambda: make_csr(usages=[SERVER]), "for clientAuth only.*serverAuth",
                 id="bad: institution serverAuth"),
    pytest.param(lambda: make_csr(usages=[CLIENT, SERVER]), "serverAuth", id="bad: institution client+server"),
    pytest.param(lambda: make_csr(sans=[uri("institution", "hospital-a"), x509.DNSName("evil.example.org")]),
                 "names no hosts.*evil.example.org", id="bad: institution DNS SAN"),
    pytest.param(lambda: make_csr(sans=[uri("institution", "hospital-a"),
                                        x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]),
                 "names no hosts.*10.0.0.1", id="bad: institution IP SAN"),
    pytest.param(lambda: make_csr(sans=[uri("coordinator", "c")], cn="c", usages=[SERVER]),
                 "must name the hosts", id="bad: coordinator without hosts"),
    pytest.param(lambda: make_csr(sans=[uri("coordinator", "c"), x509.DNSName("*.example.org")], cn="c"),
                 "no wildcards", id="bad: coordinator wildcard"),
    pytest.param(lambda: make_csr(cn="hospital-b", sans=[uri("institution", "hospital-a")]),
                 "CN 'hospital-b' differs", id="bad: CN is not the URI name"),
    pytest.param(lambda: make_csr(sans=[]), "exactly one SAN URI", id="bad: no SAN at all"),
    pytest.param(lambda: make_csr(sans=[uri("institution", "hospital-a"), uri("operator", "hospital-a")]),
                 "exactly one SAN URI", id="bad: two identities"),
    pytest.param(lambda: make_csr(sans=[x509.UniformResourceIdentifier("urn:fedcollab:admin:hospital-a")]),
                 "malformed", id="bad: unknown role"),
    pytest.param(lambda: make_csr(sans=[uri("institution", "hospital-a"), x509.RFC822Name("a@example.org")]),
                 "not a URI, DNS name or IP", id="bad: email SAN"),
    pytest.param(lambda: make_csr(extra=(x509.BasicConstraints(ca=True, path_length=None),)), "asks to be a CA",
                 id="bad: asks to be a CA"),
    pytest.param(lambda: make_csr(key=P384), "not ECDSA P-256", id="bad: P-384 key"),
    pytest.param(lambda: make_csr(subject=x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "x"),
                                                     x509.NameAttribute(NameOID.COMMON_NAME, "hospital-a")])),
                 "exactly one CN", id="bad: extra subject attribute"),
    pytest.param(lambda: b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
                 "not a PEM certificate signing request", id="bad: not a CSR"),
])
def test_sign_refuses_csrs_outside_the_convention(ca_dir: Path, csr: Any, message: str) -> None:
    with pytest.raises(PkiError, match=message):
        sign_request(ca_dir=ca_dir, csr_pem=csr())
    assert issued_certificates(ca_dir=ca_dir) == [] and not (ca_dir / "certs").exists()


def test_sign_reports_every_problem_at_once(ca_dir: Path) -> None:
    csr = make_csr(usages=[SERVER], sans=[uri("institution", "hospital-a"), x509.DNSName("a.example.org")])
    with pytest.raises(PkiError, match="serverAuth.*; .*a.example.org"):
        sign_request(ca_dir=ca_dir, csr_pem=csr)


def test_sign_copies_nothing_unvalidated(ca_dir: Path) -> None:
    """An extension the CSR asks for that the convention has no use for is dropped."""
    csr = make_csr(usages=[CLIENT], extra=(x509.OCSPNoCheck(),))
    cert = x509.load_pem_x509_certificate(sign_request(ca_dir=ca_dir, csr_pem=csr).cert_pem)
    assert {type(e.value) for e in cert.extensions} == {
        x509.BasicConstraints, x509.KeyUsage, x509.ExtendedKeyUsage, x509.SubjectAlternativeName,
        x509.SubjectKeyIdentifier, x509.AuthorityKeyIdentifier}


def test_tampered_csr_is_refused(ca_dir: Path, tmp_path: Path) -> None:
    """Someone on the way swaps the name: the CSR no longer verifies under its key."""
    req = request_certificate(directory=tmp_path, role="institution", name="hospital-a")
    der = x509.load_pem_x509_csr(req.csr.read_bytes()).public_bytes(serialization.Encoding.DER)
    tampered_der = der.replace(b"hospital-a", b"hospital-z")
    assert tampered_der != der
    tampered = x509.load_der_x509_csr(tampered_der).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(PkiError, match="signature does not verify.*fresh one"):
        sign_request(ca_dir=ca_dir, csr_pem=tampered)
    assert issued_certificates(ca_dir=ca_dir) == []


def test_a_name_gets_a_second_certificate_only_by_replacing_the_first(ca_dir: Path, tmp_path: Path) -> None:
    req = request_certificate(directory=tmp_path, role="institution", name="hospital-a")
    first = sign_request(ca_dir=ca_dir, csr_pem=req.csr.read_bytes())
    with pytest.raises(PkiError, match=f"already has a valid certificate.*revoke --serial {first.serial:x}.*--replace"):
        sign_request(ca_dir=ca_dir, csr_pem=req.csr.read_bytes())
    crl = RevocationList(ca_dir / "crl.pem", ca_cert=ca_cert(ca_dir))
    second = sign_request(ca_dir=ca_dir, csr_pem=req.csr.read_bytes(), replace=True)
    assert second.replaced == (first.serial,)
    assert crl.is_revoked(first.serial) and not crl.is_revoked(second.serial)
    status = {r.serial: (r.status, r.reason) for r in issued_certificates(ca_dir=ca_dir)}
    assert status == {first.serial: ("revoked", "superseded"), second.serial: ("valid", None)}
    # The same name in another role is another identity.
    issue(ca_dir, "operator", "hospital-a")
    # After a revocation, a new certificate needs no --replace.
    revoke(ca_dir=ca_dir, serial=second.serial)
    sign_request(ca_dir=ca_dir, csr_pem=req.csr.read_bytes())


def test_one_key_cannot_serve_two_identities(ca_dir: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    sign_request(ca_dir=ca_dir, csr_pem=make_csr(key=key))
    with pytest.raises(PkiError, match="already certified for institution 'hospital-a'"):
        sign_request(ca_dir=ca_dir, csr_pem=make_csr(key=key, cn="hospital-b"))


def test_a_compromised_key_is_not_certified_again(ca_dir: Path, tmp_path: Path) -> None:
    req = request_certificate(directory=tmp_path, role="institution", name="hospital-a")
    sign_request(ca_dir=ca_dir, csr_pem=req.csr.read_bytes())
    revoke(ca_dir=ca_dir, name="hospital-a", reason="key_compromise")
    with pytest.raises(PkiError, match="revoked for key compromise.*new key"):
        sign_request(ca_dir=ca_dir, csr_pem=req.csr.read_bytes())


def test_sign_refuses_validity_past_the_ca(tmp_path: Path) -> None:
    init_ca(directory=tmp_path / "ca", federation="short", days=10)
    req = request_certificate(directory=tmp_path, role="institution", name="hospital-a")
    with pytest.raises(PkiError, match="CA expires.*--days (9|10) or less"):
        sign_request(ca_dir=tmp_path / "ca", csr_pem=req.csr.read_bytes(), days=365)


def test_sign_without_a_ca_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="fedcollab pki init"):
        sign_request(ca_dir=tmp_path / "nothing", csr_pem=make_csr())


# --- identity from certificates ---------------------------------------------------------


def _cert_with(*, cn: str, sans: list[x509.GeneralName] | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
               .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)))
    if sans is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, hashes.SHA256())


@pytest.mark.parametrize("cn, sans, message", [
    pytest.param("hospital-a", None, "no SubjectAlternativeName", id="bad: no SAN"),
    pytest.param("hospital-a", [x509.DNSName("hospital-a")], "0 urn:fedcollab: SAN URIs", id="bad: no URI"),
    pytest.param("hospital-a", [uri("institution", "hospital-a"), uri("operator", "hospital-a")],
                 "2 urn:fedcollab: SAN URIs", id="bad: two URIs"),
    pytest.param("hospital-a", [x509.UniformResourceIdentifier("urn:fedcollab:institution")], "malformed",
                 id="bad: no name"),
    pytest.param("hospital-a", [x509.UniformResourceIdentifier("urn:fedcollab:root:hospital-a")], "malformed",
                 id="bad: unknown role"),
    pytest.param("hospital-a", [x509.UniformResourceIdentifier("urn:fedcollab:institution:a/b")], "malformed",
                 id="bad: name outside the pattern"),
    pytest.param("hospital-b", [uri("institution", "hospital-a")], "CN .*hospital-b.* does not equal",
                 id="bad: CN differs"),
])
def test_identity_from_certificate_refuses_what_the_ca_would_not_issue(
        cn: str, sans: list[x509.GeneralName] | None, message: str) -> None:
    with pytest.raises(PkiError, match=message):
        identity_from_certificate(_cert_with(cn=cn, sans=sans))


def test_identity_from_certificate_reads_names_up_to_128_characters() -> None:
    """The convention's pattern reads 128; the CA issues 64 (a CN's RFC 5280 bound)."""
    name = "a" * 64
    assert identity_from_certificate(_cert_with(cn=name, sans=[uri("institution", name)])).name == name
    with pytest.raises(PkiError, match="not a PEM certificate"):
        identity_from_pem(b"nonsense")


# --- revocation -------------------------------------------------------------------------


def test_revoke_and_the_revocation_list_picks_it_up_without_a_restart(ca_dir: Path) -> None:
    a, b, c = (issue(ca_dir, "institution", n) for n in ("hospital-a", "hospital-b", "hospital-c"))
    revocations = RevocationList(ca_dir / "crl.pem", ca_cert=ca_cert(ca_dir))
    assert not any(revocations.is_revoked(x.serial_number) for x in (a, b, c))
    revoke(ca_dir=ca_dir, serial=a.serial_number, reason="key_compromise")
    assert revocations.is_revoked(a.serial_number) and not revocations.is_revoked(b.serial_number)
    # A second revocation, by certificate file, right after: the same object sees it.
    revoke(ca_dir=ca_dir, cert_pem=b.public_bytes(serialization.Encoding.PEM), reason="affiliation-changed")
    assert revocations.is_revoked(b.serial_number) and not revocations.is_revoked(c.serial_number)
    revoke(ca_dir=ca_dir, name="hospital-c", reason="cessationOfOperation")
    assert revocations.revoked_serials == {a.serial_number, b.serial_number, c.serial_number}

    crl = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes())
    assert crl.is_signature_valid(ca_cert(ca_dir).public_key())  # type: ignore[arg-type]
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 4  # init + 3 revocations
    assert crl.next_update_utc is not None and crl.next_update_utc - crl.last_update_utc == dt.timedelta(days=30)
    entry = crl.get_revoked_certificate_by_serial_number(a.serial_number)
    assert entry is not None and entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == \
        x509.ReasonFlags.key_compromise
    assert abs(entry.revocation_date_utc - dt.datetime.now(dt.UTC)) < dt.timedelta(minutes=1)
    reasons = {r.serial: r.reason for r in issued_certificates(ca_dir=ca_dir)}
    assert reasons == {a.serial_number: "key_compromise", b.serial_number: "affiliation_changed",
                       c.serial_number: "cessation_of_operation"}


def test_revoke_without_reason_omits_the_reason_code(ca_dir: Path) -> None:
    a = issue(ca_dir, "institution", "hospital-a")
    revoke(ca_dir=ca_dir, serial=a.serial_number)
    entry = x509.load_pem_x509_crl((ca_dir / "crl.pem").read_bytes()).get_revoked_certificate_by_serial_number(
        a.serial_number)
    assert entry is not None and len(entry.extensions) == 0  # RFC 5280: no "unspecified" reason code


@pytest.mark.parametrize("kwargs, message", [
    pytest.param(dict(), "exactly one of", id="bad: nothing named"),
    pytest.param(dict(serial=1, name="x"), "exactly one of", id="bad: two ways"),
    pytest.param(dict(serial=0xABC), "no certificate with serial abc", id="bad: unknown serial"),
    pytest.param(dict(name="nobody"), "no unrevoked certificate", id="bad: unknown name"),
    pytest.param(dict(name="hospital-a", reason="because"), "reason 'because' is not one of", id="bad: reason"),
    pytest.param(dict(name="hospital-a", reason="certificate_hold"), "not one of", id="bad: hold is not revocation"),
    pytest.param(dict(cert_pem=b"junk"), "not a PEM certificate", id="bad: not a certificate"),
    pytest.param(dict(serial=1, role="institution"), "role only narrows", id="bad: role without name"),
])
def test_revoke_refuses(ca_dir: Path, kwargs: dict[str, Any], message: str) -> None:
    issue(ca_dir, "institution", "hospital-a")
    with pytest.raises(PkiError, match=message):
        revoke(ca_dir=ca_dir, **kwargs)


def test_revoke_twice_and_by_ambiguous_name(ca_dir: Path, tmp_path: Path) -> None:
    a = issue(ca_dir, "institution", "shared")
    issue(ca_dir, "operator", "shared")
    with pytest.raises(PkiError, match="as institution and operator: say which with role"):
        revoke(ca_dir=ca_dir, name="shared")
    revoke(ca_dir=ca_dir, name="shared", role="institution")
    with pytest.raises(PkiError, match="already revoked"):
        revoke(ca_dir=ca_dir, serial=a.serial_number)
    other = init_ca(directory=tmp_path / "other", federation="other")
    stranger = issue(other.directory, "institution", "stranger")
    with pytest.raises(PkiError, match="not issued by the CA"):
        revoke(ca_dir=ca_dir, cert_pem=stranger.public_bytes(serialization.Encoding.PEM))


def test_a_crl_signed_by_another_ca_is_rejected_and_the_last_good_one_kept(
        ca_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    a = issue(ca_dir, "institution", "hospital-a")
    revoke(ca_dir=ca_dir, serial=a.serial_number)
    revocations = RevocationList(ca_dir / "crl.pem", ca_cert=ca_cert(ca_dir))
    assert revocations.is_revoked(a.serial_number)
    # Same federation name, so the same issuer name: only the signature tells them apart.
    impostor = init_ca(directory=tmp_path / "impostor", federation="test-federation")
    assert ca_cert(impostor.directory).subject == ca_cert(ca_dir).subject
    os.replace(impostor.crl, ca_dir / "crl.pem")
    with caplog.at_level(logging.ERROR, logger="fedcollab.pki"):
        assert revocations.is_revoked(a.serial_number)  # still revoked: the empty impostor CRL is ignored
        assert revocations.is_revoked(a.serial_number)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "signature does not verify" in errors[0].getMessage()  # reported once
    (ca_dir / "crl.pem").write_text("not a CRL")
    assert revocations.is_revoked(a.serial_number)
    assert "not a PEM CRL" in caplog.records[-1].getMessage()
    # A good CRL again (the operator re-signs it) is picked up.
    b = issue(ca_dir, "institution", "hospital-b")
    revoke(ca_dir=ca_dir, serial=b.serial_number)
    assert revocations.is_revoked(b.serial_number) and revocations.is_revoked(a.serial_number)


def test_the_revocation_list_refuses_to_start_without_a_good_crl(ca_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(PkiError, match="cannot use the revocation list"):
        RevocationList(tmp_path / "missing.pem", ca_cert=ca_cert(ca_dir))
    impostor = init_ca(directory=tmp_path / "impostor", federation="test-federation")
    with pytest.raises(PkiError, match="signature does not verify"):
        RevocationList(impostor.crl, ca_cert=ca_cert(ca_dir))
    other = init_ca(directory=tmp_path / "other", federation="other-federation")
    with pytest.raises(PkiError, match="not by the federation CA"):
        RevocationList(other.crl, ca_cert=ca_cert(ca_dir))


def test_is_revoked_is_cheap_while_the_file_is_unchanged(ca_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    revocations = RevocationList(ca_dir / "crl.pem", ca_cert=ca_cert(ca_dir))
    loads = []
    real = x509.load_pem_x509_crl
    monkeypatch.setattr(x509, "load_pem_x509_crl", lambda data: loads.append(1) or real(data))
    for _ in range(1000):
        revocations.is_revoked(12345)
    assert loads == []
    revoke(ca_dir=ca_dir, serial=issue(ca_dir, "institution", "h").serial_number)
    revocations.is_revoked(1)
    assert len(loads) >= 1


# --- ephemeral federation and a real gRPC handshake -------------------------------------


def test_issue_ephemeral_makes_every_party(tmp_path: Path) -> None:
    pki = issue_ephemeral(directory=tmp_path / "pki", federation="sim", institutions=["hospital-a", "hospital-b"],
                          operators=["operator"])
    assert pki.ca_cert == tmp_path / "pki" / "ca.pem" and pki.ca_key == tmp_path / "pki" / "ca-key.pem"
    for role, (cert, key) in [("coordinator", pki.coordinator), *(("institution", p) for p in
                                                                     pki.institutions.values()),
                              *(("operator", p) for p in pki.operators.values())]:
        assert identity_from_pem(cert.read_bytes()).role == role
        assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    assert {r.name for r in issued_certificates(ca_dir=pki.directory)} == {"coordinator", "hospital-a",
                                                                          "hospital-b", "operator"}
    RevocationList(pki.crl, ca_cert=ca_cert(pki.directory))
    with pytest.raises(PkiError, match="more than once"):
        issue_ephemeral(directory=tmp_path / "dup", federation="sim", institutions=["a", "a"])


@dataclass
class EchoServer:
    port: int
    contexts: list[dict[str, list[bytes]]]


@contextmanager
def echo_server(pki: Any) -> Iterator[EchoServer]:
    """A bare gRPC server on port 0 with the coordinator's certificate, requiring clients' ones."""
    contexts: list[dict[str, list[bytes]]] = []

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        contexts.append({k: list(v) for k, v in context.auth_context().items()})
        return request

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(
        "test.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})])
    cert, key = pki.coordinator
    creds = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())],
                                        root_certificates=pki.ca_cert.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield EchoServer(port=port, contexts=contexts)
    finally:
        server.stop(None)


def call(pki: Any, port: int, party: tuple[Path, Path], host: str) -> bytes:
    cert, key = party
    creds = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes(),
                                         private_key=key.read_bytes(), certificate_chain=cert.read_bytes())
    with grpc.secure_channel(f"{host}:{port}", creds) as channel:
        return channel.unary_unary("/test.Echo/Echo")(b"ping", timeout=10)  # type: ignore[no-any-return]


def test_grpc_mutual_tls_accepts_the_certificates_and_exposes_the_identity(tmp_path: Path) -> None:
    pki = issue_ephemeral(directory=tmp_path / "pki", federation="sim", institutions=["hospital-a"],
                          operators=["alice"])
    with echo_server(pki) as server:
        # Both of the coordinator's default SANs verify: the DNS name and the IP address.
        assert call(pki, server.port, pki.institutions["hospital-a"], "localhost") == b"ping"
        assert call(pki, server.port, pki.operators["alice"], "127.0.0.1") == b"ping"
    institution, operator = server.contexts
    print("auth_context keys:", sorted(institution))  # shown with -s; the interceptor reads these
    for key in sorted(institution):
        print(f"  {key}: {[v[:70] for v in institution[key]]}")
    assert institution["transport_security_type"] == [b"ssl"]
    assert institution["x509_common_name"] == [b"hospital-a"]
    assert institution["x509_subject_alternative_name"] == [b"urn:fedcollab:institution:hospital-a"]
    assert institution["peer_uri"] == [b"urn:fedcollab:institution:hospital-a"]
    assert identity_from_pem(institution["x509_pem_cert"][0]) == Identity(role="institution", name="hospital-a")
    assert institution["x509_pem_cert"][0] == pki.institutions["hospital-a"][0].read_bytes()
    assert operator["x509_subject_alternative_name"] == [b"urn:fedcollab:operator:alice"]


def test_grpc_refuses_a_server_certificate_as_a_client_one(tmp_path: Path) -> None:
    """BoringSSL checks the extended key usage: the coordinator's certificate (serverAuth
    only) cannot be used to call in, so no one holding it can pose as an institution."""
    pki = issue_ephemeral(directory=tmp_path / "pki", federation="sim", institutions=["hospital-a"])
    with echo_server(pki) as server, pytest.raises(grpc.RpcError) as err:
        call(pki, server.port, pki.coordinator, "localhost")
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE and server.contexts == []
