"""Durable state: sliding-window rates, the denial budget, approvals and pins survive reopening."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.daemon.state import State


@pytest.fixture
def db(tmp_path: Path) -> Iterator[str]:
    yield str(tmp_path / "state.db")


def test_rate_window_and_retry_after(db: str) -> None:
    s = State(db)
    now = 1000.0
    for i in range(3):
        assert s.rate_check("k", 3, 60, now + i) == 0
        s.rate_record("k", 60, now + i)
    retry = s.rate_check("k", 3, 60, now + 10)
    assert retry == pytest.approx(50.0)  # the oldest event leaves the window at now + 60
    assert s.rate_check("k", 3, 60, now + 60.5) == 0
    assert s.rate_check("other", 3, 60, now + 10) == 0
    s.close()
    reopened = State(db)  # a restart keeps the events
    assert reopened.rate_check("k", 3, 60, now + 10) == pytest.approx(50.0)


def test_denial_budget_freezes_after_more_than_budget(db: str) -> None:
    s = State(db)
    now = time.time()
    assert [s.record_denial("bot", 2, 60, 300, now + i) for i in range(3)] == [False, False, True]
    until = s.frozen_until("bot", now + 3)
    assert until == pytest.approx(now + 2 + 300)
    assert s.frozen_until("other", now) is None
    assert State(db).frozen_until("bot", now + 3) is not None  # survives a restart
    assert s.unfreeze("bot") and s.frozen_until("bot") is None and not s.unfreeze("bot")


def test_old_denials_leave_the_window(db: str) -> None:
    s = State(db)
    assert not s.record_denial("bot", 1, 10, 300, 0.0)
    assert not s.record_denial("bot", 1, 10, 300, 20.0)  # the first one is out of the window
    assert s.record_denial("bot", 1, 10, 300, 21.0)


def test_approval_lifecycle_is_single_use_and_bound(db: str) -> None:
    s = State(db)
    a = s.create_approval("bot", "pay.send", "h1", {"amount": 5}, ttl=60)
    assert s.take_approved("bot", "pay.send", "h1") is None  # pending is not approved
    assert s.pending_for("bot", "pay.send", "h1") is not None
    assert s.decide(a.id, "approved", "root") is not None
    assert s.decide(a.id, "rejected", "root") is None  # decided once
    assert s.take_approved("bot", "pay.send", "h2") is None  # other arguments
    assert s.take_approved("other", "pay.send", "h1") is None  # other caller
    used = s.take_approved("bot", "pay.send", "h1")
    assert used is not None and used.id == a.id
    assert s.take_approved("bot", "pay.send", "h1") is None  # single use
    assert s.get_approval(a.id) is not None and s.get_approval(a.id).status == "used"  # type: ignore[union-attr]


def test_approvals_expire(db: str) -> None:
    s = State(db)
    a = s.create_approval("bot", "pay.send", "h", {}, ttl=0.01)
    time.sleep(0.05)
    assert s.decide(a.id, "approved", "root") is None
    assert s.get_approval(a.id) is None  # removed once expired
    assert s.db.execute("SELECT COUNT(*) FROM approvals").fetchone() == (0,)


def test_pins(db: str) -> None:
    s = State(db)
    assert s.pin("a.b") is None
    s.set_pin("a.b", "h1", "{}")
    assert State(db).pin("a.b") == ("h1", "{}")


def test_a_rate_slot_taken_at_admission_counts_at_once_and_can_be_given_back(db: str) -> None:
    s = State(db)
    slot = s.rate_take("k", 3600)
    assert s.rate_check("k", 1, 3600) > 0  # a second call is refused while the first waits (say, for approval)
    s.rate_release(slot)  # the first was rejected: its slot comes back
    assert s.rate_check("k", 1, 3600) == 0


def test_pending_approvals_are_counted_per_caller(db: str) -> None:
    s = State(db)
    for n in range(3):
        s.create_approval("bot", "pay.send", f"h{n}", {}, ttl=60)
    s.create_approval("other", "pay.send", "h", {}, ttl=60)
    count, first = s.pending_count("bot")
    assert count == 3 and first is not None and first > time.time()
    assert s.pending_count("nobody") == (0, None)
