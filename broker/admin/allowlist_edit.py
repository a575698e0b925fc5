"""Safe edits of the allowlist files, and the tool tables behind them.

``mcp-brokerctl allow`` and ``deny`` change ``allowed-actions.txt`` (or
``allowed-actions.d/USER.txt``) the way ``visudo`` changes sudoers:

* under an exclusive ``flock`` on the file's directory, so two operators
  cannot lose each other's edit;
* line by line, keeping every comment, blank line and the order of entries;
  ``allow`` inserts a new entry after the last entry of the same server (or
  at the end), ``deny`` *removes* the entry's line (a trailing comment on that
  line goes with it, and is printed so nothing vanishes unseen);
* idempotently: allowing an allowed tool or denying a denied one writes
  nothing and says so;
* atomically: the result is validated with the gate's own parser
  (:func:`broker.allowlist.from_bytes`) and refused if it would not parse,
  written to a temporary file in the same directory, re-read and validated
  again, given ``root:mcp-gate 0640``, fsynced, renamed over the old file,
  and the directory is fsynced.

The file never holds a wildcard: ``SERVER.*`` (or any shell-style pattern on
the tool part) is expanded by the caller against what the server offers
today (see :func:`expand`), and each tool is written on its own line.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import grp
import os
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from broker.core import allowlist, names
from broker.core.errors import EX_FAILED, EX_IOERR, EX_UNAVAILABLE, ConfigError, PrivsepError, UsageError
from broker.core.paths import GATE_USER

ALLOWLIST_MODE = 0o640
#: owner of every allowlist file (tests without root patch this and gate_gid)
ALLOWLIST_UID = 0
_WILDCARD_CHARS = frozenset("*?[")

USER_FILE_HEADER = """\
# allowed-actions.d/{user}.txt: the whole allowlist of {user}.
# It replaces allowed-actions.txt for {user}: {user} may call only what is listed here.
# One server.tool per line; edit with 'mcp-brokerctl allow --user {user}' and 'deny --user {user}'.
"""

GLOBAL_FILE_HEADER = """\
# mcp-privsep allowlist: one server.tool per line, compared as a whole string.
# No wildcards; 'mcp-brokerctl allow SERVER.TOOL' edits this file safely.
"""


@dataclass
class EditResult:
    """What one ``allow`` or ``deny`` did to one file."""

    path: str
    changed: bool = False
    created: bool = False
    #: allow: the entries added; deny: the entries removed
    done: list[str] = field(default_factory=list)
    #: allow: already allowed; deny: not in the file
    unchanged: list[str] = field(default_factory=list)
    #: deny: the whole lines removed (with any trailing comment)
    removed_lines: list[str] = field(default_factory=list)
    #: remarks for the operator (a mode that was repaired, a file created)
    notes: list[str] = field(default_factory=list)


# --- patterns -------------------------------------------------------------------


def is_pattern(action: str) -> bool:
    """Whether ``action`` holds a wildcard that must be expanded first."""
    return any(ch in _WILDCARD_CHARS for ch in action)


def split_pattern(pattern: str) -> tuple[str, str]:
    """(server, tool pattern) of ``SERVER.PATTERN``; the server part must be literal."""
    server, dot, tool = pattern.partition(".")
    if not dot or not tool:
        raise UsageError(f"{pattern!r}: expected SERVER.TOOL or SERVER.* (a pattern on the tool name only)")
    if is_pattern(server) or names.action_error(server + ".x") is not None:
        raise UsageError(f"{pattern!r}: the server name must be written out ([A-Za-z0-9_-]+), not a pattern")
    return server, tool


def check_actions(actions: list[str]) -> None:
    """Refuse any action that is not a well-formed ``server.tool``."""
    for action in actions:
        problem = names.action_error(action)
        if problem is not None:
            raise UsageError(f"{action!r}: {problem}")


def expand(patterns: list[str], offered: dict[str, list[dict[str, Any]]]) -> tuple[list[str], list[str]]:
    """Expand ``SERVER.PATTERN`` against the tools each server offers now.

    Returns (actions in order, one line per pattern saying what it became).
    A pattern that matches nothing is an error: writing nothing silently
    would look like success.
    """
    actions: list[str] = []
    lines: list[str] = []
    for pattern in patterns:
        server, tool_pattern = split_pattern(pattern)
        if server not in offered:
            raise PrivsepError(f"{pattern}: no server named {server} is configured", EX_UNAVAILABLE)
        names = [t["name"] for t in offered[server] if fnmatch.fnmatchcase(t["name"], tool_pattern)]
        if not names:
            have = len(offered[server])
            raise PrivsepError(
                f"{pattern}: matches none of the {have} tools server {server} offers now"
                + (" (is the server up? 'mcp-brokerctl status')" if not have else ""),
                1,
            )
        found = [f"{server}.{n}" for n in names]
        check_actions(found)
        lines.append(f"{pattern} -> {', '.join(found)}")
        actions.extend(found)
    return list(dict.fromkeys(actions)), lines


def annotation(tool: dict[str, Any], hint: str) -> bool | None:
    """A tool annotation by its MCP name (``readOnlyHint``), whichever spelling the daemon used."""
    ann = tool.get("annotations") or {}
    snake = "".join("_" + c.lower() if c.isupper() else c for c in hint)
    value = ann.get(hint, ann.get(snake))
    return value if isinstance(value, bool) else None


def read_only_tools(server: str, offered: dict[str, list[dict[str, Any]]]) -> list[str]:
    """``server.tool`` of every tool the server annotates ``readOnlyHint: true``."""
    if server not in offered:
        raise PrivsepError(f"no server named {server} is configured", EX_UNAVAILABLE)
    return [f"{server}.{t['name']}" for t in offered[server] if annotation(t, "readOnlyHint") is True]


def deny_expand(patterns: list[str], present: list[str]) -> list[str]:
    """Expand deny patterns against the entries the file holds (no daemon needed)."""
    out: list[str] = []
    for pattern in patterns:
        server, tool_pattern = split_pattern(pattern)
        out.extend(
            a
            for a in present
            if a.partition(".")[0] == server and fnmatch.fnmatchcase(a.partition(".")[2], tool_pattern)
        )
    return list(dict.fromkeys(out))


# --- text edits (pure) -------------------------------------------------------------


def _lines(text: str) -> list[str]:
    """Lines with their '\\n' kept, split exactly as the gate's parser splits."""
    parts = text.split("\n")
    out = [p + "\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _entry(line: str) -> str | None:
    """The entry a line holds, by the gate's own parser, or None (comment, blank, bad)."""
    actions, _errors = allowlist.parse(line.rstrip("\n"), "-")
    return actions[0] if actions else None


def entries(text: str) -> list[str]:
    """Every entry of allowlist text, in order."""
    return [e for e in (_entry(line) for line in _lines(text)) if e is not None]


def plan_allow(text: str, actions: list[str]) -> tuple[str, list[str], list[str]]:
    """Text with ``actions`` allowed; returns (new text, added, already allowed)."""
    lines = _lines(text)
    eol = "\r\n" if any(line.endswith("\r\n") for line in lines) else "\n"
    present = {e for e in (_entry(line) for line in lines) if e is not None}
    added: list[str] = []
    already: list[str] = []
    for action in dict.fromkeys(actions):
        if action in present:
            already.append(action)
            continue
        server = action.partition(".")[0]
        last = None
        for i, line in enumerate(lines):
            e = _entry(line)
            if e is not None and e.partition(".")[0] == server:
                last = i
        if lines and not lines[-1].endswith("\n"):
            lines[-1] += eol
        if last is None:
            lines.append(action + eol)
        else:
            if not lines[last].endswith("\n"):
                lines[last] += eol
            lines.insert(last + 1, action + eol)
        present.add(action)
        added.append(action)
    return "".join(lines), added, already


def plan_deny(text: str, actions: list[str]) -> tuple[str, list[str], list[str], list[str]]:
    """Text without ``actions``; returns (new text, removed, not present, removed lines)."""
    wanted = set(actions)
    kept: list[str] = []
    removed: list[str] = []
    removed_lines: list[str] = []
    for line in _lines(text):
        e = _entry(line)
        if e is not None and e in wanted:
            removed_lines.append(line.rstrip("\r\n"))
            if e not in removed:
                removed.append(e)
            continue
        kept.append(line)
    absent = [a for a in dict.fromkeys(actions) if a not in removed]
    return "".join(kept), removed, absent, removed_lines


# --- files -------------------------------------------------------------------------


@contextlib.contextmanager
def locked_dir(directory: str) -> Iterator[None]:
    """An exclusive flock on a directory: serialises every editor of its files."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def read_current(path: str) -> tuple[bytes | None, os.stat_result | None]:
    """The file's bytes and stat, or (None, None) when it does not exist; never follows a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open: {exc.strerror} (a symlink is refused)") from None
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: not a regular file; not editing it")
        data = fh.read(allowlist.MAX_ALLOWLIST_BYTES + 1)
    if len(data) > allowlist.MAX_ALLOWLIST_BYTES:
        raise ConfigError(f"{path}: larger than {allowlist.MAX_ALLOWLIST_BYTES} bytes; not editing it")
    return data, st


def atomic_replace(path: str, data: bytes, uid: int, gid: int, mode: int, validate: Any = None) -> None:
    """Write ``data`` to ``path`` atomically: temp file in the same directory, fsync, rename, fsync dir.

    ``validate(data_read_back)`` runs on what actually landed in the temporary
    file, before the rename; if it raises, the old file stays untouched.
    """
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    # the ".tmp" suffix keeps it out of 'allowed-actions.d/*.txt' and 'servers.d/*.toml' globs
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{base}.", suffix=".tmp")
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)
        os.fsync(fd)
        if validate is not None:
            os.lseek(fd, 0, os.SEEK_SET)
            back = b""
            while chunk := os.read(fd, 1 << 20):
                back += chunk
            if back != data:
                raise PrivsepError(f"{tmp}: read back differs from what was written; not replacing {path}", EX_IOERR)
            validate(back)
        os.close(fd)
        fd = -1
        os.rename(tmp, path)
        tmp = ""
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def gate_gid() -> int:
    try:
        return grp.getgrnam(GATE_USER).gr_gid
    except KeyError:
        raise ConfigError(f"group {GATE_USER} does not exist; run 'mcp-brokerctl install' first") from None


def edit(path: str, header: str, change: Any) -> EditResult:
    """Read, change, validate and atomically replace one allowlist file under a lock."""
    gid = gate_gid()
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory}: directory missing; run 'mcp-brokerctl install' first")
    result = EditResult(path)
    with locked_dir(directory):
        data, st = read_current(path)
        if data is None:
            text = header
            result.created = True
        else:
            text = allowlist.decode(data, path)
            _a, errors = allowlist.parse(text, path)
            if errors:
                raise ConfigError(
                    f"{path} is invalid now ({len(errors)} problem(s)); fix it first, not editing it", errors
                )
        new_text = change(text, result)
        wrong = _mode_problem(st)
        if data is not None and new_text == text:
            if wrong is not None:
                result.notes.append(f"{path}: wrong {wrong}; left as it is ('mcp-brokerctl doctor' says how to fix it)")
            return result
        new = new_text.encode("utf-8")
        allowlist.from_bytes(new, path)  # refuse a result that would not parse

        def validate(back: bytes) -> None:
            allowlist.from_bytes(back, path)

        atomic_replace(path, new, ALLOWLIST_UID, gid, ALLOWLIST_MODE, validate)
        result.changed = True
        if wrong is not None:
            result.notes.append(f"{path}: repaired its {wrong}, now root:{GATE_USER} 0640")
    return result


def _mode_problem(st: os.stat_result | None) -> str | None:
    if st is None:
        return None
    try:
        gid = gate_gid()
    except ConfigError:
        return None
    mode = stat.S_IMODE(st.st_mode)
    if st.st_uid != ALLOWLIST_UID or st.st_gid != gid or mode != ALLOWLIST_MODE:
        return f"owner/mode (uid {st.st_uid}, gid {st.st_gid}, mode {mode:04o})"
    return None


def allow(path: str, actions: list[str], header: str = GLOBAL_FILE_HEADER) -> EditResult:
    """Allow ``actions`` (already expanded, no patterns) in the allowlist at ``path``."""
    check_actions(actions)

    def change(text: str, result: EditResult) -> str:
        new, added, already = plan_allow(text, actions)
        result.done, result.unchanged = added, already
        return new

    return edit(path, header, change)


def deny(path: str, patterns: list[str]) -> EditResult:
    """Remove ``patterns`` (exact names, or SERVER.PATTERN matched against the file) from ``path``."""
    for p in patterns:
        if is_pattern(p):
            split_pattern(p)
        else:
            check_actions([p])
    data, _st = read_current(path)
    if data is None:
        raise PrivsepError(f"{path}: does not exist; nothing to deny there", EX_FAILED)

    def change(text: str, result: EditResult) -> str:
        present = entries(text)
        exact = [p for p in patterns if not is_pattern(p)]
        expanded = deny_expand([p for p in patterns if is_pattern(p)], present)
        wanted = list(dict.fromkeys(exact + expanded))
        new, removed, absent, lines = plan_deny(text, wanted)
        result.done, result.unchanged, result.removed_lines = removed, absent, lines
        for p in patterns:
            if is_pattern(p) and not deny_expand([p], present):
                result.unchanged.append(p)
        return new

    return edit(path, "", change)
