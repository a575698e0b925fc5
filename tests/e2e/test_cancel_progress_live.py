"""Cancellation and progress, end to end: a cancelled call stops at its server, and progress reaches its caller.

The demo server's ``work`` tool reports progress at every step and leaves a
mark (a file in its own home) when it completes, so a call that was really
stopped leaves none. Driven as the agent through sudo: raw JSON-RPC on
``mcp stdio`` (``notifications/cancelled``, ``_meta.progressToken``) and
``mcp call`` interrupted with Ctrl-C (SIGINT to its process group, as a
terminal sends it). The audit says ``cancelled``.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.harness import ALLOWLIST, Installation, wait_for

WORK = ALLOWLIST + "demo.work\nweb.work\n"


@pytest.fixture
def work(live: Installation) -> Iterator[Installation]:
    live.set_allowlist(WORK)
    yield live


def mark(inst: Installation, tag: str) -> str:
    return f"{inst.paths.server_home('demo')}/work-{tag}.done"


class Session:
    """``mcp stdio`` as the agent, spoken to line by line."""

    def __init__(self, inst: Installation) -> None:
        self.proc = inst.spawn_mcp("stdio", stdin=True)
        self.buf = ""
        self.send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": _init()})
        assert self.until(lambda m: m.get("id") == 0, 20) is not None
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})

    def send(self, msg: dict[str, Any]) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()

    def read(self, seconds: float) -> list[dict[str, Any]]:
        """Every message that arrives within ``seconds``."""
        assert self.proc.stdout is not None
        out: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        fd = self.proc.stdout.fileno()
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                break
            chunk = os.read(fd, 65536).decode()
            if not chunk:
                break
            self.buf += chunk
            while "\n" in self.buf:
                line, self.buf = self.buf.split("\n", 1)
                out.append(json.loads(line))
        return out

    def through(self, msg_id: Any, seconds: float) -> list[dict[str, Any]]:
        """Every message up to and with the answer to ``msg_id`` (or all there were within ``seconds``)."""
        got: list[dict[str, Any]] = []
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not any(m.get("id") == msg_id for m in got):
            got += self.read(0.5)
        return got

    def until(self, pred: Any, seconds: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            for m in self.read(min(0.5, deadline - time.monotonic())):
                if pred(m):
                    return m
        return None

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            Installation.kill_tree(self.proc)


def _init() -> dict[str, Any]:
    return {"protocolVersion": "2025-11-25", "capabilities": {}, "clientInfo": {"name": "e2e", "version": "1"}}


def work_call(i: int, tag: str, seconds: float, token: str | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": "demo.work", "arguments": {"seconds": seconds, "steps": 8, "tag": tag}}
    if token is not None:
        params["_meta"] = {"progressToken": token}
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params}


def outcomes(inst: Installation, tool: str = "demo.work") -> list[str]:
    return [str(r.get("outcome")) for r in inst.records() if r.get("tool") == tool and r.get("phase") == "outcome"]


def test_progress_reaches_the_caller_and_the_call_completes(work: Installation) -> None:
    tag = uuid.uuid4().hex[:12]
    s = Session(work)
    try:
        s.send(work_call(1, tag, 1.6, token="p-1"))
        got = s.through(1, 30)
    finally:
        s.close()
    progress = [m["params"] for m in got if m.get("method") == "notifications/progress"]
    assert progress and all(p["progressToken"] == "p-1" for p in progress), got
    assert [p["progress"] for p in progress] == sorted(p["progress"] for p in progress)
    assert progress[-1] == {"progressToken": "p-1", "progress": 8, "total": 8, "message": "done"}
    answer = next(m for m in got if m.get("id") == 1)
    assert answer["result"]["content"][0]["text"] == "worked 1.6 s in 8 steps"
    assert os.path.exists(mark(work, tag))


def test_progress_from_a_streamable_http_server_reaches_the_caller(work: Installation) -> None:
    s = Session(work)
    try:
        msg = work_call(1, "", 1.0, token=7)  # no mark: that server's HOME is not its own
        msg["params"]["name"] = "web.work"
        s.send(msg)
        got = s.through(1, 30)
    finally:
        s.close()
    progress = [m["params"] for m in got if m.get("method") == "notifications/progress"]
    assert progress and {p["progressToken"] for p in progress} == {7}, got
    assert next(m for m in got if m.get("id") == 1)["result"]["isError"] is False


def test_a_cancelled_call_stops_at_its_server_and_is_audited(work: Installation) -> None:
    tag = uuid.uuid4().hex[:12]
    before = len(outcomes(work))
    s = Session(work)
    try:
        s.send(work_call(1, tag, 4.0, token="p-2"))
        first = s.until(lambda m: m.get("method") == "notifications/progress", 20)
        assert first is not None, "no progress before the cancel"
        s.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
        time.sleep(0.3)  # what was already on its way may still arrive
        s.read(0.2)
        after = s.read(5.5)  # longer than the call would have run
        s.send(
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "demo.echo", "arguments": {"text": "on"}},
            }
        )
        still = s.until(lambda m: m.get("id") == 2, 20)
    finally:
        s.close()
    assert not any(m.get("id") == 1 for m in after), after  # its result never arrives
    assert not [m for m in after if m.get("method") == "notifications/progress"], after  # its progress stopped
    assert still is not None and still["result"]["content"][0]["text"] == "on"  # the session goes on
    assert not os.path.exists(mark(work, tag))  # the server stopped: its side effect never happened
    assert wait_for(lambda: outcomes(work)[before:] == ["cancelled"], 10), outcomes(work)[before:]


def test_ctrl_c_on_mcp_call_cancels_the_call_upstream(work: Installation) -> None:
    tag = uuid.uuid4().hex[:12]
    before = len(outcomes(work))
    seen = len(work.records())
    proc = work.spawn_mcp("call", "demo.work", "seconds=4", "steps=8", f"tag={tag}")
    try:
        assert wait_for(lambda: _started(work, seen), 20)  # its intent is recorded: it has reached the server
        time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C sends to the foreground group
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            Installation.kill_tree(proc)
    assert proc.returncode == 130, (proc.returncode, err)
    assert "Traceback" not in err
    assert wait_for(lambda: outcomes(work)[before:] == ["cancelled"], 10), outcomes(work)[before:]
    time.sleep(4.5)
    assert not os.path.exists(mark(work, tag))


def test_mcp_call_shows_progress_on_a_terminal_only(work: Installation) -> None:
    import pty

    from tests.e2e.harness import AGENT1, AGENT_ENV, RUNUSER

    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen(
            [RUNUSER, "-u", AGENT1, "--", work.paths.mcp, "call", "demo.work", "seconds=1", "steps=4", "tag="],
            stdout=subprocess.PIPE,
            stderr=secondary,
            env=AGENT_ENV,
            cwd="/",
        )
        out, _ = proc.communicate(timeout=30)
        os.close(secondary)
        secondary = -1
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(primary)
        if secondary >= 0:
            os.close(secondary)
    assert proc.returncode == 0 and out == b"worked 1.0 s in 4 steps\n", (proc.returncode, out, seen)
    assert b"\rmcp: progress 1/4: step 2 of 4" in seen and seen.endswith(b"\r\x1b[K"), seen
    quiet = work.mcp("call", "demo.work", "seconds=0.4", "steps=2", "tag=")  # stderr a pipe: no progress
    assert (quiet.code, quiet.err) == (0, ""), quiet


def _started(inst: Installation, seen: int) -> bool:
    """A demo.work call's intent is among the records written since the first ``seen``."""
    return any(r.get("tool") == "demo.work" and r.get("phase") == "intent" for r in inst.records()[seen:])


# --- tools/list_changed, whatever changed the list --------------------------------------------------


def _changes(s: Session, seconds: float) -> list[dict[str, Any]]:
    return [m for m in s.read(seconds) if m.get("method") == "notifications/tools/list_changed"]


def test_list_changed_when_a_server_goes_down_and_up_and_when_it_changes_its_own_list(work: Installation) -> None:
    work.set_allowlist(WORK + "demo.grow\ndemo.grown\ndemo.crash\n")
    s = Session(work)
    try:
        s.read(2.5)  # the session's watch is open (it opens within a second of initialize)
        # the server's own word: it adds a tool and says so; the broker lists it again and tells the session
        s.send({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "demo.grow", "arguments": {}}})
        got = s.read(4.0)
        assert any(m.get("id") == 1 for m in got), got
        assert [m for m in got if m.get("method") == "notifications/tools/list_changed"], got
        s.send({"jsonrpc": "2.0", "id": 2, "method": "tools/list"})
        listed = s.until(lambda m: m.get("id") == 2, 20)
        assert listed is not None and "demo.grown" in {t["name"] for t in listed["result"]["tools"]}
        # the server dies: its tools go (told), it is restarted: they come back (told again)
        s.send({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "demo.crash", "arguments": {}}})
        seen = [m for m in s.read(8.0) if m.get("method") == "notifications/tools/list_changed"]
        assert seen, "no list_changed after the server went down and came back"
    finally:
        s.close()


# --- an upstream of the stateless era only, over streamable HTTP ---------------------------------------------


@pytest.fixture
def stateless(work: Installation) -> Iterator[Installation]:
    """The demo server over HTTP refusing the handshake (2026-07-28 only), behind the broker with its token."""
    import pwd
    import socket
    import subprocess

    from tests.e2e.harness import PYTHON, write, write_servers_d

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = uuid.uuid4().hex
    broker = pwd.getpwnam("mcp-broker")
    proc = subprocess.Popen(
        [PYTHON, "-m", "mcp_servers.demo", "--http", f"127.0.0.1:{port}", "--stateless-only"],
        env={"PATH": "/usr/bin:/bin", "DEMO_TOKEN": token, "HOME": "/"},
        user=broker.pw_uid,
        group=broker.pw_gid,
        extra_groups=[],
        cwd="/",
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env_file = f"{work.paths.secrets}/stateless.env"
    write(env_file, f"STATELESS_TOKEN={token}\n", 0, 0, 0o600)
    conf = write_servers_d(
        work,
        "stateless.toml",
        f'[servers.stateless]\nurl = "http://127.0.0.1:{port}/mcp"\nenv_file = "{env_file}"\n'
        'headers = { Authorization = "Bearer ${STATELESS_TOKEN}" }\n',
    )
    try:
        assert wait_for(lambda: _port_open(port), 30)
        assert work.ctl("reload").code == 0
        from tests.e2e.harness import servers

        assert wait_for(lambda: servers(work).get("stateless", {}).get("state") == "up", 30), servers(work)
        work.set_allowlist(WORK + "stateless.echo\nstateless.work\n")
        yield work
    finally:
        os.unlink(conf)
        os.unlink(env_file)
        work.ctl("reload")
        proc.terminate()
        proc.wait(10)


def _port_open(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


def test_an_upstream_of_the_stateless_era_only_is_spoken_to_in_its_era(stateless: Installation) -> None:
    r = stateless.mcp("call", "stateless.echo", "text=over the stateless era")
    assert (r.code, r.out) == (0, "over the stateless era\n"), r
    s = Session(stateless)
    try:
        msg = work_call(1, "", 0.8, token="st")
        msg["params"]["name"] = "stateless.work"
        s.send(msg)
        got = s.through(1, 30)
    finally:
        s.close()
    assert [m for m in got if m.get("method") == "notifications/progress"], got
    assert next(m for m in got if m.get("id") == 1)["result"]["isError"] is False
