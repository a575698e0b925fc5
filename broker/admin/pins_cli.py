"""``mcp-brokerctl pins``: review tool definitions and pin what was shown.

A pin is made by a person who saw the definition: ``pins accept`` and
``allow`` print it (or the diff from the old pin), then ask the daemon to
pin *the digest that was printed*; if the server offers something else by
then, nothing is pinned. Everything printed that a server wrote (names,
descriptions, schemas, the diff) goes through :mod:`broker.admin.screen`.

This module only shows and asks; the daemon (:mod:`broker.daemon.pins`)
holds the pins and decides with them.
"""

from __future__ import annotations

import pwd
import sys
from collections.abc import Callable
from typing import Any

import click

from broker.admin import screen
from broker.core import wire
from broker.core.errors import PrivsepError, UsageError
from broker.core.paths import BROKER_USER, Paths

#: one request to the running daemon: (op, fields) -> its answer
Admin = Callable[..., Any]


def _admin_for(ctx: click.Context) -> Admin:
    """Requests to the daemon of the install root the CLI was given (``--root``), over admin.sock."""
    paths = Paths((ctx.find_root().obj or {}).get("root", "/"))
    try:
        broker_uid: int | None = pwd.getpwnam(BROKER_USER).pw_uid
    except KeyError:
        broker_uid = None
    return lambda op, **fields: wire.admin_request(paths.admin_sock, broker_uid, op, 30.0, **fields)


def _show(shown: dict[str, Any], full: bool) -> None:
    """The definition a pin would cover, or the diff from the pin it would replace."""
    if shown.get("diff"):
        for row in screen.lines(shown["diff"].rstrip("\n"), full=full):
            click.echo(f"  {row}")
    elif shown.get("definition"):
        for row in screen.lines(shown["definition"].rstrip("\n"), full=full):
            click.echo(f"  {row}")


def _state_word(state: str) -> str:
    return {"changed": "CHANGED", "unreviewed": "UNREVIEWED"}.get(state, state)


@click.group(invoke_without_command=True)
@click.option("--full", is_flag=True, help="Show long lines of a definition or diff whole.")
@click.pass_context
def pins(ctx: click.Context, full: bool) -> None:
    """Tool-definition pins: each tool's state, and the diff of any change.

    States: ok (matches what was reviewed), CHANGED (blocked until 'pins
    accept'), UNREVIEWED (allowlisted, never reviewed: blocked unless its
    server has pin = "first-use"), not offered now.
    """
    if ctx.invoked_subcommand is not None:
        return
    admin = _admin_for(ctx)
    rows = admin("pins")
    if not rows:
        click.echo("pins: none (no tool is pinned or waiting for review)")
    for p in rows:
        digest = (p.get("hash") or "-")[:18]
        policy = f"  (pin = {p['policy']})" if p.get("state") == "unreviewed" and p.get("policy") else ""
        click.echo(f"{_state_word(p['state']):<16} {screen.name(p['action'])}  {digest}{policy}")
        if p["state"] in ("changed", "unreviewed"):
            _show(p, full)
    waiting = [p["action"] for p in rows if p["state"] in ("changed", "unreviewed")]
    if waiting:
        click.echo(f"review: mcp-brokerctl pins accept {' '.join(screen.name(a) for a in waiting)}")


@pins.command("show")
@click.argument("action", metavar="SERVER.TOOL")
@click.option("--full", is_flag=True, help="Show long lines whole.")
@click.pass_context
def pins_show(ctx: click.Context, action: str, full: bool) -> None:
    """Show a tool's definition as offered now, and the diff from its pin."""
    shown = _admin_for(ctx)("pin_show", action=action)
    click.echo(f"{screen.name(action)}: {_state_word(shown['state'])}  offered {(shown.get('hash') or '-')[:18]}")
    if shown.get("definition"):
        for row in screen.lines(shown["definition"].rstrip("\n"), full=full):
            click.echo(f"  {row}")
    if shown.get("diff"):
        click.echo("diff from the pin:")
        for row in screen.lines(shown["diff"].rstrip("\n"), full=full):
            click.echo(f"  {row}")


def review(admin: Admin, action: str, full: bool, ask: bool, only_new: bool = False) -> str:
    """Show ``action``'s definition (or diff), then pin that exact digest; return what happened, as one line.

    ``ask``: confirm on the terminal first. ``only_new``: pin only a tool no
    one reviewed (``allow`` never silently accepts a *changed* definition).
    """
    shown = admin("pin_show", action=action)
    state = shown["state"]
    label = screen.name(action)
    if state == "not offered now":
        return f"pins: {label}: not offered now; not pinned (review it later: mcp-brokerctl pins accept {label})"
    if state == "pinned":
        return f"pins: {label}: already pinned at {shown['hash'][:18]}"
    if state == "changed" and only_new:
        return f"pins: {label}: its definition CHANGED since it was pinned; review: mcp-brokerctl pins accept {label}"
    heading = "changed since it was pinned" if state == "changed" else "definition to pin"
    click.echo(f"{label}: {heading}:")
    _show(shown, full)
    if ask and not click.confirm(f"pin {label} as shown?", default=False):
        return f"pins: {label}: not pinned"
    accepted = admin("pin_accept", action=action, hash=shown["hash"])
    return f"pins: {label} pinned at {accepted['hash'][:18]}"


@pins.command("accept")
@click.argument("actions", nargs=-1, required=True, metavar="SERVER.TOOL...")
@click.option("--yes", "-y", is_flag=True, help="Do not ask on a terminal; pin what is shown.")
@click.option("--full", is_flag=True, help="Show long lines whole.")
@click.pass_context
def pins_accept(ctx: click.Context, actions: tuple[str, ...], yes: bool, full: bool) -> None:
    """Show each tool's definition (or its diff) and pin exactly what was shown.

    On a terminal it asks first (unless --yes). If the server offers a
    different definition by the time it is pinned, nothing is pinned.
    """
    admin = _admin_for(ctx)
    ask = not yes and sys.stdin.isatty()
    failed = 0
    for action in actions:
        try:
            click.echo(review(admin, action, full, ask))
        except UsageError:
            raise
        except PrivsepError as exc:
            failed += 1
            click.echo(f"mcp-brokerctl: pins: {screen.line(exc.message)}", err=True)
    if failed:
        raise PrivsepError(f"pins: {failed} of {len(actions)} not pinned", 1)
