"""Unit tests for ``broker.daemon.decision``: every step of ``decide()`` against a table-driven View.

The fake View is a plain table (frozen callers, allowlists or the
ConfigError a broken one raises, what each server offers, pin states,
policies and the rate limiter's answer) that also records what the
decision asked of it, so the tests pin both the outcome (steps, refusal,
exit code, step texts, the audit fields of :meth:`Verdict.record`) and the
order: a step that refuses stops the decision before the next is consulted.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import mcp
import pytest

from broker.core import wire
from broker.core.allowlist import Allowlist
from broker.core.errors import (
    ArgumentsRejected,
    ConfigError,
    Denied,
    PrivsepError,
    TempFail,
    Unavailable,
    UsageError,
)
from broker.core.names import Action
from broker.daemon.audit import args_digest
from broker.daemon.decision import MODE_VERDICTS, OPERATOR_FREEZE, Offer, PinView, Query, Verdict, decide, when
from broker.daemon.policy import ActionPolicy, ArgRule, Effective, effective
from broker.daemon.redact import Redactor

KEY = b"k" * 32
ALLOWLIST = "/etc/mcp-privsep/allowed-actions.txt"
ECHO = Action("demo", "echo")
SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "n": {"type": "integer"}},
    "required": ["text"],
}
SPEC = mcp.types.Tool(name="echo", description="Echo text back", input_schema=SCHEMA)


@dataclass
class FakeView:
    """A View from tables; ``asked`` records every question in order."""

    frozen: dict[str, float] = field(default_factory=dict)
    allowlists: dict[str, Allowlist | ConfigError] = field(default_factory=dict)
    offers: dict[str, Offer] = field(default_factory=dict)
    pins: dict[str, PinView] = field(default_factory=dict)
    secrets: dict[str, str] = field(default_factory=dict)
    policies: dict[str, ActionPolicy] = field(default_factory=dict)
    retry: float = 0.0
    asked: list[tuple[Any, ...]] = field(default_factory=list)

    def frozen_until(self, caller: str) -> float | None:
        self.asked.append(("frozen_until", caller))
        return self.frozen.get(caller)

    def allowlist(self, caller: str) -> Allowlist:
        self.asked.append(("allowlist", caller))
        found = self.allowlists.get(caller, Allowlist(ALLOWLIST, ["demo.echo", "demo.add"]))
        if isinstance(found, ConfigError):
            raise found
        return found

    def offer(self, action: Action, caller: str) -> Offer:
        self.asked.append(("offer", str(action)))
        return self.offers.get(str(action), Offer("up", SPEC))

    def pin(self, action: str, spec: mcp.types.Tool) -> PinView:
        self.asked.append(("pin", action, spec))
        return self.pins.get(action, "pinned")

    def secret_in(self, args: dict[str, Any]) -> str | None:
        self.asked.append(("secret_in",))
        found = Redactor(self.secrets).found(args)
        return min(found) if found else None

    def rules(self, action: str, caller: str) -> Effective:
        self.asked.append(("rules", action, caller))
        return effective(self.policies, action, caller)

    def digest(self, args: dict[str, Any]) -> str:
        return args_digest(args, KEY)

    def rate_retry(self, rules: Effective) -> float:
        self.asked.append(("rate_retry", rules.action, rules.caller))
        return self.retry

    def questions(self) -> list[str]:
        return [q[0] for q in self.asked]


def call(action: Action | None = ECHO, kv: list[list[str]] | None = None, **args: Any) -> Query:
    return Query("alice", "call", action, kv if kv is not None else [], args if args else {"text": "hi"})


def trail(v: Verdict) -> list[tuple[str, str]]:
    return [(s.check, s.verdict) for s in v.steps]


PASSED_TO_MODE = [
    ("freeze", "pass"),
    ("allowlist", "pass"),
    ("offered", "pass"),
    ("pin", "pass"),
    ("secret", "pass"),
    ("arguments", "pass"),
]

# --- the steps, table-driven --------------------------------------------------------------------

#: (id, view, query, the steps (check, verdict) taken, the refusal's class or None)
CASES: list[tuple[str, FakeView, Query, list[tuple[str, str]], type[PrivsepError] | None]] = [
    ("frozen", FakeView(frozen={"alice": 4e9}), call(), [("freeze", "deny (77)")], Denied),
    (
        "broken allowlist",
        FakeView(allowlists={"alice": ConfigError(f"{ALLOWLIST}:3:7: wildcard; denying every call")}),
        call(),
        [("freeze", "pass"), ("allowlist", "config error (78)")],
        ConfigError,
    ),
    (
        "not listed",
        FakeView(),
        call(Action("demo", "secret")),
        [("freeze", "pass"), ("allowlist", "deny (77)")],
        Denied,
    ),
    (
        "unconfigured",
        FakeView(offers={"demo.echo": Offer("unconfigured")}),
        call(),
        [("freeze", "pass"), ("allowlist", "pass"), ("offered", "unavailable (69)")],
        Unavailable,
    ),
    (
        "starting",
        FakeView(offers={"demo.echo": Offer("starting", reason="starting", waitable=True)}),
        call(),
        [("freeze", "pass"), ("allowlist", "pass"), ("offered", "unavailable (69)")],
        Unavailable,
    ),
    (
        "down",
        FakeView(offers={"demo.echo": Offer("down", reason="exited with status 1")}),
        call(),
        [("freeze", "pass"), ("allowlist", "pass"), ("offered", "unavailable (69)")],
        Unavailable,
    ),
    (
        "up, tool not offered",
        FakeView(offers={"demo.echo": Offer("up")}),
        call(),
        [("freeze", "pass"), ("allowlist", "pass"), ("offered", "unavailable (69)")],
        Unavailable,
    ),
    (
        "pin changed",
        FakeView(pins={"demo.echo": "changed"}),
        call(),
        [("freeze", "pass"), ("allowlist", "pass"), ("offered", "pass"), ("pin", "deny (77)")],
        Denied,
    ),
    (
        "pin unreviewed (review)",
        FakeView(pins={"demo.echo": "unreviewed"}),
        call(),
        [("freeze", "pass"), ("allowlist", "pass"), ("offered", "pass"), ("pin", "deny (77)")],
        Denied,
    ),
    (
        "pin unreviewed (first-use)",
        FakeView(pins={"demo.echo": "first-use"}),
        call(),
        [*PASSED_TO_MODE, ("mode", "allow")],
        None,
    ),
    (
        "an argument holds a known secret",
        FakeView(secrets={"mail.PASSWORD": "hunter2-correct-horse"}),
        call(text="guess1 hunter2-correct-horse"),
        [*PASSED_TO_MODE[:4], ("secret", "deny (77)")],
        Denied,
    ),
    (
        "a key=value pair holds a known secret, percent-encoded",
        FakeView(secrets={"mail.PASSWORD": "hunter2-correct-horse"}),
        Query("alice", "call", ECHO, [["text", "hunter2%2Dcorrect%2dhorse"]], None),
        [*PASSED_TO_MODE[:4], ("secret", "deny (77)")],
        Denied,
    ),
    (
        "a secret guess fails the schema: frozen all the same",
        FakeView(secrets={"mail.PASSWORD": "hunter2-correct-horse"}),
        Query("alice", "call", ECHO, [["n", "hunter2-correct-horse"]], {"text": "hi"}),
        [*PASSED_TO_MODE[:4], ("secret", "deny (77)")],
        Denied,
    ),
    (
        "schema rejects",
        FakeView(),
        Query("alice", "call", ECHO, [["n", "five"]], {"text": "hi"}),
        [*PASSED_TO_MODE[:5], ("arguments", "rejected (65)")],
        ArgumentsRejected,
    ),
    (
        "policy rule rejects",
        FakeView(policies={"demo.echo": ActionPolicy(args={"text": ArgRule(max_length=3)})}),
        call(text="too long"),
        [*PASSED_TO_MODE[:5], ("arguments", "rejected (65)")],
        ArgumentsRejected,
    ),
    (
        "rate limited",
        FakeView(policies={"demo.echo": ActionPolicy(rate="2/minute")}, retry=42.4),
        call(),
        [*PASSED_TO_MODE, ("rate", "try later (75)")],
        TempFail,
    ),
    (
        "under the rate",
        FakeView(policies={"demo.echo": ActionPolicy(rate="2/minute")}),
        call(),
        [*PASSED_TO_MODE, ("rate", "pass"), ("mode", "allow")],
        None,
    ),
    ("allow (no policy)", FakeView(), call(), [*PASSED_TO_MODE, ("mode", "allow")], None),
    (
        "notify",
        FakeView(policies={"demo.echo": ActionPolicy(mode="notify")}),
        call(),
        [*PASSED_TO_MODE, ("mode", "allow, operator notified")],
        None,
    ),
    (
        "approve",
        FakeView(policies={"demo.echo": ActionPolicy(mode="approve")}),
        call(),
        [*PASSED_TO_MODE, ("mode", "held for approval")],
        None,
    ),
    ("list", FakeView(), Query("alice", "list"), [("freeze", "pass"), ("allowlist", "pass")], None),
    (
        "describe",
        FakeView(),
        Query("alice", "describe", ECHO),
        [("freeze", "pass"), ("allowlist", "pass"), ("offered", "pass"), ("pin", "pass")],
        None,
    ),
    (
        "describe, pin changed",
        FakeView(pins={"demo.echo": "changed"}),
        Query("alice", "describe", ECHO),
        [("freeze", "pass"), ("allowlist", "pass"), ("offered", "pass"), ("pin", "deny (77)")],
        Denied,
    ),
    (
        "describe, not listed",
        FakeView(),
        Query("alice", "describe", Action("demo", "secret")),
        [("freeze", "pass"), ("allowlist", "deny (77)")],
        Denied,
    ),
]


@pytest.mark.parametrize(("view", "query", "steps", "refusal"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_each_step_in_order_stops_at_the_first_refusal(
    view: FakeView, query: Query, steps: list[tuple[str, str]], refusal: type[PrivsepError] | None
) -> None:
    v = decide(query, view)
    assert trail(v) == steps
    assert v.verdict == steps[-1][1]
    if refusal is None:
        assert v.admitted and v.refusal is None and v.failed_at is None
    else:
        assert not v.admitted
        assert type(v.refusal) is refusal
        assert v.failed_at == steps[-1][0]
        assert v.steps[-1].verdict.endswith(f" ({v.refusal.exit_code})")
    assert v.frozen == (v.failed_at == "freeze")


# --- freeze ----------------------------------------------------------------------------------------


def test_a_frozen_caller_is_denied_before_anything_else_is_read() -> None:
    until = 1_700_000_000.0
    view = FakeView(frozen={"alice": until})
    v = decide(call(), view)
    assert view.questions() == ["frozen_until"]
    assert isinstance(v.refusal, Denied) and v.refusal.exit_code == 77
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(until))
    assert v.refusal.message == f"denied: alice is frozen until {stamp} after repeated denials"
    assert v.steps[-1].why == f"alice is frozen until {stamp}"
    assert v.frozen and not v.waitable and v.allowlist is None
    assert v.record() == {"rule": "denial_budget"}


def test_only_the_frozen_caller_is_refused() -> None:
    view = FakeView(frozen={"bob": 4e9})
    assert decide(call(), view).admitted
    assert not decide(Query("bob", "list"), view).admitted


def test_when_formats_utc_and_treats_none_as_the_epoch() -> None:
    assert when(None) == "1970-01-01 00:00:00 UTC"
    assert when(0) == "1970-01-01 00:00:00 UTC"
    assert when(86400 + 3661.9) == "1970-01-02 01:01:01 UTC"


# --- allowlist -------------------------------------------------------------------------------------


def test_a_broken_allowlist_refuses_with_its_own_message_and_records_no_rule() -> None:
    broken = ConfigError("allowlist broken", [f"{ALLOWLIST}:1:1: bad", f"{ALLOWLIST}:2:1: bad"])
    view = FakeView(allowlists={"alice": broken})
    for query in (call(), Query("alice", "list"), Query("alice", "describe", ECHO)):
        v = decide(query, view)
        assert v.refusal is broken
        assert v.steps[-1].why == "allowlist broken"
        assert v.allowlist is None and v.rules is None
        assert v.record() == {}
    assert "offer" not in view.questions()


def test_an_unlisted_tool_is_denied_with_the_allowlist_named() -> None:
    view = FakeView(allowlists={"alice": Allowlist("/x/alice.txt", ["demo.add"])})
    v = decide(call(), view)
    assert isinstance(v.refusal, Denied)
    assert v.refusal.message == "denied: demo.echo is not in the allowlist for alice"
    assert v.steps[-1].why == "demo.echo is not in /x/alice.txt"
    assert view.questions() == ["frozen_until", "allowlist"]  # no rules, no offer, no pin
    assert v.record() == {"rule": "/x/alice.txt"}


def test_the_allowlist_is_a_whole_string_match() -> None:
    view = FakeView(allowlists={"alice": Allowlist(ALLOWLIST, ["demo.echo"])})
    for near in (Action("demo", "ech"), Action("demo", "echo_all"), Action("Demo", "echo"), Action("demo", "echo.x")):
        assert decide(call(near), view).failed_at == "allowlist"


def test_a_listing_reads_the_allowlist_and_nothing_else() -> None:
    allowed = Allowlist("/x/bob.txt", ["demo.echo"])
    view = FakeView(allowlists={"bob": allowed})
    v = decide(Query("bob", "list"), view)
    assert v.admitted and v.allowlist is allowed
    assert v.steps[-1].why == "read /x/bob.txt"
    assert view.questions() == ["frozen_until", "allowlist"]
    assert v.record() == {"rule": "/x/bob.txt"}
    assert v.spec is None and v.offer is None


def test_a_query_without_an_action_stops_after_the_allowlist() -> None:
    view = FakeView()
    v = decide(Query("alice", "call", None), view)
    assert v.admitted and trail(v) == [("freeze", "pass"), ("allowlist", "pass")]
    assert "offer" not in view.questions()


def test_the_allowlist_is_read_for_the_caller_of_the_query() -> None:
    view = FakeView(allowlists={"bob": Allowlist("/x/bob.txt", ["bob.only"])})
    assert decide(Query("bob", "call", Action("bob", "only"), [], {}), view).failed_at != "allowlist"
    assert decide(call(Action("bob", "only")), view).failed_at == "allowlist"  # alice has the default list
    assert ("allowlist", "bob") in view.asked and ("allowlist", "alice") in view.asked


# --- offered ----------------------------------------------------------------------------------------


def test_an_unconfigured_server_is_unavailable_and_not_waitable() -> None:
    v = decide(call(), FakeView(offers={"demo.echo": Offer("unconfigured")}))
    assert isinstance(v.refusal, Unavailable)
    assert v.refusal.message == "server demo is not configured in the broker"
    assert v.steps[-1].why == "server not configured"
    assert not v.waitable


def test_a_starting_server_is_waitable_and_says_why() -> None:
    offer = Offer("starting", reason="restarting after a crash", waitable=True)
    v = decide(call(), FakeView(offers={"demo.echo": offer}))
    assert v.waitable and not v.frozen
    assert v.offer is offer
    assert isinstance(v.refusal, Unavailable)
    assert v.refusal.message == "server demo is unavailable: restarting after a crash"
    assert v.steps[-1].why == "server is starting: restarting after a crash"


def test_a_down_server_is_not_waitable() -> None:
    v = decide(call(), FakeView(offers={"demo.echo": Offer("down", reason="exited with status 3")}))
    assert not v.waitable
    assert v.refusal is not None and v.refusal.message == "server demo is unavailable: exited with status 3"
    assert v.steps[-1].why == "server is down: exited with status 3"


def test_a_server_down_without_a_reason_says_just_that() -> None:
    v = decide(call(), FakeView(offers={"demo.echo": Offer("down")}))
    assert v.refusal is not None and v.refusal.message == "server demo is unavailable"
    assert v.steps[-1].why == "server is down"


def test_waitable_needs_the_offered_step_to_refuse() -> None:
    # a waitable offer with the tool in it is admitted: nothing to wait for
    v = decide(call(), FakeView(offers={"demo.echo": Offer("starting", SPEC, waitable=True)}))
    assert v.admitted and not v.waitable
    # a refusal at another step is never waitable, whatever the offer says
    view = FakeView(offers={"demo.echo": Offer("starting", SPEC, waitable=True)}, pins={"demo.echo": "changed"})
    v = decide(call(), view)
    assert v.failed_at == "pin" and not v.waitable


def test_an_up_server_without_the_tool_refuses_without_asking_the_pin() -> None:
    view = FakeView(offers={"demo.echo": Offer("up")})
    v = decide(call(), view)
    assert v.refusal is not None and v.refusal.message == "server demo does not offer a tool named echo"
    assert v.steps[-1].why == "the server is up but does not offer this tool"
    assert "pin" not in view.questions()
    assert v.spec is None


def test_a_refused_offer_of_a_call_records_the_policy_rule_and_mode() -> None:
    view = FakeView(offers={"demo.echo": Offer("unconfigured")}, policies={"demo.echo": ActionPolicy(mode="notify")})
    v = decide(call(), view)
    assert v.record() == {"rule": 'policy."demo.echo"', "mode": "notify"}


# --- pin ---------------------------------------------------------------------------------------------


def test_the_pin_is_checked_with_the_offered_definition() -> None:
    other = mcp.types.Tool(name="echo", description="another definition", input_schema=SCHEMA)
    view = FakeView(offers={"demo.echo": Offer("up", other)})
    v = decide(call(), view)
    assert ("pin", "demo.echo", other) in view.asked
    assert v.spec is other
    assert v.steps[3].why == "definition matches its pin"


def test_a_changed_pin_blocks_with_the_way_out() -> None:
    v = decide(call(), FakeView(pins={"demo.echo": "changed"}))
    assert isinstance(v.refusal, Denied)
    assert v.refusal.message == (
        "denied: the definition of demo.echo changed since it was reviewed; "
        "an operator must review it ('mcp-brokerctl pins accept demo.echo')"
    )
    assert v.steps[-1].why == "definition changed since pinned; run 'mcp-brokerctl pins accept demo.echo'"
    assert v.args is None
    assert "arg_keys" not in v.record()


def test_an_unreviewed_tool_is_blocked_with_the_way_out_and_first_use_says_it_will_pin() -> None:
    v = decide(call(), FakeView(pins={"demo.echo": "unreviewed"}))
    assert isinstance(v.refusal, Denied) and v.pin_state == "unreviewed"
    assert "has not been reviewed" in v.refusal.message and "pins accept demo.echo" in v.refusal.message
    v = decide(call(), FakeView(pins={"demo.echo": "first-use"}))
    assert v.admitted and v.pin_state == "first-use"
    assert v.steps[3].why == 'not reviewed; pin = "first-use": a call pins what is offered now'


def test_a_secret_in_the_arguments_names_the_secret_for_the_daemon_but_not_in_the_refusal() -> None:
    view = FakeView(secrets={"mail.PASSWORD": "hunter2-correct-horse", "ha.TOKEN": "another-secret-value"})
    v = decide(call(text="is it hunter2-correct-horse?"), view)
    assert v.secret == "mail.PASSWORD" and not v.admitted
    assert isinstance(v.refusal, Denied)
    assert "mail" not in v.refusal.message and "PASSWORD" not in v.refusal.message
    assert v.refusal.message == "denied: alice is frozen until an operator lifts it ('mcp-brokerctl unfreeze alice')"
    assert "mail.PASSWORD" in v.steps[-1].why  # explain (root) may say which
    # a wrong guess passes, and is not told apart from any other call
    v = decide(call(text="is it hunter3-correct-horse?"), view)
    assert v.admitted and v.secret is None


def test_an_operator_freeze_reads_as_one() -> None:
    v = decide(call(), FakeView(frozen={"alice": time.time() + OPERATOR_FREEZE}))
    assert isinstance(v.refusal, Denied) and v.frozen
    assert v.refusal.message == "denied: alice is frozen until an operator lifts it ('mcp-brokerctl unfreeze alice')"


def test_describe_stops_after_the_pin_and_records_the_allowlist() -> None:
    view = FakeView(policies={"demo.echo": ActionPolicy(mode="approve")})
    v = decide(Query("alice", "describe", ECHO), view)
    assert v.admitted and v.verdict == "pass"
    assert v.rules is None and v.args is None
    assert "rules" not in view.questions() and "rate_retry" not in view.questions()
    assert v.record() == {"rule": ALLOWLIST}
    assert v.spec is SPEC


# --- arguments ----------------------------------------------------------------------------------------


def test_arguments_are_typed_by_the_schema_and_merged() -> None:
    v = decide(Query("alice", "call", ECHO, [["n", "5"]], {"text": "hi"}), FakeView())
    assert v.admitted
    assert v.args == {"text": "hi", "n": 5}
    assert v.steps[5].why == "typed by the schema and checked against default"


def test_kv_only_arguments_without_args() -> None:
    v = decide(Query("alice", "call", ECHO, [["text", "x"]], None), FakeView())
    assert v.admitted and v.args == {"text": "x"}


def test_a_schema_rejection_names_the_argument_and_logs_no_shape() -> None:
    v = decide(Query("alice", "call", ECHO, [], {}), FakeView())
    assert isinstance(v.refusal, ArgumentsRejected) and v.refusal.exit_code == 65
    assert v.refusal.message == "missing required argument 'text' (see 'mcp describe')"
    assert v.steps[-1].why == v.refusal.message
    assert v.args is None
    assert v.record() == {"rule": "default", "mode": "allow"}


def test_a_tool_without_a_schema_takes_strings() -> None:
    bare = mcp.types.Tool(name="echo", input_schema={})
    v = decide(Query("alice", "call", ECHO, [["n", "5"]], None), FakeView(offers={"demo.echo": Offer("up", bare)}))
    assert v.admitted and v.args == {"n": "5"}


def test_a_policy_rule_rejection_names_the_rule_and_logs_the_shape() -> None:
    view = FakeView(policies={"demo.echo": ActionPolicy(forbidden=["n"])})
    v = decide(Query("alice", "call", ECHO, [["n", "1"]], {"text": "hi"}), view)
    assert isinstance(v.refusal, ArgumentsRejected)
    assert v.refusal.message == "argument 'n' breaks rule 'forbidden' of policy.\"demo.echo\""
    assert v.failed_at == "arguments"
    # the arguments were typed before the rule refused them: their shape is audited, not their values
    record = v.record()
    assert record["arg_keys"] == ["n", "text"] and record["args_digest"] == args_digest({"text": "hi", "n": 1}, KEY)
    assert "rate_retry" not in view.questions()


def test_per_caller_rules_are_asked_for_the_caller() -> None:
    policy = ActionPolicy.model_validate({"mode": "allow", "callers": {"alice": {"mode": "approve"}}})
    view = FakeView(policies={"demo.echo": policy})
    v = decide(call(), view)
    assert ("rules", "demo.echo", "alice") in view.asked
    assert v.verdict == "held for approval"
    assert v.record()["rule"] == 'policy."demo.echo".callers.alice'
    bob = decide(Query("bob", "call", ECHO, [], {"text": "hi"}), view)
    assert bob.verdict == "allow" and bob.record()["rule"] == 'policy."demo.echo"'


# --- rate ------------------------------------------------------------------------------------------------


def test_a_rate_limited_call_says_when_to_retry() -> None:
    view = FakeView(policies={"demo.echo": ActionPolicy(rate="2/minute")}, retry=42.4)
    v = decide(call(), view)
    assert isinstance(v.refusal, TempFail) and v.refusal.exit_code == 75
    assert v.refusal.message == "rate limit 2/minute for demo.echo reached; retry in 42 s"
    assert v.steps[-1].why == "2/minute reached; retry in 42 s"
    assert ("rate_retry", "demo.echo", "alice") in view.asked
    assert v.record()["mode"] == "allow"


def test_under_the_rate_the_step_passes_and_without_a_rate_it_is_skipped() -> None:
    view = FakeView(policies={"demo.echo": ActionPolicy(rate="5/hour")})
    v = decide(call(), view)
    assert v.steps[-2].check == "rate" and v.steps[-2].why == "under 5/hour"
    plain = FakeView()
    v = decide(call(), plain)
    assert "rate" not in [s.check for s in v.steps]
    assert "rate_retry" not in plain.questions()


# --- mode ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["allow", "notify", "approve"])
def test_each_mode_is_the_last_step_with_its_verdict(mode: str) -> None:
    v = decide(call(), FakeView(policies={"demo.echo": ActionPolicy.model_validate({"mode": mode})}))
    assert v.admitted
    last = v.steps[-1]
    assert (last.check, last.verdict) == ("mode", MODE_VERDICTS[mode])
    assert last.why == f'mode {mode} from policy."demo.echo"'
    assert v.verdict == MODE_VERDICTS[mode]
    assert v.record()["mode"] == mode


def test_mode_verdicts_are_the_contract_texts() -> None:
    assert MODE_VERDICTS == {"allow": "allow", "notify": "allow, operator notified", "approve": "held for approval"}


# --- the verdict ----------------------------------------------------------------------------------------------


def test_record_of_an_admitted_call_has_rule_mode_and_the_arguments_shape_only() -> None:
    args = {"text": "a secret value", "n": 7}
    view = FakeView(policies={"demo.echo": ActionPolicy(mode="notify")})
    v = decide(Query("alice", "call", ECHO, [], args), view)
    assert v.record() == {
        "rule": 'policy."demo.echo"',
        "mode": "notify",
        "arg_keys": ["n", "text"],
        "args_size": len(wire.dumps(args)),
        "args_digest": args_digest(args, KEY),
    }
    assert "a secret value" not in wire.dumps(v.record())


def test_the_verdict_carries_what_an_admitted_call_needs() -> None:
    allowed = Allowlist(ALLOWLIST, ["demo.echo"])
    view = FakeView(allowlists={"alice": allowed}, policies={"demo.echo": ActionPolicy(timeout=5)})
    v = decide(call(), view)
    assert v.allowlist is allowed
    assert v.offer is not None and v.offer.state == "up" and v.spec is SPEC
    assert v.rules is not None and v.rules.timeout == 5
    assert v.args == {"text": "hi"}


def test_an_empty_verdict_is_admitted_and_passes() -> None:
    v = Verdict(Query("alice", "list"))
    assert v.admitted and v.failed_at is None and not v.frozen and not v.waitable
    assert v.verdict == "pass" and v.spec is None and v.record() == {}


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (UsageError("u"), "usage (64)"),
        (ArgumentsRejected("a"), "rejected (65)"),
        (Unavailable("x"), "unavailable (69)"),
        (TempFail("t"), "try later (75)"),
        (Denied("d"), "deny (77)"),
        (ConfigError("c"), "config error (78)"),
        (PrivsepError("bug"), "error (70)"),
        (PrivsepError("odd", 3), "error (3)"),
    ],
)
def test_a_refused_step_reads_as_its_exit_code(exc: PrivsepError, text: str) -> None:
    v = Verdict(Query("alice", "list"))
    v.passed("freeze", "not frozen")
    assert v.refuse("allowlist", exc) is v
    assert v.steps[-1].verdict == text
    assert v.steps[-1].why == exc.message  # without a why, the refusal's message
    assert v.refusal is exc and v.failed_at == "allowlist" and not v.admitted
    v2 = Verdict(Query("alice", "list")).refuse("freeze", exc, "custom why")
    assert v2.steps[-1].why == "custom why" and v2.frozen


def test_decide_holds_no_state_between_queries() -> None:
    view = FakeView(policies={"demo.echo": ActionPolicy(mode="approve")})
    first = decide(call(), view)
    second = decide(call(), view)
    assert first is not second and first.steps is not second.steps
    assert trail(first) == trail(second)
