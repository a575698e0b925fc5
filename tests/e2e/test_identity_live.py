"""The kernel names the caller: each agent its own gate user, and no argument on a command line.

Code runs here as one agent's gate user, as a compromised gate process of
that agent could, and tries to act as another agent, as root, as the broker
and as the first version's shared gate user; two agents' gate processes try
to signal and trace each other; and while one agent calls with a marker in
its arguments, another agent reads every process's command line.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from broker.core import wire
from tests.e2e.harness import (
    AGENT1,
    AGENT2,
    AGENT_ENV,
    PYTHON,
    RUNUSER,
    Installation,
    connect_as,
    gate_exchange,
    gate_user,
)


def answered(user: str, inst: Installation, request: dict[str, object]) -> dict[str, object] | None:
    return gate_exchange(user, inst.paths.gate_sock, request)


def refused_at_once(user: str, inst: Installation) -> bool:
    """Whether the daemon closes a connection from ``user`` before answering anything."""
    with connect_as(user, inst.paths.gate_sock) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(wire.encode_frame(wire.request("status")))
        try:
            return sock.recv(16) == b""
        except ConnectionResetError:
            return True


def test_each_agent_has_its_own_locked_gate_user_and_rule(live: Installation) -> None:
    for agent in (AGENT1, AGENT2):
        pw = pwd.getpwnam(gate_user(agent))
        assert pw.pw_shell == "/usr/sbin/nologin" and pw.pw_dir == "/nonexistent"
        assert pw.pw_gid == pwd.getpwnam("mcp-gate").pw_gid
        with open("/etc/shadow") as fh:
            assert next(line for line in fh if line.startswith(gate_user(agent) + ":")).split(":")[1].startswith("!")
    with open(live.paths.sudoers) as fh:
        rules = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    assert rules == [f"{a} ALL=({gate_user(a)}) NOPASSWD: {live.paths.gate}" for a in (AGENT1, AGENT2)]
    with open(live.paths.gate_users) as fh:
        assert [line.split() for line in fh if line.strip() and not line.startswith("#")] == [
            [AGENT1, gate_user(AGENT1)],
            [AGENT2, gate_user(AGENT2)],
        ]


def test_a_gate_identity_is_its_agent_and_nobody_else(live: Installation) -> None:
    """As agent1's gate user: everything it asks is agent1's; naming another caller is a protocol violation."""
    before = len(live.records())
    listing = answered(gate_user(AGENT1), live, wire.request("list"))
    assert listing is not None and listing["ok"]
    names = {t["name"] for t in listing["result"]["tools"]}  # type: ignore[index]
    assert "demo.echo" in names  # agent1's allowlist (the global one), not agent2's (demo.add only)
    call = answered(gate_user(AGENT1), live, wire.request("call", tool="demo.whoami", kv=[], args=None, timeout=None))
    assert call is not None and call["ok"]
    # the first version named the caller in the frame: now any such field closes the connection
    for forged in (
        {"caller": AGENT2, "uid": pwd.getpwnam(AGENT2).pw_uid},
        {"caller": "root", "uid": 0},
        {"caller": "mcp-broker", "uid": pwd.getpwnam("mcp-broker").pw_uid},
    ):
        assert answered(gate_user(AGENT1), live, wire.request("list", **forged)) is None, forged
        add = wire.request("call", tool="demo.add", kv=[["a", "1"], ["b", "1"]], args=None, timeout=None, **forged)
        assert answered(gate_user(AGENT1), live, add) is None
    new = live.records()[before:]
    assert {r.get("caller") for r in new} == {AGENT1}  # audited as what they were: agent1's
    assert {r["op"] for r in new} >= {"list", "call"}


@pytest.mark.parametrize("user", ["root", "mcp-broker", "mcp-gate", AGENT1])
def test_root_the_broker_the_old_shared_gate_user_and_an_agent_are_no_callers(live: Installation, user: str) -> None:
    before = len(live.records())
    if user == AGENT1:  # the agent itself cannot even connect (the run dir is the gate users' group's)
        with pytest.raises(subprocess.CalledProcessError):
            connect_as(user, live.paths.gate_sock)
    else:
        assert refused_at_once(user, live)
    assert len(live.records()) == before  # nothing was served, so nothing to record
    assert "refused connection from uid" in live.log_tail(20000) or user == AGENT1


def test_forged_reports_freeze_only_their_own_caller(live: Installation) -> None:
    live.set_policy(broker_extra="denial_budget = 3")
    try:
        for _ in range(6):
            report = wire.request("report", verb="call", tool="demo.secret", exit=77, reason="forged")
            assert answered(gate_user(AGENT1), live, report) == {"ok": True, "result": None}
        r = live.mcp("call", "demo.echo", "text=x")
        assert r.code == 77 and "frozen" in r.err, r  # agent1 froze itself ...
        r = live.mcp("call", "demo.add", "a=1", "b=2", user=AGENT2)
        assert (r.code, r.out) == (0, "3\n"), r  # ... and nobody else
        recs = [x for x in live.records() if x.get("op") in ("report", "freeze")][-7:]
        assert {x["caller"] for x in recs} == {AGENT1}
    finally:
        live.ctl("unfreeze", AGENT1)
        live.set_policy()


def test_two_agents_gate_processes_cannot_signal_or_trace_each_other(live: Installation) -> None:
    victim = subprocess.Popen(
        [RUNUSER, "-u", gate_user(AGENT1), "--", "/bin/sleep", "60"], env=AGENT_ENV, cwd="/"
    )  # a stand-in for agent1's gate, running as its gate user
    try:
        deadline = time.monotonic() + 10
        pid = None
        while pid is None and time.monotonic() < deadline:
            for entry in os.listdir("/proc"):
                with contextlib.suppress(OSError, ValueError), open(f"/proc/{entry}/status") as fh:
                    st = fh.read()
                    ppid = int(st.split("PPid:")[1].split()[0])
                    uid = int(st.split("Uid:")[1].split()[0])
                    if ppid == victim.pid and uid == pwd.getpwnam(gate_user(AGENT1)).pw_uid:
                        pid = int(entry)
            time.sleep(0.05)
        assert pid is not None
        code = (
            "import ctypes, os, sys\npid = int(sys.argv[1])\nout = []\n"
            "for sig in (0, 15, 9):\n"
            "    try:\n        os.kill(pid, sig); out.append('SIGNALLED')\n"
            "    except PermissionError:\n        out.append('eperm')\n"
            "try:\n    open(f'/proc/{pid}/environ', 'rb').read(); out.append('ENVIRON')\n"
            "except PermissionError:\n    out.append('eperm')\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "out.append('TRACED' if libc.ptrace(16, pid, 0, 0) == 0 else 'eperm')\n"  # PTRACE_ATTACH
            "print(' '.join(out))\n"
        )
        r = live.as_user(gate_user(AGENT2), PYTHON, "-c", code, str(pid))
        assert r.out.split() == ["eperm"] * 5, r
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def _watch_cmdlines(marker: bytes, stop: threading.Event, found: list[str], samples: list[int]) -> None:
    """As agent2: read every process's command line over and over; note a broker process showing the marker."""
    code = (
        "import os, sys, time\nmarker = sys.stdin.readline().strip().encode()\nhits = []\nsamples = 0\n"
        "me = {os.getpid(), os.getppid()}\ngate = b'mcp-' + b'gate'\n"
        "deadline = time.monotonic() + float(sys.argv[1])\n"
        "while time.monotonic() < deadline and not os.path.exists(sys.argv[2]):\n"
        "    for entry in os.listdir('/proc'):\n"
        "        if not entry.isdigit() or int(entry) in me:\n            continue\n"
        "        try:\n            cmd = open(f'/proc/{entry}/cmdline', 'rb').read()\n"
        "        except OSError:\n            continue\n"
        "        samples += 1\n"
        "        if marker in cmd and (b'sudo' in cmd or gate in cmd):\n"
        "            hits.append(cmd.replace(b'\\0', b' ').decode(errors='replace'))\n"
        "print(samples)\nprint('\\n'.join(hits))\n"
    )
    stop_file = f"/tmp/mcp-privsep-cmdline-stop-{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(stop_file)
    proc = subprocess.Popen(
        [RUNUSER, "-u", AGENT2, "--", PYTHON, "-c", code, "300", stop_file],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=AGENT_ENV,
        cwd="/",
    )
    assert proc.stdin is not None
    proc.stdin.write(marker.decode() + "\n")
    proc.stdin.flush()
    stop.wait()
    with open(stop_file, "w"):
        pass
    out, _ = proc.communicate(timeout=60)
    os.unlink(stop_file)
    lines = out.splitlines()
    samples.append(int(lines[0]))
    found.extend(line for line in lines[1:] if line)


def test_no_argument_value_is_ever_on_a_broker_process_command_line(live: Installation) -> None:
    marker = f"secret-marker-{os.getpid()}"
    stop = threading.Event()
    found: list[str] = []
    samples: list[int] = []
    watcher = threading.Thread(target=_watch_cmdlines, args=(marker.encode(), stop, found, samples))
    watcher.start()
    try:
        time.sleep(0.5)
        for i in range(200):
            value = f"{marker}-{i}"
            argv = (
                ["call", "demo.echo", f"text={value}"]
                if i % 2
                else ["call", "demo.echo", "--args", f'{{"text": "{value}"}}']
            )
            r = live.mcp(*argv)
            assert (r.code, r.out) == (0, f"{marker}-{i}\n"), r
    finally:
        stop.set()
        watcher.join(90)
    print(f"agent2 read {samples[0]} command lines while agent1 made 200 calls")
    assert samples and samples[0] > 1000
    assert found == [], found[:3]


def test_the_gate_refuses_arguments_on_its_command_line(live: Installation) -> None:
    """Run directly through sudo (not the shim), a call's arguments on the command line are refused."""
    r = live.as_user(AGENT1, "sudo", "-n", "-u", gate_user(AGENT1), live.paths.gate, "call", "demo.echo", "text=x")
    assert r.code == 64 and "standard input" in r.err and r.out == "", r
    r = live.as_user(AGENT1, "sudo", "-n", "-u", gate_user(AGENT1), live.paths.gate, "call", "demo.echo")
    assert r.code == 64 and "argument frame" in r.err, r  # no frame on stdin


@pytest.fixture
def unknown_agent(live: Installation) -> Iterator[str]:
    from tests.e2e.harness import OUTSIDER

    yield OUTSIDER


def test_a_user_without_a_gate_user_is_told_so_by_the_shim(live: Installation, unknown_agent: str) -> None:
    r = live.mcp("call", "demo.echo", "text=hi", user=unknown_agent)
    assert r.code == 77 and r.err.startswith("mcp: uid ") and "not an agent" in r.err, r


def test_adding_an_agent_while_the_daemon_runs_serves_it_at_once(live: Installation) -> None:
    from tests.e2e.harness import ensure_user

    agent = "mcpt-agent3"
    ensure_user(agent)
    r = live.ctl("install", "--agent", agent)
    assert r.code == 0, r.err
    r = live.mcp("call", "demo.echo", "text=new agent", user=agent)
    assert (r.code, r.out) == (0, "new agent\n"), r  # no daemon restart, no reload
    assert live.records()[-1]["caller"] == agent
