"""Policy matchers: argument rules, rule merging, rates, and path confinement.

The path property tests build a real directory tree with symlinks that point
inside, outside, to parents and in chains, then generate paths mixing
``..``, ``.``, ``//``, symlink names and Unicode: whatever ``path_allowed``
accepts must really resolve inside the allowed root.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import unicodedata
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from broker.core.errors import ArgumentsRejected
from broker.daemon.policy import ActionPolicy, ArgRule, effective, glob_regex, parse_rate, path_allowed

# --- argument rules ---------------------------------------------------------------


def test_pattern_is_a_full_match_not_a_search() -> None:
    rule = ArgRule(pattern=r"[^@]+@example\.org")
    rule.check("to", "me@example.org")
    for bad in ("me@example.org.evil.com", "me@evil.org", "me@example.orgx", "me@EXAMPLE.org"):
        with pytest.raises(ArgumentsRejected, match=r"'to' breaks rule 'pattern'"):
            rule.check("to", bad)
    with pytest.raises(ArgumentsRejected):
        rule.check("to", 5)  # a non-string never matches a pattern


@given(st.text(max_size=30))
def test_pattern_accepts_exactly_what_fullmatch_accepts(value: str) -> None:
    import re

    rule = ArgRule(pattern=r"[a-z]{1,5}-\d+")
    expected = re.fullmatch(r"[a-z]{1,5}-\d+", value) is not None
    try:
        rule.check("k", value)
        accepted = True
    except ArgumentsRejected:
        accepted = False
    assert accepted == expected


@given(st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.text(max_size=5), st.none()))
def test_range_accepts_only_numbers_inside(value: object) -> None:
    rule = ArgRule(min=0, max=10)
    inside = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 10
    try:
        rule.check("n", value)
        accepted = True
    except ArgumentsRejected:
        accepted = False
    assert accepted == inside


@given(st.one_of(st.text(max_size=12), st.lists(st.integers(), max_size=12)))
def test_max_length(value: object) -> None:
    rule = ArgRule(max_length=6)
    assert isinstance(value, (str, list))
    try:
        rule.check("k", value)
        accepted = True
    except ArgumentsRejected:
        accepted = False
    assert accepted == (len(value) <= 6)


def test_enum_compares_exact_values() -> None:
    rule = ArgRule(enum=["fast", 1])
    rule.check("m", "fast")
    rule.check("m", 1)
    for bad in ("Fast", "fast ", "1", 2, None):
        with pytest.raises(ArgumentsRejected, match="'m' breaks rule 'enum'"):
            rule.check("m", bad)


def test_bad_rules_are_config_errors() -> None:
    for bad in ({"pattern": "("}, {"path": "relative/*"}, {"path": "/a/../b/*"}, {"max_length": -1}, {"x": 1}):
        with pytest.raises(ValidationError):
            ArgRule.model_validate(bad)
    with pytest.raises(ValidationError):
        ActionPolicy.model_validate({"rate": "lots"})
    with pytest.raises(ValidationError):
        ActionPolicy.model_validate({"mode": "maybe"})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("20/hour", (20, 3600.0)), ("5/minute", (5, 60.0)), ("1 / second", (1, 1.0)), ("3/days", (3, 86400.0))],
)
def test_parse_rate(text: str, expected: tuple[int, float]) -> None:
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["0/hour", "20/fortnight", "twenty/hour", "20", "-1/hour"])
def test_parse_rate_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_rate(text)


def test_caller_rules_override_action_rules() -> None:
    policies = {
        "mail.send": ActionPolicy.model_validate(
            {
                "mode": "approve",
                "rate": "5/hour",
                "required": ["to"],
                "args": {"to": {"pattern": "a@x"}, "subject": {"max_length": 5}},
                "callers": {"bot": {"mode": "notify", "args": {"to": {"pattern": "b@x"}}}},
            }
        )
    }
    other = effective(policies, "mail.send", "someone")
    assert (other.mode, other.rate, other.source) == ("approve", (5, 3600.0), 'policy."mail.send"')
    bot = effective(policies, "mail.send", "bot")
    assert bot.mode == "notify" and bot.rate == (5, 3600.0) and bot.required == ["to"]
    assert bot.source == 'policy."mail.send".callers.bot'
    bot.check_args({"to": "b@x", "subject": "hi"})
    with pytest.raises(ArgumentsRejected):
        bot.check_args({"to": "a@x"})
    with pytest.raises(ArgumentsRejected, match="'subject'"):
        bot.check_args({"to": "b@x", "subject": "too long"})
    none = effective(policies, "other.tool", "bot")
    assert (none.mode, none.rate, none.source) == ("allow", None, "default")
    none.check_args({"anything": 1})


# --- path globs -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("glob", "path", "ok"),
    [
        ("/srv/nas/**", "/srv/nas", True),
        ("/srv/nas/**", "/srv/nas/a/b/c.txt", True),
        ("/srv/nas/**", "/srv/nasty/x", False),
        ("/srv/nas/*", "/srv/nas/a", True),
        ("/srv/nas/*", "/srv/nas/a/b", False),
        ("/srv/nas/*.txt", "/srv/nas/a.txt", True),
        ("/srv/nas/*.txt", "/srv/nas/a/b.txt", False),
        ("/srv/nas/?", "/srv/nas/ab", False),
        ("/srv/**/x", "/srv/x", True),
        ("/srv/**/x", "/srv/a/b/x", True),
    ],
)
def test_glob_regex(glob: str, path: str, ok: bool) -> None:
    assert (glob_regex(glob).fullmatch(path) is not None) == ok


class Tree:
    """root/{allowed/{docs/,link-in -> docs, link-out -> ../secret, loop -> loop2 -> loop, up -> ..},
    secret/, allowed-sibling/}; the allowed root is reached through a symlink too."""

    def __init__(self) -> None:
        self.base = os.path.realpath(tempfile.mkdtemp(prefix="mcp-privsep-policy-"))
        b = self.base
        os.makedirs(f"{b}/allowed/docs/deep")
        os.makedirs(f"{b}/secret")
        os.makedirs(f"{b}/allowed-sibling")
        for name, target in [
            ("link-in", "docs"),
            ("link-out", "../secret"),
            ("link-abs", f"{b}/secret"),
            ("loop", "loop2"),
            ("loop2", "loop"),
            ("up", ".."),
            ("sib", "../allowed-sibling"),
            ("chain", "link-out"),
        ]:
            os.symlink(target, f"{b}/allowed/{name}")
        os.symlink(f"{b}/allowed", f"{b}/share")  # the configured root is itself a symlink
        nfc = unicodedata.normalize("NFC", "caf\u00e9")
        os.makedirs(f"{b}/allowed/{nfc}")
        self.glob = f"{b}/share/**"
        self.inside = f"{b}/allowed"

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


@pytest.fixture(scope="module")
def tree() -> Iterator[Tree]:
    t = Tree()
    yield t
    t.cleanup()


SEGMENTS = st.sampled_from(
    [
        "..",
        ".",
        "",
        "docs",
        "deep",
        "link-in",
        "link-out",
        "link-abs",
        "loop",
        "up",
        "sib",
        "chain",
        "secret",
        "allowed",
        "share",
        "caf\u00e9",
        unicodedata.normalize("NFD", "caf\u00e9"),
        "\u2025",  # two-dot leader, not '..'
        "%2e%2e",
        "x\\..\\y",
        "new-file",
    ]
)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(SEGMENTS, max_size=8), st.sampled_from(["share", "allowed", "secret", "allowed-sibling", ""]))
def test_no_accepted_path_resolves_outside(tree: Tree, segments: list[str], start: str) -> None:
    path = "/".join([tree.base, start, *segments])
    if path_allowed(path, tree.glob):
        real = os.path.realpath(path)
        assert real == tree.inside or real.startswith(tree.inside + "/"), (path, real)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from(["docs", "deep", "link-in", "new-file", "caf\u00e9"]), max_size=5))
def test_plain_paths_inside_are_accepted(tree: Tree, segments: list[str]) -> None:
    assert path_allowed("/".join([tree.base, "share", *segments]), tree.glob)


@pytest.mark.parametrize(
    "rel",
    [
        "allowed/link-out/x",
        "allowed/link-abs",
        "allowed/up/secret",
        "allowed/chain",
        "allowed/sib/x",
        "share/../secret",
        "allowed-sibling/x",
        "secret",
    ],
)
def test_escapes_are_refused(tree: Tree, rel: str) -> None:
    assert not path_allowed(f"{tree.base}/{rel}", tree.glob)


@pytest.mark.parametrize("value", ["relative/x", "", "/a\0b", "~/x"])
def test_malformed_paths_are_refused(tree: Tree, value: str) -> None:
    assert not path_allowed(value, tree.glob)
