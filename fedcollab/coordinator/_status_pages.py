"""Pages of a study's rounds for GetStatus (AIP-158).

A study with thousands of rounds does not fit one gRPC message (the smallest limit the
configuration allows is chunk_bytes 1 KiB + 64 KiB of framing), so rounds go out in
pages: at most `page_size` attempts and at most PAGE_BYTES of them. The page token
names the last (round, attempt) sent, so rounds that open meanwhile never shift a page.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc

from fedcollab.errors import Rejected

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
# Under every message limit (>= 65 KiB), with room for the reply's other fields.
PAGE_BYTES = 48 * 1024
_PREFIX = "r1"

T = TypeVar("T")


def page_size_of(requested: int) -> int:
    if requested < 0:
        raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_PAGE_SIZE",
                       message=f"page_size is {requested}; give 0 (the default, {DEFAULT_PAGE_SIZE}) or up to "
                               f"{MAX_PAGE_SIZE}")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def token_for(*, study: str, round_number: int, attempt: int) -> str:
    return base64.urlsafe_b64encode(f"{_PREFIX}:{study}:{round_number}:{attempt}".encode()).decode().rstrip("=")


def position_of(token: str, *, study: str) -> tuple[int, int] | None:
    """The (round, attempt) after which the page starts; None for the first page."""
    if not token:
        return None
    try:
        text = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode("ascii")
        prefix, token_study, round_text, attempt_text = text.rsplit(":", 3) if text.count(":") >= 3 else ("",) * 4
        position = (int(round_text), int(attempt_text))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        prefix, token_study, position = "", "", (-1, -1)
    if prefix != _PREFIX or min(position) < 0:
        raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_PAGE_TOKEN",
                       message="page_token is not one this coordinator gave: pass the next_page_token of the "
                               "previous reply as it came, or none for the first page")
    if token_study != study:
        raise Rejected(code=grpc.StatusCode.INVALID_ARGUMENT, reason="INVALID_PAGE_TOKEN",
                       message=f"page_token belongs to study {token_study!r}, not {study!r}: page one study at a time")
    return position


def page(rows: Sequence[dict[str, Any]], *, after: tuple[int, int] | None, page_size: int,
         encode: Callable[[dict[str, Any]], T], size_of: Callable[[T], int]) -> tuple[list[T], bool]:
    """The encoded rows after `after` ((round, attempt) order), at most `page_size` and
    PAGE_BYTES of them (always at least one), and whether rows are left."""
    start = 0 if after is None else next(
        (i for i, r in enumerate(rows) if (r["round"], r["attempt"]) > after), len(rows))
    out: list[T] = []
    used = 0
    for row in rows[start:]:
        if len(out) >= page_size:
            break
        item = encode(row)
        used += size_of(item) + 8  # + the field's tag and length
        if out and used > PAGE_BYTES:
            break
        out.append(item)
    return out, start + len(out) < len(rows)
