"""``mcp-brokerctl``: the root-only admin CLI, one click group over the admin libraries.

``main(argv)`` runs in-process for tests; errors become one line on stderr
and an exit code here, at the edge, and nowhere else. Each command is a thin
layer: the work is in :mod:`broker.admin.install`, ``check``, ``doctor``,
``importer``, ``allowlist_edit``, ``audit_reader``, ``uninstall`` and
``process``, or in the daemon (over ``admin.sock``, through
:func:`broker.core.wire.admin_request`).
"""

from __future__ import annotations

import json
import os
import pwd
import sys
import time
from typing import Any

import click

from broker import __version__
from broker.admin import sandbox_view, screen
from broker.admin.check import check_all
from broker.core import names, wire
from broker.core.errors import (
    EX_FAILED,
    EX_NOPERM,
    EX_NOUSER,
    EX_USAGE,
    ConfigError,
    ImportProblem,
    PrivsepError,
    UsageError,
)
from broker.core.paths import BROKER_USER, Paths


def _paths(ctx: click.Context) -> Paths:
    obj = ctx.find_root().obj or {}
    return Paths(obj.get("root", "/"))


def _broker_uid() -> int | None:
    try:
        return pwd.getpwnam(BROKER_USER).pw_uid
    except KeyError:
        return None


def _admin(paths: Paths, op: str, timeout: float = 30.0, **fields: Any) -> Any:
    """One request to the running daemon over admin.sock; its refusal raises PrivsepError."""
    return wire.admin_request(paths.admin_sock, _broker_uid(), op, timeout, **fields)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--root",
    default="/",
    show_default=True,
    envvar="MCP_PRIVSEP_ROOT",
    help="Install root (staging and tests); root-only, never reachable by agents.",
)
@click.version_option(__version__, prog_name="mcp-brokerctl")
@click.pass_context
def cli(ctx: click.Context, root: str) -> None:
    """Administer mcp-privsep (run as root)."""
    ctx.obj = {"root": root}


@cli.command()
@click.option(
    "--agent",
    "agents",
    multiple=True,
    metavar="USER",
    help="Agent user allowed to run 'mcp' (repeatable; existing agents are kept).",
)
@click.option("--venv", default=None, help="Virtualenv holding mcp-privsep (default: the one running this).")
@click.pass_context
def install(ctx: click.Context, agents: tuple[str, ...], venv: str | None) -> None:
    """Create users, directories, commands, the sudoers drop-in and example config."""
    from broker.admin.install import install as do_install

    report = do_install(_paths(ctx), list(agents), venv)
    for line in report.lines:
        click.echo(line)
    click.echo("install: done")


@cli.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate allowlists and config offline (exit 0 valid, 1 invalid)."""
    from broker.admin.check import check_warnings

    paths = _paths(ctx)
    problems = check_all(paths)
    for p in problems:
        click.echo(p, err=True)
    for w in check_warnings(paths):  # what would mangle results, not what makes the config invalid
        click.echo(f"warning: {w}", err=True)
    if problems:
        raise PrivsepError(f"check: {len(problems)} problem(s)", EX_FAILED)
    click.echo(f"check: {paths.etc} is valid")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Ask the running daemon how it is (exit 0 when it answers)."""
    result = _admin(_paths(ctx), "status")
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=True))
        return
    click.echo(
        f"broker: {result['broker']} (pid {result['pid']}, version {result['version']}, "
        f"up {result['uptime_s']} s, audit {result['audit']})"
    )
    for line in audit_trail_lines(result.get("audit_trail")):
        click.echo(line)
    for line in config_lines(result.get("config")):
        click.echo(line)
    for caller, held in sorted((result.get("holdings") or {}).items()):
        top = held.get("max", {})
        click.echo(
            f"caller {screen.name(caller)}: {held.get('sessions')}/{top.get('sessions')} sessions, "
            f"{held.get('connections')}/{top.get('connections')} connections, "
            f"{held.get('calls')}/{top.get('calls')} calls in flight"
        )
    for s in result["servers"]:
        reason = f" ({screen.line(s['reason'], more=_JSON_MORE)})" if s.get("reason") else ""
        click.echo(
            f"server {screen.name(s['name'])} [{s['transport']}]: {s['state']}{reason}, "
            f"{s['tools']} tools, {s['restarts']} restarts"
        )
        for line in sandbox_view.lines(s):
            click.echo(line)
        for tool, why in (s.get("hidden") or {}).items():
            action = screen.name(f"{s.get('server', s['name'])}.{tool}", more=_JSON_MORE)
            click.echo(f"  {action}: not offered ({screen.line(why, more=_JSON_MORE)})")


#: how to see a value the text output cut, in a command without --full
_JSON_MORE = "--json shows all"


def config_lines(disk: Any) -> list[str]:
    """``status``'s lines on the config files: broken (every call refused), or changed and waiting for a reload."""
    if not isinstance(disk, dict):
        return []  # an older daemon
    lines = []
    if disk.get("error"):
        lines.append(
            f"config on disk is invalid, every call is refused (exit 78): {screen.line(disk['error'], full=True)}; "
            "fix it: mcp-brokerctl edit config (or check)"
        )
    stale = [s for s in disk.get("stale") or [] if isinstance(s, dict)]
    if stale:
        files = sorted({str(s.get("file")) for s in stale})
        what = "; ".join(f"{s.get('what')}" for s in stale)
        lines.append(f"config changed on disk: {', '.join(files)} ({what}); run mcp-brokerctl reload")
    return lines


def audit_trail_lines(trail: Any) -> list[str]:
    """``status``'s audit trail line: files kept, free space, days left, the syslog mirror; then its warnings."""
    if not isinstance(trail, dict):
        return []  # an older daemon
    parts = [
        f"{trail.get('files')} file(s) kept (audit_keep {trail.get('keep')}, audit_keep_days {trail.get('keep_days')})"
    ]
    free = trail.get("free_bytes")
    if isinstance(free, int):
        parts.append(f"{free / 1024**3:.1f} GiB free")
    rate = trail.get("bytes_per_day")
    if isinstance(rate, int | float):
        days = trail.get("days_left")
        parts.append(f"{rate / 1024**2:.1f} MiB/day" + (f", full in ~{days} days" if days is not None else ""))
    parts.append(f"syslog {trail.get('syslog', 'off')}")
    return [f"audit trail: {'; '.join(parts)}"] + [f"warning: audit: {w}" for w in trail.get("warnings") or []]


@cli.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Re-read config and servers without dropping unchanged sessions (new servers get their users first)."""
    from broker.admin.install import Report, install_servers
    from broker.core import agents as agent_map

    paths = _paths(ctx)
    report = Report()
    try:
        install_servers(paths, list(agent_map.load(paths.gate_users)), report)
    except (ConfigError, OSError, PrivsepError) as exc:
        click.echo(f"reload: server users not updated: {exc}", err=True)
    for line in report.lines:
        click.echo(f"reload: {line}")
    result = _admin(paths, "reload")
    click.echo(f"reload: added {result['added']}, removed {result['removed']}, restarted {result['restarted']}")


@cli.command()
@click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for the daemon to exit.")
@click.pass_context
def stop(ctx: click.Context, timeout: float) -> None:
    """Stop the daemon named by the pid file (SIGTERM), and wait for it."""
    from broker.admin import process

    paths = _paths(ctx)
    try:
        pid = process.stop(paths, timeout)
    except PrivsepError as exc:
        raise PrivsepError(f"stop: {exc}", exc.exit_code) from None
    if pid is None:
        raise PrivsepError(f"stop: mcp-brokerd is not running ({paths.pidfile} names no live daemon)", EX_FAILED)
    click.echo(f"stop: mcp-brokerd (pid {pid}) stopped")


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Include decided and used approvals (an expired one is removed).")
@click.option("--full", is_flag=True, help="Show every argument whole (a long value is cut otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def approvals(ctx: click.Context, show_all: bool, full: bool, as_json: bool) -> None:
    """List approval requests (pending ones by default), with their arguments, one a line."""
    result = _admin(_paths(ctx), "approvals", status=None if show_all else "pending")
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=True))
        return
    if not result:
        click.echo("approvals: none pending" if not show_all else "approvals: none")
    for a in result:
        expires = time.strftime("%H:%M:%S", time.localtime(a["expires"]))
        click.echo(
            f"{screen.text(a['id'])}  {a['status']:<8} {screen.name(a['caller'])} -> {screen.name(a['action'])}"
            f"  (expires {expires})"
        )
        _echo_args(a["args"], full, "--full shows all")


def _echo_args(args: Any, full: bool, more: str) -> None:
    """An approval's arguments under it: one aligned ``key = value`` line each, cut unless ``full``."""
    for line in screen.kv_lines(args, full=full, more=more) or ["(no arguments)"]:
        click.echo(f"          {line}")


@cli.command()
@click.argument("approval_id", metavar="ID")
@click.pass_context
def approve(ctx: click.Context, approval_id: str) -> None:
    """Approve a pending call (single use, bound to its exact arguments)."""
    a = _admin(_paths(ctx), "approve", id=approval_id)
    click.echo(f"approved {screen.text(a['id'])}: {screen.name(a['caller'])} -> {screen.name(a['action'])}")
    _echo_args(a["args"], False, "'approvals --all --full' shows all")


@cli.command()
@click.argument("approval_id", metavar="ID")
@click.pass_context
def reject(ctx: click.Context, approval_id: str) -> None:
    """Reject a pending call; the agent gets exit 77."""
    a = _admin(_paths(ctx), "reject", id=approval_id)
    click.echo(f"rejected {screen.text(a['id'])}: {screen.name(a['caller'])} -> {screen.name(a['action'])}")


@cli.command()
@click.argument("user")
@click.pass_context
def unfreeze(ctx: click.Context, user: str) -> None:
    """Lift a freeze caused by repeated denials, and reset the count."""
    result = _admin(_paths(ctx), "unfreeze", caller=user)
    click.echo(f"unfreeze: {user} " + ("unfrozen" if result["unfrozen"] else "was not frozen"))


@cli.command()
@click.argument("user")
@click.argument("action", metavar="SERVER.TOOL")
@click.argument("pairs", nargs=-1, metavar="[k=v ...]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def explain(ctx: click.Context, user: str, action: str, pairs: tuple[str, ...], as_json: bool) -> None:
    """Say what a call by USER would meet and why, without calling anything."""
    kv = []
    for item in pairs:
        pair = names.split_kv(item)
        if pair is None:
            raise UsageError(f"expected key=value or key:value, got {item!r}")
        kv.append(list(pair))
    result = _admin(_paths(ctx), "explain", caller=user, tool=action, kv=kv)
    if as_json:
        click.echo(json.dumps(result, indent=2, ensure_ascii=True))
        return
    for s in result["steps"]:
        click.echo(f"{s['check']:<10} {s['verdict']:<20} {screen.line(s['why'], more=_JSON_MORE)}")
    click.echo(f"verdict: {screen.text(result['verdict'])}")


# --- tools, allow, deny, import, doctor -------------------------------------------------------


def _target(paths: Paths, user: str | None) -> tuple[str, str]:
    """(allowlist path, header for a new file) for the global list or USER's own."""
    from broker.admin import allowlist_edit as admin_edit

    if user is None:
        return paths.allowlist, admin_edit.GLOBAL_FILE_HEADER
    if not names.valid_user_name(user):
        raise UsageError(f"--user {user!r}: not a valid user name")
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise PrivsepError(f"--user {user}: no such user", EX_NOUSER) from None
    return paths.user_allowlist(user), admin_edit.USER_FILE_HEADER.format(user=user)


# --- tools ------------------------------------------------------------------------------------

#: columns of a tool's description the ``tools`` table shows without --full
DESCRIPTION_COLUMNS = 120


def _annotation_text(tool: dict[str, Any]) -> str:
    from broker.admin.allowlist_edit import annotation

    ro = annotation(tool, "readOnlyHint")
    destructive = annotation(tool, "destructiveHint")
    words = []
    if ro:
        words.append("read-only")
    elif destructive is True:
        words.append("destructive")
    elif destructive is False:
        words.append("not-destructive")
    if annotation(tool, "idempotentHint"):
        words.append("idempotent")
    if annotation(tool, "openWorldHint"):
        words.append("open-world")
    return ",".join(words) or "-"


def tool_rows(
    offered: dict[str, list[dict[str, Any]]], allowed: set[str], pins: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """One row per offered tool: allowed or denied, pin state, annotations."""
    pin_state = {p["action"]: p["state"] for p in pins}
    rows = []
    for server, entries in offered.items():
        for t in entries:
            action = f"{server}.{t['name']}"
            state = pin_state.get(action)
            rows.append(
                {
                    "server": server,
                    "tool": t["name"],
                    "action": action,
                    "allowed": action in allowed,
                    "pin": "unpinned" if state is None else "pinned" if state == "ok" else state,
                    "annotations": t.get("annotations") or {},
                    "flags": _annotation_text(t),
                    "description": t.get("description", ""),
                }
            )
    return rows


def _allowed_set(paths: Paths, user: str | None) -> tuple[set[str], str, str | None]:
    """(allowed actions, the file they come from, a problem that denies everything or None)."""
    from broker.core import allowlist

    try:
        if user is not None:
            found = allowlist.load(paths.allowlist, paths.allowlist_d, user)
        else:
            found = allowlist.from_bytes(_read_global(paths), paths.allowlist)
    except ConfigError as exc:
        return set(), paths.allowlist if user is None else "?", exc.message
    return set(found.actions), found.path, None


def _read_global(paths: Paths) -> bytes:
    from broker.admin import allowlist_edit as admin_edit

    data, _st = admin_edit.read_current(paths.allowlist)
    if data is None:
        raise ConfigError(f"{paths.allowlist}: missing; denying every call")
    return data


def _user_files(paths: Paths) -> list[str]:
    try:
        return sorted(n[:-4] for n in os.listdir(paths.allowlist_d) if n.endswith(".txt") and not n.startswith("."))
    except OSError:
        return []


@cli.command()
@click.argument("server", required=False)
@click.option("--user", metavar="USER", help="Allowed/denied as USER sees it (their allowed-actions.d file, if any).")
@click.option("--full", is_flag=True, help="Show whole descriptions and names (a long one is cut otherwise).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def tools(ctx: click.Context, server: str | None, user: str | None, full: bool, as_json: bool) -> None:
    """Every tool each server offers: allowed or denied, pinned, annotations."""
    paths = _paths(ctx)
    offered = _admin(paths, "tools", server=server)
    status = _admin(paths, "status")
    pins = _admin(paths, "pins")
    if user is not None:
        _target(paths, user)  # validates the name and that the user exists
    allowed, source, problem = _allowed_set(paths, user)
    rows = tool_rows(offered, allowed, pins)
    if as_json:
        listing = {"allowlist": source, "allowlist_error": problem, "tools": rows}
        click.echo(json.dumps(listing, indent=2, ensure_ascii=True))
        return
    if problem:
        click.echo(f"mcp-brokerctl: WARNING: {problem} (every call is denied until fixed)", err=True)
    per_user = _user_files(paths)
    line = f"allowlist: {source}"
    if user is None and per_user:
        line += f"  (allowed-actions.d/ replaces it for: {', '.join(per_user)}; see 'tools --user USER')"
    click.echo(line)
    states: dict[str, dict[str, Any]] = {}
    for st in status.get("servers", []):
        states.setdefault(st.get("server", st["name"]), st)  # a per-caller server: its first instance
    # tool names and descriptions are the servers' own words: shown only through screen (defanged, cut)
    actions = {r["action"]: screen.name(r["action"], full=full) for r in rows}
    width = max((len(shown) for shown in actions.values()), default=10)
    flags = max((len(r["flags"]) for r in rows), default=1)
    for name, entries in offered.items():
        s = states.get(name, {})
        reason = f" ({screen.line(s['reason'], full=full)})" if s.get("reason") else ""
        click.echo(
            f"{screen.name(name)} [{s.get('transport', '?')}, {s.get('state', '?')}{reason}]: {len(entries)} tools"
        )
        for sandbox_line in sandbox_view.lines(s):
            click.echo(sandbox_line)
        for r in (r for r in rows if r["server"] == name):
            mark = "allowed" if r["allowed"] else "denied "
            pin = {"changed": "CHANGED", "unreviewed": "UNREVIEWED"}.get(r["pin"], r["pin"])
            description = screen.text(r["description"], DESCRIPTION_COLUMNS, full)
            click.echo(f"  {mark}  {pin:<10} {r['flags']:<{flags}}  {actions[r['action']]:<{width}}  {description}")
        for tool, why in (s.get("hidden") or {}).items():
            shown = screen.name(f"{name}.{tool}", full=full)
            click.echo(f"  not offered  {shown}  ({screen.line(why, full=full)})")
    waiting = [r["action"] for r in rows if r["allowed"] and r["pin"] == "unreviewed"]
    if waiting:
        click.echo(
            f"pins: {len(waiting)} allowed tool(s) not reviewed yet (blocked unless pin = \"first-use\"): "
            f"mcp-brokerctl pins accept {' '.join(screen.name(a) for a in waiting[:5])}"
        )
    changed = [r["action"] for r in rows if r["pin"] == "changed"]
    if changed:
        click.echo(
            f"pins: {len(changed)} changed definition(s) block calls: "
            f"mcp-brokerctl pins accept {screen.name(changed[0])}"
        )


# --- allow / deny ------------------------------------------------------------------------------


def _print_edit(result: Any, verb: str) -> None:
    for note in result.notes:
        click.echo(f"note: {note}")
    if result.created:
        click.echo(f"created {result.path}")
    for action in result.done:
        click.echo(f"{verb} {action} in {result.path}")
    for line in result.removed_lines:
        click.echo(f"  removed line: {line}")
    already = "already allowed" if verb == "allowed" else "not allowed there (nothing to deny)"
    for action in result.unchanged:
        click.echo(f"{action}: {already} in {result.path}; unchanged")
    if not result.changed:
        click.echo(f"{result.path}: unchanged")


@cli.command()
@click.argument("actions", nargs=-1, required=True, metavar="SERVER.TOOL...")
@click.option(
    "--read-only",
    "read_only",
    is_flag=True,
    help="Arguments are SERVER names: allow every tool they annotate readOnlyHint: true.",
)
@click.option("--user", metavar="USER", help="Edit allowed-actions.d/USER.txt (USER's whole allowlist) instead.")
@click.option("--no-pin", "no_pin", is_flag=True, help="Only edit the allowlist; review the definitions later.")
@click.option("--full", is_flag=True, help="Show long lines of the definitions whole.")
@click.pass_context
def allow(
    ctx: click.Context, actions: tuple[str, ...], read_only: bool, user: str | None, no_pin: bool, full: bool
) -> None:
    """Allow tools: edit the allowlist atomically, keeping comments and order; show and pin their definitions.

    'SERVER.*' (or any pattern on the tool name) expands to the tools the
    server offers now, written one per line: the file never holds a wildcard.
    Each newly allowed tool's definition, as the server offers it now, is
    printed and pinned: what is pinned is what was shown (a changed
    definition is left for 'pins accept'). Without a running broker the
    tools stay unreviewed, and are blocked until 'pins accept' (unless their
    server has pin = "first-use").
    """
    from broker.admin import allowlist_edit as admin_edit

    paths = _paths(ctx)
    path, header = _target(paths, user)
    wanted: list[str] = []
    offered: dict[str, list[dict[str, Any]]] | None = None
    if read_only or any(admin_edit.is_pattern(a) for a in actions):
        offered = _admin(paths, "tools", server=None)
    if read_only:
        for server in actions:
            found = admin_edit.read_only_tools(server, offered or {})
            if not found:
                raise PrivsepError(f"--read-only {server}: the server annotates none of its tools read-only", EX_FAILED)
            click.echo(f"{server} read-only -> {', '.join(found)}")
            wanted.extend(found)
    else:
        exact = [a for a in actions if not admin_edit.is_pattern(a)]
        admin_edit.check_actions(exact)
        for a in actions:
            if admin_edit.is_pattern(a):
                found, lines = admin_edit.expand([a], offered or {})
                for line in lines:
                    click.echo(line)
                wanted.extend(found)
            else:
                wanted.append(a)
        if exact:
            _warn_unoffered(paths, exact, offered)
    existed = os.path.exists(path)
    result = admin_edit.allow(path, wanted, header)
    _print_edit(result, "allowed")
    if not no_pin:
        _pin_allowed(paths, [*result.done, *result.unchanged], full)
    if user is not None and not existed and result.created:
        click.echo(
            f"note: {path} replaces {paths.allowlist} for {user}: {user} may now call only what it lists",
            err=True,
        )


def _pin_allowed(paths: Paths, actions: list[str], full: bool) -> None:
    """Show and pin each allowed tool nobody reviewed yet (broker.admin.pins_cli.review)."""
    from broker.admin.pins_cli import review

    def admin(op: str, **fields: Any) -> Any:
        return _admin(paths, op, **fields)

    for action in actions:
        try:
            click.echo(review(admin, action, full, ask=False, only_new=True))
        except PrivsepError as exc:
            click.echo(f"note: {action}: not pinned ({exc.message}); later: 'pins accept {action}'", err=True)
            if exc.exit_code == 69:  # the broker is not answering: the others would fail the same way
                break


def _warn_unoffered(paths: Paths, actions: list[str], offered: dict[str, list[dict[str, Any]]] | None) -> None:
    """A typo guard: say so when a server does not offer a tool now (never fuzzy-matches)."""
    if offered is None:
        try:
            offered = _admin(paths, "tools", server=None)
        except PrivsepError:
            click.echo("note: the broker is not answering; tool names were not checked against the servers", err=True)
            return
    assert offered is not None
    for a in actions:
        server, _, tool = a.partition(".")
        if server not in offered:
            click.echo(f"note: {a}: no server named {server} is configured now", err=True)
        elif tool not in {t["name"] for t in offered[server]}:
            click.echo(f"note: {a}: server {server} does not offer a tool named {tool} now", err=True)


@cli.command()
@click.argument("actions", nargs=-1, required=True, metavar="SERVER.TOOL...")
@click.option("--user", metavar="USER", help="Edit allowed-actions.d/USER.txt instead.")
@click.pass_context
def deny(ctx: click.Context, actions: tuple[str, ...], user: str | None) -> None:
    """Deny tools: remove their lines from the allowlist (atomically; comments and order kept).

    'SERVER.*' removes every entry of that server the file holds.
    """
    from broker.admin import allowlist_edit as admin_edit

    paths = _paths(ctx)
    path, _header = _target(paths, user)
    if user is not None and not os.path.exists(path):
        raise PrivsepError(
            f"{path} does not exist: {user} uses {paths.allowlist}; deny there, or give {user} "
            f"an allowlist of its own with 'allow --user {user}'",
            1,
        )
    result = admin_edit.deny(path, list(actions))
    _print_edit(result, "denied")


# --- import -----------------------------------------------------------------------------------


@cli.command("import")
@click.argument("file", metavar="FILE")
@click.option("--name-prefix", default="", metavar="PREFIX", help="Prepend PREFIX to every imported server name.")
@click.option("--skip", multiple=True, metavar="NAME", help="Leave the server NAME out (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the report and the TOML; write nothing.")
@click.pass_context
def import_(ctx: click.Context, file: str, name_prefix: str, skip: tuple[str, ...], dry_run: bool) -> None:
    """Import an mcporter, Claude Desktop, Cursor or OpenClaw config (only the FILE named).

    Servers go to servers.d/imported.toml, their secrets to secrets/NAME.env;
    the report says what moved where and never prints a secret.
    """
    from broker.admin import importer

    paths = _paths(ctx)
    try:
        plan = importer.plan(file, paths, name_prefix, skip)
    except ImportProblem as exc:
        if len(exc.problems) == 1:
            raise PrivsepError(f"import: {exc.problems[0]}", exc.exit_code) from None
        for p in exc.problems:
            click.echo(f"mcp-brokerctl: import: {p}", err=True)
        raise PrivsepError(f"import: {exc.message}", exc.exit_code) from None
    for line in importer.report(plan):
        click.echo(line)
    if dry_run:
        click.echo(f"dry run: would write {plan.toml_path}:")
        click.echo(importer.toml_text(plan), nl=False)
        for s in plan.servers:
            keys = ", ".join(e.key for e in s.env) or "no keys"
            click.echo(f"dry run: would write {s.table['env_file']} (root 0600): {keys}")
        return
    for line in importer.write(plan, paths):
        click.echo(f"wrote {line}")
    from broker.admin.check import check_warnings

    problems = check_all(paths)
    for p in problems:
        click.echo(f"check: {p}", err=True)
    for w in check_warnings(paths):
        click.echo(f"check: warning: {w}", err=True)
    names = " ".join(s.name for s in plan.servers)
    if problems:
        raise PrivsepError(f"import: written, but 'mcp-brokerctl check' finds {len(problems)} problem(s)", EX_FAILED)
    click.echo(f"next: mcp-brokerctl reload; mcp-brokerctl tools; mcp-brokerctl allow SERVER.TOOL  (servers: {names})")


# --- doctor -----------------------------------------------------------------------------------


@cli.command()
@click.option(
    "--agent",
    "agents",
    multiple=True,
    metavar="USER",
    help="Also check USER's side (default: the agents in the sudoers drop-in).",
)
@click.option("--quiet", "-q", is_flag=True, help="Print problems and warnings only.")
@click.pass_context
def doctor(ctx: click.Context, agents: tuple[str, ...], quiet: bool) -> None:
    """Check a live installation from outside and as each agent; say what to fix.

    Exit 0 when all is green (warnings allowed), 1 when there is a problem.
    """
    from broker.admin.doctor import Doctor

    paths = _paths(ctx)
    if os.geteuid() != 0:
        raise PrivsepError(
            "doctor must run as root (it reads what agents must not, and runs probes as them)", EX_NOPERM
        )
    doc = Doctor(paths, list(agents), admin=lambda op, **kw: _admin(paths, op, **kw))
    findings = doc.run()
    for f in findings:
        if f.level != "ok" or not quiet:
            click.echo(f.line())
    problems = doc.problems
    warnings = [f for f in findings if f.level == "warning"]
    if problems:
        raise PrivsepError(f"doctor: {len(problems)} problem(s), {len(warnings)} warning(s)", EX_FAILED)
    click.echo(f"doctor: all green ({len(warnings)} warning(s))")


# --- uninstall --------------------------------------------------------------------------------


@cli.command()
@click.option("--purge", is_flag=True, help="Also remove the config, secrets, state and audit log.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask before --purge.")
@click.pass_context
def uninstall(ctx: click.Context, purge: bool, yes: bool) -> None:
    """Remove the sudoers drop-in, stop the daemon, remove the commands.

    Keeps config, secrets, state and the audit log unless --purge. Never
    removes the users mcp-gate and mcp-broker.
    """
    paths = _paths(ctx)
    if os.geteuid() != 0:
        raise PrivsepError("uninstall must run as root", EX_NOPERM)
    if purge and not yes:
        if not sys.stdin.isatty():
            raise UsageError("uninstall --purge deletes the config, secrets and audit log: add --yes to confirm")
        click.confirm(
            f"Delete {paths.etc}, {paths.state} and {paths.log} (secrets and audit log included)?", abort=True
        )
    from broker.admin.uninstall import uninstall_paths

    done, kept = uninstall_paths(paths, purge)
    for line in done:
        click.echo(f"uninstall: {line}")
    for line in kept:
        click.echo(f"uninstall: kept {line}")
    click.echo("uninstall: done")


from broker.admin.audit_reader import audit  # noqa: E402 - command groups of their own, registered like the others
from broker.admin.edit import edit  # noqa: E402
from broker.admin.pins_cli import pins  # noqa: E402
from broker.admin.proposals_cli import proposals  # noqa: E402
from broker.admin.server_install import server as server_group  # noqa: E402

cli.add_command(audit)
cli.add_command(edit)
cli.add_command(pins)
cli.add_command(proposals)
cli.add_command(server_group)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return its exit code."""
    try:
        cli.main(args=argv, prog_name="mcp-brokerctl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("mcp-brokerctl: aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return EX_USAGE if isinstance(exc, click.UsageError) else exc.exit_code
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(f"mcp-brokerctl: {screen.line(p, full=True)}", err=True)
        return exc.exit_code
    except PrivsepError as exc:
        # a daemon's refusal may quote what an agent or a server sent: shown defanged, never cut
        click.echo(f"mcp-brokerctl: {screen.line(str(exc), full=True)}", err=True)
        return exc.exit_code
    except PermissionError as exc:
        click.echo(f"mcp-brokerctl: {exc.filename}: permission denied (run as root)", err=True)
        return EX_NOPERM
    return 0


def entry() -> None:
    sys.exit(main())
