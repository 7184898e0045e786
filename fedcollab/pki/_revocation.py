"""The coordinator's view of the CRL: asked on every RPC, re-read only when the file
changes, and never replaced by a CRL that fails to verify."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from fedcollab.errors import PkiError
from fedcollab.pki._ca import now

log = logging.getLogger("fedcollab.pki")


class RevocationList:
    """`is_revoked(serial)` costs one stat() while the file is unchanged. When it
    changes (a new inode from an atomic replace, or another mtime or size) it is parsed
    and verified against `ca_cert`; a CRL that does not parse, is signed by another key
    or names another issuer is logged as an error and the last good one stays in force.
    Construction raises PkiError when there is no good CRL at all, so a coordinator
    refuses to start with one."""

    def __init__(self, path: Path, *, ca_cert: x509.Certificate) -> None:
        self._path = Path(path)
        self._ca = ca_cert
        self._lock = threading.Lock()
        self._listeners: list[Callable[[frozenset[int]], None]] = []
        self._revoked: frozenset[int] = frozenset()
        self._seen: tuple[int, int, int] | None = None  # (inode, mtime_ns, size) last looked at
        self._stale_warned = False
        try:
            self._seen = self._stat()
            self._revoked = self._load()
        except (OSError, PkiError) as e:
            raise PkiError(f"cannot use the revocation list {self._path}: {e}. Copy the crl.pem of the "
                           "federation CA there (`fedcollab pki crl --ca-dir` re-signs it)") from None

    def on_reload(self, listener: Callable[[frozenset[int]], None]) -> None:
        """`listener(revoked_serials)` after each reload that changed the set (the
        coordinator drops those certificates' sessions). It runs in the thread whose call
        found the file changed, after the new list is in force; an exception in it is
        logged, never raised to that call."""
        self._listeners.append(listener)

    @property
    def revoked_serials(self) -> frozenset[int]:
        self._refresh()
        return self._revoked

    def is_revoked(self, serial: int) -> bool:
        self._refresh()
        return serial in self._revoked

    def _stat(self) -> tuple[int, int, int]:
        st = os.stat(self._path)
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _refresh(self) -> None:
        try:
            seen: tuple[int, int, int] | None = self._stat()
        except OSError:
            seen = None
        if seen == self._seen:
            return
        with self._lock:
            if seen == self._seen:  # another thread reloaded it meanwhile
                return
            before = self._revoked
            try:
                if seen is None:
                    raise PkiError("the file is gone")
                self._revoked = self._load()
            except (OSError, PkiError) as e:
                log.error("revocation list %s: %s; keeping the last good one (%d revoked serials) until a "
                          "valid CRL signed by the federation CA replaces it", self._path, e, len(self._revoked))
            self._seen = seen  # a bad file is reported once, not on every call
            revoked = self._revoked
        if revoked != before:
            for listener in list(self._listeners):  # outside the lock: listeners take their own
                try:
                    listener(revoked)
                except Exception:
                    log.exception("revocation list %s: a listener failed on reload", self._path)

    def _load(self) -> frozenset[int]:
        try:
            crl = x509.load_pem_x509_crl(self._path.read_bytes())
        except ValueError as e:
            raise PkiError(f"not a PEM CRL ({e})") from None
        if crl.issuer != self._ca.subject:
            raise PkiError(f"issued by {crl.issuer.rfc4514_string()!r}, not by the federation CA "
                           f"{self._ca.subject.rfc4514_string()!r}")
        try:
            valid = crl.is_signature_valid(self._ca.public_key())  # type: ignore[arg-type]
        except TypeError:
            valid = False
        if not valid:
            raise PkiError("its signature does not verify with the federation CA's key")
        next_update = crl.next_update_utc
        if next_update is not None and next_update < now():
            if not self._stale_warned:
                log.warning("revocation list %s went stale at %s: run `fedcollab pki crl --ca-dir PKI_DIR` and copy "
                            "the new crl.pem here (it is still used meanwhile)", self._path, next_update)
                self._stale_warned = True
        else:
            self._stale_warned = False
        return frozenset(r.serial_number for r in crl)
