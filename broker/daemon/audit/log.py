"""The audit trail: one hash-chained JSON line per decision, fsynced.

The record format and the chain are in :mod:`broker.daemon.audit.chain`.
A record is written with one ``write`` on an ``O_APPEND`` descriptor and
fsynced before the caller gets its answer; appends are serialised, so
concurrent calls never interleave.

Beside ``audit.jsonl`` the daemon keeps ``audit.jsonl.head``, an anchor
holding the number and hash of the last record written, so that a tail cut
at a line boundary is detected too. Rotation by size renames the file to
``audit.jsonl.1`` (older ones shift up to ``audit_keep``), and the new file
starts with a ``rotate`` record that chains from the old file's last hash,
so the chain runs across the rotated set.

Retention never outruns ``keep_days`` (``audit_keep_days``): a rotated file
goes only when it is beyond ``keep`` *and* its newest record (and its
mtime) is older than ``keep_days``; a younger one is kept, numbered on
(``.N+1``, ...), however many files that makes. So no volume of calls can
rotate away records younger than ``keep_days``; the disk fills instead, and
then calls are refused (below), and ``status`` warns before that
(:meth:`AuditLog.trail_status`: free space, and the days left at the
recent write rate).

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
import datetime as dt
import errno
import hashlib
import logging
import os
import stat
import threading
import time
from collections import deque
from typing import Any

from broker.core import wire
from broker.core.errors import Unavailable
from broker.daemon.audit.chain import (
    GENESIS,
    HEAD_FORMAT,
    body_hash,
    canonical,
    head_path,
    last_record,
    log_files,
    new_request_id,
    parse_record,
    read_head,
    record_seq,
    reverse_lines,
    rotated,
    timestamp,
)
from broker.daemon.audit.syslog import SYSLOG_FACILITIES, SyslogMirror

log = logging.getLogger("mcp-brokerd.audit")

#: fields the log itself sets; a caller's field of the same name is kept under ``field_NAME``
RESERVED = ("ts", "seq", "prev", "hash")
#: space kept allocated past the end of the log (fallocate, keep size) so that
#: the records of calls already admitted fit even if the disk fills meanwhile
RESERVE_BYTES = 256 * 1024
#: a call is admitted only while this much is reserved and this much is free besides
RESERVE_LOW = 64 * 1024
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
DAY = 86400.0
#: ``status`` warns when the log's filesystem has less free than this share of it, or ...
LOW_SPACE_SHARE = 0.10
#: ... than this many bytes, whichever is smaller
LOW_SPACE_BYTES = 1024**3
#: ... or when at the recent write rate it fills within this many days
LOW_SPACE_DAYS = 7.0
#: the write rate is measured over this window, from samples at least this far apart
RATE_WINDOW = DAY
RATE_SAMPLE = 60.0


def is_socket(path: str) -> bool:
    """``path`` names a socket now (the test of ``audit_syslog = "auto"``)."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def options(settings: Any) -> dict[str, Any]:
    """AuditLog keyword arguments from the ``[broker]`` settings.

    ``audit_syslog = "auto"`` (the default) mirrors when the socket exists
    now (at start or reload), ``true`` always (a missing socket is reported
    by ``status``), ``false`` never.
    """
    mode = settings.audit_syslog
    address = settings.audit_syslog_socket
    mirror = mode is True or (mode == "auto" and is_socket(address))
    return {
        "max_bytes": settings.audit_max_bytes,
        "keep": settings.audit_keep,
        "keep_days": settings.audit_keep_days,
        "syslog_socket": address if mirror else None,
        "syslog_facility": settings.audit_syslog_facility,
        "syslog_required": mode is True,
    }


def _size_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


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


def _seal(record: dict[str, Any], ts: str, seq: int, prev: str) -> bytes:
    """Number and chain one record (in place); return its line. What it holds can never fail the write.

    A caller's or a server's lone surrogate or non-finite number is replaced
    (and the record says so); a record that still cannot be written (a value
    of an unknown type) becomes a placeholder naming its id and op.
    """
    try:
        clean, fixed = wire.sanitize(record)
    except TypeError:
        clean, fixed = record, {}
    if fixed:
        record.clear()
        record.update(clean)
        record["sanitized"] = fixed
    record.update(ts=ts, seq=seq + 1, prev=prev)
    try:
        body = canonical(record)
    except (TypeError, ValueError) as exc:
        log.error("an audit record could not be serialised (%s); a placeholder is written", type(exc).__name__)
        placeholder = {
            "id": str(record.get("id", new_request_id()))[:64],
            "op": str(record.get("op", ""))[:64],
            "decision": "error",
            "reason": f"this record could not be serialised ({type(exc).__name__}); the broker wrote this instead",
            "ts": ts,
            "seq": seq + 1,
            "prev": prev,
        }
        record.clear()
        record.update(placeholder)
        body = canonical(record)
    record["hash"] = body_hash(prev, body)
    return (canonical(record) + "\n").encode("utf-8")


def _parse_ts(text: str) -> float:
    """A record's ``ts`` (RFC 3339 UTC, as :func:`timestamp` writes it) as a Unix time; ValueError otherwise."""
    return dt.datetime.fromisoformat(text).timestamp()


def _estimated_size(record: dict[str, Any]) -> int:
    """About the length of a record's line, cheaply (for the rotation check; never fails)."""
    try:
        return len(wire.dumps(record)) + 200
    except (TypeError, ValueError):
        return 1024


# --- the writer --------------------------------------------------------------------


class AuditLog:
    """Appends records to the audit file; a failure refuses the call."""

    def __init__(
        self,
        path: str,
        *,
        max_bytes: int = 0,
        keep: int = 10,
        keep_days: float = 0.0,
        syslog_socket: str | None = None,
        syslog_facility: str = "authpriv",
        syslog_required: bool = False,
    ) -> None:
        self.path = path
        self.head = head_path(path)
        self._lock = threading.Lock()
        self._queue: list[tuple[dict[str, Any], asyncio.Future[int]]] = []
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
        self.keep_days = keep_days
        self.syslog: SyslogMirror | None = None
        self.syslog_required = syslog_required
        self.healthy = False
        self.error = ""
        #: bytes appended since this object was made, and (monotonic time, that count) samples for the write rate
        self.written = 0
        self._samples: deque[tuple[float, int]] = deque(
            [(time.monotonic(), 0)], maxlen=int(RATE_WINDOW / RATE_SAMPLE) + 2
        )
        self.configure(
            max_bytes=max_bytes,
            keep=keep,
            keep_days=keep_days,
            syslog_socket=syslog_socket,
            syslog_facility=syslog_facility,
            syslog_required=syslog_required,
        )
        self.open()

    @property
    def seq(self) -> int:
        """Number of the last record written."""
        return self._seq

    @property
    def last_hash(self) -> str:
        return self._prev

    def configure(
        self,
        *,
        max_bytes: int,
        keep: int,
        syslog_socket: str | None,
        syslog_facility: str,
        keep_days: float = 0.0,
        syslog_required: bool = False,
    ) -> None:
        """Apply (re-read) settings; the open file and the chain are kept."""
        with self._lock:
            self.max_bytes = max(0, int(max_bytes))
            self.keep = max(0, int(keep))
            self.keep_days = max(0.0, float(keep_days))
            self.syslog_required = bool(syslog_required)
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
        damaged = False
        if size:
            last, damaged, size, torn = self._cut_torn_tail(fd, size)
            if torn:
                notes["dropped_bytes"] = len(torn)
                notes["dropped_sha256"] = hashlib.sha256(torn).hexdigest()
                notes["reason"] = (
                    "the file ended in a partial line (a write cut by a crash, never acknowledged); it was removed"
                )
            if damaged:
                notes["reason"] = "the last line of the log is not a valid record (edited or damaged)"
        continued_from_rotated = False
        if size == 0:
            previous = rotated(self.path)
            if previous:
                last = last_record(previous[0][1])
                continued_from_rotated = last is not None
        seq, prev = (0, GENESIS)
        if last is not None:
            seq, prev = record_seq(last) or 0, str(last["hash"])
        anchor = self._read_anchor()
        if was_open and self._seq > anchor[0]:
            anchor = (self._seq, self._prev)  # reopening after the file vanished: memory knows best
        if anchor[0] > seq:
            span = [seq + 1, anchor[0]]
            if damaged and anchor[0] == seq + 1:
                notes["damaged"] = span  # record N is there, but unreadable: not missing
            else:
                notes["reason"] = (
                    f"the log ends at record {seq} but record {anchor[0]} was written: "
                    f"records {seq + 1}..{anchor[0]} are missing from {self.path}"
                )
                notes["missing"] = span
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

    def _cut_torn_tail(self, fd: int, size: int) -> tuple[dict[str, Any] | None, bool, int, bytes]:
        """Remove a partial last line.

        Returns the last valid record, whether the last complete line was not
        one (edited or damaged: the record before it is returned instead), the
        new size and the removed bytes.
        """
        with os.fdopen(os.dup(fd), "rb") as fh:
            lines = reverse_lines(fh, size)
            fh.seek(size - 1)
            torn = b""
            if fh.read(1) != b"\n":
                torn = next(lines)
            last = None
            damaged = False
            for raw in lines:
                if raw.strip():
                    last = parse_record(raw)
                    if last is not None:
                        break
                    if damaged:  # only the last line is looked past; more damage is verify's to report
                        break
                    damaged = True
        if torn:
            size -= len(torn)
            os.ftruncate(fd, size)
            os.fsync(fd)
        return last, damaged, size, torn

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

    def _write_records(self, records: list[dict[str, Any]]) -> list[int]:
        """Seal ``records`` in order, append them with one write and one fsync; all or none. Their line lengths."""
        seq, prev = self._seq, self._prev
        ts = timestamp()
        lines = []
        for record in records:
            lines.append(_seal(record, ts, seq, prev))
            seq, prev = record["seq"], record["hash"]
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
        self.written += len(data)
        now = time.monotonic()
        if now - self._samples[-1][0] >= RATE_SAMPLE:
            self._samples.append((now, self.written))
        try:
            os.pwrite(self._head_fd, HEAD_FORMAT.format(seq=self._seq, hash=self._prev).encode(), 0)
        except OSError as exc:
            log.warning("audit anchor not updated: %s", exc)
        if self.syslog is not None:
            for record in records:
                self.syslog.send(record)
        return [len(line) for line in lines]

    def _expired(self, name: str, now: float) -> bool:
        """Whether retention may delete file ``name``: its newest record and its mtime are older than keep_days."""
        if self.keep_days <= 0:
            return True
        newest = os.stat(name).st_mtime
        last = last_record(name)
        if last is not None:
            with contextlib.suppress(ValueError):
                newest = max(newest, _parse_ts(str(last.get("ts"))))
        return now - newest > self.keep_days * DAY

    def _rotate(self) -> None:
        """audit.jsonl -> .1 -> .2 ...; the new file starts with a record chaining from the old one.

        From the oldest file down, a file numbered ``keep`` or more (it would
        end beyond ``keep``) is deleted while its records are older than
        ``keep_days``; the first younger one stops the deletion, and it and
        every newer file are kept and renumbered.
        """
        old_size = self._size
        self._release()
        os.close(self._fd)
        self._fd = -1
        directory = os.path.dirname(self.path) or "."
        files = [(0, self.path), *rotated(self.path)]
        now = time.time()
        deleted = 0
        while files and files[-1][0] >= self.keep and self._expired(files[-1][1], now):
            os.unlink(files.pop()[1])
            deleted += 1
        for n, name in reversed(files):
            os.rename(name, f"{self.path}.{n + 1}")
        beyond = sum(1 for n, _name in files if n + 1 > self.keep)
        if beyond:
            log.info(
                "audit rotation keeps %d file(s) beyond audit_keep = %d: younger than %g days",
                beyond,
                self.keep,
                self.keep_days,
            )
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
                "rotated_to": os.path.basename(self.path) + ".1" if files else None,
                "rotated_bytes": old_size,
                **({"deleted_files": deleted} if deleted else {}),
                **({"kept_for_age": beyond} if beyond else {}),
            }
        )

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Seal and append one record durably (any thread); return it with ts, seq, prev and hash."""
        self.write_many([record])
        return record

    def write_many(self, records: list[dict[str, Any]]) -> list[int]:
        """Seal and append records durably, in order, with one fsync (rotating between them if due).

        Returns the bytes each record took in the log.
        """
        written: list[int] = []
        with self._lock:
            if self._fd < 0:
                raise OSError(0, self.error or "audit log not open")
            batch: list[dict[str, Any]] = []
            size = self._size
            for record in records:
                line_len = _estimated_size(record)
                if self.max_bytes and size > 0 and size + line_len > self.max_bytes:
                    if batch:
                        written += self._write_records(batch)
                        batch = []
                    self._rotate()
                    size = self._size
                batch.append(record)
                size += line_len
            if batch:
                written += self._write_records(batch)
        return written

    async def record(self, **fields: Any) -> int:
        """Write one record durably and return the bytes it took; raise Unavailable when that fails.

        Group commit: records that arrive while a write is in progress go out
        together in the next write, with one fsync, so concurrent calls share
        the cost of durability instead of queueing for it one by one. A lone
        record is written on the event loop itself: measured with ``make
        bench``, the two thread hand-offs cost a sequential call more than the
        fsync blocks the loop (the call has to wait for its record anyway).
        """
        record = {(f"field_{k}" if k in RESERVED else k): v for k, v in fields.items()}
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        self._queue.append((record, done))
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush())
        return await done

    def _failed(self, exc: BaseException) -> Unavailable:
        self.healthy = False
        self.error = (
            f"{self.path}: {exc.strerror or exc}" if isinstance(exc, OSError) else f"{self.path}: {type(exc).__name__}"
        )
        log.error("audit write failed: %s", self.error)
        return Unavailable("broker unavailable: the audit log cannot be written, so no call is served")

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                if len(batch) == 1:
                    # a lone record: writing it here saves two thread hand-offs on the call's path;
                    # under load records queue up and go out in batches from a worker thread
                    sizes = self.write_many([batch[0][0]])
                else:
                    sizes = await asyncio.to_thread(self.write_many, [r for r, _ in batch])
            except BaseException as exc:  # every waiter gets an answer, whatever went wrong
                failure = self._failed(exc)
                for _, done in batch:
                    if not done.done():
                        done.set_exception(failure)
                if not isinstance(exc, Exception):
                    raise
                continue
            self.healthy = True
            for (_, done), size in zip(batch, sizes, strict=True):
                if not done.done():
                    done.set_result(size)

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

    # --- what status shows ------------------------------------------------------------

    def write_rate(self, now: float | None = None) -> float | None:
        """Bytes a second appended over about the last day (None: less than a minute measured)."""
        now = time.monotonic() if now is None else now
        base = self._samples[-1]
        for sample in self._samples:
            if sample[0] >= now - RATE_WINDOW:
                base = sample
                break
        elapsed = now - base[0]
        if elapsed < RATE_SAMPLE:
            return None
        return (self.written - base[1]) / elapsed

    def trail_status(self, now: float | None = None) -> dict[str, Any]:
        """For ``status``: the files kept, the disk's room and how long it lasts, the syslog mirror; warnings."""
        warnings: list[str] = []
        out: dict[str, Any] = {
            "files": len(log_files(self.path)),
            "keep": self.keep,
            "keep_days": self.keep_days,
            "free_bytes": None,
            "total_bytes": None,
            "bytes_per_day": None,
            "days_left": None,
        }
        directory = os.path.dirname(self.path) or "."
        try:
            st = os.statvfs(directory)
        except OSError as exc:
            warnings.append(f"the audit log's filesystem cannot be checked ({directory}: {exc.strerror or exc})")
        else:
            free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
            out["free_bytes"], out["total_bytes"] = free, total
            low = min(int(total * LOW_SPACE_SHARE), LOW_SPACE_BYTES)
            rate = self.write_rate(now)
            if rate is not None:
                out["bytes_per_day"] = round(rate * DAY)
                if rate > 0:
                    out["days_left"] = round(free / (rate * DAY), 1)
            if free < low:
                warnings.append(
                    f"the audit log's filesystem ({directory}) has {_size_text(free)} free of {_size_text(total)}, "
                    f"less than {_size_text(low)}: when it is full every call is refused; free space there "
                    "(rotated audit files older than audit_keep_days may be archived and removed)"
                )
            elif out["days_left"] is not None and out["days_left"] < LOW_SPACE_DAYS:
                warnings.append(
                    f"at the recent audit write rate ({_size_text(rate * DAY if rate else 0)}/day) the audit log's "
                    f"filesystem ({directory}, {_size_text(free)} free) fills in about {out['days_left']} days, "
                    "and then every call is refused"
                )
        mirror = self.syslog
        if mirror is None:
            out["syslog"] = "off"
        else:
            out["syslog"] = f"{mirror.address}: {mirror.sent} sent, {mirror.dropped} dropped"
            if self.syslog_required and not is_socket(mirror.address):
                warnings.append(
                    f"audit_syslog = true but {mirror.address} is not a socket: records are not mirrored to syslog"
                )
            elif mirror.last_error:
                warnings.append(
                    f"the audit syslog mirror is failing ({mirror.last_error}); {mirror.dropped} copies dropped"
                )
        out["warnings"] = warnings
        return out

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
