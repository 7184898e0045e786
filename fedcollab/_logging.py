"""Where the `fedcollab` command sets up logging: rich, readable lines for a person at a
terminal, or JSON lines for a log collector (one object per line on stderr)."""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any, Literal

from fedcollab._display import printable

LogFormat = Literal["rich", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("rich", "json")

# What every LogRecord has; anything else on a record came from `extra=` and is kept.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts (ISO 8601, UTC), level, logger, message, the
    record's `extra=` fields, and exc / stack when there is a traceback."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_") and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that JSON cannot hold is written as its str(), never dropped
        # with the record. A line feed in a message stays escaped: one record, one line.
        return json.dumps(out, default=str, ensure_ascii=False)


class TerminalFormatter(logging.Formatter):
    """A log line for a person's terminal: the message (which may quote what an
    institution sent, a decline message say) with its control characters escaped, so
    no escape sequence from outside reaches the terminal (_display)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = printable(record.message, limit=None)
        return super().formatMessage(record)


def configure_logging(*, level: int, fmt: LogFormat = "rich", stream: IO[str] | None = None) -> None:
    """Give the root logger one handler writing to `stream` (default: stderr) at `level`.

    Like logging.basicConfig, which it calls: a root logger that already has handlers
    (pytest's capture, an application embedding fedcollab) is left as it is."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format must be one of {', '.join(LOG_FORMATS)}; got {fmt!r}")
    handler: logging.Handler
    if fmt == "json":
        handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
        handler.setFormatter(JsonFormatter())
    else:
        from rich.console import Console
        from rich.logging import RichHandler

        console = Console(stderr=True) if stream is None else Console(file=stream)  # stderr: looked up at each write
        handler = RichHandler(console=console, show_path=False)
        handler.setFormatter(TerminalFormatter("%(name)s: %(message)s", datefmt="[%X]"))
    logging.basicConfig(level=level, handlers=[handler])
