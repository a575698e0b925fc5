"""Agents propose servers, for real: through the shim, sudo and the gate; root lists, rejects and adopts.

On the shared installation: AGENT1 proposes two servers (one with an ESC,
an OSC 8 link and bidi overrides in ``why``, sent on stdin with ``--why -``);
AGENT2 sees none of them; neither agent has a verb to adopt or reject, and
gate.sock closes the connection of a gate that asks for the operator's op;
nothing proposed is configured, installed or running before adoption; root
lists them defanged (and, for the PyPI one, with what the registry says of
that exact version); root rejects one and adopts the other with ``server
add`` (skipped, saying why, where this tree has no ``server add``), and the
adopted server's tools stay uncallable until they are reviewed and allowed;
the fifth pending proposal of an agent is refused with 75 and one clear
line; every step is in the audit trail, which verifies, and ``why`` is in
none of its records.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from broker.core import wire
from tests.e2e.harness import AGENT1, AGENT2, Installation, clean, gate_exchange, gate_user, servers, verify_ok

#: a real package of the registry, pinned (``server add`` installs it on adoption)
TIME_PACKAGE = "mcp-server-time==2026.10.19"
#: a name no other test gives a server (the installation is shared by the whole session)
ADOPTED = "proposed-time"
REJECTED = "proposed-evil"
#: an agent's words for the operator's terminal: a colour, a clipboard write, a link, bidi overrides, a CR
HOSTILE_WHY = (
    "please add this\x1b[31m RED\x1b[0m \x1b]52;c;cm0gLXJmIH4=\x07 "
    "\x1b]8;;http://evil.example/\x1b\\docs\x1b]8;;\x1b\\ "
    "\u202eexe.txt\u202c \u2066isolated\u2069 zero\u200bwidth\rOVERWRITTEN"
)
RAW = ("\x1b", "\x07", "\u202e", "\u202c", "\u2066", "\u2069", "\u200b", "\r")
HAS_SERVER_ADD = importlib.util.find_spec("broker.admin.server_install") is not None


@dataclass
class Queued:
    adopt: str
    reject: str


def proposal_id(out: str) -> str:
    assert out.startswith("proposal "), out
    return out.split()[1]


@pytest.fixture(scope="module")
def queued(inst: Installation) -> Iterator[Queued]:
    """AGENT1's two proposals: one to adopt (the PyPI time server), one to reject (hostile why, on stdin)."""
    if inst.daemon is None or inst.daemon.poll() is not None:
        inst.start_daemon()
    r = clean(
        inst.mcp(
            "propose",
            ADOPTED,
            "--pip",
            TIME_PACKAGE,
            "--tool",
            "get_current_time",
            "--tool",
            "convert_time",
            "--why",
            "the user asks what time it is in other zones",
        )
    )
    assert r.code == 0, r
    assert "nothing is installed or run unless they adopt it" in r.out, r
    adopt = proposal_id(r.out)
    r = clean(
        inst.mcp(
            "propose",
            REJECTED,
            "--npm",
            "@mcp-privsep-e2e/no-such-pkg@1.0.0",
            "--tool",
            "run",
            "--why",
            "-",
            stdin=HOSTILE_WHY,
        )
    )
    assert r.code == 0, r
    yield Queued(adopt, proposal_id(r.out))
    if HAS_SERVER_ADD and os.path.exists(f"{inst.paths.servers_d}/{ADOPTED}.toml"):
        inst.ctl("server", "remove", ADOPTED)


def status(inst: Installation, user: str) -> list[dict[str, object]]:
    r = clean(inst.mcp("propose", "--status", "--json", user=user))
    assert r.code == 0, r
    rows: list[dict[str, object]] = json.loads(r.out)["proposals"]
    return rows


def root_rows(inst: Installation, *flags: str) -> list[dict[str, object]]:
    r = inst.ctl("proposals", "--json", "--offline", *flags)
    assert r.code == 0, r
    rows: list[dict[str, object]] = json.loads(r.out)
    return rows


def test_an_agent_sees_its_own_proposals_and_no_one_else_s(inst: Installation, queued: Queued) -> None:
    mine = {str(p["id"]): p for p in status(inst, AGENT1)}
    assert {queued.adopt, queued.reject} <= set(mine)
    assert mine[queued.reject]["why"] == HOSTILE_WHY  # exactly, through the frame: its own text back
    assert mine[queued.adopt]["status"] == "pending" and mine[queued.adopt]["spec"] == TIME_PACKAGE
    theirs = inst.mcp("propose", "--status", "--json", user=AGENT2)
    assert theirs.code == 0, theirs
    for word in (queued.adopt, queued.reject, ADOPTED, REJECTED, "please add this"):
        assert word not in theirs.out, theirs
    r = clean(inst.mcp("propose", "--status", user=AGENT1))
    assert r.code == 0 and f"{queued.adopt}  pending  {ADOPTED}  pip {TIME_PACKAGE}" in r.out, r


def test_no_agent_can_adopt_or_reject(inst: Installation, queued: Queued) -> None:
    for user in (AGENT1, AGENT2):
        for argv in (
            ["proposals", "adopt", queued.adopt],
            ["adopt", queued.adopt],
            ["reject", queued.reject],
            ["propose", "--adopt", queued.adopt],
            ["propose", "adopt", queued.adopt],
            ["propose", "--reject", queued.reject],
        ):
            r = clean(inst.mcp(*argv, user=user))
            assert r.code == 64, (argv, r)
        # a gate that speaks gate.sock itself: the operator's ops are not on it; the connection is closed
        for request in (
            wire.request("proposal_decide", id=queued.adopt, decision="adopted"),
            wire.request("proposals", status=None),
            wire.request("approve", id=queued.adopt),
        ):
            assert gate_exchange(gate_user(user), inst.paths.gate_sock, request) is None, request
        # and admin.sock refuses an agent and its gate user outright
        for who in (user, gate_user(user)):
            with pytest.raises(subprocess.CalledProcessError):
                gate_exchange(who, inst.paths.admin_sock, wire.request("proposals", status=None))
    assert {str(p["id"]): p["status"] for p in root_rows(inst)}.get(queued.adopt) == "pending"
    assert {str(p["id"]): p["status"] for p in root_rows(inst)}.get(queued.reject) == "pending"


def test_nothing_proposed_is_configured_or_running(inst: Installation, queued: Queued) -> None:
    assert ADOPTED not in servers(inst) and REJECTED not in servers(inst)
    assert not os.path.exists(f"{inst.paths.servers_d}/{ADOPTED}.toml")
    assert not os.path.exists(inst.paths.server_package(ADOPTED))
    ours = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    cmd = fh.read()
            except OSError:
                continue
            if b"mcp_server_time" in cmd or b"mcp-server-time" in cmd or b"no-such-pkg" in cmd:
                ours.append(cmd)
    assert ours == []


def test_root_lists_them_defanged(inst: Installation, queued: Queued) -> None:
    r = inst.ctl("proposals", "--offline", "--full")
    assert r.code == 0, r
    for ch in RAW:
        assert ch not in r.out, (repr(ch), r.out)
    assert f"proposal {queued.reject}  pending  from {AGENT1}" in r.out, r.out
    assert "please add this\\x1b[31m RED" in r.out and "\\x1b]52;c;" in r.out and "\\x1b]8;;http://evil" in r.out
    assert "<U+202E>exe.txt<U+202C>" in r.out and "<U+2066>isolated<U+2069>" in r.out and "zero<U+200B>width" in r.out
    assert "\\rOVERWRITTEN" in r.out
    assert "npm @mcp-privsep-e2e/no-such-pkg@1.0.0" in r.out and f"pip {TIME_PACKAGE}" in r.out
    assert f"proposals adopt {queued.adopt}" in r.out and f"proposals reject {queued.reject}" in r.out
    listed = inst.ctl("proposals", "--json", "--offline")
    assert listed.code == 0 and listed.out.isascii(), listed
    by_id = {p["id"]: p for p in json.loads(listed.out)}
    assert by_id[queued.reject]["why"] == HOSTILE_WHY and by_id[queued.reject]["caller"] == AGENT1


def test_root_sees_the_registry_s_metadata_of_the_exact_version(inst: Installation, queued: Queued) -> None:
    r = inst.ctl("proposals", "--json")
    assert r.code == 0, r
    registry = {p["id"]: p.get("registry") for p in json.loads(r.out)}
    found = registry[queued.adopt]
    assert isinstance(found, dict) and not found.get("error"), found
    assert (found["name"], found["version"]) == ("mcp-server-time", "2026.10.19")
    assert "time" in str(found["summary"]).lower() and len(str(found["sha256"])) == 64
    assert registry[queued.reject] and registry[queued.reject].get("error")  # no such npm package: said, not hidden
    shown = inst.ctl("proposals")
    assert shown.code == 0 and "summary" in shown.out and "lookup failed" in shown.out, shown
    for ch in RAW:
        assert ch not in shown.out


def test_root_rejects_one(inst: Installation, queued: Queued) -> None:
    r = inst.ctl("proposals", "reject", queued.reject, "--reason", "no unknown npm packages")
    assert r.code == 0, r
    assert r.out.startswith(f"proposals: rejected {queued.reject}: server {REJECTED}"), r
    assert queued.reject not in {p["id"] for p in root_rows(inst)}  # out of the queue
    assert {p["id"]: p["status"] for p in root_rows(inst, "--all")}[queued.reject] == "rejected"
    mine = {p["id"]: p for p in status(inst, AGENT1)}
    assert (mine[queued.reject]["status"], mine[queued.reject]["note"]) == ("rejected", "no unknown npm packages")
    again = inst.ctl("proposals", "reject", queued.reject)
    assert again.code == 1 and "it is rejected" in again.err, again
    assert not os.path.exists(f"{inst.paths.servers_d}/{REJECTED}.toml")


@pytest.mark.skipif(not HAS_SERVER_ADD, reason="this tree has no 'server add' (broker/admin/server_install.py) yet")
def test_root_adopts_one_with_server_add_and_its_tools_wait_for_review(inst: Installation, queued: Queued) -> None:
    r = inst.ctl("proposals", "adopt", queued.adopt, "--yes")
    assert r.code == 0, r
    assert f"proposals: adopted {queued.adopt} as server {ADOPTED}" in r.out, r
    assert f"{ADOPTED}.get_current_time" in r.out and "(asked for)" in r.out, r
    assert f"mcp-brokerctl pins accept {ADOPTED}." in r.out, r
    assert {p["id"]: p["status"] for p in status(inst, AGENT1)}[queued.adopt] == "adopted"
    assert servers(inst)[ADOPTED]["state"] == "up"
    # adopted is not allowed: the agent still cannot call it until an operator reviews and allows its tools
    called = clean(inst.mcp("call", f"{ADOPTED}.get_current_time", "timezone=UTC"))
    assert called.code == 77, called
    again = inst.ctl("proposals", "adopt", queued.adopt, "--yes")
    assert again.code == 1 and "is adopted, not pending" in again.err, again


@pytest.mark.skipif(HAS_SERVER_ADD, reason="this tree has 'server add': the adoption itself is tested")
def test_without_server_add_adopt_says_so_and_the_proposal_stays_pending(inst: Installation, queued: Queued) -> None:
    r = inst.ctl("proposals", "adopt", queued.adopt, "--yes")
    assert r.code == 69 and "server add is not available" in r.err, r
    assert {p["id"]: p["status"] for p in root_rows(inst)}[queued.adopt] == "pending"


def test_the_fifth_pending_proposal_is_refused_with_75(inst: Installation, queued: Queued) -> None:
    made = []
    for i in range(4):
        r = clean(inst.mcp("propose", f"cap{i}", "--pip", f"pkg{i}==1.0", user=AGENT2))
        assert r.code == 0, r
        made.append(proposal_id(r.out))
    r = clean(inst.mcp("propose", "cap4", "--pip", "pkg4==1.0", user=AGENT2))
    assert (r.code, r.out) == (75, ""), r
    assert r.err.startswith(f"mcp: propose: {AGENT2} has 4 proposals pending already"), r
    assert len(r.err.splitlines()) == 1
    j = clean(inst.mcp("propose", "cap4", "--pip", "pkg4==1.0", "--json", user=AGENT2))
    assert j.code == 75 and json.loads(j.out)["exit"] == 75
    assert len([p for p in status(inst, AGENT2) if p["status"] == "pending"]) == 4
    # the fields' caps, before anything is sent (64), and a second of the same name (65)
    for argv in (
        ["propose", "big", "--pip", "pkg==1.0", "--why", "w" * 2001],
        ["propose", "big", "--pip", "pkg==1.0", *[f"--tool=t{i}" for i in range(33)]],
        ["propose", "big", "--pip", "pkg>=1.0"],
        ["propose", "big", "--npm", "pkg@latest"],
        ["propose", "b" * 65, "--pip", "pkg==1.0"],
    ):
        assert clean(inst.mcp(*argv, user=AGENT1)).code == 64, argv
    dup = clean(inst.mcp("propose", "cap0", "--pip", "pkg0==2.0", user=AGENT2))
    assert dup.code == 65 and "proposed a server named cap0 already" in dup.err, dup
    # another agent's quota is its own
    r = clean(inst.mcp("propose", "mine", "--pip", "pkg==1.0", user=AGENT1))
    assert r.code == 0, r
    # the operator decides one: room for one more, and then the cap again
    assert inst.ctl("proposals", "reject", made[0]).code == 0
    assert clean(inst.mcp("propose", "cap4", "--pip", "pkg4==1.0", user=AGENT2)).code == 0
    assert clean(inst.mcp("propose", "cap5", "--pip", "pkg5==1.0", user=AGENT2)).code == 75


def test_every_step_is_in_the_audit_trail(inst: Installation, queued: Queued) -> None:
    records = inst.records()
    raw = open(inst.paths.audit_log, encoding="utf-8").read()  # noqa: SIM115
    assert "please add this" not in raw and "the user asks what time" not in raw  # why: size and digest only
    proposed = {r.get("proposal"): r for r in records if r.get("op") == "propose" and r.get("decision") == "queued"}
    for pid, server in ((queued.adopt, ADOPTED), (queued.reject, REJECTED)):
        rec = proposed[pid]
        assert (rec["caller"], rec["server"], rec["exit"]) == (AGENT1, server, 0)
    sent = {
        "name": ADOPTED,
        "manager": "pip",
        "package": "mcp-server-time",
        "version": "2026.10.19",
        "tools": ["get_current_time", "convert_time"],
        "why": "the user asks what time it is in other zones",
    }
    assert proposed[queued.adopt]["args_digest"] == inst.digest(sent)
    assert proposed[queued.adopt]["arg_keys"] == sorted(sent)
    assert proposed[queued.adopt]["package"] == f"pip:{TIME_PACKAGE}"
    assert proposed[queued.adopt]["tools"] == ["get_current_time", "convert_time"]
    refused = [r for r in records if r.get("op") == "propose" and r.get("exit") == 75]
    assert refused and all(r["limit"] == "proposals" and r["caller"] == AGENT2 for r in refused)
    assert refused[0]["decision"] == "tempfail" and "4 proposals pending already" in str(refused[0]["reason"])
    usage = [r for r in records if r.get("op") == "report" and r.get("verb") == "propose"]
    assert {r["caller"] for r in usage} == {AGENT1, AGENT2} and {r["exit"] for r in usage} == {64}  # the gate's own
    assert {r["caller"] for r in records if r.get("op") == "proposals"} >= {AGENT1, AGENT2}  # the agents' reads
    steps = [(r["proposal"], r["decision"], r["caller"], r["by"]) for r in records if r.get("op") == "proposal"]
    assert (queued.reject, "rejected", AGENT1, "root") in steps
    if HAS_SERVER_ADD:
        assert (queued.adopt, "adopting", AGENT1, "root") in steps
        assert (queued.adopt, "adopted", AGENT1, "root") in steps
    else:
        assert (queued.adopt, "adopt_failed", AGENT1, "root") in steps
    rejected = next(r for r in records if r.get("op") == "proposal" and r.get("proposal") == queued.reject)
    assert rejected["reason"] == "no unknown npm packages"
    verify_ok(inst)
