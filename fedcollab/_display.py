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

from rich.markup import escape

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
