"""Where lineage lives in a coordinator's state folder, and the readable copy of each
record (`lineage/vNNNNNN.json`) written next to the authoritative SQLite row."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

from fedcollab.lineage._errors import LineageError

DB_FILE = "coordinator.sqlite"
RECORDS_DIR = "lineage"


def record_path(state_dir: Path, version: int) -> Path:
    return Path(state_dir) / RECORDS_DIR / f"v{version:06d}.json"


def write_record_file(state_dir: Path, *, version: int, record_bytes: bytes, signature: bytes) -> Path:
    """`lineage/vNNNNNN.json`: the record as an object for people, and the exact signed
    bytes and signature (base64) for tools. Written atomically."""
    path = record_path(state_dir, version)
    path.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "record": json.loads(record_bytes),
        "record_b64": base64.b64encode(record_bytes).decode("ascii"),
        "signature_b64": base64.b64encode(signature).decode("ascii"),
    }
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    tmp.write_text(json.dumps(document, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_record_file(path: Path) -> tuple[bytes, bytes]:
    """(record bytes, signature) from a `lineage/vNNNNNN.json` file."""
    try:
        document: Any = json.loads(Path(path).read_text(encoding="utf-8"))
        return (base64.b64decode(document["record_b64"], validate=True),
                base64.b64decode(document["signature_b64"], validate=True))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LineageError(f"{path}: not a readable lineage record file ({type(e).__name__}: {e})") from None


def file_sha256(path: Path) -> str:
    """The hex SHA-256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def coordinator_state_dir(directory: Path) -> Path:
    """The coordinator state folder in `directory`: the folder itself, or the
    `coordinator/` folder of a simulation run."""
    directory = Path(directory)
    for candidate in (directory, directory / "coordinator"):
        if (candidate / DB_FILE).is_file():
            return candidate
    raise LineageError(f"{directory}: no coordinator state here (expected {DB_FILE} in it, or in its "
                       "coordinator/ folder as in a simulation run)", reason="LINEAGE_NO_STATE")
