"""``mcp-brokerctl edit``: change an allowlist, ``broker.toml`` or a server's file the way ``visudo`` changes sudoers.

One session, under the lock of the file's directory (the one ``allow`` and
``deny`` take, for an allowlist; ``servers.d`` for the config files):

1. a copy of the file (or, for a new one, a commented template) goes into a
   private directory and is opened in ``$EDITOR`` (else ``$VISUAL``, else
   ``editor``, else ``vi``);
2. the copy is checked with the code ``mcp-brokerctl check`` runs: an
   allowlist with the gate's own parser (:func:`broker.core.allowlist.from_bytes`),
   a config file as part of the whole config (:func:`broker.admin.check.check_all`
   over a staged copy of ``broker.toml`` and ``servers.d`` holding the edit).
   Every problem is one ``file:line:col: message`` line
   (:mod:`broker.core.tomlpos` finds the line of a key path). A problem in the
   edited file, or one the edit brings elsewhere (a server now defined
   twice), refuses the edit; what was wrong before elsewhere is only noted;
3. on a terminal the operator may edit again or abandon; off a terminal the
   edit is abandoned (exit 1). An abandoned or unchanged edit installs
   nothing;
4. the file is installed atomically (temporary file in its directory, fsync,
   rename, fsync of the directory: :func:`broker.admin.allowlist_edit.atomic_replace`)
   with the owner and mode of :mod:`broker.core.layout`;
5. and applied: an allowlist and policy (``[policy.*]``, ``[limits.*]``,
   ``[broker]``) apply on the next call, as the gate and the daemon read the
   files again when they change; when the running daemon says server
   definitions (or settings only a reload applies) differ from the files, it
   is reloaded, which restarts only the changed servers.

This module edits and checks files; it decides no call (the daemon does).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import click

from broker.admin import allowlist_edit
from broker.core import allowlist, layout, names, tomlpos, wire
from broker.core import servers as core_servers
from broker.core.errors import EX_FAILED, EX_NOPERM, EX_NOUSER, ConfigError, PrivsepError, TempFail, UsageError
from broker.core.paths import BROKER_USER, Paths

Kind = Literal["allowlist", "config", "server"]
#: one request to the running daemon: (op, fields) -> its answer
Admin = Callable[..., Any]
#: asked after a refused check: "e" (edit again) or anything else (abandon)
Ask = Callable[[], str]

CONFIG_TEMPLATE = """\
# broker.toml: [broker] settings, [policy."server.tool"] rules, [limits.CALLER] quotas, [servers.NAME] servers.
# Policy applies on the next call; a changed server definition restarts that server ('mcp-brokerctl edit config').
"""

SERVER_TEMPLATE = """\
# servers.d/{name}.toml: the server {name}. Set exactly one of command (stdio: its own user and sandbox)
# or url (streamable HTTP); secrets go in an env file (root 0600), never in args. See README.md, "Servers".
[servers.{name}]
# command = "/usr/bin/..."
# args = []
# env_file = "{secrets}/{name}.env"
# url = "http://127.0.0.1:8123/mcp"
"""


@dataclass(frozen=True)
class Target:
    """The file one edit changes, and what it is."""

    kind: Kind
    path: str
    #: owner, group and mode it is installed with
    entry: layout.Entry
    #: what a new file starts as
    template: str
    #: the directory whose flock serialises editors of this file
    lock: str


@dataclass
class Edited:
    """What one edit did."""

    target: Target
    installed: bool = False
    created: bool = False
    notes: list[str] = field(default_factory=list)


# --- which file --------------------------------------------------------------------------------


def target(paths: Paths, what: str, name: str | None) -> Target:
    """The file ``edit WHAT [NAME]`` means; UsageError for a bad name."""
    if what == "allowlist":
        if name is None:
            return Target(
                "allowlist",
                paths.allowlist,
                layout.entry("allowlist"),
                allowlist_edit.GLOBAL_FILE_HEADER,
                os.path.dirname(paths.allowlist),
            )
        if not names.valid_user_name(name):
            raise UsageError(f"edit allowlist {name!r}: not a valid user name")
        try:
            pwd.getpwnam(name)
        except KeyError:
            raise PrivsepError(f"edit allowlist {name}: no such user", EX_NOUSER) from None
        return Target(
            "allowlist",
            paths.user_allowlist(name),
            layout.child("allowlist_d"),
            allowlist_edit.USER_FILE_HEADER.format(user=name),
            paths.allowlist_d,
        )
    lock = paths.servers_d if os.path.isdir(paths.servers_d) else paths.etc
    if what == "config":
        if name is not None:
            raise UsageError(f"edit config takes no name (got {name!r}): it edits {paths.broker_toml}")
        return Target("config", paths.broker_toml, layout.entry("broker_toml"), CONFIG_TEMPLATE, lock)
    if what == "server":
        if name is None:
            raise UsageError("edit server NAME: which server?")
        if not names.valid_server_name(name):
            raise UsageError(f"edit server {name!r}: server names are [A-Za-z0-9_-]+")
        path = defining_file(paths, name) or f"{paths.servers_d}/{name}.toml"
        entry = layout.entry("broker_toml") if path == paths.broker_toml else layout.child("servers_d")
        return Target("server", path, entry, SERVER_TEMPLATE.format(name=name, secrets=paths.secrets), lock)
    raise UsageError(f"edit {what!r}: expected allowlist [USER], config or server NAME")


def defining_file(paths: Paths, name: str) -> str | None:
    """The config file that defines server ``name`` (read as text when the file does not parse), or None."""
    found, _sandbox, _problems = core_servers.load(paths)
    if name in found:
        return found[name].source
    header = re.compile(rf"^\s*\[\s*servers\s*\.\s*([\"']?){re.escape(name)}\1\s*[\].]", re.MULTILINE)
    with contextlib.suppress(ConfigError):
        for path in core_servers.config_files(paths):
            try:
                with open(path, "rb") as fh:
                    text = fh.read(core_servers.MAX_CONFIG_BYTES).decode("utf-8", "replace")
            except OSError:
                continue
            if header.search(text):
                return path
    return None


def editor_command(env: dict[str, str] | os._Environ[str]) -> list[str]:
    """The operator's editor: ``$EDITOR``, else ``$VISUAL`` (each may hold arguments), else ``editor``, else ``vi``."""
    for var in ("EDITOR", "VISUAL"):
        value = env.get(var, "").strip()
        if value:
            try:
                argv = shlex.split(value)
            except ValueError as exc:
                raise UsageError(f"${var} cannot be split into a command: {exc}") from None
            if argv:
                return argv
    for name in ("editor", "vi"):
        found = shutil.which(name)
        if found:
            return [found]
    raise PrivsepError("no editor: set EDITOR (neither 'editor' nor 'vi' is installed)", EX_FAILED)


# --- checking ----------------------------------------------------------------------------------


def _utf8_problem(path: str, data: bytes) -> str | None:
    try:
        allowlist.decode(data, path)
    except ConfigError as exc:
        return exc.message.replace("; denying every call", "")
    return None


def _config_problems(paths: Paths, edit: tuple[str, bytes] | None) -> list[str]:
    """``check``'s problems with ``edit`` (path, new bytes) in place: over a staged copy of the config files."""
    from broker.admin.check import check_all  # the check of 'mcp-brokerctl check'

    with tempfile.TemporaryDirectory(prefix="mcp-brokerctl-check.") as stage:
        staged = Paths(paths.root)
        staged.broker_toml = f"{stage}/broker.toml"
        staged.servers_d = f"{stage}/servers.d"
        os.mkdir(staged.servers_d, 0o700)
        copies = {paths.broker_toml: staged.broker_toml}
        try:
            listed = os.listdir(paths.servers_d)
        except FileNotFoundError:
            listed = []
        for entry in listed:
            if entry.endswith(".toml") and not entry.startswith("."):  # what core_servers.config_files reads
                copies[f"{paths.servers_d}/{entry}"] = f"{staged.servers_d}/{entry}"
        if edit is not None and os.path.dirname(edit[0]) == paths.servers_d:
            copies[edit[0]] = f"{staged.servers_d}/{os.path.basename(edit[0])}"
        for real, copy in copies.items():
            if edit is not None and real == edit[0]:
                data: bytes | None = edit[1]
            else:
                try:
                    with open(real, "rb") as fh:
                        data = fh.read(core_servers.MAX_CONFIG_BYTES + 1)
                except OSError:  # the check says what cannot be read
                    data = None
            if data is not None:
                fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
        # the staged copies mirror the config directory's layout: one replace puts the real names back
        return [p.replace(stage, paths.etc) for p in check_all(staged)]


def check(paths: Paths, tgt: Target, data: bytes, before: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(problems that refuse the edit, problems that were there before it elsewhere), each ``file:line:col: ...``.

    ``before``: the config's problems without the edit (computed when None).
    """
    if tgt.kind == "allowlist":
        try:
            allowlist.from_bytes(data, tgt.path)
        except ConfigError as exc:
            return [p.replace("; denying every call", "") for p in exc.problems], []
        return [], []
    bad_utf8 = _utf8_problem(tgt.path, data)
    if bad_utf8 is not None:
        return [bad_utf8], []
    if before is None:
        before = _config_problems(paths, None)
    after = _config_problems(paths, (tgt.path, data))
    files = [paths.broker_toml, tgt.path]
    with contextlib.suppress(OSError):
        files += [f"{paths.servers_d}/{n}" for n in os.listdir(paths.servers_d)]

    def read(path: str) -> bytes | None:
        if path == tgt.path:
            return data
        try:
            with open(path, "rb") as fh:
                return fh.read(core_servers.MAX_CONFIG_BYTES + 1)
        except OSError:
            return None

    def mine(problem: str) -> bool:
        return problem.startswith((tgt.path + ":", tgt.path + " "))

    refusing = [tomlpos.locate(p, files, read) for p in after if mine(p) or p not in before]
    noted = [tomlpos.locate(p, files, read) for p in after if not mine(p) and p in before]
    return refusing, noted


# --- one session -------------------------------------------------------------------------------


@contextlib.contextmanager
def locked(directory: str) -> Iterator[None]:
    """The exclusive flock of ``directory`` (``allow`` and ``deny`` take it too), or TempFail when it is held."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{directory}: directory missing; run 'mcp-brokerctl install' first") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TempFail(f"{directory}: busy (another edit, allow or deny holds its lock); try again later") from None
        yield
    finally:
        os.close(fd)


def owner_ids(entry: layout.Entry) -> tuple[int, int, int]:
    """(uid, gid, mode) the layout table gives a file (tests replace this)."""
    from broker.admin.install import owner_ids as resolve

    try:
        return resolve(entry)
    except KeyError as exc:
        raise ConfigError(f"{exc.args[0]}: no such user or group; run 'mcp-brokerctl install' first") from None


def _run_editor(editor: list[str], path: str) -> None:
    try:
        code = subprocess.run([*editor, path], check=False).returncode
    except OSError as exc:
        message = f"edit: cannot run the editor {editor[0]}: {exc.strerror}; nothing installed"
        raise PrivsepError(message, EX_FAILED) from None
    if code != 0:
        raise PrivsepError(f"edit: the editor {editor[0]} exited with {code}; nothing installed", EX_FAILED)


def _read_copy(path: str) -> bytes:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise PrivsepError("edit: the editor removed the copy; nothing installed", EX_FAILED) from None


def _validate_back(tgt: Target) -> Callable[[bytes], None]:
    def validate(back: bytes) -> None:
        if tgt.kind == "allowlist":
            allowlist.from_bytes(back, tgt.path)
        else:
            try:
                tomllib.loads(back.decode("utf-8"))
            except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
                raise ConfigError(f"{tgt.path}: the copy read back does not parse ({exc}); not installed") from None

    return validate


def session(
    paths: Paths,
    tgt: Target,
    editor: list[str],
    ask: Ask | None,
    say: Callable[[str], None],
) -> Edited:
    """Edit, check, and install ``tgt``; ``ask`` (a terminal) or not: a refused check abandons (PrivsepError, 1)."""
    result = Edited(tgt)
    with locked(tgt.lock):
        original, st = allowlist_edit.read_current(tgt.path)
        start = original if original is not None else tgt.template.encode()
        work = tempfile.mkdtemp(prefix="mcp-brokerctl-edit.")  # 0700, root's: the copy is as private as the file
        keep = False
        try:
            copy = os.path.join(work, os.path.basename(tgt.path))
            fd = os.open(copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(start)
            before: list[str] | None = None
            while True:
                _run_editor(editor, copy)
                data = _read_copy(copy)
                if data == start:
                    say(f"edit: {tgt.path}: no changes; nothing installed")
                    return result
                if tgt.kind != "allowlist" and before is None:
                    before = _config_problems(paths, None)
                refusing, noted = check(paths, tgt, data, before)
                if not refusing:
                    break
                for problem in refusing:
                    click.echo(problem, err=True)
                if ask is None or ask() != "e":
                    raise PrivsepError(
                        f"edit: {tgt.path}: {len(refusing)} problem(s); abandoned, nothing installed", EX_FAILED
                    )
            for problem in noted:
                result.notes.append(f"already a problem before this edit: {problem}")
            now, _st = allowlist_edit.read_current(tgt.path)
            if now != original:  # written by hand meanwhile (every editor of ours waits for the lock)
                keep = True
                raise TempFail(
                    f"edit: {tgt.path} changed on disk during the edit; nothing installed (your copy: {copy})"
                )
            uid, gid, mode = owner_ids(tgt.entry)
            if st is not None and (st.st_uid, st.st_gid, st.st_mode & 0o7777) != (uid, gid, mode):
                result.notes.append(
                    f"{tgt.path}: its owner/mode (uid {st.st_uid}, gid {st.st_gid}, {st.st_mode & 0o7777:04o}) "
                    f"repaired: {tgt.entry.owner}:{tgt.entry.group} {mode:04o}"
                )
            allowlist_edit.atomic_replace(tgt.path, data, uid, gid, mode, _validate_back(tgt))
            result.installed, result.created = True, original is None
        finally:
            if not keep:
                shutil.rmtree(work, ignore_errors=True)
    return result


# --- applying ----------------------------------------------------------------------------------


def apply(paths: Paths, edited: Edited, admin: Admin, say: Callable[[str], None]) -> None:
    """Make the running daemon use the installed file: nothing for policy, a reload for server definitions."""
    tgt = edited.target
    if tgt.kind == "allowlist":
        say("edit: the gate and the daemon read it on the next call")
        return
    try:
        status = admin("status")
    except PrivsepError as exc:
        say(f"edit: the broker is not answering ({exc.message}); it reads the new config when it starts")
        return
    disk = status.get("config")
    if isinstance(disk, dict) and disk.get("error"):
        raise ConfigError(f"edit: installed, but the broker cannot use it: {disk['error']}")
    stale = disk.get("stale") if isinstance(disk, dict) else None
    if isinstance(disk, dict) and not stale:
        say("edit: policy applies from the next call; no server definition changed")
        return
    for item in stale or [{"file": tgt.path, "what": "a broker without live policy"}]:
        say(f"edit: {item.get('file')}: {item.get('what')}: reloading")
    from broker.admin.install import Report, install_servers
    from broker.core import agents as agent_map

    report = Report()
    try:  # what 'mcp-brokerctl reload' does first: a new server gets its user
        install_servers(paths, list(agent_map.load(paths.gate_users)), report)
    except (ConfigError, OSError, PrivsepError) as exc:
        say(f"edit: server users not updated: {exc}")
    for line in report.lines:
        say(f"edit: {line}")
    done = admin("reload")
    say(f"edit: reloaded: added {done['added']}, removed {done['removed']}, restarted {done['restarted']}")


# --- the command -------------------------------------------------------------------------------


def _admin_for(paths: Paths) -> Admin:
    try:
        broker_uid: int | None = pwd.getpwnam(BROKER_USER).pw_uid
    except KeyError:
        broker_uid = None
    return lambda op, **fields: wire.admin_request(paths.admin_sock, broker_uid, op, 60.0, **fields)


def _ask() -> str:
    return str(click.prompt("What now? (e)dit again, (a)bandon", type=click.Choice(["e", "a"]), show_choices=False))


def _must_be_root() -> None:
    if os.geteuid() != 0:
        raise PrivsepError("edit must run as root (it installs root's files)", EX_NOPERM)


@click.command("edit")
@click.argument("what", required=False, default="allowlist", type=click.Choice(["allowlist", "config", "server"]))
@click.argument("name", required=False, metavar="[USER|NAME]")
@click.pass_context
def edit(ctx: click.Context, what: str, name: str | None) -> None:
    """Edit a file like visudo: a copy in $EDITOR, checked, installed atomically, applied.

    \b
    edit                   the allowlist, allowed-actions.txt
    edit allowlist USER    allowed-actions.d/USER.txt (USER's whole allowlist; created if new)
    edit config            broker.toml: [broker], [policy.*], [limits.*], servers
    edit server NAME       the file that defines server NAME (else a new servers.d/NAME.toml)

    The editor is $EDITOR, else $VISUAL, else editor, else vi. The copy is
    checked as 'mcp-brokerctl check' checks it; each problem is printed as
    file:line:col: message, and nothing is installed: on a terminal you may
    edit again or abandon; otherwise the edit is abandoned (exit 1). A good
    edit is installed atomically with the file's owner and mode (root:mcp-gate
    0640 for allowlists, root:mcp-broker 0640 for config). The allowlist and
    policy ([policy.*], [limits.*], [broker]) apply on the next call, with no
    reload; a changed server definition, [sandbox], or a [broker] setting
    that running servers or the audit log hold (connect_timeout, audit_*, ...)
    reloads the broker, which restarts only the servers that changed.
    """
    _must_be_root()
    paths = Paths((ctx.find_root().obj or {}).get("root", "/"))
    tgt = target(paths, what, name)
    editor = editor_command(os.environ)
    edited = session(paths, tgt, editor, _ask if sys.stdin.isatty() else None, click.echo)
    for note in edited.notes:
        click.echo(f"note: {note}", err=True)
    if not edited.installed:
        return
    click.echo(f"edit: {'created' if edited.created else 'installed'} {tgt.path}")
    apply(paths, edited, _admin_for(paths), click.echo)


__all__ = ["Edited", "Target", "apply", "check", "edit", "editor_command", "session", "target"]
