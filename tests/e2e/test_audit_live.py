"""The audit trail of a real installation: complete, tamper-evident, out of the agent's reach.

A mixed run of allowed, denied (by the gate and by the daemon), rejected,
failing and timed-out calls by both agent users leaves exactly one record
per call with the right fields, and ``mcp-brokerctl audit verify`` passes;
an edited byte, a deleted line, swapped lines or a cut tail make it fail
naming the place. Under load from 16 concurrent agent callers, with the
daemon SIGKILLed mid-run, every call the agent saw succeed has its record.
The agent user can neither read, write, append to nor truncate the log.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.core import wire
from broker.core.paths import Paths
from broker.daemon import audit
from tests.e2e.harness import AGENT1, AGENT2, CTL, Installation, Result, gate_exchange, gate_user

CALL_OPS = ("call", "report", "list", "describe", "status")


def records(paths: Paths) -> list[dict[str, Any]]:
    """Every record of the trail, rotated files first."""
    out: list[dict[str, Any]] = []
    for name in audit.log_files(paths.audit_log):
        with open(name, "rb") as fh:
            out.extend(json.loads(line) for line in fh if line.strip())
    return out


def last_seq(paths: Paths) -> int:
    recs = records(paths)
    return int(recs[-1]["seq"]) if recs else 0


def since(paths: Paths, seq: int) -> list[dict[str, Any]]:
    return [r for r in records(paths) if r["seq"] > seq]


def uid(user: str) -> int:
    return pwd.getpwnam(user).pw_uid


def as_gate(paths: Paths, request: dict[str, Any]) -> dict[str, Any]:
    """Speak gate.sock as agent1's gate user would, bypassing the gate's own check."""
    answer = gate_exchange(gate_user(AGENT1), paths.gate_sock, request)
    assert answer is not None, "the daemon closed the connection"
    return answer


def fingerprint(paths: Paths) -> dict[str, tuple[str, int, int, int]]:
    """Content hash, size, mode and mtime of every audit file (as root sees them)."""
    out = {}
    for name in [*audit.log_files(paths.audit_log), audit.head_path(paths.audit_log)]:
        st = os.stat(name)
        with open(name, "rb") as fh:
            out[name] = (hashlib.sha256(fh.read()).hexdigest(), st.st_size, st.st_mode, st.st_mtime_ns)
    return out


@pytest.fixture
def copies() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="mcp-privsep-audit-copy-")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def copy_trail(paths: Paths, into: str) -> str:
    """Copy the live trail and its anchor; return the copy of audit.jsonl."""
    for name in [*audit.log_files(paths.audit_log), audit.head_path(paths.audit_log)]:
        shutil.copy2(name, os.path.join(into, os.path.basename(name)))
    return os.path.join(into, os.path.basename(paths.audit_log))


# --- (a) a mixed run: one record per call, the right fields, verify ----------------------


def test_mixed_run_leaves_exactly_one_record_per_call_and_verifies(live: Installation) -> None:
    p = live.paths
    a1 = uid(AGENT1)
    global_list, agent2_list = p.allowlist, p.user_allowlist(AGENT2)
    live.ctl("unfreeze", AGENT2)
    start = last_seq(p)
    expected: list[dict[str, Any]] = []

    def call(user: str, *argv: str, code: int, **fields: Any) -> Result:
        r = live.mcp(*argv, user=user)
        assert r.code == code, (argv, r)
        expected.append({"caller": user, "uid": uid(user), "exit": code, **fields})
        return r

    ok = {"op": "call", "decision": "allow", "mode": "allow", "rule": "default"}
    call(AGENT1, "call", "demo.echo", "text=mixed-1", code=0, **ok, tool="demo.echo", outcome="ok",
         arg_keys=["text"], args_digest=live.digest({"text": "mixed-1"}))  # fmt: skip
    call(AGENT2, "call", "demo.add", "a=2", "b=3", code=0, **ok, tool="demo.add", outcome="ok",
         arg_keys=["a", "b"], args_digest=live.digest({"a": 2, "b": 3}))  # fmt: skip
    call(AGENT1, "call", "demo.fail", "message=boom", code=1, **ok, tool="demo.fail", outcome="tool_error",
         args_digest=live.digest({"message": "boom"}))  # fmt: skip
    call(AGENT1, "call", "demo.slow", "seconds=5", "--timeout", "1", code=75, **ok, tool="demo.slow",
         outcome="timeout")  # fmt: skip
    call(AGENT1, "call", "demo.add", "a=x", "b=1", code=65, op="call", tool="demo.add", decision="rejected")
    call(AGENT1, "call", "demo.secret", code=77, op="report", verb="call", tool="demo.secret", decision="deny",
         source="gate", rule=global_list)  # fmt: skip
    call(AGENT2, "call", "demo.echo", "text=no", code=77, op="report", tool="demo.echo", decision="deny",
         source="gate", rule=agent2_list)  # fmt: skip
    call(AGENT1, "call", "demo.echo", "--bogus", code=64, op="report", verb="call", decision="usage", source="gate")
    call(AGENT2, "list", code=0, op="list", decision="allow", rule=agent2_list)
    # the daemon re-checks the allowlist itself (a request that did not come through the gate's check)
    answer = as_gate(p, wire.request("call", tool="demo.secret", kv=[], args=None, timeout=None))
    assert answer["ok"] is False and answer["exit"] == 77
    expected.append({"caller": AGENT1, "uid": a1, "op": "call", "tool": "demo.secret", "decision": "deny",
                     "exit": 77, "rule": global_list})  # fmt: skip
    # a daemon-side denial of an agent's call: a denial budget freezes agent2
    live.set_policy(broker_extra="denial_budget = 2")
    try:
        for _ in range(3):
            call(AGENT2, "call", "demo.whoami", code=77, op="report", tool="demo.whoami", decision="deny")
        r = call(AGENT2, "call", "demo.add", "a=1", "b=1", code=77, op="call", tool="demo.add", decision="deny",
                 rule="denial_budget")  # fmt: skip
        assert "frozen" in r.err
    finally:
        live.ctl("unfreeze", AGENT2)
        live.set_policy()

    new = since(p, start)
    # two-phase audit: a call that reached its server has an intent, then its outcome under the same id;
    # every other request has its one record; so each request has exactly one final record
    intents = {r["id"]: r for r in new if r["op"] in CALL_OPS and r.get("phase") == "intent"}
    calls = [r for r in new if r["op"] in CALL_OPS and r.get("phase") != "intent"]
    reached = [r for r in calls if r.get("phase") == "outcome"]
    assert sorted(intents) == sorted(r["id"] for r in reached), json.dumps(new, indent=1)
    for rec in reached:
        assert new.index(intents[rec["id"]]) < new.index(rec)
        assert {k: intents[rec["id"]].get(k) for k in ("caller", "tool", "args_digest")} == {
            k: rec.get(k) for k in ("caller", "tool", "args_digest")
        }
    assert {r["tool"] for r in reached} == {"demo.echo", "demo.add", "demo.fail", "demo.slow"}
    assert len(calls) == len(expected), json.dumps(calls, indent=1)
    for rec, want in zip(calls, expected, strict=True):
        assert {k: rec.get(k) for k in want} == want, (rec, want)
        for key in ("ts", "id", "seq", "prev", "hash", "decision", "exit"):
            assert key in rec, (key, rec)
        if rec["exit"] not in (0, 1):  # a refusal says why; a tool error is an answer
            assert rec.get("reason"), rec
        if rec["op"] != "report":
            assert isinstance(rec.get("duration_ms"), float) and rec["duration_ms"] >= 0
        if rec.get("outcome") in ("ok", "tool_error"):  # what came back: at least the text the agent printed
            assert isinstance(rec.get("result_size"), int) and rec["result_size"] >= 1, rec
    timed_out = next(r for r in calls if r.get("tool") == "demo.slow")
    assert 900 <= timed_out["duration_ms"] < 5000
    assert not [r for r in calls if "args" in r]  # no argument values by default
    assert {r["caller"] for r in calls} == {AGENT1, AGENT2}
    assert {(r["op"], r["decision"]) for r in new if r["op"] not in CALL_OPS} >= {("freeze", "freeze")}
    # no record without its predecessor: the whole run chains
    for before, rec in itertools.pairwise(new):
        assert rec["prev"] == before["hash"] and rec["seq"] == before["seq"] + 1
    v = live.ctl("audit", "verify")
    assert v.code == 0 and "intact" in v.out, v
    # and the admin can find it again
    r = live.ctl("audit", "--caller", AGENT2, "--decision", "deny", "--since", "10m", "--json")
    assert r.code == 0
    mine = [json.loads(line) for line in r.out.splitlines()]
    assert {x["seq"] for x in mine} >= {x["seq"] for x in calls if x["caller"] == AGENT2 and x["decision"] == "deny"}
    table = live.ctl("audit", "--tool", "demo.slow", "-n", "1").out.splitlines()
    assert table[0].startswith("TIME") and "timeout" in table[1] and "demo.slow" in table[1]


def tamper_cases(lines: list[bytes], target: int) -> dict[str, tuple[list[bytes], str]]:
    """name -> (tampered lines, what verify must say about which line)."""
    edited = list(lines)
    edited[target] = edited[target].replace(b'"decision":"', b'"decision":"X', 1)
    removed = lines[:target] + lines[target + 1 :]
    swapped = list(lines)
    swapped[target], swapped[target + 1] = swapped[target + 1], swapped[target]
    return {
        "edit one byte": (edited, f":{target + 1}: edited"),
        "delete a line": (removed, f":{target + 1}: 1 line(s) removed"),
        "swap two lines": (swapped, f":{target + 2}: lines reordered"),
        "cut the tail": (lines[:-2], f":{len(lines) - 2}: the tail was cut"),
        "cut in a line": ([*lines[:-1], lines[-1][:30]], f":{len(lines)}: the last line is cut"),
    }


def test_verify_names_an_edited_removed_reordered_or_cut_line(live: Installation, copies: str) -> None:
    for i in range(4):
        assert live.mcp("call", "demo.echo", f"text=tamper-{i}").code == 0
    original = copy_trail(live.paths, copies)
    with open(original, "rb") as fh:
        lines = fh.read().splitlines(keepends=True)
    assert live.ctl("audit", "verify", original).code == 0
    target = len(lines) - 4
    for name, (tampered, place) in tamper_cases(lines, target).items():
        case = os.path.join(copies, name.replace(" ", "-"))
        os.mkdir(case)
        path = copy_trail(live.paths, case)
        with open(path, "wb") as fh:
            fh.write(b"".join(tampered))
        r = live.ctl("audit", "verify", path)
        assert r.code == 1, (name, r)
        assert f"{path}{place}" in r.out, (name, r.out)
        assert "NOT intact" in r.err and r.err.count("\n") == 1


def test_verify_of_the_live_log_fails_while_tampered_and_passes_once_restored(live: Installation) -> None:
    assert live.mcp("call", "demo.echo", "text=live-tamper").code == 0
    path = live.paths.audit_log
    with open(path, "rb") as fh:
        original = fh.read()
    lines = original.splitlines(keepends=True)
    where = len(lines) - 1
    try:
        with open(path, "r+b") as fh:  # same inode: the daemon's descriptor stays valid
            fh.seek(sum(len(x) for x in lines[:where]) + lines[where].index(b'"caller":"') + 10)
            fh.write(b"X")
        r = live.ctl("audit", "verify")
        assert r.code == 1 and f"{path}:{where + 1}: edited" in r.out, r
    finally:
        with open(path, "r+b") as fh:
            fh.write(original)
    assert live.ctl("audit", "verify").code == 0


# --- (b) load, with the daemon SIGKILLed mid-run ---------------------------------------------


def test_every_call_the_agent_saw_succeed_survives_a_sigkill(live: Installation) -> None:
    threads, per = 16, 16
    nonce = secrets.randbelow(10**6)
    lock = threading.Lock()
    done = 0
    killed_at: list[float] = []
    back_up, stop = threading.Event(), threading.Event()
    outcomes: list[tuple[str, str, int, float]] = []  # (caller, args digest, exit code, when it answered)
    wrong: list[Result] = []

    def worker(t: int) -> None:
        nonlocal done
        user = AGENT1 if t % 2 else AGENT2  # agent2 may call demo.add only
        attempts = finished = 0
        while finished < per and attempts < per * 4 and not stop.is_set():
            attempts += 1
            i = attempts
            if user == AGENT1 and i % 2:
                text = f"load-{nonce}-{t}-{i}"
                argv, digest, want = ["demo.echo", f"text={text}"], live.digest({"text": text}), text
            else:
                a, b = t * 1000 + i, nonce
                argv, digest, want = ["demo.add", f"a={a}", f"b={b}"], live.digest({"a": a, "b": b}), str(a + b)
            r = live.mcp("call", *argv, user=user, timeout=60)
            with lock:
                outcomes.append((user, digest, r.code, time.monotonic()))
                done += 1
                if r.code == 0 and r.out != want + "\n":
                    wrong.append(r)
            if r.code == 69:  # the broker is down: the agent tries again once it is back
                back_up.wait(60)
                continue
            finished += 1

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    try:
        for th in pool:
            th.start()
        deadline = time.monotonic() + 120
        while done < threads * per // 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert live.daemon is not None
        live.daemon.kill()  # SIGKILL, mid-run
        live.daemon.wait()
        killed_at.append(time.monotonic())
        live.daemon = None
        time.sleep(1.0)  # callers meet the dead broker meanwhile
        live.start_daemon()
        back_up.set()
        for th in pool:
            th.join(300)
    finally:
        stop.set()
        back_up.set()
        for th in pool:
            th.join(300)
        if live.daemon is None or live.daemon.poll() is not None:
            live.start_daemon()
    assert not wrong, wrong[:3]
    ok = [o for o in outcomes if o[2] == 0]
    print(f"load: {len(outcomes)} calls, {len(ok)} answered 0, {sum(o[2] == 69 for o in outcomes)} answered 69")
    assert len(ok) >= threads * per * 0.8, (len(ok), sorted({o[2] for o in outcomes}))
    assert any(o[2] == 69 for o in outcomes), "the kill should have refused some calls"
    assert any(o[3] < killed_at[0] for o in ok) and any(o[3] > killed_at[0] for o in ok)
    assert {o[2] for o in outcomes} <= {0, 69}, sorted({o[2] for o in outcomes})
    seen: dict[str, list[dict[str, Any]]] = {}
    for rec in records(live.paths):
        if rec.get("op") == "call" and "args_digest" in rec:
            seen.setdefault(rec["args_digest"], []).append(rec)
    missing = [o for o in ok if o[1] not in seen]
    assert not missing, f"{len(missing)} successful calls have no record, e.g. {missing[:3]}"
    for user, digest, _code, _t in ok:
        (rec,) = [r for r in seen[digest] if r.get("outcome") == "ok"]
        assert rec["caller"] == user and rec["exit"] == 0 and rec["decision"] == "allow"
    v = live.ctl("audit", "verify")
    assert v.code == 0, v


# --- (c) the agent cannot touch it -------------------------------------------------------------


def test_the_agent_cannot_read_write_append_or_truncate_the_log(live: Installation) -> None:
    assert live.mcp("call", "demo.echo", "text=private").code == 0
    p = live.paths
    before = fingerprint(p)
    log, head = p.audit_log, audit.head_path(p.audit_log)
    attempts = [
        ("cat", log),
        ("cat", head),
        ("ls", p.log),
        ("sh", "-c", f": >> {log}"),
        ("sh", "-c", f"echo forged >> {log}"),
        ("sh", "-c", f": > {log}"),
        ("truncate", "-s", "0", log),
        ("truncate", "-s", "0", head),
        ("/usr/bin/python3", "-c", f"open({log!r}, 'r+b').truncate(0)"),
        ("/usr/bin/python3", "-c", f"import os; os.open({log!r}, os.O_WRONLY | os.O_APPEND)"),
        ("/usr/bin/python3", "-c", f"import os; os.rename({log!r}, '/tmp/stolen')"),
        ("/usr/bin/python3", "-c", f"import os; os.unlink({log!r})"),
    ]
    for user in (AGENT1, AGENT2):
        for argv in attempts:
            r = live.as_user(user, *argv)
            assert r.code != 0, (user, argv, r)
            assert "ermission denied" in r.err or "PermissionError" in r.err, (user, argv, r.err)
    # the gate user cannot read it either
    r = live.as_user("mcp-gate", "/usr/bin/python3", "-c", f"open({log!r}).read()")
    assert r.code != 0 and "PermissionError" in r.err, r
    assert fingerprint(p) == before
    assert live.ctl("audit", "verify").code == 0


# --- ownership, modes and restarts ---------------------------------------------------------------


def test_files_are_private_to_the_broker_and_a_restart_continues_the_chain(live: Installation) -> None:
    assert live.mcp("call", "demo.echo", "text=before-restart").code == 0
    p = live.paths
    broker = pwd.getpwnam("mcp-broker").pw_uid
    st = os.stat(p.log)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (broker, 0o700)
    for name in [*audit.log_files(p.audit_log), audit.head_path(p.audit_log)]:
        st = os.stat(name)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (broker, 0o600), name
    assert live.ctl("audit", "verify").code == 0
    os.chmod(p.audit_log, 0o640)  # verify names a log others could reach ...
    r = live.ctl("audit", "verify")
    assert r.code == 1 and f"{p.audit_log}: mode 0640, should be 0600" in r.out, r
    last = records(p)[-1]
    live.restart_daemon()  # ... and the daemon makes it private again when it opens it
    assert stat.S_IMODE(os.stat(p.audit_log).st_mode) == 0o600
    assert live.mcp("call", "demo.echo", "text=after-restart").code == 0
    after = since(p, last["seq"])
    first = after[0]
    assert first["prev"] == last["hash"] and first["seq"] == last["seq"] + 1
    assert first["op"] == "start"  # the restart itself is in the trail
    call = next(r for r in after if r.get("op") == "call")
    assert call["args_digest"] == live.digest({"text": "after-restart"})
    assert live.ctl("audit", "verify").code == 0


# --- rotation, syslog and follow, live ------------------------------------------------------------


def test_rotation_by_size_keeps_the_chain_across_files(live: Installation) -> None:
    p = live.paths
    live.set_policy(broker_extra="audit_max_bytes = 3000\naudit_keep = 3\naudit_keep_days = 0")  # count only
    try:
        for i in range(10):
            assert live.mcp("call", "demo.echo", f"text=rotate-{i}").code == 0
        files = audit.log_files(p.audit_log)
        assert files[-3:] == [f"{p.audit_log}.2", f"{p.audit_log}.1", p.audit_log]
        assert not os.path.exists(f"{p.audit_log}.4")
        broker = pwd.getpwnam("mcp-broker").pw_uid
        for name in files[-2:]:  # written under the new setting (the oldest holds what came before)
            st = os.stat(name)
            assert st.st_size <= 3000 and (st.st_uid, stat.S_IMODE(st.st_mode)) == (broker, 0o600)
        v = live.ctl("audit", "verify")
        assert v.code == 0 and f"{len(files)} file(s)" in v.out, v
        r = live.ctl("audit", "--json", "-n", "20", "--tool", "demo.echo")
        outcomes = [json.loads(x) for x in r.out.splitlines() if json.loads(x).get("phase") == "outcome"]
        assert [x["args_digest"] for x in outcomes] == [live.digest({"text": f"rotate-{i}"}) for i in range(10)]
        # by default (audit_keep_days = 30) a flood never rotates young records away: files beyond keep stay
        live.set_policy(broker_extra="audit_max_bytes = 3000\naudit_keep = 3")
        for i in range(10):
            assert live.mcp("call", "demo.echo", f"text=flood-{i}").code == 0
        kept = audit.log_files(p.audit_log)
        assert os.path.exists(f"{p.audit_log}.4") and len(kept) > len(files), kept
        v = live.ctl("audit", "verify")
        assert v.code == 0 and f"{len(kept)} file(s)" in v.out, v
        r = live.ctl("audit", "--json", "-n", "60", "--tool", "demo.echo")
        texts = {json.loads(x).get("args_digest") for x in r.out.splitlines()}
        assert live.digest({"text": "rotate-0"}) in texts  # the first records of the test are still there
    finally:
        live.set_policy()


def test_syslog_mirror_sends_rfc5424_and_never_fails_a_call(live: Installation) -> None:
    where = tempfile.mkdtemp(prefix="mcp-privsep-syslog-")
    os.chmod(where, 0o755)
    address = f"{where}/log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    os.chmod(address, 0o666)
    sock.settimeout(10)
    try:
        live.set_policy(broker_extra=f'audit_syslog = true\naudit_syslog_socket = "{address}"')
        assert live.mcp("call", "demo.echo", "text=to-syslog").code == 0
        digest = live.digest({"text": "to-syslog"})
        while True:
            message = sock.recv(65536)
            if digest.encode() in message:
                break
        assert message.startswith(b"<86>1 ")  # authpriv.info
        head, _, body = message.partition(b"] ")
        assert f"[{audit.SD_ID} ".encode() in head
        assert f'caller="{AGENT1}"'.encode() in head and b'tool="demo.echo"' in head
        rec = json.loads(body)
        assert rec == next(r for r in records(live.paths) if r["hash"] == rec["hash"])  # the record, as stored
        sock.close()
        os.unlink(address)  # nobody listens any more: calls go on, the file still gets the record
        started = time.monotonic()
        assert live.mcp("call", "demo.echo", "text=no-syslog").code == 0
        assert time.monotonic() - started < 10
        assert records(live.paths)[-1]["args_digest"] == live.digest({"text": "no-syslog"})
    finally:
        sock.close()
        shutil.rmtree(where, ignore_errors=True)
        live.set_policy()


def test_follow_shows_a_call_as_it_happens(live: Installation) -> None:
    proc = subprocess.Popen(
        [CTL, "--root", live.root, "audit", "--follow", "--json", "-n", "0", "--caller", AGENT1],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        time.sleep(0.5)
        assert live.mcp("call", "demo.echo", "text=followed").code == 0
        assert proc.stdout is not None
        line = proc.stdout.readline()
        rec = json.loads(line)
        assert rec["args_digest"] == live.digest({"text": "followed"}) and rec["caller"] == AGENT1
    finally:
        proc.terminate()
        proc.wait(10)


def test_an_agent_cannot_bloat_a_record_with_thousands_of_argument_keys(live: Installation) -> None:
    # a record's size must stay within what the log keeps reserved, whatever the agent sends
    seq = last_seq(live.paths)
    many: dict[str, Any] = {f"key_{i:05d}_{'x' * 40}": i for i in range(5000)}
    many["text"] = "hi"
    r = live.mcp("call", "demo.echo", "--args", "-", stdin=json.dumps(many))
    assert (r.code, r.out) == (0, "hi\n"), r  # the server ignores what it does not know
    recs = [x for x in since(live.paths, seq) if x.get("op") == "call" and x.get("tool") == "demo.echo"]
    assert [x["phase"] for x in recs] == ["intent", "outcome"], recs
    recs = recs[1:]
    rec = recs[0]
    assert rec["arg_keys_total"] == 5001 and len(rec["arg_keys"]) <= 64, rec["arg_keys_total"]
    assert rec["args_digest"] == live.digest(many)
    assert len(audit.canonical(rec)) < 16 * 1024
