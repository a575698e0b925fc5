"""``mcp-brokerctl proposals``: the servers agents asked for (``mcp propose``), shown defanged; adopt or reject.

    mcp-brokerctl proposals [--all] [--json] [--offline] [--full]
    mcp-brokerctl proposals adopt ID [--yes]
    mcp-brokerctl proposals reject ID [--reason TEXT]

A proposal is an agent's words: its ``why`` (and the package registry's
metadata shown beside it) may hold escape sequences, bidi overrides or
invisible characters, so everything is printed through
:mod:`broker.admin.screen` (control characters as ``\\x1b``, invisible and
direction-changing ones as ``<U+202E>``, long text cut unless ``--full``);
``--json`` escapes every non-ASCII character. The metadata comes from the
package manager itself (``pip install --dry-run --report``, wheels only, or
``npm view``), run as ``nobody`` when root, in a scratch directory: it reads
the registry and installs and runs nothing (``--offline`` skips it).

``adopt`` runs ``server add`` (:func:`broker.admin.server_install.add_server`)
with its own review, in this process: only root ever installs what an agent
proposed, and only after that review; then it lists the new server's tools
for pin review (``mcp-brokerctl pins accept``). ``reject`` drops the
proposal from the queue. The daemon records every step in the audit trail
(``op`` ``proposal``); this module only shows and asks.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import click

from broker.admin import screen
from broker.core import wire
from broker.core.errors import EX_FAILED, EX_UNAVAILABLE, PrivsepError
from broker.core.paths import BROKER_USER, Paths

#: seconds a registry lookup may take
LOOKUP_SECONDS = 60.0
#: the most a lookup's output may be (pip's report holds the package's whole description)
LOOKUP_BYTES = 16 * 1024 * 1024
#: seconds ``adopt`` waits for the new server to offer its tools
TOOLS_WAIT = 30.0
#: the user a registry lookup runs as when this runs as root
LOOKUP_USER = "nobody"
NOT_AVAILABLE = "server add is not available"

Lookup = Callable[[str, str, str], dict[str, Any]]


def _paths(ctx: click.Context) -> Paths:
    return Paths((ctx.find_root().obj or {}).get("root", "/"))


def _admin(paths: Paths, op: str, **fields: Any) -> Any:
    try:
        broker_uid: int | None = pwd.getpwnam(BROKER_USER).pw_uid
    except KeyError:
        broker_uid = None
    return wire.admin_request(paths.admin_sock, broker_uid, op, 30.0, **fields)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(ts)) if ts else "-"


# --- the package's metadata, from its registry -------------------------------------------------------


def _as_nobody(scratch: str) -> dict[str, Any]:
    """subprocess arguments that drop to :data:`LOOKUP_USER` when running as root (it owns ``scratch`` then)."""
    if os.geteuid() != 0:
        return {}
    try:
        pw = pwd.getpwnam(LOOKUP_USER)
    except KeyError:
        return {}
    os.chown(scratch, pw.pw_uid, pw.pw_gid)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}


def _run_lookup(command: list[str], scratch: str, extra_env: dict[str, str]) -> str:
    env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "LANG": "C.UTF-8", "TMPDIR": scratch, **extra_env}
    try:
        # an argv list of our own, no shell; the package name and version are checked already
        done = subprocess.run(
            command,
            capture_output=True,
            cwd=scratch,
            env=env,
            timeout=LOOKUP_SECONDS,
            check=False,
            stdin=subprocess.DEVNULL,
            **_as_nobody(scratch),
        )
    except subprocess.TimeoutExpired:
        raise PrivsepError(f"no answer within {LOOKUP_SECONDS:g} s") from None
    except OSError as exc:
        raise PrivsepError(f"cannot run {command[0]}: {exc.strerror or exc}") from None
    if len(done.stdout) > LOOKUP_BYTES:
        raise PrivsepError(f"the registry's answer is larger than {LOOKUP_BYTES} bytes")
    if done.returncode != 0:
        said = [ln.strip() for ln in done.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
        # npm's first words say what went wrong (its last ones where its log is); pip's last line does
        said = [ln for ln in said if "complete log" not in ln and not ln.startswith("npm error code")]
        pick = (said[0] if "npm" in os.path.basename(command[0]) else said[-1]) if said else ""
        raise PrivsepError(pick or f"{command[0]} exited with {done.returncode}")
    return str(done.stdout.decode("utf-8", "replace"))


def _pip_metadata(package: str, version: str, scratch: str) -> dict[str, Any]:
    command = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-deps", "--ignore-installed"]
    command += ["--only-binary=:all:", "--no-cache-dir", "--report", "-", f"{package}=={version}"]
    out = _run_lookup(command, scratch, {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"})
    try:
        found = json.loads(out)["install"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        raise PrivsepError("pip gave no report of the package") from None
    meta = found.get("metadata") or {}
    download = found.get("download_info") or {}
    hashes = (download.get("archive_info") or {}).get("hashes") or {}
    urls = meta.get("project_url") or []
    return {
        "name": meta.get("name"),
        "version": meta.get("version"),
        "summary": meta.get("summary"),
        "license": meta.get("license_expression") or meta.get("license"),
        "author": meta.get("author") or meta.get("author_email"),
        "home": meta.get("home_page") or (urls[0] if isinstance(urls, list) and urls else None),
        "requires_python": meta.get("requires_python"),
        "dependencies": len(meta.get("requires_dist") or []),
        "artifact": download.get("url"),
        "sha256": hashes.get("sha256"),
    }


def _npm_metadata(package: str, version: str, scratch: str) -> dict[str, Any]:
    npm = shutil.which("npm", path="/usr/local/bin:/usr/bin:/bin")
    if npm is None:
        raise PrivsepError("npm is not installed")
    extra = {"npm_config_cache": f"{scratch}/cache", "npm_config_update_notifier": "false", "NO_COLOR": "1"}
    out = _run_lookup([npm, "view", "--json", f"{package}@{version}"], scratch, extra)
    if not out.strip():
        raise PrivsepError(f"the registry has no version {version} of {package}")
    try:
        meta = json.loads(out)
    except ValueError:
        raise PrivsepError("npm's answer is not JSON") from None
    if isinstance(meta, list):  # several versions matched: the pin is exact, so this is not expected
        meta = meta[-1] if meta else {}
    if not isinstance(meta, dict):
        raise PrivsepError("npm's answer is not a package")
    dist = meta.get("dist") or {}
    repo = meta.get("repository")
    scripts = meta.get("scripts") or {}
    scripts = scripts if isinstance(scripts, dict) else {}
    hooks = [s for s in ("preinstall", "install", "postinstall", "prepare") if s in scripts]
    return {
        "name": meta.get("name"),
        "version": meta.get("version"),
        "summary": meta.get("description"),
        "license": meta.get("license"),
        "home": meta.get("homepage") or (repo.get("url") if isinstance(repo, dict) else repo),
        "dependencies": len(meta.get("dependencies") or {}),
        "install_scripts": ", ".join(hooks) or "none",
        "artifact": dist.get("tarball"),
        "integrity": dist.get("integrity"),
    }


def lookup(manager: str, package: str, version: str) -> dict[str, Any]:
    """What the package's registry says of this exact version, or ``{"error": why}``; never raises."""
    scratch = tempfile.mkdtemp(prefix="mcp-privsep-lookup-")
    try:
        if manager == "pip":
            return _pip_metadata(package, version, scratch)
        if manager == "npm":
            return _npm_metadata(package, version, scratch)
        return {"error": f"unknown package manager {manager}"}
    except PrivsepError as exc:
        return {"error": exc.message}
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# --- showing a proposal ---------------------------------------------------------------------------


def _spec(p: dict[str, Any]) -> str:
    return f"{p['manager']} {p['spec']}"


def show(p: dict[str, Any], full: bool, configured: set[str] | None = None) -> list[str]:
    """A proposal as lines for a terminal: every value an agent or a registry wrote, defanged and cut."""
    head = (
        f"proposal {screen.text(p['id'])}  {screen.text(p['status'])}  from {screen.name(p['caller'])}, "
        f"{_when(p.get('created'))}"
    )
    fields: dict[str, Any] = {
        "server": p["name"],
        "package": _spec(p),
        "tools": ", ".join(p.get("tools") or []) or "(none named)",
        "why": p.get("why") or "(none given)",
    }
    if p.get("status") != "pending":
        fields["decided"] = f"{_when(p.get('decided'))} by {p.get('decided_by') or '?'}"
        if p.get("note"):
            fields["note"] = p["note"]
    registry = p.get("registry")
    if isinstance(registry, dict):
        if registry.get("error"):
            fields["registry"] = f"lookup failed: {registry['error']}"
        else:
            for key in ("name", "version", "summary", "license", "author", "home", "requires_python"):
                if registry.get(key):
                    fields[key if key not in ("name", "version") else f"registry {key}"] = registry[key]
            for key in ("dependencies", "install_scripts", "artifact", "sha256", "integrity"):
                if registry.get(key) is not None:
                    fields[key] = registry[key]
    lines = [head] + [f"  {row}" for row in screen.kv_lines(fields, full=full, limit=200 if not full else 4000)]
    if configured is not None and p["name"] in configured:
        lines.append(f"  note: a server named {screen.name(p['name'])} is configured already")
    if p.get("status") == "pending":
        pid = screen.text(p["id"])
        lines.append(f"  adopt: mcp-brokerctl proposals adopt {pid}   reject: mcp-brokerctl proposals reject {pid}")
    return lines


def _configured(paths: Paths) -> set[str] | None:
    with contextlib.suppress(PrivsepError):
        status = _admin(paths, "status")
        return {str(s.get("server", s.get("name"))) for s in status.get("servers", [])}
    return None


#: what the listing looks packages up with (tests replace it)
LOOKUP: list[Lookup] = [lookup]


@click.group(invoke_without_command=True)
@click.option("--all", "show_all", is_flag=True, help="Also show adopted and rejected proposals.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (every non-ASCII character escaped).")
@click.option("--offline", is_flag=True, help="Do not look the packages up in their registry.")
@click.option("--full", is_flag=True, help="Show long values whole.")
@click.pass_context
def proposals(ctx: click.Context, show_all: bool, as_json: bool, offline: bool, full: bool) -> None:
    """Servers agents asked for with 'mcp propose' (pending ones by default), with their registry's metadata.

    Nothing an agent proposes is installed or run before an operator adopts it
    ('proposals adopt ID', which runs 'server add' and its review).
    """
    if ctx.invoked_subcommand is not None:
        return
    paths = _paths(ctx)
    rows: list[dict[str, Any]] = _admin(paths, "proposals", status=None if show_all else "pending")
    if not offline:
        seen: dict[tuple[str, str, str], dict[str, Any]] = {}
        for p in rows:
            if p.get("status") == "pending":
                key = (p["manager"], p["package"], p["version"])
                if key not in seen:
                    seen[key] = LOOKUP[0](*key)
                p["registry"] = seen[key]
    if as_json:
        click.echo(json.dumps(rows, indent=2, ensure_ascii=True))
        return
    if not rows:
        click.echo("proposals: none pending" if not show_all else "proposals: none")
        return
    configured = _configured(paths)
    for p in rows:
        for line in show(p, full, configured):
            click.echo(line)


def _find(paths: Paths, proposal_id: str) -> dict[str, Any]:
    for p in _admin(paths, "proposals", status=None):
        if p["id"] == proposal_id:
            return dict(p)
    raise PrivsepError(f"proposals: no proposal {screen.text(proposal_id)} (mcp-brokerctl proposals --all)", EX_FAILED)


def server_add() -> Callable[..., Any] | None:
    """``server add`` (:func:`broker.admin.server_install.add_server`), where this installation has it."""
    try:
        module = importlib.import_module("broker.admin.server_install")
    except ImportError:
        return None
    add = getattr(module, "add_server", None)
    return add if callable(add) else None


def _reload(ctx: click.Context) -> bool:
    """What ``mcp-brokerctl reload`` does (the server's user first, then the daemon); whether it worked."""
    root = ctx.find_root()
    command = root.command.get_command(root, "reload") if isinstance(root.command, click.Group) else None
    if command is None:
        return False
    try:
        ctx.invoke(command)
    except PrivsepError as exc:
        click.echo(f"proposals: reload failed: {screen.line(exc)}", err=True)
        return False
    return True


def _offered(ctx: click.Context, paths: Paths, name: str) -> list[dict[str, Any]] | None:
    """The tools the new server offers once it is up; a reload starts it if the daemon does not know it yet."""
    reloaded = False
    deadline = time.monotonic() + TOOLS_WAIT
    while True:
        try:
            tools = _admin(paths, "tools", server=name).get(name) or []
        except PrivsepError as exc:
            if exc.exit_code == EX_UNAVAILABLE and not reloaded:  # "no server named NAME": not started yet
                reloaded = True
                if _reload(ctx):
                    continue
            click.echo(f"proposals: cannot list the tools of {screen.name(name)}: {screen.line(exc)}", err=True)
            return None
        if tools:
            return list(tools)
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.5)


@proposals.command("adopt")
@click.argument("proposal_id", metavar="ID")
@click.option("--yes", "-y", is_flag=True, help="Do not ask in server add's review (it still shows everything).")
@click.option("--full", is_flag=True, help="Show long values whole.")
@click.pass_context
def adopt(ctx: click.Context, proposal_id: str, yes: bool, full: bool) -> None:
    """Install a proposed server with 'server add' and its review, then list its tools for pin review."""
    paths = _paths(ctx)
    p = _find(paths, proposal_id)
    if p["status"] != "pending":
        raise PrivsepError(f"proposals: proposal {screen.text(proposal_id)} is {p['status']}, not pending", EX_FAILED)
    for line in show(p, full):
        click.echo(line)
    add = server_add()
    if add is None:
        _admin(paths, "proposal_decide", id=proposal_id, decision="adopt_failed", reason=NOT_AVAILABLE)
        raise PrivsepError(
            f"proposals: {NOT_AVAILABLE} in this installation (broker.admin.server_install); "
            f"proposal {screen.text(proposal_id)} stays pending",
            EX_UNAVAILABLE,
        )
    _admin(paths, "proposal_decide", id=proposal_id, decision="adopting", reason=None)
    spec = p["spec"]
    pip, npm = (spec, None) if p["manager"] == "pip" else (None, spec)
    written = f"{paths.servers_d}/{p['name']}.toml"  # what server add writes once it has installed the package
    existed = os.path.lexists(written)
    try:
        done = add(paths, p["name"], pip=pip, npm=npm, yes=yes, echo=click.echo)
    except BaseException as exc:  # recorded, then reported as it was (a refusal, Ctrl-C, a bug)
        why = " ".join((str(exc) or type(exc).__name__).split())[:400]
        # installed and configured, then a later step failed (the server does not start): the proposal is done
        installed = not existed and os.path.lexists(written)
        step = "adopted" if installed else "adopt_failed"
        with contextlib.suppress(PrivsepError):
            _admin(
                paths,
                "proposal_decide",
                id=proposal_id,
                decision=step,
                reason=why if not installed else f"installed, but: {why}",
            )
        if installed:
            click.echo(
                f"proposals: adopted {screen.text(proposal_id)} as server {screen.name(p['name'])}, but:", err=True
            )
        raise
    if done is False:  # the operator said no in the review
        _admin(paths, "proposal_decide", id=proposal_id, decision="adopt_failed", reason="declined in the review")
        click.echo(f"proposals: {screen.text(proposal_id)} not adopted; it stays pending")
        return
    _admin(paths, "proposal_decide", id=proposal_id, decision="adopted", reason=None)
    name = p["name"]
    click.echo(f"proposals: adopted {screen.text(proposal_id)} as server {screen.name(name)}")
    wanted = list(p.get("tools") or [])
    offered = _offered(ctx, paths, name)
    if offered is None:
        click.echo(
            f"proposals: {screen.name(name)} offers no tools yet; when up: mcp-brokerctl tools {screen.name(name)}"
        )
        return
    names = [str(t.get("name", "")) for t in offered]
    click.echo(f"tools of {screen.name(name)} (none is callable before its definition is reviewed and allowed):")
    width = max(len(screen.name(f"{name}.{n}")) for n in names)
    for t, n in zip(offered, names, strict=True):
        mark = "  (asked for)" if n in wanted else ""
        shown = screen.name(f"{name}.{n}")
        click.echo(f"  {shown:<{width}}  {screen.text(t.get('description') or '', 80, full)}{mark}")
    missing = [w for w in wanted if w not in names]
    if missing:
        click.echo(f"asked for but not offered: {', '.join(screen.name(m) for m in missing)}")
    review = [screen.name(f"{name}.{n}") for n in (names if not wanted else [n for n in names if n in wanted] or names)]
    click.echo(f"review and pin: mcp-brokerctl pins accept {' '.join(review)}")
    click.echo(f"then allow:     mcp-brokerctl allow {' '.join(review)}")
    click.echo(
        f"                (or with --user {screen.name(p['caller'])}: that agent's own allowlist, "
        "which replaces the global one for it)"
    )


@proposals.command("reject")
@click.argument("proposal_id", metavar="ID")
@click.option("--reason", default=None, metavar="TEXT", help="Why (the agent sees it in 'mcp propose --status').")
@click.pass_context
def reject(ctx: click.Context, proposal_id: str, reason: str | None) -> None:
    """Drop a proposal from the queue; nothing of it was installed or run."""
    p = _admin(_paths(ctx), "proposal_decide", id=proposal_id, decision="rejected", reason=reason)
    click.echo(
        f"proposals: rejected {screen.text(p['id'])}: server {screen.name(p['name'])} ({screen.text(_spec(p))}) "
        f"proposed by {screen.name(p['caller'])}"
    )
