"""Nothing lost, nothing crashes: every input and every server answer handled, for real.

Each finding of the robustness issue is reproduced through the installed
``mcp`` as an agent user (the gate runs under ``python3 -IS`` through sudo, as
in production) or with a deliberately broken stdio server behind the real
daemon (``tests/e2e/servers/hostile.py``): no traceback ever reaches the agent,
every exit code is the contract's, every call that reached a server has its
intent and outcome records, and another agent keeps being served.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import (
    AGENT1,
    AGENT_ENV,
    RUNUSER,
    Installation,
    Result,
    clean,
    hostile_calls,
    other_agent_is_served,
    servers,
    verify_ok,
    wait_for,
)

# --- what an agent types -------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["{'text': 1", '{"text": 1', "[", "", '{"text": 1}}', "\udcff"])
def test_invalid_json_in_args_is_one_usage_line(hostile: Installation, bad: str) -> None:
    r = clean(hostile.mcp("call", "demo.echo", "--args", bad))
    assert r.code == 64 and len(r.err.splitlines()) == 1, r


def test_out_of_range_numbers_are_refused_with_65_and_recorded(hostile: Installation) -> None:
    before = len(hostile.records())
    r = clean(hostile.mcp("call", "demo.echo", "--args", '{"text": 1e400}'))
    assert r.code == 65 and "range" in r.err
    r = clean(hostile.mcp("call", "demo.show", "tags=[1e400]"))
    assert r.code == 65, r
    r = clean(hostile.mcp("call", "demo.show", "count=1e400"))
    assert r.code == 65, r
    new = hostile.records()[before:]
    assert [rec["exit"] for rec in new if rec.get("caller") == AGENT1] == [65, 65, 65], new
    assert all(rec.get("phase") is None for rec in new)  # refused before any server was called
    other_agent_is_served(hostile)


def test_a_closed_stdout_or_stdin_is_one_line_and_64_and_runs_nothing(hostile: Installation) -> None:
    before = len(hostile.records())
    for script in ('exec "$0" status >&-', 'exec "$0" call demo.echo text=never >&-', 'exec "$0" stdio <&-'):
        r = clean(hostile.as_user(AGENT1, "/bin/sh", "-c", script, hostile.paths.mcp))
        assert r.code == 64 and len(r.err.splitlines()) == 1 and "closed" in r.err, (script, r)
    assert not [rec for rec in hostile.records()[before:] if rec.get("tool") == "demo.echo"]  # nothing ran


def _children(pid: int) -> list[tuple[int, bytes]]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append((int(entry), cmd))
    return found


def _sudo_of(proc: subprocess.Popen[str]) -> int:
    """The pid of sudo under runuser, once the gate runs under it: sudo relays a Ctrl-C to the gate."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for pid, cmd in _children(proc.pid):
            if cmd.startswith(b"sudo") and any(b"mcp-gate" in c for _p, c in _children(pid)):
                return pid
        time.sleep(0.05)
    raise AssertionError("no gate under sudo under the agent's command")


@pytest.mark.parametrize("argv", [["call", "demo.slow", "seconds=5"], ["stdio"]])
def test_ctrl_c_is_one_line_and_130(hostile: Installation, argv: list[str]) -> None:
    proc = hostile.spawn_mcp(*argv, stdin=True)
    try:
        sudo = _sudo_of(proc)
        time.sleep(1.0)  # the gate is up and waiting (the call is running, or the session is open)
        os.kill(sudo, signal.SIGINT)
        # wait with stdin still open: communicate() would close it, and a stdio session that reads EOF before
        # the relayed SIGINT arrives ends cleanly (0), which is not what this asserts
        proc.wait(timeout=20)
        out, err = proc.communicate(timeout=10)
    finally:
        hostile.kill_tree(proc)
    r = clean(Result(proc.returncode, out, err))
    assert r.code == 130 and r.err == "mcp: interrupted\n", r


# --- mcp stdio: a raw JSON-RPC peer -----------------------------------------------------------


def stdio(inst: Installation, lines: list[bytes], timeout: float = 60) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run(
        [RUNUSER, "-u", AGENT1, "--", inst.paths.mcp, "stdio"],
        input=b"".join(lines),
        capture_output=True,
        env=AGENT_ENV,
        cwd="/",
        timeout=timeout,
        check=False,
    )
    return proc.returncode, [json.loads(x) for x in proc.stdout.splitlines()], proc.stderr.decode()


def jline(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


INIT = jline({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}})


def call_line(msg_id: int, name: str, arguments: Any) -> bytes:
    return jline(
        {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": {"name": name, "arguments": arguments}}
    )


def test_stdio_answers_each_bad_line_and_keeps_the_calls_in_flight(hostile: Installation) -> None:
    lines = [
        INIT,
        call_line(2, "demo.slow", {"seconds": 1}),
        b"{'not': json}\n",
        b"\xff\xfe\n",
        b'{"jsonrpc": "2.0", "id": 3, "method": "tools/call", '
        b'"params": {"name": "demo.echo", "arguments": {"text": 1e400}}}\n',
        b"[1, 2\n",
        call_line(4, "demo.echo", {"text": "after the noise"}),
        jline({"jsonrpc": "2.0", "id": 5, "method": "ping"}),
    ]
    code, answers, err = stdio(hostile, lines)
    assert code == 0 and "Traceback" not in err, err
    by_id = {a.get("id"): a for a in answers if a.get("id") is not None}
    assert by_id[2]["result"]["content"][0]["text"].startswith("slept")
    assert by_id[3]["result"]["isError"] and "exit 65" in by_id[3]["result"]["content"][0]["text"]
    assert by_id[4]["result"]["content"][0]["text"] == "after the noise"
    assert by_id[5]["result"] == {}
    assert [a["error"]["code"] for a in answers if a.get("id") is None] == [-32700, -32700, -32700]


def test_stdio_an_oversized_line_fails_alone(hostile: Installation) -> None:
    huge = b'{"jsonrpc": "2.0", "id": 9, "method": "ping", "pad": "' + b"x" * (5 * 1024 * 1024) + b'"}\n'
    code, answers, err = stdio(hostile, [INIT, huge, jline({"jsonrpc": "2.0", "id": 10, "method": "ping"})])
    assert code == 0, err
    assert [a["error"]["code"] for a in answers if a.get("id") is None] == [-32600]
    assert {a.get("id"): a for a in answers}[10]["result"] == {}


# --- what a broken server answers -------------------------------------------------------------


def test_nan_and_surrogates_from_a_server_are_replaced_flagged_and_recorded(hostile: Installation) -> None:
    r = clean(hostile.mcp("call", "hostile.nan", "--json"))
    assert r.code == 0, r
    assert json.loads(r.out)["structuredContent"] == {"v": None, "w": None, "ok": 1}
    assert "replaced" in r.err
    r = clean(hostile.mcp("call", "hostile.surrogate_text"))
    assert (r.code, r.out) == (0, "half \ufffd a pair\n"), r
    r = clean(hostile.mcp("call", "hostile.surrogate_error"))
    assert r.code == 1 and "broken \ufffd message" in r.err, r
    outcomes = {rec["tool"]: rec for rec in hostile.records() if rec.get("phase") == "outcome"}
    assert outcomes["hostile.nan"]["outcome"] == "ok" and outcomes["hostile.nan"]["sanitized"]["non_finite"] == 2
    assert outcomes["hostile.surrogate_error"]["exit"] == 1
    assert servers(hostile)["hostile"]["state"] == "up"
    st = hostile.ctl("status", "--json")
    assert json.loads(st.out)["audit"] == "ok"  # the log never turned unhealthy
    other_agent_is_served(hostile)
    verify_ok(hostile)


def test_a_servers_json_rpc_error_is_exit_1_with_its_message(hostile: Installation) -> None:
    r = clean(hostile.mcp("call", "hostile.rpc_error"))
    assert r.code == 1 and "the tool broke" in r.err, r
    code, answers, _err = stdio(hostile, [INIT, call_line(2, "hostile.rpc_error", {})])
    assert code == 0
    error = {a.get("id"): a for a in answers}[2]["error"]
    assert error["code"] == -32000 and "the tool broke" in error["message"]


def test_an_answer_over_the_cap_fails_that_call_and_the_server_serves_on(hostile: Installation) -> None:
    started = time.monotonic()
    r = clean(hostile.mcp("call", "hostile.huge", "size=2000000"))
    assert r.code == 1 and "over 1048576 bytes" in r.err, r
    assert time.monotonic() - started < 10
    r = clean(hostile.mcp("call", "hostile.garbage"))
    assert (r.code, r.out) == (0, "after garbage\n"), r
    assert servers(hostile)["hostile"]["restarts"] == 0 or servers(hostile)["hostile"]["state"] == "up"


def test_an_answer_to_the_wrong_id_times_out_alone(hostile: Installation) -> None:
    r = clean(hostile.mcp("call", "hostile.wrong_id", "--timeout", "2"))
    assert r.code == 75, r
    other_agent_is_served(hostile)


def test_a_server_with_endless_pages_is_refused_with_its_reason(hostile: Installation) -> None:
    assert wait_for(lambda: "pages" in servers(hostile).get("pages", {}).get("reason", ""), 20), servers(hostile)
    assert servers(hostile)["pages"]["state"] == "down"
    r = clean(hostile.mcp("call", "pages.t0"))
    assert r.code == 69, r


def test_every_call_that_reached_the_server_has_its_intent_and_outcome(hostile: Installation) -> None:
    for i in range(3):
        clean(hostile.mcp("call", "hostile.record", f"tag=io{i}"))
    recs = hostile.records()
    intents = {r["id"]: r for r in recs if r.get("phase") == "intent"}
    outcomes = {r["id"]: r for r in recs if r.get("phase") == "outcome"}
    reached = [
        c for c in hostile_calls(hostile) if c["tool"] == "record" and str(c["args"].get("tag", "")).startswith("io")
    ]
    assert len(reached) == 3
    mine = [r for r in intents.values() if r.get("tool") == "hostile.record"]
    assert len(mine) >= 3 and all(r["id"] in outcomes for r in mine)
    for rec in mine:
        assert recs.index(rec) < recs.index(outcomes[rec["id"]])  # the intent was written first


# --- the daemon killed while a server works -----------------------------------------------------


def test_sigkill_while_a_server_works_leaves_the_call_in_the_trail(hostile: Installation) -> None:
    """The daemon dies between asking a server and recording the outcome: the call is still in the trail.

    The hostile server takes one call at a time, so of three calls one is at
    the server when the daemon is killed, and the others wait in its pipe.
    Every call that reached the server has its intent and an outcome (the
    outcome recorded before the kill, or "unknown", written at the next start).
    """
    before = {c["args"]["tag"] for c in hostile_calls(hostile) if c["tool"] == "record"}
    procs = [hostile.spawn_mcp("call", "hostile.record", f"tag=killed{i}", "seconds=3") for i in range(3)]
    try:
        assert wait_for(lambda: any("killed" in str(c["args"].get("tag")) for c in hostile_calls(hostile)), 20)
        assert hostile.daemon is not None
        hostile.daemon.send_signal(signal.SIGKILL)
        hostile.daemon.wait(10)
        codes = [p.wait(20) for p in procs]
    finally:
        for p in procs:
            hostile.kill_tree(p)
    assert 69 in codes, codes  # the call at the server lost its broker
    hostile.start_daemon(wait_servers=("demo", "hostile"))
    reached = [c["args"]["tag"] for c in hostile_calls(hostile) if c["tool"] == "record"]
    reached = [tag for tag in reached if tag not in before]
    recs = hostile.records()
    intents = {r["id"]: r for r in recs if r.get("phase") == "intent" and r.get("tool") == "hostile.record"}
    outcomes = {r["id"]: r for r in recs if r.get("phase") == "outcome"}
    assert len(intents) >= len(reached) >= 1
    assert all(i in outcomes for i in intents), [i for i in intents if i not in outcomes]
    unknown = [outcomes[i] for i in intents if outcomes[i].get("outcome") == "unknown"]
    assert len(unknown) >= 1 and all(u["caller"] == AGENT1 for u in unknown)
    r = hostile.ctl("audit", "verify")
    assert r.code == 0, r.out + r.err
    other_agent_is_served(hostile)
