"""Several studies in one coordinator: each its own round engine, store, models and
lineage, driven by its own thread; the operator submits, pauses, resumes and cancels
them, and a study may wait for another one to end (`start_after`).

The study of federation.toml is the default one: its state stays at the top of the
state folder, as before studies could be submitted, and institutions that name no
study join it. A submitted study lives in `studies/<name>/` and its session ids start
with `<name>.`, which is how calls are routed to it. All studies sign their lineage
with the coordinator's one key, the key institutions pin.
"""

from __future__ import annotations

import logging
import shutil
import sqlite3
import threading
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import grpc

# STUDY_NAME: one definition for both sides (institutions check offered names with it).
from fedcollab._names import STUDY_NAME
from fedcollab.config import FederationConfig, StudyFile, parse_config
from fedcollab.coordinator import _counters
from fedcollab.coordinator._consortium import Consortium
from fedcollab.coordinator._engine import Evaluator, RoundEngine, RoundResult
from fedcollab.coordinator._store import Store
from fedcollab.errors import ConfigError, Rejected
from fedcollab.lineage._keys import PUBLIC_KEY_FILE, _write_public_key

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

log = logging.getLogger("fedcollab.coordinator")

FINAL = ("cancelled", "finished", "failed")


@dataclass
class StudyRun:
    name: str
    is_default: bool
    store: Store
    engine: RoundEngine
    start_after: str = ""
    stop: threading.Event = field(default_factory=threading.Event)
    driver: threading.Thread | None = None


class Studies:
    """The coordinator's studies. `default_engine` and `default_store` are the default
    study's (the Coordinator builds them, as it always did)."""

    def __init__(
        self,
        *,
        config: FederationConfig,
        consortium: Consortium,
        default_store: Store,
        default_engine: RoundEngine,
        signing_key: Ed25519PrivateKey,
        make_evaluator: Callable[[FederationConfig], Evaluator | None],
        on_round: Callable[[RoundResult], None] | None = None,
    ) -> None:
        self._config = config
        self._consortium = consortium
        self._signing_key = signing_key
        self._make_evaluator = make_evaluator
        self._on_round = on_round
        self._state_dir = Path(config.server.state_dir)
        self._lock = threading.RLock()
        self._closing = threading.Event()
        self._scheduler: threading.Thread | None = None
        default = config.study.name
        if consortium.study(default) is None:
            consortium.add_study(name=default, config_toml="", status="running", is_default=True)
        _counters.attach(engine=default_engine, store=default_store)
        self.default = StudyRun(name=default, is_default=True, store=default_store, engine=default_engine)
        self._runs: dict[str, StudyRun] = {default: self.default}
        for row in consortium.studies():
            if row["is_default"] or row["name"] in self._runs:
                continue  # a default study of an earlier config stays in the table, not run
            spec = parse_config(StudyFile, tomllib.loads(row["config_toml"]), source=f"study {row['name']}")
            self._runs[row["name"]] = self._build(spec)
        for name, run in self._runs.items():
            status = self.status(name)
            if status == "paused":
                run.engine.pause()
            elif status == "cancelled":
                run.engine.finish()

    def _build(self, spec: StudyFile) -> StudyRun:
        name = spec.study.name
        folder = self._state_dir / "studies" / name
        new = not folder.exists()
        config = self._config.model_copy(update={"study": spec.study})
        store = Store(folder / "coordinator.sqlite")
        try:
            # The public half beside the study's records: `fedcollab lineage verify` on the folder.
            _write_public_key(folder / PUBLIC_KEY_FILE, self._signing_key.public_key())
            engine = RoundEngine(config=config, store=store, models_dir=folder / "models", spool_dir=folder / "spool",
                                 evaluator=self._make_evaluator(config), on_round=self._on_round,
                                 session_prefix=f"{name}.", signing_key=self._signing_key)
            _counters.attach(engine=engine, store=store)
        except BaseException:
            store.close()
            if new:  # a study refused at submission leaves nothing behind
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return StudyRun(name=name, is_default=False, store=store, engine=engine, start_after=spec.start_after)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        for run in self.runs():
            status = self.status(run.name)
            if status in ("finished", "failed"):
                # Its engine decides again from its rounds (at once, unless the config now
                # asks for more rounds) and tells institutions that poll it FINISHED.
                self._consortium.set_study_status(run.name, status="running",
                                                  note="the coordinator started again: its rounds decide")
            if status not in ("queued", "cancelled"):
                self._start_driver(run)
        self._scheduler = threading.Thread(target=self._schedule, name="studies", daemon=True)
        self._scheduler.start()

    def _start_driver(self, run: StudyRun) -> None:
        run.driver = threading.Thread(target=run.engine.run, args=(run.stop,), name=f"rounds-{run.name}", daemon=True)
        run.driver.start()
        log.info("study %s: started", run.name)

    def _schedule(self) -> None:
        """Records studies that ended, and starts queued ones whose turn came."""
        while not self._closing.wait(0.25):
            with self._lock:
                for run in self.runs():
                    status = self._record_end(run)
                    if status == "queued" and self._turn_came(run):
                        self._consortium.set_study_status(run.name, status="running", reason="",
                                                          note=f"{run.start_after} ended" if run.start_after else "")
                        self._start_driver(run)

    def _turn_came(self, run: StudyRun) -> bool:
        if not run.start_after or run.start_after not in self._runs:
            return True
        return self.status(run.start_after) in FINAL

    def stop(self) -> None:
        """Stops every driver; nothing is marked finished (a restart resumes)."""
        self._closing.set()
        if self._scheduler is not None:
            self._scheduler.join(timeout=5)
        for run in self.runs():
            run.stop.set()
        for run in self.runs():
            if run.driver is not None:
                run.driver.join(timeout=30)
        for run in self.runs():
            try:
                run.store.save_counters()  # what came since the last round's close
            except sqlite3.Error as e:  # a full disk, say: the stop goes on, the totals of the last close stay
                log.warning("study %s: traffic counters not saved at shutdown: %s", run.name, e)
            if not run.is_default:
                run.store.close()

    def all_ended(self) -> bool:
        """Every study finished, failed or was cancelled."""
        return all(self._ended(r) for r in self.runs())

    def _ended(self, run: StudyRun) -> bool:
        # The engine's own flag, not only the status the scheduler records a tick later:
        # institutions hear FINISHED from the engine, and whoever waits must not lag them.
        return self._record_end(run) in FINAL

    def _record_end(self, run: StudyRun) -> str:
        """Its status, once a study whose engine finished is recorded as finished or failed."""
        with self._lock:
            status = self.status(run.name)
            if status in ("running", "paused") and run.engine.finished:
                failure = run.engine.failure
                status = "failed" if failure else "finished"
                self._consortium.set_study_status(run.name, status=status, reason=failure or "")
            return status

    # ----------------------------------------------------------------- lookups
    def runs(self) -> list[StudyRun]:
        with self._lock:
            return list(self._runs.values())

    def status(self, name: str) -> str:
        row = self._consortium.study(name)
        return row["status"] if row else "unknown"

    def get(self, name: str) -> StudyRun:
        """`name` empty: the default study."""
        run = self._runs.get(name or self.default.name)
        if run is None:
            raise Rejected(code=grpc.StatusCode.NOT_FOUND, reason="STUDY_UNKNOWN",
                           message=f"no study {name!r} at this coordinator; `fedcollab study list` shows them",
                           metadata={"study": name})
        return run

    def for_join(self, name: str) -> StudyRun:
        run = self.get(name)
        status = self.status(run.name)
        if status == "queued":
            raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="STUDY_NOT_STARTED",
                           message=f"study {run.name!r} waits for {run.start_after!r} to end; join it then",
                           metadata={"study": run.name, "retry_after_seconds": "10"})
        return run

    def for_session(self, session_id: str) -> RoundEngine:
        name, dot, _ = session_id.partition(".")
        if not dot:
            return self.default.engine
        run = self._runs.get(name)
        if run is None:
            raise Rejected(code=grpc.StatusCode.UNAUTHENTICATED, reason="SESSION_UNKNOWN",
                           message="unknown session (its study is not at this coordinator): call Join again")
        return run.engine

    # ----------------------------------------------------------------- operator
    def submit(self, *, study_toml: str, by: str) -> StudyRun:
        try:
            data = tomllib.loads(study_toml)
        except tomllib.TOMLDecodeError as e:
            raise _invalid(f"the study file is not valid TOML: {e}") from None
        try:
            spec = parse_config(StudyFile, data, source="study file")
        except ConfigError as e:
            raise _invalid(str(e)) from None
        name = spec.study.name
        if not STUDY_NAME.fullmatch(name):
            raise _invalid(f"study file: study.name {name!r}: use 1-63 lowercase letters, digits, '_' or '-', "
                           "starting with a letter or digit")
        if spec.start_after == name:
            raise _invalid("study file: start_after names the study itself")
        if spec.start_after and spec.start_after not in self._runs:
            raise _invalid(f"study file: start_after {spec.start_after!r} is no study of this coordinator")
        with self._lock:
            if name in self._runs:
                raise Rejected(code=grpc.StatusCode.ALREADY_EXISTS, reason="STUDY_EXISTS",
                               message=f"a study named {name!r} exists already: give the new one another name",
                               metadata={"study": name})
            try:
                run = self._build(spec)
            except (ConfigError, ValueError, TypeError) as e:  # e.g. a model the registry cannot build
                raise _invalid(f"study {name}: {e}") from None
            queued = bool(spec.start_after) and self.status(spec.start_after) not in FINAL
            self._consortium.add_study(name=name, config_toml=study_toml, status="queued" if queued else "running",
                                       start_after=spec.start_after, submitted_by=by)
            self._runs[name] = run
            if not queued and self._scheduler is not None:
                self._start_driver(run)
        log.info("study %s submitted by %s%s", name, by or "the operator",
                 f", starts after {spec.start_after}" if spec.start_after else "")
        return run

    def change(self, *, name: str, action: str, reason: str, by: str) -> StudyRun:
        run = self.get(name)
        done = {"pause": "paused", "resume": "resumed", "cancel": "cancelled"}.get(action, action)
        why = f"{done} by {by or 'the operator'}" + (f": {reason}" if reason else "")
        with self._lock:
            status = self.status(run.name)
            if status in FINAL:
                raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="STUDY_ENDED",
                               message=f"study {run.name!r} is {status} already", metadata={"study": run.name})
            if action == "pause":
                run.engine.pause()
                self._consortium.set_study_status(run.name, status="paused", reason=why)
            elif action == "resume":
                if status != "paused":
                    raise Rejected(code=grpc.StatusCode.FAILED_PRECONDITION, reason="STUDY_NOT_PAUSED",
                                   message=f"study {run.name!r} is {status}, not paused", metadata={"study": run.name})
                run.engine.resume()
                self._consortium.set_study_status(run.name, status="running", reason="", note=why)
            elif action == "cancel":
                self._consortium.set_study_status(run.name, status="cancelled", reason=why)
                run.stop.set()
            else:
                raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="UNKNOWN_ACTION",
                               message=f"action {action!r}: use pause, resume or cancel")
        if action == "cancel":
            if run.driver is not None:
                run.driver.join(timeout=30)
            run.engine.finish()
        log.info("study %s %s", run.name, why)
        return run

    def forget_institution(self, institution: str) -> None:
        for run in self.runs():
            run.engine.forget_institution(institution)

    def forget_serials(self, serials: frozenset[int]) -> list[str]:
        """Drops, in every study, the sessions of certificates now revoked; the
        institutions whose sessions went."""
        gone: set[str] = set()
        for run in self.runs():
            gone.update(run.engine.forget_serials(serials))
        return sorted(gone)


def _invalid(message: str) -> Rejected:
    return Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="STUDY_INVALID", message=message)
