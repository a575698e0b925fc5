"""Durable broker state in ``/var/lib/mcp-privsep/state.db`` (SQLite).

Rate-limit events, denials and freezes, approvals, tool pins and agents'
server proposals live here so a daemon restart resets none of them. The file is private to mcp-broker:
nothing the agent can read or write influences it except through requests
the daemon itself decides on.
"""

from __future__ import annotations

import json
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS rate_events (key TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS rate_events_key ON rate_events (key, ts);
CREATE TABLE IF NOT EXISTS denials (caller TEXT NOT NULL, ts REAL NOT NULL);
CREATE INDEX IF NOT EXISTS denials_caller ON denials (caller, ts);
CREATE TABLE IF NOT EXISTS freezes (caller TEXT PRIMARY KEY, until REAL NOT NULL, reason TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS approvals (
    id TEXT PRIMARY KEY, caller TEXT NOT NULL, action TEXT NOT NULL, args_hash TEXT NOT NULL,
    args_json TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL, expires REAL NOT NULL,
    decided_by TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS pins (
    action TEXT PRIMARY KEY, hash TEXT NOT NULL, definition TEXT NOT NULL, pinned REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS first_use (action TEXT PRIMARY KEY, since REAL NOT NULL);
CREATE TABLE IF NOT EXISTS proposals (
    id TEXT PRIMARY KEY, caller TEXT NOT NULL, name TEXT NOT NULL, manager TEXT NOT NULL,
    package TEXT NOT NULL, version TEXT NOT NULL, tools_json TEXT NOT NULL, why TEXT NOT NULL,
    status TEXT NOT NULL, created REAL NOT NULL, decided REAL, decided_by TEXT NOT NULL DEFAULT '',
    note TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS proposals_caller ON proposals (caller, status);
"""
#: the state's schema version: 2 added ``meta`` and ``first_use`` (reviewed pins; see broker.daemon.pins)
SCHEMA_VERSION = 2


@dataclass
class Approval:
    """One approval request, bound to the exact arguments by their hash."""

    id: str
    caller: str
    action: str
    args_hash: str
    args: Any
    status: str  # pending, approved, rejected, used, expired
    created: float
    expires: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "caller": self.caller,
            "action": self.action,
            "args_hash": self.args_hash,
            "args": self.args,
            "status": self.status,
            "created": self.created,
            "expires": self.expires,
        }


@dataclass
class Proposal:
    """A server an agent asked the operator for (``mcp propose``): pending, adopted or rejected."""

    id: str
    caller: str
    name: str
    manager: str  # pip, npm
    package: str
    version: str
    tools: list[str]
    why: str
    status: str  # pending, adopted, rejected
    created: float
    decided: float | None = None
    decided_by: str = ""
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "caller": self.caller,
            "name": self.name,
            "manager": self.manager,
            "package": self.package,
            "version": self.version,
            "tools": list(self.tools),
            "why": self.why,
            "status": self.status,
            "created": self.created,
            "decided": self.decided,
            "decided_by": self.decided_by,
            "note": self.note,
        }


class State:
    """The broker's durable state; one connection, used from the event loop."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        tables = {name for (name,) in self.db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        self.db.executescript(SCHEMA)
        #: made by the first release (it has pins but no meta): what was allowlisted then was trusted on first use
        self.upgraded = "pins" in tables and "meta" not in tables
        self.db.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
        self._first_use: set[str] | None = None
        # read on every call; only this connection writes these tables, so memory can answer
        self._pins: dict[str, tuple[str, str] | None] = {}
        self._frozen: dict[str, float | None] = {}

    def close(self) -> None:
        self.db.close()

    # --- rate limits ----------------------------------------------------------

    def rate_check(self, key: str, limit: int, window: float, now: float | None = None) -> float:
        """Seconds until a call is allowed again (0: allowed now)."""
        now = time.time() if now is None else now
        rows = self.db.execute(
            "SELECT ts FROM rate_events WHERE key = ? AND ts > ? ORDER BY ts", (key, now - window)
        ).fetchall()
        if len(rows) < limit:
            return 0.0
        oldest_that_matters = rows[len(rows) - limit][0]
        return max(0.001, float(oldest_that_matters) + window - now)

    def rate_take(self, key: str, window: float, now: float | None = None) -> int:
        """Take a slot (the check that admitted the call came just before); return it, to give back if unused."""
        now = time.time() if now is None else now
        with self.db:
            cur = self.db.execute("INSERT INTO rate_events (key, ts) VALUES (?, ?)", (key, now))
            self.db.execute("DELETE FROM rate_events WHERE key = ? AND ts <= ?", (key, now - window))
        assert cur.lastrowid is not None
        return cur.lastrowid

    def rate_release(self, slot: int) -> None:
        """Give back a slot of a call that never reached its server (refused, rejected, expired)."""
        with self.db:
            self.db.execute("DELETE FROM rate_events WHERE rowid = ?", (slot,))

    def rate_record(self, key: str, window: float, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self.db:
            self.db.execute("INSERT INTO rate_events (key, ts) VALUES (?, ?)", (key, now))
            self.db.execute("DELETE FROM rate_events WHERE key = ? AND ts <= ?", (key, now - window))

    # --- denial budget and freezes --------------------------------------------

    def frozen_until(self, caller: str, now: float | None = None) -> float | None:
        now = time.time() if now is None else now
        if caller in self._frozen:
            until = self._frozen[caller]
        else:
            row = self.db.execute("SELECT until FROM freezes WHERE caller = ?", (caller,)).fetchone()
            until = None if row is None else float(row[0])
            self._frozen[caller] = until
        if until is None:
            return None
        if until <= now:
            self.db.execute("DELETE FROM freezes WHERE caller = ?", (caller,))
            self._frozen[caller] = None
            return None
        return until

    def record_denial(self, caller: str, budget: int, window: float, freeze: float, now: float | None = None) -> bool:
        """Count a denial; return True when this one froze the caller."""
        now = time.time() if now is None else now
        self._frozen.pop(caller, None)
        with self.db:
            self.db.execute("INSERT INTO denials (caller, ts) VALUES (?, ?)", (caller, now))
            self.db.execute("DELETE FROM denials WHERE caller = ? AND ts <= ?", (caller, now - window))
            (count,) = self.db.execute("SELECT COUNT(*) FROM denials WHERE caller = ?", (caller,)).fetchone()
            if count > budget:
                self.db.execute(
                    "INSERT OR REPLACE INTO freezes (caller, until, reason) VALUES (?, ?, ?)",
                    (caller, now + freeze, f"{count} denials within {window:g} s"),
                )
                self.db.execute("DELETE FROM denials WHERE caller = ?", (caller,))
                return True
        return False

    def freeze(self, caller: str, until: float, reason: str) -> None:
        """Freeze ``caller`` until ``until`` (a decision of the daemon's, not of the denial budget)."""
        self._frozen.pop(caller, None)
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO freezes (caller, until, reason) VALUES (?, ?, ?)", (caller, until, reason)
            )

    def unfreeze(self, caller: str) -> bool:
        self._frozen.pop(caller, None)
        with self.db:
            cur = self.db.execute("DELETE FROM freezes WHERE caller = ?", (caller,))
            self.db.execute("DELETE FROM denials WHERE caller = ?", (caller,))
        return cur.rowcount > 0

    def freezes(self) -> list[dict[str, Any]]:
        now = time.time()
        rows = self.db.execute("SELECT caller, until, reason FROM freezes WHERE until > ?", (now,)).fetchall()
        return [{"caller": c, "until": u, "reason": r} for c, u, r in rows]

    # --- approvals ------------------------------------------------------------

    def _approval(self, row: tuple[Any, ...]) -> Approval:
        return Approval(
            id=row[0],
            caller=row[1],
            action=row[2],
            args_hash=row[3],
            args=json.loads(row[4]),
            status=row[5],
            created=row[6],
            expires=row[7],
        )

    _COLS = "id, caller, action, args_hash, args_json, status, created, expires"

    def expire_approvals(self, now: float | None = None) -> None:
        """Remove every approval past its expiry, whatever its state (the audit trail keeps their story)."""
        now = time.time() if now is None else now
        self.db.execute("DELETE FROM approvals WHERE expires <= ?", (now,))

    def pending_count(self, caller: str) -> tuple[int, float | None]:
        """How many approvals of ``caller`` are pending, and when the first of them expires."""
        self.expire_approvals()
        count, first = self.db.execute(
            "SELECT COUNT(*), MIN(expires) FROM approvals WHERE caller = ? AND status = 'pending'", (caller,)
        ).fetchone()
        return int(count), (float(first) if first is not None else None)

    def take_approved(self, caller: str, action: str, args_hash: str) -> Approval | None:
        """Consume (single use) an approved, unexpired approval for exactly these arguments."""
        self.expire_approvals()
        with self.db:
            row = self.db.execute(
                f"SELECT {self._COLS} FROM approvals WHERE caller = ? AND action = ? AND args_hash = ? "  # noqa: S608
                "AND status = 'approved' ORDER BY created LIMIT 1",
                (caller, action, args_hash),
            ).fetchone()
            if row is None:
                return None
            self.db.execute("UPDATE approvals SET status = 'used' WHERE id = ? AND status = 'approved'", (row[0],))
        return self._approval(row)

    def pending_for(self, caller: str, action: str, args_hash: str) -> Approval | None:
        self.expire_approvals()
        row = self.db.execute(
            f"SELECT {self._COLS} FROM approvals WHERE caller = ? AND action = ? AND args_hash = ? "  # noqa: S608
            "AND status = 'pending' ORDER BY created LIMIT 1",
            (caller, action, args_hash),
        ).fetchone()
        return None if row is None else self._approval(row)

    def create_approval(self, caller: str, action: str, args_hash: str, args: Any, ttl: float) -> Approval:
        now = time.time()
        approval = Approval(secrets.token_hex(4), caller, action, args_hash, args, "pending", now, now + ttl)
        with self.db:
            self.db.execute(
                f"INSERT INTO approvals ({self._COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (approval.id, caller, action, args_hash, json.dumps(args), "pending", now, now + ttl),
            )
        return approval

    def get_approval(self, approval_id: str) -> Approval | None:
        self.expire_approvals()
        row = self.db.execute(f"SELECT {self._COLS} FROM approvals WHERE id = ?", (approval_id,)).fetchone()  # noqa: S608
        return None if row is None else self._approval(row)

    def decide(self, approval_id: str, status: str, by: str) -> Approval | None:
        """Move a pending approval to approved or rejected; None if not pending."""
        self.expire_approvals()
        with self.db:
            cur = self.db.execute(
                "UPDATE approvals SET status = ?, decided_by = ? WHERE id = ? AND status = 'pending'",
                (status, by, approval_id),
            )
        return self.get_approval(approval_id) if cur.rowcount else None

    def consume(self, approval_id: str) -> bool:
        with self.db:
            cur = self.db.execute(
                "UPDATE approvals SET status = 'used' WHERE id = ? AND status = 'approved'", (approval_id,)
            )
        return cur.rowcount == 1

    def approvals(self, status: str | None = "pending") -> list[Approval]:
        self.expire_approvals()
        if status is None:
            rows = self.db.execute(f"SELECT {self._COLS} FROM approvals ORDER BY created").fetchall()  # noqa: S608
        else:
            rows = self.db.execute(
                f"SELECT {self._COLS} FROM approvals WHERE status = ? ORDER BY created",  # noqa: S608
                (status,),
            ).fetchall()
        return [self._approval(r) for r in rows]

    # --- pins -----------------------------------------------------------------

    def pin(self, action: str) -> tuple[str, str] | None:
        if action in self._pins:
            return self._pins[action]
        row = self.db.execute("SELECT hash, definition FROM pins WHERE action = ?", (action,)).fetchone()
        found = None if row is None else (str(row[0]), str(row[1]))
        self._pins[action] = found
        return found

    def set_pin(self, action: str, digest: str, definition: str) -> None:
        self._pins.pop(action, None)
        with self.db:
            self.db.execute(
                "INSERT OR REPLACE INTO pins (action, hash, definition, pinned) VALUES (?, ?, ?, ?)",
                (action, digest, definition, time.time()),
            )

    def grandfather(self, actions: set[str]) -> None:
        """Keep first-use trust for these actions (allowlisted when the first release's state was upgraded)."""
        now = time.time()
        with self.db:
            rows = [(a, now) for a in actions]
            self.db.executemany("INSERT OR IGNORE INTO first_use (action, since) VALUES (?, ?)", rows)
        self._first_use = None

    def grandfathered(self, action: str) -> bool:
        if self._first_use is None:
            self._first_use = {a for (a,) in self.db.execute("SELECT action FROM first_use")}
        return action in self._first_use

    def pins(self) -> dict[str, tuple[str, str]]:
        return {a: (h, d) for a, h, d in self.db.execute("SELECT action, hash, definition FROM pins").fetchall()}

    # --- proposals (mcp propose) ------------------------------------------------

    _PROPOSAL_COLS = (
        "id, caller, name, manager, package, version, tools_json, why, status, created, decided, decided_by, note"
    )

    def _proposal(self, row: tuple[Any, ...]) -> Proposal:
        return Proposal(
            id=row[0],
            caller=row[1],
            name=row[2],
            manager=row[3],
            package=row[4],
            version=row[5],
            tools=json.loads(row[6]),
            why=row[7],
            status=row[8],
            created=row[9],
            decided=row[10],
            decided_by=row[11],
            note=row[12],
        )

    def pending_proposals(self, caller: str) -> list[Proposal]:
        rows = self.db.execute(
            f"SELECT {self._PROPOSAL_COLS} FROM proposals WHERE caller = ? AND status = 'pending' "  # noqa: S608
            "ORDER BY created",
            (caller,),
        ).fetchall()
        return [self._proposal(r) for r in rows]

    def create_proposal(self, caller: str, fields: dict[str, Any], most: int, keep: int) -> Proposal | None:
        """Queue a proposal of ``caller``; None (nothing written) when it has ``most`` pending already.

        Of its decided proposals, the newest ``keep`` stay on record (the audit trail keeps the rest).
        """
        now = time.time()
        proposal = Proposal(
            secrets.token_hex(4),
            caller,
            fields["name"],
            fields["manager"],
            fields["package"],
            fields["version"],
            list(fields["tools"]),
            fields["why"],
            "pending",
            now,
        )
        with self.db:
            (count,) = self.db.execute(
                "SELECT COUNT(*) FROM proposals WHERE caller = ? AND status = 'pending'", (caller,)
            ).fetchone()
            if count >= most:
                return None
            self.db.execute(
                f"INSERT INTO proposals ({self._PROPOSAL_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                (
                    proposal.id,
                    caller,
                    proposal.name,
                    proposal.manager,
                    proposal.package,
                    proposal.version,
                    json.dumps(proposal.tools),
                    proposal.why,
                    "pending",
                    now,
                    None,
                    "",
                    "",
                ),
            )
            self.db.execute(
                "DELETE FROM proposals WHERE caller = ? AND status != 'pending' AND id NOT IN "
                "(SELECT id FROM proposals WHERE caller = ? AND status != 'pending' ORDER BY decided DESC LIMIT ?)",
                (caller, caller, keep),
            )
        return proposal

    def proposals(self, caller: str | None = None, status: str | None = None) -> list[Proposal]:
        """Proposals, oldest first: of one caller and/or of one status, or all."""
        where, params = [], []
        if caller is not None:
            where.append("caller = ?")
            params.append(caller)
        if status is not None:
            where.append("status = ?")
            params.append(status)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self.db.execute(
            f"SELECT {self._PROPOSAL_COLS} FROM proposals{clause} ORDER BY created, id",  # noqa: S608
            params,
        ).fetchall()
        return [self._proposal(r) for r in rows]

    def get_proposal(self, proposal_id: str) -> Proposal | None:
        row = self.db.execute(
            f"SELECT {self._PROPOSAL_COLS} FROM proposals WHERE id = ?",  # noqa: S608
            (proposal_id,),
        ).fetchone()
        return None if row is None else self._proposal(row)

    def decide_proposal(self, proposal_id: str, status: str, by: str, note: str = "") -> Proposal | None:
        """Move a pending proposal to ``status`` (adopted, rejected); None if it is not pending."""
        with self.db:
            cur = self.db.execute(
                "UPDATE proposals SET status = ?, decided = ?, decided_by = ?, note = ? "
                "WHERE id = ? AND status = 'pending'",
                (status, time.time(), by, note, proposal_id),
            )
        return self.get_proposal(proposal_id) if cur.rowcount else None
