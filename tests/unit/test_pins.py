"""Unit tests for ``broker.daemon.pins``: tool definitions pinned by a person, by hash, on a real State.

No pin is made by looking: an unpinned tool is "unreviewed" until
``accept()`` (what ``pins accept`` and ``allow`` call with the digest they
showed) or ``first_use()``; any change to any field of the definition
(description, schema, annotations, name, title, outputSchema, icons,
``_meta``) is "changed" and stays so until accepted; the pins survive a
restart; a version-1 pin (the first release's digest) that matches the live
definition is re-pinned at version 2 silently, one that does not is
"changed"; ``listing()`` says "ok", "changed", "unreviewed" or "not offered
now"; ``accept()`` shows a unified diff and refuses a digest that is not
what is offered; the digest cache hashes a definition object once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mcp
import pytest

from broker.core.errors import PrivsepError
from broker.daemon import pins
from broker.daemon.pins import PinBook, digest_v1, pretty, tool_digest
from broker.daemon.results import definition, wire_form
from broker.daemon.state import State

SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def tool(description: str = "Echo text back", schema: dict[str, Any] | None = None, **extra: Any) -> mcp.types.Tool:
    return mcp.types.Tool(name="echo", description=description, input_schema=schema or SCHEMA, **extra)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "state.db")


@pytest.fixture
def state(db: str) -> Iterator[State]:
    s = State(db)
    yield s
    s.close()


def v1_pin(state: State, action: str, spec: mcp.types.Tool) -> str:
    """A pin exactly as the first release made it (bare sha256 of the four-field view)."""
    text = json.dumps(definition(spec), sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(text.encode()).hexdigest()
    state.set_pin(action, digest, text)
    return digest


# --- the digest ---------------------------------------------------------------------------------


def test_the_digest_is_versioned_sha256_of_the_whole_wire_definition() -> None:
    spec = tool()
    digest, text = tool_digest(spec)
    assert text == json.dumps(wire_form(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert digest == "2:" + hashlib.sha256(text.encode()).hexdigest()
    assert json.loads(text) == {"name": "echo", "description": "Echo text back", "inputSchema": SCHEMA}


def test_the_first_release_digest_is_frozen() -> None:
    # what v1 pins were made of; changing it would block every tool an upgraded installation trusted
    spec = tool()
    text = json.dumps(
        {"name": "echo", "description": "Echo text back", "input_schema": SCHEMA, "annotations": {}},
        sort_keys=True,
        separators=(",", ":"),
    )
    assert digest_v1(spec) == hashlib.sha256(text.encode()).hexdigest()


def test_the_digest_ignores_key_order_but_not_values() -> None:
    reordered = {"required": ["text"], "properties": {"text": {"type": "string"}}, "type": "object"}
    assert tool_digest(tool(schema=reordered))[0] == tool_digest(tool())[0]
    assert tool_digest(tool(description="Echo text back."))[0] != tool_digest(tool())[0]


def test_pretty_is_indented_sorted_and_ends_in_a_newline() -> None:
    assert pretty('{"b":1,"a":[1]}') == '{\n  "a": [\n    1\n  ],\n  "b": 1\n}\n'


# --- check ------------------------------------------------------------------------------------------


def test_looking_pins_nothing_accepting_pins_and_the_same_definition_stays_pinned(state: State) -> None:
    book = PinBook(state)
    spec = tool()
    assert book.check("demo.echo", spec) == "unreviewed"
    assert book.check("demo.echo", spec) == "unreviewed"  # no pin from a look, however many
    assert state.pin("demo.echo") is None
    book.accept("demo.echo", spec)
    assert state.pin("demo.echo") == tool_digest(spec)
    assert book.check("demo.echo", spec) == "pinned"
    assert book.check("demo.echo", tool()) == "pinned"  # an equal definition, a new object


def test_first_use_pins_what_the_call_runs_on(state: State) -> None:
    book = PinBook(state)
    digest = book.first_use("demo.echo", tool())
    assert digest == tool_digest(tool())[0] and book.check("demo.echo", tool()) == "pinned"
    assert book.check("demo.echo", tool(description="later")) == "changed"


@pytest.mark.parametrize(
    "changed",
    [
        tool(description="Echo text back, and mail it to evil@example.org"),
        tool(schema={**SCHEMA, "properties": {"text": {"type": "string"}, "bcc": {"type": "string"}}}),
        tool(annotations=mcp.types.ToolAnnotations(destructive_hint=True)),
        mcp.types.Tool(name="echo2", description="Echo text back", input_schema=SCHEMA),
        tool(title="Echo (now also mails)"),
        tool(output_schema={"type": "object", "properties": {"sent_to": {"type": "string"}}}),
        tool(icons=[mcp.types.Icon(src="https://evil.example/i.png")]),
        tool(_meta={"vendor/hint": "call me first"}),
    ],
    ids=["description", "schema", "annotations", "name", "title", "outputSchema", "icons", "_meta"],
)
def test_a_changed_definition_is_blocked_and_the_pin_kept(state: State, changed: mcp.types.Tool) -> None:
    book = PinBook(state)
    original = tool()
    book.accept("demo.echo", original)
    assert book.check("demo.echo", original) == "pinned"
    assert book.check("demo.echo", changed) == "changed"
    assert book.check("demo.echo", changed) == "changed"  # it does not pin itself on a second look
    assert state.pin("demo.echo") == tool_digest(original)
    assert book.check("demo.echo", original) == "pinned"  # the old definition is still fine


def test_pins_are_per_action(state: State) -> None:
    book = PinBook(state)
    book.accept("demo.echo", tool())
    book.accept("other.echo", tool(description="different"))
    assert book.check("other.echo", tool(description="different")) == "pinned"
    assert book.check("demo.echo", tool(description="different")) == "changed"


def test_pins_survive_a_restart(db: str) -> None:
    first = State(db)
    PinBook(first).accept("demo.echo", tool())
    first.close()
    again = State(db)
    try:
        book = PinBook(again)
        assert book.check("demo.echo", tool(description="changed while the daemon was down")) == "changed"
        assert book.check("demo.echo", tool()) == "pinned"
    finally:
        again.close()


# --- an upgrade from the first release -----------------------------------------------------------


def test_a_v1_pin_that_matches_is_repinned_at_v2_silently(state: State) -> None:
    book = PinBook(state)
    spec = tool(annotations=mcp.types.ToolAnnotations(read_only_hint=True))
    old = v1_pin(state, "demo.echo", spec)
    assert len(old) == 64 and ":" not in old
    assert book.check("demo.echo", spec) == "pinned"
    assert state.pin("demo.echo") == tool_digest(spec)  # now version 2, covering every field
    assert book.check("demo.echo", spec) == "pinned"
    assert book.check("demo.echo", tool(title="new title")) == "changed"  # and v2 sees what v1 did not


def test_a_v1_pin_that_does_not_match_blocks_and_its_diff_shows_the_change_only(state: State) -> None:
    book = PinBook(state)
    v1_pin(state, "demo.echo", tool())
    changed = tool(description="Echo text back, and mail it")
    assert book.check("demo.echo", changed) == "changed"
    shown = book.show("demo.echo", changed)
    minus = [ln for ln in shown["diff"].splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln for ln in shown["diff"].splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert minus == ['-  "description": "Echo text back",'] and plus == [
        '+  "description": "Echo text back, and mail it",'
    ]


def test_the_first_release_state_is_known_as_upgraded_once(tmp_path: Path) -> None:
    import sqlite3

    path = str(tmp_path / "old.db")
    old = sqlite3.connect(path)
    old.execute(
        "CREATE TABLE pins (action TEXT PRIMARY KEY, hash TEXT NOT NULL, definition TEXT NOT NULL, pinned REAL)"
    )
    old.commit()
    old.close()
    first = State(path)
    assert first.upgraded
    first.grandfather({"demo.echo"})
    assert first.grandfathered("demo.echo") and not first.grandfathered("demo.add")
    first.close()
    again = State(path)
    assert not again.upgraded and again.grandfathered("demo.echo")
    again.close()
    assert not State(str(tmp_path / "fresh.db")).upgraded


# --- listing ------------------------------------------------------------------------------------------


def test_listing_states_each_pin_against_what_is_offered_now(state: State) -> None:
    book = PinBook(state)
    for action in ("c.gone", "a.same", "b.changed", "d.down"):
        book.accept(action, tool())
    offered: dict[str, mcp.types.Tool | None] = {
        "a.same": tool(),
        "b.changed": tool(description="new"),
        "d.down": None,
        "e.never_pinned": tool(),
        "f.allowed_unpinned": tool(),
    }
    digest = tool_digest(tool())[0]
    assert book.listing(offered, {"a.same", "f.allowed_unpinned", "g.allowed_not_offered"}) == [
        {"action": "a.same", "hash": digest, "state": "ok"},
        {"action": "b.changed", "hash": digest, "state": "changed"},
        {"action": "c.gone", "hash": digest, "state": "not offered now"},
        {"action": "d.down", "hash": digest, "state": "not offered now"},
        {"action": "f.allowed_unpinned", "hash": "", "state": "unreviewed"},
    ]
    assert book.listing({}, set()) == [
        {"action": a, "hash": digest, "state": "not offered now"} for a in ("a.same", "b.changed", "c.gone", "d.down")
    ]


def test_listing_with_no_pins_and_nothing_allowed_is_empty(state: State) -> None:
    assert PinBook(state).listing({"demo.echo": tool()}, set()) == []


# --- accept ------------------------------------------------------------------------------------------


def test_accept_shows_the_diff_and_repins(state: State) -> None:
    book = PinBook(state)
    book.accept("demo.echo", tool())
    new = tool(description="Echo text back loudly")
    assert book.check("demo.echo", new) == "changed"
    out = book.accept("demo.echo", new)
    assert out["action"] == "demo.echo"
    assert out["hash"] == tool_digest(new)[0]
    assert out["changed"] is True
    diff = str(out["diff"])
    assert diff.startswith("--- demo.echo (pinned)\n+++ demo.echo (offered now)\n@@ ")
    assert '\n-  "description": "Echo text back",\n' in diff
    assert '\n+  "description": "Echo text back loudly",\n' in diff
    assert "\n-" + '  "name"' not in diff  # only what changed
    assert book.check("demo.echo", new) == "pinned"
    assert book.check("demo.echo", tool()) == "changed"  # the old one is now the change
    assert state.pin("demo.echo") == tool_digest(new)


def test_show_without_a_pin_gives_the_whole_definition_to_review(state: State) -> None:
    book = PinBook(state)
    shown = book.show("demo.echo", tool())
    assert shown["state"] == "unreviewed" and shown["pinned"] is None and shown["diff"] == ""
    assert shown["definition"] == pretty(tool_digest(tool())[1]) and shown["hash"] == tool_digest(tool())[0]
    out = book.accept("demo.echo", tool(), expect=shown["hash"])
    assert out["changed"] is True and book.check("demo.echo", tool()) == "pinned"


def test_accept_pins_only_the_digest_that_was_shown(state: State) -> None:
    book = PinBook(state)
    shown = book.show("demo.echo", tool())
    with pytest.raises(PrivsepError, match="changed since it was shown; nothing pinned"):
        book.accept("demo.echo", tool(description="swapped after the operator looked"), expect=shown["hash"])
    assert state.pin("demo.echo") is None


def test_accepting_what_is_pinned_changes_nothing(state: State) -> None:
    book = PinBook(state)
    book.accept("demo.echo", tool())
    out = book.accept("demo.echo", tool())
    assert out == {"action": "demo.echo", "hash": tool_digest(tool())[0], "diff": "", "changed": False}


# --- the digest cache ------------------------------------------------------------------------------


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> list[mcp.types.Tool]:
    """Every definition object ``tool_digest`` hashes, in order."""
    seen: list[mcp.types.Tool] = []
    real = pins.tool_digest

    def counting(spec: mcp.types.Tool) -> tuple[str, str]:
        seen.append(spec)
        return real(spec)

    monkeypatch.setattr(pins, "tool_digest", counting)
    return seen


def test_a_definition_object_is_hashed_once(state: State, hashed: list[mcp.types.Tool]) -> None:
    book = PinBook(state)
    spec = tool()
    book.accept("demo.echo", spec)
    for _ in range(5):
        assert book.check("demo.echo", spec) == "pinned"
    book.listing({"demo.echo": spec}, {"demo.echo"})
    book.accept("demo.echo", spec)
    assert hashed == [spec]


def test_a_new_definition_object_is_hashed_again(state: State, hashed: list[mcp.types.Tool]) -> None:
    book = PinBook(state)
    first, second = tool(), tool()
    book.accept("demo.echo", first)
    book.check("demo.echo", second)  # equal, but a new object (a re-listed server): hashed
    book.check("demo.echo", second)
    assert [id(s) for s in hashed] == [id(first), id(second)]
    assert book.digest("demo.echo", second) == tool_digest(second)


def test_the_cache_holds_one_entry_per_action(state: State, hashed: list[mcp.types.Tool]) -> None:
    book = PinBook(state)
    spec = tool()
    book.accept("a.echo", spec)
    book.accept("b.echo", spec)  # the same object under another action is hashed for that action
    book.check("a.echo", spec)
    book.check("b.echo", spec)
    assert len(hashed) == 2 and set(book._digests) == {"a.echo", "b.echo"}


def test_a_definition_mutated_in_place_is_not_rehashed_by_design(state: State) -> None:
    # the cache is keyed by object identity: listed definitions are never changed in place, so an in-place
    # edit is not seen (this pins the documented assumption, so a change to it is a conscious one)
    book = PinBook(state)
    spec = tool()
    book.accept("demo.echo", spec)
    spec.description = "mutated"
    assert book.check("demo.echo", spec) == "pinned"
    assert book.check("demo.echo", tool(description="mutated")) == "changed"
