"""The shipped systemd units run commands that exist, as services: each ExecStart
parses with fedcollab's own argument parser (so a renamed flag breaks this test, not
a site's deployment), runs the console script pyproject.toml installs, keeps running
by default (Restart=on-failure restarts only a failure), and writes only to the
StateDirectory its comment tells the operator to point the config's state_dir at."""

from __future__ import annotations

import configparser
import re
import shlex
import tomllib
from pathlib import Path

import pytest

from fedcollab import cli

REPO = Path(__file__).resolve().parents[2]
UNITS = {
    "institutions/fedcollab-institution.service": (cli.cmd_institution_run, "institution.state_dir"),
    "deploy/fedcollab-coordinator.service": (cli.cmd_coordinator_serve, "server.state_dir"),
}


def _unit(path: Path) -> configparser.ConfigParser:
    unit = configparser.ConfigParser(interpolation=None, strict=True)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string(path.read_text(encoding="utf-8"))
    return unit


@pytest.mark.parametrize("relative", sorted(UNITS))
def test_a_shipped_unit_runs_a_valid_command_as_a_service(relative: str) -> None:
    command, state_key = UNITS[relative]
    text = (REPO / relative).read_text(encoding="utf-8")
    service = _unit(REPO / relative)["Service"]
    argv = shlex.split(service["ExecStart"])
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert Path(argv[0]).name in scripts and Path(argv[0]).is_absolute(), argv[0]
    try:
        args = cli.build_parser().parse_args(argv[1:])
    except SystemExit:
        pytest.fail(f"{relative}: ExecStart does not parse: {' '.join(argv[1:])}")
    assert args.func is command
    # A service: no one-shot flag (Restart=on-failure would leave it down after exit 0),
    # no deprecated flag, never plaintext.
    assert not args.exit_when_done and not args.insecure and not args.force_insecure
    assert not {"--keep-serving", "--keep-running"} & set(argv)
    assert service["Restart"] == "on-failure"
    config = Path(args.config)
    assert config.is_absolute() and str(config) in text.split("[Unit]")[0], "the comment names the config to install"
    state = f"/var/lib/{service['StateDirectory']}"
    assert re.search(rf'{re.escape(state_key)} = "{re.escape(state)}"', text), \
        f"{relative}: the comment should tell the operator to set {state_key} = \"{state}\""


def test_the_deprecated_flags_still_parse() -> None:
    parser = cli.build_parser()
    serve = parser.parse_args(["coordinator", "serve", "--config", "f.toml", "--keep-serving"])
    run = parser.parse_args(["institution", "run", "--config", "i.toml", "--keep-running"])
    assert not serve.exit_when_done and not run.exit_when_done  # no-ops: the default already keeps going


def test_help_hides_the_deprecated_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["coordinator", "serve", "--help"], ["institution", "run", "--help"]):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args(argv)
        out = capsys.readouterr().out
        assert "--exit-when-done" in out and "--keep-" not in out, out


def test_services_keep_going_by_default() -> None:
    parser = cli.build_parser()
    assert not parser.parse_args(["coordinator", "serve", "--config", "f.toml"]).exit_when_done
    assert not parser.parse_args(["institution", "run", "--config", "i.toml"]).exit_when_done
    assert parser.parse_args(["coordinator", "serve", "--config", "f.toml", "--exit-when-done"]).exit_when_done
    assert parser.parse_args(["institution", "run", "--config", "i.toml", "--exit-when-done"]).exit_when_done
