"""The running daemon as root sees it: its pid file, whether it lives, how to stop it."""

from __future__ import annotations

import os
import signal
import time

from broker.core.errors import EX_FAILED, EX_TEMPFAIL, PrivsepError
from broker.core.paths import Paths


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs; an exited process its parent has not reaped (a zombie) does not."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", EX_FAILED)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def daemon_pid(paths: Paths) -> int | None:
    """The pid of the running mcp-brokerd named by the pid file; None when none runs.

    Raises PrivsepError when the pid file names a live process that is not
    mcp-brokerd: that process is never signalled.
    """
    try:
        with open(paths.pidfile, encoding="ascii") as fh:
            pid = int(fh.read().strip() or "0")
    except (FileNotFoundError, ValueError):
        return None
    if pid <= 1:
        raise PrivsepError(f"{paths.pidfile} holds no usable pid", EX_FAILED)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except FileNotFoundError:
        return None
    if b"mcp-brokerd" not in cmdline:
        raise PrivsepError(f"pid {pid} from {paths.pidfile} is not mcp-brokerd; not signalling it", EX_FAILED)
    return pid if alive(pid) else None


def stop(paths: Paths, timeout: float) -> int | None:
    """SIGTERM the daemon and wait until it has exited; return its pid (None: it was not running).

    Raises PrivsepError (75) when it outlives ``timeout``.
    """
    pid = daemon_pid(paths)
    if pid is None:
        return None
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(pid):
            return pid
        time.sleep(0.05)
    raise PrivsepError(f"mcp-brokerd (pid {pid}) did not exit within {timeout:g} s", EX_TEMPFAIL)
