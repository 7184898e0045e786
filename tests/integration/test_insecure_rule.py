"""One rule for `--insecure` in every command that connects (fedcollab/_plaintext.py):
refused next to configured mutual TLS, needed for plaintext, announced when used.
Before, `model list --insecure` quietly used the [tls] table while `institution run
--insecure` refused it."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcollab import _operator_cli, cli
from fedcollab.coordinator import Coordinator
from tests._pki import TestCA
from tests.conftest import tiny_federation

pytestmark = pytest.mark.integration
REFUSED = "configures mutual TLS"


@pytest.fixture(autouse=True)
def wide_consoles(monkeypatch: pytest.MonkeyPatch) -> None:
    for console in (cli.console, _operator_cli.console):
        monkeypatch.setattr(console, "_width", 300)  # messages on one line for the assertions


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_:
        cli.main(list(argv))
    return int(exit_.value.code or 0), capsys.readouterr().out


def _files(tmp_path: Path, *, tls: bool) -> tuple[Path, Path]:
    """A federation.toml and an institution.toml; with real PEM files in [server.tls] / [tls]."""
    ca = TestCA()
    coordinator = ca.write(tmp_path / "coordinator-keys", "coordinator", ca.issue("coordinator", server=True))
    institution = ca.write(tmp_path / "hospital-a-keys", "hospital-a", ca.issue("hospital-a", server=False))

    def table(name: str, files: tuple[Path, Path, Path]) -> str:
        return f'[{name}]\nca_cert = "{files[0]}"\ncert = "{files[1]}"\nkey = "{files[2]}"\n' if tls else ""

    federation = tmp_path / "federation.toml"
    federation.write_text(f'[server]\naddress = "127.0.0.1:0"\nstate_dir = "{tmp_path / "coordinator"}"\n'
                          + table("server.tls", coordinator)
                          + '[study]\nname = "s"\n[study.model]\nkind = "mlp"\n'
                          'params = { in_features = 64, hidden = [8], num_classes = 10 }\n')
    institution_toml = tmp_path / "hospital-a.toml"
    institution_toml.write_text(f'[institution]\nname = "hospital-a"\ncoordinator = "127.0.0.1:1"\n'
                                f'state_dir = "{tmp_path / "hospital-a"}"\ntrainer = "synthetic"\n'
                                + table("tls", institution))
    return federation, institution_toml


@pytest.mark.parametrize("argv, table", [
    (["coordinator", "serve", "--config", "{federation}"], "its [server.tls] table"),
    (["institution", "run", "--config", "{institution}"], "its [tls] table"),
    (["model", "list", "--config", "{institution}"], "its [tls] table"),
    (["model", "pull", "1", "--study", "s", "--config", "{institution}", "--out", "{tmp}/models"], "its [tls] table"),
    (["study", "list", "--config", "{federation}"], "its [server.tls] table"),
    (["institutions", "list", "--config", "{federation}"], "its [server.tls] table"),
    (["model", "versions", "--config", "{federation}"], "its [server.tls] table"),
], ids=lambda v: " ".join(v[:2]) if isinstance(v, list) else None)
def test_insecure_next_to_tls_is_refused_by_every_command(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, argv: list[str], table: str) -> None:
    federation, institution = _files(tmp_path, tls=True)
    argv = [a.format(federation=federation, institution=institution, tmp=tmp_path) for a in argv]
    code, out = run(capsys, *argv, "--insecure")
    assert code == 2, out
    assert f"configures mutual TLS ({table}) and --insecure was given" in out, out
    assert "drop --insecure" in out and "PLAINTEXT" not in out, out
    # Refused before anything was started or written.
    assert not any((tmp_path / d).exists() for d in ("coordinator", "hospital-a", "models")), list(tmp_path.iterdir())


def test_operator_flags_are_tls_too(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out = run(capsys, "study", "list", "--coordinator", "127.0.0.1:1", "--cert", "c.pem", "--key", "k.pem",
                    "--ca", "ca.pem", "--insecure")
    assert code == 2 and f"this command {REFUSED} (--cert/--key/--ca)" in out, out


@pytest.mark.parametrize("argv", [
    ["coordinator", "serve", "--config", "{federation}"],
    ["institution", "run", "--config", "{institution}"],
    ["model", "list", "--config", "{institution}"],
    ["study", "list", "--config", "{federation}"],
], ids=lambda v: " ".join(v[:2]))
def test_plaintext_needs_insecure_everywhere(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                             argv: list[str]) -> None:
    federation, institution = _files(tmp_path, tls=False)
    code, out = run(capsys, *[a.format(federation=federation, institution=institution) for a in argv])
    assert code == 2 and "has no mutual TLS" in out and "pass --insecure" in out, out


def test_operator_plaintext_with_insecure_is_announced_and_works(capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path) -> None:
    """Over plaintext the operator's token is the credential; --insecure says the
    operator chose plaintext, and the red line says so at every call. Off loopback it
    also needs --force-insecure, as for the daemons."""
    with Coordinator(config=tiny_federation(tmp_path / "state")) as coordinator:
        where = ["--coordinator", f"127.0.0.1:{coordinator.port}",
                 "--token-file", str(tmp_path / "state" / "operator.token")]
        code, out = run(capsys, "study", "list", *where)
        assert code == 2 and "this command has no mutual TLS" in out and "pass --insecure" in out, out
        code, out = run(capsys, "study", "list", *where, "--insecure")
        assert code == 0, out
        assert f"PLAINTEXT: 127.0.0.1:{coordinator.port} without TLS" in out and "tiny" in out, out
    code, out = run(capsys, "study", "list", "--coordinator", "192.0.2.1:50051", "--token-file", "x", "--insecure")
    assert code == 2 and "not a loopback address" in out and "--force-insecure" in out, out
