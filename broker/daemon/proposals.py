"""Agents' server proposals on the daemon's side: queued by ``mcp propose``, decided by root, every step audited.

An agent proposes (gate op ``propose``); the daemon checks every field again
(:func:`broker.core.proposal.problem`: it trusts no gate), refuses a fifth
pending proposal of one agent (75, ``limit`` ``proposals``) and a second
pending one of the same server name (65), and keeps the rest in
``state.db``. The agent reads back only its own (gate op ``proposals``);
root lists them all and decides (admin ops ``proposals`` and
``proposal_decide``): ``adopted`` (after ``mcp-brokerctl proposals adopt``
ran ``server add`` and its review, in root's own process) or
``rejected``; ``adopting`` and ``adopt_failed`` are steps of an adoption
recorded on the way, which leave the proposal pending. Nothing here installs
or runs anything: a proposal is data until an operator acts on it.

Audit: the agent's request is one record (``op`` ``propose`` or
``proposals``, written by the daemon's dispatch from the :class:`Reply`),
with the server name, the pinned package and the tools asked for when the
fields are valid, and for any request the fields' keys, size and keyed
digest (``why`` itself is never logged); each operator step is a record
``op`` ``proposal`` with its ``decision``, ``by`` and the proposing agent
as ``caller``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.core import proposal as rules
from broker.core.errors import EX_FAILED, ArgumentsRejected, PrivsepError, TempFail, UsageError
from broker.daemon.audit import AuditLog, new_request_id
from broker.daemon.records import AuditRecord, argument_fields, bounded
from broker.daemon.state import Proposal, State

#: the decided proposals of one agent kept on record, newest first (the audit trail keeps every one)
KEEP_DECIDED = 16
#: what an operator's step does to a proposal: decide it (adopted, rejected), or only record a step of an adoption
DECISIONS = ("adopted", "rejected")
STEPS = ("adopting", "adopt_failed")
FIELDS = ("name", "manager", "package", "version", "tools", "why")


@dataclass
class Reply:
    """What a gate request made of the desk: the audit fields, and the result or the refusal."""

    record: AuditRecord
    result: Any = None
    error: PrivsepError | None = None


def _shown(p: Proposal) -> dict[str, Any]:
    return p.as_dict() | {"spec": rules.spec(p.manager, p.package, p.version)}


class ProposalDesk:
    """The queue of proposals, over the daemon's State and AuditLog."""

    def __init__(self, state: State, audit: AuditLog, digest: Callable[[dict[str, Any]], str]) -> None:
        self.state = state
        self.audit = audit
        self.digest = digest

    # --- the agent's side (gate.sock) ------------------------------------------------------

    def submit(self, caller: str, req: dict[str, Any]) -> Reply:
        """Queue ``caller``'s proposal, or say why not; writes no audit record (the dispatch does)."""
        fields = {k: req[k] for k in FIELDS}
        rec: AuditRecord = argument_fields(fields, self.digest(fields))
        problem = rules.problem(fields)
        if problem is not None:
            return Reply(rec, error=UsageError(f"propose: {problem}"))
        rec |= {
            "server": fields["name"],
            "package": f"{fields['manager']}:{rules.spec(fields['manager'], fields['package'], fields['version'])}",
            "tools": list(fields["tools"]),
        }
        for pending in self.state.pending_proposals(caller):
            if pending.name == fields["name"]:
                rec["proposal"] = pending.id
                why = f"propose: you have proposed a server named {pending.name} already ({pending.id}, pending)"
                return Reply(rec, error=ArgumentsRejected(why))
        made = self.state.create_proposal(caller, fields, rules.MAX_PENDING, KEEP_DECIDED)
        if made is None:
            rec["limit"] = "proposals"
            return Reply(
                rec,
                error=TempFail(
                    f"propose: {caller} has {rules.MAX_PENDING} proposals pending already (the most an agent may "
                    "have); retry when the operator has adopted or rejected one (mcp propose --status)"
                ),
            )
        rec |= {"proposal": made.id, "decision": "queued"}
        pending_now = len(self.state.pending_proposals(caller))
        result = {k: v for k, v in _shown(made).items() if k != "caller"}
        return Reply(rec, result | {"pending": pending_now, "max_pending": rules.MAX_PENDING})

    def own(self, caller: str) -> Reply:
        """``caller``'s own proposals (no one else's), as it may read them back."""
        hidden = ("caller", "decided_by")
        mine = [{k: v for k, v in _shown(p).items() if k not in hidden} for p in self.state.proposals(caller)]
        return Reply({"decision": "allow"}, {"proposals": mine, "max_pending": rules.MAX_PENDING})

    # --- root's side (admin.sock) -----------------------------------------------------------

    def listing(self, status: str | None) -> list[dict[str, Any]]:
        return [_shown(p) for p in self.state.proposals(status=status)]

    async def decide(self, proposal_id: str, decision: str, reason: str | None, by: str = "root") -> dict[str, Any]:
        """An operator's step on a pending proposal: decide it, or record a step of its adoption; audited."""
        if decision not in DECISIONS and decision not in STEPS:
            raise UsageError(f"proposals: no such decision {decision!r} (one of {', '.join(DECISIONS + STEPS)})")
        current = self.state.get_proposal(proposal_id)
        if current is None or current.status != "pending":
            why = f"it is {current.status}" if current is not None else "there is no such proposal"
            raise PrivsepError(f"proposal {proposal_id} cannot be {decision.replace('_', ' ')}: {why}", EX_FAILED)
        note = " ".join((reason or "").split())[:500]
        if decision in DECISIONS:
            decided = self.state.decide_proposal(proposal_id, decision, by, note)
            if decided is None:  # decided meanwhile by another operator's command
                raise PrivsepError(f"proposal {proposal_id} cannot be {decision}: it was decided meanwhile", EX_FAILED)
            current = decided
        record: AuditRecord = {
            "caller": current.caller,
            "op": "proposal",
            "decision": decision,
            "proposal": proposal_id,
            "server": current.name,
            "package": f"{current.manager}:{rules.spec(current.manager, current.package, current.version)}",
            "by": by,
        }
        if note:
            record["reason"] = bounded(note)
        await self.audit.record(id=new_request_id(), **record)
        return _shown(current)


__all__ = ["DECISIONS", "KEEP_DECIDED", "STEPS", "ProposalDesk", "Reply"]
