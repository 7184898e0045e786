"""Text from elsewhere, made safe to show on a terminal.

Institutions choose their decline messages, coordinators their reasons; a terminal
runs whatever escape sequence they hold (retitle the window, clear the screen, hide a
line, rewrite what the operator reads). Every such string is shown through `printable`
(or `markup`, where rich markup is on): control characters (C0, DEL, C1) and Unicode
format characters (bidirectional overrides, zero-width joiners) become visible escapes
like \\x1b or \\u202e, and the text is cut at `limit` characters.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

from rich.console import Console
from rich.markup import escape
from rich.text import Text

DEFAULT_LIMIT = 1024
_UNSAFE = {"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"}  # control, format, line/paragraph separators, unassigned


def printable(text: object, *, limit: int | None = DEFAULT_LIMIT) -> str:
    """`text` as str with every unsafe character written as its escape; at most `limit`
    characters of the original (an ellipsis says so)."""
    s = str(text)
    cut = limit is not None and len(s) > limit
    if cut:
        s = s[:limit]
    out = "".join(_escaped(ch) if unicodedata.category(ch) in _UNSAFE else ch for ch in s)
    return out + "\u2026" if cut else out


def markup(text: object, *, limit: int | None = DEFAULT_LIMIT) -> str:
    """`printable`, then escaped for rich markup (a "[red]" in a name stays text)."""
    return escape(printable(text, limit=limit))


def _escaped(ch: str) -> str:
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def print_facts(console: Console, rows: Sequence[tuple[str, str]], *, title: str) -> None:
    """Label-value lines, each printed whole: a fingerprint, serial or SHA-256 is read out
    by phone or pasted elsewhere, so it is never cut with an ellipsis nor broken at the
    console's width (soft_wrap: the terminal wraps it, a copy gets it in one piece).
    Values are plain text (a fingerprint's ":AB:" is not an emoji code, "[x]" not markup)."""
    width = max((len(label) for label, _ in rows), default=0)
    console.print(Text(title, style="bold"), soft_wrap=True)
    for label, value in rows:
        console.print(Text.assemble((label.ljust(width), "bold"), "  ", str(value)), soft_wrap=True)
