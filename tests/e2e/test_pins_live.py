"""Pins a person reviewed, for real: the default blocks an unreviewed tool until ``pins accept``;
``pin = "first-use"`` lets its first call pin it; ``allow`` shows and pins what it showed; and an
installation whose pins the previous version made keeps every trusted tool callable after the upgrade.

The shared installation's tests run under ``pin = "first-use"`` (the
harness allowlists by hand); this module sets ``pin = "review"``, the
default of a real installation, and puts it back after. Pins are removed
with the daemon stopped (it caches them), straight from its state file.
"""

from __future__ import annotations

import json
import os
import pwd
import sqlite3
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.core import wire
from tests.e2e.harness import AGENT1, ALLOWLIST, BASE, PYTHON, Installation

REPO = Path(__file__).resolve().parents[2]
#: the last version whose pins were version 1 (made on the first call, name/description/schema/annotations)
PREVIOUS = "303980b"
#: the allowlisted tools a test may call without side effects (no crash, no failure, no sleep)
SAFE_CALLS: dict[str, list[str]] = {
    "demo.echo": ["text=after the upgrade"],
    "demo.whoami": [],
    "demo.add": ["a=2", "b=3"],
    "web.echo": ["text=web"],
    "web.whoami": [],
}


@pytest.fixture(scope="module")
def rev(inst: Installation) -> Iterator[Installation]:
    inst.set_policy(broker_extra='pin = "review"')
    try:
        yield inst
    finally:
        inst.set_allowlist(ALLOWLIST)
        inst.set_policy()


def state_db(inst: Installation) -> str:
    return f"{inst.paths.state}/state.db"


def with_daemon_stopped(inst: Installation, sql: list[str]) -> None:
    """Run ``sql`` on the state file while the daemon is down, then start it again."""
    inst.stop_daemon()
    db = sqlite3.connect(state_db(inst))
    try:
        for statement in sql:
            db.execute(statement)
        db.commit()
    finally:
        db.close()
    inst.start_daemon()


def admin(inst: Installation, op: str, **fields: Any) -> Any:
    return wire.admin_request(inst.paths.admin_sock, pwd.getpwnam("mcp-broker").pw_uid, op, 30.0, **fields)


def pins_table(inst: Installation) -> dict[str, str]:
    db = sqlite3.connect(state_db(inst))
    try:
        return dict(db.execute("SELECT action, hash FROM pins").fetchall())
    finally:
        db.close()


def test_an_unreviewed_tool_is_blocked_until_pins_accept(rev: Installation) -> None:
    with_daemon_stopped(rev, ["DELETE FROM pins WHERE action = 'demo.add'"])
    r = rev.mcp("call", "demo.add", "a=1", "b=2")
    assert r.code == 77, r
    assert "demo.add has not been reviewed" in r.err and "pins accept demo.add" in r.err, r
    assert rev.mcp("describe", "demo.add").code == 77
    listed = rev.mcp("list").out
    assert "demo.add" in listed and "(blocked: not reviewed by an operator)" in listed, listed
    assert "demo.add" not in pins_table(rev)  # looking made no pin
    shown = rev.ctl("pins")
    assert shown.code == 0 and "UNREVIEWED       demo.add" in shown.out, shown
    assert '"description": "Add two integers."' in shown.out and "pins accept demo.add" in shown.out
    accepted = rev.ctl("pins", "accept", "demo.add")
    assert accepted.code == 0, accepted
    assert "demo.add: definition to pin:" in accepted.out and '"name": "add"' in accepted.out
    assert "pins: demo.add pinned at 2:" in accepted.out
    assert pins_table(rev)["demo.add"].startswith("2:")
    r = rev.mcp("call", "demo.add", "a=1", "b=2")
    assert (r.code, r.out) == (0, "3\n"), r
    record = next(x for x in reversed(rev.records()) if x.get("op") == "pin_accept")
    assert record["tool"] == "demo.add" and record["by"] == "root" and record["pin_hash"].startswith("2:")


def test_first_use_pins_on_the_first_call_broker_wide_and_per_server(rev: Installation) -> None:
    try:
        for broker_extra, policy in (('pin = "first-use"', ""), ('pin = "review"', 'pin = "first-use"')):
            # policy lands in [servers.demo] (the harness writes it right after that table)
            rev.write_broker_toml(broker_extra, policy)
            with_daemon_stopped(rev, ["DELETE FROM pins WHERE action = 'demo.add'"])
            r = rev.mcp("call", "demo.add", "a=2", "b=2")
            assert (r.code, r.out) == (0, "4\n"), (broker_extra, policy, r)
            assert pins_table(rev)["demo.add"].startswith("2:")
            pin = next(x for x in reversed(rev.records()) if x.get("op") == "pin")
            assert (pin["tool"], pin["by"], pin["caller"]) == ("demo.add", "first-use", AGENT1)
    finally:
        rev.set_policy(broker_extra='pin = "review"')


def test_allow_shows_each_definition_and_pins_what_it_showed(rev: Installation) -> None:
    with_daemon_stopped(rev, ["DELETE FROM pins WHERE action = 'demo.work'"])
    assert rev.mcp("call", "demo.work", "seconds=0", "steps=1").code == 77  # not allowlisted yet
    allowed = rev.ctl("allow", "demo.work")
    assert allowed.code == 0, allowed
    assert "allowed demo.work" in allowed.out
    assert "demo.work: definition to pin:" in allowed.out and '"name": "work"' in allowed.out, allowed.out
    assert "pins: demo.work pinned at 2:" in allowed.out
    r = rev.mcp("call", "demo.work", "seconds=0", "steps=1")
    assert r.code == 0 and "worked" in r.out, r
    again = rev.ctl("allow", "demo.work")  # already allowed and pinned: said so, nothing shown
    assert again.code == 0 and "pins: demo.work: already pinned" in again.out, again


def _previous_pins_code(into: str) -> str:
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", PREVIOUS, "broker"], capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the previous version ({PREVIOUS}) is not in this clone's history: {exc}")
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True, timeout=60)
    os.chmod(into, 0o755)
    subprocess.run(["chmod", "-R", "a+rX", into], check=True)
    return into


#: run by the previous version's own code, as mcp-broker: pin each definition on "first sight", as it did
_OLD_PINNING = """
import json, sys
sys.path.insert(0, sys.argv[1])
import mcp
from broker.daemon.pins import PinBook
from broker.daemon.state import State
book = PinBook(State(sys.argv[2]))
for action, definition in json.loads(sys.stdin.read()).items():
    assert book.check(action, mcp.types.Tool.model_validate(definition)) == "pinned"
"""


def test_pins_made_by_the_previous_version_keep_every_tool_callable(rev: Installation) -> None:
    old = _previous_pins_code(tempfile.mkdtemp(prefix="previous-pins-", dir=BASE))
    rev.set_allowlist(ALLOWLIST)  # what was allowlisted before the upgrade (demo.work is not)
    allowed = [ln.split("#")[0].strip() for ln in ALLOWLIST.splitlines()]
    allowed = [a for a in allowed if a and not a.startswith("#")]
    definitions = {}
    for action in allowed:
        shown = admin(rev, "pin_show", action=action)
        if shown.get("definition"):
            definitions[action] = json.loads(shown["definition"])
    assert set(SAFE_CALLS) <= set(definitions), definitions.keys()
    # demo.echo's previous pin is of another definition: it changed under the old version, and stays blocked
    trusted = {a: d for a, d in definitions.items() if a != "demo.slow"}  # demo.slow: allowed, never called
    trusted["demo.echo"] = dict(definitions["demo.echo"], description="Return the text (as it was reviewed).")
    broker = pwd.getpwnam("mcp-broker")
    # the state as the previous version left it: its tables only, its pins
    rev.stop_daemon()
    db = sqlite3.connect(state_db(rev))
    for statement in ("DELETE FROM pins", "DROP TABLE IF EXISTS meta", "DROP TABLE IF EXISTS first_use"):
        db.execute(statement)
    db.commit()
    db.close()
    subprocess.run(
        [PYTHON, "-c", _OLD_PINNING, old, state_db(rev)],
        input=json.dumps(trusted),
        text=True,
        check=True,
        user=broker.pw_uid,
        group=broker.pw_gid,
        extra_groups=[],
        cwd="/",
        timeout=60,
    )
    made = pins_table(rev)
    assert set(made) == set(trusted) and all(":" not in h for h in made.values()), made  # version 1 digests
    rev.start_daemon()  # this version, default pin = "review"
    try:
        for action, args in SAFE_CALLS.items():
            r = rev.mcp("call", action, *args)
            if action == "demo.echo":
                assert r.code == 77 and "changed since it was reviewed" in r.err, r
            else:
                assert r.code == 0, (action, r)
        for action in definitions:
            if action != "demo.echo":
                assert rev.mcp("describe", action).code == 0, action
        after = pins_table(rev)
        assert all(after[a].startswith("2:") for a in trusted if a != "demo.echo"), after  # re-pinned, silently
        assert ":" not in after["demo.echo"]  # the mismatching pin is kept for the operator to compare
        # demo.slow was allowlisted before the upgrade and never pinned: it keeps first-use pinning
        r = rev.mcp("call", "demo.slow", "seconds=0")
        assert r.code == 0, r
        assert rev.records()[-1]["op"] == "call" and pins_table(rev)["demo.slow"].startswith("2:")
        # a tool allowlisted after the upgrade is a new entry: reviewed first
        rev.set_allowlist(ALLOWLIST + "demo.work\n")
        with_daemon_stopped(rev, ["DELETE FROM pins WHERE action = 'demo.work'"])
        r = rev.mcp("call", "demo.work", "seconds=0", "steps=1")
        assert r.code == 77 and "has not been reviewed" in r.err, r
        # the changed one: pins shows the diff of what changed (the description), and accept restores it
        listing = rev.ctl("pins")
        assert "CHANGED          demo.echo" in listing.out, listing.out
        assert '-  "description": "Return the text (as it was reviewed).",' in listing.out, listing.out
        assert rev.ctl("pins", "accept", "demo.echo", "demo.work").code == 0
        assert rev.mcp("call", "demo.echo", "text=accepted").out == "accepted\n"
        upgrade = [x for x in rev.records() if x.get("op") == "pin_policy"]
        assert upgrade and "demo.slow" in str(upgrade[-1]["reason"])
    finally:
        rev.set_allowlist(ALLOWLIST)
        subprocess.run(["rm", "-rf", old], check=False)
