"""``mcp-brokerctl``: the root-only admin CLI (a thin layer over the library).

``main(argv)`` runs in-process for tests; errors become one line on stderr
and an exit code here, at the edge, and nowhere else.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import click

from broker import __version__, admin_cli, allowlist, config, protocol
from broker.errors import ConfigError, PrivsepError
from broker.paths import BROKER_USER, Paths


def _paths(ctx: click.Context) -> Paths:
    return Paths(ctx.obj["root"])


def admin_request(paths: Paths, op: str, timeout: float = 30.0, **fields: Any) -> Any:
    """One request over admin.sock (root only); the daemon's refusal becomes a PrivsepError."""
    from broker.gate import exchange

    answer = exchange(paths.admin_sock, protocol.request(op, **fields), timeout, _broker_uid())
    if not answer.get("ok"):
        code = answer.get("exit")
        raise PrivsepError(str(answer.get("error")), code if isinstance(code, int) else 1)
    return answer.get("result")


def _broker_uid() -> int | None:
    import pwd

    try:
        return pwd.getpwnam(BROKER_USER).pw_uid
    except KeyError:
        return None


def _alive(pid: int) -> bool:
    """Whether ``pid`` still runs; an exited process its parent has not reaped (a zombie) does not."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state not in ("Z", "X")


def check_all(paths: Paths) -> list[str]:
    """Every problem in the allowlists and the daemon config (offline)."""
    problems = allowlist.check_all(paths.allowlist, paths.allowlist_d)
    try:
        config.load(paths)
    except ConfigError as exc:
        problems.extend(exc.problems)
    return problems


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
    from broker.install import install as do_install

    report = do_install(_paths(ctx), list(agents), venv)
    for line in report.lines:
        click.echo(line)
    click.echo("install: done")


@cli.command()
@click.pass_context
def check(ctx: click.Context) -> None:
    """Validate allowlists and config offline (exit 0 valid, 1 invalid)."""
    paths = _paths(ctx)
    problems = check_all(paths)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise PrivsepError(f"check: {len(problems)} problem(s)", 1)
    click.echo(f"check: {paths.etc} is valid")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Ask the running daemon how it is (exit 0 when it answers)."""
    result = admin_request(_paths(ctx), "status")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(
        f"broker: {result['broker']} (pid {result['pid']}, version {result['version']}, "
        f"up {result['uptime_s']} s, audit {result['audit']})"
    )
    for s in result["servers"]:
        reason = f" ({s['reason']})" if s.get("reason") else ""
        click.echo(
            f"server {s['name']} [{s['transport']}]: {s['state']}{reason}, {s['tools']} tools, {s['restarts']} restarts"
        )


@cli.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Re-read config and servers without dropping unchanged sessions."""
    result = admin_request(_paths(ctx), "reload")
    click.echo(f"reload: added {result['added']}, removed {result['removed']}, restarted {result['restarted']}")


@cli.command()
@click.option("--timeout", default=15.0, show_default=True, help="Seconds to wait for the daemon to exit.")
@click.pass_context
def stop(ctx: click.Context, timeout: float) -> None:
    """Stop the daemon named by the pid file (SIGTERM), and wait for it."""
    import signal
    import time

    paths = _paths(ctx)
    try:
        with open(paths.pidfile, encoding="ascii") as fh:
            pid = int(fh.read().strip() or "0")
    except (FileNotFoundError, ValueError):
        raise PrivsepError("stop: mcp-brokerd is not running (no pid file)", 1) from None
    if pid <= 1:
        raise PrivsepError(f"stop: {paths.pidfile} holds no usable pid", 1)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
    except FileNotFoundError:
        raise PrivsepError(f"stop: mcp-brokerd is not running (stale pid file {paths.pidfile})", 1) from None
    if b"mcp-brokerd" not in cmdline:
        raise PrivsepError(f"stop: pid {pid} from {paths.pidfile} is not mcp-brokerd; not signalling it", 1)
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        raise PrivsepError(f"stop: mcp-brokerd is not running (stale pid file {paths.pidfile})", 1) from None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _alive(pid):
            click.echo(f"stop: mcp-brokerd (pid {pid}) stopped")
            return
        time.sleep(0.05)
    raise PrivsepError(f"stop: mcp-brokerd (pid {pid}) did not exit within {timeout:g} s", 75)


@cli.command()
@click.option("--all", "show_all", is_flag=True, help="Include decided, used and expired approvals.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def approvals(ctx: click.Context, show_all: bool, as_json: bool) -> None:
    """List approval requests (pending ones by default), with their arguments."""
    result = admin_request(_paths(ctx), "approvals", status=None if show_all else "pending")
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if not result:
        click.echo("approvals: none pending" if not show_all else "approvals: none")
    for a in result:
        expires = time.strftime("%H:%M:%S", time.localtime(a["expires"]))
        click.echo(f"{a['id']}  {a['status']:<8} {a['caller']} -> {a['action']}  (expires {expires})")
        click.echo(f"          args: {json.dumps(a['args'], ensure_ascii=False)}")


@cli.command()
@click.argument("approval_id", metavar="ID")
@click.pass_context
def approve(ctx: click.Context, approval_id: str) -> None:
    """Approve a pending call (single use, bound to its exact arguments)."""
    a = admin_request(_paths(ctx), "approve", id=approval_id)
    click.echo(f"approved {a['id']}: {a['caller']} -> {a['action']} {json.dumps(a['args'], ensure_ascii=False)}")


@cli.command()
@click.argument("approval_id", metavar="ID")
@click.pass_context
def reject(ctx: click.Context, approval_id: str) -> None:
    """Reject a pending call; the agent gets exit 77."""
    a = admin_request(_paths(ctx), "reject", id=approval_id)
    click.echo(f"rejected {a['id']}: {a['caller']} -> {a['action']}")


@cli.command()
@click.argument("user")
@click.pass_context
def unfreeze(ctx: click.Context, user: str) -> None:
    """Lift a freeze caused by repeated denials, and reset the count."""
    result = admin_request(_paths(ctx), "unfreeze", caller=user)
    click.echo(f"unfreeze: {user} " + ("unfrozen" if result["unfrozen"] else "was not frozen"))


@cli.group(invoke_without_command=True)
@click.pass_context
def pins(ctx: click.Context) -> None:
    """Tool-definition pins: list them, or accept a changed definition."""
    if ctx.invoked_subcommand is None:
        for p in admin_request(_paths(ctx), "pins"):
            click.echo(f"{p['state']:<16} {p['action']}  {p['hash'][:16]}")


@pins.command("accept")
@click.argument("action", metavar="SERVER.TOOL")
@click.pass_context
def pins_accept(ctx: click.Context, action: str) -> None:
    """Show the diff of a tool's definition and pin what the server offers now."""
    result = admin_request(_paths(ctx), "pin_accept", action=action)
    if result["diff"]:
        click.echo(result["diff"], nl=False)
    click.echo(f"pins: {action} pinned at {result['hash'][:16]}" + ("" if result["changed"] else " (unchanged)"))


@cli.command()
@click.argument("user")
@click.argument("action", metavar="SERVER.TOOL")
@click.argument("pairs", nargs=-1, metavar="[k=v ...]")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def explain(ctx: click.Context, user: str, action: str, pairs: tuple[str, ...], as_json: bool) -> None:
    """Say what a call by USER would meet and why, without calling anything."""
    from broker.gate import _split_kv

    kv = [list(_split_kv(p)) for p in pairs]
    result = admin_request(_paths(ctx), "explain", caller=user, tool=action, kv=kv)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    for s in result["steps"]:
        click.echo(f"{s['check']:<10} {s['verdict']:<20} {s['why']}")
    click.echo(f"verdict: {result['verdict']}")


from broker.admin_audit import audit  # noqa: E402 - its own module, registered after the core commands

cli.add_command(audit)


cli.add_command(admin_cli.tools)
cli.add_command(admin_cli.allow)
cli.add_command(admin_cli.deny)
cli.add_command(admin_cli.import_)
cli.add_command(admin_cli.doctor)
cli.add_command(admin_cli.uninstall)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return its exit code."""
    try:
        cli.main(args=argv, prog_name="mcp-brokerctl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("mcp-brokerctl: aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return 64 if isinstance(exc, click.UsageError) else exc.exit_code
    except ConfigError as exc:
        for p in exc.problems:
            click.echo(f"mcp-brokerctl: {p}", err=True)
        return 78
    except PrivsepError as exc:
        click.echo(f"mcp-brokerctl: {exc}", err=True)
        return exc.exit_code
    except PermissionError as exc:
        click.echo(f"mcp-brokerctl: {exc.filename}: permission denied (run as root)", err=True)
        return 77
    return 0


def entry() -> None:
    sys.exit(main())
