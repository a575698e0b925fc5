"""Per-caller quotas: how much of the daemon one agent may hold at once, so it cannot hurt another.

What a caller holds is counted here, live, in memory (the daemon is one
process and one event loop, so a check and the count it guards never
interleave): gate processes connected (an ``mcp stdio`` session or an
``mcp call``), connections, calls in flight (a call counts until its answer
has left the daemon, so unread answers are bounded too), and audit bytes
spent in the last window (a leaky bucket). Pending approvals are counted
by :mod:`broker.daemon.approvals` from ``state.db``.

A refusal is a :class:`broker.core.errors.TempFail` (75) that says when to
retry. Refusals are audited through :class:`Refusals`: the first of a kind
at once, and the rest of a burst as one record with a count, so a flood of
refused requests cannot become a flood of audit records.

This module decides nothing else and holds no sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

from broker.core.errors import TempFail

#: what a quota limits, as named in config, refusals and audit records
Kind = str  # "sessions" | "connections" | "calls" | "approvals" | "audit"

#: how long refusals of one kind for one caller are summed into one record
SUMMARY_SECONDS = 10.0
#: request frames up to this size are read at once ...
SMALL_FRAME = 64 * 1024
#: ... larger ones of one caller wait while it has this much being read already (back-pressure on its gates)
READ_BUDGET = 8 * 1024 * 1024


@dataclass(frozen=True)
class Quota:
    """One caller's limits (the ``[broker]`` defaults, overridden by ``[limits.CALLER]``)."""

    sessions: int
    connections: int
    calls: int
    approvals: int
    audit_bytes: int
    audit_window: float

    @classmethod
    def of(cls, settings: Any, override: Any | None = None) -> Quota:
        """The quota from ``[broker]`` settings and a caller's ``[limits.NAME]`` table (either may be None)."""

        def pick(key: str) -> Any:
            value = getattr(override, key, None) if override is not None else None
            return value if value is not None else getattr(settings, key)

        return cls(
            sessions=pick("max_sessions"),
            connections=pick("max_connections"),
            calls=pick("max_calls_in_flight"),
            approvals=pick("max_pending_approvals"),
            audit_bytes=pick("audit_bytes_per_window"),
            audit_window=pick("audit_window"),
        )


class _Bucket:
    """Audit bytes of one caller: a leaky bucket holding at most a window's budget."""

    __slots__ = ("level", "stamp")

    def __init__(self) -> None:
        self.level = 0.0
        self.stamp = time.monotonic()

    def drain(self, quota: Quota, now: float) -> None:
        rate = quota.audit_bytes / quota.audit_window
        self.level = max(0.0, self.level - (now - self.stamp) * rate)
        self.stamp = now


class Holdings:
    """What every caller holds now; each ``take_*`` refuses with a TempFail or counts, never both."""

    def __init__(self) -> None:
        self.pids: dict[str, Counter[int]] = {}
        self.connections: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.reading: Counter[str] = Counter()
        self._read_freed: dict[str, asyncio.Event] = {}
        self._audit: dict[str, _Bucket] = {}

    # --- connections and the gate processes behind them --------------------------------

    def take_connection(self, caller: str, pid: int, quota: Quota) -> None:
        """Count one more connection of ``caller`` from gate process ``pid``, or refuse it."""
        pids = self.pids.setdefault(caller, Counter())
        if self.connections[caller] >= quota.connections:
            raise TempFail(
                f"too many connections to the broker ({quota.connections}, max_connections) from {caller}'s "
                "gates; retry when one of its calls or sessions ends"
            )
        if pid not in pids and len(pids) >= quota.sessions:
            raise TempFail(
                f"too many mcp sessions and calls of {caller} open at once ({quota.sessions}, max_sessions); "
                "retry when one ends"
            )
        pids[pid] += 1
        self.connections[caller] += 1

    def drop_connection(self, caller: str, pid: int) -> None:
        pids = self.pids.get(caller)
        if pids is not None and pids[pid] > 0:
            pids[pid] -= 1
            if not pids[pid]:
                del pids[pid]
            if not pids:
                del self.pids[caller]
        if self.connections[caller] > 0:
            self.connections[caller] -= 1
            if not self.connections[caller]:
                del self.connections[caller]

    # --- request bytes being read -------------------------------------------------------

    async def take_reading(self, caller: str, size: int) -> int:
        """Room to read a request frame of ``size`` bytes: a large one waits while ``caller`` has
        :data:`READ_BUDGET` being read (its gates block in their writes); returns what to give back."""
        if size <= SMALL_FRAME:
            return 0
        while self.reading[caller] and self.reading[caller] + size > READ_BUDGET:
            await self._read_freed.setdefault(caller, asyncio.Event()).wait()
        self.reading[caller] += size
        return size

    def drop_reading(self, caller: str, size: int) -> None:
        if not size:
            return
        self.reading[caller] -= size
        if self.reading[caller] <= 0:
            del self.reading[caller]
        freed = self._read_freed.pop(caller, None)
        if freed is not None:
            freed.set()

    # --- calls in flight ----------------------------------------------------------------

    def take_call(self, caller: str, quota: Quota) -> None:
        if self.calls[caller] >= quota.calls:
            raise TempFail(
                f"{quota.calls} calls of {caller} are in flight already (max_calls_in_flight); "
                "retry when one has answered"
            )
        self.calls[caller] += 1

    def drop_call(self, caller: str) -> None:
        if self.calls[caller] > 0:
            self.calls[caller] -= 1
            if not self.calls[caller]:
                del self.calls[caller]

    # --- audit volume -------------------------------------------------------------------

    def spend_audit(self, caller: str, size: int, quota: Quota) -> None:
        """Count ``size`` audit bytes written for ``caller`` (always: a record is never refused afterwards)."""
        now = time.monotonic()
        bucket = self._audit.get(caller)
        if bucket is None:
            bucket = self._audit[caller] = _Bucket()
        bucket.drain(quota, now)
        bucket.level += size

    def check_audit(self, caller: str, quota: Quota) -> None:
        """Refuse a request of a caller whose audit budget of this window is spent (TempFail, with when)."""
        bucket = self._audit.get(caller)
        if bucket is None or quota.audit_bytes <= 0:
            return
        now = time.monotonic()
        bucket.drain(quota, now)
        if bucket.level < quota.audit_bytes:
            if bucket.level == 0:
                del self._audit[caller]
            return
        rate = quota.audit_bytes / quota.audit_window
        retry = (bucket.level - quota.audit_bytes * 0.9) / rate  # a tenth of the budget back, at least
        raise TempFail(
            f"{caller} wrote more than {quota.audit_bytes} audit bytes within {quota.audit_window:g} s "
            f"(audit_bytes_per_window); throttled, retry in {max(1.0, retry):.0f} s"
        )

    def snapshot(self) -> dict[str, dict[str, int]]:
        """For ``status``: what each caller holds now."""
        callers = set(self.pids) | set(self.connections) | set(self.calls)
        return {
            c: {"sessions": len(self.pids.get(c, ())), "connections": self.connections[c], "calls": self.calls[c]}
            for c in sorted(callers)
        }


@dataclass
class _Burst:
    first: float
    count: int = 0
    last_reason: str = ""


class Refusals:
    """Quota refusals for the audit trail: the first of a burst now, the rest summed into one record."""

    def __init__(self) -> None:
        self._bursts: dict[tuple[str, Kind], _Burst] = {}

    def note(self, caller: str, kind: Kind, reason: str, now: float | None = None) -> bool:
        """Count a refusal; True when it opens a burst (write its record now), False when it is summed."""
        now = time.monotonic() if now is None else now
        burst = self._bursts.get((caller, kind))
        if burst is None or now - burst.first >= SUMMARY_SECONDS:
            self._bursts[(caller, kind)] = _Burst(now)
            return True
        burst.count += 1
        burst.last_reason = reason
        return False

    def due(self, now: float | None = None, everything: bool = False) -> list[tuple[str, Kind, int, str]]:
        """Bursts whose summing time is over (or all, at shutdown), with the refusals they summed; forgotten."""
        now = time.monotonic() if now is None else now
        out = []
        for key, burst in list(self._bursts.items()):
            if everything or now - burst.first >= SUMMARY_SECONDS:
                del self._bursts[key]
                if burst.count:
                    out.append((key[0], key[1], burst.count, burst.last_reason))
        return out


__all__ = ["Holdings", "Quota", "Refusals"]
