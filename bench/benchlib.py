"""Shared helpers for ``bench.py``, ``soak.py`` and ``profile_gate.py``.

Timing and statistics, running commands as the agent user (``subprocess``
with ``user=``/``group=``/``extra_groups=[]`` and a minimal environment, so no
``runuser`` or login overhead is measured), reading resident memory from
``/proc``, talking to ``gate.sock`` and ``admin.sock`` as root, and the
reversible changes the benchmark makes to an installation: an allowlist
swapped atomically (the original is kept as a hard link and renamed back,
so owner, mode and inode come back exactly), extra servers in
``servers.d/bench-*.toml``, and a sudoers drop-in for the mcporter precedent.
Every change is undone in ``finally`` blocks, and ``recover()`` undoes what a
killed run left behind.

Only the standard library and ``broker`` (the installation's own code) are
used: ``make bench`` runs with the installation's virtualenv, which has no
test extras.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import pwd
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from broker.core import wire
from broker.core.paths import BROKER_USER, GATE_USER, Paths, gate_user_for

#: the environment every agent process gets: nothing of ours leaks into it
AGENT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
#: suffix of the hard link that keeps the original allowlist during a swap
BACKUP_SUFFIX = ".bench-orig"
#: servers.d files the benchmark adds (and removes)
SERVERS_D_PREFIX = "bench-"
#: the sudoers drop-in of the mcporter precedent (no dot: sudo would skip it)
PRECEDENT_SUDOERS = "/etc/sudoers.d/mcp-privsep-bench-precedent"
RESULTS = Path(__file__).resolve().parent / "results"


class BenchError(Exception):
    """A precondition or a measurement failed; the message says which."""


# --- statistics ----------------------------------------------------------------------


def percentile(samples: list[float], q: float) -> float:
    """Linear-interpolated percentile (q in 0..100) of unsorted samples."""
    if not samples:
        return math.nan
    xs = sorted(samples)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summary(samples_ms: list[float]) -> dict[str, Any]:
    """n, median, p95, p99, mean, min, max of millisecond samples (rounded to µs)."""
    if not samples_ms:
        return {"n": 0}
    return {
        "n": len(samples_ms),
        "median_ms": round(percentile(samples_ms, 50), 3),
        "p95_ms": round(percentile(samples_ms, 95), 3),
        "p99_ms": round(percentile(samples_ms, 99), 3),
        "mean_ms": round(sum(samples_ms) / len(samples_ms), 3),
        "min_ms": round(min(samples_ms), 3),
        "max_ms": round(max(samples_ms), 3),
    }


# --- the installation under test -------------------------------------------------------


@dataclass
class Target:
    """An installation (``/`` or a staging root) and the agent user that calls through it."""

    root: str
    agent: str
    paths: Paths = field(init=False)
    agent_pw: pwd.struct_passwd = field(init=False)

    def __post_init__(self) -> None:
        self.paths = Paths(self.root)
        try:
            self.agent_pw = pwd.getpwnam(self.agent)
        except KeyError:
            raise BenchError(f"agent user {self.agent!r} does not exist (run 'make demo' first)") from None

    @property
    def gate_user(self) -> str:
        """The agent's own gate user (the sudo target of its calls), as the installation's map names it."""
        from broker.core import agents

        try:
            found = agents.load(self.paths.gate_users).get(self.agent)
        except Exception:  # noqa: BLE001 - an unreadable map: the default name is what install writes
            found = None
        return found or gate_user_for(self.agent)

    @property
    def ctl(self) -> list[str]:
        return [self.paths.brokerctl, "--root", self.paths.root]

    def as_agent(self, argv: list[str], *, stdin: bytes | None = None, timeout: float = 120) -> Run:
        """Run ``argv`` as the agent user; return exit code, output and wall time."""
        return run(argv, user=self.agent_pw, stdin=stdin, timeout=timeout)

    def mcp(self, *args: str, timeout: float = 120) -> Run:
        return self.as_agent([self.paths.mcp, *args], timeout=timeout)

    def ctl_run(self, *args: str, timeout: float = 60) -> Run:
        return run([*self.ctl, *args], timeout=timeout)

    def status(self) -> dict[str, Any]:
        """``mcp-brokerctl status --json``; BenchError when the daemon does not answer."""
        r = self.ctl_run("status", "--json")
        if r.code != 0:
            raise BenchError(f"the daemon does not answer 'mcp-brokerctl status': {r.err.strip() or r.code}")
        result: dict[str, Any] = json.loads(r.out)
        return result

    def daemon_pid(self) -> int:
        return int(self.status()["pid"])

    def effective_allowlist(self) -> str:
        """The allowlist file that applies to the agent (its own file replaces the global one)."""
        own = self.paths.user_allowlist(self.agent)
        return own if os.path.exists(own) else self.paths.allowlist

    def wait_servers(self, names: list[str], timeout: float = 60) -> dict[str, str]:
        """Wait until every named server is up; return the last seen states."""
        deadline = time.monotonic() + timeout
        states: dict[str, str] = {}
        while time.monotonic() < deadline:
            states = {s["name"]: s["state"] for s in self.status()["servers"]}
            if all(states.get(n) == "up" for n in names):
                return states
            time.sleep(0.2)
        raise BenchError(f"servers not up after {timeout:g} s: {states}")


@dataclass
class Run:
    code: int
    out: str
    err: str
    ms: float


def run(
    argv: list[str],
    *,
    user: pwd.struct_passwd | None = None,
    stdin: bytes | None = None,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> Run:
    """Run a command (as ``user`` when given, with a minimal environment) and time it."""
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    started = time.perf_counter()
    proc = subprocess.run(
        argv,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        env=dict(AGENT_ENV) if env is None else env,
        cwd="/",
        timeout=timeout,
        check=False,
        **kwargs,
    )
    ms = (time.perf_counter() - started) * 1000
    return Run(proc.returncode, proc.stdout.decode(errors="replace"), proc.stderr.decode(errors="replace"), ms)


def spawn_timed(
    argv: list[str],
    user: pwd.struct_passwd | None = None,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
) -> tuple[float, int, bytes]:
    """Spawn, wait, return (ms, exit code, stdout) with as little harness overhead as possible."""
    kwargs: dict[str, Any] = {}
    if user is not None:
        kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    started = time.perf_counter()
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL if stdin is None else subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=AGENT_ENV if env is None else env,
        cwd="/",
        **kwargs,
    )
    out, _ = proc.communicate(stdin)
    ms = (time.perf_counter() - started) * 1000
    return ms, proc.returncode, out


# --- memory --------------------------------------------------------------------------


def _ppid_map() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return parents


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it."""
    parents = _ppid_map()
    found = [pid]
    frontier = [pid]
    while frontier:
        nxt = [p for p, pp in parents.items() if pp in frontier and p not in found]
        found.extend(nxt)
        frontier = nxt
    return found


def vmrss_kb(pid: int) -> int:
    """VmRSS of one process in KiB (0 when it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def tree_rss(pid: int) -> dict[str, Any]:
    """Resident memory of a process tree: total, the root process, and each child."""
    pids = descendants(pid)
    per = {p: vmrss_kb(p) for p in pids}
    return {
        "total_kib": sum(per.values()),
        "daemon_kib": per.get(pid, 0),
        "processes": len(pids),
        "children": [{"pid": p, "rss_kib": per[p], "cmd": cmdline(p)[:120]} for p in pids if p != pid],
    }


# --- gate.sock as root -----------------------------------------------------------------


_CONNECT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [b"x"], [s.fileno()])
"""


class GateConnection:
    """One connection to gate.sock, made by the agent's gate user (the only peer the daemon serves there)."""

    def __init__(self, target: Target, timeout: float = 60) -> None:
        pw = pwd.getpwnam(target.gate_user)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            subprocess.run(
                ["/usr/bin/python3", "-I", "-c", _CONNECT, target.paths.gate_sock, str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                user=pw.pw_uid,
                group=pw.pw_gid,
                extra_groups=[],
                cwd="/",
                env={"PATH": "/usr/bin:/bin"},
                check=True,
                capture_output=True,
                timeout=timeout,
            )
            _msg, fds, _flags, _addr = socket.recv_fds(mine, 1, 1)
        except (OSError, subprocess.SubprocessError) as exc:
            raise BenchError(f"cannot connect to gate.sock as {target.gate_user}: {exc}") from None
        finally:
            mine.close()
            theirs.close()
        self.sock = socket.socket(fileno=fds[0])
        self.sock.settimeout(timeout)

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        self.sock.sendall(wire.encode_frame(message, wire.MAX_REQUEST_BYTES))
        header = self._exact(4)
        return wire.decode_payload(self._exact(wire.frame_length(header, wire.MAX_RESPONSE_BYTES)))

    def _exact(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self.sock.recv(min(n, 1 << 20))
            if not chunk:
                raise BenchError("the daemon closed the connection")
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self.sock.close()


def call_message(target: Target, tool: str, text: str) -> dict[str, Any]:
    """A ``call`` request as the gate would send it for the agent."""
    return wire.request(
        "call",
        tool=tool,
        kv=[["text", text]],
        args=None,
        timeout=None,
    )


# --- reversible changes ----------------------------------------------------------------


def write_file(path: str, text: str, uid: int, gid: int, mode: int) -> None:
    """Write ``text`` to ``path`` atomically with the given owner and mode."""
    tmp = f"{path}.bench-tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        data = text.encode()
        while data:
            data = data[os.write(fd, data) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


@contextlib.contextmanager
def swapped_allowlist(path: str) -> Iterator[Any]:
    """Keep the original allowlist aside (a hard link) and yield a setter; restore it on exit.

    The setter writes root:mcp-gate 0640 content atomically (rename), as an
    operator's tool would. On exit the original inode is renamed back.
    """
    backup = path + BACKUP_SUFFIX
    if os.path.exists(backup):
        raise BenchError(f"{backup} exists: a previous run was interrupted; run again to restore it first")
    st = os.stat(path)
    os.link(path, backup)

    def put(text: str) -> None:
        write_file(path, text, 0, st.st_gid, 0o640)

    try:
        yield put
    finally:
        os.replace(backup, path)


def allowlist_text(lines: int, must_have: tuple[str, ...] = ("demo.echo",)) -> str:
    """A valid allowlist of exactly ``lines`` entries, including ``must_have``."""
    body = list(must_have)
    i = 0
    while len(body) < lines:
        body.append(f"benchpad.tool_{i:06d}")
        i += 1
    # the entries that matter sit in the middle, as in a real long file
    mid = len(body) // 2
    padded = body[len(must_have) : mid + len(must_have)] + list(must_have) + body[mid + len(must_have) :]
    return "# mcp-bench allowlist (temporary; the original is restored after the run)\n" + "\n".join(padded) + "\n"


@contextlib.contextmanager
def extra_servers(target: Target, names: list[str], command: str, args: list[str]) -> Iterator[str]:
    """Add stdio servers through ``servers.d/bench-extra.toml`` + reload; remove them on exit."""
    broker = pwd.getpwnam(BROKER_USER)
    path = f"{target.paths.servers_d}/{SERVERS_D_PREFIX}extra.toml"
    text = "# mcp-bench: temporary servers (removed after the run)\n"
    for name in names:
        text += f"\n[servers.{name}]\ncommand = {json.dumps(command)}\nargs = {json.dumps(args)}\n"
    write_file(path, text, 0, broker.pw_gid, 0o640)
    try:
        r = target.ctl_run("reload")
        if r.code != 0:
            raise BenchError(f"mcp-brokerctl reload failed: {r.err.strip()}")
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        target.ctl_run("reload")


def recover(target: Target, log: Any = print) -> None:
    """Undo what an interrupted run may have left: a swapped allowlist, bench servers, sudoers."""
    changed = False
    for path in (target.paths.allowlist, target.paths.user_allowlist(target.agent)):
        backup = path + BACKUP_SUFFIX
        if os.path.exists(backup):
            os.replace(backup, path)
            log(f"recovered {path} from an interrupted run")
    try:
        leftovers = [n for n in os.listdir(target.paths.servers_d) if n.startswith(SERVERS_D_PREFIX)]
    except FileNotFoundError:
        leftovers = []
    for name in leftovers:
        os.unlink(f"{target.paths.servers_d}/{name}")
        log(f"removed {target.paths.servers_d}/{name} left by an interrupted run")
        changed = True
    if changed:
        target.ctl_run("reload")
    if os.path.exists(PRECEDENT_SUDOERS):
        os.unlink(PRECEDENT_SUDOERS)
        log(f"removed {PRECEDENT_SUDOERS} left by an interrupted run")


def terminate_as_exit() -> None:
    """Turn SIGTERM/SIGHUP into SystemExit so every ``finally`` restores what it changed."""

    def handler(signum: int, _frame: Any) -> None:
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)


# --- machine and versions ---------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split("MemTotal:", 1)[1].split()[0])
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu or platform.processor() or "unknown",
        "memory_mib": mem_kib // 1024,
        "kernel": platform.release(),
        "machine": platform.machine(),
        "hostname": platform.node(),
    }


def _first_line(argv: list[str]) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "n/a"
    text = (proc.stdout or proc.stderr).strip()
    return text.splitlines()[0] if text else "n/a"


def versions() -> dict[str, Any]:
    from importlib import metadata

    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "n/a"

    sudo = _first_line(["sudo", "--version"])
    match = re.search(r"version\s+(\S+)", sudo)
    return {
        "python_bench": platform.python_version(),
        "python_gate": _first_line(["/usr/bin/python3", "--version"]).replace("Python ", ""),
        "mcp": dist("mcp"),
        "mcp_privsep": dist("mcp-privsep"),
        "sudo": match.group(1) if match else sudo,
        "node": _first_line(["node", "--version"]),
        "npm": _first_line(["npm", "--version"]),
        "bench_python_executable": sys.executable,
    }


def users() -> dict[str, int]:
    return {name: pwd.getpwnam(name).pw_uid for name in (GATE_USER, BROKER_USER)}
