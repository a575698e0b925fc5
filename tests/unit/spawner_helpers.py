"""Shared helpers of the spawner's privileged tests: throwaway users, a staging root, a probe, process scans.

Staging roots live under ``/srv``, not ``/tmp``: every server gets a
private, empty ``/tmp`` (and ``/var/tmp``, ``/dev/shm``), so a script or a
home under ``/tmp`` would not exist for it.

The probe (:data:`PROBE`) is the server of most tests: a small Python
script, run as ``/usr/bin/python3 -I PROBE TASKS-JSON``, that looks at its
own situation from inside the sandbox (ids, capabilities, mounts, what it
can read, write, connect to, signal, trace) and prints one JSON report on
its standard output. Tests assert on what it *sees*.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any

#: the interpreter every test server runs with (outside the venv: it is what a server's account may execute)
PYTHON = "/usr/bin/python3"
#: where staging roots are made (outside /tmp: see the module docstring)
STAGING_PARENT = "/srv"
#: throwaway locked system accounts of these tests (left in place, like any system user)
USER1 = "mcp-srv-ut1"
USER2 = "mcp-srv-ut2"
#: a per-caller instance's default account (server "utpc", agent "utagent"): server_user_for("utpc", "utagent")
USER_PC = "mcp-srv-utpc.utagent"
#: an account with a login shell: a server must never run as it
USER_LOGIN = "mcp-ut-login"


def ensure_user(name: str, shell: str = "/usr/sbin/nologin") -> pwd.struct_passwd:
    """A locked system user and group ``name`` without a home (created once, reused after)."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--user-group", "--no-create-home", "--shell", shell, name],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(name)


@contextlib.contextmanager
def staging(prefix: str) -> Iterator[str]:
    """A fresh root-owned 0755 directory under /srv, removed at the end."""
    base = tempfile.mkdtemp(prefix=prefix, dir=STAGING_PARENT)
    os.chmod(base, 0o755)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def write(path: str, text: str, mode: int = 0o644, uid: int = 0, gid: int = 0) -> str:
    os.makedirs(os.path.dirname(path), mode=0o755, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


def read_all(fd: int, timeout: float = 15.0) -> bytes:
    """Everything from ``fd`` until its end (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no end of output within {timeout} s; got {data[-500:]!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            return data
        data += chunk


def read_line(fd: int, timeout: float = 15.0) -> bytes:
    """One line from ``fd`` (read byte by byte: nothing after it is consumed)."""
    deadline = time.monotonic() + timeout
    data = b""
    while not data.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no line within {timeout} s; got {data!r}")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 1)
        if not chunk:
            break
        data += chunk
    return data


# --- processes ---------------------------------------------------------------------------------


def _status(pid: int) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                out[key] = value.strip()
    except OSError:
        return {}
    return out


def all_pids() -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


def uids_of(pid: int) -> tuple[int, ...]:
    uid = _status(pid).get("Uid")
    return tuple(int(x) for x in uid.split()) if uid else ()


def live_pids_of_uid(uid: int) -> list[int]:
    """Processes (zombies excluded: they hold nothing) with ``uid`` among their uids."""
    found = []
    for pid in all_pids():
        st = _status(pid)
        if not st or st.get("State", "").startswith(("Z", "X")):
            continue
        if uid in (int(x) for x in st.get("Uid", "").split()):
            found.append(pid)
    return found


def wait_no_uid(uid: int, timeout: float = 3.0) -> list[int]:
    """Wait until no live process has ``uid``; what is left after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        left = live_pids_of_uid(uid)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def wait_until(predicate: Callable[[], bool], timeout: float) -> bool:
    """Whether ``predicate`` holds within ``timeout`` seconds (polled)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return [x.decode(errors="replace") for x in fh.read().split(b"\0") if x]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (by parent links, one scan of /proc)."""
    children: dict[int, list[int]] = {}
    for p in all_pids():
        st = _status(p)
        if not st or st.get("State", "").startswith(("Z", "X")):
            continue
        with contextlib.suppress(KeyError, ValueError):
            children.setdefault(int(st["PPid"]), []).append(p)
    out: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, ChildProcessError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)


def listener(port: int = 0) -> socket.socket:
    """A TCP listener on 127.0.0.1 (the kernel completes connections in its backlog)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(16)
    return s


def parse_report(out: bytes, err: bytes = b"") -> dict[str, Any]:
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines, f"the probe printed nothing; stderr: {err.decode(errors='replace')[-2000:]}"
    report = json.loads(lines[-1])
    assert isinstance(report, dict)
    return report


# --- the probe -----------------------------------------------------------------------------------

PROBE = r"""
import ctypes, errno, json, os, resource, socket, sys

tasks = json.loads(sys.argv[1]) if len(sys.argv) > 1 else {}


def err(exc):
    return errno.errorcode.get(exc.errno, str(exc.errno)) if isinstance(exc, OSError) and exc.errno else repr(exc)


def attempt(fn):
    try:
        value = fn()
    except Exception as exc:
        return err(exc)
    return "ok" if value is None else {"ok": value}


def create(path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)


def read(path):
    with open(path, "rb") as fh:
        return fh.read(200).decode(errors="replace")


def connect(host, port):
    with socket.create_connection((host, port), timeout=3):
        return None


def bind_tcp():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))


def abstract(name):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(3)
        s.connect("\0" + name)


libc = ctypes.CDLL(None, use_errno=True)
libc.ptrace.argtypes = (ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p)
libc.ptrace.restype = ctypes.c_long


def ptrace(pid):
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))
    os.waitpid(pid, 0)
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH


def fill(path, size):
    with open(path, "wb") as fh:
        fh.write(b"\0" * size)


def mounts():
    out = []
    with open("/proc/self/mountinfo") as fh:
        for line in fh:
            left, _, right = line.partition(" - ")
            f = left.split()
            r = right.split()
            out.append({"point": f[4], "options": f[5], "fstype": r[0], "super": r[2] if len(r) > 2 else ""})
    return out


status = {}
with open("/proc/self/status") as fh:
    for line in fh:
        k, _, v = line.partition(":")
        status[k] = v.strip()

limits = {}
for name in ("RLIMIT_DATA", "RLIMIT_NPROC", "RLIMIT_NOFILE", "RLIMIT_FSIZE"):
    soft, hard = resource.getrlimit(getattr(resource, name))
    limits[name] = [None if soft == resource.RLIM_INFINITY else soft, None if hard == resource.RLIM_INFINITY else hard]

report = {
    "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(), "egid": os.getegid(),
    "groups": os.getgroups(), "pid": os.getpid(), "ppid": os.getppid(),
    "status": {k: status.get(k) for k in ("NoNewPrivs", "CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "Seccomp")},
    "proc_pids": sorted(int(n) for n in os.listdir("/proc") if n.isdigit()),
    "mounts": mounts(), "rlimits": limits, "cwd": os.getcwd(), "env": dict(os.environ),
    "ifaces": sorted(name for _, name in socket.if_nameindex()),
    "tmp": attempt(lambda: sorted(os.listdir("/tmp"))),
    "write": {p: attempt(lambda p=p: create(p)) for p in tasks.get("write", [])},
    "read": {p: attempt(lambda p=p: read(p)) for p in tasks.get("read", [])},
    "listdir": {p: attempt(lambda p=p: sorted(os.listdir(p))) for p in tasks.get("listdir", [])},
    "kill": {str(pid): attempt(lambda pid=pid: os.kill(pid, 0)) for pid in tasks.get("kill", [])},
    "ptrace": {str(pid): attempt(lambda pid=pid: ptrace(pid)) for pid in tasks.get("ptrace", [])},
    "proc_of": {str(pid): os.path.exists(f"/proc/{pid}") for pid in tasks.get("kill", []) + tasks.get("ptrace", [])},
    "connect": {str(port): attempt(lambda port=port: connect("127.0.0.1", port)) for port in tasks.get("connect", [])},
    "abstract": {n: attempt(lambda n=n: abstract(n)) for n in tasks.get("abstract", [])},
    "bind_tcp": attempt(bind_tcp) if tasks.get("bind_tcp") else None,
    "fill": {p: attempt(lambda p=p, n=n: fill(p, n)) for p, n in tasks.get("fill", [])},
}
print(json.dumps(report), flush=True)
"""

#: a server that leaves a detached grandchild behind (setsid + double fork); says so, then "ready"
TREE = r"""
import os, sys, time

r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.close(r)
        os.write(w, b"grandchild %d\n" % os.getpid())
        os.close(w)
        time.sleep(300)
        os._exit(0)
    os._exit(0)
os.close(w)
line = os.read(r, 100)
sys.stdout.write(line.decode())
sys.stdout.write("ready\n")
sys.stdout.flush()
time.sleep(300)
"""

#: a minimal stdio server for the spawner's tests: one JSON line about itself, then it lives until stdin ends
ECHO = r"""
import errno, json, os, sys


def attempt(fn):
    try:
        return {"ok": fn()}
    except OSError as exc:
        return errno.errorcode.get(exc.errno, str(exc.errno))


home = os.environ.get("HOME", "/nonexistent")
root = home.rsplit("/var/lib/mcp-privsep-servers/", 1)[0]  # the staging root, as its home's path shows it
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "env": dict(os.environ), "cwd": os.getcwd(),
                  "argv": sys.argv, "homes": attempt(lambda: sorted(os.listdir(os.path.dirname(home)))),
                  "gate_users": attempt(lambda: open(root + "/etc/mcp-privsep/gate-users").read()),
                  "etc": attempt(lambda: sorted(os.listdir(root + "/etc/mcp-privsep")))}), flush=True)
for line in sys.stdin:
    sys.stdout.write(line)
    sys.stdout.flush()
"""
