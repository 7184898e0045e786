"""The progress bar of `fedcollab institution run` at a terminal: a bar per study, its
total the study's planned rounds, moved by each uploaded round; what the coordinator
named (a study, a refusal) is shown as text, never as markup or escape sequences."""

from __future__ import annotations

import io

from rich.console import Console

from fedcollab.institution._daemon import DaemonEvent
from fedcollab.institution._progress import RoundProgress


def _screen(events: list[DaemonEvent]) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=160, color_system=None)
    with RoundProgress(console=console) as progress:
        for event in events:
            progress.on_event(event)
    return out.getvalue()


def test_a_bar_per_study_moves_with_each_uploaded_round() -> None:
    study = {"study": "digits-mlp", "total_rounds": 3}
    screen = _screen([
        DaemonEvent("disconnected", detail="UNAVAILABLE: before any Join"),  # no study yet: no bar
        DaemonEvent("joined", **study),
        DaemonEvent("trained", 1, "{'train_loss': 0.5}", **study),
        DaemonEvent("uploaded", 1, "1150 examples, no DP-SGD, uploaded 4.7 KiB in 0.02s", **study),
        DaemonEvent("uploaded", 2, "1150 examples, no DP-SGD, uploaded 4.7 KiB in 0.02s", **study),
    ])
    last = screen.rsplit("\r", 1)[-1]
    assert "study digits-mlp" in last and "2/3" in last and "round 2: 1150 examples" in last, repr(last)
    assert "before any Join" not in screen


def test_what_the_coordinator_named_is_text() -> None:
    screen = _screen([DaemonEvent("rejected", 4, study="s[red]x\x1b]0;pwned\x07", total_rounds=5),
                      DaemonEvent("uploaded", 4, detail="[bold]y[/bold]\x1b[2J", study="s[red]x\x1b]0;pwned\x07",
                                  total_rounds=5)])
    assert "study s[red]x\\x1b]0;pwned\\x07" in screen, repr(screen)  # escaped, as the logs escape it
    assert "round 4: [bold]y[/bold]" in screen, repr(screen)
    assert "\x1b]0;" not in screen and "\x1b[2J" not in screen
