"""One agent cannot hurt another: two agents on one real broker, one of them hostile.

mcpt-agent1 attacks (through its own ``mcp``, and as a compromised gate
process speaking gate.sock itself); mcpt-agent2 is the victim, whose calls
must all succeed, each within 10 s, while the attacker floods, stalls,
holds approvals or times out. Every refusal the attacker meets is the
documented one (75, saying when to retry) and is in the audit trail.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.core import wire
from tests.e2e.harness import (
    AGENT1,
    AGENT2,
    PYTHON,
    Installation,
    clean,
    connect_as,
    gate_user,
    servers,
    verify_ok,
    wait_for,
    write,
    write_servers_d,
)

LIMITS = """\
max_server_message_bytes = 1048576
max_sessions = 4
max_calls_in_flight = 6
max_pending_approvals = 2
write_timeout = 2
cancel_grace = 3
"""

POLICY = """\
[policy."demo.show"]
mode = "approve"

[policy."demo.echo"]
mode = "approve"
rate = "1/hour"
"""

VICTIM_ALLOWLIST = "demo.add\ndemo.big\nhostile.record\nseq.record\n"


@pytest.fixture(scope="module")
def nb(hostile: Installation) -> Iterator[Installation]:
    import pwd

    gate = pwd.getpwnam("mcp-gate")
    # the hostile script again, declared as what it is: a server that handles one request at a time
    script = f"{hostile.root}/hostile_server.py"
    seq = write_servers_d(
        hostile, "seq.toml", f'[servers.seq]\ncommand = "{PYTHON}"\nargs = ["{script}"]\nconcurrency = 1\n'
    )
    hostile.write_broker_toml(LIMITS, POLICY)
    assert hostile.ctl("reload").code == 0
    assert wait_for(lambda: servers(hostile).get("seq", {}).get("state") == "up", 20), servers(hostile)
    write(hostile.paths.user_allowlist(AGENT2), VICTIM_ALLOWLIST, 0, gate.pw_gid, 0o640)
    attacker = Path(hostile.paths.allowlist).read_text()
    hostile.set_allowlist(attacker + "seq.record\n")
    try:
        yield hostile
    finally:
        os.unlink(seq)
        hostile.set_allowlist(attacker)
        for a in json.loads(hostile.ctl("approvals", "--json").out or "[]"):
            hostile.ctl("reject", a["id"])
        write(hostile.paths.user_allowlist(AGENT2), "demo.add\n", 0, gate.pw_gid, 0o640)
        hostile.write_broker_toml("max_server_message_bytes = 1048576")
        hostile.ctl("reload")


def victim_is_served(inst: Installation, times: int = 3) -> list[float]:
    """The victim's calls: every one succeeds, each within 10 s; their durations."""
    took = []
    for n in range(times):
        started = time.monotonic()
        r = inst.mcp("call", "demo.add", f"a={n}", "b=1", user=AGENT2, timeout=30)
        took.append(time.monotonic() - started)
        assert (r.code, r.out) == (0, f"{n + 1}\n"), r
        assert took[-1] < 10, took
    return took


def limit_records(inst: Installation, kind: str) -> list[dict[str, object]]:
    return [r for r in inst.records() if r.get("op") == "limit" and r.get("limit") == kind]


def daemon_rss_kib(inst: Installation) -> int:
    assert inst.daemon is not None
    for line in Path(f"/proc/{inst.daemon.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def pending(inst: Installation, action: str) -> list[dict[str, object]]:
    return [a for a in json.loads(inst.ctl("approvals", "--json").out) if a["action"] == action]


# --- a shared server that handles one request at a time ------------------------------------------


def test_one_agents_timeout_never_ends_anothers_call_at_a_shared_server(nb: Installation) -> None:
    before = {s: v.get("restarts") for s, v in servers(nb).items()}
    victim = nb.spawn_mcp("call", "hostile.record", "seconds=12", "tag=victim", "--timeout", "25", user=AGENT2)
    time.sleep(1.0)
    # the hostile server is sequential and ignores cancels: the attacker's call queues behind the victim's
    r = nb.mcp("call", "hostile.record", "seconds=20", "tag=attacker", "--timeout", "2", timeout=30)
    clean(r)
    assert r.code == 75 and "timed out" in r.err, r
    out, err = victim.communicate(timeout=40)
    # before: the broker pinged the busy server after the attacker's timeout and restarted it (victim: 69)
    assert victim.returncode == 0 and "recorded victim" in out, (victim.returncode, out, err)
    # the server, stuck on the cancelled call, is restarted by the stated rule once nothing else is in flight
    assert wait_for(lambda: servers(nb)["hostile"].get("restarts", 0) > (before["hostile"] or 0), 30)
    assert wait_for(lambda: servers(nb)["hostile"]["state"] == "up", 30)
    victim_is_served(nb, 1)


def test_a_burst_of_one_agent_waits_its_turn_behind_anothers_call(nb: Installation) -> None:
    # the server takes one call at a time: before, calls reached it in arrival order, the victim's last
    burst = [nb.spawn_mcp("call", "seq.record", "seconds=1.5", f"tag=flood{n}", "--timeout", "20") for n in range(4)]
    try:
        time.sleep(1.0)  # the burst is queued
        started = time.monotonic()
        r = nb.mcp("call", "seq.record", "seconds=0", "tag=victim", "--timeout", "20", user=AGENT2)
        took = time.monotonic() - started
        assert (r.code, r.out) == (0, "recorded victim\n"), r
        assert took < 3.5, took  # its turn came right after the call being served, not after all four
    finally:
        for p in burst:
            p.communicate(timeout=30)
    assert [p.returncode for p in burst] == [0, 0, 0, 0]


# --- approvals: a cap, and rate slots taken at admission -------------------------------------------


def test_pending_approvals_are_capped_per_caller(nb: Installation) -> None:
    held = [nb.spawn_mcp("call", "demo.show", f"note=held{n}") for n in range(2)]
    try:
        assert wait_for(lambda: len(pending(nb, "demo.show")) == 2, 20)
        started = time.monotonic()
        r = nb.mcp("call", "demo.show", "note=third")
        clean(r)
        assert r.code == 75 and "max_pending_approvals" in r.err and "retry" in r.err, r
        assert time.monotonic() - started < 10
        assert len(pending(nb, "demo.show")) == 2  # the third made no row
        victim_is_served(nb)
        refused = [x for x in nb.records() if "max_pending_approvals" in str(x.get("reason", ""))]
        assert refused and refused[-1]["caller"] == AGENT1 and refused[-1]["exit"] == 75
    finally:
        for a in pending(nb, "demo.show"):
            nb.ctl("reject", str(a["id"]))
        for p in held:
            p.communicate(timeout=30)
    assert [p.returncode for p in held] == [77, 77]


def test_a_rate_slot_is_taken_before_the_approval_wait_and_given_back_on_rejection(nb: Installation) -> None:
    first = nb.spawn_mcp("call", "demo.echo", "text=one")
    assert wait_for(lambda: len(pending(nb, "demo.echo")) == 1, 20)
    # before: each of these became a pending approval of its own, and all of them ran once approved
    for text in ("two", "three"):
        r = nb.mcp("call", "demo.echo", f"text={text}")
        clean(r)
        assert r.code == 75 and "rate limit 1/hour" in r.err, r
    assert len(pending(nb, "demo.echo")) == 1
    (request,) = pending(nb, "demo.echo")
    assert nb.ctl("reject", str(request["id"])).code == 0
    first.communicate(timeout=30)
    assert first.returncode == 77
    # rejected: the slot came back, so the next call may ask again, and runs once approved
    again = nb.spawn_mcp("call", "demo.echo", "text=again")
    assert wait_for(lambda: len(pending(nb, "demo.echo")) == 1, 20)
    (request,) = pending(nb, "demo.echo")
    assert nb.ctl("approve", str(request["id"])).code == 0
    out, _err = again.communicate(timeout=30)
    assert again.returncode == 0 and out == "again\n"
    r = nb.mcp("call", "demo.echo", "text=after")
    assert r.code == 75 and "rate limit" in r.err, r  # it ran: its slot is spent
    ran = [x for x in nb.records() if x.get("tool") == "demo.echo" and x.get("phase") == "intent"]
    assert [x["caller"] for x in ran][-1:] == [AGENT1]
    victim_is_served(nb, 1)


# --- connections and gate processes, as a compromised gate ---------------------------------------


def test_sessions_beyond_the_cap_are_refused_with_75_and_audited(nb: Installation) -> None:
    held = [connect_as(gate_user(AGENT1), nb.paths.gate_sock) for _ in range(4)]  # each from its own process
    try:
        r = nb.mcp("call", "demo.add", "a=1", "b=1")
        clean(r)
        assert r.code == 75 and "max_sessions" in r.err and "retry" in r.err, r
        victim_is_served(nb)
        assert wait_for(lambda: limit_records(nb, "connections"), 10)
        rec = limit_records(nb, "connections")[-1]
        assert rec["caller"] == AGENT1 and rec["decision"] == "throttle"
    finally:
        for s in held:
            s.close()
    assert wait_for(lambda: nb.mcp("call", "demo.add", "a=1", "b=1").code == 0, 10)  # released when they close


def test_a_gate_that_never_reads_its_answer_is_dropped_and_the_daemon_does_not_keep_it(nb: Installation) -> None:
    idle = daemon_rss_kib(nb)
    socks = []
    for _ in range(3):
        s = connect_as(gate_user(AGENT1), nb.paths.gate_sock)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        call = {
            "v": wire.PROTOCOL_VERSION,
            "op": "call",
            "tool": "demo.big",
            "kv": [["size", "450000"]],
            "args": None,
            "timeout": None,
        }
        s.sendall(wire.encode_frame(call, wire.MAX_REQUEST_BYTES))
        socks.append(s)
    try:
        assert wait_for(lambda: len(limit_records(nb, "unread")) >= 1, 20)
        rec = limit_records(nb, "unread")[-1]
        assert rec["caller"] == AGENT1 and rec["decision"] == "drop" and "unread" in str(rec["reason"])
        victim_is_served(nb)
        time.sleep(1)
        assert daemon_rss_kib(nb) < idle + 64 * 1024
    finally:
        for s in socks:
            s.close()
    assert nb.mcp("call", "demo.add", "a=1", "b=1").code == 0  # its calls in flight were released


def test_stuck_stdio_sessions_at_the_cap_leave_the_victim_served_and_memory_bounded(nb: Installation) -> None:
    idle = daemon_rss_kib(nb)
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"protocolVersion": "2025-11-25"}}
    lines = [json.dumps(init)]
    for n in range(1, 13):
        args = {"name": "demo.big", "arguments": {"size": 450_000}}  # answers of ~1 MB, under the server cap
        lines.append(json.dumps({"jsonrpc": "2.0", "id": n, "method": "tools/call", "params": args}))
    stuck = []
    for _ in range(4):
        p = nb.spawn_mcp("stdio", stdin=True)
        assert p.stdin is not None
        p.stdin.write("\n".join(lines) + "\n")
        p.stdin.flush()  # and nobody ever reads its stdout
        stuck.append(p)
    try:
        time.sleep(4)
        peak = daemon_rss_kib(nb)
        victim_is_served(nb, 5)
        peak = max(peak, daemon_rss_kib(nb))
        print(f"daemon RSS: idle {idle} KiB, peak {peak} KiB")
        assert peak < idle + 64 * 1024, (idle, peak)
    finally:
        for p in stuck:
            nb.kill_tree(p)
    assert wait_for(lambda: nb.mcp("call", "demo.add", "a=1", "b=1").code == 0, 15)
    time.sleep(1)
    after = daemon_rss_kib(nb)
    print(f"daemon RSS after: {after} KiB")
    assert after < idle + 32 * 1024, (idle, after)


# --- audit volume ------------------------------------------------------------------------------


def test_an_agent_flooding_the_audit_trail_is_throttled_and_the_other_is_not(nb: Installation) -> None:
    small = f'[limits."{AGENT1}"]\naudit_bytes_per_window = 30000\naudit_window = 3600\n'
    nb.write_broker_toml(LIMITS, POLICY + small)
    assert nb.ctl("reload").code == 0
    first = len(nb.records())
    try:
        refused = None
        for n in range(200):
            r = nb.mcp("call", "demo.add", f"a={n}", "b=0")
            if r.code != 0:
                refused = r
                break
        assert refused is not None and refused.code == 75, refused
        assert "audit_bytes_per_window" in refused.err and "retry in" in refused.err
        for _ in range(5):  # still throttled: each refusal is summed, not written one by one
            assert nb.mcp("call", "demo.add", "a=1", "b=1").code == 75
        victim_is_served(nb)
        assert wait_for(lambda: len(limit_records(nb, "audit")) >= 2, 20)  # the first, then the burst's sum
        total = sum(int(str(r.get("refused", 0))) for r in limit_records(nb, "audit"))
        assert total >= 6
        mine = [r for r in nb.records()[first:] if r.get("caller") == AGENT1]
        assert sum(len(json.dumps(r)) for r in mine) < 30000 + 8192  # the budget, and a few summaries
    finally:
        nb.write_broker_toml(LIMITS, POLICY)
        nb.ctl("reload")
    verify_ok(nb)


def test_quota_settings_are_checked_with_their_place(nb: Installation) -> None:
    nb.write_broker_toml(LIMITS.replace("max_sessions = 4", "max_sessions = 0"), POLICY + "[limits.x]\nbogus = 1\n")
    try:
        r = nb.ctl("check")
        assert r.code == 1 and "broker.max_sessions" in r.out + r.err and "limits.x.bogus" in r.out + r.err, r
    finally:
        nb.write_broker_toml(LIMITS, POLICY)
