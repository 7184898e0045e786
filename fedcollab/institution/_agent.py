"""An institution across a coordinator's studies: it lists them, accepts or declines
each by its site policy (recording why, here and at the coordinator), and runs one
daemon per accepted study, each with its own state (models, pending updates) under
`studies/<name>/`; the default study keeps the top of the state folder. The privacy
ledger is the site's, one at the top for every study: the budget is per dataset, not
per study name, so a study offered again under another name spends from it too.

Everything the coordinator says is checked before it touches the disk: a study name
must be what the coordinator itself accepts (fedcollab._names.STUDY_NAME), and the
folder it names must lie inside state_dir; an offer that fails is declined with
STUDY_NAME_INVALID and creates nothing.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grpc

from fedcollab._names import NAME, STUDY_NAME, PathEscape, inside
from fedcollab._state_lock import StateLock
from fedcollab._tls_files import check_tls_files
from fedcollab.config import InstitutionConfig
from fedcollab.errors import RemoteError
from fedcollab.institution._backoff import Backoff
from fedcollab.institution._client import CoordinatorClient
from fedcollab.institution._daemon import _TRANSIENT, DaemonEvent, InstitutionDaemon, daemon_from_config
from fedcollab.institution._notices import Notices
from fedcollab.institution._policy import Decision, decide_study
from fedcollab.privacy._dataset import dataset_key
from fedcollab.privacy._ledger import PrivacyLedger
from fedcollab.privacy._ledger_migrate import open_site_ledger
from fedcollab.transport import channel_credentials_from
from fedcollab.v1 import coordinator_service_pb2 as pb

log = logging.getLogger("fedcollab.institution")

DECISIONS_FILE = "study-decisions.jsonl"
# Declines of names that are no name at all are kept in memory only, and at most this
# many: a coordinator inventing a new one at every listing must not fill the disk.
_MAX_INVALID = 1024


def name_problem(offer: pb.StudyOffer) -> str:
    """Why the offer's study name cannot be used (empty: it can). A submitted study's
    name becomes a folder, so it must be one the coordinator accepts from operators."""
    name = offer.study.name
    pattern, what = (NAME, "1-128 letters, digits, '.', '_' or '-'") if offer.is_default else (
        STUDY_NAME, "1-63 lowercase letters, digits, '_' or '-'")
    if not pattern.fullmatch(name):
        return f"study name {name[:80]!r} is not a study name ({what}, starting with a letter or digit)"
    return ""


def study_config(config: InstitutionConfig, offer: pb.StudyOffer) -> InstitutionConfig:
    """The institution's config as the daemon of this study uses it: its own state
    folder (the default study: the top one). The privacy budget stays the site's; a
    study's sub-limit (policy.budgets) is applied by InstitutionPrivacy. PathEscape
    when the folder would leave state_dir (a name never checked by name_problem)."""
    if offer.is_default:
        return config
    studies = Path(config.institution.state_dir) / "studies"
    folder = inside(studies, studies / offer.study.name)
    if folder.parent != studies.resolve():  # one folder per study, right under studies/
        raise PathEscape(f"study {offer.study.name[:80]!r} names no folder of its own under {studies}")
    return config.model_copy(update={"institution": config.institution.model_copy(update={"state_dir": folder})})


class InstitutionAgent:
    """`fedcollab institution run`. `keep_running` (the command's default, a service):
    wait for new studies once every accepted one has ended, and for the coordinator
    while it is away. Without it (`--exit-when-done`, and this class's default for
    callers that embed it), return once they have ended."""

    def __init__(
        self,
        *,
        config: InstitutionConfig,
        credentials: grpc.ChannelCredentials | None = None,
        on_event: Callable[[DaemonEvent], None] | None = None,
        keep_running: bool = False,
        list_every_s: float = 5.0,
        make_daemon: Callable[[InstitutionConfig, str], InstitutionDaemon] | None = None,
    ) -> None:
        self.config = config
        self.name = config.institution.name
        if credentials is None and config.tls is not None:
            # Unreadable or mismatched files are a config error now, not a reconnect
            # loop that never says why its handshakes fail.
            check_tls_files(config.tls, table="tls")
            credentials = channel_credentials_from(config.tls)
        self._credentials = credentials
        self._client = CoordinatorClient(address=config.institution.coordinator, credentials=credentials,
                                         max_reconnect_backoff_s=config.reconnect.max_backoff_s)
        self._on_event = on_event
        self._keep_running = keep_running
        self.notices = Notices(logger=log, name=self.name)  # shared with its daemons: an outage is told once
        self._list_every_s = list_every_s
        self._ledger: PrivacyLedger | None = None  # the site's, shared by every study's daemon
        self._make_daemon = make_daemon or (lambda cfg, study: daemon_from_config(
            cfg, credentials=self._credentials, on_event=self._on_event, study=study, ledger=self._site_ledger()))
        self._state_dir = Path(config.institution.state_dir)
        self._default_study: str | None = None  # the study accepted as the coordinator's default
        self._invalid: dict[str, Decision] = {}
        self.decisions: dict[str, Decision] = self._load_decisions()
        self._threads: dict[str, threading.Thread] = {}
        self.finished: dict[str, bool] = {}

    def _site_ledger(self) -> PrivacyLedger | None:
        """Opened (and older per-study ledgers migrated) once, before the first daemon trains."""
        c = self.config
        if self._ledger is None and c.privacy is not None and c.data is not None:
            self._ledger = open_site_ledger(self._state_dir, dataset=dataset_key(c.data), site_budget=c.privacy.budget)
        return self._ledger

    # ----------------------------------------------------------------- decisions
    def _load_decisions(self) -> dict[str, Decision]:
        path = self._state_dir / DECISIONS_FILE
        out: dict[str, Decision] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    out[row["study"]] = Decision(row["accept"], row.get("reason", ""), row.get("message", ""))
                    if row["accept"] and row.get("default"):
                        self._default_study = row["study"]
                except (ValueError, KeyError, TypeError):
                    log.warning("%s: skipped a damaged line of %s", self.name, path)
        return out

    def _record(self, study: str, decision: Decision, *, default: bool = False) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        row = {"at": time.time(), "study": study, "accept": decision.accept, "reason": decision.reason,
               "message": decision.message, "default": default}
        with open(self._state_dir / DECISIONS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.decisions[study] = decision

    # ----------------------------------------------------------------- main loop
    def run(self, *, stop: threading.Event | None = None) -> bool:
        """Until every accepted study has ended (True), or `stop` is set (False). With
        keep_running, only `stop` ends it: a service waits for the coordinator's next
        study, and for the coordinator itself when it is away (quietly, with backoff).
        Without it, a coordinator gone after this site's studies ended is the end too:
        it will not offer them again, and waiting for it would never return. The state
        folder is locked meanwhile: a second agent on it is refused (InUseError)."""
        # The site's ledger and every study's folder live under it: two daemons there
        # would train twice on one budget. Simulations run daemons without an agent,
        # each on a folder of its own.
        with StateLock.acquire(self._state_dir, key="institution.state_dir", role="institution daemon"):
            return self._run(stop or threading.Event())

    def _run(self, stop: threading.Event) -> bool:
        rc = self.config.reconnect
        backoff = Backoff(initial_s=rc.initial_backoff_s, max_s=rc.max_backoff_s)
        waiting = False  # an accepted study queued at the last listing
        while not stop.is_set():
            try:
                offers = self._client.list_studies()
                backoff.reset()
                self.notices.cleared()
            except RemoteError as e:
                gone = e.code in _TRANSIENT  # keyed as the daemons key it: one outage, one line
                if gone and not self._keep_running and self._all_ended(waiting=waiting):
                    log.info("%s: the coordinator is gone (%s) and every study this site took part in has ended; "
                             "exiting", self.name, e.code.name)
                    return True
                delay = backoff.next_delay()
                self.notices.failed(e.code.name if gone else e.reason or e.code.name,
                                    f"cannot list the coordinator's studies ({e})", retry_s=delay)
                stop.wait(delay)
                continue
            waiting = False
            for offer in offers:
                waiting |= self._consider(offer, stop)
            running = any(t.is_alive() for t in self._threads.values())
            if not running and not waiting and not self._keep_running:
                return True  # every study it accepted has ended (or none is left to join)
            self._pause(stop, self._list_every_s if running or waiting or self._keep_running else 1.0,
                        alive=sum(t.is_alive() for t in self._threads.values()))
        for t in self._threads.values():
            t.join(timeout=30)
        return False

    def _all_ended(self, *, waiting: bool) -> bool:
        """At least one study's daemon ran, none runs now, and none accepted is queued."""
        return bool(self._threads) and not waiting and not any(t.is_alive() for t in self._threads.values())

    def _pause(self, stop: threading.Event, seconds: float, *, alive: int) -> None:
        """Until the next listing; cut short when a study's daemon ends, so that the
        agent sees at once that nothing is left (a coordinator that lingers only a
        moment after its last study would otherwise be gone before the next listing)."""
        deadline = time.monotonic() + seconds
        while not stop.is_set() and time.monotonic() < deadline:
            if sum(t.is_alive() for t in self._threads.values()) < alive:
                return
            stop.wait(min(0.1, max(0.0, deadline - time.monotonic())))

    def close(self) -> None:
        """Closes the site's ledger (a daemon still running refuses to spend from then on)."""
        if self._ledger is not None:
            self._ledger.close()

    def _consider(self, offer: pb.StudyOffer, stop: threading.Event) -> bool:
        """Decides on a study seen for the first time and starts its daemon when it may
        run. True: accepted and waiting for its turn (queued)."""
        name = offer.study.name
        problem = name_problem(offer)
        if problem:
            self._refuse_name(name, problem)
            return False
        decision = self.decisions.get(name)
        if decision is None:
            decision = decide_study(self.config.policy, offer)
            if (decision.accept and offer.is_default and not self.config.policy.studies
                    and self._default_study not in (None, name)):
                # With no policy.studies, "the default study" is the one this site accepted
                # as such: a coordinator that calls each new study its default gets no pass.
                decision = Decision(False, "DEFAULT_STUDY_CHANGED",
                                    f"this site took part in {self._default_study!r} as the coordinator's default "
                                    f"study; {name!r} is now offered as the default: name it in policy.studies")
            if decision.accept and offer.is_default:
                self._default_study = name
            self._record(name, decision, default=offer.is_default)
            if decision.accept:
                log.info("%s: accepted study %s", self.name, name)
            else:
                log.warning("%s: declined study %s: %s: %s", self.name, name, decision.reason, decision.message)
                try:
                    self._client.decline_study(institution=self.name, study=name, reason=decision.reason,
                                               message=decision.message)
                except RemoteError as e:  # recorded here all the same; the coordinator hears it next time
                    self.decisions.pop(name)
                    log.warning("%s: could not tell the coordinator: %s", self.name, e)
        if not decision.accept or name in self._threads:
            return False
        if offer.status == "queued":
            return True
        try:
            config = study_config(self.config, offer)
        except PathEscape as e:  # name_problem lets no such name through; this is the second lock
            self._refuse_name(name, str(e))
            return False
        daemon = self._make_daemon(config, "" if offer.is_default else name)
        daemon.notices = self.notices
        if offer.is_default:
            daemon.expect_study(name)

        def serve() -> None:
            self.finished[name] = daemon.run(stop=stop)

        thread = threading.Thread(target=serve, name=f"study-{name}", daemon=True)
        self._threads[name] = thread
        thread.start()
        return False

    def _refuse_name(self, name: str, problem: str) -> None:
        """Declined, logged (escaped: it may hold control characters) and told, once; nothing is created."""
        if name in self._invalid:
            return
        if len(self._invalid) >= _MAX_INVALID:
            self._invalid.pop(next(iter(self._invalid)))
        decision = Decision(False, "STUDY_NAME_INVALID", problem)
        self._invalid[name] = decision
        log.warning("%s: declined an offered study: %s: %s", self.name, decision.reason, problem)
        try:
            self._client.decline_study(institution=self.name, study=name, reason=decision.reason, message=problem)
        except RemoteError as e:
            log.warning("%s: could not tell the coordinator: %s", self.name, e)
