"""Policy rules beyond ``test_policy.py``: ranges, required and forbidden arguments, and what ``Effective`` shows.

Explicit ``null`` settings behave like absent ones, caller names are
checked, a rule applies only to the arguments it names, the rate key
separates callers, ``describe()`` is what ``mcp-brokerctl explain`` prints,
and a path that cannot be resolved is refused.
"""

from __future__ import annotations

import os

import pytest
from pydantic import ValidationError

from broker.core.errors import ArgumentsRejected
from broker.daemon.policy import ActionPolicy, ArgRule, Effective, RuleSet, effective, path_allowed


def test_explicit_nulls_are_like_absent_settings() -> None:
    rule = ArgRule.model_validate({"pattern": None, "path": None, "enum": None})
    rule.check("k", "anything at all")
    ruleset = RuleSet.model_validate({"rate": None, "mode": None})
    merged = Effective("a.b", "alice", ruleset, None)
    assert merged.rate is None and merged.rate_text is None and merged.mode == "allow"


@pytest.mark.parametrize(
    ("rule", "value", "message"),
    [
        ({"min": 1, "max": 10}, 0, "'n' breaks rule 'min': below 1"),
        ({"min": 1, "max": 10}, 10.5, "'n' breaks rule 'max': above 10"),
        ({"max": 2.5}, 3, "'n' breaks rule 'max': above 2.5"),
        ({"min": 0}, True, "'n' breaks rule 'range': not a number"),
        ({"max": 5}, "3", "'n' breaks rule 'range': not a number"),
        ({"path": "/srv/share/**"}, 7, "'n' breaks rule 'path': outside /srv/share/**"),
        ({"path": "/srv/share/**"}, "relative/x", "'n' breaks rule 'path': outside /srv/share/**"),
        ({"pattern": "[a-z]+"}, 5, "'n' breaks rule 'pattern'"),
        ({"max_length": 2}, [1, 2, 3], "'n' breaks rule 'max_length': longer than 2"),
        ({"max_length": 2}, 12345, "'n' breaks rule 'max_length': longer than 2"),
    ],
)
def test_each_rule_names_itself_when_broken(rule: dict[str, object], value: object, message: str) -> None:
    with pytest.raises(ArgumentsRejected, match=message.replace("(", r"\(").replace("*", r"\*")) as caught:
        ArgRule.model_validate(rule).check("n", value)
    assert caught.value.exit_code == 65


@pytest.mark.parametrize(("value"), [1, 10, 5.5, 1.0])
def test_range_bounds_are_inclusive(value: float) -> None:
    ArgRule(min=1, max=10).check("n", value)


def test_caller_names_must_be_user_names() -> None:
    for bad in ("a b", "../x", "-x", "x/y", ""):
        with pytest.raises(ValidationError, match="not a user name"):
            ActionPolicy.model_validate({"callers": {bad: {"mode": "allow"}}})
    ok = ActionPolicy.model_validate({"callers": {"alice": {}, "svc_1.x$": {}, "_x-y": {}}})
    assert set(ok.callers) == {"alice", "svc_1.x$", "_x-y"}


def test_required_and_forbidden_arguments() -> None:
    rules = Effective("mail.send", "bot", ActionPolicy(required=["to"], forbidden=["bcc"]), None)
    rules.check_args({"to": "x"})
    with pytest.raises(ArgumentsRejected, match=r"argument 'to' breaks rule 'required' of policy\.\"mail\.send\""):
        rules.check_args({"subject": "hi"})
    with pytest.raises(ArgumentsRejected, match=r"argument 'bcc' breaks rule 'forbidden' of policy\.\"mail\.send\""):
        rules.check_args({"to": "x", "bcc": "y"})


def test_a_rule_applies_only_to_the_argument_it_names() -> None:
    rules = Effective("a.b", "alice", ActionPolicy(args={"to": ArgRule(pattern="x")}), None)
    rules.check_args({"other": "anything"})  # 'to' absent: nothing to check (required is separate)
    with pytest.raises(ArgumentsRejected):
        rules.check_args({"to": "y"})


def test_a_caller_layer_without_an_action_layer_still_applies() -> None:
    merged = Effective("a.b", "bot", None, RuleSet(mode="approve", timeout=3))
    assert (merged.mode, merged.timeout, merged.source) == ("approve", 3, 'policy."a.b".callers.bot')


def test_no_policy_is_the_default() -> None:
    rules = effective({}, "a.b", "alice")
    assert (rules.source, rules.mode, rules.rate, rules.timeout, rules.max_output_bytes) == (
        "default",
        "allow",
        None,
        None,
        None,
    )
    rules.check_args({"anything": 1})
    assert effective({"a.b": ActionPolicy(mode="notify")}, "a.b", "nobody-special").source == 'policy."a.b"'


def test_the_rate_key_separates_actions_and_callers() -> None:
    policies = {"a.b": ActionPolicy(rate="1/minute")}
    keys = {effective(policies, action, caller).rate_key() for action in ("a.b", "a.c") for caller in ("x", "y")}
    assert len(keys) == 4
    assert effective(policies, "a.b", "x").rate_key() == "a.b\0x"
    # no caller name can make one key look like another: the separator cannot occur in either part
    assert effective(policies, "a.b", "x").rate_key() != effective(policies, "a.bx", "").rate_key()


def test_describe_shows_the_merged_rules() -> None:
    policies = {
        "mail.send": ActionPolicy.model_validate(
            {
                "mode": "approve",
                "rate": "5/hour",
                "timeout": 20,
                "max_output_bytes": 4096,
                "required": ["to"],
                "args": {"to": {"pattern": "a@x", "max_length": 50}},
                "callers": {"bot": {"mode": "notify", "forbidden": ["bcc"], "args": {"to": {"enum": ["b@x"]}}}},
            }
        )
    }
    assert effective(policies, "mail.send", "bot").describe() == {
        "source": 'policy."mail.send".callers.bot',
        "mode": "notify",
        "rate": "5/hour",
        "timeout": 20,
        "max_output_bytes": 4096,
        "required": ["to"],
        "forbidden": ["bcc"],
        "args": {"to": {"enum": ["b@x"]}},  # a caller's rule for an argument replaces the action's
    }
    assert effective({}, "x.y", "bot").describe() == {
        "source": "default",
        "mode": "allow",
        "rate": None,
        "timeout": None,
        "max_output_bytes": None,
        "required": [],
        "forbidden": [],
        "args": {},
    }


@pytest.mark.parametrize("error", [OSError(40, "Too many levels of symbolic links"), ValueError("embedded null")])
def test_a_path_that_cannot_be_resolved_is_refused(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    def failing(path: str, strict: bool = False) -> str:
        raise error

    assert path_allowed("/srv/share/a", "/srv/share/**")
    monkeypatch.setattr(os.path, "realpath", failing)
    assert not path_allowed("/srv/share/a", "/srv/share/**")
