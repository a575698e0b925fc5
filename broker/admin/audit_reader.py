"""``mcp-brokerctl audit``: read, filter, follow and verify the audit trail (root only).

The commands read the files directly (``/var/log/mcp-privsep/audit.jsonl``
and its rotated set), so they work while the daemon is down::

    mcp-brokerctl audit [-n N] [--follow] [--caller U] [--tool S.T] [--decision D]
                        [--since T] [--until T] [--json] [--full]
    mcp-brokerctl audit verify [PATH]

Times are ISO 8601 (UTC unless an offset is given, like the log) or
relative to now (``90s``, ``15m``, ``1h``, ``2d``, ``1w``). ``verify``
exits 0 when the chain is intact and 1 naming ``file:line`` and what is
wrong otherwise.

What a record holds came partly from agents and servers (a caller's tool
name, a server's error text): the table shows every field through
:mod:`broker.admin.screen` (escaped, cut with ``--full`` to see it all), and
``--json`` escapes every non-ASCII and control character of a line that
holds one (the same JSON value; ``audit verify`` checks the files themselves).
"""

from __future__ import annotations

import datetime as dt
import itertools
import json
import os
import pwd
import re
import stat
import sys
import time
from collections.abc import Iterator
from typing import Any

import click

from broker.admin import screen
from broker.core.errors import EX_FAILED, EX_NOPERM, EX_USAGE, PrivsepError
from broker.core.paths import BROKER_USER, Paths
from broker.daemon.audit import chain as auditlog

_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)")
_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
#: records older than --since by this much end the backwards scan (the clock may have stepped)
_SINCE_SLACK = 300.0
FOLLOW_POLL = 0.2
ROTATION_RETRIES = 40
ROTATION_PAUSE = 0.025
DEFAULT_LINES = 20


def _paths(ctx: click.Context) -> Paths:
    obj = ctx.find_root().obj or {}
    return Paths(obj.get("root", "/"))


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PrivsepError("audit: run as root (the audit log is private to mcp-broker)", EX_NOPERM)


def parse_time(text: str, now: float | None = None) -> float:
    """ISO 8601 (naive means UTC) or a span before now like ``1h``; as a Unix time."""
    now = time.time() if now is None else now
    value = text.strip()
    if value == "now":
        return now
    m = _RELATIVE.fullmatch(value)
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        raise PrivsepError(
            f"audit: {text!r} is neither an ISO time (2024-05-01T12:00:00Z) nor a span before now (90s, 15m, 1h, 2d)",
            EX_USAGE,
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def record_time(rec: dict[str, Any]) -> float | None:
    try:
        return dt.datetime.fromisoformat(str(rec.get("ts"))).timestamp()
    except ValueError:
        return None


class Filter:
    """Which records to show."""

    def __init__(
        self,
        callers: tuple[str, ...],
        tools: tuple[str, ...],
        decisions: tuple[str, ...],
        since: float | None,
        until: float | None,
    ) -> None:
        def split(values: tuple[str, ...]) -> set[str]:
            return {v.strip() for value in values for v in value.split(",") if v.strip()}

        self.callers = split(callers)
        self.tools = split(tools)
        self.decisions = split(decisions)
        self.since = since
        self.until = until

    def __call__(self, rec: dict[str, Any]) -> bool:
        if self.callers and rec.get("caller") not in self.callers:
            return False
        if self.tools and rec.get("tool") not in self.tools:
            return False
        if self.decisions and rec.get("decision") not in self.decisions:
            return False
        if self.since is not None or self.until is not None:
            t = record_time(rec)
            if t is None:
                return False
            if self.since is not None and t < self.since:
                return False
            if self.until is not None and t > self.until:
                return False
        return True


def _newest_first(
    files: list[str], live: str, start: tuple[tuple[int, int] | None, int]
) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
    """Records newest first; the live file only up to ``start`` (where --follow takes over)."""
    for name in reversed(files):
        try:
            fh = open(name, "rb")  # noqa: SIM115 - closed below; a generator holds it across yields
        except FileNotFoundError:
            continue  # rotated away while we read
        with fh:
            st = os.fstat(fh.fileno())
            end = start[1] if name == live and (st.st_dev, st.st_ino) == start[0] else None
            for raw in auditlog.reverse_lines(fh, end):
                if raw.strip():
                    yield raw, _loads(raw)


def _loads(raw: bytes) -> dict[str, Any] | None:
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


_COLUMNS = "{:<23}  {:<14} {:<8} {:<20} {:<12} {:>4}  {:<14} {:>9}  {}"


def table_header() -> str:
    return _COLUMNS.format("TIME (UTC)", "CALLER", "OP", "ACTION", "DECISION", "EXIT", "OUTCOME", "MS", "RULE / REASON")


#: a byte that is not printable ASCII: a line holding one is re-encoded for --json
_UNSAFE_BYTE = re.compile(rb"[^\x20-\x7e]")
#: columns of a record's rule and reason the table shows without --full
REASON_COLUMNS = 300


def table_row(rec: dict[str, Any], full: bool = False) -> str:
    """One record as one line; every field defanged (:mod:`broker.admin.screen`), the reason cut unless ``full``."""
    ts = str(rec.get("ts", "")).replace("T", " ").rstrip("Z")
    ms = rec.get("duration_ms")
    detail = rec.get("reason") or rec.get("rule") or ""
    if rec.get("reason") and rec.get("rule"):
        detail = f"{rec['rule']}: {rec['reason']}"
    row = _COLUMNS.format(
        screen.text(ts, 40, full),
        screen.name(rec.get("caller", "-"), 64, full),
        screen.text(rec.get("op", "-"), 40, full),
        screen.name(rec.get("tool") or "-", 200, full),
        screen.text(rec.get("decision", "-"), 40, full),
        "" if rec.get("exit") is None else screen.text(rec["exit"], 40, full),
        screen.text(rec.get("outcome") or "-", 40, full),
        "" if ms is None else f"{ms:.1f}" if isinstance(ms, int | float) else screen.text(ms, 40, full),
        screen.line(" ".join(str(detail).split()), REASON_COLUMNS, full),
    )
    return row.rstrip()


def json_line(raw: bytes, rec: dict[str, Any] | None) -> str:
    """A stored line for ``--json``: as stored, unless it holds a non-ASCII or control byte.

    Such a line (the log keeps UTF-8 as it came) is encoded again with every
    such character ``\\u``-escaped: the same record, nothing on it that a
    terminal acts on or hides. A line that is not a record becomes a JSON
    string of its text.
    """
    if _UNSAFE_BYTE.search(raw) is None:
        return raw.decode("ascii")
    if rec is None:
        return json.dumps(raw.decode("utf-8", "replace"), ensure_ascii=True)
    return json.dumps(rec, ensure_ascii=True, sort_keys=True, separators=(",", ":"), default=str)


def _emit(raw: bytes, rec: dict[str, Any] | None, as_json: bool, full: bool = False) -> None:
    if as_json:
        click.echo(json_line(raw, rec))
    elif rec is None:
        click.echo(f"(not a record: {screen.text(raw.decode('utf-8', 'replace'), 80, full)})")
    else:
        click.echo(table_row(rec, full))


@click.group("audit", invoke_without_command=True)
@click.option(
    "-n",
    "--lines",
    "count",
    type=click.IntRange(min=0),
    default=None,
    help="Show the last N matching records (default 20; every match with --since/--until).",
)
@click.option("-a", "--all", "show_all", is_flag=True, help="Show every matching record.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing records as they are written (Ctrl-C stops).")
@click.option("--caller", "callers", multiple=True, metavar="USER", help="Only this caller (repeatable, or a,b).")
@click.option(
    "--tool", "--action", "tools", multiple=True, metavar="SERVER.TOOL", help="Only this action (repeatable, or a,b)."
)
@click.option(
    "--decision",
    "decisions",
    multiple=True,
    metavar="D",
    help="Only this decision: allow, deny, rejected, usage, tempfail, unavailable, ... (repeatable, or a,b).",
)
@click.option("--since", metavar="TIME", help="Not before TIME (ISO, UTC unless an offset is given; or 1h, 2d ...).")
@click.option("--until", metavar="TIME", help="Not after TIME.")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the records one JSON object a line: as stored, but with non-ASCII and control characters escaped.",
)
@click.option("--full", is_flag=True, help="Show long reasons and names whole (the table cuts them otherwise).")
@click.pass_context
def audit(
    ctx: click.Context,
    count: int | None,
    show_all: bool,
    follow: bool,
    callers: tuple[str, ...],
    tools: tuple[str, ...],
    decisions: tuple[str, ...],
    since: str | None,
    until: str | None,
    as_json: bool,
    full: bool,
) -> None:
    """Show the audit trail (tail, filter, follow); 'audit verify' checks its chain."""
    if ctx.invoked_subcommand is not None:
        return
    _require_root()
    if count is not None and show_all:
        raise PrivsepError("audit: use either -n N or --all", EX_USAGE)
    limit = None if show_all or (count is None and (since or until)) else DEFAULT_LINES if count is None else count
    now = time.time()
    wanted = Filter(
        callers,
        tools,
        decisions,
        parse_time(since, now) if since else None,
        parse_time(until, now) if until else None,
    )
    path = _paths(ctx).audit_log
    start = _position(path)
    files = auditlog.log_files(path)
    picked: list[tuple[bytes, dict[str, Any] | None]] = []
    newest = -1  # number of the newest record the scan saw: --follow shows only later ones
    for raw, rec in _newest_first(files, path, start):
        if newest < 0 and rec is not None and type(rec.get("seq")) is int:
            newest = rec["seq"]
        if limit == 0:
            break
        if rec is not None and wanted.since is not None:
            t = record_time(rec)
            if t is not None and t < wanted.since - _SINCE_SLACK:
                break
        if rec is not None and wanted(rec):
            picked.append((raw, rec))
            if limit is not None and len(picked) >= limit:
                break
    if not as_json:
        click.echo(table_header())
    for raw, rec in reversed(picked):
        _emit(raw, rec, as_json, full)
    if follow:
        sys.stdout.flush()
        _follow(path, start, newest, wanted, as_json, full)


def _position(path: str) -> tuple[tuple[int, int] | None, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, 0
    return (st.st_dev, st.st_ino), st.st_size


def _follow(
    path: str,
    start: tuple[tuple[int, int] | None, int],
    after: int,
    wanted: Filter,
    as_json: bool,
    full: bool = False,
) -> None:
    """Print records after record ``after`` as they are written, across rotations, until interrupted.

    ``start`` (file identity, offset) is where the tail stopped reading. After
    a rotation, the files rotated meanwhile are read too, and records are
    printed by their number (``seq``), so none is lost or shown twice.
    """
    fh = None
    ident: tuple[int, int] | None = None
    buf = b""
    last_seq = after

    def emit_lines(lines: list[bytes]) -> None:
        nonlocal last_seq
        for raw in lines:
            if not raw.strip():
                continue
            rec = _loads(raw)
            seq = rec.get("seq") if rec is not None else None
            if type(seq) is int:
                if seq <= last_seq:
                    continue
                last_seq = seq
            if rec is None or wanted(rec):
                _emit(raw, rec, as_json, full)

    try:
        while True:
            if fh is None and start[0] is not None and _position(path)[0] == start[0]:
                try:
                    fh = open(path, "rb")  # noqa: SIM115 - kept open across polls, closed below
                    st = os.fstat(fh.fileno())
                    ident = (st.st_dev, st.st_ino)
                    fh.seek(min(start[1], st.st_size))
                except FileNotFoundError:
                    fh = None
            start = (None, 0)
            if fh is None:  # no log yet, or it rotated since the tail was read
                fh, ident = _after_rotation(path, last_seq, emit_lines)
                sys.stdout.flush()
                if fh is None:
                    time.sleep(FOLLOW_POLL)
                    continue
            chunk = fh.read()
            if chunk:
                buf += chunk
                *lines, buf = buf.split(b"\n")
                emit_lines(lines)
                sys.stdout.flush()
                continue
            if _position(path)[0] != ident:
                emit_lines((buf + fh.read()).split(b"\n"))  # the old file, to its end
                fh.close()
                fh, ident = _after_rotation(path, last_seq, emit_lines)
                buf = b""
                sys.stdout.flush()
                continue
            time.sleep(FOLLOW_POLL)
    except KeyboardInterrupt:
        return
    finally:
        if fh is not None:
            fh.close()


def _first_seq(fh: Any) -> int | None:
    """Number of the first record of an open file (None: empty or unreadable); the position is kept."""
    where = fh.tell()
    fh.seek(0)
    rec = _loads(fh.readline())
    fh.seek(where)
    seq = rec.get("seq") if rec is not None else None
    return seq if type(seq) is int else None


def _after_rotation(path: str, last_seq: int, emit_lines: Any) -> tuple[Any, tuple[int, int] | None]:
    """Open the new file and first read what was rotated between it and the last record shown.

    Files are told apart by the number of their first record, not by their
    names (which shift while we look): walking ``PATH.1``, ``PATH.2``, ...
    until a file starts at or before the next record to show can meet a
    file twice (printing is deduplicated by number) but never miss one. A
    name missing in the middle of a rotation makes the walk start again.
    """
    new = None
    for _ in range(ROTATION_RETRIES):
        try:
            new = open(path, "rb")  # noqa: SIM115 - handed to the caller, which closes it
            break
        except FileNotFoundError:
            time.sleep(ROTATION_PAUSE)  # renamed away, not yet created again
    if new is None:
        return None, None
    st = os.fstat(new.fileno())
    first_new = _first_seq(new)
    if first_new is None or first_new > last_seq + 1:
        found: list[tuple[int, bytes]] = []
        for _ in range(ROTATION_RETRIES):
            found, reached = [], False
            for n in itertools.count(1):  # as many as retention kept (audit_keep_days may keep more than audit_keep)
                try:
                    with open(f"{path}.{n}", "rb") as fh:
                        first = _first_seq(fh)
                        found.append((first if first is not None else -1, fh.read()))
                except FileNotFoundError:
                    break
                if first is not None and first <= last_seq + 1:
                    reached = True
                    break
            if reached:
                break
            time.sleep(ROTATION_PAUSE)  # a gap while names shift, or retention deleted it: look again
        for _first, data in sorted(found, key=lambda item: item[0]):
            emit_lines(data.split(b"\n"))
    return new, (st.st_dev, st.st_ino)


@audit.command("verify")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.pass_context
def verify(ctx: click.Context, path: str | None) -> None:
    """Check the hash chain of the trail (exit 0 intact, 1 tampered).

    Without PATH, the live log and its rotated files are checked, with the
    anchor the broker keeps (so a cut tail is found), and their owner and
    modes. With PATH (a copy), PATH.N ... PATH and PATH.head when present.
    """
    _require_root()
    live = path is None
    target = _paths(ctx).audit_log if path is None else path
    report = auditlog.verify_set(target)
    problems = list(report.problems)
    if live:
        problems += permission_problems(target)
    for note in report.notes:
        click.echo(f"note: {note}")
    for problem in problems:
        click.echo(problem)
    files = len(report.files)
    span = f"records {report.first_seq}..{report.last_seq}" if report.first_seq is not None else "no records"
    if problems:
        raise PrivsepError(
            f"audit verify: {len(problems)} problem(s) in {files} file(s) ({span}): NOT intact", EX_FAILED
        )
    anchored = " and the anchor" if os.path.exists(auditlog.head_path(target)) else " (no anchor file)"
    click.echo(f"audit verify: intact: {report.records} records in {files} file(s) ({span}); chain{anchored} match")


def permission_problems(path: str) -> list[str]:
    """The log directory and files must belong to mcp-broker and be private (0700 / 0600)."""
    try:
        broker_uid = pwd.getpwnam(BROKER_USER).pw_uid
    except KeyError:
        return [f"system user {BROKER_USER} is missing"]
    problems = []
    directory = os.path.dirname(path) or "."
    entries = [(directory, True)] + [(f, False) for f in auditlog.log_files(path)]
    if os.path.lexists(auditlog.head_path(path)):
        entries.append((auditlog.head_path(path), False))
    for name, is_dir in entries:
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            continue
        kind_ok = stat.S_ISDIR(st.st_mode) if is_dir else stat.S_ISREG(st.st_mode)
        if not kind_ok:
            problems.append(f"{name}: not a {'directory' if is_dir else 'regular file'}")
        if st.st_uid != broker_uid:
            problems.append(f"{name}: owned by uid {st.st_uid}, not by {BROKER_USER}")
        if st.st_mode & 0o077:
            want = "0700" if is_dir else "0600"
            problems.append(f"{name}: mode {stat.S_IMODE(st.st_mode):04o}, should be {want} (other users can reach it)")
    return problems
