"""``mcp-brokerctl pins`` and the review ``allow`` runs: what is shown is what is pinned, defanged.

A fake daemon (the admin request function) answers ``pins``, ``pin_show``
and ``pin_accept``; the tests check which requests the CLI sends (the
digest it showed, nothing for a changed definition under ``allow``) and
what it prints (a server's ESC never reaches the terminal).
"""

from __future__ import annotations

from typing import Any

import click
import pytest
from click.testing import CliRunner

from broker.admin import cli, pins_cli

DEFINITION = '{\n  "description": "Echo \\u001b]52;c;ZXZpbA==\\u0007 text",\n  "name": "echo"\n}\n'


class FakeDaemon:
    def __init__(self, shown: dict[str, Any], rows: list[dict[str, Any]] | None = None) -> None:
        self.shown = shown
        self.rows = rows or []
        self.sent: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, op: str, **fields: Any) -> Any:
        self.sent.append((op, fields))
        if op == "pin_show":
            return self.shown
        if op == "pin_accept":
            return {"action": fields["action"], "hash": fields["hash"], "diff": "", "changed": True}
        if op == "pins":
            return self.rows
        raise AssertionError(op)


def unreviewed(definition: str = DEFINITION) -> dict[str, Any]:
    return {"action": "demo.echo", "state": "unreviewed", "hash": "2:" + "a" * 64, "definition": definition, "diff": ""}


def run(daemon: FakeDaemon, monkeypatch: pytest.MonkeyPatch, *argv: str) -> tuple[int, str]:
    monkeypatch.setattr(pins_cli, "_admin_for", lambda ctx: daemon)
    result = CliRunner().invoke(cli.cli, list(argv), catch_exceptions=False, standalone_mode=False)
    return result.exit_code, result.output


def test_review_pins_the_digest_it_showed() -> None:
    daemon = FakeDaemon(unreviewed())
    line = pins_cli.review(daemon, "demo.echo", full=False, ask=False)
    assert daemon.sent == [
        ("pin_show", {"action": "demo.echo"}),
        ("pin_accept", {"action": "demo.echo", "hash": "2:" + "a" * 64}),
    ]
    assert line == f"pins: demo.echo pinned at 2:{'a' * 16}"


def test_allow_never_accepts_a_changed_definition() -> None:
    daemon = FakeDaemon(unreviewed() | {"state": "changed", "diff": "--- a\n+++ b\n"})
    line = pins_cli.review(daemon, "demo.echo", full=False, ask=False, only_new=True)
    assert [op for op, _ in daemon.sent] == ["pin_show"]
    assert "CHANGED" in line and "pins accept demo.echo" in line


@pytest.mark.parametrize(
    ("state", "expected"),
    [("pinned", "already pinned"), ("not offered now", "not offered now; not pinned")],
)
def test_nothing_to_pin(state: str, expected: str) -> None:
    daemon = FakeDaemon(unreviewed() | {"state": state})
    assert expected in pins_cli.review(daemon, "demo.echo", full=False, ask=False)
    assert [op for op, _ in daemon.sent] == ["pin_show"]


def test_a_declined_confirmation_pins_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    daemon = FakeDaemon(unreviewed())
    monkeypatch.setattr(click, "confirm", lambda *a, **k: False)
    assert pins_cli.review(daemon, "demo.echo", full=False, ask=True) == "pins: demo.echo: not pinned"
    assert [op for op, _ in daemon.sent] == ["pin_show"]


def test_pins_accept_prints_the_definition_defanged(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = unreviewed('{\n  "description": "Echo \x1b]52;c;ZXZpbA==\x07 \u202etext",\n  "name": "echo"\n}\n')
    code, out = run(FakeDaemon(raw), monkeypatch, "pins", "accept", "--yes", "demo.echo")
    assert code == 0
    assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out
    assert "\\x1b]52;c;ZXZpbA==\\x07" in out and "<U+202E>" in out
    assert "pins: demo.echo pinned at 2:" in out


def test_pins_lists_changes_with_their_diff_and_the_way_out(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [
        {"action": "demo.add", "state": "ok", "hash": "2:" + "b" * 64},
        {"action": "demo.echo", "state": "changed", "hash": "c" * 64, "diff": "--- x\n+++ y\n-old\n+new\x1b[2J\n"},
        {"action": "demo.big", "state": "unreviewed", "hash": "", "definition": DEFINITION, "policy": "review"},
    ]
    code, out = run(FakeDaemon({}, rows), monkeypatch, "pins")
    assert code == 0
    assert "ok               demo.add  2:bbbbbbbbbbbbbbbb" in out
    assert "CHANGED          demo.echo" in out and "  +new\\x1b[2J" in out and "\x1b" not in out
    assert "UNREVIEWED       demo.big  -  (pin = review)" in out
    assert out.rstrip().endswith("review: mcp-brokerctl pins accept demo.echo demo.big")
