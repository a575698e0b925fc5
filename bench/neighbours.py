"""The hostile-neighbour phase of ``make bench``: one agent stalls and floods, the other keeps calling.

Two agent users of the same installation: the bench's agent (the victim)
and ``mcp-bench-attacker`` (created with ``useradd --system`` and
``mcp-brokerctl install --agent`` when missing, with its own allowlist
``allowed-actions.d/mcp-bench-attacker.txt``: demo.echo, demo.add, demo.big;
both are left installed). In one run:

1. the victim's ``mcp call demo.echo`` N times, unloaded: p50/p95;
2. the daemon's own RSS (the ``mcp-brokerd`` process, VmRSS), idle;
3. the attacker opens stuck ``mcp stdio`` sessions up to its session cap
   (``max_sessions`` of broker.toml, ``[limits.NAME]`` first, default 16),
   each fed ``initialize`` and 16 ``tools/call`` of ``demo.big`` (450,000
   bytes each) and its stdout never read, and two attacker processes call
   ``mcp call demo.add`` in a loop; the victim makes the same N calls, and
   the daemon's RSS is sampled meanwhile (max);
4. everything is stopped (process groups killed), 3 s later RSS "after";
5. a second stuck cycle like 3-4; growth = after2 - after1.

Not a timed test: it prints the loaded/unloaded p95 ratio (target <= 3x),
RSS during against idle (target <= idle + 64 MiB), the second cycle's
growth (target < 5 MiB) and the attacker's results by exit code (75: try
again later, the documented refusal).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import signal
import subprocess
import threading
import time
import tomllib
from pathlib import Path
from typing import Any

from benchlib import AGENT_ENV, BenchError, Target, run, spawn_timed, summary, vmrss_kb, write_file
from startup import INITIALIZE

from broker.core.paths import BROKER_USER

ATTACKER = "mcp-bench-attacker"
ATTACKER_TOOLS = ("demo.echo", "demo.add", "demo.big")
DEFAULT_MAX_SESSIONS = 16
BIG_SIZE = 450_000
BIG_CALLS = 16
FLOODERS = 2
SETTLE_S = 6.0  # more than the daemon's 5 s memory trim
MIB = 1024

#: one attacker process calling demo.add until SIGTERM, then its exit codes as JSON
FLOOD = r"""
import json, os, signal, sys
mcp = sys.argv[1]
env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
stop = []
signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
codes = {}
null = [(os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, "/dev/null", os.O_WRONLY, 0),
        (os.POSIX_SPAWN_OPEN, 2, "/dev/null", os.O_WRONLY, 0)]
while not stop:
    pid = os.posix_spawn(mcp, [mcp, "call", "demo.add", "a=1", "b=1"], env, file_actions=null)
    _, status = os.waitpid(pid, 0)
    code = str(os.waitstatus_to_exitcode(status))
    codes[code] = codes.get(code, 0) + 1
json.dump(codes, sys.stdout)
"""


def _line(obj: dict[str, Any]) -> bytes:
    return (json.dumps(obj) + "\n").encode()


def stuck_payload(calls: int = BIG_CALLS, size: int = BIG_SIZE) -> bytes:
    out = INITIALIZE + _line({"jsonrpc": "2.0", "method": "notifications/initialized"})
    for i in range(calls):
        params = {"name": "demo.big", "arguments": {"size": size}}
        out += _line({"jsonrpc": "2.0", "id": 100 + i, "method": "tools/call", "params": params})
    return out


# --- the attacker agent ---------------------------------------------------------------------


def ensure_attacker(t: Target, name: str = ATTACKER) -> Target:
    """The second agent user, installed as an agent with its own allowlist (idempotent)."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        r = run(["/usr/sbin/useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", name], timeout=60)
        if r.code != 0:
            raise BenchError(f"useradd {name} failed: {r.err.strip()}") from None
    attacker = Target(t.root, name)
    if not os.path.exists(attacker.paths.gate_users) or name not in Path(attacker.paths.gate_users).read_text():
        root_env = {**AGENT_ENV, "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        r = run([*attacker.ctl, "install", "--agent", name], timeout=300, env=root_env)
        if r.code != 0:
            raise BenchError(f"mcp-brokerctl install --agent {name} failed: {r.err.strip() or r.out.strip()}")
    path = attacker.paths.user_allowlist(name)
    text = "# mcp-bench: the hostile-neighbour phase's attacker\n" + "\n".join(ATTACKER_TOOLS) + "\n"
    if not os.path.exists(path) or Path(path).read_text() != text:
        write_file(path, text, 0, os.stat(attacker.paths.allowlist_d).st_gid, 0o640)
    r = attacker.mcp("call", "demo.add", "a=1", "b=1", timeout=60)
    if r.code != 0:
        raise BenchError(f"mcp call demo.add as {name} fails (exit {r.code}): {r.err.strip()}")
    return attacker


def session_cap(t: Target, agent: str) -> int:
    """``max_sessions`` for ``agent``: its ``[limits.NAME]`` table, else ``[broker]``, else the default."""
    try:
        with open(t.paths.broker_toml, "rb") as fh:
            cfg = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError):
        return DEFAULT_MAX_SESSIONS
    own = cfg.get("limits", {}).get(agent, {}).get("max_sessions")
    return int(own or cfg.get("broker", {}).get("max_sessions") or DEFAULT_MAX_SESSIONS)


def daemon_pid(t: Target) -> int:
    """The mcp-brokerd process itself (the one running as mcp-broker)."""
    pid = t.daemon_pid()
    uid = pwd.getpwnam(BROKER_USER).pw_uid
    if _uid(pid) != uid:
        raise BenchError(f"daemon pid {pid} does not run as {BROKER_USER}")
    return pid


def _uid(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Uid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def processes_of(uid: int) -> int:
    return sum(1 for e in os.listdir("/proc") if e.isdigit() and _uid(int(e)) == uid)


# --- the hostile load -------------------------------------------------------------------------


class Hostile:
    """``stuck`` stalled ``mcp stdio`` sessions and ``flooders`` calling loops, all as the attacker."""

    def __init__(self, attacker: Target, stuck: int, flooders: int = FLOODERS) -> None:
        self.attacker = attacker
        self.stuck: list[subprocess.Popen[bytes]] = []
        self.flood: list[subprocess.Popen[bytes]] = []
        self.n_stuck, self.n_flood = stuck, flooders
        self.held = 0

    def _popen(self, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        pw = self.attacker.agent_pw
        return subprocess.Popen(argv, user=pw.pw_uid, group=pw.pw_gid, extra_groups=[], env=AGENT_ENV, cwd="/", **kw)

    def start(self, settle_timeout: float | None = None) -> None:
        payload = stuck_payload()
        for _ in range(self.n_stuck):
            p = self._popen(
                [self.attacker.paths.mcp, "stdio"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                start_new_session=True,
            )
            assert p.stdin is not None
            p.stdin.write(payload)
            p.stdin.flush()  # stdin stays open and stdout is never read: a stalled client
            self.stuck.append(p)
        # wait until the daemon holds them: one gate process per session, as the attacker's gate user
        gate_uid = pwd.getpwnam(self.attacker.gate_user).pw_uid
        deadline = time.monotonic() + (settle_timeout or max(60.0, self.n_stuck * 0.5))
        while time.monotonic() < deadline:
            self.held = processes_of(gate_uid)
            if self.held >= self.n_stuck:
                break
            time.sleep(0.5)
        time.sleep(1.0)  # let the big results pile up against the unread pipes
        for _ in range(self.n_flood):
            self.flood.append(
                self._popen(
                    ["/usr/bin/python3", "-IS", "-c", FLOOD, self.attacker.paths.mcp],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    start_new_session=True,
                )
            )

    def stop(self) -> dict[str, int]:
        """Stop the flood (its exit codes) and kill the stuck sessions' process groups."""
        codes: dict[str, int] = {}
        for p in self.flood:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in self.flood:
            try:
                out, _ = p.communicate(timeout=60)
                for k, v in json.loads(out or b"{}").items():
                    codes[k] = codes.get(k, 0) + int(v)
            except (subprocess.TimeoutExpired, ValueError):
                _killpg(p, signal.SIGKILL)
                p.wait()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for p in self.stuck:
                _killpg(p, sig)
            time.sleep(0.5)
        for p in self.stuck:
            for f in (p.stdin, p.stdout):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
            p.wait()
        self.stuck, self.flood = [], []
        return dict(sorted(codes.items()))


def _killpg(p: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, sig)


class RssSampler:
    """Max VmRSS of one process, sampled in a thread."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.pid, self.interval = pid, interval
        self.max_kib = vmrss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.max_kib = max(self.max_kib, vmrss_kb(self.pid))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def victim_calls(t: Target, n: int) -> dict[str, Any]:
    argv = [t.paths.mcp, "call", "demo.echo", "text=x"]
    lat: list[float] = []
    errors, slowest = 0, 0.0
    for _ in range(n):
        ms, code, out = spawn_timed(argv, t.agent_pw)
        lat.append(ms)
        slowest = max(slowest, ms)
        if code != 0 or out != b"x\n":
            errors += 1
    return {**summary(lat), "errors": errors}


def cycle(t: Target, attacker: Target, pid: int, cap: int, n: int) -> dict[str, Any]:
    hostile = Hostile(attacker, cap)
    try:
        with RssSampler(pid) as rss:
            hostile.start()
            loaded = victim_calls(t, n)
    finally:
        codes = hostile.stop()
    time.sleep(SETTLE_S)
    return {
        "victim": loaded,
        "sessions_held": hostile.held,
        "attacker_exit_codes": codes,
        "rss_during_max_kib": rss.max_kib,
        "rss_after_kib": vmrss_kb(pid),
    }


def neighbours(t: Target, n: int) -> dict[str, Any]:
    attacker = ensure_attacker(t)
    cap = session_cap(t, attacker.agent)
    pid = daemon_pid(t)
    for _ in range(5):  # warm caches
        spawn_timed([t.paths.mcp, "call", "demo.echo", "text=x"], t.agent_pw)
    unloaded = victim_calls(t, n)
    idle = vmrss_kb(pid)
    first = cycle(t, attacker, pid, cap, n)
    second = cycle(t, attacker, pid, cap, n)
    if not os.path.exists(f"/proc/{pid}"):
        raise BenchError("the daemon died during the hostile-neighbour phase")
    p95u, p95l = unloaded.get("p95_ms"), first["victim"].get("p95_ms")
    return {
        "attacker": attacker.agent,
        "max_sessions": cap,
        "stuck_sessions": cap,
        "big_calls_per_session": BIG_CALLS,
        "big_size": BIG_SIZE,
        "flooders": FLOODERS,
        "daemon_pid": pid,
        "unloaded": unloaded,
        "rss_idle_kib": idle,
        "cycles": [first, second],
        "p95_ratio": round(p95l / p95u, 3) if p95u and p95l else None,
        "rss_during_over_idle_kib": max(c["rss_during_max_kib"] for c in (first, second)) - idle,
        "second_cycle_growth_kib": second["rss_after_kib"] - first["rss_after_kib"],
    }


def render_lines(nb: dict[str, Any], row: Any) -> list[str]:
    """Table rows for ``bench.py``'s render (``row(name, summary, other)`` prints a latency row)."""
    lines: list[str] = []
    c1, c2 = nb["cycles"]
    row("hostile neighbour: victim mcp call demo.echo, unloaded", nb["unloaded"], f"errors {nb['unloaded']['errors']}")
    for i, c in enumerate((c1, c2), 1):
        row(
            f"  ... {nb['stuck_sessions']} stuck sessions + flood next door, cycle {i}",
            c["victim"],
            f"errors {c['victim']['errors']}, sessions held {c['sessions_held']}, "
            f"attacker exit codes {c['attacker_exit_codes']}",
        )
    lines.append(
        f"{'  daemon RSS idle / during (max) / after, cycle 1':<58}{'':>6}  "
        f"{nb['rss_idle_kib'] / MIB:.1f} / {c1['rss_during_max_kib'] / MIB:.1f} / {c1['rss_after_kib'] / MIB:.1f} MiB"
    )
    lines.append(
        f"{'  daemon RSS during (max) / after, cycle 2':<58}{'':>6}  "
        f"{c2['rss_during_max_kib'] / MIB:.1f} / {c2['rss_after_kib'] / MIB:.1f} MiB"
    )
    return lines
