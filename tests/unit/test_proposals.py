"""Agents' server proposals (``mcp propose``): bounds, the gate's verb, state, desk, dispatch, the screen.

* caps: a server name, a pinned PyPI or npm package (never a range, a tag,
  extras or a URL), at most 32 tool names, ``why`` of at most 2000
  characters (the one string the protocol lets be longer than 1024), and the
  daemon checks all of it again (a gate is not trusted);
* the gate: ``mcp propose`` parses to exactly the ``propose`` request (or
  ``proposals`` for ``--status``), reads ``--why -`` from the frame's stdin,
  refuses words on its own command line, and needs no allowlist;
* state: a ``proposals`` table, at most 4 pending per agent, an agent's own
  list holds no one else's, decisions only from pending, decided ones pruned;
* the desk: every refusal says why with the contract's code (64, 65, 75),
  ``why`` never reaches the audit record, every operator step is one record;
* dispatch: the agent's two ops are gate ops, the operator's two are root's
  on admin.sock only, and a frozen agent cannot propose;
* the operator's screen: ESC, CSI, OSC, bidi overrides and zero-width
  characters in ``why`` or in the registry's metadata are shown escaped,
  ``--json`` is ASCII, and ``adopt`` without ``server add`` fails clearly and
  leaves the proposal pending.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent import helper
from broker.admin import cli as admin_cli
from broker.admin import proposals_cli
from broker.core import proposal, wire
from broker.core.errors import EX_FAILED, PrivsepError, ProtocolError, UsageError
from broker.core.paths import Paths
from broker.daemon import audit, service
from broker.daemon.proposals import KEEP_DECIDED, ProposalDesk
from broker.daemon.state import SCHEMA, State
from broker.gate import verbs
from tests.conftest import ROOT as REPO
from tests.fakes import FakeDaemon

KEY = b"k" * 32
#: what an agent put in ``why``: a colour, a clipboard write, a link, a bidi override, a zero-width space, a CR
HOSTILE_WHY = "need time\x1b[31m RED\x1b]52;c;ZXZpbA==\x07 \x1b]8;;http://x\x1b\\link \u202eevil\u202c \u200b\rend"
RAW_CONTROL = ("\x1b", "\x07", "\u202e", "\u202c", "\u200b", "\r")


def fields(**over: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "name": "time",
        "manager": "pip",
        "package": "mcp-server-time",
        "version": "2025.9.25",
        "tools": ["get_current_time"],
        "why": "the user asks for the time in other zones",
    }
    return base | over


# --- caps ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("manager", "package", "version"),
    [
        ("pip", "mcp-server-time", "2025.9.25"),
        ("pip", "A.b_c-d", "1.0rc1"),
        ("pip", "x", "1!2.0.post1.dev3"),
        ("npm", "@modelcontextprotocol/server-everything", "2025.9.25"),
        ("npm", "left-pad", "1.3.0"),
        ("npm", "pkg", "1.0.0-rc.1+build.5"),
        ("npm", "p" * proposal.MAX_PACKAGE, "1.0.0"),
    ],
)
def test_exact_pins_of_a_package_are_accepted(manager: str, package: str, version: str) -> None:
    assert proposal.package_problem(manager, package, version) is None


@pytest.mark.parametrize(
    ("manager", "package", "version"),
    [
        ("pip", "pkg", "*"),
        ("pip", "pkg", "1.*"),
        ("pip", "pkg", ">=1"),
        ("pip", "pkg", "latest"),
        ("pip", "pkg", ""),
        ("pip", "pkg", "=1.0"),
        ("pip", "pkg[extra]", "1.0"),
        ("pip", "-e", "1.0"),
        ("pip", "--index-url=http://x", "1"),
        ("pip", "https://x/y.whl", "1"),
        ("pip", "../pkg", "1"),
        ("pip", "pkg-", "1"),
        ("pip", "pkg", "1.0+local"),
        ("npm", "pkg", "01.2.3"),
        ("npm", "-pkg", "1.2.3"),
        ("npm", "@-s/pkg", "1.2.3"),
        ("pip", "p\u0430th", "1"),
        ("pip", "p" * (proposal.MAX_PACKAGE + 1), "1"),
        ("pip", "pkg", "1" * (proposal.MAX_VERSION + 1)),
        ("npm", "pkg", "^1.2.3"),
        ("npm", "pkg", "~1.2.3"),
        ("npm", "pkg", "1.2"),
        ("npm", "pkg", "1.2.x"),
        ("npm", "pkg", "latest"),
        ("npm", "pkg", "1.2.3 || 2.0.0"),
        ("npm", "pkg", "1.2.3-"),
        ("npm", "Pkg", "1.2.3"),
        ("npm", ".pkg", "1.2.3"),
        ("npm", "@/pkg", "1.2.3"),
        ("npm", "@Scope/pkg", "1.2.3"),
        ("npm", "git+https://x/y", "1.2.3"),
        ("npm", "p" * (proposal.MAX_PACKAGE + 1), "1.0.0"),
        ("cargo", "pkg", "1.0.0"),
    ],
)
def test_ranges_tags_extras_urls_and_long_names_are_refused(manager: str, package: str, version: str) -> None:
    assert proposal.package_problem(manager, package, version) is not None


def test_the_caps_of_names_tools_and_why() -> None:
    assert proposal.problem(fields()) is None
    assert proposal.problem(fields(name="n" * proposal.MAX_NAME)) is None
    assert proposal.problem(fields(name="n" * (proposal.MAX_NAME + 1))) is not None
    for bad in ("", "a.b", "a b", "a/b", "\u0430", "a\x1b"):
        assert proposal.problem(fields(name=bad)) is not None, bad
    assert proposal.problem(fields(tools=[f"t{i}" for i in range(proposal.MAX_TOOLS)])) is None
    assert "at most 32 tools" in str(proposal.problem(fields(tools=[f"t{i}" for i in range(33)])))
    assert proposal.problem(fields(tools=["a", "a"])) is not None
    assert proposal.problem(fields(tools=["t" * 129])) is not None
    assert proposal.problem(fields(tools=["files.*"])) is not None
    assert proposal.problem(fields(tools=[1])) is not None
    assert proposal.problem(fields(tools="get_time")) is not None
    assert proposal.problem(fields(why=HOSTILE_WHY)) is None  # any character: the operator's screen defangs it
    assert proposal.problem(fields(why="w" * proposal.MAX_WHY)) is None
    assert "at most 2000" in str(proposal.problem(fields(why="w" * (proposal.MAX_WHY + 1))))
    assert proposal.problem(fields(why="\udcff")) is not None
    assert proposal.problem(fields(version=5)) is not None
    assert (proposal.MAX_WHY, proposal.MAX_TOOLS, proposal.MAX_PACKAGE, proposal.MAX_PENDING) == (2000, 32, 214, 4)


def test_the_protocol_takes_a_why_of_2000_characters_and_no_longer_string() -> None:
    ok = wire.request("propose", **fields(why="w" * 2000))
    assert wire.validate_request(ok, wire.OPS) == "propose"
    with pytest.raises(ProtocolError, match="too long"):
        wire.validate_request(wire.request("propose", **fields(why="w" * 2001)), wire.OPS)
    with pytest.raises(ProtocolError, match="too long"):  # only why: every other string keeps the 1024 cap
        wire.validate_request(wire.request("propose", **fields(package="p" * 1025)), wire.OPS)
    with pytest.raises(ProtocolError, match="too long"):  # and only for propose
        wire.validate_request(wire.request("report", verb="x", tool="", exit=64, reason="r" * 2000), wire.OPS)
    with pytest.raises(ProtocolError, match="unexpected key"):
        wire.validate_request(wire.request("propose", **fields(), caller="root"), wire.OPS)
    with pytest.raises(ProtocolError, match="wrong type"):
        wire.validate_request(wire.request("propose", **fields(tools="t")), wire.OPS)


# --- the gate's verb -------------------------------------------------------------------------------


def parse(argv: list[str], stdin: str = "") -> verbs.Request:
    return verbs.parse_argv(["propose", *argv], io.StringIO(stdin))


def test_the_verb_parses_to_exactly_the_request_fields() -> None:
    req = parse(["time", "--pip", "mcp-server-time==2025.9.25", "--tool", "get_current_time", "--tool=convert_time"])
    assert req.verb == "propose" and not req.json
    assert req.args == fields(tools=["get_current_time", "convert_time"], why="")
    assert set(req.args) == set(wire.OPS["propose"])
    npm = parse(["ev", "--npm=@modelcontextprotocol/server-everything@2025.9.25", "--why", "x", "--json"])
    assert npm.json and npm.args is not None
    assert (npm.args["manager"], npm.args["package"], npm.args["version"]) == (
        "npm",
        "@modelcontextprotocol/server-everything",
        "2025.9.25",
    )
    status = parse(["--status", "--json"])
    assert status.args is None and status.json


def test_why_dash_reads_the_text_from_stdin_and_is_capped() -> None:
    req = parse(["t", "--pip", "a==1", "--why", "-"], stdin=HOSTILE_WHY + "\n")
    assert req.args is not None and req.args["why"] == HOSTILE_WHY  # one trailing newline dropped, nothing else
    with pytest.raises(UsageError, match="at most 2000"):
        parse(["t", "--pip", "a==1", "--why", "-"], stdin="w" * 2001)
    with pytest.raises(UsageError, match="at most 2000"):
        parse(["t", "--pip", "a==1", "--why", "-"], stdin="w" * 100_000)
    with pytest.raises(UsageError):
        verbs.parse_argv(["propose", "t", "--pip", "a==1", "--why", "-"], io.TextIOWrapper(io.BytesIO(b"\xff\xfe")))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["time"],
        ["--pip", "a==1"],
        ["time", "extra", "--pip", "a==1"],
        ["time", "--pip", "a>=1"],
        ["time", "--pip", "a"],
        ["time", "--npm", "a"],
        ["time", "--npm", "@scope/a"],
        ["time", "--npm", "a@latest"],
        ["time", "--pip", "a==1", "--npm", "b@1.0.0"],
        ["time", "--pip", "a==1", "--why", "x", "--why", "y"],
        ["time", "--pip", "a==1", "--tool"],
        ["time", "--pip", "a==1", "--config", "x"],
        ["time", "--pip", "a==1", "--index-url", "http://evil"],
        ["time", "--pip", "a==1", "--json=1"],
        ["time", "--pip", "a==1", "--status"],
        ["--status", "time"],
        ["--status", "--why", "x"],
        ["ti.me", "--pip", "a==1"],
        ["time", "--pip", "a==1", *[f"--tool=t{i}" for i in range(33)]],
        ["time", "--pip", "a==1", "--why", "w" * 2001],
    ],
)
def test_bad_proposals_are_usage_errors_before_anything_is_sent(argv: list[str]) -> None:
    with pytest.raises(UsageError):
        parse(argv)


def gate(argv: list[str], root: str, stdin: str = "") -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = verbs.main(argv, root=root, environ={"SUDO_USER": "alice"}, stdin=io.StringIO(stdin), stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def fake_daemon(tmp_root: str) -> Iterator[FakeDaemon]:
    def answer(req: dict[str, Any]) -> dict[str, Any]:
        if req["op"] == "proposals":
            row = {"id": "ab12cd34", "status": "pending", "name": "time", "manager": "pip", "spec": "a==1"}
            return {"ok": True, "result": {"proposals": [row | {"tools": ["t"]}], "max_pending": 4}}
        if req["op"] == "propose" and req["name"] == "full":
            return {"ok": False, "exit": 75, "error": "propose: alice has 4 proposals pending already"}
        result = {"id": "ab12cd34", "name": req.get("name"), "manager": "pip", "spec": "a==1"}
        return {"ok": True, "result": result | {"pending": 1, "max_pending": 4}}

    d = FakeDaemon(Paths(tmp_root).gate_sock, answer)
    yield d
    d.close()


def test_the_gate_sends_the_proposal_and_needs_no_allowlist(tmp_root: str, fake_daemon: FakeDaemon) -> None:
    # tmp_root has no allowlist at all: list and call would be 78; a proposal names no tool
    code, out, err = gate(["propose", "time", "--pip", "a==1", "--tool", "t", "--why", "-"], tmp_root, "because\n")
    assert (code, err) == (0, "")
    assert out.startswith("proposal ab12cd34 queued: server time from pip a==1 (1 of 4 pending)")
    assert "nothing is installed or run unless they adopt it" in out
    assert fake_daemon.requests == [
        {
            "v": wire.PROTOCOL_VERSION,
            "op": "propose",
            "name": "time",
            "manager": "pip",
            "package": "a",
            "version": "1",
            "tools": ["t"],
            "why": "because",
        }
    ]
    code, out, err = gate(["propose", "--status"], tmp_root)
    assert (code, out, err) == (0, "ab12cd34  pending  time  pip a==1  tools: t\n", "")
    assert fake_daemon.requests[-1] == {"v": wire.PROTOCOL_VERSION, "op": "proposals"}
    code, out, err = gate(["propose", "--status", "--json"], tmp_root)
    assert code == 0 and json.loads(out)["proposals"][0]["id"] == "ab12cd34"


def test_the_daemon_s_refusal_is_one_line_with_its_code(tmp_root: str, fake_daemon: FakeDaemon) -> None:
    code, out, err = gate(["propose", "full", "--pip", "a==1"], tmp_root)
    assert (code, out) == (75, "")
    assert err == "mcp: propose: alice has 4 proposals pending already\n"
    code, out, err = gate(["propose", "full", "--pip", "a==1", "--json"], tmp_root)
    assert code == 75 and json.loads(out) == {"error": "propose: alice has 4 proposals pending already", "exit": 75}


def test_without_a_daemon_a_proposal_is_unavailable(tmp_root: str) -> None:
    code, _out, err = gate(["propose", "time", "--pip", "a==1"], tmp_root)
    assert code == 69 and err.startswith("mcp: broker unavailable")


def test_help_and_the_skill_name_the_verb(monkeypatch: pytest.MonkeyPatch) -> None:
    assert "mcp propose NAME --pip PACKAGE==VERSION | --npm PACKAGE@VERSION" in verbs.HELP
    assert "mcp propose --status" in verbs.HELP

    def listing(command: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 0, '{"tools": []}', "")

    monkeypatch.setattr(helper.subprocess, "run", listing)
    text = helper.skill("/GATE", "gate-x")
    assert "`mcp propose NAME --pip PACKAGE==VERSION`" in text and "`mcp propose --status`" in text
    assert "nothing is installed or run" in text


ENTRY = """
import sys
from broker.gate import verbs
verbs.read_frame.__defaults__ = (0.3,)
root = sys.argv[1]
sys.argv = ["mcp-gate", *sys.argv[2:]]
verbs.run(root=root)
"""


def entry(argv: list[str], stdin: bytes, root: str) -> subprocess.CompletedProcess[bytes]:
    environ = {"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin", "SUDO_USER": "alice"}
    command = [sys.executable, "-c", ENTRY, root, *argv]
    return subprocess.run(command, input=stdin, capture_output=True, env=environ, timeout=30, check=False)


def test_the_gate_takes_a_proposal_only_from_the_frame(tmp_root: str, fake_daemon: FakeDaemon) -> None:
    done = entry(["propose", "time", "--pip", "a==1"], helper.frame([], None), tmp_root)
    assert done.returncode == 64 and b"propose's arguments on standard input only" in done.stderr
    assert fake_daemon.requests == []
    done = entry(["propose"], b"time --pip a==1\n", tmp_root)
    assert done.returncode == 64 and b"no argument frame" in done.stderr
    items = ["time", "--pip", "a==1", "--why", "-"]
    done = entry(["propose"], helper.frame(items, HOSTILE_WHY), tmp_root)
    assert done.returncode == 0, done.stderr
    assert fake_daemon.requests[-1]["why"] == HOSTILE_WHY  # exactly, through the frame


def test_the_helper_frames_a_proposal_like_a_call() -> None:
    command, data = helper.gate_command("/GATE", "gate-x", ["propose", "time", "--pip", "a==1", "--why", "-"], "w")
    assert command == ["sudo", "-n", "-u", "gate-x", "/GATE", "propose"]
    assert data == helper.frame(["time", "--pip", "a==1", "--why", "-"], "w")


# --- state -------------------------------------------------------------------------------------------


@pytest.fixture
def state(tmp_path: Path) -> Iterator[State]:
    s = State(str(tmp_path / "state.db"))
    yield s
    s.close()


def test_the_state_has_a_proposals_table_that_survives_a_restart(tmp_path: Path) -> None:
    assert "CREATE TABLE IF NOT EXISTS proposals" in SCHEMA
    s = State(str(tmp_path / "state.db"))
    made = s.create_proposal("alice", fields(why=HOSTILE_WHY), 4, KEEP_DECIDED)
    s.close()
    again = State(str(tmp_path / "state.db"))
    try:
        assert made is not None
        got = again.get_proposal(made.id)
        assert got is not None and got.as_dict() == made.as_dict()
        assert got.why == HOSTILE_WHY and got.tools == ["get_current_time"] and got.status == "pending"
    finally:
        again.close()


def test_at_most_so_many_pending_per_agent_and_each_agent_its_own(state: State) -> None:
    for i in range(4):
        assert state.create_proposal("alice", fields(name=f"s{i}"), 4, KEEP_DECIDED) is not None
    assert state.create_proposal("alice", fields(name="s4"), 4, KEEP_DECIDED) is None  # the 5th: nothing written
    assert state.create_proposal("bob", fields(name="b0"), 4, KEEP_DECIDED) is not None  # another agent's quota
    assert [p.name for p in state.proposals("alice")] == ["s0", "s1", "s2", "s3"]
    assert [p.name for p in state.proposals("bob")] == ["b0"]
    first = state.proposals("alice")[0]
    decided = state.decide_proposal(first.id, "rejected", "root", "not now")
    assert decided is not None and (decided.status, decided.decided_by, decided.note) == ("rejected", "root", "not now")
    assert state.decide_proposal(first.id, "adopted", "root") is None  # only a pending one is decided
    assert state.create_proposal("alice", fields(name="s4"), 4, KEEP_DECIDED) is not None  # room again
    assert len(state.proposals(status="pending")) == 5


def test_decided_proposals_are_pruned_to_the_newest(state: State) -> None:
    for i in range(KEEP_DECIDED + 5):
        made = state.create_proposal("alice", fields(name=f"s{i}"), 4, KEEP_DECIDED)
        assert made is not None
        state.decide_proposal(made.id, "rejected", "root")
    state.create_proposal("alice", fields(name="last"), 4, KEEP_DECIDED)
    kept = state.proposals("alice")
    assert len([p for p in kept if p.status == "rejected"]) == KEEP_DECIDED
    assert [p.name for p in kept if p.status == "pending"] == ["last"]


# --- the desk ------------------------------------------------------------------------------------------


class Desk:
    def __init__(self, tmp: Path) -> None:
        self.state = State(str(tmp / "state.db"))
        self.log = audit.AuditLog(str(tmp / "audit.jsonl"))
        self.desk = ProposalDesk(self.state, self.log, lambda args: audit.args_digest(args, KEY))

    def records(self) -> list[dict[str, Any]]:
        with open(self.log.path, encoding="utf-8") as fh:
            found = [json.loads(line) for line in fh]
        assert audit.verify(self.log.path) == []
        return found

    def close(self) -> None:
        self.log.close()
        self.state.close()


@pytest.fixture
def d(tmp_path: Path) -> Iterator[Desk]:
    desk = Desk(tmp_path)
    yield desk
    desk.close()


def request(**over: Any) -> dict[str, Any]:
    return wire.request("propose", **fields(**over))


def test_a_proposal_is_queued_with_bounded_audit_fields_and_no_why(d: Desk) -> None:
    reply = d.desk.submit("alice", request(why=HOSTILE_WHY))
    assert reply.error is None
    result = reply.result
    assert (result["status"], result["name"], result["spec"], result["pending"], result["max_pending"]) == (
        "pending",
        "time",
        "mcp-server-time==2025.9.25",
        1,
        4,
    )
    assert "caller" not in result
    rec = reply.record
    assert rec["decision"] == "queued" and rec["proposal"] == result["id"]
    assert (rec["server"], rec["package"], rec["tools"]) == (
        "time",
        "pip:mcp-server-time==2025.9.25",
        ["get_current_time"],
    )
    assert rec["args_digest"] == audit.args_digest(fields(why=HOSTILE_WHY), KEY)
    assert HOSTILE_WHY not in json.dumps(rec) and "need time" not in json.dumps(rec)  # the text is not logged


def test_the_daemon_checks_the_fields_again(d: Desk) -> None:
    for bad in (
        {"name": "a.b"},
        {"version": ">=1"},
        {"package": "--index-url=http://evil"},
        {"manager": "curl"},
        {"tools": [f"t{i}" for i in range(33)]},
        {"tools": [{"x": 1}]},
        {"why": "w" * 2001},
    ):
        reply = d.desk.submit("alice", request(**bad))
        assert isinstance(reply.error, UsageError), bad
        assert reply.error.exit_code == 64
        assert "server" not in reply.record and "tools" not in reply.record  # nothing unchecked is logged
    assert d.state.proposals() == []


def test_the_fifth_pending_is_a_tempfail_and_a_duplicate_is_rejected(d: Desk) -> None:
    for i in range(4):
        assert d.desk.submit("alice", request(name=f"s{i}")).error is None
    dup = d.desk.submit("alice", request(name="s1"))
    assert dup.error is not None and dup.error.exit_code == 65 and "already" in dup.error.message
    over = d.desk.submit("alice", request(name="s4"))
    assert over.error is not None and over.error.exit_code == 75
    assert "4 proposals pending already" in over.error.message and over.record["limit"] == "proposals"
    assert d.desk.submit("bob", request(name="s4")).error is None  # bob's own quota


def test_an_agent_reads_back_only_its_own(d: Desk) -> None:
    d.desk.submit("alice", request(name="mine"))
    d.desk.submit("bob", request(name="theirs", why="bob's secret plan"))
    own = d.desk.own("alice").result["proposals"]
    assert [p["name"] for p in own] == ["mine"]
    assert "theirs" not in json.dumps(own) and "bob" not in json.dumps(own)
    assert all("caller" not in p and "decided_by" not in p for p in own)


def test_every_operator_step_is_one_audit_record(d: Desk) -> None:
    a = d.desk.submit("alice", request(name="one")).result["id"]
    b = d.desk.submit("alice", request(name="two")).result["id"]

    async def steps() -> None:
        await d.desk.decide(a, "adopting", None)
        await d.desk.decide(a, "adopt_failed", "server add is not available")
        assert d.state.get_proposal(a).status == "pending"  # type: ignore[union-attr]
        shown = await d.desk.decide(a, "adopted", None)
        assert shown["status"] == "adopted" and shown["decided_by"] == "root"
        await d.desk.decide(b, "rejected", "not\x1b[2J needed")
        with pytest.raises(PrivsepError) as again:
            await d.desk.decide(b, "adopted", None)
        assert again.value.exit_code == EX_FAILED and "it is rejected" in again.value.message
        with pytest.raises(PrivsepError, match="no such proposal"):
            await d.desk.decide("deadbeef", "rejected", None)
        with pytest.raises(UsageError):
            await d.desk.decide(a, "approved", None)

    asyncio.run(steps())
    recs = [(r["op"], r["decision"], r["proposal"], r["caller"], r.get("by")) for r in d.records()]
    assert recs == [
        ("proposal", "adopting", a, "alice", "root"),
        ("proposal", "adopt_failed", a, "alice", "root"),
        ("proposal", "adopted", a, "alice", "root"),
        ("proposal", "rejected", b, "alice", "root"),
    ]
    assert d.records()[1]["reason"] == "server add is not available"
    assert d.desk.own("alice").result["proposals"][1]["note"] == "not\x1b[2J needed"  # as the operator wrote it
    assert [p["id"] for p in d.desk.listing("pending")] == []
    assert {p["id"] for p in d.desk.listing(None)} == {a, b}


# --- dispatch ------------------------------------------------------------------------------------------


def test_the_agent_s_ops_are_gate_ops_and_the_operator_s_root_only() -> None:
    assert {"propose", "proposals"} <= set(service.GATE_ROUTES)
    assert service.GATE_ROUTES["propose"].handler is service.Broker.op_propose
    assert service.GATE_ROUTES["proposals"].handler is service.Broker.op_proposals
    assert service.GATE_ROUTES["propose"].peers == frozenset({"gate"})
    assert service.ADMIN_ROUTES["proposals"].handler is service.Broker.admin_proposals
    assert service.ADMIN_ROUTES["proposal_decide"].handler is service.Broker.admin_proposal_decide
    assert service.ADMIN_ROUTES["proposal_decide"].peers == frozenset({"root"})
    # an agent's gate has no way to decide: the op does not exist on gate.sock, and no gate op takes an id
    assert "proposal_decide" not in wire.OPS and "adopt" not in wire.OPS and "reject" not in wire.OPS
    with pytest.raises(ProtocolError, match="unknown op"):
        wire.validate_request(wire.request("proposal_decide", id="x", decision="adopted"), wire.OPS)
    with pytest.raises(ProtocolError, match="unexpected key"):
        wire.validate_request(wire.request("proposals", status=None), wire.OPS)  # no one else's, by any filter


class FakeBroker:
    """What op_propose reads of the daemon: the decision's view (frozen or not) and the desk."""

    def __init__(self, desk: ProposalDesk, frozen: float | None = None) -> None:
        self.proposals = desk
        self._frozen = frozen
        self.cfg = type("Cfg", (), {"settings": type("S", (), {"notify_command": None})()})()

    def frozen_until(self, caller: str) -> float | None:
        return self._frozen

    def allowlist(self, caller: str) -> Any:
        from broker.core.errors import ConfigError

        raise ConfigError("no allowlist")  # a broken allowlist does not stop a proposal


def ctx(op: str) -> service.Ctx:
    return service.Ctx("req1", "alice", 1234, op, None)


def test_the_handlers_delegate_and_a_frozen_agent_cannot_propose(d: Desk) -> None:
    import time

    fake: Any = FakeBroker(d.desk)
    out = asyncio.run(service.Broker.op_propose(fake, request(), ctx("propose"), None))  # type: ignore[arg-type]
    assert out.error is None and out.record["decision"] == "queued" and not out.counts
    listed = asyncio.run(service.Broker.op_proposals(fake, wire.request("proposals"), ctx("proposals"), None))  # type: ignore[arg-type]
    assert [p["name"] for p in listed.result["proposals"]] == ["time"]
    frozen: Any = FakeBroker(d.desk, frozen=time.time() + 600)
    out = asyncio.run(service.Broker.op_propose(frozen, request(name="other"), ctx("propose"), None))  # type: ignore[arg-type]
    assert out.error is not None and out.error.exit_code == 77 and "frozen" in out.error.message
    assert [p.name for p in d.state.proposals()] == ["time"]
    rows = asyncio.run(service.Broker.admin_proposals(fake, {"status": "pending"}))
    assert [p["caller"] for p in rows] == ["alice"]


# --- the operator's screen ------------------------------------------------------------------------------


def row(**over: Any) -> dict[str, Any]:
    base = {
        "id": "ab12cd34",
        "caller": "mcpt-agent1",
        "name": "time",
        "manager": "pip",
        "package": "mcp-server-time",
        "version": "2025.9.25",
        "spec": "mcp-server-time==2025.9.25",
        "tools": ["get_current_time"],
        "why": HOSTILE_WHY,
        "status": "pending",
        "created": 1_700_000_000.0,
        "decided": None,
        "decided_by": "",
        "note": "",
    }
    return base | over


HOSTILE_META = {
    "name": "mcp-server-time",
    "version": "2025.9.25",
    "summary": "Time \x1b]8;;http://evil\x07tools\u2066 hidden\u2069",
    "license": "MIT\x1b[8m",
    "home": "https://example.org/\u202eexe.txt",
    "artifact": "https://files.example/x.whl",
    "sha256": "ab" * 32,
}


class Admin:
    """A stand-in for the daemon's admin.sock: the proposals it holds and the steps asked of it."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        self.rows = rows
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, paths: Paths, op: str, **kw: Any) -> Any:
        self.calls.append((op, kw))
        if op == "proposals":
            return [dict(r) for r in self.rows if kw.get("status") in (None, r["status"])]
        if op == "proposal_decide":
            for r in self.rows:
                if r["id"] == kw["id"] and kw["decision"] in ("adopted", "rejected"):
                    r["status"] = kw["decision"]
            return next(r for r in self.rows if r["id"] == kw["id"])
        if op == "status":
            return {"servers": [{"name": "demo", "server": "demo"}]}
        if op == "tools":
            return {
                kw["server"]: [{"name": "get_current_time", "description": "Now \x1b[5mblink"}, {"name": "convert"}]
            }
        raise AssertionError(op)

    def decisions(self) -> list[str]:
        return [kw["decision"] for op, kw in self.calls if op == "proposal_decide"]


@pytest.fixture
def admin(monkeypatch: pytest.MonkeyPatch) -> Admin:
    fake = Admin([row(), row(id="ee11ff22", name="old", status="rejected", note="no\x1b[2J")])
    monkeypatch.setattr(proposals_cli, "_admin", fake)
    monkeypatch.setattr(proposals_cli, "LOOKUP", [lambda m, p, v: dict(HOSTILE_META)])
    return fake


def ctl(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = admin_cli.main(argv)
    got = capsys.readouterr()
    return code, got.out, got.err


def assert_defanged(text: str) -> None:
    for ch in (*RAW_CONTROL, "\u2066", "\u2069"):
        assert ch not in text, repr(ch)


def test_the_listing_shows_why_and_the_metadata_defanged(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = ctl(["proposals"], capsys)
    assert (code, err) == (0, "")
    assert_defanged(out)
    assert "proposal ab12cd34  pending  from mcpt-agent1" in out
    assert "package  = pip mcp-server-time==2025.9.25" in out or "pip mcp-server-time==2025.9.25" in out
    assert "\\x1b[31m RED" in out and "<U+202E>evil<U+202C>" in out and "<U+200B>" in out and "\\rend" in out
    assert "Time \\x1b]8;;http://evil\\x07tools<U+2066>" in out  # the registry's words too
    assert "https://example.org/<U+202E>exe.txt" in out and "MIT\\x1b[8m" in out
    assert "sha256" in out and "ab" * 32 in out
    assert "adopt: mcp-brokerctl proposals adopt ab12cd34" in out
    assert "old" not in out  # decided ones only with --all
    code, out, _ = ctl(["proposals", "--all", "--offline"], capsys)
    assert code == 0 and "ee11ff22  rejected" in out and "no\\x1b[2J" in out and "registry" not in out
    assert_defanged(out)


def test_the_json_listing_is_ascii(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(["proposals", "--json"], capsys)
    assert code == 0 and out.isascii()
    rows = json.loads(out)
    assert rows[0]["why"] == HOSTILE_WHY and rows[0]["registry"]["license"] == "MIT\x1b[8m"


def test_a_long_why_is_cut_unless_full(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    admin.rows[0]["why"] = "w" * 1500 + "TAIL"
    _code, out, _ = ctl(["proposals", "--offline"], capsys)
    assert "TAIL" not in out and "cut:" in out
    _code, out, _ = ctl(["proposals", "--offline", "--full"], capsys)
    assert "TAIL" in out


def test_adopt_without_server_add_fails_clearly_and_stays_pending(
    admin: Admin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(proposals_cli, "server_add", lambda: None)
    code, out, err = ctl(["proposals", "adopt", "ab12cd34", "--yes"], capsys)
    assert code == 69
    assert "server add is not available" in err and "stays pending" in err
    assert_defanged(out)
    assert admin.decisions() == ["adopt_failed"] and admin.rows[0]["status"] == "pending"


def test_adopt_runs_server_add_then_lists_the_tools_for_pin_review(
    admin: Admin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    added: list[tuple[Any, ...]] = []

    def add_server(
        paths: Paths, name: str, pip: str | None = None, npm: str | None = None, yes: bool = False, echo: Any = None
    ) -> None:
        added.append((name, pip, npm, yes))
        echo("server add: reviewed and installed")

    monkeypatch.setattr(proposals_cli, "server_add", lambda: add_server)
    code, out, err = ctl(["proposals", "adopt", "ab12cd34", "--yes"], capsys)
    assert (code, err) == (0, "")
    assert added == [("time", "mcp-server-time==2025.9.25", None, True)]
    assert admin.decisions() == ["adopting", "adopted"]
    assert "server add: reviewed and installed" in out
    assert "time.get_current_time" in out and "(asked for)" in out and "\\x1b[5mblink" in out
    assert "review and pin: mcp-brokerctl pins accept time.get_current_time" in out
    assert_defanged(out)
    code, _out, err = ctl(["proposals", "adopt", "ab12cd34"], capsys)  # decided: not again
    assert code == EX_FAILED and "is adopted, not pending" in err


def test_a_failed_or_declined_adoption_is_recorded_and_stays_pending(
    admin: Admin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(paths: Paths, name: str, **kw: Any) -> None:
        raise PrivsepError("server add: no wheel for mcp-server-time==2025.9.25", 1)

    monkeypatch.setattr(proposals_cli, "server_add", lambda: broken)
    code, _out, err = ctl(["proposals", "adopt", "ab12cd34"], capsys)
    assert code == 1 and "no wheel" in err
    monkeypatch.setattr(proposals_cli, "server_add", lambda: lambda paths, name, **kw: False)
    code, out, _err = ctl(["proposals", "adopt", "ab12cd34"], capsys)
    assert code == 0 and "not adopted; it stays pending" in out
    assert admin.decisions() == ["adopting", "adopt_failed", "adopting", "adopt_failed"]
    assert admin.rows[0]["status"] == "pending"


def test_an_adoption_that_installed_and_then_failed_is_adopted_and_says_so(
    admin: Admin, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    servers_d = Paths(str(tmp_path)).servers_d

    def half(paths: Paths, name: str, **kw: Any) -> None:
        os.makedirs(paths.servers_d, exist_ok=True)
        Path(f"{paths.servers_d}/{name}.toml").write_text("# written by server add\n")
        raise PrivsepError(f"server {name}: installed, but it is down (connection closed)", 1)

    monkeypatch.setattr(proposals_cli, "server_add", lambda: half)
    code, _out, err = ctl(["--root", str(tmp_path), "proposals", "adopt", "ab12cd34", "--yes"], capsys)
    assert code == 1 and "adopted ab12cd34 as server time, but:" in err and "it is down" in err
    assert os.path.exists(f"{servers_d}/time.toml")
    assert admin.decisions() == ["adopting", "adopted"]
    assert admin.calls[-1][1]["reason"].startswith("installed, but: server time: installed, but it is down")


def test_reject_drops_it(admin: Admin, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = ctl(["proposals", "reject", "ab12cd34", "--reason", "use the bundled one"], capsys)
    assert code == 0 and out.startswith("proposals: rejected ab12cd34: server time")
    assert admin.calls[-1] == (
        "proposal_decide",
        {"id": "ab12cd34", "decision": "rejected", "reason": "use the bundled one"},
    )
    code, out, _ = ctl(["proposals", "--offline"], capsys)
    assert (code, out) == (0, "proposals: none pending\n")


def test_server_add_is_found_when_the_installation_has_it() -> None:
    found = proposals_cli.server_add()
    exists = os.path.exists(os.path.join(REPO, "broker", "admin", "server_install.py"))
    assert (found is not None) == exists
