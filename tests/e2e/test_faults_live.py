"""Faults the broker must survive, caused for real: it fails closed and keeps serving the rest.

A stdio server that crashes mid-call, one that sleeps past the timeout, one
that hangs for good (answers nothing, not even a ping), one that floods its
output, one that exits at start; the daemon killed with SIGKILL; the audit
log replaced by a directory, and on a full filesystem (a tiny tmpfs mounted
over the log directory, filled while a call runs). Each test also checks that the other servers keep
answering and that the next call works once the fault is gone.

The ``stub`` server used here is a few lines of raw JSON-RPC over stdio,
written into the staging root by a module fixture: unlike the demo server
(an asyncio SDK server that answers pings while a tool sleeps), it handles
one request at a time, so ``hang`` really blocks it, and its ``mark`` tool
leaves a file behind, so a test can tell whether a call reached the server.

On the full filesystem, a call already running when the disk fills is
answered and recorded (the log keeps space reserved past its end), and a
call arriving after is refused with 69 before its tool runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import ALLOWLIST, PYTHON, Installation, Result

STUB = r'''
"""A sequential stdio MCP server for fault tests: echo, mark, sleep, hang."""
import json
import os
import sys
import time

MARKS = sys.argv[1]
OBJ = {"type": "object"}
STR, NUM = {"type": "string"}, {"type": "number"}
TOOLS = [
    {"name": "echo", "description": "echo", "inputSchema": {**OBJ, "properties": {"text": STR}}},
    {"name": "mark", "description": "create a marker file", "inputSchema": {**OBJ, "properties": {"name": STR}}},
    {"name": "sleep", "description": "block, then answer", "inputSchema": {**OBJ, "properties": {"seconds": NUM}}},
    {"name": "hang", "description": "block for good", "inputSchema": OBJ},
]
out = sys.stdout.buffer


def send(obj):
    out.write(json.dumps(obj).encode() + b"\n")
    out.flush()


def text(mid, value):
    send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": value}], "isError": False}})


for raw in sys.stdin.buffer:
    msg = json.loads(raw)
    mid, method, params = msg.get("id"), msg.get("method"), msg.get("params") or {}
    if mid is None or method is None:
        continue
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": mid, "result": {"protocolVersion": params.get("protocolVersion", "2025-06-18"),
              "capabilities": {"tools": {}}, "serverInfo": {"name": "stub", "version": "1"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": mid, "result": {"tools": TOOLS}})
    elif method == "ping":
        send({"jsonrpc": "2.0", "id": mid, "result": {}})
    elif method == "tools/call":
        name, args = params.get("name"), params.get("arguments") or {}
        if name == "hang":
            time.sleep(3600)
        elif name == "sleep":
            time.sleep(float(args.get("seconds", 1)))
            text(mid, "slept")
        elif name == "mark":
            mark = os.path.basename(str(args.get("name", "mark")))
            with open(os.path.join(MARKS, mark), "w") as fh:
                fh.write("called\n")
            text(mid, "marked " + mark)
        else:
            text(mid, str(args.get("text", "")))
    else:
        send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "no such method"}})
'''

STUB_TOOLS = "stub.echo\nstub.mark\nstub.sleep\nstub.hang\n"


# --- helpers --------------------------------------------------------------------------------


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def servers(live: Installation) -> dict[str, dict[str, Any]]:
    """The daemon's view of its servers (admin status), by name."""
    r = live.ctl("status", "--json")
    assert r.code == 0, r.err
    return {s["name"]: s for s in json.loads(r.out)["servers"]}


def one_line(r: Result) -> str:
    """The single ``mcp: `` line on stderr, no traceback."""
    assert "Traceback" not in r.err + r.out, r.err
    lines = r.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("mcp: "), r.err
    return lines[0]


def timed(fn: Callable[[], Result]) -> tuple[Result, float]:
    started = time.monotonic()
    r = fn()
    return r, time.monotonic() - started


def timed_mcp(live: Installation, *argv: str) -> tuple[Result, float]:
    """``mcp ARGV`` as the agent, and how long it took."""
    started = time.monotonic()
    r = live.mcp(*argv)
    return r, time.monotonic() - started


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def write_servers_d(live: Installation, name: str, text: str) -> str:
    path = f"{live.paths.servers_d}/{name}"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chown(path, 0, pwd.getpwnam("mcp-broker").pw_gid)
    os.chmod(path, 0o640)
    return path


def reload(live: Installation) -> None:
    r = live.ctl("reload")
    assert r.code == 0, r.err


@pytest.fixture(scope="module")
def stub(inst: Installation) -> Iterator[str]:
    """The sequential stub server, configured through servers.d; yields its marker directory."""
    broker = pwd.getpwnam("mcp-broker")
    script = f"{inst.root}/fault_stub_server.py"
    Path(script).write_text(STUB, encoding="utf-8")
    os.chmod(script, 0o644)
    marks = f"{inst.root}/fault-marks"
    os.makedirs(marks, exist_ok=True)
    os.chown(marks, broker.pw_uid, broker.pw_gid)
    os.chmod(marks, 0o700)
    conf = write_servers_d(
        inst,
        "faults.toml",
        f'[servers.stub]\ncommand = "{PYTHON}"\nargs = [{json.dumps(script)}, {json.dumps(marks)}]\n',
    )
    if inst.daemon is None or inst.daemon.poll() is not None:
        inst.start_daemon()
    reload(inst)
    assert wait_for(lambda: servers(inst).get("stub", {}).get("state") == "up", 20), servers(inst)
    try:
        yield marks
    finally:
        os.unlink(conf)
        if inst.daemon is not None and inst.daemon.poll() is None:
            inst.ctl("reload")


@pytest.fixture
def with_stub(live: Installation, stub: str) -> Iterator[str]:
    """The live installation with the stub's tools allowlisted and the stub up."""
    live.set_allowlist(ALLOWLIST + STUB_TOOLS)
    assert wait_for(lambda: servers(live).get("stub", {}).get("state") == "up", 20), servers(live)
    yield stub


# --- a server that crashes, sleeps, hangs ------------------------------------------------------


def test_crash_mid_call_errors_then_server_restarts_and_serves(live: Installation) -> None:
    assert live.mcp("call", "demo.echo", "text=warm").code == 0
    before_pids = live.server_pids()
    restarts = servers(live)["demo"]["restarts"]
    r, took = timed(lambda: live.mcp("call", "demo.crash"))
    assert r.code == 69 and took < 10, (r, took)
    assert "failed during the call" in one_line(r)
    assert wait_for(lambda: servers(live)["demo"]["restarts"] > restarts and servers(live)["demo"]["state"] == "up", 20)
    assert live.server_pids() and set(live.server_pids()).isdisjoint(before_pids)
    r = live.mcp("call", "demo.echo", "text=after-crash")
    assert (r.code, r.out) == (0, "after-crash\n"), r


def test_timeout_answers_75_while_other_servers_keep_serving(live: Installation) -> None:
    # a call that sleeps far longer than anyone waits: the server is busy with it throughout
    long = live.spawn_mcp("call", "demo.slow", "seconds=30")
    try:
        time.sleep(0.5)
        r, took = timed(lambda: live.mcp("call", "demo.slow", "seconds=30", "--timeout", "1"))
        assert r.code == 75 and 0.9 < took < 6, (r, took)
        assert "timed out" in one_line(r)
        for tool, text in (("web.echo", "web-during-hang"), ("demo.echo", "demo-during-hang")):
            r, took = timed_mcp(live, "call", tool, f"text={text}")
            assert (r.code, r.out) == (0, f"{text}\n") and took < 5, (tool, r, took)
        assert long.poll() is None  # still waiting: nothing above disturbed it
    finally:
        live.kill_tree(long)
    r = live.mcp("call", "demo.echo", "text=next")
    assert (r.code, r.out) == (0, "next\n"), r


def test_hung_server_answers_75_then_is_restarted(live: Installation, with_stub: str) -> None:
    assert live.mcp("call", "stub.echo", "text=warm").out == "warm\n"
    restarts = servers(live)["stub"]["restarts"]
    r, took = timed(lambda: live.mcp("call", "stub.hang", "--timeout", "1"))
    assert r.code == 75 and took < 6, (r, took)
    assert "timed out" in one_line(r)
    # the hung server answers nothing, not even a ping; everything else serves meanwhile
    for tool in ("web.echo", "demo.echo"):
        r, took = timed_mcp(live, "call", tool, "text=meanwhile")
        assert (r.code, r.out) == (0, "meanwhile\n") and took < 5, (tool, r, took)
    assert wait_for(
        lambda: servers(live)["stub"]["restarts"] > restarts and servers(live)["stub"]["state"] == "up", 20
    ), servers(live)["stub"]
    r = live.mcp("call", "stub.echo", "text=restarted")
    assert (r.code, r.out) == (0, "restarted\n"), r


def test_long_call_on_a_one_at_a_time_server_is_not_killed_by_the_health_check(
    live: Installation, with_stub: str
) -> None:
    # 16 s > one health interval (10 s) + the ping timeout (5 s): a health check always falls inside
    r = live.mcp("call", "stub.sleep", "seconds=16", "--timeout", "28")
    assert (r.code, r.out) == (0, "slept\n"), r


# --- output floods ---------------------------------------------------------------------------


FLOOD_TIMEOUT = 15.0


@dataclass
class Flood:
    result: Result
    seconds: float
    during: list[tuple[int, float]] = field(default_factory=list)
    rss_before: int = 0
    rss_peak: int = 0
    daemon_pid: int = 0


@pytest.fixture(scope="module")
def flood(inst: Installation) -> Flood:
    """One 20 MB result from demo.big (cap 1 MiB), with web.echo called while it streams in."""
    if inst.daemon is None or inst.daemon.poll() is not None:
        inst.start_daemon()
    inst.set_allowlist(ALLOWLIST)
    assert inst.daemon is not None
    pid = inst.daemon.pid
    assert inst.mcp("call", "demo.echo", "text=warm").code == 0
    before = peak = rss_kib(pid)
    started = time.monotonic()
    proc = inst.spawn_mcp("call", "demo.big", "size=20000000", "--json", "--timeout", f"{FLOOD_TIMEOUT:g}")
    outcome: dict[str, Any] = {}

    def drain() -> None:  # read while it writes: a 1 MiB answer does not fit in a pipe
        outcome["out"], outcome["err"] = proc.communicate()
        outcome["seconds"] = time.monotonic() - started

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    during: list[tuple[int, float]] = []
    while reader.is_alive() and time.monotonic() - started < 60:
        r, took = timed(lambda: inst.mcp("call", "web.echo", "text=during-flood", timeout=30))
        during.append((r.code, took))
        peak = max(peak, rss_kib(pid))
        time.sleep(0.5)
    if reader.is_alive():
        inst.kill_tree(proc)
        reader.join(10)
    out, err = outcome.get("out", ""), outcome.get("err", "")
    seconds = outcome.get("seconds", time.monotonic() - started)
    return Flood(Result(proc.returncode, out, err), seconds, during, before, peak, pid)


def test_flood_of_output_leaves_the_daemon_healthy(live: Installation, flood: Flood) -> None:
    r = flood.result
    # a result, or one clear error, never a crash: 1 is an answer over max_server_message_bytes, dropped as it was read
    assert r.code in (0, 1, 69, 75), r
    assert "Traceback" not in r.err + r.out
    if r.code == 0:  # delivered: then capped, and saying so
        result = json.loads(r.out)
        text = result["content"][0]["text"]  # a CallToolResult in MCP's wire form; the broker's note in _meta
        assert "mcp-privsep/truncated" in result["_meta"] and "[output truncated" in text
        assert len(text) < 1_100_000
    else:
        one_line(r)
    assert live.daemon is not None and live.daemon.poll() is None and live.daemon.pid == flood.daemon_pid
    # the other server kept answering while 20 MB streamed into the daemon
    assert flood.during and all(code == 0 for code, _ in flood.during), flood.during
    assert max(took for _, took in flood.during) < 10, flood.during
    # bounded memory: the answer is dropped while it is read (max_server_message_bytes), never buffered whole
    assert flood.rss_peak - flood.rss_before < 128 * 1024, (flood.rss_before, flood.rss_peak)
    assert wait_for(lambda: live.mcp("call", "demo.echo", "text=after-flood").code == 0, 45, 1)
    assert live.mcp("call", "web.echo", "text=ok").out == "ok\n"


# --- a server that exits at start --------------------------------------------------------------


def test_server_exiting_at_start_is_named_down_while_the_others_serve(live: Installation) -> None:
    conf = write_servers_d(live, "broken.toml", '[servers.broken]\ncommand = "/bin/false"\n')
    try:
        reload(live)
        live.set_allowlist(ALLOWLIST + "broken.tool\n")
        assert wait_for(lambda: servers(live).get("broken", {}).get("restarts", 0) >= 1, 15), servers(live)
        r = live.mcp("status", "--json")
        assert r.code == 0, r
        status = {s["name"]: s for s in json.loads(r.out)["servers"]}
        assert status["broken"]["state"] == "down" and status["broken"]["reason"], status
        assert "/bin/false" not in r.out  # status names the server and why, never its command
        assert status["demo"]["state"] == "up" and status["web"]["state"] == "up", status
        for tool in ("demo.echo", "web.echo"):
            assert live.mcp("call", tool, "text=still").out == "still\n", tool
        r, took = timed(lambda: live.mcp("call", "broken.tool", "--timeout", "2"))
        assert r.code == 69 and took < 8, (r, took)
        assert "broken" in one_line(r)
        # without --timeout too: a server waiting out its back-off is refused at once, with why
        r, took = timed(lambda: live.mcp("call", "broken.tool"))
        assert r.code == 69 and took < 3, (r, took)
        assert "server broken is unavailable" in one_line(r)
    finally:
        os.unlink(conf)
        reload(live)
    assert "broken" not in servers(live)


# --- the daemon killed -------------------------------------------------------------------------


def test_daemon_killed_gate_answers_69_at_once_and_recovers_after_restart(live: Installation) -> None:
    assert live.daemon is not None
    pid = live.daemon.pid
    stdio_servers = children(pid)
    assert stdio_servers
    in_flight = live.spawn_mcp("call", "demo.slow", "seconds=30")
    try:
        time.sleep(1.0)
        live.daemon.kill()
        live.daemon.wait()
        live.daemon = None
        killed = time.monotonic()
        _out, err = in_flight.communicate(timeout=10)
        assert in_flight.returncode == 69 and time.monotonic() - killed < 2, (in_flight.returncode, err)
        assert err.startswith("mcp: broker unavailable") and err.count("\n") == 1, err
    finally:
        if in_flight.poll() is None:
            live.kill_tree(in_flight)
    r, took = timed(lambda: live.mcp("call", "demo.echo", "text=x"))
    assert r.code == 69 and took < 2, (r, took)
    assert one_line(r).startswith("mcp: broker unavailable")
    r = live.mcp("status")
    assert r.code == 69 and one_line(r).startswith("mcp: broker unavailable")
    # the killed daemon's servers notice their closed stdin and leave: no orphan keeps credentials
    assert wait_for(lambda: not any(running(p) for p in stdio_servers), 10), [p for p in stdio_servers if running(p)]
    live.start_daemon()
    r = live.mcp("call", "demo.echo", "text=back")
    assert (r.code, r.out) == (0, "back\n"), r


class _Stdio:
    """``mcp stdio`` as the agent, driven with raw JSON-RPC lines."""

    def __init__(self, live: Installation) -> None:
        self.proc = live.spawn_mcp("stdio", stdin=True)
        self.buf = ""
        self.next_id = 0
        self.request("initialize", {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t"}})

    def request(self, method: str, params: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
        import select

        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.next_id += 1
        self.proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method, "params": params}))
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while True:
            while "\n" in self.buf:
                line, self.buf = self.buf.split("\n", 1)
                msg = json.loads(line)
                if msg.get("id") == self.next_id:
                    return dict(msg)
            left = deadline - time.monotonic()
            assert left > 0, f"no answer to {method} within {timeout} s"
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 65536).decode()
                assert chunk, "the stdio session ended"
                self.buf += chunk

    def call(self, text: str) -> tuple[bool, str]:
        result = self.request("tools/call", {"name": "demo.echo", "arguments": {"text": text}})["result"]
        return bool(result["isError"]), str(result["content"][0]["text"])


def test_stdio_session_outlives_a_daemon_restart(live: Installation) -> None:
    session = _Stdio(live)
    try:
        assert session.call("before") == (False, "before")
        assert live.daemon is not None
        live.daemon.kill()
        live.daemon.wait()
        live.daemon = None
        started = time.monotonic()
        is_error, text = session.call("while-down")
        assert is_error and "exit 69" in text and "broker unavailable" in text, text
        assert time.monotonic() - started < 3
        live.start_daemon()
        # the session's idle connections died with the old daemon: it reconnects, and nothing runs twice
        assert session.call("after") == (False, "after")
        # restarted between two calls: the stale idle connection is replaced, the call is not failed
        live.stop_daemon()
        live.start_daemon()
        assert session.call("again") == (False, "again")
        assert session.proc.poll() is None
    finally:
        live.kill_tree(session.proc)
    with open(live.paths.audit_log, encoding="utf-8") as fh:
        texts = [
            r.get("arg_keys") for r in map(json.loads, fh) if r.get("op") == "call" and r.get("tool") == "demo.echo"
        ]
    assert texts  # calls were audited by both daemons


# --- the audit log unwritable ----------------------------------------------------------------------


def _verify_chain(path: str) -> list[str]:
    from broker.daemon import audit

    verify_set = getattr(audit, "verify_set", None)  # the whole trail and its anchor, where supported
    if verify_set is not None:
        return list(verify_set(path).problems)
    return list(audit.verify(path))


def test_audit_log_replaced_by_a_directory_refuses_every_call(live: Installation) -> None:
    path = live.paths.audit_log
    broker = pwd.getpwnam("mcp-broker")
    assert live.mcp("call", "demo.echo", "text=before").code == 0
    saved = Path(path).read_bytes()
    os.unlink(path)
    os.mkdir(path, 0o700)  # now the daemon cannot open it again
    try:
        r, took = timed(lambda: live.mcp("call", "demo.slow", "seconds=3"))
        assert r.code == 69 and took < 2.5, (r, took)  # refused before the tool ran
        assert "audit" in one_line(r)
        r = live.mcp("call", "demo.echo", "text=x", "--json")
        assert r.code == 69 and json.loads(r.out) == {"error": one_line(r)[len("mcp: ") :], "exit": 69}
    finally:
        os.rmdir(path)
        Path(path).write_bytes(saved)
        os.chown(path, broker.pw_uid, broker.pw_gid)
        os.chmod(path, 0o600)
    assert wait_for(lambda: live.mcp("call", "demo.echo", "text=again").out == "again\n", 5, 0.5)
    assert _verify_chain(path) == []


@dataclass
class DiskFull:
    during: Result
    during_recorded: bool
    first: Result
    first_seconds: float
    marked: bool
    marked_recorded: bool
    second: Result
    recovered_after: int | None
    chain_problems: list[str]
    status_full: str
    status_after: str


def _recorded(audit_log: str, tool: str, outcome: str) -> bool:
    """Whether the audit log holds a record of a call of ``tool`` that ended with ``outcome``."""
    with open(audit_log, "rb") as fh:
        for raw in fh:
            rec = json.loads(raw)
            if rec.get("op") == "call" and rec.get("tool") == tool and rec.get("outcome") == outcome:
                return True
    return False


def _fill(directory: str) -> str:
    """Write a file until the filesystem has not one byte left."""
    filler = f"{directory}/filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for size in (65536, 512, 1):
            with contextlib.suppress(OSError):
                while os.write(fd, b"\0" * size):
                    pass
    finally:
        os.close(fd)
    return filler


@pytest.fixture(scope="module")
def disk_full(inst: Installation, stub: str) -> Iterator[DiskFull]:
    """The audit log on a 1 MiB tmpfs that is then filled: what calls meet, and the recovery."""
    if shutil.which("mount") is None:
        pytest.skip("mount is not available")
    broker = pwd.getpwnam("mcp-broker")
    log_dir = inst.paths.log
    inst.set_allowlist(ALLOWLIST + STUB_TOOLS)
    inst.stop_daemon()
    mounted = subprocess.run(
        [
            "mount",
            "-t",
            "tmpfs",
            "-o",
            f"size=1m,uid={broker.pw_uid},gid={broker.pw_gid},mode=0700",
            "mcpt-audit-full",
            log_dir,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        inst.start_daemon()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        inst.start_daemon(wait_servers=("demo", "web", "stub"))
        # a call already running when the disk fills: admitted with room, so its record must still land
        running = inst.spawn_mcp("call", "demo.slow", "seconds=2", "--json")
        time.sleep(1.0)
        filler = _fill(log_dir)
        out, err = running.communicate(timeout=60)
        during = Result(running.returncode, out, err)
        during_recorded = _recorded(inst.paths.audit_log, "demo.slow", "ok")
        mark = f"{stub}/disk-full"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(mark)
        first, took = timed(lambda: inst.mcp("call", "stub.mark", "name=disk-full"))
        marked = os.path.exists(mark)
        marked_recorded = _recorded(inst.paths.audit_log, "stub.mark", "ok")
        second = inst.mcp("call", "demo.echo", "text=still-full")
        status_full = json.loads(inst.ctl("status", "--json").out)["audit"]
        os.unlink(filler)
        recovered = None
        for attempt in range(1, 4):
            if inst.mcp("call", "demo.echo", "text=space-again").out == "space-again\n":
                recovered = attempt
                break
        problems = _verify_chain(inst.paths.audit_log)
        status_after = json.loads(inst.ctl("status", "--json").out)["audit"]
        yield DiskFull(
            during,
            during_recorded,
            first,
            took,
            marked,
            marked_recorded,
            second,
            recovered,
            problems,
            status_full,
            status_after,
        )
    finally:
        if inst.daemon is not None:  # its log on the tmpfs is thrown away: no need to wait for a clean stop
            inst.daemon.kill()
            inst.daemon.wait()
            inst.daemon = None
        wait_for(lambda: subprocess.run(["umount", log_dir], check=False).returncode == 0, 5, 0.3)
        if os.path.ismount(log_dir):
            subprocess.run(["umount", "-l", log_dir], check=False)
        inst.set_allowlist(ALLOWLIST)
        inst.start_daemon()


def test_full_disk_refuses_calls_then_recovers_with_an_intact_chain(disk_full: DiskFull) -> None:
    for r in (disk_full.first, disk_full.second):
        assert r.code == 69, r
        assert "audit" in one_line(r)
    assert disk_full.second.out == ""  # nothing served while the log cannot be written
    assert disk_full.recovered_after is not None and disk_full.recovered_after <= 2, disk_full
    assert disk_full.chain_problems == []
    # the operator's status says why calls are refused, and clears once there is room
    assert "filesystem is full" in disk_full.status_full, disk_full.status_full
    assert disk_full.status_after == "ok"


def test_full_disk_never_runs_a_tool_it_cannot_record(disk_full: DiskFull) -> None:
    assert disk_full.first.code == 69
    assert disk_full.first_seconds < 5, disk_full.first_seconds  # refused up front, not after a wait
    assert not disk_full.marked, "the tool ran although its call could not be recorded"
    assert not disk_full.marked_recorded


def test_call_running_when_the_disk_fills_is_answered_and_recorded(disk_full: DiskFull) -> None:
    # the log's reservation (fallocate past its end) holds the record of a call admitted before the disk filled
    assert disk_full.during.code == 0, disk_full.during
    assert json.loads(disk_full.during.out)["content"][0]["text"] == "slept 2.0", disk_full.during
    assert disk_full.during_recorded, "a call was answered but its record is not in the audit log"
