"""Operator commands of ``mcp-brokerctl``: tools, allow, deny, import, doctor, uninstall.

Thin click layers over :mod:`broker.admin_edit`, :mod:`broker.importer` and
:mod:`broker.doctor`; ``broker.ctl`` registers them on its ``cli`` group.
Library modules and ``broker.ctl`` (for ``admin_request``) are imported
inside the commands: ``broker.ctl`` imports this module, and a command that
is not run costs nothing.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from typing import Any

import click

from broker.errors import ConfigError, PrivsepError, UsageError
from broker.paths import BROKER_USER, GATE_USER, Paths

EX_NOUSER = 67


def _paths(ctx: click.Context) -> Paths:
    return Paths(ctx.obj["root"])


def _admin(paths: Paths, op: str, **fields: Any) -> Any:
    from broker.ctl import admin_request

    return admin_request(paths, op, **fields)


def _target(paths: Paths, user: str | None) -> tuple[str, str]:
    """(allowlist path, header for a new file) for the global list or USER's own."""
    from broker import admin_edit, allowlist

    if user is None:
        return paths.allowlist, admin_edit.GLOBAL_FILE_HEADER
    if not allowlist.valid_user_name(user):
        raise UsageError(f"--user {user!r}: not a valid user name")
    try:
        pwd.getpwnam(user)
    except KeyError:
        raise PrivsepError(f"--user {user}: no such user", EX_NOUSER) from None
    return paths.user_allowlist(user), admin_edit.USER_FILE_HEADER.format(user=user)


# --- tools ------------------------------------------------------------------------------------


def _annotation_text(tool: dict[str, Any]) -> str:
    from broker.admin_edit import annotation

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
    from broker import allowlist

    try:
        if user is not None:
            found = allowlist.load(paths.allowlist, paths.allowlist_d, user)
        else:
            found = allowlist.from_bytes(_read_global(paths), paths.allowlist)
    except ConfigError as exc:
        return set(), paths.allowlist if user is None else "?", exc.message
    return set(found.actions), found.path, None


def _read_global(paths: Paths) -> bytes:
    from broker import admin_edit

    data, _st = admin_edit.read_current(paths.allowlist)
    if data is None:
        raise ConfigError(f"{paths.allowlist}: missing; denying every call")
    return data


def _user_files(paths: Paths) -> list[str]:
    try:
        return sorted(n[:-4] for n in os.listdir(paths.allowlist_d) if n.endswith(".txt") and not n.startswith("."))
    except OSError:
        return []


@click.command()
@click.argument("server", required=False)
@click.option("--user", metavar="USER", help="Allowed/denied as USER sees it (their allowed-actions.d file, if any).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def tools(ctx: click.Context, server: str | None, user: str | None, as_json: bool) -> None:
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
        click.echo(json.dumps({"allowlist": source, "allowlist_error": problem, "tools": rows}, indent=2))
        return
    if problem:
        click.echo(f"mcp-brokerctl: WARNING: {problem} (every call is denied until fixed)", err=True)
    per_user = _user_files(paths)
    line = f"allowlist: {source}"
    if user is None and per_user:
        line += f"  (allowed-actions.d/ replaces it for: {', '.join(per_user)}; see 'tools --user USER')"
    click.echo(line)
    states = {s["name"]: s for s in status.get("servers", [])}
    width = max((len(r["action"]) for r in rows), default=10)
    flags = max((len(r["flags"]) for r in rows), default=1)
    for name, entries in offered.items():
        s = states.get(name, {})
        reason = f" ({s['reason']})" if s.get("reason") else ""
        click.echo(f"{name} [{s.get('transport', '?')}, {s.get('state', '?')}{reason}]: {len(entries)} tools")
        for r in (r for r in rows if r["server"] == name):
            mark = "allowed" if r["allowed"] else "denied "
            pin = "CHANGED" if r["pin"] == "changed" else r["pin"]
            click.echo(f"  {mark}  {pin:<9} {r['flags']:<{flags}}  {r['action']:<{width}}  {r['description']}")
    changed = [r["action"] for r in rows if r["pin"] == "changed"]
    if changed:
        click.echo(f"pins: {len(changed)} changed definition(s) block calls: mcp-brokerctl pins accept {changed[0]}")


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


@click.command()
@click.argument("actions", nargs=-1, required=True, metavar="SERVER.TOOL...")
@click.option(
    "--read-only",
    "read_only",
    is_flag=True,
    help="Arguments are SERVER names: allow every tool they annotate readOnlyHint: true.",
)
@click.option("--user", metavar="USER", help="Edit allowed-actions.d/USER.txt (USER's whole allowlist) instead.")
@click.pass_context
def allow(ctx: click.Context, actions: tuple[str, ...], read_only: bool, user: str | None) -> None:
    """Allow tools: edit the allowlist atomically, keeping comments and order.

    'SERVER.*' (or any pattern on the tool name) expands to the tools the
    server offers now, written one per line: the file never holds a wildcard.
    """
    from broker import admin_edit

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
                raise PrivsepError(f"--read-only {server}: the server annotates none of its tools read-only", 1)
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
    if user is not None and not existed and result.created:
        click.echo(
            f"note: {path} replaces {paths.allowlist} for {user}: {user} may now call only what it lists",
            err=True,
        )


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


@click.command()
@click.argument("actions", nargs=-1, required=True, metavar="SERVER.TOOL...")
@click.option("--user", metavar="USER", help="Edit allowed-actions.d/USER.txt instead.")
@click.pass_context
def deny(ctx: click.Context, actions: tuple[str, ...], user: str | None) -> None:
    """Deny tools: remove their lines from the allowlist (atomically; comments and order kept).

    'SERVER.*' removes every entry of that server the file holds.
    """
    from broker import admin_edit

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


@click.command("import")
@click.argument("file", metavar="FILE")
@click.option("--name-prefix", default="", metavar="PREFIX", help="Prepend PREFIX to every imported server name.")
@click.option("--skip", multiple=True, metavar="NAME", help="Leave the server NAME out (repeatable).")
@click.option("--dry-run", is_flag=True, help="Print the report and the TOML; write nothing.")
@click.pass_context
def import_(ctx: click.Context, file: str, name_prefix: str, skip: tuple[str, ...], dry_run: bool) -> None:
    """Import an mcporter, Claude Desktop or Cursor config (only the FILE named).

    Servers go to servers.d/imported.toml, their secrets to secrets/NAME.env;
    the report says what moved where and never prints a secret.
    """
    from broker import importer
    from broker.ctl import check_all

    paths = _paths(ctx)
    try:
        plan = importer.plan(file, paths, name_prefix, skip)
    except importer.ImportProblem as exc:
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
            click.echo(f"dry run: would write {s.table['env_file']} ({BROKER_USER} 0600): {keys}")
        return
    for line in importer.write(plan, paths):
        click.echo(f"wrote {line}")
    problems = check_all(paths)
    for p in problems:
        click.echo(f"check: {p}", err=True)
    names = " ".join(s.name for s in plan.servers)
    if problems:
        raise PrivsepError(f"import: written, but 'mcp-brokerctl check' finds {len(problems)} problem(s)", 1)
    click.echo(f"next: mcp-brokerctl reload; mcp-brokerctl tools; mcp-brokerctl allow SERVER.TOOL  (servers: {names})")


# --- doctor -----------------------------------------------------------------------------------


@click.command()
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
    from broker.doctor import Doctor

    paths = _paths(ctx)
    if os.geteuid() != 0:
        raise PrivsepError("doctor must run as root (it reads what agents must not, and runs probes as them)", 77)
    doc = Doctor(paths, list(agents), admin=lambda op, **kw: _admin(paths, op, **kw))
    findings = doc.run()
    for f in findings:
        if f.level != "ok" or not quiet:
            click.echo(f.line())
    problems = doc.problems
    warnings = [f for f in findings if f.level == "warning"]
    if problems:
        raise PrivsepError(f"doctor: {len(problems)} problem(s), {len(warnings)} warning(s)", 1)
    click.echo(f"doctor: all green ({len(warnings)} warning(s))")


# --- uninstall --------------------------------------------------------------------------------


def _stop_daemon(paths: Paths, timeout: float = 15.0) -> str:
    """Stop mcp-brokerd (systemd unit, else the pid file); say what happened."""
    if paths.root == "/" and os.path.isdir("/run/systemd/system") and shutil.which("systemctl"):
        proc = subprocess.run(["systemctl", "is-active", "--quiet", "mcp-brokerd"], check=False)
        if proc.returncode == 0:
            subprocess.run(["systemctl", "disable", "--now", "mcp-brokerd"], capture_output=True, check=False)
            return "stopped and disabled the systemd unit mcp-brokerd"
    try:
        with open(paths.pidfile, encoding="ascii") as fh:
            pid = int(fh.read().strip() or "0")
    except (FileNotFoundError, ValueError):
        return "daemon not running (no pid file)"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except FileNotFoundError:
        return "daemon not running (stale pid file)"
    if pid <= 1 or b"mcp-brokerd" not in cmdline:
        raise PrivsepError(f"uninstall: pid {pid} from {paths.pidfile} is not mcp-brokerd; not signalling it", 1)
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            return f"stopped mcp-brokerd (pid {pid})"
        time.sleep(0.05)
    raise PrivsepError(
        f"uninstall: mcp-brokerd (pid {pid}) did not exit within {timeout:g} s; stopped there "
        "(the sudoers drop-in is gone already); run uninstall again",
        75,
    )


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs (an exited process its parent has not reaped yet does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (FileNotFoundError, IndexError):
        return False


def _ours(path: str) -> bool:
    """Whether a command at ``path`` is one 'mcp-brokerctl install' wrote."""
    if os.path.islink(path):
        return os.readlink(path).endswith(("/bin/mcp-brokerd", "/bin/mcp-brokerctl"))
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "generated by 'mcp-brokerctl install'" in fh.read(4096)
    except OSError:
        return False


def _rmtree(path: str) -> bool:
    if not path.rstrip("/").endswith("mcp-privsep") or path.rstrip("/") in ("", "/"):
        raise PrivsepError(f"uninstall: refusing to remove {path!r}", 70)
    if not os.path.lexists(path):
        return False
    shutil.rmtree(path)
    return True


def uninstall_paths(paths: Paths, purge: bool) -> tuple[list[str], list[str]]:
    """Remove what install made; return (lines of what was done, lines of what was kept)."""
    done: list[str] = []
    kept: list[str] = []
    if os.path.lexists(paths.sudoers):
        os.unlink(paths.sudoers)
        done.append(f"removed the sudoers drop-in {paths.sudoers} (agents lost sudo at once)")
    done.append(_stop_daemon(paths))
    for cmd in (paths.mcp, paths.gate, paths.brokerd, paths.brokerctl):
        if not os.path.lexists(cmd):
            continue
        if _ours(cmd):
            os.unlink(cmd)
            done.append(f"removed {cmd}")
        else:
            kept.append(f"{cmd}: not written by 'mcp-brokerctl install'; left alone")
    for d in (paths.run, paths.cache):
        if _rmtree(d):
            done.append(f"removed {d}")
    if purge:
        for d in (paths.etc, paths.state, paths.log):
            if _rmtree(d):
                done.append(f"removed {d}")
    else:
        kept.append(f"config {paths.etc}, state {paths.state}, audit log {paths.log} (remove them with --purge)")
    kept.append(
        f"users {GATE_USER} and {BROKER_USER} (as Debian does for system users; "
        f"'userdel {GATE_USER}; userdel {BROKER_USER}' once no file of theirs is left)"
    )
    kept.append(f"the code's virtualenv (pip/apt manage it; it is {os.path.dirname(os.path.dirname(sys.executable))})")
    return done, kept


@click.command()
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
        raise PrivsepError("uninstall must run as root", 77)
    if purge and not yes:
        if not sys.stdin.isatty():
            raise UsageError("uninstall --purge deletes the config, secrets and audit log: add --yes to confirm")
        click.confirm(
            f"Delete {paths.etc}, {paths.state} and {paths.log} (secrets and audit log included)?", abort=True
        )
    done, kept = uninstall_paths(paths, purge)
    for line in done:
        click.echo(f"uninstall: {line}")
    for line in kept:
        click.echo(f"uninstall: kept {line}")
    click.echo("uninstall: done")


COMMANDS = (tools, allow, deny, import_, doctor, uninstall)
