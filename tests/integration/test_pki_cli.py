"""`fedcollab pki`: the operator's and an institution's commands, end to end in tmp folders."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from fedcollab import cli
from fedcollab.pki import RevocationList, identity_from_pem, issued_certificates

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
FINGERPRINT = re.compile(r"SHA256(?::[0-9A-F]{2}){32}")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.console, "_width", 250)  # no wrapping or eliding in the assertions


def pki(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pki", *args])
    return int(exit_.value.code or 0), capsys.readouterr().out


def test_init_request_sign_revoke_list(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ca, hospital, coordinator = tmp_path / "operator" / "ca", tmp_path / "hospital", tmp_path / "coordinator"
    code, out = pki(capsys, "init", "--dir", str(ca), "--federation", "oncology")
    assert code == 0, out
    assert "federation CA for oncology" in out and FINGERPRINT.search(out)
    code, out = pki(capsys, "init", "--dir", str(ca), "--federation", "oncology")
    assert code == 1 and "already holds a federation CA" in out and "move that folder away" in out

    # The institution: a key that stays, a CSR to send, a fingerprint to read out.
    code, out = pki(capsys, "request", "--institution", "hospital-a", "--dir", str(hospital))
    assert code == 0, out
    key, csr = hospital / "hospital-a-key.pem", hospital / "hospital-a.csr"
    assert key.is_file() and csr.is_file() and (os.stat(key).st_mode & 0o777) == 0o600
    assert "never hospital-a-key.pem" in out and "by phone" in out
    (requested,) = FINGERPRINT.findall(out)

    # The operator signs it and sees the same public-key fingerprint.
    code, out = pki(capsys, "sign", "--ca-dir", str(ca), "--csr", str(csr), "--days", "90")
    assert code == 0, out
    cert = hospital / "hospital-a.pem"  # default: next to the CSR
    assert identity_from_pem(cert.read_bytes()).name == "hospital-a"
    assert "institution hospital-a" in out and "urn:fedcollab:institution:hospital-a" in out
    public_key_fp, cert_fp = FINGERPRINT.findall(out)
    assert public_key_fp == requested and cert_fp != requested
    serial = f"{x509.load_pem_x509_certificate(cert.read_bytes()).serial_number:x}"
    assert serial in out

    code, out = pki(capsys, "sign", "--ca-dir", str(ca), "--csr", str(csr))
    assert code == 1 and "already has a valid certificate" in out and "--replace" in out
    code, out = pki(capsys, "sign", "--ca-dir", str(ca), "--csr", str(csr), "--replace",
                    "--out", str(tmp_path / "renewed.pem"))
    assert code == 0 and re.search(rf"replaced \(revoked\)\s+{serial}", out), out

    # A coordinator names its hosts; an institution may not.
    code, out = pki(capsys, "request", "--coordinator", "fl-coordinator", "--dns", "fl.example.org", "--ip",
                    "10.0.0.5", "--dir", str(coordinator))
    assert code == 0 and "fl.example.org, 10.0.0.5" in out, out
    code, out = pki(capsys, "sign", "--ca-dir", str(ca), "--csr", str(coordinator / "fl-coordinator.csr"))
    assert code == 0 and "urn:fedcollab:coordinator:fl-coordinator, fl.example.org, 10.0.0.5" in out, out
    code, out = pki(capsys, "request", "--institution", "hospital-b", "--dns", "h.example.org", "--dir",
                    str(hospital))
    assert code == 1 and "only a coordinator certificate names hosts" in out

    # Revocation, seen by a coordinator's RevocationList without recreating it.
    revocations = RevocationList(ca / "crl.pem", ca_cert=x509.load_pem_x509_certificate((ca / "ca.pem").read_bytes()))
    renewed = x509.load_pem_x509_certificate((tmp_path / "renewed.pem").read_bytes()).serial_number
    assert int(serial, 16) in revocations.revoked_serials and not revocations.is_revoked(renewed)
    code, out = pki(capsys, "revoke", "--ca-dir", str(ca), "--serial", f"0x{renewed:x}", "--reason", "key_compromise")
    assert code == 0 and "crl.pem" in out and "no restart" in out, out
    assert revocations.is_revoked(renewed)
    code, out = pki(capsys, "revoke", "--ca-dir", str(ca), "--cert", str(tmp_path / "renewed.pem"))
    assert code == 1 and "already revoked" in out
    code, out = pki(capsys, "revoke", "--ca-dir", str(ca), "--name", "fl-coordinator", "--reason", "superseded")
    assert code == 0, out
    code, out = pki(capsys, "revoke", "--ca-dir", str(ca), "--name", "nobody")
    assert code == 1 and "no unrevoked certificate" in out

    code, out = pki(capsys, "list", "--ca-dir", str(ca))
    assert code == 0, out
    rows = {line.split("│")[1].strip(): line for line in out.splitlines() if line.count("│") > 5}
    assert set(rows) == {serial, f"{renewed:x}", *(f"{r.serial:x}" for r in issued_certificates(ca_dir=ca))}
    assert "revoked" in rows[serial] and "superseded" in rows[serial]
    assert "key_compromise" in rows[f"{renewed:x}"]
    assert len(rows) == 3 and all("revoked" in row for row in rows.values())

    code, out = pki(capsys, "crl", "--ca-dir", str(ca))
    assert code == 0 and "re-signed" in out
    assert revocations.revoked_serials == {r.serial for r in issued_certificates(ca_dir=ca)}


def test_fingerprints_and_serials_are_printed_whole_in_a_narrow_terminal(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both sides read them out by phone: at 60 columns each one is on one line, all of
    it, with no ellipsis (the terminal wraps it; a copy has it in one piece)."""
    monkeypatch.setattr(cli.console, "_width", 60)
    ca, home = tmp_path / "pki", tmp_path / "keys"

    def whole_lines(out: str) -> list[str]:
        assert "…" not in out, out
        return [m for line in out.splitlines() for m in FINGERPRINT.findall(line)]

    code, out = pki(capsys, "init", "--dir", str(ca), "--federation", "a-federation-with-a-long-name")
    assert code == 0 and re.search(rf"^fingerprint\s+{FINGERPRINT.pattern}$", out, flags=re.M), out
    (ca_fp,) = whole_lines(out)
    code, out = pki(capsys, "request", "--coordinator", "coordinator", "--dns", "localhost", "--dir", str(home))
    assert code == 0, out
    (requested,) = whole_lines(out)
    code, out = pki(capsys, "sign", "--ca-dir", str(ca), "--csr", str(home / "coordinator.csr"))
    assert code == 0, out
    public_key_fp, cert_fp = whole_lines(out)
    (record,) = issued_certificates(ca_dir=ca)
    assert public_key_fp == requested and cert_fp == record.fingerprint and ca_fp not in (requested, cert_fp)
    assert re.search(rf"^serial\s+{record.serial:x}$", out, flags=re.M), out
    code, out = pki(capsys, "list", "--ca-dir", str(ca))
    assert code == 0, out
    assert whole_lines(out) == [record.fingerprint]
    assert re.search(rf"^{record.serial:x}\s+{re.escape(record.fingerprint)}$", out, flags=re.M), out


def test_bad_arguments(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out = pki(capsys, "sign", "--ca-dir", str(tmp_path / "none"), "--csr", str(tmp_path / "x.csr"))
    assert code == 2 and "cannot read it" in out
    (tmp_path / "x.csr").write_text("hello")
    code, out = pki(capsys, "sign", "--ca-dir", str(tmp_path / "none"), "--csr", str(tmp_path / "x.csr"))
    assert code == 1 and "not a PEM certificate signing request" in out
    code, out = pki(capsys, "list", "--ca-dir", str(tmp_path / "none"))
    assert code == 1 and "fedcollab pki init" in out
    with pytest.raises(SystemExit) as exit_:  # argparse: one identity at a time
        cli.main(["pki", "request", "--institution", "a", "--operator", "b"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        cli.main(["pki", "revoke", "--ca-dir", "x", "--serial", "xyz"])
    assert exit_.value.code == 2 and "not a hex serial" in capsys.readouterr().err


def test_the_installed_command(tmp_path: Path) -> None:
    """`python -m fedcollab pki ...` in a fresh process, as an institution runs it."""
    done = subprocess.run([sys.executable, "-m", "fedcollab", "pki", "request", "--operator", "alice", "--dir",
                           str(tmp_path)], capture_output=True, text=True, cwd=REPO, timeout=60,
                          env={**os.environ, "COLUMNS": "200"})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "alice.csr").is_file() and FINGERPRINT.search(done.stdout)
