"""Writing PKI files safely: private keys 0600 and never overwritten, everything else
replaced atomically (a reader sees the old file or the new one, never half of one)."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedcollab._fileio import atomic_write
from fedcollab.errors import PkiError

__all__ = ["atomic_write", "load_private_key", "locked", "write_private_key"]


def write_private_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    """Created 0600 with O_EXCL: an existing key is never overwritten (it may be the
    only copy of a key a certificate was issued for)."""
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PkiError(f"{path} already exists and a private key is never overwritten: "
                       "move it away first if you really mean to replace it") from None
    with os.fdopen(fd, "wb") as f:
        os.fchmod(f.fileno(), 0o600)  # whatever the umask
        f.write(pem)
        f.flush()
        os.fsync(f.fileno())


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise PkiError(f"cannot read the private key {path}: {e}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError(f"{path} is not an EC private key; fedcollab keys are ECDSA P-256")
    return key


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Serialises sign/revoke on one CA folder (two operators' shells, or a script), so
    issued.json and crl.pem never lose an update."""
    with open(directory / ".lock", "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
