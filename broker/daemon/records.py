"""The audit record: its fields, named once, and the bounds every field keeps.

One record is written per decision and outcome (see :mod:`broker.daemon.audit`).
The daemon builds a record in one place per request (the dispatch in
:mod:`broker.daemon.service`) from what the decision and the call returned;
nothing else mutates it. Every field is bounded whatever a caller sends or a
server answers, so one record always fits the audit log's reservation.
"""

from __future__ import annotations

from typing import Any, TypedDict

from broker.core import wire

#: the audit log's reservation covers records this size (audit.RESERVE_LOW is several of them)
MAX_AUDIT_TEXT = 4096
MAX_AUDIT_KEYS = 64


class AuditRecord(TypedDict, total=False):
    """One line of ``audit.jsonl`` (``ts``, ``seq``, ``prev`` and ``hash`` are added by the log)."""

    id: str
    caller: str
    uid: int
    op: str
    verb: str
    tool: str
    source: str
    decision: str
    rule: str
    mode: str
    exit: int
    reason: str
    outcome: str
    duration_ms: float
    arg_keys: list[str]
    arg_keys_total: int
    args_size: int
    args_digest: str
    args: Any
    result_size: int
    approval: str
    by: str
    pin_hash: str
    #: "intent" (before the server is called) or "outcome" (after); absent on a request that called no server
    phase: str
    #: what a server sent that no side can encode, and how much of it was replaced
    sanitized: dict[str, int]
    #: the quota that refused it (broker.daemon.limits): sessions, connections, calls, approvals, audit, unread
    limit: str
    #: how many requests a quota refusal record stands for (a burst is summed into one record)
    refused: int
    #: the names of the known secrets redacted from what this request's answer held (the agent saw a bare marker)
    redacted: list[str]
    #: the name of the known secret an argument held (the caller was frozen for it)
    secret: str
    #: an agent's server proposal (mcp propose): its id, the server name, the pinned package and the tools asked for
    proposal: str
    server: str
    package: str
    tools: list[str]


def bounded(text: str) -> str:
    """A reason for the audit record: a server's error text can be any size, a record may not."""
    if len(text) <= MAX_AUDIT_TEXT:
        return text
    return text[:MAX_AUDIT_TEXT] + f" [... {len(text) - MAX_AUDIT_TEXT} more characters]"


def argument_fields(args: dict[str, Any], digest: str) -> AuditRecord:
    """``arg_keys`` (bounded; ``arg_keys_total`` says what was cut), ``args_size`` and ``args_digest``."""
    keys = sorted(args)
    out: AuditRecord = {"args_size": len(wire.dumps(args)), "args_digest": digest}
    if len(keys) <= MAX_AUDIT_KEYS and sum(len(k) for k in keys) <= MAX_AUDIT_TEXT:
        out["arg_keys"] = keys
    else:
        out["arg_keys"] = [k[:64] for k in keys[:MAX_AUDIT_KEYS]]
        out["arg_keys_total"] = len(keys)
    return out
