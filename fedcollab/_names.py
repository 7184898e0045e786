"""Names that cross the wire and may become file names, checked in one place.

The coordinator checks what operators and institutions send it with these patterns;
an institution checks what the coordinator sends it with the same ones, because a
name that becomes a path (studies/<name>/, a model cache file) is a path traversal
when it holds '/', '..', NUL or a newline. Always `fullmatch`: `match` with '$'
lets a trailing newline through.
"""

from __future__ import annotations

import re
from pathlib import Path

# A submitted study: no '.', since its session ids are "<name>.<token>", and so no '..' either.
STUDY_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")
# An institution, or the coordinator's default study (from its federation.toml).
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class PathEscape(ValueError):
    """A path built from a name would leave the folder it belongs in."""


def inside(root: Path, path: Path) -> Path:
    """`path` resolved, if it lies inside `root` (resolved); PathEscape otherwise.
    Resolving follows symlinks, so a link planted in the folder cannot lead out either."""
    try:
        base = Path(root).resolve()
        resolved = Path(path).resolve()
    except (ValueError, OSError) as e:  # an embedded NUL, a symlink loop
        raise PathEscape(f"{str(path)[:200]!r} is no usable path: {e}") from None
    if resolved != base and base not in resolved.parents:
        raise PathEscape(f"{path} is outside {root}")
    return resolved
