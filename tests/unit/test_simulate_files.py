"""`fedcollab simulate FILE ...` (positional, as `flwr run .` users type it) is
`--scenario FILE ...`: the same files, every one checked before any runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcollab import cli


def test_positional_files_and_scenario_flags_both_count() -> None:
    parser = cli.build_parser()
    args = parser.parse_args(["simulate", "a.toml", "b.toml", "--scenario", "c.toml"])
    assert args.files == ["a.toml", "b.toml"] and args.scenario == ["c.toml"]
    args = parser.parse_args(["simulate"])
    assert args.files == [] and args.scenario is None  # the default scenario


@pytest.mark.parametrize("argv", [["{bad}"], ["{good}", "{bad}"], ["{good}", "--scenario", "{bad}"],
                                  ["--scenario", "{good}", "{bad}"]])
def test_each_file_is_loaded_before_any_runs(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    """A bad file named either way stops the command before the first simulation, with
    its key and path (a run would print "scenario ...": none does)."""
    monkeypatch.setattr(cli.console, "_width", 300)
    good = Path(__file__).resolve().parents[2] / "simulations" / "digits_fedavg.toml"
    bad = tmp_path / "bad.toml"
    bad.write_text('[simulation]\ninstitutions = 0\n[study.model]\nkind = "mlp"\n')
    with pytest.raises(SystemExit) as exit_:
        cli.main(["simulate", *[a.format(good=good, bad=bad) for a in argv], "--output-dir", str(tmp_path / "runs")])
    out = capsys.readouterr().out
    assert exit_.value.code == 2, out
    assert "simulation.institutions" in out and str(bad) in out, out
    assert "scenario " not in out and not (tmp_path / "runs").exists(), out
