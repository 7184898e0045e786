"""Where lineage lives in a coordinator's state folder, and the readable copy of each
record (`lineage/vNNNNNN.json`) written next to the authoritative SQLite row."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from fedcollab._fileio import atomic_write, file_sha256
from fedcollab.lineage._errors import LineageError

__all__ = ["DB_FILE", "RECORDS_DIR", "coordinator_state_dir", "file_sha256", "read_record_file", "record_path",
           "write_record_file"]

DB_FILE = "coordinator.sqlite"
RECORDS_DIR = "lineage"


def record_path(state_dir: Path, version: int) -> Path:
    return Path(state_dir) / RECORDS_DIR / f"v{version:06d}.json"


def write_record_file(state_dir: Path, *, version: int, record_bytes: bytes, signature: bytes) -> Path:
    """`lineage/vNNNNNN.json`: the record as an object for people, and the exact signed
    bytes and signature (base64) for tools. Written atomically."""
    path = record_path(state_dir, version)
    document = {
        "record": json.loads(record_bytes),
        "record_b64": base64.b64encode(record_bytes).decode("ascii"),
        "signature_b64": base64.b64encode(signature).decode("ascii"),
    }
    atomic_write(path, (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    return path


def read_record_file(path: Path) -> tuple[bytes, bytes]:
    """(record bytes, signature) from a `lineage/vNNNNNN.json` file."""
    try:
        document: Any = json.loads(Path(path).read_text(encoding="utf-8"))
        return (base64.b64decode(document["record_b64"], validate=True),
                base64.b64decode(document["signature_b64"], validate=True))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LineageError(f"{path}: not a readable lineage record file ({type(e).__name__}: {e})") from None


def coordinator_state_dir(directory: Path) -> Path:
    """The coordinator state folder in `directory`: the folder itself, or the
    `coordinator/` folder of a simulation run."""
    directory = Path(directory)
    for candidate in (directory, directory / "coordinator"):
        if (candidate / DB_FILE).is_file():
            return candidate
    raise LineageError(f"{directory}: no coordinator state here (expected {DB_FILE} in it, or in its "
                       "coordinator/ folder as in a simulation run)", reason="LINEAGE_NO_STATE")
