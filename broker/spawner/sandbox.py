"""Start one server instance under its own user, in its own sandbox: :func:`launch`.

The spawner forks a *keeper* process, which enters new namespaces (pid,
mount and IPC; network too for ``network = "none"``) and forks the
server's process, the first of its new pid namespace. That process sets up
the file system (private ``/tmp``, the system read-only, the broker's own
directories and other servers' homes hidden, its own home and declared
paths bound in), mounts its own ``/proc``, sets resource limits, drops to
the server's user with no capabilities and no_new_privs, restricts itself
with Landlock (file system writes, TCP ports, signals and abstract
sockets beyond its domain) and executes the server. Killing the keeper
kills the server (parent-death signal), and the end of the first process
of a pid namespace is the end of everything in it: a server that forks
and detaches leaves nothing behind. On a host without pid namespaces,
stopping a server that runs under its default account also kills every
process left with that account's uid.

Where the host cannot provide a protection (a container without nesting,
an old kernel, ``[sandbox] disable`` in broker.toml), the server starts
without it and the report says so, unless its definition says ``sandbox =
"strict"``: then it does not start, and the error says which protection
is missing and why. What was applied is reported by the process itself,
just before it executes the server, over a close-on-exec pipe; what the
spawner hands back to the daemon is that report.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import resource
import select
import signal
import stat
import time
from dataclasses import dataclass, field
from typing import Any

from broker.core.servers import Limits
from broker.spawner import kernel

#: seconds a sandbox may take to set up before the start is given up
SETUP_SECONDS = 15.0
#: the size of a server's private /tmp (it is memory)
TMP_BYTES = 512 * 1024 * 1024
#: the shared scratch directories every server gets a private, empty one of
SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")  # noqa: S108 - these are what is replaced, never used
EXIT_SETUP_FAILED = 126


class SandboxError(Exception):
    """The server cannot start: a strict protection is missing, or its definition cannot be met."""


@dataclass(frozen=True)
class Plan:
    """Everything needed to start one instance, decided by the spawner from root's configuration."""

    instance: str
    user: str
    uid: int
    gid: int
    home: str
    command: str
    args: tuple[str, ...]
    cwd: str
    env: dict[str, str]
    network: str = "host"
    connect_ports: tuple[int, ...] | None = None
    #: TCP ports it may listen on (0: an ephemeral one); none by default
    bind_ports: tuple[int, ...] = ()
    read_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    command_sha256: str | None = None
    strict: bool = False
    #: directories the server must not see (the broker's, every server's home)
    hidden: tuple[str, ...] = ()
    #: protections this host must not use ([sandbox] disable)
    disabled: frozenset[str] = frozenset()


@dataclass
class Started:
    """A running instance: its keeper's pid, the daemon's ends of its pipes, what protects it."""

    pid: int
    stdin: int
    stdout: int
    stderr: int
    report: dict[str, Any]


class _Report:
    """What the sandbox did, built while it is set up; a strict plan turns every gap into an error."""

    def __init__(self, plan: Plan) -> None:
        self.strict = plan.strict
        self.protections: dict[str, Any] = {"user": plan.user, "uid": plan.uid}
        self.warnings: list[str] = []

    def lacks(self, protection: str, why: str) -> None:
        message = f"{protection}: {why}"
        if self.strict:
            raise SandboxError(f'sandbox = "strict" and {message}')
        self.warnings.append(message)


# --- the spawner's side -------------------------------------------------------------------------


def launch(plan: Plan) -> Started:
    """Fork the keeper and wait for the server's report (or its error); SandboxError if it did not start."""
    in_r, in_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    st_r, st_w = os.pipe2(os.O_CLOEXEC)
    spawner = os.getpid()
    pid = os.fork()
    if pid == 0:  # the keeper
        code = EXIT_SETUP_FAILED
        try:
            for fd in (in_w, out_r, err_r, st_r):
                os.close(fd)
            code = _keeper(plan, spawner, (in_r, out_w, err_w), st_w)
        except BaseException as exc:  # noqa: BLE001 - a forked child never returns into the spawner
            _say(st_w, {"ok": False, "error": _describe(exc)})
        os._exit(code)
    for fd in (in_r, out_w, err_w, st_w):
        os.close(fd)
    try:
        message = _read_report(st_r, pid)
    except BaseException:
        for fd in (in_w, out_r, err_r):
            os.close(fd)
        kill_keeper(pid)
        raise
    finally:
        os.close(st_r)
    return Started(pid, in_w, out_r, err_r, message)


def _read_report(fd: int, pid: int) -> dict[str, Any]:
    """The last JSON line on the status pipe before it closed (at exec, or at the child's end)."""
    deadline = time.monotonic() + SETUP_SECONDS
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise SandboxError(f"the sandbox was not set up within {SETUP_SECONDS:g} s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        data += chunk
        if len(data) > 1 << 20:
            raise SandboxError("the sandbox's report is too large")
    lines = [line for line in data.split(b"\n") if line.strip()]
    if not lines:
        raise SandboxError("the server's process ended before it reported (see servers.log)")
    try:
        last = json.loads(lines[-1])
    except ValueError:
        raise SandboxError("the sandbox's report is not readable") from None
    if not isinstance(last, dict) or not last.get("ok"):
        error = last.get("error") if isinstance(last, dict) else None
        raise SandboxError(str(error or "the server could not be started"))
    return last


def kill_keeper(pid: int) -> None:
    """SIGKILL the keeper: its server dies with it (parent-death signal), and with the server its namespace."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def kill_uid(uid: int, rounds: int = 50) -> int:
    """SIGKILL every process with ``uid`` among its uids, until none is left; how many were seen."""
    seen = 0
    for _ in range(rounds):
        found = [pid for pid in _pids() if uid in _uids_of(pid)]
        if not found:
            return seen
        seen += len(found)
        for pid in found:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    return seen


def _pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def _uids_of(pid: int) -> tuple[int, ...]:
    """Real, effective, saved and file-system uid of a live process (none if it is gone or a zombie)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"State:") and line.split()[1:2] in ([b"Z"], [b"X"]):
                    return ()  # dead already: nothing to kill, nothing it holds
                if line.startswith(b"Uid:"):
                    return tuple(int(x) for x in line.split()[1:5])
    except (OSError, ValueError):
        return ()
    return ()


# --- the keeper (root, in the spawner's pid namespace) --------------------------------------------


def _keeper(plan: Plan, spawner: int, pipes: tuple[int, int, int], status: int) -> int:
    # nothing of the spawner's but what this start needs: above all not its channel to the daemon
    keep = sorted({*pipes, status})
    low = 3
    for fd in keep:
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, 1 << 16)
    os.setsid()
    kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != spawner:  # the spawner died before the parent-death signal was armed
        return EXIT_SETUP_FAILED
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGPIPE, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    report = _Report(plan)
    flags = 0
    wanted = [("pid_namespace", kernel.CLONE_NEWPID), ("mount_namespace", kernel.CLONE_NEWNS | kernel.CLONE_NEWIPC)]
    if plan.network == "none":
        wanted.append(("network_namespace", kernel.CLONE_NEWNET))
    entered: set[str] = set()
    for name, bit in wanted:
        if name in plan.disabled:
            report.lacks(name, "disabled on this host ([sandbox] disable in broker.toml)")
            continue
        try:
            kernel.unshare(bit)
        except OSError as exc:
            report.lacks(name, f"the kernel refused it ({exc.strerror})")
            continue
        flags |= bit
        entered.add(name)
    lifeline_r, lifeline_w = os.pipe2(os.O_CLOEXEC)
    child = os.fork()
    if child == 0:
        code = EXIT_SETUP_FAILED
        try:
            os.close(lifeline_w)
            _server(plan, report, entered, pipes, status, lifeline_r)
        except BaseException as exc:  # noqa: BLE001 - never back into the keeper's code
            _say(status, {"ok": False, "error": _describe(exc)})
        os._exit(code)
    os.close(lifeline_r)
    for fd in (*pipes, status):
        os.close(fd)
    with contextlib.suppress(OSError):
        kernel.set_name(f"mcp-keep {plan.instance}"[:15])
    while True:
        try:
            _, wait_status = os.waitpid(child, 0)
        except InterruptedError:
            continue
        return os.waitstatus_to_exitcode(wait_status) & 0xFF


# --- the server's process (root until it drops, then the server) ------------------------------------


def _server(
    plan: Plan, report: _Report, entered: set[str], pipes: tuple[int, int, int], status: int, lifeline: int
) -> None:
    for std, fd in zip((0, 1, 2), pipes, strict=True):
        os.dup2(fd, std, inheritable=True)
    for fd in pipes:
        if fd > 2:
            os.close(fd)
    p = report.protections
    p["pid_namespace"] = "pid_namespace" in entered
    ports = ", ".join(map(str, plan.connect_ports or ()))
    p["network"] = f"host, tcp ports {ports}" if ports else plan.network
    p["network_namespace"] = "network_namespace" in entered
    if "mount_namespace" in entered:
        _file_system(plan, report)
    else:
        p.update(private_tmp=False, system_read_only=False, broker_dirs_hidden=False)
    _proc(report, entered)
    _limits(plan.limits, report)
    ruleset = _landlock(plan, report)
    _become(plan)
    kernel.prctl(kernel.PR_SET_NO_NEW_PRIVS, 1)
    p["no_new_privs"] = True
    # armed after the uid change (which clears it); the lifeline catches a keeper that died before
    kernel.prctl(kernel.PR_SET_PDEATHSIG, signal.SIGKILL)
    if select.select([lifeline], [], [], 0)[0]:
        raise SandboxError("the spawner went away during the start")
    os.close(lifeline)
    if ruleset is not None:
        ruleset.restrict()
    os.closerange(3, status)
    os.closerange(status + 1, 2**31 - 1)  # close_range(2): every descriptor above, however high
    os.chdir(plan.cwd)
    target: int | str = plan.command
    if plan.command_sha256 is not None:
        target = _verified(plan.command, plan.command_sha256)
        p["command_sha256"] = "verified"
    else:
        p["command_sha256"] = "not set"
    _say(status, {"ok": True, "protections": p, "warnings": report.warnings})
    try:
        os.execve(target, [plan.command, *plan.args], plan.env)  # noqa: S606 - the configured command, no shell
    except OSError as exc:
        raise SandboxError(f"cannot execute {plan.command}: {exc.strerror}") from None


def trusted_path(path: str) -> str:
    """``path`` with its symbolic links resolved; only root's links are followed.

    A server owns its home and its write paths, so it may plant links there
    between two starts; a link of any other owner on the way is refused, so
    a bind mount or a Landlock rule can never be steered by the server.
    """
    resolved = "/"
    pending = [part for part in reversed(path.split("/")) if part]
    hops = 0
    while pending:
        name = pending.pop()
        if name == ".":
            continue
        if name == "..":
            resolved = os.path.dirname(resolved)
            continue
        candidate = os.path.join(resolved, name)
        try:
            st = os.lstat(candidate)
        except OSError as exc:
            raise SandboxError(f"{path}: {exc.strerror} (a path of its definition)") from None
        if not stat.S_ISLNK(st.st_mode):
            resolved = candidate
            continue
        if st.st_uid != 0:
            raise SandboxError(f"{path}: {candidate} is a symbolic link of uid {st.st_uid}; only root's are followed")
        hops += 1
        if hops > 40:
            raise SandboxError(f"{path}: too many symbolic links")
        target = os.readlink(candidate)
        if target.startswith("/"):
            resolved = "/"
        pending.extend(part for part in reversed(target.split("/")) if part)
    return resolved


def _open_trusted(path: str) -> int:
    """An O_PATH descriptor of a path :func:`trusted_path` resolved, opened without following any link."""
    fd = os.open("/", os.O_PATH | os.O_CLOEXEC)
    try:
        for part in [x for x in path.split("/") if x]:
            nxt = os.open(part, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nxt
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise SandboxError(f"{path}: changed into a symbolic link while the sandbox was set up")
    except OSError as exc:
        os.close(fd)
        raise SandboxError(f"{path}: {exc.strerror} (a path of its definition)") from None
    except BaseException:
        os.close(fd)
        raise
    return fd


def hidden_dirs(hidden: tuple[str, ...] | list[str]) -> list[str]:
    """The directories to hide, each also under the name its links resolve to (a link is no way around it)."""
    out: list[str] = []
    for d in hidden:
        for name in (d, os.path.realpath(d)):
            if name not in out:
                out.append(name)
    return out


def _file_system(plan: Plan, report: _Report) -> None:
    """Private /tmp, the system read-only, hidden directories, binds; all in the new mount namespace."""
    p = report.protections
    kernel.mount(None, "/", None, kernel.MS_REC | kernel.MS_PRIVATE)
    binds: list[tuple[int, str, bool]] = []
    try:
        wanted = [(plan.home, True), *((x, True) for x in plan.write_paths), *((x, False) for x in plan.read_paths)]
        for path, writable in wanted:
            resolved = trusted_path(path)
            binds.append((_open_trusted(resolved), resolved, writable))
        try:
            kernel.make_tree_read_only("/")
            p["system_read_only"] = True
        except OSError as exc:
            p["system_read_only"] = False
            report.lacks("mount_namespace", f"the system cannot be made read-only ({exc.strerror})")
        tmps = [d for d in SCRATCH if _is_dir(d)]
        size = min(TMP_BYTES, plan.limits.memory or TMP_BYTES)
        for d in tmps:
            kernel.mount("tmpfs", d, "tmpfs", kernel.MS_NOSUID | kernel.MS_NODEV, f"mode=1777,size={size}")
        p["private_tmp"] = True
        hidden = [d for d in hidden_dirs(plan.hidden) if os.path.isdir(d) and not os.path.islink(d)]
        for d in hidden:
            hide = kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC
            kernel.mount("tmpfs", d, "tmpfs", hide, "mode=0755,size=64k")
        for fd, path, writable in binds:
            _mount_point(path, fd)
            target = _open_trusted(path)  # onto what the name is now, never through a link
            try:
                kernel.mount(f"/proc/self/fd/{fd}", f"/proc/self/fd/{target}", None, kernel.MS_BIND | kernel.MS_REC)
            finally:
                os.close(target)
            keep = _mount_flags(path)
            if writable:
                kernel.mount(None, path, None, kernel.MS_REMOUNT | kernel.MS_BIND | keep)
            else:
                kernel.mount(None, path, None, kernel.MS_REMOUNT | kernel.MS_BIND | kernel.MS_RDONLY | keep)
        for d in hidden:
            kernel.mount(None, d, None, kernel.MS_REMOUNT | kernel.MS_RDONLY | hide)
        p["broker_dirs_hidden"] = True
        p["writable"] = [path for _fd, path, writable in binds if writable]
    finally:
        for fd, _path, _w in binds:
            os.close(fd)


def _is_dir(path: str) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _mount_point(path: str, source_fd: int) -> None:
    """Make ``path`` exist (inside a tmpfs that covers it) as a directory or file, like its source."""
    if os.path.lexists(path):
        return
    is_dir = stat.S_ISDIR(os.fstat(source_fd).st_mode)
    os.makedirs(path if is_dir else os.path.dirname(path), mode=0o755, exist_ok=True)
    if not is_dir:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


def _mount_flags(path: str) -> int:
    """nosuid, nodev, noexec of the mount at ``path`` (a bind remount must keep them)."""
    st = os.statvfs(path)
    flags = 0
    if st.f_flag & os.ST_NOSUID:
        flags |= kernel.MS_NOSUID
    if st.f_flag & os.ST_NODEV:
        flags |= kernel.MS_NODEV
    if st.f_flag & os.ST_NOEXEC:
        flags |= kernel.MS_NOEXEC
    return flags


def _proc(report: _Report, entered: set[str]) -> None:
    """A /proc of its own: only its pid namespace's processes, and only its own uid's (hidepid)."""
    if "mount_namespace" not in entered:
        return
    try:
        kernel.mount("proc", "/proc", "proc", kernel.MS_NOSUID | kernel.MS_NODEV | kernel.MS_NOEXEC, "hidepid=2")
        report.protections["own_proc"] = True
    except OSError as exc:
        report.protections["own_proc"] = False
        report.lacks("pid_namespace", f"no /proc of its own could be mounted ({exc.strerror})")


def _limits(limits: Limits, report: _Report) -> None:
    applied: dict[str, int | None] = {}
    for name, which in (
        ("memory", resource.RLIMIT_DATA),
        ("processes", resource.RLIMIT_NPROC),
        ("open_files", resource.RLIMIT_NOFILE),
        ("file_size", resource.RLIMIT_FSIZE),
    ):
        value = getattr(limits, name)
        limit = resource.RLIM_INFINITY if value is None else value
        try:
            resource.setrlimit(which, (limit, limit))
        except ValueError:  # above the hard limit this host (a container) lets even root set: its limit holds
            hard = resource.getrlimit(which)[1]
            resource.setrlimit(which, (hard, hard))
            asked = value or "unlimited"
            report.warnings.append(f"rlimits: {name} is {hard}, the host's ceiling, not the {asked} asked")
            value = None if hard == resource.RLIM_INFINITY else hard
        applied[name] = value
    report.protections["rlimits"] = applied


def readable_roots(hidden: list[str] | tuple[str, ...], top: str = "/") -> list[str]:
    """Directories whose subtrees together are everything under ``top`` except ``hidden`` (and symlinks).

    Landlock grants by subtree and cannot subtract one: to keep ``/etc`` but
    not ``/etc/mcp-privsep`` readable, every sibling on the way is granted
    instead of the parent.
    """
    roots = {top}
    for h in sorted({os.path.normpath(x) for x in hidden}):
        owner = next((r for r in roots if h == r or h.startswith(r.rstrip("/") + "/")), None)
        if owner is None:
            continue
        roots.discard(owner)
        current = owner
        while current != h:
            rest = h[len(current.rstrip("/")) + 1 :]
            step = os.path.join(current, rest.split("/", 1)[0])
            try:
                names = os.listdir(current)
            except OSError:
                names = []
            for n in names:
                path = os.path.join(current, n)
                if path != step and not os.path.islink(path):
                    roots.add(path)
            current = step
    return sorted(roots)


def _landlock(plan: Plan, report: _Report) -> kernel.Ruleset | None:
    """The ruleset to enforce once the process is the server's (built as root: it opens the paths)."""
    p = report.protections
    p["landlock"] = 0
    if "landlock" in plan.disabled:
        report.lacks("landlock", "disabled on this host ([sandbox] disable in broker.toml)")
        return None
    abi = kernel.landlock_abi()
    if abi < 1:
        report.lacks("landlock", "the kernel has no Landlock (or it is disabled)")
        return None
    fs = kernel.fs_rights(abi)
    net = 0
    if abi >= 4:
        # no TCP listening unless bind_ports says so: a server must not take over the loopback port of an
        # HTTP server the daemon sends credentials to; connecting is limited for none and connect_ports
        net = kernel.NET_BIND_TCP
        if plan.network == "none" or plan.connect_ports:
            net |= kernel.NET_CONNECT_TCP
    elif plan.connect_ports:
        report.lacks("landlock", f"ABI {abi} cannot limit TCP ports (4 is needed)")
    scoped = kernel.SCOPE_SIGNAL | kernel.SCOPE_ABSTRACT_UNIX_SOCKET if abi >= 6 else 0
    ruleset = kernel.Ruleset(abi, fs, net, scoped)
    try:
        device = (kernel.FS_READ_FILE | kernel.FS_WRITE_FILE | (kernel.FS_IOCTL_DEV if abi >= 5 else 0)) & fs
        grants = [(root, kernel.FS_READ & fs) for root in readable_roots(hidden_dirs(plan.hidden))]
        grants += [("/dev", device), ("/proc", (kernel.FS_READ | kernel.FS_WRITE_FILE) & fs)]
        grants += [(d, fs) for d in (*SCRATCH, plan.home, *(trusted_path(x) for x in plan.write_paths))]
        grants += [(trusted_path(x), kernel.FS_READ & fs) for x in plan.read_paths]  # one in a hidden directory too
        for path, rights in grants:
            try:
                is_dir = stat.S_ISDIR(os.stat(path).st_mode)
            except OSError:
                continue  # gone, or unreachable: nothing to grant
            ruleset.allow_beneath(path, rights if is_dir else rights & kernel.FILE_RIGHTS)
        for port in plan.connect_ports or ():
            ruleset.allow_port(port, kernel.NET_CONNECT_TCP)
        if net:
            for port in plan.bind_ports:
                ruleset.allow_port(port, kernel.NET_BIND_TCP)
    except BaseException:
        os.close(ruleset.fd)
        raise
    p["landlock"] = abi
    p["landlock_net"] = bool(net)
    p["tcp_listen"] = list(plan.bind_ports) if net else "any"
    p["landlock_scope"] = bool(scoped)
    if plan.network == "none" and not net and not p["network_namespace"]:
        report.lacks("network_namespace", "neither a network namespace nor Landlock (ABI 4) can cut it off")
    return ruleset


def _become(plan: Plan) -> None:
    """The server's user and group, no supplementary groups, no capabilities (the bounding set cleared too)."""
    os.setgroups([])
    os.setresgid(plan.gid, plan.gid, plan.gid)
    kernel.drop_bounding_set()
    os.setresuid(plan.uid, plan.uid, plan.uid)
    if os.getuid() != plan.uid or os.geteuid() != plan.uid or os.getegid() != plan.gid:
        raise SandboxError("the server's user could not be taken")


def _verified(command: str, expected: str) -> int:
    """A descriptor of ``command`` whose content hashes to ``expected`` (it stays open for a script's /dev/fd)."""
    fd = os.open(command, os.O_RDONLY)
    digest = hashlib.sha256()
    while chunk := os.read(fd, 1 << 20):
        digest.update(chunk)
    if digest.hexdigest() != expected:
        os.close(fd)
        raise SandboxError(f"{command}: its sha256 is {digest.hexdigest()}, not the command_sha256 configured")
    os.lseek(fd, 0, os.SEEK_SET)
    os.set_inheritable(fd, True)  # a #! script is run by name as /dev/fd/N: the descriptor must survive the exec
    return fd


def _say(fd: int, message: dict[str, Any]) -> None:
    data = (json.dumps(message) + "\n").encode()
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(fd, data) :]


def _describe(exc: BaseException) -> str:
    if isinstance(exc, SandboxError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror or errno.errorcode.get(exc.errno or 0, exc)}"
    return f"{type(exc).__name__}: {exc}"
