"""The daemon's own logs: nothing the broker writes to a log may hold a secret it knows.

Every handler of the daemon's log passes its records through the current
redactor (it changes on reload), exception tracebacks included; third-party
loggers that write URLs, headers or message bodies (the HTTP client, the
MCP SDK) are held at WARNING whatever the daemon's own level. Server stderr
reaches ``servers.log`` through :func:`server_sink`, redacted and bounded
line by line. The audit trail's own fields are redacted where they are made.

Both ``servers.log`` and the daemon's own ``mcp-brokerd.log`` (when the
daemon detached and writes it itself) rotate by size: beyond
``servers_log_max_bytes`` the file becomes ``NAME.1`` (older ones shift up
to ``servers_log_keep``, the oldest goes) and a new one is started. The
check is a running byte count, not a ``stat`` per line.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import stat
import threading
import time
from collections.abc import Callable
from typing import IO, Any, cast

#: loggers that would write request URLs, headers or bodies at INFO or DEBUG
QUIET = ("httpx", "httpx2", "httpcore", "httpcore2", "mcp", "sse_starlette", "uvicorn")
#: a line of a server's stderr is cut here
MAX_LINE = 8192
#: the defaults of ``servers_log_max_bytes`` and ``servers_log_keep``
MAX_BYTES = 8 * 1024 * 1024
KEEP = 3

#: (max bytes, files kept) of servers.log and mcp-brokerd.log, read at each rotation check
Limits = Callable[[], tuple[int, int]]


def default_limits() -> tuple[int, int]:
    return MAX_BYTES, KEEP


#: what the daemon log's rotation reads; :func:`use_limits` points it at the running config
_limits: Limits = default_limits


def use_limits(limits: Limits) -> None:
    """Make both logs follow ``limits`` (the running ``[broker]`` settings, re-read on reload)."""
    global _limits  # one daemon, one config
    _limits = limits


def settings_limits(settings: Callable[[], Any]) -> Limits:
    """Limits read from ``[broker]`` settings (``servers_log_max_bytes``, ``servers_log_keep``)."""

    def limits() -> tuple[int, int]:
        current = settings()
        return int(current.servers_log_max_bytes), int(current.servers_log_keep)

    return limits


def rotate_files(path: str, keep: int) -> None:
    """``path`` -> ``path.1`` -> ... -> ``path.KEEP``; the oldest beyond ``keep`` (or ``path`` itself, keep 0) goes."""
    if keep <= 0:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(f"{path}.{keep}")
    for n in range(keep - 1, 0, -1):
        with contextlib.suppress(FileNotFoundError):
            os.rename(f"{path}.{n}", f"{path}.{n + 1}")
    with contextlib.suppress(FileNotFoundError):
        os.rename(path, f"{path}.1")


def _open_append(path: str) -> int:
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)


class RotatingLog(io.TextIOBase):
    """A text log file (``servers.log``) that rotates by size when a write would take it beyond the limit.

    Each write is one ``os.write`` of whole lines on an ``O_APPEND``
    descriptor (nothing is buffered, so nothing is lost to a crash); the
    size is counted, not asked for. A file moved away by someone else
    (logrotate) is noticed at the next rotation check only.
    """

    def __init__(self, path: str, limits: Limits = default_limits) -> None:
        super().__init__()
        self.path = path
        self.limits = limits
        self._lock = threading.Lock()
        self._fd = _open_append(path)
        self._size = os.fstat(self._fd).st_size

    @property
    def name(self) -> str:
        return self.path

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        data = text.encode("utf-8", "replace")
        with self._lock:
            if self._fd < 0:
                raise ValueError("I/O operation on closed file")
            max_bytes, keep = self.limits()
            if max_bytes > 0 and self._size > 0 and self._size + len(data) > max_bytes:
                self._rotate(keep)
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view) :]
            self._size += len(data)
        return len(text)

    def _rotate(self, keep: int) -> None:
        rotate_files(self.path, keep)
        fd = _open_append(self.path)
        os.close(self._fd)
        self._fd = fd
        self._size = os.fstat(fd).st_size

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
        super().close()


def open_server_log(path: str, limits: Limits = default_limits) -> IO[str]:
    """``servers.log``, rotating (see :class:`RotatingLog`)."""
    return cast(IO[str], RotatingLog(path, limits))


class RotatingStream(logging.Filter):
    """Rotates the file under a logging handler's stream (the detached daemon's ``mcp-brokerd.log``).

    The stream's descriptor, and stdout and stderr where they point at the
    same file, are moved onto the new file with ``dup2``, so the stream
    objects stay valid. The size is the file's at install, plus what each
    record about adds (its message and ~100 bytes of prefix).
    """

    def __init__(self, stream: Any, path: str) -> None:
        super().__init__()
        self.stream = stream
        self.path = path
        self._lock = threading.Lock()  # filters run before the handler takes its own lock
        self._size = os.fstat(stream.fileno()).st_size

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock, contextlib.suppress(Exception):  # a log line is never lost to its rotation
            self._size += len(str(record.msg)) + 100
            max_bytes, keep = _limits()
            if max_bytes > 0 and self._size > max_bytes:
                self.rotate(keep)
        return True

    def rotate(self, keep: int) -> None:
        with contextlib.suppress(Exception):
            self.stream.flush()
        fd = self.stream.fileno()
        old = os.fstat(fd)
        rotate_files(self.path, keep)
        new = _open_append(self.path)
        try:
            os.dup2(new, fd, inheritable=False)
            for std in (1, 2):
                with contextlib.suppress(OSError):
                    st = os.fstat(std)
                    if (st.st_dev, st.st_ino) == (old.st_dev, old.st_ino):
                        os.dup2(new, std)
        finally:
            os.close(new)
        self._size = os.fstat(fd).st_size


def _file_stream(handler: logging.Handler) -> tuple[Any, str] | None:
    """The stream of a handler that writes a regular file named by an absolute path, and that path."""
    if not isinstance(handler, logging.StreamHandler):
        return None
    stream = handler.stream
    name = getattr(stream, "name", None)
    if not isinstance(name, str) or not name.startswith("/"):
        return None
    try:
        st = os.fstat(stream.fileno())
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) != (os.stat(name).st_dev, os.stat(name).st_ino):
            return None
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return None
    return stream, name


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
        found = _file_stream(handler)
        if found is not None and not any(isinstance(f, RotatingStream) for f in handler.filters):
            handler.addFilter(RotatingStream(*found))
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
