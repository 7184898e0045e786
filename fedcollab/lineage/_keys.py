"""The coordinator's Ed25519 lineage key: created once per state folder, kept there.

`lineage-signing-key.pem` (PKCS8, mode 0600) signs; `lineage-public-key.pem` is its
public half, for institutions to pin and for `fedcollab lineage verify` offline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from fedcollab._fileio import atomic_write, fsync_dir
from fedcollab.lineage._errors import LineageError

log = logging.getLogger("fedcollab.lineage")

SIGNING_KEY_FILE = "lineage-signing-key.pem"
PUBLIC_KEY_FILE = "lineage-public-key.pem"
PUBLIC_KEY_BYTES = 32


def load_or_create_signing_key(state_dir: Path) -> Ed25519PrivateKey:
    """The state folder's signing key, created on first use. Creation is atomic and
    never overwrites: of two processes racing, both end up with the same key. The
    public key file is (re)written from it when missing or different."""
    state_dir = Path(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / SIGNING_KEY_FILE
    if not path.exists():
        _create_private_key(path)
    key = _load_private_key(path)
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        log.warning("%s is readable by others (mode %o): chmod 600 it; whoever reads it can sign lineage "
                    "records as this coordinator", path, mode)
    _write_public_key(state_dir / PUBLIC_KEY_FILE, key.public_key())
    return key


def _create_private_key(path: Path) -> None:
    pem = Ed25519PrivateKey.generate().private_bytes(
        encoding=serialization.Encoding.PEM,
        format=serialization.PrivateFormat.PKCS8,
        encryption_algorithm=serialization.NoEncryption(),
    )
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # fails if another process got there first: keep its key
        except FileExistsError:
            pass
        else:
            fsync_dir(path.parent)
            log.info("created the lineage signing key %s", path)
    finally:
        tmp.unlink(missing_ok=True)


def _load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise LineageError(f"{path}: cannot load the lineage signing key: {e}", reason="LINEAGE_KEY_INVALID") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise LineageError(f"{path}: the lineage signing key must be Ed25519, not {type(key).__name__}",
                           reason="LINEAGE_KEY_INVALID")
    return key


def _write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    pem = key.public_bytes(encoding=serialization.Encoding.PEM, format=serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        if path.read_bytes() == pem:
            return
    except FileNotFoundError:
        pass
    atomic_write(path, pem)


def raw_public_key(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> bytes:
    """The 32 raw bytes of an Ed25519 public key (what JoinResponse carries)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    if isinstance(key, Ed25519PublicKey):
        return key.public_bytes(encoding=serialization.Encoding.Raw, format=serialization.PublicFormat.Raw)
    if len(key) != PUBLIC_KEY_BYTES:
        raise LineageError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, not {len(key)}",
                           reason="LINEAGE_KEY_INVALID")
    return bytes(key)


def public_key_of(key: Ed25519PublicKey | bytes) -> Ed25519PublicKey:
    if isinstance(key, Ed25519PublicKey):
        return key
    return Ed25519PublicKey.from_public_bytes(raw_public_key(key))


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file (`lineage-public-key.pem`)."""
    try:
        key = serialization.load_pem_public_key(Path(path).read_bytes())
    except (OSError, ValueError, UnsupportedAlgorithm) as e:
        raise LineageError(f"{path}: cannot load a lineage public key: {e}", reason="LINEAGE_KEY_INVALID") from None
    if not isinstance(key, Ed25519PublicKey):
        raise LineageError(f"{path}: a lineage public key is Ed25519, not {type(key).__name__}",
                           reason="LINEAGE_KEY_INVALID")
    return key


def key_fingerprint(key: Ed25519PublicKey | Ed25519PrivateKey | bytes) -> str:
    """A short name for a public key, to compare by eye: ed25519: and 16 hex digits of
    the SHA-256 of its raw bytes."""
    return "ed25519:" + hashlib.sha256(raw_public_key(key)).hexdigest()[:16]
