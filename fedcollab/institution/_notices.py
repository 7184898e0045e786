"""Say a repeated failure once. A daemon run as a service retries for hours while its
coordinator is away or keeps refusing it (INSTITUTION_SUSPENDED); a line per retry
buries everything else in its log. One line when a failure starts or its reason
changes, DEBUG for the retries in between, one line when calls go through again.

The agent and the daemons of its studies share one: they meet the same coordinator,
so an outage (or a suspension) is told once for the institution, not once per caller."""

from __future__ import annotations

import logging
import threading


class Notices:
    def __init__(self, *, logger: logging.Logger, name: str) -> None:
        self._log, self._name = logger, name
        self._reason: str | None = None  # what fails now (None: nothing)
        self._lock = threading.Lock()  # the agent's thread and each study's daemon thread

    @property
    def failing(self) -> str | None:
        return self._reason

    def failed(self, reason: str, message: str, *, retry_s: float, level: int = logging.WARNING) -> None:
        """A call failed for `reason` (UNAVAILABLE, INSTITUTION_SUSPENDED, ...) and is retried in `retry_s`."""
        with self._lock:
            first, self._reason = reason != self._reason, reason
        if first:
            self._log.log(level, "%s: %s; retrying with backoff, quietly until that changes", self._name, message)
        else:
            self._log.debug("%s: still %s; again in %.1fs", self._name, reason, retry_s)

    def cleared(self) -> None:
        """A call went through: said once, if something had failed before."""
        with self._lock:
            was, self._reason = self._reason, None
        if was is not None:
            self._log.info("%s: calls to the coordinator go through again (after %s)", self._name, was)
