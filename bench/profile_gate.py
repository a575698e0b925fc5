"""Where the time of one ``mcp call`` goes: sudo, interpreter, imports, allowlist, socket, daemon.

Each phase is measured as the difference between two commands that differ
only by that phase, run interleaved many times (medians), plus in-process
timings of the gate's own steps and the daemon's ``duration_ms`` from the
audit log:

- process spawn: ``/bin/true``;
- sudo: ``sudo -n -u mcp-gate /bin/true`` minus spawn;
- interpreter start and exit: ``python3 -IS -c pass`` minus spawn;
- the gate's imports: ``python3 -IS -c 'import broker.gate'`` (the gate's
  sys.path) minus ``python3 -IS -c pass``, and ``-X importtime`` per module;
- the gate without sudo: the installed gate script run as root with
  ``SUDO_USER``/``SUDO_UID`` set, for a real ``call demo.echo``;
- the ``mcp`` shim: ``mcp call`` minus ``sudo ... mcp-gate call`` (as the agent);
- allowlist check, request round trip over gate.sock, and an fsync'd append
  on the audit log's filesystem, in-process;
- daemon-side handling: ``duration_ms`` of the audit records of those calls.

Run alone (``python bench/profile_gate.py [--root R] [--agent USER]``) it
prints the breakdown; ``bench.py`` includes it in its report.
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import re
import sys
import tempfile
import time
from typing import Any

from benchlib import BenchError, GateConnection, Target, call_message, percentile, spawn_timed


def gate_site(target: Target) -> str:
    """The site-packages directory the installed gate script appends to sys.path."""
    with open(target.paths.gate, encoding="utf-8") as fh:
        match = re.search(r"sys\.path\.append\((['\"])(.+?)\1\)", fh.read())
    if match is None:
        raise BenchError(f"{target.paths.gate}: cannot find the gate's sys.path entry")
    return match.group(2)


#: what the shim hands the gate on stdin for 'call demo.echo text=hi' (the gate reads its arguments from it)
CALL_FRAME = b"mcp-args 1 1 0\n7 text=hi\n"


def interleaved(commands: dict[str, tuple[list[str], Any, Any]], rounds: int) -> dict[str, list[float]]:
    """Run each command once per round, in turn, so drift hits them all alike; ms samples."""
    samples: dict[str, list[float]] = {name: [] for name in commands}
    for _ in range(rounds):
        for name, (argv, user, env) in commands.items():
            frame = CALL_FRAME if argv[-2:] == ["call", "demo.echo"] else None
            ms, code, _out = spawn_timed(argv, user, env, frame)
            if code != 0:
                raise BenchError(f"{' '.join(argv)} exited {code}")
            samples[name].append(ms)
    return samples


def gate_env(target: Target) -> dict[str, str]:
    """What sudo leaves the gate: it names the caller (the gate ignores everything else)."""
    return {"SUDO_USER": target.agent, "SUDO_UID": str(target.agent_pw.pw_uid), "PATH": "/usr/bin:/bin"}


def gate_argv(target: Target, *args: str) -> list[str]:
    """The installed gate script run directly as root (no sudo)."""
    return ["/usr/bin/python3", "-IS", target.paths.gate, *args]


#: Run in a fresh ``python3 -IS`` as mcp-gate: the gate's own run() steps with
#: CLOCK_MONOTONIC stamps around each phase, written to stderr as JSON.
TIMELINE = """import time
_m = time.monotonic
T = {"start": _m()}
import sys
sys.path.append(SITE)
from broker.gate import verbs as gate
from broker.core import wire
import posix
T["imported"] = _m()
_check, _exchange, _parse = gate.check_allowlist, wire.exchange, gate.parse_argv
def parse(*a, **k):
    T["parse0"] = _m(); r = _parse(*a, **k); T["parse1"] = _m(); return r
def check(*a, **k):
    T["allow0"] = _m(); r = _check(*a, **k); T["allow1"] = _m(); return r
def exchange(*a, **k):
    T["sock0"] = _m(); r = _exchange(*a, **k); T["sock1"] = _m(); return r
gate.parse_argv, gate.check_allowlist, wire.exchange = parse, check, exchange
T["harden0"] = _m()
posix.chdir("/"); posix.umask(0o077); posix.closerange(3, 1 << 20)
sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")
sys.stderr.reconfigure(encoding="utf-8", errors="backslashreplace")
T["main0"] = _m()
code = gate.main(["call", "demo.echo", "text=hi"], root=ROOT, broker_uid=BROKER_UID,
                 environ={"SUDO_USER": AGENT, "SUDO_UID": str(AGENT_UID)})
sys.stdout.flush()
T["main1"] = _m()
T["code"] = code
sys.stderr.write(repr(T))
raise SystemExit(code)
"""


def cold_timeline(target: Target, runs: int) -> dict[str, Any]:
    """Per-phase timing of one cold gate call as mcp-gate (sudo from root), medians in ms."""
    import pwd
    import subprocess
    import time as _time

    broker_uid = pwd.getpwnam("mcp-broker").pw_uid
    code = (
        f"SITE = {gate_site(target)!r}; ROOT = {target.paths.root!r}; BROKER_UID = {broker_uid}; "
        f"AGENT = {target.agent!r}; AGENT_UID = {target.agent_pw.pw_uid}\n" + TIMELINE
    )
    argv = ["sudo", "-n", "-u", target.gate_user, "/usr/bin/python3", "-IS", "-c", code]
    keys = (
        "sudo + interpreter start",
        "imports",
        "hardening (closerange, reconfigure)",
        "parse argv",
        "allowlist check",
        "socket round trip (daemon included)",
        "rest of main (output)",
        "exit",
    )
    phases: dict[str, list[float]] = {k: [] for k in keys}
    totals: list[float] = []
    for i in range(runs + 2):
        t0 = _time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, env={}, cwd="/", check=False)
        t1 = _time.monotonic()
        if proc.returncode != 0 or proc.stdout != "hi\n":
            raise BenchError(f"timeline run failed ({proc.returncode}): {proc.stderr.strip()[-300:]}")
        if i < 2:
            continue  # warm the page cache
        import ast

        t = ast.literal_eval(proc.stderr.strip())
        ms = {k: v * 1000 for k, v in t.items() if k != "code"}
        start_ms, end_ms = t0 * 1000, t1 * 1000
        phases["sudo + interpreter start"].append(ms["start"] - start_ms)
        phases["imports"].append(ms["imported"] - ms["start"])
        phases["hardening (closerange, reconfigure)"].append(ms["main0"] - ms["harden0"])
        phases["parse argv"].append(ms["parse1"] - ms["parse0"])
        phases["allowlist check"].append(ms["allow1"] - ms["allow0"])
        phases["socket round trip (daemon included)"].append(ms["sock1"] - ms["sock0"])
        phases["rest of main (output)"].append(
            (ms["main1"] - ms["main0"])
            - (ms["parse1"] - ms["parse0"])
            - (ms["allow1"] - ms["allow0"])
            - (ms["sock1"] - ms["sock0"])
        )
        phases["exit"].append(end_ms - ms["main1"])
        totals.append(end_ms - start_ms)
    out = {k: round(percentile(v, 50), 3) for k, v in phases.items()}
    out["total"] = round(percentile(totals, 50), 3)
    return out


def importtime(target: Target, runs: int = 15) -> dict[str, Any]:
    """``-X importtime`` of a real gate call: median cumulative µs per module."""
    per: dict[str, list[int]] = {}
    self_us: dict[str, list[int]] = {}
    argv = ["/usr/bin/python3", "-IS", "-X", "importtime", target.paths.gate, "call", "demo.echo", "text=hi"]
    import subprocess

    for _ in range(runs):
        proc = subprocess.run(argv, capture_output=True, text=True, check=False, env=gate_env(target))
        for line in proc.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
            if m:
                name = m.group(4)
                per.setdefault(name, []).append(int(m.group(2)))
                self_us.setdefault(name, []).append(int(m.group(1)))
    if "broker.gate.verbs" not in per:
        raise BenchError("importtime: broker.gate.verbs was not imported by the gate script")
    # (module, median self µs, median cumulative µs), by self time
    rows = sorted(
        (
            (k, int(percentile([float(x) for x in self_us[k]], 50)), int(percentile([float(x) for x in v], 50)))
            for k, v in per.items()
        ),
        key=lambda row: -row[1],
    )
    ours = ("_socket", "_json", "__future__")  # what the gate imports besides broker.*
    startup = [row for row in rows if not row[0].startswith("broker") and row[0] not in ours]
    return {
        "broker_gate_cumulative_us": int(percentile([float(x) for x in per["broker.gate.verbs"]], 50)),
        "interpreter_startup_imports_us": sum(row[1] for row in startup),
        "top_self_us": [{"module": m, "self_us": s, "cumulative_us": c} for m, s, c in rows[:12]],
    }


def in_process(target: Target, n: int) -> dict[str, Any]:
    """The gate's steps timed in this (warm) process: argv parse, allowlist, round trip."""
    from broker.gate import verbs as gate  # the bench runs with the installation's virtualenv: the same code

    argv = ["call", "demo.echo", "text=hi"]
    t: dict[str, list[float]] = {"parse_argv": [], "allowlist": [], "roundtrip": []}
    for _ in range(n):
        s = time.perf_counter()
        gate.parse_argv(argv, None)
        t["parse_argv"].append((time.perf_counter() - s) * 1000)
        s = time.perf_counter()
        gate.check_allowlist(target.paths, target.agent, "demo.echo")
        t["allowlist"].append((time.perf_counter() - s) * 1000)
    conn_ms: list[float] = []
    for i in range(n):
        s = time.perf_counter()
        conn = GateConnection(target)  # made by a helper process as the gate user: not the gate's cost
        conn_ms.append((time.perf_counter() - s) * 1000)
        message = call_message(target, "demo.echo", f"profile-{i}")
        s = time.perf_counter()
        answer = conn.request(message)
        t["roundtrip"].append((time.perf_counter() - s) * 1000)
        conn.close()
        if not answer.get("ok"):
            raise BenchError(f"round trip: the daemon refused: {answer.get('error')}")
    out = {k: round(percentile(v, 50), 3) for k, v in t.items()}
    out["connect"] = round(percentile(conn_ms, 50), 3)
    return out


def audit_durations(target: Target, limit: int = 2000) -> list[float]:
    """``duration_ms`` of the latest audit records of the agent's ``demo.echo`` calls.

    Argument values are not logged, so records are picked by caller, tool
    and op: call this right after making the calls of interest.
    """
    try:
        with open(target.paths.audit_log, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 8 * 1024 * 1024))
            tail = fh.read().splitlines()[1:]
    except OSError as exc:
        raise BenchError(f"cannot read the audit log: {exc}") from None
    found: list[float] = []
    for line in reversed(tail):
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("op") == "call" and rec.get("caller") == target.agent and rec.get("tool") == "demo.echo":
            d = rec.get("duration_ms")
            if isinstance(d, (int, float)):
                found.append(float(d))
                if len(found) >= limit:
                    break
    return found


def fsync_append_ms(directory: str, n: int = 200) -> float:
    """Median cost of one ~400-byte O_APPEND write + fsync on the audit log's filesystem."""
    fd, path = tempfile.mkstemp(prefix=".bench-fsync-", dir=directory)
    try:
        os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        line = b"x" * 399 + b"\n"
        samples = []
        for _ in range(n):
            s = time.perf_counter()
            os.write(fd, line)
            os.fsync(fd)
            samples.append((time.perf_counter() - s) * 1000)
        os.close(fd)
        return round(percentile(samples, 50), 3)
    finally:
        os.unlink(path)


def profile(target: Target, rounds: int = 40) -> dict[str, Any]:
    """The whole breakdown as a dict (milliseconds unless named otherwise)."""
    site = gate_site(target)
    py = "/usr/bin/python3"
    agent = target.agent_pw
    call = ("call", "demo.echo", "text=hi")
    gate_call = ("call", "demo.echo")  # text=hi comes in the frame on stdin, as from the shim
    commands: dict[str, tuple[list[str], Any, Any]] = {
        "spawn_true": (["/bin/true"], None, None),
        "sudo_true": (["sudo", "-n", "-u", target.gate_user, "/bin/true"], None, None),
        "python_pass": ([py, "-IS", "-c", "pass"], None, None),
        "python_import_gate": (
            [py, "-IS", "-c", f"import sys; sys.path.append({site!r}); import broker.gate.verbs"],
            None,
            None,
        ),
        # as the gate user without sudo (the daemon serves nobody else on gate.sock)
        "gate_call_no_sudo": (gate_argv(target, *gate_call), pwd.getpwnam(target.gate_user), gate_env(target)),
        "agent_sudo_gate_call": (["sudo", "-n", "-u", target.gate_user, target.paths.gate, *gate_call], agent, None),
        "agent_mcp_call": ([target.paths.mcp, *call], agent, None),
        "floor": (["sudo", "-n", "-u", target.gate_user, py, "-IS", "-c", "pass"], None, None),
    }
    interleaved(commands, 3)  # warm caches
    raw = interleaved(commands, rounds)
    med = {k: round(percentile(v, 50), 3) for k, v in raw.items()}
    timeline = cold_timeline(target, rounds)
    steps = in_process(target, max(50, rounds * 2))
    daemon = audit_durations(target, limit=max(50, rounds * 2))
    daemon_ms = round(percentile(daemon, 50), 3) if daemon else None
    fsync = fsync_append_ms(target.paths.log)
    differences = {
        "process spawn (fork+exec+wait of /bin/true)": med["spawn_true"],
        "sudo as root (sudo -u GATE-USER /bin/true - spawn)": round(med["sudo_true"] - med["spawn_true"], 3),
        "interpreter start+exit (python3 -IS -c pass - spawn)": round(med["python_pass"] - med["spawn_true"], 3),
        "gate imports (import broker.gate - python3 -c pass)": round(med["python_import_gate"] - med["python_pass"], 3),
        "gate's work, no sudo (gate call as root - import broker.gate)": round(
            med["gate_call_no_sudo"] - med["python_import_gate"], 3
        ),
        "sudo as the agent (sudo gate call - gate call without sudo)": round(
            med["agent_sudo_gate_call"] - med["gate_call_no_sudo"], 3
        ),
        "mcp shim (/bin/sh exec) (mcp call - sudo gate call)": round(
            med["agent_mcp_call"] - med["agent_sudo_gate_call"], 3
        ),
    }
    return {
        "rounds": rounds,
        "commands_median_ms": med,
        "differences_ms": differences,
        "cold_timeline_ms": timeline,
        "in_process_warm_ms": steps,
        "daemon_duration_ms_median": daemon_ms,
        "daemon_duration_ms_p95": round(percentile(daemon, 95), 3) if daemon else None,
        "fsync_append_ms": fsync,
        "importtime": importtime(target),
    }


def render(result: dict[str, Any]) -> str:
    med = result["commands_median_ms"]
    lines = ["where one 'mcp call demo.echo text=hi' spends its time (medians, ms)"]
    lines.append("  one cold gate run as the gate user (sudo from root), CLOCK_MONOTONIC stamps inside the process:")
    for name, value in result["cold_timeline_ms"].items():
        lines.append(f"    {name:<66} {value:8.3f}")
    lines.append(
        f"      of which daemon-side handling (audit duration_ms){'':<16}{_num(result['daemon_duration_ms_median'])}"
    )
    lines.append(f"      one fsync'd audit-sized append on the log filesystem{'':<12}{_num(result['fsync_append_ms'])}")
    lines.append(
        "      two-phase audit: a call that reaches its server writes 2 records (intent, outcome), "
        f"so it pays this fsync twice: +{_num(result['fsync_append_ms']).strip()} ms a call over one record"
    )
    lines.append("  the same from differences between whole commands:")
    for name, value in result["differences_ms"].items():
        lines.append(f"    {name:<66} {value:8.3f}")
    lines.append(f"    {'total: mcp call as the agent':<66} {med['agent_mcp_call']:8.3f}")
    lines.append(f"    {'floor: sudo -u GATE-USER python3 -IS -c pass':<66} {med['floor']:8.3f}")
    warm = result["in_process_warm_ms"]
    lines.append(
        "  warm, in-process: parse {parse_argv:.3f}, allowlist {allowlist:.3f}, "
        "round trip on a connected socket {roundtrip:.3f} (connecting as the gate user through a helper "
        "process: {connect:.3f}, not the gate's cost)".format(**warm)
    )
    it = result["importtime"]
    lines.append(
        f"  -X importtime of a gate call: broker.gate {it['broker_gate_cumulative_us']} us cumulative; "
        f"interpreter start-up modules {it['interpreter_startup_imports_us']} us; by self time:"
    )
    for m in it["top_self_us"][:10]:
        lines.append(f"    {m['module']:<36} self {m['self_us']:>6} us   cumulative {m['cumulative_us']:>6} us")
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "     n/a" if value is None else f"{value:8.3f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default="/")
    p.add_argument("--agent", default="moltbot")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    ns = p.parse_args(argv)
    if os.geteuid() != 0:
        print("profile_gate: run as root", file=sys.stderr)
        return 77
    try:
        result = profile(Target(ns.root, ns.agent), ns.rounds)
    except BenchError as exc:
        print(f"profile_gate: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2) if ns.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
