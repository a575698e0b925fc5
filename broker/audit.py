"""The audit trail: one hash-chained JSON line per decision, fsynced.

Each record carries ``seq`` (its number in the whole trail), ``prev`` (the
previous record's hash) and ``hash`` (SHA-256 over ``prev`` and the record's
canonical JSON without ``hash``), so an edited, removed, reordered or
duplicated line breaks the chain and :func:`verify_files` names the place.
A record is written with one ``write`` on an ``O_APPEND`` descriptor and
fsynced before the caller gets its answer; appends are serialised, so
concurrent calls never interleave.

Beside ``audit.jsonl`` the daemon keeps ``audit.jsonl.head``, an anchor
holding the number and hash of the last record written, so that a tail cut
at a line boundary is detected too. Rotation by size renames the file to
``audit.jsonl.1`` (older ones shift up to ``audit_keep``), and the new file
starts with a ``rotate`` record that chains from the old file's last hash,
so the chain runs across the rotated set.

A full disk never lets a call run unrecorded: a call is admitted only while
the log's filesystem has room, and the log keeps ``RESERVE_BYTES`` allocated
past its end (``fallocate`` with ``FALLOC_FL_KEEP_SIZE``), so the records of
calls already running still fit when the disk fills during them.

The chain has no key: it proves that nothing was changed *by someone who did
not recompute it*. Root or mcp-broker can rewrite the whole trail; the
syslog mirror (:class:`SyslogMirror`) is the copy that leaves the box.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import socket
import stat
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from broker.errors import Unavailable

log = logging.getLogger("mcp-brokerd.audit")

GENESIS = "0" * 64
#: fields the log itself sets; a caller's field of the same name is kept under ``field_NAME``
RESERVED = ("ts", "seq", "prev", "hash")
#: RFC 5424 structured-data id; 32473 is the private enterprise number reserved for examples (RFC 5612)
SD_ID = "mcp-privsep@32473"
SYSLOG_FACILITIES = {
    "kern": 0,
    "user": 1,
    "daemon": 3,
    "auth": 4,
    "syslog": 5,
    "authpriv": 10,
    **{f"local{i}": 16 + i for i in range(8)},
}
#: severity by decision; anything else is "notice"
_SEVERITY = {
    "allow": 6,
    "pending": 6,
    "approved": 6,
    "pin": 6,
    "unfreeze": 6,
    "rotate": 6,
    "deny": 4,
    "rejected": 4,
    "usage": 4,
    "freeze": 4,
    "config_error": 3,
    "unavailable": 3,
    "error": 3,
    "recover": 3,
}
SYSLOG_MAX_BYTES = 8192
_HEAD_FORMAT = "{seq:020d} {hash}\n"
#: space kept allocated past the end of the log (fallocate, keep size) so that
#: the records of calls already admitted fit even if the disk fills meanwhile
RESERVE_BYTES = 256 * 1024
#: a call is admitted only while this much is reserved and this much is free besides
RESERVE_LOW = 64 * 1024
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


def canonical(record: dict[str, Any]) -> str:
    """The exact text a record's hash covers (and the line written)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev: str, record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256((prev + "\n" + canonical(body)).encode()).hexdigest()


def new_request_id() -> str:
    """64 random bits as 16 hex digits (what uuid4().hex[:16] gave, at a tenth of the cost)."""
    return os.urandom(8).hex()


def args_digest(args: Any) -> str:
    """Digest of argument values, logged instead of the values themselves."""
    return "sha256:" + hashlib.sha256(canonical({"a": args}).encode()).hexdigest()[:32]


def timestamp(t: float | None = None) -> str:
    """RFC 3339 UTC with milliseconds, from one clock reading."""
    t = time.time() if t is None else t
    whole = int(t)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{int((t - whole) * 1000):03d}Z"


def options(settings: Any) -> dict[str, Any]:
    """AuditLog keyword arguments from the ``[broker]`` settings."""
    return {
        "max_bytes": settings.audit_max_bytes,
        "keep": settings.audit_keep,
        "syslog_socket": settings.audit_syslog_socket if settings.audit_syslog else None,
        "syslog_facility": settings.audit_syslog_facility,
    }


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


def _parse(raw: bytes) -> dict[str, Any] | None:
    """A record with a usable chain (``hash``, ``prev``), or None."""
    try:
        rec = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(rec, dict) or not isinstance(rec.get("hash"), str) or not isinstance(rec.get("prev"), str):
        return None
    return rec


def _seq(rec: dict[str, Any]) -> int | None:
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


def _last_record(path: str) -> dict[str, Any] | None:
    """The last non-blank line of a file as a record (None: no such line, or not a record)."""
    try:
        with open(path, "rb") as fh:
            for raw in reverse_lines(fh):
                if raw.strip():
                    return _parse(raw)
    except FileNotFoundError:
        pass
    return None


# --- syslog -----------------------------------------------------------------------


def _sd_escape(value: Any) -> str:
    if isinstance(value, list):
        value = ",".join(str(v) for v in value)
    text = "".join(ch if ch >= " " and ch != "\x7f" else " " for ch in str(value))
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def _header_token(value: str, limit: int) -> str:
    token = "".join(ch for ch in value if "!" <= ch <= "~")[:limit]
    return token or "-"


#: record fields copied into the structured data, in this order
SD_FIELDS = (
    "seq",
    "id",
    "caller",
    "uid",
    "op",
    "verb",
    "tool",
    "decision",
    "rule",
    "mode",
    "exit",
    "outcome",
    "duration_ms",
    "arg_keys",
    "args_size",
    "args_digest",
    "result_size",
    "approval",
    "hash",
)


def format_syslog(
    record: dict[str, Any],
    facility: int,
    hostname: str,
    app: str = "mcp-brokerd",
    procid: int | None = None,
    limit: int = SYSLOG_MAX_BYTES,
) -> bytes:
    """One RFC 5424 message: the key fields as structured data, the whole record as MSG.

    ``<PRI>1 TIMESTAMP HOST APP PROCID MSGID [mcp-privsep@32473 k="v" ...] {json}``.
    A message over ``limit`` bytes drops argument values and shortens the reason
    in MSG (``"msg_truncated": true``); the structured data is always complete.
    """
    severity = _SEVERITY.get(str(record.get("decision")), 5)
    pri = facility * 8 + severity
    params = " ".join(
        f'{key}="{_sd_escape(record[key])}"' for key in SD_FIELDS if key in record and record[key] is not None
    )
    head = (
        f"<{pri}>1 {record.get('ts') or timestamp()} {_header_token(hostname, 255)} {_header_token(app, 48)} "
        f"{os.getpid() if procid is None else procid} {_header_token(str(record.get('op') or ''), 32)} "
        f"[{SD_ID} {params}] "
    ).encode("utf-8", "replace")
    body = canonical(record).encode("utf-8", "replace")
    if len(head) + len(body) > limit:
        short = {k: v for k, v in record.items() if k != "args"}
        if isinstance(short.get("reason"), str):
            short["reason"] = short["reason"][:256]
        short["msg_truncated"] = True
        body = canonical(short).encode("utf-8", "replace")
        if len(head) + len(body) > limit:
            minimal = {k: short[k] for k in (*SD_FIELDS, "ts", "prev") if k in short} | {"msg_truncated": True}
            body = canonical(minimal).encode("utf-8", "replace")
    return head + body


class SyslogMirror:
    """Copies records to a syslog socket (``/dev/log``); never blocks, never raises.

    A missing socket, a full receive queue or any other error drops the copy
    and counts it (``dropped``); the file is the record of truth.
    """

    def __init__(self, address: str, facility: str = "authpriv", hostname: str | None = None) -> None:
        self.address = address
        self.facility = SYSLOG_FACILITIES[facility]
        self.hostname = hostname or socket.gethostname()
        self.sent = 0
        self.dropped = 0
        self._sock: socket.socket | None = None

    def send(self, record: dict[str, Any]) -> bool:
        try:
            message = format_syslog(record, self.facility, self.hostname)
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(message, socket.MSG_DONTWAIT, self.address)
        except (OSError, ValueError) as exc:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.warning("audit syslog copy dropped (%d so far): %s: %s", self.dropped, self.address, exc)
            return False
        self.sent += 1
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


_libc_fallocate: Any = None


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2), which the os module offers only without its mode (posix_fallocate)."""
    global _libc_fallocate  # looked up once, on first use
    if _libc_fallocate is None:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.fallocate
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        func.restype = ctypes.c_int
        _libc_fallocate = (func, ctypes)
    func, ctypes = _libc_fallocate
    if func(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# --- the writer --------------------------------------------------------------------


class AuditLog:
    """Appends records to the audit file; a failure refuses the call."""

    def __init__(
        self,
        path: str,
        *,
        max_bytes: int = 0,
        keep: int = 10,
        syslog_socket: str | None = None,
        syslog_facility: str = "authpriv",
    ) -> None:
        self.path = path
        self.head = head_path(path)
        self._lock = threading.Lock()
        self._queue: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._fd = -1
        self._head_fd = -1
        self._ino: tuple[int, int] | None = None
        self._prev = GENESIS
        self._seq = 0
        self._size = 0
        #: end of the space known to be allocated for this file (0: nothing reserved)
        self._reserved_to = 0
        self._can_reserve = True
        #: why the last call was refused for want of room ("" while there is room), for status
        self.room_problem = ""
        self.max_bytes = max_bytes
        self.keep = keep
        self.syslog: SyslogMirror | None = None
        self.healthy = False
        self.error = ""
        self.configure(max_bytes=max_bytes, keep=keep, syslog_socket=syslog_socket, syslog_facility=syslog_facility)
        self.open()

    @property
    def seq(self) -> int:
        """Number of the last record written."""
        return self._seq

    @property
    def last_hash(self) -> str:
        return self._prev

    def configure(self, *, max_bytes: int, keep: int, syslog_socket: str | None, syslog_facility: str) -> None:
        """Apply (re-read) settings; the open file and the chain are kept."""
        with self._lock:
            self.max_bytes = max(0, int(max_bytes))
            self.keep = max(0, int(keep))
            current = self.syslog
            if syslog_socket is None:
                if current is not None:
                    current.close()
                self.syslog = None
            elif (
                current is None
                or current.address != syslog_socket
                or current.facility != (SYSLOG_FACILITIES[syslog_facility])
            ):
                if current is not None:
                    current.close()
                self.syslog = SyslogMirror(syslog_socket, syslog_facility)

    # --- opening and recovery -------------------------------------------------

    def open(self) -> None:
        with self._lock:
            self._open_locked()

    def _open_locked(self) -> None:
        try:
            self._open_files()
            self.healthy = True
            self.error = ""
        except OSError as exc:
            self._close_locked()
            self.healthy = False
            self.error = f"{exc.filename or self.path}: {exc.strerror or exc}"
            log.error("audit log unusable: %s", self.error)

    def _open_files(self) -> None:
        was_open = self._seq > 0
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._fd = fd
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, "not a regular file", self.path)
        if st.st_uid != os.geteuid():
            raise OSError(0, f"owned by uid {st.st_uid}, not by the broker (uid {os.geteuid()})", self.path)
        if st.st_mode & 0o077:
            os.fchmod(fd, 0o600)
            log.warning("%s was accessible by group or other; mode set to 0600", self.path)
        self._ino = (st.st_dev, st.st_ino)
        notes: dict[str, Any] = {}
        size = st.st_size
        last: dict[str, Any] | None = None
        if size:
            last, size, torn = self._cut_torn_tail(fd, size)
            if torn:
                notes["dropped_bytes"] = len(torn)
                notes["dropped_sha256"] = hashlib.sha256(torn).hexdigest()
                notes["reason"] = (
                    "the file ended in a partial line (a write cut by a crash, never acknowledged); it was removed"
                )
            if last is None:
                notes["reason"] = "the last line of the log is not a valid record"
        continued_from_rotated = False
        if size == 0:
            previous = rotated(self.path)
            if previous:
                last = _last_record(previous[0][1])
                continued_from_rotated = last is not None
        seq, prev = (0, GENESIS)
        if last is not None:
            seq, prev = _seq(last) or 0, str(last["hash"])
        anchor = self._read_anchor()
        if was_open and self._seq > anchor[0]:
            anchor = (self._seq, self._prev)  # reopening after the file vanished: memory knows best
        if anchor[0] > seq:
            notes["reason"] = (
                f"the log ends at record {seq} but record {anchor[0]} was written: "
                f"records {seq + 1}..{anchor[0]} are missing from {self.path}"
            )
            notes["missing"] = [seq + 1, anchor[0]]
            seq, prev = anchor
        self._seq, self._prev, self._size = seq, prev, size
        self._reserved_to = 0
        self._head_fd = os.open(self.head, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        if os.fstat(self._head_fd).st_mode & 0o077:
            os.fchmod(self._head_fd, 0o600)
        if notes:
            log.warning("audit log recovered: %s", notes["reason"])
            self._write_record({"id": new_request_id(), "op": "recover", "decision": "recover", **notes})
        elif continued_from_rotated:
            self._write_record(
                {"id": new_request_id(), "op": "rotate", "decision": "rotate", "reason": "continued after a rotation"}
            )

    def _cut_torn_tail(self, fd: int, size: int) -> tuple[dict[str, Any] | None, int, bytes]:
        """Remove a partial last line; return the last record, the new size and the removed bytes."""
        with os.fdopen(os.dup(fd), "rb") as fh:
            lines = reverse_lines(fh, size)
            fh.seek(size - 1)
            torn = b""
            if fh.read(1) != b"\n":
                torn = next(lines)
            last = None
            for raw in lines:
                if raw.strip():
                    last = _parse(raw)
                    break
        if torn:
            size -= len(torn)
            os.ftruncate(fd, size)
            os.fsync(fd)
        return last, size, torn

    def _read_anchor(self) -> tuple[int, str]:
        try:
            found = read_head(self.head)
        except (OSError, ValueError) as exc:
            log.warning("ignoring the audit anchor: %s", exc)
            return 0, GENESIS
        return found or (0, GENESIS)

    # --- writing ---------------------------------------------------------------

    def _write_record(self, record: dict[str, Any]) -> None:
        self._write_records([record])

    def _write_records(self, records: list[dict[str, Any]]) -> None:
        """Seal ``records`` in order, append them with one write and one fsync; all or none."""
        seq, prev = self._seq, self._prev
        ts = timestamp()
        lines = []
        for record in records:
            record["ts"] = ts
            record["seq"] = seq + 1
            record["prev"] = prev
            record["hash"] = chain_hash(prev, record)
            seq, prev = record["seq"], record["hash"]
            lines.append((canonical(record) + "\n").encode("utf-8", "surrogateescape"))
        data = b"".join(lines)
        start = self._size
        try:
            view = memoryview(data)
            while view:
                written = os.write(self._fd, view)
                if written <= 0:
                    raise OSError(0, "short write to the audit log")
                view = view[written:]
            os.fsync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):  # leave no partial or unsynced line behind
                os.ftruncate(self._fd, start)
            raise
        self._size = start + len(data)
        self._seq, self._prev = seq, prev
        try:
            os.pwrite(self._head_fd, _HEAD_FORMAT.format(seq=self._seq, hash=self._prev).encode(), 0)
        except OSError as exc:
            log.warning("audit anchor not updated: %s", exc)
        if self.syslog is not None:
            for record in records:
                self.syslog.send(record)

    def _rotate(self) -> None:
        """audit.jsonl -> .1 -> .2 ...; the new file starts with a record chaining from the old one."""
        old_size = self._size
        self._release()
        os.close(self._fd)
        self._fd = -1
        directory = os.path.dirname(self.path) or "."
        if self.keep == 0:
            os.unlink(self.path)
        else:
            for n, name in reversed(rotated(self.path)):
                if n >= self.keep:
                    os.unlink(name)
                else:
                    os.rename(name, f"{self.path}.{n + 1}")
            os.rename(self.path, self.path + ".1")
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        self._fd = fd
        st = os.fstat(fd)
        self._ino, self._size = (st.st_dev, st.st_ino), st.st_size
        self._reserved_to = 0
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._write_record(
            {
                "id": new_request_id(),
                "op": "rotate",
                "decision": "rotate",
                "rotated_to": os.path.basename(self.path) + ".1" if self.keep else None,
                "rotated_bytes": old_size,
            }
        )

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Seal and append one record durably (any thread); return it with ts, seq, prev and hash."""
        self.write_many([record])
        return record

    def write_many(self, records: list[dict[str, Any]]) -> None:
        """Seal and append records durably, in order, with one fsync (rotating between them if due)."""
        with self._lock:
            if self._fd < 0:
                raise OSError(0, self.error or "audit log not open")
            batch: list[dict[str, Any]] = []
            size = self._size
            for record in records:
                line_len = len(canonical(record)) + 200
                if self.max_bytes and size > 0 and size + line_len > self.max_bytes:
                    if batch:
                        self._write_records(batch)
                        batch = []
                    self._rotate()
                    size = self._size
                batch.append(record)
                size += line_len
            if batch:
                self._write_records(batch)

    async def record(self, **fields: Any) -> None:
        """Write one record durably; raise Unavailable when that fails.

        Group commit: records that arrive while a write is in progress go out
        together in the next write, with one fsync, so concurrent calls share
        the cost of durability instead of queueing for it one by one. A lone
        record is written on the event loop itself: measured with ``make
        bench``, the two thread hand-offs cost a sequential call more than the
        fsync blocks the loop (the call has to wait for its record anyway).
        """
        record = {(f"field_{k}" if k in RESERVED else k): v for k, v in fields.items()}
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._queue.append((record, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        await done

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                if len(batch) == 1:
                    # a lone record: writing it here saves two thread hand-offs on the call's path;
                    # under load records queue up and go out in batches from a worker thread
                    self.write_many([batch[0][0]])
                else:
                    await asyncio.to_thread(self.write_many, [r for r, _ in batch])
            except BaseException as exc:  # every waiter gets an answer, whatever went wrong
                self.healthy = False
                if isinstance(exc, OSError):
                    self.error = f"{self.path}: {exc.strerror or exc}"
                else:
                    self.error = f"{self.path}: {type(exc).__name__}"
                log.error("audit write failed: %s", self.error)
                for _, done in batch:
                    if not done.done():
                        done.set_exception(
                            Unavailable("broker unavailable: the audit log cannot be written, so no call is served")
                        )
                if not isinstance(exc, Exception):
                    raise
                continue
            self.healthy = True
            for _, done in batch:
                if not done.done():
                    done.set_result(None)

    def _needs_reopen(self) -> bool:
        """The open file was deleted, or its path now names another file (moved away)."""
        try:
            st = os.fstat(self._fd) if self._fd >= 0 else None
            now = os.stat(self.path)
        except OSError:
            return True
        return st is None or st.st_nlink == 0 or (now.st_dev, now.st_ino) != self._ino

    def check(self) -> None:
        """Refuse to serve when the audit file is gone or unwritable; reopen a replaced file."""
        if self._needs_reopen():
            with self._lock:  # a rotation in progress finishes first; then look again
                if self._needs_reopen():
                    self._close_locked()
                    self._open_locked()
        if not self.healthy:
            raise Unavailable("broker unavailable: the audit log cannot be written, so no call is served")
        self.ensure_room(RESERVE_LOW)

    def ensure_room(self, need: int) -> None:
        """Admit a call only if its records will fit: ``need`` bytes reserved, and room on the disk besides.

        Raises Unavailable (69) otherwise. The reservation is topped up with
        ``fallocate`` when it runs low; where the filesystem cannot do that,
        free space alone is checked.
        """
        try:
            self._ensure_room(need)
        except Unavailable as exc:
            self.room_problem = exc.message
            raise
        self.room_problem = ""

    def _ensure_room(self, need: int) -> None:
        fd = self._fd
        if fd < 0:
            raise Unavailable("broker unavailable: the audit log cannot be written, so no call is served")
        try:
            st = os.fstatvfs(fd)
        except OSError as exc:
            raise Unavailable(
                f"broker unavailable: the audit log's filesystem cannot be checked ({exc.strerror})"
            ) from None
        if st.f_bavail * st.f_frsize < need:
            raise Unavailable("broker unavailable: the audit log's filesystem is full, so no call is served")
        if not self._can_reserve or self._reserved_to - self._size >= need:
            return
        with self._lock:
            if self._fd < 0 or self._reserved_to - self._size >= need:
                return
            try:
                _fallocate(self._fd, _FALLOC_FL_KEEP_SIZE, self._size, max(RESERVE_BYTES, 2 * need))
            except OSError as exc:
                if exc.errno in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    self._can_reserve = False
                    log.warning("the audit log's filesystem cannot reserve space; only free space is checked")
                    return
                raise Unavailable(
                    f"broker unavailable: no room can be reserved for the audit log ({exc.strerror}), "
                    "so no call is served"
                ) from None
            self._reserved_to = self._size + max(RESERVE_BYTES, 2 * need)

    def _release(self) -> None:
        """Give back the space reserved past the end (lock held)."""
        if self._fd >= 0 and self._reserved_to > self._size:
            # ext4 frees blocks past the end on a same-size truncate and ignores a hole punched there;
            # tmpfs and xfs take the hole
            with contextlib.suppress(OSError):
                _fallocate(
                    self._fd,
                    _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
                    self._size,
                    self._reserved_to - self._size,
                )
            with contextlib.suppress(OSError):
                if os.fstat(self._fd).st_size == self._size:  # never cut what another writer may have added
                    os.ftruncate(self._fd, self._size)
        self._reserved_to = 0

    def _close_locked(self) -> None:
        for name in ("_fd", "_head_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
                setattr(self, name, -1)

    def close(self) -> None:
        with self._lock:
            self._release()
            self._close_locked()
            if self.syslog is not None:
                self.syslog.close()


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
                rec = _parse(raw)
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
        if ln.rec is not None and (s := _seq(ln.rec)) is not None:
            where_seq.setdefault(s, (ln.where, str(ln.rec["hash"])))
    seen: set[int] = set()
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
        seq = _seq(rec)
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
        prev_line, prev_seq, last_valid = ln, seq, ln
    if last_valid is not None and last_valid.rec is not None:
        report.last_seq = _seq(last_valid.rec)
    if head is not None:
        _check_head(head, last_valid, where_seq, report)
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
