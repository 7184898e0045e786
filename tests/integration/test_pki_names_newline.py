"""A name with a trailing newline ("hospital-a\\n") is not a name: `re.match` with `$`
accepted it, so the CA signed it. Refused through `fedcollab pki sign` and the signing
function, in the CN, the SAN URI and a coordinator's DNS names; and a certificate that
carries one (from another CA tool) is not read as an identity."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedcollab import cli
from fedcollab.pki import PkiError, identity_from_certificate, init_ca, issued_certificates, sign_request
from fedcollab.pki._identity import name_problems

pytestmark = pytest.mark.integration


def _csr(*, cn: str, uri: str, dns: tuple[str, ...] = (), server: bool = False) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri), *map(x509.DNSName, dns)]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))


CASES = [
    pytest.param(dict(cn="hospital-a\n", uri="urn:fedcollab:institution:hospital-a\n"), id="newline in both"),
    pytest.param(dict(cn="hospital-a", uri="urn:fedcollab:institution:hospital-a\n"), id="newline in the URI"),
    pytest.param(dict(cn="c", uri="urn:fedcollab:coordinator:c", dns=("fl.example.org\n",), server=True),
                 id="newline in a DNS name"),
]


@pytest.mark.parametrize("kwargs", CASES)
def test_pki_sign_refuses_a_trailing_newline(kwargs: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                             ) -> None:
    init_ca(directory=tmp_path / "ca", federation="f")
    csr = tmp_path / "evil.csr"
    csr.write_bytes(_csr(**kwargs))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pki", "sign", "--ca-dir", str(tmp_path / "ca"), "--csr", str(csr), "--out",
                  str(tmp_path / "evil.pem")])
    out = capsys.readouterr().out
    assert exit_.value.code == 1, out
    assert "refusing the CSR" in out
    assert not (tmp_path / "evil.pem").exists() and issued_certificates(ca_dir=tmp_path / "ca") == []
    with pytest.raises(PkiError, match="refusing the CSR"):
        sign_request(ca_dir=tmp_path / "ca", csr_pem=_csr(**kwargs))


def test_the_same_names_without_the_newline_are_signed(tmp_path: Path) -> None:
    """The check is the newline, not the names (so the test above can fail)."""
    init_ca(directory=tmp_path / "ca", federation="f")
    sign_request(ca_dir=tmp_path / "ca", csr_pem=_csr(cn="hospital-a", uri="urn:fedcollab:institution:hospital-a"))
    sign_request(ca_dir=tmp_path / "ca", csr_pem=_csr(cn="c", uri="urn:fedcollab:coordinator:c",
                                                        dns=("fl.example.org",), server=True))
    assert len(issued_certificates(ca_dir=tmp_path / "ca")) == 2


@pytest.mark.parametrize("name", ["hospital-a\n", "hospital-a\r\n", "\nhospital-a", "hospital-a\x1b[2J"])
def test_name_problems_names_the_bad_name(name: str) -> None:
    assert name_problems("institution", name)


def test_a_certificate_naming_a_newline_is_no_identity() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hospital-a\n")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier("urn:fedcollab:institution:hospital-a\n")]), critical=False)
            .sign(key, hashes.SHA256()))
    with pytest.raises(PkiError, match="malformed"):
        identity_from_certificate(cert)
