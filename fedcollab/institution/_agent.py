"""An institution across a coordinator's studies: it lists them, accepts or declines
each by its site policy (recording why, here and at the coordinator), and runs one
daemon per accepted study, each with its own state (models, pending updates, privacy
ledger) under `studies/<name>/`. The default study keeps the top of the state folder.
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

from fedcollab.config import InstitutionConfig
from fedcollab.errors import RemoteError
from fedcollab.institution._backoff import Backoff
from fedcollab.institution._client import CoordinatorClient
from fedcollab.institution._daemon import DaemonEvent, InstitutionDaemon, daemon_from_config
from fedcollab.institution._policy import Decision, decide_study
from fedcollab.transport import channel_credentials_from
from fedcollab.v1 import coordinator_service_pb2 as pb

log = logging.getLogger("fedcollab.institution")

DECISIONS_FILE = "study-decisions.jsonl"


def study_config(config: InstitutionConfig, offer: pb.StudyOffer) -> InstitutionConfig:
    """The institution's config as the daemon of this study uses it: its own state
    folder, and its own privacy budget when the policy gives one."""
    name = offer.study.name
    updates: dict[str, object] = {}
    if not offer.is_default:
        folder = Path(config.institution.state_dir) / "studies" / name
        updates["institution"] = config.institution.model_copy(update={"state_dir": folder})
    budget = config.policy.budgets.get(name)
    if budget is not None and config.privacy is not None:
        updates["privacy"] = config.privacy.model_copy(
            update={"budget_epsilon": budget, "target_epsilon": min(config.privacy.target_epsilon, budget)})
    return config.model_copy(update=updates)


class InstitutionAgent:
    """`fedcollab institution run`. `keep_running`: wait for new studies once every
    accepted one has ended (otherwise return then)."""

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
            credentials = channel_credentials_from(config.tls)
        self._credentials = credentials
        self._client = CoordinatorClient(address=config.institution.coordinator, credentials=credentials,
                                         max_reconnect_backoff_s=config.reconnect.max_backoff_s)
        self._on_event = on_event
        self._keep_running = keep_running
        self._list_every_s = list_every_s
        self._make_daemon = make_daemon or (lambda cfg, study: daemon_from_config(
            cfg, credentials=self._credentials, on_event=self._on_event, study=study))
        self._state_dir = Path(config.institution.state_dir)
        self.decisions: dict[str, Decision] = self._load_decisions()
        self._threads: dict[str, threading.Thread] = {}
        self.finished: dict[str, bool] = {}

    # ----------------------------------------------------------------- decisions
    def _load_decisions(self) -> dict[str, Decision]:
        path = self._state_dir / DECISIONS_FILE
        out: dict[str, Decision] = {}
        if path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                    out[row["study"]] = Decision(row["accept"], row.get("reason", ""), row.get("message", ""))
                except (ValueError, KeyError, TypeError):
                    log.warning("%s: skipped a damaged line of %s", self.name, path)
        return out

    def _record(self, study: str, decision: Decision) -> None:
        self._state_dir.mkdir(parents=True, exist_ok=True)
        row = {"at": time.time(), "study": study, "accept": decision.accept, "reason": decision.reason,
               "message": decision.message}
        with open(self._state_dir / DECISIONS_FILE, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.decisions[study] = decision

    # ----------------------------------------------------------------- main loop
    def run(self, *, stop: threading.Event | None = None) -> bool:
        """Until every accepted study has ended (True), or `stop` is set (False)."""
        stop = stop or threading.Event()
        rc = self.config.reconnect
        backoff = Backoff(initial_s=rc.initial_backoff_s, max_s=rc.max_backoff_s)
        while not stop.is_set():
            try:
                offers = self._client.list_studies()
                backoff.reset()
            except RemoteError as e:
                delay = backoff.next_delay()
                log.warning("%s: cannot list the coordinator's studies (%s: %s); again in %.1fs", self.name,
                            e.reason or e.code, e.message, delay)
                stop.wait(delay)
                continue
            waiting = False
            for offer in offers:
                waiting |= self._consider(offer, stop)
            running = any(t.is_alive() for t in self._threads.values())
            if not running and not waiting and not self._keep_running:
                return True  # every study it accepted has ended (or none is left to join)
            stop.wait(self._list_every_s if running or waiting or self._keep_running else 1.0)
        for t in self._threads.values():
            t.join(timeout=30)
        return False

    def _consider(self, offer: pb.StudyOffer, stop: threading.Event) -> bool:
        """Decides on a study seen for the first time and starts its daemon when it may
        run. True: accepted and waiting for its turn (queued)."""
        name = offer.study.name
        decision = self.decisions.get(name)
        if decision is None:
            decision = decide_study(self.config.policy, offer)
            self._record(name, decision)
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
        daemon = self._make_daemon(study_config(self.config, offer), "" if offer.is_default else name)

        def serve() -> None:
            self.finished[name] = daemon.run(stop=stop)

        thread = threading.Thread(target=serve, name=f"study-{name}", daemon=True)
        self._threads[name] = thread
        thread.start()
        return False
