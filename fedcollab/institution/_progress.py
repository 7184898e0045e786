"""A progress bar per study for `fedcollab institution run` at a terminal, fed by the
daemons' DaemonEvents. Only for a person watching: the command shows it when stderr
is a terminal, never in a service's journal or a test's captured output."""

from __future__ import annotations

import threading
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from fedcollab._display import printable
from fedcollab.institution._daemon import DaemonEvent

# What the bar's last column says for each kind of event (uploaded: the round's own line).
_SAY = {"joined": "joined", "trained": "trained, uploading", "declined": "declined", "evaluated": "evaluated",
        "rejected": "refused by the coordinator", "refused": "refused", "disconnected": "coordinator unreachable",
        "failed": "task failed", "finished": "finished"}


class RoundProgress:
    def __init__(self, *, console: Console) -> None:
        self._progress = Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                                  TimeElapsedColumn(), TextColumn("{task.fields[last]}", markup=False),
                                  console=console)
        self._tasks: dict[str, TaskID] = {}
        self._lock = threading.Lock()  # events come from every study's daemon thread

    def __enter__(self) -> RoundProgress:
        self._progress.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._progress.stop()

    def on_event(self, event: DaemonEvent) -> None:
        if not event.study:  # before the first Join: no study, no total yet
            return
        with self._lock:
            task = self._tasks.get(event.study)
            if task is None:
                task = self._tasks[event.study] = self._progress.add_task(
                    f"study {printable(event.study)}", total=event.total_rounds or None, last="")
        if event.kind == "uploaded":
            self._progress.update(task, completed=event.round, last=f"round {event.round}: {printable(event.detail)}")
        elif event.kind == "finished":
            self._progress.update(task, completed=event.total_rounds or None, last="finished")
        else:
            said = _SAY.get(event.kind, event.kind)
            where = f"round {event.round}: " if event.round else ""
            self._progress.update(task, last=f"{where}{said}")
