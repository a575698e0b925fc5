"""Edge cases of the audit writer (``broker.daemon.audit.log``) and its syslog mirror beyond ``test_audit.py``.

Opening: a path that is not a regular file, a world-readable anchor, an
unreadable anchor, a log that held only a torn line, a log and anchor both
deleted while running. Writing: short writes and failed anchor updates,
rotation inside one batch, failures that are not ``OSError``, a waiter that
went away. Room: a closed log, a filesystem that cannot be checked or
cannot reserve, and a release that never cuts another writer's bytes.
Settings: the syslog mirror kept, replaced or dropped by ``configure``.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from broker.core.errors import Unavailable
from broker.daemon import audit
from broker.daemon.audit import log as audit_log
from broker.daemon.audit.syslog import SD_FIELDS, SYSLOG_MAX_BYTES, SyslogMirror, format_syslog


@pytest.fixture
def logdir(tmp_root: str) -> str:
    path = os.path.join(tmp_root, "log")
    os.mkdir(path, 0o700)
    return path


@pytest.fixture
def path(logdir: str) -> str:
    return f"{logdir}/audit.jsonl"


def fill(log: audit.AuditLog, n: int, **extra: Any) -> list[dict[str, Any]]:
    return [log.write({"id": f"r{i}", "op": "call", "decision": "allow", **extra}) for i in range(n)]


def records(path: str) -> list[dict[str, Any]]:
    with open(path, "rb") as fh:
        return [json.loads(raw) for raw in fh.read().splitlines() if raw.strip()]


# --- opening ----------------------------------------------------------------------------------------


def test_a_fifo_at_the_path_makes_the_log_unhealthy(path: str) -> None:
    os.mkfifo(path, 0o600)
    log = audit.AuditLog(path)
    assert not log.healthy
    assert log.error == f"{path}: not a regular file"
    with pytest.raises(Unavailable):
        log.check()


def test_a_readable_anchor_is_made_private(path: str) -> None:
    with open(audit.head_path(path), "wb"):
        pass
    os.chmod(audit.head_path(path), 0o644)
    log = audit.AuditLog(path)
    assert log.healthy
    assert os.stat(audit.head_path(path)).st_mode & 0o777 == 0o600


def test_an_unreadable_anchor_is_ignored_and_rewritten(path: str) -> None:
    log = audit.AuditLog(path)
    last = fill(log, 3)[-1]
    log.close()
    with open(audit.head_path(path), "wb") as fh:
        fh.write(b"scribbled over\n")
    again = audit.AuditLog(path)
    assert (again.seq, again.last_hash) == (3, last["hash"])  # the file itself says where the chain is
    rec = fill(again, 1)[0]
    assert (rec["seq"], rec["prev"]) == (4, last["hash"])
    assert audit.read_head(audit.head_path(path)) == (4, rec["hash"])
    assert audit.verify_set(path).ok


def test_seq_and_last_hash_follow_the_writes(path: str) -> None:
    log = audit.AuditLog(path)
    assert (log.seq, log.last_hash) == (0, audit.GENESIS)
    recs = fill(log, 2)
    assert (log.seq, log.last_hash) == (2, recs[-1]["hash"])


def test_a_log_that_holds_only_a_torn_line_starts_the_chain_again(path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(b'{"id":"x","op":"ca')  # the very first write was cut by a crash
    log = audit.AuditLog(path)
    (rec,) = records(path)
    assert rec["op"] == "recover" and rec["seq"] == 1 and rec["prev"] == audit.GENESIS
    assert rec["dropped_bytes"] == 18
    fill(log, 1)
    assert audit.verify_set(path).ok


def test_a_torn_line_after_blank_lines_recovers_from_the_last_record(path: str) -> None:
    log = audit.AuditLog(path)
    last = fill(log, 2)[-1]
    log.close()
    with open(path, "ab") as fh:
        fh.write(b"\n\n" + b'{"torn')
    audit.AuditLog(path)
    rec = records(path)[-1]
    assert rec["op"] == "recover" and rec["prev"] == last["hash"] and rec["seq"] == 3
    assert rec["dropped_bytes"] == 6


# When the last line of the log is not a valid record (edited), recovery keeps the records before it: only
# record N is damaged, and the recover record says so (it used to claim records 1..N were missing).
def test_an_edited_last_line_is_recovered_as_such(path: str) -> None:
    log = audit.AuditLog(path)
    fill(log, 5)
    log.close()
    with open(path, "rb") as fh:
        lines = fh.read().splitlines(keepends=True)
    lines[-1] = lines[-1].replace(b"{", b"[", 1)
    with open(path, "wb") as fh:
        fh.write(b"".join(lines))
    audit.AuditLog(path)
    rec = records_after_edit(path)
    assert rec["op"] == "recover" and rec["seq"] == 6
    assert "not a valid record" in rec["reason"]
    assert rec.get("missing") in (None, [5, 5])  # records 1..4 are in the file


def records_after_edit(path: str) -> dict[str, Any]:
    with open(path, "rb") as fh:
        return dict(json.loads(fh.read().splitlines()[-1]))


def test_a_log_and_anchor_deleted_while_running_continue_from_memory(path: str) -> None:
    log = audit.AuditLog(path)
    last = fill(log, 4)[-1]
    os.unlink(path)
    os.unlink(audit.head_path(path))
    log.check()  # reopens: memory knows more than the new, empty anchor
    rec = records(path)[0]
    assert rec["op"] == "recover" and rec["missing"] == [1, 4]
    assert (rec["seq"], rec["prev"]) == (5, last["hash"])
    assert audit.read_head(audit.head_path(path)) == (5, rec["hash"])


# --- writing -------------------------------------------------------------------------------------------


def test_a_short_write_fails_the_record_and_leaves_no_partial_line(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(path)
    fill(log, 1)
    size = os.path.getsize(path)
    real = os.write

    def short(fd: int, data: Any) -> int:
        if fd == log._fd:
            real(fd, bytes(data[:5]))  # a few bytes, then nothing more
            return 0
        return real(fd, data)

    monkeypatch.setattr(os, "write", short)
    with pytest.raises(OSError, match="short write"):
        log.write({"id": "x", "op": "call"})
    monkeypatch.undo()
    assert os.path.getsize(path) == size
    assert log.seq == 1
    fill(log, 1)
    assert audit.verify_set(path).ok


def test_a_failed_anchor_update_keeps_the_record(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(path)
    first = fill(log, 1)[0]

    def no_pwrite(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.EIO, "I/O error")

    monkeypatch.setattr(os, "pwrite", no_pwrite)
    second = fill(log, 1)[0]
    monkeypatch.undo()
    assert [r["id"] for r in records(path)] == [first["id"], second["id"]]
    assert audit.read_head(audit.head_path(path)) == (1, first["hash"])  # stale, never ahead of the file
    assert audit.verify_set(path).ok


def test_one_batch_rotates_in_the_middle_and_stays_chained(path: str) -> None:
    log = audit.AuditLog(path, max_bytes=1500, keep=10)
    batch = [{"id": f"b{i}", "op": "call", "reason": "r" * 60} for i in range(30)]
    log.write_many(batch)
    files = audit.log_files(path)
    assert len(files) > 2
    ids = [r["id"] for name in files for r in records(name) if r["op"] == "call"]
    assert ids == [f"b{i}" for i in range(30)]  # in order, each once
    every = [r for name in files for r in records(name)]
    assert [r["seq"] for r in every] == list(range(1, log.seq + 1))  # rotation records take their numbers
    assert {r["op"] for r in every} == {"call", "rotate"}
    report = audit.verify_set(path)
    assert report.ok, report.problems
    assert report.last_seq == log.seq


def test_an_empty_batch_writes_nothing(path: str) -> None:
    log = audit.AuditLog(path)
    log.write_many([])
    assert os.path.getsize(path) == 0 and log.seq == 0


def test_a_closed_log_refuses_to_write(path: str) -> None:
    log = audit.AuditLog(path)
    log.close()
    with pytest.raises(OSError):
        log.write({"id": "x"})


def test_a_failure_that_is_not_an_oserror_fails_the_waiter_too(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(path)

    def broken(records: list[dict[str, Any]]) -> None:
        raise ValueError("a bug")

    monkeypatch.setattr(log, "write_many", broken)
    with pytest.raises(Unavailable, match="the audit log cannot be written"):
        asyncio.run(log.record(id="x", op="call"))
    assert not log.healthy and log.error == f"{path}: ValueError"
    with pytest.raises(Unavailable):
        log.check()
    monkeypatch.undo()
    asyncio.run(log.record(id="y", op="call"))  # the next good write makes it healthy again
    assert log.healthy and [r["id"] for r in records(path)] == ["y"]


def test_a_caller_that_goes_away_does_not_stop_its_record(path: str) -> None:
    log = audit.AuditLog(path)

    async def scenario() -> bool:
        task = asyncio.ensure_future(log.record(id="gone", op="call"))
        await asyncio.sleep(0)  # queued, the flush scheduled
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        return task.cancelled()

    assert asyncio.run(scenario())
    assert [r["id"] for r in records(path)] == ["gone"]
    assert log.healthy


# --- room ------------------------------------------------------------------------------------------------


def test_a_closed_log_has_no_room(path: str) -> None:
    log = audit.AuditLog(path)
    log.close()
    with pytest.raises(Unavailable, match="cannot be written"):
        log.ensure_room(1)
    assert "cannot be written" in log.room_problem


def test_a_filesystem_that_cannot_be_checked_refuses(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(path)

    def failing(fd: int) -> os.statvfs_result:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fstatvfs", failing)
    with pytest.raises(Unavailable, match=r"cannot be checked \(Input/output error\)"):
        log.check()


def test_a_filesystem_without_fallocate_is_checked_for_free_space_only(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = audit.AuditLog(path)
    calls: list[int] = []

    def unsupported(fd: int, mode: int, offset: int, length: int) -> None:
        calls.append(mode)
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(audit_log, "_fallocate", unsupported)
    log.check()
    assert not log._can_reserve and log.room_problem == ""
    log.check()
    assert len(calls) == 1  # not tried again


def test_a_reservation_that_fails_for_want_of_space_refuses(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(path)

    def no_space(fd: int, mode: int, offset: int, length: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(audit_log, "_fallocate", no_space)
    with pytest.raises(Unavailable, match=r"no room can be reserved .*No space left on device"):
        log.check()
    assert log._can_reserve and "no room can be reserved" in log.room_problem


def test_fallocate_reports_the_errno() -> None:
    with pytest.raises(OSError) as caught:
        audit_log._fallocate(-1, 0, 0, 4096)
    assert caught.value.errno == errno.EBADF


def test_release_never_cuts_what_another_writer_added(path: str) -> None:
    log = audit.AuditLog(path)
    fill(log, 1)
    log.check()
    if not log._can_reserve:
        pytest.skip("this filesystem cannot fallocate with FALLOC_FL_KEEP_SIZE")
    with open(path, "ab") as fh:
        fh.write(b"appended by someone else\n")
    size = os.path.getsize(path)
    log.close()
    assert os.path.getsize(path) == size


# --- settings and the syslog mirror ------------------------------------------------------------------


def test_configure_keeps_replaces_or_drops_the_mirror(logdir: str, path: str) -> None:
    log = audit.AuditLog(path, syslog_socket=f"{logdir}/a.sock")
    first = log.syslog
    assert first is not None and first.address == f"{logdir}/a.sock"
    log.configure(max_bytes=0, keep=3, syslog_socket=f"{logdir}/a.sock", syslog_facility="authpriv")
    assert log.syslog is first  # unchanged settings: the same mirror, its counters kept
    log.configure(max_bytes=0, keep=3, syslog_socket=f"{logdir}/a.sock", syslog_facility="local3")
    assert log.syslog is not first and log.syslog is not None and log.syslog.facility == 19
    second = log.syslog
    log.configure(max_bytes=0, keep=3, syslog_socket=f"{logdir}/b.sock", syslog_facility="local3")
    assert log.syslog is not second and log.syslog is not None and log.syslog.address == f"{logdir}/b.sock"
    log.configure(max_bytes=-5, keep=-1, syslog_socket=None, syslog_facility="authpriv")
    assert log.syslog is None and (log.max_bytes, log.keep) == (0, 0)
    log.configure(max_bytes=0, keep=3, syslog_socket=None, syslog_facility="authpriv")
    assert log.syslog is None


@pytest.fixture
def receiver(logdir: str) -> Iterator[tuple[socket.socket, str]]:
    address = f"{logdir}/dev-log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    yield sock, address
    sock.close()


def test_close_closes_the_mirror_socket(path: str, receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    log = audit.AuditLog(path, syslog_socket=address)
    fill(log, 1)
    assert sock.recv(65536).startswith(b"<")
    mirror = log.syslog
    assert mirror is not None and mirror._sock is not None and mirror.sent == 1
    log.close()
    assert mirror._sock is None


def test_a_mirror_that_never_sent_closes_cleanly() -> None:
    mirror = SyslogMirror("/nonexistent/dev-log")
    mirror.close()
    mirror.close()
    assert mirror._sock is None and mirror.sent == 0 and mirror.dropped == 0


def test_an_oversized_message_without_a_text_reason_is_still_marked_truncated() -> None:
    rec = {"seq": 1, "op": "call", "decision": "allow", "reason": 12345, "args": {"text": "x" * 9000}}
    msg = format_syslog(rec, 10, "host", procid=1)
    assert len(msg) <= SYSLOG_MAX_BYTES
    body = json.loads(msg[msg.index(b"] ") + 2 :])
    assert body["msg_truncated"] is True and body["reason"] == 12345 and "args" not in body


def test_a_message_still_too_large_keeps_only_the_key_fields() -> None:
    rec = {
        "seq": 9,
        "id": "abc",
        "op": "call",
        "decision": "error",
        "ts": "2024-01-01T00:00:00.000Z",
        "prev": "p" * 64,
        "hash": "h" * 64,
        "outcome_detail": "d" * 20000,  # not a field the short form drops
    }
    msg = format_syslog(rec, 10, "host", procid=1)
    assert len(msg) <= SYSLOG_MAX_BYTES
    body = json.loads(msg[msg.index(b"] ") + 2 :])
    assert body == {
        "seq": 9,
        "id": "abc",
        "op": "call",
        "decision": "error",
        "hash": "h" * 64,
        "ts": "2024-01-01T00:00:00.000Z",
        "prev": "p" * 64,
        "msg_truncated": True,
    }
    assert set(body) - {"ts", "prev", "msg_truncated"} <= set(SD_FIELDS)
    assert msg.startswith(b"<83>1 ")  # authpriv (10) * 8 + error (3)


# --- records nobody can encode -------------------------------------------------------------------------


def test_a_lone_surrogate_is_replaced_and_counted(path: str) -> None:
    log = audit.AuditLog(path)
    log.write({"id": "x", "op": "call", "reason": "bad \udcff byte"})
    (rec,) = records(path)
    assert rec["reason"] == "bad \ufffd byte"
    assert rec["sanitized"] == {"surrogates": 1}
    assert audit.verify_set(path).ok


def _sealed(record: dict[str, Any]) -> dict[str, Any]:
    """Seal ``record`` as the writer does; check the line is the record; return the record without chain fields."""
    line = audit_log._seal(record, "2026-01-01T00:00:00Z", 0, audit.GENESIS)
    assert json.loads(line) == record and line.endswith(b"\n")
    assert record["hash"] == audit.chain_hash(audit.GENESIS, record)
    return {k: v for k, v in record.items() if k not in ("ts", "seq", "prev", "hash")}


def test_seal_replaces_what_cannot_be_encoded_in_place() -> None:
    record: dict[str, Any] = {"id": "x", "reason": "\udcff", "duration_ms": float("inf"), "n": [float("nan"), 1]}
    assert _sealed(record) == {
        "id": "x",
        "reason": "\ufffd",
        "duration_ms": None,
        "n": [None, 1],
        "sanitized": {"surrogates": 1, "non_finite": 2},
    }
    clean: dict[str, Any] = {"id": "y", "op": "call"}
    assert _sealed(clean) == {"id": "y", "op": "call"}  # nothing to fix: untouched, no "sanitized"


def test_seal_writes_a_placeholder_for_what_still_cannot_be_written() -> None:
    # keys of mixed types pass the codec but cannot be sorted into the canonical form
    record: dict[str, Any] = {"id": "b" * 100, "op": "call", "args": {1: "x", "k": "y"}}
    assert _sealed(record) == {
        "id": "b" * 64,
        "op": "call",
        "decision": "error",
        "reason": "this record could not be serialised (TypeError); the broker wrote this instead",
    }


# write_many() measures every record (for the rotation check) only once it is made encodable: a record holding
# NaN/infinity, or one that needs the placeholder, must not fail the whole batch (every waiter would get 69).
@pytest.mark.parametrize("bad", [{"duration_ms": float("nan")}, {"args": {1: "x", "k": "y"}}], ids=["nan", "keys"])
def test_a_record_that_needs_fixing_does_not_fail_its_batch(path: str, bad: dict[str, Any]) -> None:
    log = audit.AuditLog(path)
    log.write_many([{"id": "a", "op": "call"}, {"id": "b", "op": "call", **bad}])
    assert [r["id"] for r in records(path)] == ["a", "b"]
    assert audit.verify_set(path).ok


# A value the codec does not know (bytes, a set) becomes the placeholder record, never an exception.
def test_a_value_of_an_unknown_type_becomes_a_placeholder() -> None:
    record: dict[str, Any] = {"id": "b", "op": "call", "blob": b"\x00"}
    sealed = _sealed(record)
    assert sealed["decision"] == "error" and "blob" not in sealed


# --- failures and the waiters ---------------------------------------------------------------------------


class Stop(BaseException):
    """Not an Exception: must not be swallowed by the flush loop."""


def test_a_failed_write_skips_a_waiter_that_went_away(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(path)

    def broken(records: list[dict[str, Any]]) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(log, "write_many", broken)

    async def scenario() -> BaseException | None:
        gone = asyncio.ensure_future(log.record(id="gone", op="call"))
        await asyncio.sleep(0)
        gone.cancel()
        with pytest.raises(Unavailable):
            await log.record(id="stays", op="call")
        return None

    asyncio.run(scenario())
    assert not log.healthy and log.error == f"{path}: Input/output error"


def test_a_base_exception_fails_the_waiters_and_is_not_swallowed(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(path)

    def stopping(records: list[dict[str, Any]]) -> None:
        raise Stop

    monkeypatch.setattr(log, "write_many", stopping)

    async def scenario() -> BaseException | None:
        with pytest.raises(Unavailable):
            await log.record(id="x", op="call")
        assert log._flusher is not None
        with pytest.raises(Stop):
            await log._flusher
        return None

    asyncio.run(scenario())
    assert not log.healthy and log.error == f"{path}: Stop"


def test_record_returns_the_bytes_each_record_took_alone_and_in_a_batch(path: str) -> None:
    log = audit.AuditLog(path)

    async def scenario() -> list[int]:
        lone = await log.record(id="a", op="call", reason="x" * 300)
        together = await asyncio.gather(*(log.record(id=f"b{n}", op="call", reason="y" * n) for n in range(5)))
        return [lone, *together]

    sizes = asyncio.run(scenario())
    with open(path, "rb") as fh:
        lines = fh.read().splitlines(keepends=True)
    assert sizes == [len(line) for line in lines[-6:]]  # what a caller's audit budget is charged
