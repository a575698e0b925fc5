"""The audit trail's format: canonical records, the hash chain, the set of files, verification.

Each record carries ``seq`` (its number in the whole trail), ``prev`` (the
previous record's hash) and ``hash`` (SHA-256 over ``prev`` and the record's
canonical JSON without ``hash``), so an edited, removed, reordered or
duplicated line breaks the chain and :func:`verify_files` names the place.
Beside ``audit.jsonl`` lies ``audit.jsonl.head``, the anchor holding the
number and hash of the last record written, so a tail cut at a line
boundary is detected too; rotated files are ``audit.jsonl.1`` and up (as many as
retention keeps: ``audit_keep`` at least, more while younger than ``audit_keep_days``).

The chain has no key: it proves that nothing was changed *by someone who did
not recompute it*. Root or mcp-broker can rewrite the whole trail; the
syslog mirror (:mod:`broker.daemon.audit.syslog`) is the copy that leaves the box.
Read by the writer and by ``mcp-brokerctl audit``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

GENESIS = "0" * 64
HEAD_FORMAT = "{seq:020d} {hash}\n"


def canonical(record: dict[str, Any]) -> str:
    """The exact text a record's hash covers (and the line written)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def chain_hash(prev: str, record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return body_hash(prev, canonical(body))


def body_hash(prev: str, body: str) -> str:
    """The hash of a record whose canonical text without ``hash`` is ``body``."""
    return hashlib.sha256((prev + "\n" + body).encode()).hexdigest()


def new_request_id() -> str:
    """64 random bits as 16 hex digits (what uuid4().hex[:16] gave, at a tenth of the cost)."""
    return os.urandom(8).hex()


#: bytes of the per-install key of the argument digests
KEY_BYTES = 32


def args_digest(args: Any, key: bytes) -> str:
    """Keyed digest of argument values, logged instead of the values themselves.

    An HMAC, not a bare hash: a short value (a PIN, a recipient) would be
    confirmed by hashing a guess once records leave the box (syslog, a SIEM);
    only the daemon holds the key (:func:`load_key`).
    """
    return "hmac-sha256:" + hmac.new(key, canonical({"a": args}).encode(), hashlib.sha256).hexdigest()[:32]


def load_key(path: str) -> bytes:
    """The install's digest key, made on first use (0600, the daemon's own)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            key = os.read(fd, KEY_BYTES + 1)
        finally:
            os.close(fd)
        if len(key) != KEY_BYTES:
            raise OSError(0, f"not a {KEY_BYTES}-byte digest key", path) from None
        return key
    try:
        key = os.urandom(KEY_BYTES)
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


def timestamp(t: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds, from one clock reading."""
    t = time.time() if t is None else t
    whole = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((t - whole) * 1000):03d}Z"


# --- the set of files -----------------------------------------------------------


def head_path(path: str) -> str:
    """The anchor file beside the log."""
    return path + ".head"


def rotated(path: str) -> list[tuple[int, str]]:
    """Existing rotated files ``PATH.N`` as (N, name), newest (N=1) first."""
    directory, base = os.path.split(path)
    pattern = re.compile(re.escape(base) + r"\.([1-9][0-9]{0,5})")
    found = []
    try:
        names = os.listdir(directory or ".")
    except FileNotFoundError:
        return []
    for name in names:
        m = pattern.fullmatch(name)
        if m:
            found.append((int(m.group(1)), os.path.join(directory, name)))
    return sorted(found)


def log_files(path: str) -> list[str]:
    """The whole trail, oldest file first: ``PATH.N`` ... ``PATH.1``, ``PATH``."""
    files = [name for _n, name in reversed(rotated(path))]
    if os.path.lexists(path):
        files.append(path)
    return files


def read_head(path: str) -> tuple[int, str] | None:
    """(seq, hash) of the last record the daemon wrote, from the anchor file."""
    try:
        with open(path, "rb") as fh:
            text = fh.read(4096).decode("ascii", "replace")
    except FileNotFoundError:
        return None
    m = re.fullmatch(r"(\d{1,20}) ([0-9a-f]{64})\n?", text)
    if m is None:
        raise ValueError(f"{path}: not an audit anchor")
    return int(m.group(1)), m.group(2)


def parse_record(raw: bytes) -> dict[str, Any] | None:
    """A record with a usable chain (``hash``, ``prev``), or None."""
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("hash"), str) or not isinstance(rec.get("prev"), str):
        return None
    return rec


def record_seq(rec: dict[str, Any]) -> int | None:
    value = rec.get("seq")
    return value if type(value) is int else None


def reverse_lines(fh: Any, end: int | None = None, block: int = 65536) -> Iterator[bytes]:
    """Lines of an open binary file from the last to the first, without their newlines.

    Reads backwards in blocks, so the tail of a large file costs little. A
    last line without its newline is yielded too (it is what is there).
    """
    size = os.fstat(fh.fileno()).st_size if end is None else end
    pos = size
    rest = b""
    at_end = True
    while pos > 0:
        step = min(block, pos)
        pos -= step
        fh.seek(pos)
        parts = (fh.read(step) + rest).split(b"\n")
        rest = parts.pop(0)
        if at_end and parts and parts[-1] == b"":
            parts.pop()  # the newline that ends the file
        at_end = False
        yield from reversed(parts)
    if size > 0:
        yield rest


def last_record(path: str) -> dict[str, Any] | None:
    """The last non-blank line of a file as a record (None: no such line, or not a record)."""
    try:
        with open(path, "rb") as fh:
            for raw in reverse_lines(fh):
                if raw.strip():
                    return parse_record(raw)
    except FileNotFoundError:
        pass
    return None


#: how far back the daemon looks for calls left without an outcome, at most (to the last start record)
RECOVERY_SCAN_BYTES = 64 * 1024 * 1024


def unfinished_calls(path: str, limit: int = RECOVERY_SCAN_BYTES) -> list[dict[str, Any]]:
    """The intent records, since the daemon's last start, that have no outcome record: oldest first.

    Reads the trail backwards (the live file, then the rotated ones) until a
    ``start`` record or ``limit`` bytes; a call can be left without an
    outcome only by a daemon that stopped after its last start.
    """
    finished: set[str] = set()
    found: list[dict[str, Any]] = []
    read = 0
    for name in reversed(log_files(path)):
        with open(name, "rb") as fh:
            for raw in reverse_lines(fh):
                read += len(raw) + 1
                rec = parse_record(raw) if raw.strip() else None
                if rec is not None:
                    if rec.get("op") == "start":
                        return found[::-1]
                    request = str(rec.get("id"))
                    if rec.get("phase") == "outcome":
                        finished.add(request)
                    elif rec.get("phase") == "intent" and request not in finished:
                        found.append(rec)
                if read > limit:
                    return found[::-1]
    return found[::-1]


# --- verification ---------------------------------------------------------------------

#: problems listed before the rest are only counted
MAX_PROBLEMS = 1000


@dataclass
class _Line:
    file: str
    lineno: int
    rec: dict[str, Any] | None
    error: str = ""
    blank: bool = False

    @property
    def where(self) -> str:
        return f"{self.file}:{self.lineno}"


@dataclass
class Report:
    """What :func:`verify_files` found."""

    files: list[str]
    records: int = 0
    first_seq: int | None = None
    last_seq: int | None = None
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: ids of calls whose intent has no outcome record (not a break of the chain)
    dangling: list[str] = field(default_factory=list)
    more: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def problem(self, text: str) -> None:
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(text)
        else:
            self.more += 1


def _lines(files: list[str], report: Report | None) -> Iterator[_Line]:
    """Every line of the files, parsed, streaming; a cut last line is reported once (with ``report``)."""
    for name in files:
        with open(name, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                if not raw.endswith(b"\n"):
                    if report is not None:
                        report.problem(
                            f"{name}:{n}: the last line is cut ({len(raw)} bytes without an end of line): "
                            "the tail was truncated or a write was torn"
                        )
                    break
                if not raw.strip():
                    yield _Line(name, n, None, "empty line (inserted, or a line was cut out)", blank=True)
                    continue
                rec = parse_record(raw)
                yield _Line(name, n, rec, "" if rec is not None else "not a valid audit record (edited or cut)")


def verify_files(files: list[str], head: tuple[int, str] | None = None) -> Report:
    """Check the chain over ``files`` (oldest first) and against the anchor ``head``.

    Every problem names ``file:line`` and says what is wrong: an edited line
    (hash mismatch or invalid record), removed lines (a gap in ``seq``),
    reordered or duplicated lines, a beginning that is neither the genesis
    nor a rotation, and a tail shorter than the anchor says (cut). Two
    streaming passes: the first maps each record number to its place and
    hash, the second checks every line against its neighbours.
    """
    report = Report(files=list(files))
    where_seq: dict[int, tuple[str, str]] = {}  # seq -> (file:line, hash) of its first occurrence
    for ln in _lines(files, None):
        if ln.rec is not None and (s := record_seq(ln.rec)) is not None:
            where_seq.setdefault(s, (ln.where, str(ln.rec["hash"])))
    seen: set[int] = set()
    intents: dict[str, str] = {}  # id -> file:line of a call's intent that has no outcome (yet)
    prev_line: _Line | None = None
    prev_seq: int | None = None
    last_valid: _Line | None = None
    for ln in _lines(files, report):
        rec = ln.rec
        if rec is None:
            report.problem(f"{ln.where}: {ln.error}")
            if not ln.blank:  # an unreadable record still took a number
                prev_seq = prev_seq + 1 if prev_seq is not None else None
                prev_line = ln
            continue
        report.records += 1
        seq = record_seq(rec)
        if chain_hash(str(rec["prev"]), rec) != rec["hash"]:
            report.problem(f"{ln.where}: edited: the line does not match its hash (record {seq})")
        if prev_line is None:
            if rec["prev"] == GENESIS:
                pass
            elif rec.get("op") == "rotate":
                report.notes.append(
                    f"{ln.where}: the trail starts after a rotation; records before {seq} are no longer kept"
                )
            else:
                report.problem(
                    f"{ln.where}: lines before this one were removed: the trail starts at record {seq}, "
                    "which is neither the first record nor a rotation"
                )
        elif seq is not None and prev_seq is not None:
            _check_order(ln, seq, prev_seq, seen, where_seq, report)
        elif prev_line.rec is not None and rec["prev"] != prev_line.rec["hash"]:
            report.problem(f"{ln.where}: chain broken: a line before it was removed, reordered or edited")
        if seq is not None:
            before = where_seq.get(seq - 1)
            if before is not None and rec["prev"] != before[1]:
                report.problem(
                    f"{ln.where}: chain broken: record {seq} does not follow record {seq - 1} ({before[0]}): "
                    "one of them was replaced"
                )
            if report.first_seq is None:
                report.first_seq = seq
            seen.add(seq)
        if rec.get("op") == "recover":
            report.notes.append(f"{ln.where}: the broker recovered at start-up: {rec.get('reason', '')}")
        phase = rec.get("phase")
        if phase == "intent":
            intents[str(rec.get("id"))] = ln.where
        elif phase == "outcome":
            intents.pop(str(rec.get("id")), None)
        prev_line, prev_seq, last_valid = ln, seq, ln
    if last_valid is not None and last_valid.rec is not None:
        report.last_seq = record_seq(last_valid.rec)
    if head is not None:
        _check_head(head, last_valid, where_seq, report)
    for request, where in intents.items():
        report.dangling.append(request)
        report.notes.append(
            f"{where}: call {request} reached its server but has no outcome record: the broker stopped while it "
            "ran (its next start records the outcome as unknown)"
        )
    if report.more:
        report.problems.append(f"... and {report.more} more problem(s)")
    return report


def _check_order(
    ln: _Line, seq: int, prev_seq: int, seen: set[int], where_seq: dict[int, tuple[str, str]], report: Report
) -> None:
    if seq == prev_seq + 1:
        return
    if seq in seen:
        report.problem(f"{ln.where}: record {seq} appears a second time (a line was duplicated)")
    elif seq <= prev_seq:
        report.problem(f"{ln.where}: lines reordered: record {seq} comes after record {prev_seq} (the line before it)")
    else:
        missing = range(prev_seq + 1, seq)
        gone = [s for s in missing if s not in where_seq]
        if gone:
            span = f"record {gone[0]}" if len(gone) == 1 else f"records {gone[0]}..{gone[-1]}"
            report.problem(f"{ln.where}: {len(gone)} line(s) removed before this line ({span} missing)")
        # records found elsewhere are reported where they sit, as out of order


def _check_head(
    head: tuple[int, str], last: _Line | None, where_seq: dict[int, tuple[str, str]], report: Report
) -> None:
    head_seq, head_hash = head
    last_seq = report.last_seq or 0
    where = last.where if last is not None else (report.files[-1] if report.files else "(no audit file)")
    if last_seq < head_seq:
        report.problem(
            f"{where}: the tail was cut: the trail ends at record {last_seq} but the broker wrote through record "
            f"{head_seq} ({head_seq - last_seq} record(s) missing at the end)"
        )
        return
    anchored = where_seq.get(head_seq)
    if anchored is not None and anchored[1] != head_hash:
        report.problem(
            f"{anchored[0]}: record {head_seq} is not the one the broker wrote (its hash differs from the anchor)"
        )


def verify_set(path: str, use_head: bool = True, attempts: int = 3) -> Report:
    """Verify the live trail (``PATH.N`` ... ``PATH``) and its anchor.

    The anchor is read before the files, so a daemon appending meanwhile
    only makes the files longer; a rotation in the middle is retried.
    """
    report = Report(files=[])
    for _ in range(attempts):
        anchor_problem = ""
        try:
            head = read_head(head_path(path)) if use_head else None
        except ValueError as exc:
            head, anchor_problem = None, f"{exc} (the anchor was edited)"
        files = log_files(path)
        before = [_identity(f) for f in files]
        report = verify_files(files, head)
        if anchor_problem:
            report.problems.append(anchor_problem)
        if [_identity(f) for f in files] == before and log_files(path) == files:
            break
    return report


def _identity(name: str) -> tuple[int, int] | None:
    try:
        st = os.stat(name)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def verify(path: str) -> list[str]:
    """Check the chain of one audit file; return problems (empty: intact)."""
    return verify_files([path]).problems
