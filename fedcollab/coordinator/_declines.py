"""Who declined a round and why, in the round's own reason: the rounds table (coordinator
status, study status, the dashboard) then says "declined: lab-c (DATA_INCOMPATIBLE: the
site's data has 10 features; ...)" next to "quorum not met", not just a count.

The messages are the institutions' words: stored as sent, shown escaped (_display)."""

from __future__ import annotations

from collections.abc import Iterable

MAX_EACH = 200  # characters of one institution's reason and message
MAX_NAMED = 8  # institutions named; the rest are counted


def declined_note(declines: Iterable[tuple[str, str]]) -> str:
    """'declined: a (REASON: message), b (REASON)' for (institution, reason) pairs; ''
    when none declined."""
    rows = sorted(declines)
    if not rows:
        return ""
    named = [f"{name} ({_clip(why)})" for name, why in rows[:MAX_NAMED]]
    more = f" and {len(rows) - MAX_NAMED} more" if len(rows) > MAX_NAMED else ""
    return f"declined: {', '.join(named)}{more}"


def with_declines(reason: str | None, declines: Iterable[tuple[str, str]]) -> str | None:
    """The round's reason with its declines after it (None: neither)."""
    note = declined_note(declines)
    if not note:
        return reason
    return f"{reason}; {note}" if reason else note


def _clip(text: str) -> str:
    text = text or "no reason given"
    return text if len(text) <= MAX_EACH else text[: MAX_EACH - 3] + "..."
