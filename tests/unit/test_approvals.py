"""Unit tests for ``broker.daemon.approvals``: calls held for an operator, on a real State and AuditLog.

The held call's connection is a fake ``Waiting`` (it records the frames
sent and can hang up). Each test reads the audit file back and verifies
its chain: a pending approval is recorded once, each operator decision
once, and nothing else is written. Covered: approve, reject, expiry,
hang-up (and asking again), an approval granted before the call (used at
once, single use), two identical calls sharing one approval (the second
finds it used), and operator decisions on unknown or decided ids.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from broker.core.errors import EX_FAILED, Denied, PrivsepError, TempFail
from broker.daemon import audit
from broker.daemon.approvals import ApprovalDesk
from broker.daemon.redact import Redactor
from broker.daemon.state import State

T = TypeVar("T")

CALLER, TOOL = "alice", "pay.send"
ARGS = {"amount": 5, "note": "token secretvalue123"}
KEY = b"k" * 32
DIGEST = audit.args_digest(ARGS, KEY)
REDACTOR = Redactor({"demo.K": "secretvalue123"})


class FakeConn:
    """A held call's connection: records frames; ``hang_up()`` makes ``closed()`` return."""

    def __init__(self) -> None:
        self.frames: list[dict[str, Any]] = []
        self._gone: asyncio.Event | None = None

    def _event(self) -> asyncio.Event:
        if self._gone is None:
            self._gone = asyncio.Event()
        return self._gone

    async def send(self, obj: dict[str, Any]) -> None:
        self.frames.append(obj)

    async def closed(self) -> None:
        await self._event().wait()

    def hang_up(self) -> None:
        self._event().set()


class Desk:
    """An ApprovalDesk over a State and an AuditLog in a temporary directory."""

    def __init__(self, tmp: Path) -> None:
        self.state = State(str(tmp / "state.db"))
        self.log = audit.AuditLog(str(tmp / "audit.jsonl"))
        self.desk = ApprovalDesk(self.state, self.log)

    def hold(self, conn: FakeConn, ttl: float = 30.0, args: dict[str, Any] | None = None) -> Awaitable[str]:
        args = ARGS if args is None else args
        return self.desk.hold(CALLER, TOOL, args, audit.args_digest(args, KEY), conn, ttl, REDACTOR)

    def records(self) -> list[dict[str, Any]]:
        with open(self.log.path, encoding="utf-8") as fh:
            found = [json.loads(line) for line in fh]
        assert audit.verify(self.log.path) == []  # every test leaves an intact chain
        return found

    def audit_is_empty(self) -> bool:
        with open(self.log.path, "rb") as fh:
            return fh.read() == b""

    def close(self) -> None:
        self.log.close()
        self.state.close()


@pytest.fixture
def d(tmp_path: Path) -> Iterator[Desk]:
    desk = Desk(tmp_path)
    yield desk
    desk.close()


def run(coro: Callable[[], Awaitable[T]]) -> T:
    async def main() -> T:
        return await asyncio.wait_for(coro(), 10)

    return asyncio.run(main())


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.005)


def pending_id(conn: FakeConn) -> str:
    assert len(conn.frames) == 1 and set(conn.frames[0]) == {"pending", "wait"}
    return str(conn.frames[0]["pending"])


def brief(records: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(r["op"], r["decision"]) for r in records]


# --- the operator decides --------------------------------------------------------------------


def test_approve_releases_the_held_call_once(d: Desk) -> None:
    conn = FakeConn()

    async def scenario() -> tuple[str, str]:
        held = asyncio.ensure_future(d.hold(conn, ttl=30))
        await until(lambda: bool(conn.frames))
        approval = pending_id(conn)
        decided = await d.desk.decide(approval, "approved", by="root")
        assert decided.status == "approved" and decided.id == approval
        return approval, await held

    approval, used = run(scenario)
    assert used == approval
    assert 0 < conn.frames[0]["wait"] <= 30
    got = d.state.get_approval(approval)
    assert got is not None and got.status == "used"  # single use: consumed by the call it released
    recs = d.records()
    assert brief(recs) == [("approval", "pending"), ("approval", "approved")]
    pending, approved = recs
    assert (pending["caller"], pending["tool"], pending["approval"], pending["args_digest"]) == (
        CALLER,
        TOOL,
        approval,
        DIGEST,
    )
    assert (approved["caller"], approved["tool"], approved["approval"], approved["by"]) == (
        CALLER,
        TOOL,
        approval,
        "root",
    )
    assert pending["id"] != approved["id"]
    assert "secretvalue123" not in json.dumps(recs)  # argument values are never audited


def test_the_stored_arguments_are_redacted(d: Desk) -> None:
    conn = FakeConn()

    async def scenario() -> str:
        held = asyncio.ensure_future(d.hold(conn))
        await until(lambda: bool(conn.frames))
        approval = pending_id(conn)
        stored = d.state.get_approval(approval)
        assert stored is not None
        assert stored.args == {"amount": 5, "note": "token [REDACTED]"}
        assert stored.args_hash == DIGEST  # bound to the real arguments, not the redacted copy
        await d.desk.decide(approval, "rejected")
        with pytest.raises(Denied):
            await held
        return approval

    run(scenario)


def test_reject_denies_the_held_call(d: Desk) -> None:
    conn = FakeConn()

    async def scenario() -> tuple[str, BaseException | None]:
        held = asyncio.ensure_future(d.hold(conn))
        await until(lambda: bool(conn.frames))
        approval = pending_id(conn)
        await d.desk.decide(approval, "rejected", by="operator")
        try:
            await held
        except BaseException as exc:
            return approval, exc
        return approval, None

    approval, exc = run(scenario)
    assert isinstance(exc, Denied) and exc.exit_code == 77
    assert exc.message == f"denied: approval {approval} was rejected by an operator"
    got = d.state.get_approval(approval)
    assert got is not None and got.status == "rejected"
    recs = d.records()
    assert brief(recs) == [("approval", "pending"), ("approval", "rejected")]
    assert recs[1]["by"] == "operator"


def test_an_undecided_approval_expires(d: Desk) -> None:
    conn = FakeConn()
    with pytest.raises(TempFail, match=r"approval [0-9a-f]+ expired without a decision") as caught:
        run(lambda: d.hold(conn, ttl=0.05))
    approval = pending_id(conn)
    assert caught.value.exit_code == 75 and approval in caught.value.message
    assert conn.frames[0]["wait"] <= 0.05
    assert d.state.get_approval(approval) is None  # an expired request is removed: state.db cannot fill with them
    assert d.state.db.execute("SELECT COUNT(*) FROM approvals").fetchone() == (0,)
    assert d.desk._waiters == {}  # nothing left waiting
    assert brief(d.records()) == [("approval", "pending")]
    # the operator is too late
    gone = r"cannot be approved: no such approval \(an expired one is removed\)"
    with pytest.raises(PrivsepError, match=gone) as late:
        run(lambda: d.desk.decide(approval, "approved"))
    assert late.value.exit_code == EX_FAILED == 1
    assert brief(d.records()) == [("approval", "pending")]


def test_a_caller_that_hangs_up_leaves_the_approval_pending_and_can_ask_again(d: Desk) -> None:
    first, second = FakeConn(), FakeConn()

    async def scenario() -> tuple[str, str]:
        held = asyncio.ensure_future(d.hold(first))
        await until(lambda: bool(first.frames))
        first.hang_up()
        with pytest.raises(TempFail, match="still pending; the caller left"):
            await held
        approval = pending_id(first)
        got = d.state.get_approval(approval)
        assert got is not None and got.status == "pending"
        # the same call again waits on the same approval, without a second "pending" record
        again = asyncio.ensure_future(d.hold(second))
        await until(lambda: bool(second.frames))
        assert pending_id(second) == approval
        await d.desk.decide(approval, "approved")
        return approval, await again

    approval, used = run(scenario)
    assert used == approval
    assert brief(d.records()) == [("approval", "pending"), ("approval", "approved")]


def test_other_arguments_need_their_own_approval(d: Desk) -> None:
    one, two = FakeConn(), FakeConn()

    async def scenario() -> None:
        a = asyncio.ensure_future(d.hold(one, args={"amount": 5}))
        b = asyncio.ensure_future(d.hold(two, args={"amount": 500}))
        await until(lambda: bool(one.frames) and bool(two.frames))
        assert pending_id(one) != pending_id(two)
        await d.desk.decide(pending_id(one), "approved")
        assert await a == pending_id(one)
        assert not b.done()  # the other amount still waits
        await d.desk.decide(pending_id(two), "rejected")
        with pytest.raises(Denied):
            await b

    run(scenario)
    assert [r["decision"] for r in d.records()] == ["pending", "pending", "approved", "rejected"]


# --- approvals granted before the call, and used ones ---------------------------------------------------


def test_an_approval_granted_beforehand_is_used_at_once_and_only_once(d: Desk) -> None:
    granted = d.state.create_approval(CALLER, TOOL, DIGEST, {}, ttl=60)
    assert d.state.decide(granted.id, "approved", "root") is not None
    conn = FakeConn()
    assert run(lambda: d.hold(conn)) == granted.id
    assert conn.frames == []  # not held: no pending frame
    got = d.state.get_approval(granted.id)
    assert got is not None and got.status == "used"
    assert d.audit_is_empty()
    # single use: the same call again is held anew
    again = FakeConn()
    with pytest.raises(TempFail, match="expired"):
        run(lambda: d.hold(again, ttl=0.05))
    assert pending_id(again) != granted.id


def test_two_identical_calls_share_one_approval_and_the_second_finds_it_used(d: Desk) -> None:
    one, two = FakeConn(), FakeConn()

    async def scenario() -> list[Any]:
        a = asyncio.ensure_future(d.hold(one))
        await until(lambda: bool(one.frames))
        b = asyncio.ensure_future(d.hold(two))
        await until(lambda: bool(two.frames))
        assert pending_id(one) == pending_id(two)
        await d.desk.decide(pending_id(one), "approved")
        return list(await asyncio.gather(a, b, return_exceptions=True))

    results = run(scenario)
    approval = pending_id(one)
    assert results.count(approval) == 1  # exactly one of them ran
    (used,) = [r for r in results if isinstance(r, BaseException)]
    assert isinstance(used, TempFail) and used.exit_code == 75
    assert used.message == f"approval {approval} was already used; call again to request a new one"
    assert brief(d.records()) == [("approval", "pending"), ("approval", "approved")]


# --- operator decisions that cannot be made ---------------------------------------------------------


def test_deciding_an_unknown_id_fails_with_exit_1_and_writes_nothing(d: Desk) -> None:
    with pytest.raises(PrivsepError) as caught:
        run(lambda: d.desk.decide("deadbeef", "approved"))
    assert caught.value.exit_code == 1
    assert caught.value.message == "approval deadbeef cannot be approved: no such approval (an expired one is removed)"
    assert d.audit_is_empty()


def test_deciding_twice_fails_and_names_the_current_status(d: Desk) -> None:
    made = d.state.create_approval(CALLER, TOOL, DIGEST, {}, ttl=60)
    decided = run(lambda: d.desk.decide(made.id, "rejected"))
    assert decided.status == "rejected"
    for status in ("approved", "rejected"):
        with pytest.raises(PrivsepError) as caught:
            run(lambda status=status: d.desk.decide(made.id, status))  # type: ignore[misc]
        assert caught.value.exit_code == 1
        assert caught.value.message == f"approval {made.id} cannot be {status}: it is rejected"
    assert brief(d.records()) == [("approval", "rejected")]


def test_a_decision_with_nobody_waiting_is_recorded(d: Desk) -> None:
    made = d.state.create_approval(CALLER, TOOL, DIGEST, {}, ttl=60)
    decided = run(lambda: d.desk.decide(made.id, "approved", by="admin"))
    assert (decided.id, decided.status, decided.caller, decided.action) == (made.id, "approved", CALLER, TOOL)
    (rec,) = d.records()
    assert (rec["decision"], rec["approval"], rec["by"], rec["tool"]) == ("approved", made.id, "admin", TOOL)
    # the approval now waits for its call, which uses it at once
    assert run(lambda: d.hold(FakeConn())) == made.id
