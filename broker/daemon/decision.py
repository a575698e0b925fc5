"""The decision for one request: one function, its steps in a fixed order (doas's ``permit()``).

:func:`decide` runs ``freeze``, ``allowlist``, ``offered``, ``pin``,
``secret``, ``arguments``, ``rate`` and ``mode`` (a listing stops after the allowlist, a
``describe`` after the pin) and returns a :class:`Verdict`: every step taken
with its reason, the refusal if there is one, and what an admitted call
needs next (its typed arguments and effective rules). ``list``, ``describe``,
``call`` (so every ``mcp stdio`` call too) and ``mcp-brokerctl explain`` go
through it; nothing else decides.

It reads the world only through the :class:`View` it is given and holds no
state: the daemon's view is live, a test's is a table. It waits for nothing
and calls nothing: a server that is still starting yields a refusal the
caller may wait out and decide again (:attr:`Verdict.waitable`). It makes
no pin and freezes no one: an unreviewed tool under ``pin = "first-use"``
passes with :attr:`Verdict.pin_state` saying so, and an argument holding a
known secret is refused with :attr:`Verdict.secret` naming it, for the
daemon to act on (``explain`` shows the same verdict and does neither).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import mcp

from broker.core.allowlist import Allowlist
from broker.core.errors import ArgumentsRejected, ConfigError, Denied, PrivsepError, TempFail, Unavailable
from broker.core.names import Action
from broker.daemon.coerce import build_arguments
from broker.daemon.pins import PinState
from broker.daemon.policy import Effective
from broker.daemon.records import AuditRecord, argument_fields

#: what the View says of a tool's pin: PinState, or "first-use" (unreviewed, and its first call will pin it)
PinView = PinState | Literal["first-use"]

Purpose = Literal["list", "describe", "call"]
StepName = Literal["freeze", "allowlist", "offered", "pin", "arguments", "secret", "rate", "mode"]
#: a freeze this long (after a secret guess) lasts until an operator lifts it
OPERATOR_FREEZE = 100 * 365 * 86400.0
#: what an admitted call's mode step says, by mode
MODE_VERDICTS = {"allow": "allow", "notify": "allow, operator notified", "approve": "held for approval"}
#: how a refused step reads, by exit code
_REFUSED = {77: "deny", 78: "config error", 69: "unavailable", 65: "rejected", 75: "try later", 64: "usage"}


@dataclass(frozen=True)
class Query:
    """What is asked: by whom, of which action, for what, with which arguments."""

    caller: str
    purpose: Purpose
    action: Action | None = None
    kv: list[list[str]] = field(default_factory=list)
    args: dict[str, Any] | None = None
    #: decided again after a wait: its rate slot was taken when it was first admitted
    slot_taken: bool = False


@dataclass(frozen=True)
class Offer:
    """What the server behind an action offers right now."""

    state: Literal["unconfigured", "starting", "up", "down"]
    spec: mcp.types.Tool | None = None
    reason: str = ""
    #: a (re)start is under way: the caller may wait for it and decide again
    waitable: bool = False


class View(Protocol):
    """The state a decision reads."""

    def frozen_until(self, caller: str) -> float | None: ...

    def allowlist(self, caller: str) -> Allowlist:
        """The caller's allowlist; ConfigError when it is broken (every call is denied)."""
        ...

    def offer(self, action: Action, caller: str) -> Offer:
        """What the server behind ``action`` offers ``caller`` now (its own instance, if it has one)."""
        ...

    def pin(self, action: str, spec: mcp.types.Tool) -> PinView: ...

    def secret_in(self, args: dict[str, Any]) -> str | None:
        """The name of a known secret whose value the arguments hold (in any encoding redaction knows), or None."""
        ...

    def rules(self, action: str, caller: str) -> Effective: ...

    def rate_retry(self, rules: Effective) -> float:
        """Seconds until the rate limit of ``rules`` admits another call (0: now)."""
        ...

    def digest(self, args: dict[str, Any]) -> str:
        """The keyed digest of the arguments (approvals are bound to it; the audit shows it)."""
        ...


@dataclass(frozen=True)
class Step:
    check: StepName
    verdict: str  # "pass", a mode's verdict, or how it refused: "deny (77)"
    why: str


@dataclass
class Verdict:
    """The outcome of :func:`decide`."""

    query: Query
    steps: list[Step] = field(default_factory=list)
    refusal: PrivsepError | None = None
    allowlist: Allowlist | None = None
    offer: Offer | None = None
    rules: Effective | None = None
    args: dict[str, Any] | None = None
    digest: str | None = None
    #: what the pin step found (None: not reached)
    pin_state: PinView | None = None
    #: the known secret an argument held (the caller is to be frozen; only the operator learns which)
    secret: str | None = None

    @property
    def admitted(self) -> bool:
        return self.refusal is None

    @property
    def failed_at(self) -> StepName | None:
        return None if self.refusal is None else self.steps[-1].check

    @property
    def frozen(self) -> bool:
        """Refused because the caller is frozen (such a refusal does not feed the denial budget again)."""
        return self.failed_at == "freeze"

    @property
    def waitable(self) -> bool:
        """Refused only because the server is (re)starting: wait for it, then decide again."""
        return self.failed_at == "offered" and self.offer is not None and self.offer.waitable

    @property
    def spec(self) -> mcp.types.Tool | None:
        return self.offer.spec if self.offer is not None else None

    @property
    def verdict(self) -> str:
        return self.steps[-1].verdict if self.steps else "pass"

    def record(self) -> AuditRecord:
        """The audit fields this decision settles: the rule that decided, the mode, the arguments' shape."""
        out: AuditRecord = {}
        if self.frozen:
            out["rule"] = "denial_budget"
        elif self.rules is not None:
            out["rule"] = self.rules.source
        elif self.allowlist is not None:
            out["rule"] = self.allowlist.path
        if self.rules is not None:
            out["mode"] = self.rules.mode
        if self.args is not None and self.digest is not None:
            out.update(argument_fields(self.args, self.digest))
        return out

    # --- building -----------------------------------------------------------------------

    def passed(self, check: StepName, why: str, verdict: str = "pass") -> None:
        self.steps.append(Step(check, verdict, why))

    def refuse(self, check: StepName, exc: PrivsepError, why: str | None = None) -> Verdict:
        self.steps.append(Step(check, f"{_REFUSED.get(exc.exit_code, 'error')} ({exc.exit_code})", why or exc.message))
        self.refusal = exc
        return self


def when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts or 0))


def decide(query: Query, view: View) -> Verdict:
    """Run the steps for ``query`` in order; stop at the first refusal."""
    v = Verdict(query)
    caller = query.caller
    until = view.frozen_until(caller)
    if until is not None:
        if until - time.time() > OPERATOR_FREEZE / 2:
            refusal: PrivsepError = Denied(
                f"denied: {caller} is frozen until an operator lifts it ('mcp-brokerctl unfreeze {caller}')"
            )
            return v.refuse("freeze", refusal, f"{caller} is frozen until an operator lifts it")
        refusal = Denied(f"denied: {caller} is frozen until {when(until)} after repeated denials")
        return v.refuse("freeze", refusal, f"{caller} is frozen until {when(until)}")
    v.passed("freeze", "not frozen")
    try:
        allowed = view.allowlist(caller)
    except ConfigError as broken:
        return v.refuse("allowlist", broken)
    v.allowlist = allowed
    if query.purpose == "list" or query.action is None:
        v.passed("allowlist", f"read {allowed.path}")
        return v
    action = query.action
    name = str(action)
    if not allowed.allows(name):
        refusal = Denied(f"denied: {name} is not in the allowlist for {caller}")
        return v.refuse("allowlist", refusal, f"{name} is not in {allowed.path}")
    v.passed("allowlist", f"listed in {allowed.path}")
    if query.purpose == "call":
        v.rules = view.rules(name, caller)

    offer = v.offer = view.offer(action, caller)
    if offer.state == "unconfigured":
        refusal = Unavailable(f"server {action.server} is not configured in the broker")
        return v.refuse("offered", refusal, "server not configured")
    if offer.spec is None:
        if offer.state == "up":
            refusal = Unavailable(f"server {action.server} does not offer a tool named {action.tool}")
            return v.refuse("offered", refusal, "the server is up but does not offer this tool")
        why = f": {offer.reason}" if offer.reason else ""
        refusal = Unavailable(f"server {action.server} is unavailable{why}")
        return v.refuse("offered", refusal, f"server is {offer.state}{why}")
    v.passed("offered", f"server {action.server} offers it")

    pinned = v.pin_state = view.pin(name, offer.spec)
    if pinned == "changed":
        refusal = Denied(
            f"denied: the definition of {name} changed since it was reviewed; "
            f"an operator must review it ('mcp-brokerctl pins accept {name}')"
        )
        return v.refuse("pin", refusal, f"definition changed since pinned; run 'mcp-brokerctl pins accept {name}'")
    if pinned == "unreviewed":
        refusal = Denied(
            f"denied: the definition of {name} has not been reviewed; "
            f"an operator must review it ('mcp-brokerctl pins accept {name}')"
        )
        return v.refuse("pin", refusal, f"no one reviewed this definition; run 'mcp-brokerctl pins accept {name}'")
    if pinned == "first-use":
        v.passed("pin", 'not reviewed; pin = "first-use": a call pins what is offered now')
    else:
        v.passed("pin", "definition matches its pin")
    if query.purpose == "describe":
        return v

    rules = v.rules
    assert rules is not None
    # an argument holding a known secret is a guess being confirmed: any answer would say whether it was right,
    # so it is looked for first, in the arguments as sent (keys too), before anything else could refuse them
    secret = view.secret_in({"kv": query.kv, "args": query.args})
    if secret is not None:
        v.secret = secret
        refusal = Denied(f"denied: {caller} is frozen until an operator lifts it ('mcp-brokerctl unfreeze {caller}')")
        return v.refuse("secret", refusal, f"an argument holds the value of the secret {secret}: {caller} is frozen")
    v.passed("secret", "no argument holds a known secret value")
    try:
        v.args = build_arguments(query.kv, query.args, offer.spec.input_schema or {})
        v.digest = view.digest(v.args)
        rules.check_args(v.args)
    except ArgumentsRejected as rejected:
        return v.refuse("arguments", rejected)
    v.passed("arguments", f"typed by the schema and checked against {rules.source}")

    if rules.rate is not None and query.slot_taken:
        v.passed("rate", f"its slot under {rules.rate_text} was taken when it was admitted")
    elif rules.rate is not None:
        retry = view.rate_retry(rules)
        if retry:
            refusal = TempFail(f"rate limit {rules.rate_text} for {name} reached; retry in {retry:.0f} s")
            return v.refuse("rate", refusal, f"{rules.rate_text} reached; retry in {retry:.0f} s")
        v.passed("rate", f"under {rules.rate_text}")
    v.passed("mode", f"mode {rules.mode} from {rules.source}", MODE_VERDICTS[rules.mode])
    return v
