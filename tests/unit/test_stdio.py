"""Unit tests for ``broker.stdio`` (the ``mcp stdio`` session), against a fake daemon on a real socket.

The fake daemon (``tests/fakes.py``) speaks the real frame protocol on a Unix
socket, one thread per connection, and can delay answers, send an approval's interim frame,
drop a connection mid-request, answer garbage or close idle connections (a
restart). The session reads JSON-RPC lines from a pipe and writes to a
buffer. The tests pin what the single-threaded multiplexer promises:
pipelined calls answered with their own ids over a bounded set of reused
connections, back-pressure at ``MAX_IN_FLIGHT``, a broken connection failing
only its own request (69) and never re-sending one the daemon read, a
denied tool never forwarded, and every answer out before the session ends.
The session names no caller to the daemon (protocol v2: the daemon knows
it from the peer's uid); its user only picks the allowlist.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from broker.core import wire
from broker.core.paths import Paths
from broker.gate import endpoint as stdio
from tests.fakes import FakeDaemon, Reply
from tests.unit.conftest import needs_root, write

pytestmark = needs_root

USER = "alice"


class Behaviour:
    """The fake daemon's answers here: the catalog, reports, and per-text misbehaviours, each once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.drop_once: set[str] = set()  # texts whose call is read, then the connection closed unanswered
        self.garbage_once: set[str] = set()
        self.pending_once: set[str] = set()

    def __call__(self, req: dict[str, Any]) -> Reply:
        op = req["op"]
        if op == "catalog":
            return {"ok": True, "result": {"tools": [{"name": "demo.echo"}]}}
        if op == "report":
            return {"ok": True, "result": None}
        text = str((req.get("args") or {}).get("text", ""))
        with self.lock:
            drop = text in self.drop_once
            self.drop_once.discard(text)
            garbage = text in self.garbage_once
            self.garbage_once.discard(text)
            pending = text in self.pending_once
            self.pending_once.discard(text)
        if drop:
            return None
        if garbage:
            return b"\x00\x00\x00\x05nope!"
        answer = {"ok": True, "result": {"text": text, "isError": False, "content": []}}
        if text == "progress":
            return [{"progress": {"progress": 1, "total": 2, "message": "half"}}, answer]
        if text.startswith("slow"):
            time.sleep(1.5)
        return [{"pending": "ab12", "wait": 5}, answer] if pending else answer


@pytest.fixture
def root(tmp_root: str) -> str:
    paths = Paths(tmp_root)
    write(paths.allowlist, "demo.echo\n")
    os.chmod(paths.etc, 0o755)
    return tmp_root


@pytest.fixture
def behave() -> Behaviour:
    return Behaviour()


@pytest.fixture
def daemon(root: str, behave: Behaviour) -> Iterator[FakeDaemon]:
    d = FakeDaemon(Paths(root).gate_sock, behave)
    yield d
    d.close()


class Run:
    """A session fed from a pipe on a thread; ``answers()`` parses what it wrote."""

    def __init__(self, root: str) -> None:
        self.paths = Paths(root)
        self.out = io.BytesIO()
        self.err = io.StringIO()
        self.session = stdio.Session(self.paths, USER, self._connect, self.out, self.err)
        self.r, self.w = os.pipe()
        self.code: int | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _connect(self) -> socket.socket:
        return wire.connect(self.paths.gate_sock, None)

    def _run(self) -> None:
        self.code = stdio.serve(self.session, self.r)

    def send(self, *messages: dict[str, Any]) -> None:
        os.write(self.w, b"".join(json.dumps(m).encode() + b"\n" for m in messages))

    def finish(self, timeout: float = 20) -> int:
        os.close(self.w)
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the session did not end after EOF"
        os.close(self.r)
        assert self.code is not None
        return self.code

    def answers(self) -> dict[Any, dict[str, Any]]:
        lines = out_lines(self.out.getvalue())
        return {m.get("id"): m for m in map(json.loads, lines)}


def out_lines(data: bytes) -> list[str]:
    """The session's JSON-RPC lines: split at b"\\n" only (str.splitlines also splits at U+0085, U+2028...)."""
    assert data == b"" or data.endswith(b"\n"), data[-80:]
    return data.decode().split("\n")[:-1]


def call(i: int, text: str, tool: str = "demo.echo") -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": {"text": text}}}


def text_of(answer: dict[str, Any]) -> str:
    return str(answer["result"]["content"][0]["text"])


def test_pipelined_calls_share_a_bounded_set_of_reused_connections(root: str, daemon: FakeDaemon) -> None:
    daemon.delay = 0.01
    run = Run(root)
    n = 5 * stdio.MAX_IN_FLIGHT
    run.send(*(call(i, f"t{i}") for i in range(n)))
    assert run.finish() == 0
    answers = run.answers()
    assert sorted(answers) == list(range(n))
    for i in range(n):
        assert answers[i]["result"]["isError"] is False and text_of(answers[i]) == f"t{i}"
    assert sorted(daemon.calls()) == sorted(f"t{i}" for i in range(n))  # each call forwarded exactly once
    assert daemon.max_active > 1, "pipelined calls were served one at a time"
    assert daemon.max_active <= stdio.MAX_IN_FLIGHT
    assert daemon.connections <= stdio.MAX_IN_FLIGHT, "connections were not reused"


def test_denied_tool_is_refused_by_the_gate_and_never_forwarded(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    run.send(call(1, "x", tool="demo.secret"), call(2, "ok"))
    assert run.finish() == 0
    answers = run.answers()
    assert answers[1]["result"]["isError"] is True
    assert "exit 77" in text_of(answers[1]) and "not in the allowlist" in text_of(answers[1])
    assert text_of(answers[2]) == "ok"
    assert daemon.calls() == ["ok"]
    reports = [r for r in daemon.requests if r["op"] == "report"]
    assert [(r["tool"], r["exit"], r["verb"]) for r in reports] == [("demo.secret", 77, "stdio")]
    assert set(reports[0]) == {"v", "op", "verb", "tool", "exit", "reason"}  # no caller, no uid


def test_requests_name_no_caller_the_daemon_knows_it_by_the_peer_uid(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    run.send({"jsonrpc": "2.0", "id": "l", "method": "tools/list"}, call(1, "hi"), call(2, "x", tool="demo.secret"))
    assert run.finish() == 0
    assert text_of(run.answers()[1]) == "hi"
    v = wire.PROTOCOL_VERSION
    by_op = {r["op"]: r for r in daemon.requests}
    assert by_op["catalog"] == {"v": v, "op": "catalog"}
    assert by_op["call"] == {
        "v": v,
        "op": "call",
        "tool": "demo.echo",
        "kv": [],
        "args": {"text": "hi"},
        "timeout": None,
    }
    assert by_op["report"]["tool"] == "demo.secret"
    for req in daemon.requests:
        assert not {"caller", "uid"} & set(req), req
    assert daemon.peer_uids and set(daemon.peer_uids) == {os.getuid()}


def test_the_session_s_user_picks_its_own_allowlist(root: str, daemon: FakeDaemon) -> None:
    """allowed-actions.d/USER.txt replaces the global file for that user (the name the gate got from sudo)."""
    write(Paths(root).user_allowlist(USER), "demo.other\n")
    run = Run(root)
    run.send(call(1, "x"))
    assert run.finish() == 0
    answer = run.answers()[1]
    assert answer["result"]["isError"] is True and "exit 77" in text_of(answer)
    assert f"for {USER}" in text_of(answer)
    assert daemon.calls() == []


def test_idle_connections_closed_by_a_restart_are_replaced_not_failed(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    run.send(call(1, "before"))
    _wait(lambda: 1 in run.answers())
    daemon.close_all()
    time.sleep(0.1)
    run.send(call(2, "after"))
    assert run.finish() == 0
    assert text_of(run.answers()[2]) == "after"
    assert daemon.calls() == ["before", "after"]


def test_connection_lost_mid_call_fails_that_call_only_and_never_resends_it(
    root: str, daemon: FakeDaemon, behave: Behaviour
) -> None:
    behave.drop_once.add("lost")
    behave.garbage_once.add("garbled")
    run = Run(root)
    run.send(call(1, "lost"), call(2, "garbled"), call(3, "fine"))
    assert run.finish() == 0
    answers = run.answers()
    for i in (1, 2):
        assert answers[i]["result"]["isError"] is True
        assert "exit 69" in text_of(answers[i]) and "broker unavailable" in text_of(answers[i])
    assert text_of(answers[3]) == "fine"
    assert sorted(daemon.calls()) == ["fine", "garbled", "lost"]  # the lost call was read once, not retried


def test_pending_approval_is_said_on_stderr_then_answered(root: str, daemon: FakeDaemon, behave: Behaviour) -> None:
    behave.pending_once.add("held")
    run = Run(root)
    run.send(call(1, "held"))
    assert run.finish() == 0
    assert text_of(run.answers()[1]) == "held"
    assert run.err.getvalue() == "mcp: pending approval ab12, waiting\n"


def call_meta(i: int, text: str, meta: dict[str, Any]) -> dict[str, Any]:
    msg = call(i, text)
    msg["params"]["_meta"] = meta
    return msg


def lines_of(run: Run) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out_lines(run.out.getvalue())]


def test_progress_is_relayed_to_the_call_that_asked_under_its_own_token(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    run.send(call_meta(1, "progress", {"progressToken": "tok-1"}), call(2, "progress"))
    assert run.finish() == 0
    out = lines_of(run)
    notes = [m for m in out if m.get("method") == "notifications/progress"]
    assert notes == [
        {
            "jsonrpc": "2.0",
            "method": "notifications/progress",
            "params": {"progressToken": "tok-1", "progress": 1, "total": 2, "message": "half"},
        }
    ]  # call 2 asked for none: the daemon's report for it is dropped
    assert out.index(notes[0]) < [m.get("id") for m in out].index(1)  # before its answer
    asked = {r["args"]["text"]: r for r in daemon.ops("call") if r["args"]["text"] == "progress"}
    # the two calls run side by side, so they reach the daemon in either order
    assert sorted((r.get("progress") for r in daemon.ops("call")), key=repr) == [None, True]
    assert asked


def test_a_cancelled_call_is_never_answered_and_its_link_is_closed(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    run.send(call(1, "slow-cancelled"))
    time.sleep(0.3)
    run.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1, "reason": "user"}})
    run.send(call(2, "after"))
    started = time.monotonic()
    assert run.finish() == 0
    assert time.monotonic() - started < 1.4  # nothing waited for the cancelled call's answer
    answers = run.answers()
    assert 1 not in answers and text_of(answers[2]) == "after"
    assert daemon.calls() == ["slow-cancelled", "after"]


def test_a_call_cancelled_before_it_was_sent_is_never_sent(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    run.session.backlog.append(stdio._Job("call", 7, b"", 1.0))  # queued behind a full session
    run.session.cancel(7)
    assert not run.session.backlog
    run.session.cancel({"not": "an id"})  # ignored
    assert run.finish() == 0


@pytest.mark.parametrize(
    ("meta", "sent"),
    [({"mcp-privsep/timeout": 12.5}, 12.5), ({"mcp-privsep/timeout": 3}, 3), ({}, None), ({"other/x": 1}, None)],
)
def test_a_client_may_ask_for_its_own_timeout(root: str, daemon: FakeDaemon, meta: dict, sent: object) -> None:
    run = Run(root)
    run.send(call_meta(1, "t", meta))
    assert run.finish() == 0
    assert text_of(run.answers()[1]) == "t"
    assert [r["timeout"] for r in daemon.ops("call")] == [sent]


@pytest.mark.parametrize("bad", [0, -1, "10", True, None, 1e9])
def test_a_bad_timeout_is_an_invalid_params_error(root: str, daemon: FakeDaemon, bad: object) -> None:
    run = Run(root)
    run.send(call_meta(1, "t", {"mcp-privsep/timeout": bad}))
    assert run.finish() == 0
    answer = run.answers()[1]
    if bad is None:
        assert text_of(answer) == "t"  # absent and null are alike
    else:
        assert answer["error"]["code"] == -32602 and daemon.ops("call") == []


# --- the stateless era (2026-07-28) ------------------------------------------------------------------

MODERN = {"io.modelcontextprotocol/protocolVersion": "2026-07-28", "io.modelcontextprotocol/clientCapabilities": {}}


def modern(i: int, method: str, params: dict[str, Any] | None = None, meta: dict[str, Any] = MODERN) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": i, "method": method, "params": {**(params or {}), "_meta": meta}}


def test_a_stateless_client_discovers_lists_and_calls_without_a_handshake(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    run.send(
        modern(1, "server/discover"),
        modern(2, "tools/list"),
        modern(3, "tools/call", {"name": "demo.echo", "arguments": {"text": "stateless"}}),
        modern(4, "tools/call", {"name": "demo.secret", "arguments": {}}),
    )
    assert run.finish() == 0
    a = run.answers()
    found = a[1]["result"]
    assert found["supportedVersions"] == ["2026-07-28"] and found["resultType"] == "complete"
    assert found["capabilities"] == {"tools": {"listChanged": True}}
    assert found["_meta"]["io.modelcontextprotocol/serverInfo"]["name"] == "mcp-privsep"
    assert a[2]["result"] == {
        "tools": [{"name": "demo.echo"}],
        "ttlMs": 0,
        "cacheScope": "private",
        "resultType": "complete",
    }
    assert a[3]["result"]["resultType"] == "complete" and text_of(a[3]) == "stateless"
    assert a[4]["result"]["isError"] is True and a[4]["result"]["resultType"] == "complete"  # refused, in its era
    assert daemon.calls() == ["stateless"]


def test_an_unknown_version_gets_32022_with_the_supported_ones(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    meta = {**MODERN, "io.modelcontextprotocol/protocolVersion": "2099-01-01"}
    run.send(modern(1, "tools/call", {"name": "demo.echo", "arguments": {"text": "x"}}, meta))
    run.send(modern(2, "tools/list", meta={"io.modelcontextprotocol/protocolVersion": "2026-07-28"}))
    run.send(modern(3, "ping"))
    assert run.finish() == 0
    a = run.answers()
    assert a[1]["error"] == {
        "code": -32022,
        "message": "Unsupported protocol version",
        "data": {"supported": ["2026-07-28"], "requested": "2099-01-01"},
    }
    assert a[2]["error"]["code"] == -32602  # no clientCapabilities: a malformed envelope
    assert a[3]["error"]["code"] == -32601  # ping is gone from the stateless era
    assert daemon.calls() == []  # nothing ran


def test_both_eras_on_one_connection(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    init = {"protocolVersion": "2026-07-28", "capabilities": {}, "clientInfo": {"name": "c", "version": "1"}}
    run.send({"jsonrpc": "2.0", "id": "i", "method": "initialize", "params": init})
    run.send(call(1, "legacy"), modern(2, "tools/call", {"name": "demo.echo", "arguments": {"text": "modern"}}))
    run.send({"jsonrpc": "2.0", "id": "p", "method": "ping"})
    assert run.finish() == 0
    a = run.answers()
    assert a["i"]["result"]["protocolVersion"] == "2025-11-25"  # initialize negotiates within its own era
    assert "resultType" not in a[1]["result"] and a[2]["result"]["resultType"] == "complete"
    assert a["p"]["result"] == {}


def test_tools_list_goes_to_the_daemon_catalog(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    run.send({"jsonrpc": "2.0", "id": "l", "method": "tools/list"})
    assert run.finish() == 0
    assert run.answers()["l"]["result"] == {"tools": [{"name": "demo.echo"}]}
    assert daemon.requests == [{"v": wire.PROTOCOL_VERSION, "op": "catalog"}]


def test_no_daemon_answers_69_for_each_call(root: str) -> None:
    run = Run(root)
    run.send(call(1, "a"), call(2, "b"), {"jsonrpc": "2.0", "id": 3, "method": "tools/list"})
    assert run.finish() == 0
    answers = run.answers()
    for i in (1, 2):
        assert answers[i]["result"]["isError"] is True and "exit 69" in text_of(answers[i])
    assert (
        answers[3]["error"]["code"] == stdio.INTERNAL_ERROR and "broker unavailable" in answers[3]["error"]["message"]
    )


def test_a_full_session_stops_reading_stdin_until_a_slot_frees(root: str, daemon: FakeDaemon) -> None:
    daemon.delay = 0.3
    run = Run(root)
    n = stdio.MAX_IN_FLIGHT * 2
    run.send(*(call(i, f"s{i}") for i in range(n)))
    time.sleep(0.15)
    # all slots busy: the rest waits in the session (read in one chunk), not in extra connections
    assert daemon.connections <= stdio.MAX_IN_FLIGHT
    assert run.finish() == 0
    assert sorted(run.answers()) == list(range(n))


def test_allowlist_edit_is_seen_by_the_next_call(root: str, daemon: FakeDaemon) -> None:
    run = Run(root)
    run.send(call(1, "one"))
    _wait(lambda: 1 in run.answers())
    write(Paths(root).allowlist, "demo.other\n")
    run.send(call(2, "two"))
    assert run.finish() == 0
    assert text_of(run.answers()[1]) == "one"
    assert "exit 77" in text_of(run.answers()[2])
    assert daemon.calls() == ["one"]


def _wait(cond: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# --- fuzzing: whatever the client sends, the session answers sanely and ends cleanly -----------------

_ids = st.one_of(
    st.integers(-(2**40), 2**40), st.text(max_size=8), st.none(), st.floats(allow_nan=False), st.booleans()
)
_params = st.one_of(
    st.none(),
    st.just({}),
    st.fixed_dictionaries({"name": st.sampled_from(["demo.echo", "demo.secret", "x", "", "../etc"])}),
    st.fixed_dictionaries(
        {
            "name": st.sampled_from(["demo.echo", "demo.echo.x"]),
            "arguments": st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)),
        }
    ),
    st.lists(st.integers(), max_size=2),
)
_methods = st.sampled_from(["initialize", "ping", "tools/list", "tools/call", "resources/list", "", "x" * 300])
_message = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "1.0"]), "method": _methods},
    optional={"id": _ids, "params": _params},
)
_line = st.one_of(
    _message.map(lambda m: json.dumps(m).encode()),
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
    st.just(b"[1, 2]"),
    st.just(b'{"jsonrpc": "2.0", "id": 1, "result": {}}'),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(_line, max_size=25))
@example(lines=[b'{"jsonrpc": "2.0", "method": "initialize", "id": "\\u0085"}'])  # NEL: not a line break here
@example(lines=[b'{"jsonrpc": "2.0", "method": "ping", "id": "a\\u2028b"}'])
def test_random_input_gets_well_formed_answers_and_a_clean_end(
    root: str, daemon: FakeDaemon, lines: list[bytes]
) -> None:
    before = len(daemon.calls())
    run = Run(root)
    os.write(run.w, b"".join(line + b"\n" for line in lines))
    assert run.finish() == 0
    out = [json.loads(raw) for raw in out_lines(run.out.getvalue())]
    for message in out:
        assert message["jsonrpc"] == "2.0"
        assert ("result" in message) != ("error" in message) or message.get("method")
    requests = []
    for raw in lines:
        try:
            m = json.loads(raw)
        except ValueError:
            continue
        if isinstance(m, dict) and "id" in m:
            requests.append(m)
    # never more than one answer per message that carried an id, and only with ids that were sent
    answered = [m["id"] for m in out if m.get("id") is not None]
    sent_ids = [m["id"] for m in requests]
    for answer_id in set(map(json.dumps, answered)):
        assert [json.dumps(i) for i in answered].count(answer_id) <= [json.dumps(i) for i in sent_ids].count(answer_id)
    # a call reaches the daemon only for an allowed tool, sent as a well-formed request
    forwarded = daemon.calls()[before:]
    allowed_calls = [
        m
        for m in requests
        if m.get("method") == "tools/call"
        and isinstance(m.get("params"), dict)
        and m["params"].get("name") == "demo.echo"
        and type(m.get("id")) in (int, str)
        and m.get("jsonrpc") == "2.0"
    ]
    assert len(forwarded) <= len(allowed_calls)
