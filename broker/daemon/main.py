"""``mcp-brokerd``'s process set-up: the spawner, privileges, environment, pid file, daemonising.

Started by root, and only by root: before anything else it forks the
spawner (``python -I -m broker.spawner``, executed afresh, the one part
that stays root) with one end of a socketpair, then drops to
``mcp-broker`` for good and only then imports the heavy parts (pydantic,
the MCP SDK). Everything the process needs before it serves is checked
here, and each failure is one line and an exit code; serving itself is
:func:`broker.daemon.service.run_broker`. When the daemon exits, the
channel closes and the spawner stops every server and exits too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import pwd
import socket
import sys
from typing import TYPE_CHECKING

from broker import __version__
from broker.core.errors import EX_CONFIG, EX_FAILED, EX_OK, EX_SOFTWARE, EX_UNAVAILABLE, ConfigError, PrivsepError
from broker.core.paths import BROKER_USER, Paths
from broker.daemon import memory

if TYPE_CHECKING:  # imported for real only once the process is mcp-broker's
    from broker.daemon import config

log = logging.getLogger("mcp-brokerd")


def broker_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(BROKER_USER)
    except KeyError:
        raise ConfigError(f"system user {BROKER_USER} is missing (run 'mcp-brokerctl install')") from None


def start_spawner(paths: Paths, log_to: str, level: str) -> socket.socket:
    """Fork and execute the spawner (root) with one end of a socketpair; return the daemon's end."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pid = os.fork()
    if pid == 0:  # the spawner: nothing of this process survives the exec but the channel
        try:
            fd = theirs.fileno()
            os.set_inheritable(fd, True)
            # nothing of the launcher's terminal or pipes: a daemonised start must not keep them open
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(2 if log_to == "-" else null, 1)
            if log_to != "-":
                os.dup2(null, 2)
            os.closerange(3, fd)
            os.closerange(fd + 1, 1 << 16)
            argv = [sys.executable, "-I", "-m", "broker.spawner", "--root", paths.root, "--fd", str(fd)]
            os.execv(sys.executable, [*argv, "--log", log_to, "--log-level", level])  # noqa: S606 - no shell
        finally:
            os._exit(EX_SOFTWARE)
    theirs.close()
    return ours


def drop_privileges(broker: pwd.struct_passwd) -> int:
    """Become mcp-broker for good (root's part ends here); return its uid."""
    os.initgroups(BROKER_USER, broker.pw_gid)
    os.setresgid(broker.pw_gid, broker.pw_gid, broker.pw_gid)
    os.setresuid(broker.pw_uid, broker.pw_uid, broker.pw_uid)
    if 0 in os.getresuid() or 0 in os.getresgid():
        raise ConfigError("refusing to run with root privileges")
    return broker.pw_uid


def clean_environment(home: str) -> None:
    """The daemon keeps nothing of its launcher's environment."""
    os.environ.clear()
    os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"})


def lock_pidfile(path: str) -> int:
    """Take the pid file lock; a held lock means a live daemon, a stale file is reused."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            pid = os.pread(fd, 32, 0).decode().strip()
        finally:
            os.close(fd)
        raise PrivsepError(f"mcp-brokerd is already running (pid {pid or 'unknown'})", EX_FAILED) from None
    return fd


def write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mcp-brokerd",
        description="The mcp-privsep broker daemon. Start it as root: it starts the spawner (which stays root "
        "and starts each MCP server under its own user and sandbox) and runs as mcp-broker.",
    )
    p.add_argument("--root", default="/", help="install root (default /; tests use a staging root)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--foreground", action="store_true", help="stay in the foreground (default; for supervisors)")
    mode.add_argument("--daemon", action="store_true", help="detach with python-daemon; the pid file is in the run dir")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"mcp-brokerd {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    paths = Paths(ns.root)
    logging.basicConfig(
        level=ns.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s mcp-brokerd[%(process)d] %(levelname)s %(message)s",
    )
    if os.geteuid() != 0:
        print(
            "mcp-brokerd: must be started by root: it starts the spawner (root) and then runs as mcp-broker",
            file=sys.stderr,
        )
        return EX_CONFIG
    channel: socket.socket | None = None
    try:
        broker = broker_account()
        channel = start_spawner(paths, paths.spawner_log if ns.daemon else "-", ns.log_level)
        drop_privileges(broker)
        memory.bound()
        clean_environment(paths.state)
        os.umask(0o077)
        os.chdir(paths.state)
        from broker.daemon import config  # pydantic: imported by mcp-broker, never by root

        cfg = config.load(paths)
        pid_fd = lock_pidfile(paths.pidfile)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mcp-brokerd: {problem}", file=sys.stderr)
        return EX_CONFIG
    except PrivsepError as exc:
        print(f"mcp-brokerd: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"mcp-brokerd: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return EX_UNAVAILABLE
    if ns.daemon:
        return _daemonize(paths, cfg, pid_fd, channel)
    write_pid(pid_fd)
    from broker.daemon.service import run_broker

    try:
        return asyncio.run(run_broker(paths, cfg, lambda _x: None, channel))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(paths.pidfile)


def _daemonize(paths: Paths, cfg: config.Config, pid_fd: int, channel: socket.socket) -> int:
    """Detach with python-daemon; report readiness or failure to the launcher."""
    import daemon  # python-daemon

    r, w = os.pipe()
    child = os.fork()
    if child:
        os.close(w)
        os.waitpid(child, 0)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.close(r)
        message = b"".join(chunks).decode(errors="replace").strip()
        if message.startswith("ready"):
            print(f"mcp-brokerd: started ({message})")
            return EX_OK
        print(f"mcp-brokerd: failed to start: {message or 'the daemon exited during start-up'}", file=sys.stderr)
        return EX_UNAVAILABLE
    os.close(os.open("/dev/null", os.O_RDONLY))
    log_fh = open(f"{paths.log}/mcp-brokerd.log", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    ctx = daemon.DaemonContext(
        working_directory=paths.state,
        umask=0o077,
        detach_process=True,
        files_preserve=[w, pid_fd, log_fh.fileno(), channel.fileno()],
        stdout=log_fh,
        stderr=log_fh,
        signal_map={},
    )
    code = EX_SOFTWARE
    try:
        ctx.open()
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler):
                h.setStream(log_fh)
        write_pid(pid_fd)

        def ready(_x: object) -> None:
            os.write(w, f"ready, pid {os.getpid()}\n".encode())
            os.close(w)

        from broker.daemon.service import run_broker

        code = asyncio.run(run_broker(paths, cfg, ready, channel))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(w, f"{type(exc).__name__}: {exc}\n".encode())
        log.exception("daemon failed")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(paths.pidfile)
    os._exit(code)


def entry() -> None:
    sys.exit(main())
