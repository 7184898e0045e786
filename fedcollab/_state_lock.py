"""One process per state folder: an exclusive lock on `<state_dir>/.lock`, held for
as long as the coordinator or the institution runs.

Two coordinators on one folder would both append to its lineage and its stores; two
institution daemons would train twice on one privacy ledger. The lock is flock(2) on
an open file, so it dies with its process: `kill -9` leaves no stale lock, and the
next start takes it at once. It is per open file, not per process, so a second
Coordinator object in the same process is refused too (tests run several). The file
holds who took it (pid, host, command), so the refusal can say who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from fedcollab.errors import InUseError

LOCK_FILE = ".lock"
_MAX_COMMAND = 300


class StateLock:
    """Held until release() (or the process ends). acquire() raises InUseError naming
    `key` (the config key that chose the folder) and the holder.

    A folder that held nothing when locked is left as it was found: absent again when
    the holder wrote nothing into it (release()), or when what it wrote came from a
    start that failed (undo_if_new()). A folder that held state is never emptied."""

    def __init__(self, *, path: Path, fd: int, made: list[Path], new: bool) -> None:
        self.path = path
        self._fd: int | None = fd
        self._made = made  # the folders acquire() created, deepest first
        self._new = new  # the folder held nothing (or only this lock file) when locked

    @classmethod
    def acquire(cls, folder: Path, *, key: str, role: str) -> StateLock:
        folder = Path(folder)
        made = [p for p in (folder, *folder.parents) if not p.exists()]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe_holder(fd)
            os.close(fd)
            raise InUseError(f"{key}: {folder} is in use by {holder}: one {role} per state folder. Stop that "
                             f"one first, or give this one its own {key}") from None
        except BaseException:
            os.close(fd)
            raise
        # Who holds it, for the refusal above (readers take what is there; a half-written
        # line only loses the description, never the lock).
        about = {"pid": os.getpid(), "host": socket.gethostname(), "role": role,
                 "command": " ".join(sys.argv)[:_MAX_COMMAND], "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(about) + "\n").encode(), 0)
        return cls(path=path, fd=fd, made=made, new=_holds_nothing(folder))

    @contextlib.contextmanager
    def undo_if_new(self) -> Iterator[None]:
        """When the block raises: the lock released and, in a folder that was new,
        whatever the block wrote removed first (a failed first start leaves nothing)."""
        try:
            yield
        except BaseException:
            if self._new and self._fd is not None:
                for entry in os.scandir(self.path.parent):
                    if entry.name != LOCK_FILE:
                        with contextlib.suppress(OSError):
                            if entry.is_dir(follow_symlinks=False):
                                shutil.rmtree(entry.path)
                            else:
                                os.unlink(entry.path)
            self.release()
            raise

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        """Idempotent. The lock file stays where the folder holds state: removing it
        then would let one process lock a new file while another holds the old one."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        folder = self.path.parent
        if self._new and _holds_nothing(folder):
            # Unlinked while still held: a process that opened it before is refused (it
            # is held); one that comes after creates a file of its own.
            with contextlib.suppress(OSError):
                self.path.unlink()
            os.close(fd)
            for made in self._made:  # only while empty: another process may have locked it since
                try:
                    made.rmdir()
                except OSError:
                    break
            return
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
        os.close(fd)  # closing the last descriptor of the open file releases the flock

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def _holds_nothing(folder: Path) -> bool:
    """Nothing in `folder` but the lock file."""
    try:
        return all(entry.name == LOCK_FILE for entry in os.scandir(folder))
    except OSError:
        return False


def _describe_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0).decode("utf-8", "replace"))
        pid, host = int(holder["pid"]), str(holder["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (it has not written its pid yet)"
    where = "this very process" if pid == os.getpid() and host == socket.gethostname() else f"pid {pid} on {host}"
    role = str(holder.get("role") or "process")
    command = str(holder.get("command") or "")
    since = str(holder.get("since") or "")
    details = ", ".join(x for x in (f"`{command}`" if command else "", f"since {since}" if since else "") if x)
    article = "an" if role[:1] in "aeiou" else "a"
    return f"{article} {role} ({where}{', ' + details if details else ''})"
