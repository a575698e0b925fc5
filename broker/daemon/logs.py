"""The daemon's own logs: nothing the broker writes to a log may hold a secret it knows.

Every handler of the daemon's log passes its records through the current
redactor (it changes on reload), exception tracebacks included; third-party
loggers that write URLs, headers or message bodies (the HTTP client, the
MCP SDK) are held at WARNING whatever the daemon's own level. Server stderr
reaches ``servers.log`` through :func:`server_sink`, redacted and bounded
line by line. The audit trail's own fields are redacted where they are made.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from typing import IO

#: loggers that would write request URLs, headers or bodies at INFO or DEBUG
QUIET = ("httpx", "httpx2", "httpcore", "httpcore2", "mcp", "sse_starlette", "uvicorn")
#: a line of a server's stderr is cut here
MAX_LINE = 8192


class Redacting(logging.Filter):
    """Rewrites each record's message (and traceback) with ``redact`` before any handler formats it."""

    def __init__(self, redact: Callable[[str], str]) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string must not lose the line
            text = str(record.msg)
        record.msg, record.args = self.redact(text), None
        if record.exc_info:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def install(redact: Callable[[str], str]) -> Redacting:
    """Redact every handler of the root logger, and quiet the loggers in :data:`QUIET`."""
    flt = Redacting(redact)
    for handler in logging.getLogger().handlers:
        handler.addFilter(flt)
    for name in QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger(name).level))
    return flt


def server_sink(name: str, errlog: IO[str], redact: Callable[[str], str]) -> Callable[[str], None]:
    """Where one server's stderr lines go: ``servers.log``, each line stamped, named, cut and redacted."""

    def sink(line: str) -> None:
        if len(line) > MAX_LINE:
            line = line[:MAX_LINE] + f" [... {len(line) - MAX_LINE} more characters]"
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # a full disk or a closed file loses a server's chatter, never a call
        with contextlib.suppress(OSError, ValueError):
            errlog.write(f"{stamp} [{name}] {redact(line)}\n")

    return sink
