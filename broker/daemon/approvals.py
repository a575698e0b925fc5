"""Red-zone calls held for an operator: ``mode = "approve"``.

An approval is bound to the caller, the action and a digest of the exact
arguments; it is single use and expires. While it is pending the caller's
connection gets one interim ``pending`` frame (the id and how long it may
wait) and nothing else about it; the operator decides with ``mcp-brokerctl
approve ID`` / ``reject ID`` over ``admin.sock``. Every step is audited.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from broker.core.errors import EX_FAILED, Denied, PrivsepError, TempFail
from broker.daemon.audit import AuditLog, new_request_id
from broker.daemon.redact import Redactor
from broker.daemon.state import Approval, State


class Waiting(Protocol):
    """The connection of the caller a held call belongs to."""

    async def send(self, obj: dict[str, Any]) -> None: ...

    async def closed(self) -> None: ...


class ApprovalDesk:
    """Holds calls until an operator decides, and takes the operator's decisions."""

    def __init__(self, state: State, audit: AuditLog) -> None:
        self.state = state
        self.audit = audit
        self._waiters: dict[str, asyncio.Future[str]] = {}

    async def hold(
        self,
        caller: str,
        tool: str,
        args: dict[str, Any],
        digest: str,
        conn: Waiting,
        ttl: float,
        redactor: Redactor,
        most: int = 8,
    ) -> str:
        """Wait for an operator's approval of exactly this call; return the approval id it used.

        An approval already granted for the same arguments is used at once
        (single use). Raises Denied when rejected, TempFail when it expires,
        was used meanwhile, or the caller hung up.
        """
        used = self.state.take_approved(caller, tool, digest)
        if used is not None:
            return used.id
        pending = self.state.pending_for(caller, tool, digest)
        if pending is None:
            count, first = self.state.pending_count(caller)
            if count >= most:  # each request is a row the operator must read: bounded per caller
                retry = max(1.0, (first or time.time()) - time.time())
                raise TempFail(
                    f"{count} approval requests of {caller} are pending already (max_pending_approvals); "
                    f"retry when an operator has decided one, or in {retry:.0f} s when the oldest expires"
                )
            pending = self.state.create_approval(caller, tool, digest, redactor.deep(args), ttl)
        if pending.id not in self._waiters:
            await self.audit.record(
                id=new_request_id(),
                caller=caller,
                op="approval",
                tool=tool,
                decision="pending",
                approval=pending.id,
                args_digest=digest,
            )
        waiter = self._waiters.setdefault(pending.id, asyncio.get_running_loop().create_future())
        wait = max(0.0, pending.expires - time.time())
        await conn.send({"pending": pending.id, "wait": wait})
        hangup: asyncio.Future[Any] = asyncio.ensure_future(conn.closed())
        try:
            watched: set[asyncio.Future[Any]] = {waiter, hangup}
            done, _ = await asyncio.wait(watched, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
        if waiter in done:
            decision = waiter.result()
            if decision == "rejected":
                raise Denied(f"denied: approval {pending.id} was rejected by an operator")
            if decision == "approved" and self.state.consume(pending.id):
                return pending.id
            raise TempFail(f"approval {pending.id} was already used; call again to request a new one")
        if hangup in done:
            raise TempFail(f"approval {pending.id} still pending; the caller left")
        self.state.expire_approvals()
        self._waiters.pop(pending.id, None)
        raise TempFail(f"approval {pending.id} expired without a decision")

    async def decide(self, approval_id: str, status: str, by: str = "root") -> Approval:
        """The operator's decision ("approved" or "rejected"); wakes the held call if it still waits."""
        decided = self.state.decide(approval_id, status, by)
        if decided is None:
            current = self.state.get_approval(approval_id)
            why = f"it is {current.status}" if current else "no such approval (an expired one is removed)"
            raise PrivsepError(f"approval {approval_id} cannot be {status}: {why}", EX_FAILED)
        await self.audit.record(
            id=new_request_id(),
            caller=decided.caller,
            op="approval",
            tool=decided.action,
            decision=status,
            approval=approval_id,
            by=by,
        )
        waiter = self._waiters.pop(approval_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(status)
        return decided
