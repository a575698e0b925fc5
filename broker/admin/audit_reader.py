"""``mcp-brokerctl audit``: read, filter, follow and verify the audit trail (root only).

The commands read the files directly (``/var/log/mcp-privsep/audit.jsonl``
and its rotated set), so they work while the daemon is down::

    mcp-brokerctl audit [-n N] [--follow] [--caller U] [--tool S.T] [--decision D]
                        [--since T] [--until T] [--json]
    mcp-brokerctl audit verify [PATH]

Times are ISO 8601 (UTC unless an offset is given, like the log) or
relative to now (``90s``, ``15m``, ``1h``, ``2d``, ``1w``). ``verify``
exits 0 when the chain is intact and 1 naming ``file:line`` and what is
wrong otherwise.
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


def table_row(rec: dict[str, Any]) -> str:
    ts = str(rec.get("ts", "")).replace("T", " ").rstrip("Z")
    ms = rec.get("duration_ms")
    detail = rec.get("reason") or rec.get("rule") or ""
    if rec.get("reason") and rec.get("rule"):
        detail = f"{rec['rule']}: {rec['reason']}"
    row = _COLUMNS.format(
        ts,
        str(rec.get("caller", "-")),
        str(rec.get("op", "-")),
        str(rec.get("tool") or "-"),
        str(rec.get("decision", "-")),
        "" if rec.get("exit") is None else str(rec["exit"]),
        str(rec.get("outcome") or "-"),
        "" if ms is None else f"{ms:.1f}" if isinstance(ms, int | float) else str(ms),
        " ".join(str(detail).split()),
    )
    return row.rstrip()


def _emit(raw: bytes, rec: dict[str, Any] | None, as_json: bool) -> None:
    if as_json:
        click.echo(raw.decode("utf-8", "replace"))
    elif rec is None:
        click.echo(f"(not a record: {raw[:80].decode('utf-8', 'replace')!r})")
    else:
        click.echo(table_row(rec))


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
@click.option("--json", "as_json", is_flag=True, help="Print the records as stored, one JSON object a line.")
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
        _emit(raw, rec, as_json)
    if follow:
        sys.stdout.flush()
        _follow(path, start, newest, wanted, as_json)


def _position(path: str) -> tuple[tuple[int, int] | None, int]:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None, 0
    return (st.st_dev, st.st_ino), st.st_size


def _follow(path: str, start: tuple[tuple[int, int] | None, int], after: int, wanted: Filter, as_json: bool) -> None:
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
                _emit(raw, rec, as_json)

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
