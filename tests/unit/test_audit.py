"""Unit tests for ``broker.audit`` and ``mcp-brokerctl audit`` (``broker.admin_audit``).

The hash chain and its anchor, what ``verify`` names for an edited byte, a
removed, reordered or duplicated line and a cut tail, rotation that chains
across files and keeps ``audit_keep`` of them, recovery at start-up (torn
tail, cut log, replaced file), appends from many threads that never
interleave, the RFC 5424 syslog copy over a real datagram socket that never
blocks or fails a write, and the audit command's tail, filters and verify.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.admin.audit_reader import Filter, parse_time, table_row
from broker.admin.cli import main as ctl_main
from broker.core.errors import Unavailable
from broker.core.paths import Paths
from broker.daemon import audit
from broker.daemon.audit import log as audit_log
from broker.daemon.config import BrokerSettings
from tests.unit.conftest import NOBODY_UID, needs_root


@pytest.fixture
def logdir(tmp_root: str) -> str:
    path = os.path.join(tmp_root, "log")
    os.mkdir(path, 0o700)
    return path


def fill(log: audit.AuditLog, n: int, **extra: Any) -> list[dict[str, Any]]:
    return [
        log.write({"id": f"r{i}", "caller": "alice", "op": "call", "tool": "demo.echo", "decision": "allow", **extra})
        for i in range(n)
    ]


def lines_of(path: str) -> list[bytes]:
    with open(path, "rb") as fh:
        return fh.read().splitlines(keepends=True)


def put_lines(path: str, lines: list[bytes]) -> None:
    with open(path, "wb") as fh:
        fh.write(b"".join(lines))


def problems(path: str) -> list[str]:
    return audit.verify_set(path).problems


# --- the chain ------------------------------------------------------------------------


def test_records_are_numbered_and_chained_and_the_anchor_follows(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    recs = fill(log, 5)
    stored = [json.loads(raw) for raw in lines_of(path)]
    assert stored == recs
    assert [r["seq"] for r in stored] == [1, 2, 3, 4, 5]
    assert stored[0]["prev"] == audit.GENESIS
    for before, rec in itertools.pairwise(stored):
        assert rec["prev"] == before["hash"]
    for rec in stored:
        assert audit.chain_hash(rec["prev"], rec) == rec["hash"]
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["ts"])
    assert audit.read_head(audit.head_path(path)) == (5, stored[-1]["hash"])
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert os.stat(audit.head_path(path)).st_mode & 0o777 == 0o600
    report = audit.verify_set(path)
    assert report.ok and report.records == 5 and (report.first_seq, report.last_seq) == (1, 5)
    assert audit.verify(path) == []


def test_fields_named_like_chain_fields_cannot_overwrite_them(logdir: str) -> None:
    log = audit.AuditLog(f"{logdir}/audit.jsonl")
    asyncio.run(log.record(id="x", op="pin_accept", hash="abc", seq=99, prev="p", ts="then"))
    rec = json.loads(lines_of(log.path)[0])
    assert (rec["field_hash"], rec["field_seq"], rec["field_prev"], rec["field_ts"]) == ("abc", 99, "p", "then")
    assert rec["seq"] == 1 and rec["prev"] == audit.GENESIS and audit.verify(log.path) == []


KEY = b"k" * 32


def test_args_digest_is_stable_and_depends_on_values() -> None:
    assert audit.args_digest({"a": 1, "b": 2}, KEY) == audit.args_digest({"b": 2, "a": 1}, KEY)
    assert audit.args_digest({"a": 1}, KEY) != audit.args_digest({"a": "1"}, KEY)
    assert re.fullmatch(r"hmac-sha256:[0-9a-f]{32}", audit.args_digest({"text": "x"}, KEY))


def test_args_digest_is_keyed_so_a_guess_cannot_be_confirmed_without_the_key() -> None:
    """A bare hash of a short value is confirmed by hashing a guess; the keyed digest is not."""
    import hashlib

    pin = {"pin": "1234"}
    bare = hashlib.sha256(audit.canonical({"a": pin}).encode()).hexdigest()[:32]
    assert bare not in audit.args_digest(pin, KEY)
    assert audit.args_digest(pin, KEY) != audit.args_digest(pin, b"other key" + bytes(23))


def test_the_digest_key_is_made_once_private_and_kept(tmp_path: Path) -> None:
    path = str(tmp_path / "audit.key")
    key = audit.load_key(path)
    assert len(key) == 32 and (os.stat(path).st_mode & 0o777) == 0o600
    assert audit.load_key(path) == key
    with open(path, "wb") as fh:
        fh.write(b"short")
    with pytest.raises(OSError, match="digest key"):
        audit.load_key(path)


def test_an_existing_open_file_is_made_private(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    with open(path, "wb"):
        pass
    os.chmod(path, 0o644)
    audit.AuditLog(path)
    assert os.stat(path).st_mode & 0o777 == 0o600


def test_a_symlink_or_unwritable_path_makes_the_log_unhealthy_and_calls_refused(logdir: str) -> None:
    os.symlink("/etc/hostname", f"{logdir}/audit.jsonl")
    log = audit.AuditLog(f"{logdir}/audit.jsonl")
    assert not log.healthy and log.error
    with pytest.raises(Unavailable):
        log.check()
    with pytest.raises(Unavailable):
        asyncio.run(log.record(id="x", op="call"))


@needs_root
def test_a_log_owned_by_someone_else_is_refused(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    with open(path, "wb"):
        pass
    os.chown(path, NOBODY_UID, NOBODY_UID)
    log = audit.AuditLog(path)
    assert not log.healthy and f"owned by uid {NOBODY_UID}" in log.error
    with pytest.raises(Unavailable):
        log.check()


# --- verify: what it names ----------------------------------------------------------------


@pytest.fixture
def ten(logdir: str) -> str:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    fill(log, 10)
    log.close()
    return path


def test_edited_byte_is_named(ten: str) -> None:
    lines = lines_of(ten)
    lines[3] = lines[3].replace(b'"caller":"alice"', b'"caller":"alicf"')
    put_lines(ten, lines)
    found = problems(ten)
    assert found == [f"{ten}:4: edited: the line does not match its hash (record 4)"]


def test_edited_byte_that_breaks_the_json_is_named(ten: str) -> None:
    lines = lines_of(ten)
    lines[6] = lines[6].replace(b"{", b"[", 1)
    put_lines(ten, lines)
    assert problems(ten) == [f"{ten}:7: not a valid audit record (edited or cut)"]


def test_edited_hash_is_named_on_the_line_and_the_link(ten: str) -> None:
    lines = lines_of(ten)
    rec = json.loads(lines[2])
    lines[2] = lines[2].replace(rec["hash"].encode(), b"f" * 64)
    put_lines(ten, lines)
    found = problems(ten)
    assert found[0].startswith(f"{ten}:3: edited") and any(p.startswith(f"{ten}:4: chain broken") for p in found)


def test_removed_line_is_named(ten: str) -> None:
    lines = lines_of(ten)
    del lines[4]
    put_lines(ten, lines)
    assert problems(ten) == [f"{ten}:5: 1 line(s) removed before this line (record 5 missing)"]


def test_removed_lines_are_counted(ten: str) -> None:
    lines = lines_of(ten)
    del lines[2:5]
    put_lines(ten, lines)
    assert problems(ten) == [f"{ten}:3: 3 line(s) removed before this line (records 3..5 missing)"]


def test_removed_first_line_is_named(ten: str) -> None:
    put_lines(ten, lines_of(ten)[1:])
    (found,) = problems(ten)
    assert found.startswith(f"{ten}:1: lines before this one were removed")


def test_swapped_lines_are_named(ten: str) -> None:
    lines = lines_of(ten)
    lines[5], lines[6] = lines[6], lines[5]
    put_lines(ten, lines)
    assert problems(ten) == [f"{ten}:7: lines reordered: record 6 comes after record 7 (the line before it)"]


def test_duplicated_line_is_named(ten: str) -> None:
    lines = lines_of(ten)
    lines.insert(8, lines[3])
    put_lines(ten, lines)
    found = problems(ten)
    assert f"{ten}:9: record 4 appears a second time (a line was duplicated)" in found


def test_inserted_blank_line_is_named(ten: str) -> None:
    lines = lines_of(ten)
    lines.insert(2, b"\n")
    put_lines(ten, lines)
    assert problems(ten) == [f"{ten}:3: empty line (inserted, or a line was cut out)"]


def test_tail_cut_in_a_line_is_named(ten: str) -> None:
    with open(ten, "r+b") as fh:
        fh.truncate(os.path.getsize(ten) - 20)
    found = problems(ten)
    assert found[0].startswith(f"{ten}:10: the last line is cut")
    assert any("the tail was cut" in p and "through record 10" in p for p in found)


def test_tail_cut_at_a_line_boundary_is_found_by_the_anchor_only(ten: str) -> None:
    put_lines(ten, lines_of(ten)[:7])
    assert audit.verify(ten) == []  # the file alone looks whole ...
    (found,) = problems(ten)  # ... the anchor says how far the broker wrote
    assert found == (
        f"{ten}:7: the tail was cut: the trail ends at record 7 but the broker wrote through record 10 "
        "(3 record(s) missing at the end)"
    )


def test_a_replaced_last_record_differs_from_the_anchor(ten: str) -> None:
    lines = lines_of(ten)
    rec = json.loads(lines[-1])
    rec["decision"] = "deny"
    rec["hash"] = audit.chain_hash(rec["prev"], rec)  # a forger who recomputes the last hash
    lines[-1] = (audit.canonical(rec) + "\n").encode()
    put_lines(ten, lines)
    assert problems(ten) == [f"{ten}:10: record 10 is not the one the broker wrote (its hash differs from the anchor)"]


def test_a_deleted_log_with_its_anchor_left_is_not_intact(ten: str) -> None:
    os.unlink(ten)
    (found,) = problems(ten)
    assert "the trail ends at record 0 but the broker wrote through record 10" in found


# --- rotation ---------------------------------------------------------------------------------


def test_rotation_keeps_n_files_and_chains_across_them(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path, max_bytes=2000, keep=2)
    fill(log, 60, reason="x" * 100)
    files = audit.log_files(path)
    assert files == [f"{path}.2", f"{path}.1", path]
    assert not os.path.exists(f"{path}.3")
    for name in files:
        assert os.path.getsize(name) <= 2000
        assert os.stat(name).st_mode & 0o777 == 0o600
    older = [json.loads(raw) for raw in lines_of(f"{path}.1")]
    newest = [json.loads(raw) for raw in lines_of(path)]
    assert newest[0]["op"] == "rotate" and newest[0]["prev"] == older[-1]["hash"]
    assert newest[0]["seq"] == older[-1]["seq"] + 1 and newest[0]["rotated_to"] == "audit.jsonl.1"
    report = audit.verify_set(path)
    assert report.ok, report.problems
    assert report.notes and "starts after a rotation" in report.notes[0]
    assert report.last_seq == log.seq
    # every file alone is whole too (each starts with its rotation record)
    for name in files:
        assert audit.verify(name) == []


def test_removing_a_rotated_file_in_the_middle_is_named(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path, max_bytes=1500, keep=3)
    fill(log, 40)
    os.rename(f"{path}.3", f"{logdir}/gone")
    assert audit.verify_set(path).ok  # like retention: the oldest file may go
    shutil.copy(f"{logdir}/gone", f"{path}.3")
    os.unlink(f"{path}.2")
    found = problems(path)
    assert len(found) == 1 and found[0].startswith(f"{path}.1:1: ") and "removed before this line" in found[0]


def test_keep_zero_keeps_only_the_live_file(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path, max_bytes=1000, keep=0)
    fill(log, 30)
    assert audit.log_files(path) == [path]
    assert json.loads(lines_of(path)[0])["op"] == "rotate"
    assert audit.verify_set(path).ok


def test_rotation_setting_changes_apply_to_the_open_log(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    fill(log, 20)
    assert audit.log_files(path) == [path]
    log.configure(max_bytes=1500, keep=1, syslog_socket=None, syslog_facility="authpriv")
    fill(log, 20)
    assert audit.log_files(path) == [f"{path}.1", path]
    assert audit.verify_set(path).ok


def test_options_come_from_the_broker_settings() -> None:
    s = BrokerSettings(audit_max_bytes=5000, audit_keep=3, audit_syslog=True, audit_syslog_socket="/run/x.sock")
    assert audit.options(s) == {
        "max_bytes": 5000,
        "keep": 3,
        "syslog_socket": "/run/x.sock",
        "syslog_facility": "authpriv",
        "keep_days": 30.0,
        "syslog_required": True,
    }
    # the default is "auto": no mirror where the socket does not exist (test_audit_retention.py has the rest)
    assert audit.options(BrokerSettings(audit_syslog_socket="/nonexistent/log"))["syslog_socket"] is None
    assert BrokerSettings().audit_max_bytes > 1_000_000 and BrokerSettings().audit_keep >= 1
    with pytest.raises(ValueError, match="absolute"):
        BrokerSettings(audit_syslog_socket="dev/log")
    with pytest.raises(ValueError):
        BrokerSettings(audit_syslog_facility="mail")


# --- restart and recovery ------------------------------------------------------------------------


def test_restart_continues_the_chain(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    last = fill(log, 3)[-1]
    log.close()
    again = audit.AuditLog(path)
    rec = fill(again, 1)[0]
    assert (rec["seq"], rec["prev"]) == (4, last["hash"])
    assert audit.verify_set(path).ok


def test_restart_after_a_crash_between_rotation_and_first_record(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    last = fill(log, 3)[-1]
    log.close()
    os.rename(path, f"{path}.1")  # renamed, the new file never got its first record
    again = audit.AuditLog(path, keep=3)
    first = json.loads(lines_of(path)[0])
    assert first["op"] == "rotate" and first["prev"] == last["hash"] and first["seq"] == 4
    fill(again, 2)
    assert audit.verify_set(path).ok and audit.verify(path) == []


def test_torn_tail_from_a_crash_is_removed_and_recorded(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    last = fill(log, 3)[-1]
    log.close()
    with open(path, "ab") as fh:
        fh.write(b'{"caller":"alice","op":"ca')  # a write cut by the crash: never fsynced, never answered
    again = audit.AuditLog(path)
    rec = json.loads(lines_of(path)[-1])
    assert rec["op"] == "recover" and rec["prev"] == last["hash"] and rec["dropped_bytes"] == 26
    fill(again, 1)
    report = audit.verify_set(path)
    assert report.ok, report.problems
    assert any("partial line" in n for n in report.notes)


def test_a_log_cut_while_the_daemon_was_down_stays_visible_after_restart(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    fill(log, 6)
    log.close()
    put_lines(path, lines_of(path)[:4])
    again = audit.AuditLog(path)
    fill(again, 2)
    recs = [json.loads(raw) for raw in lines_of(path)]
    assert recs[4]["op"] == "recover" and recs[4]["missing"] == [5, 6] and recs[4]["seq"] == 7
    assert problems(path) == [f"{path}:5: 2 line(s) removed before this line (records 5..6 missing)"]


def test_a_log_deleted_while_running_is_recreated_and_the_gap_recorded(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    last = fill(log, 4)[-1]
    os.unlink(path)
    log.check()
    rec = fill(log, 1)[0]
    recs = [json.loads(raw) for raw in lines_of(path)]
    assert recs[0]["op"] == "recover" and recs[0]["prev"] == last["hash"] and recs[0]["missing"] == [1, 4]
    assert rec["seq"] == 6
    (found,) = problems(path)
    assert "lines before this one were removed" in found


def test_a_log_moved_away_is_reopened_at_its_path(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    fill(log, 2)
    os.rename(path, f"{logdir}/elsewhere")
    log.check()
    fill(log, 1)
    assert os.path.exists(path) and len(lines_of(f"{logdir}/elsewhere")) == 2


# --- concurrency ------------------------------------------------------------------------------------


def test_concurrent_appends_from_threads_never_interleave(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path, max_bytes=4_000_000, keep=50)
    threads, per = 16, 40
    start = threading.Barrier(threads)

    def worker(t: int) -> None:
        start.wait()
        for i in range(per):
            # lines of up to ~70 KB: far beyond PIPE_BUF and a page
            log.write({"id": f"{t}-{i}", "op": "call", "reason": chr(0x41 + t) * (1 + (i * 1777) % 70000)})

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for th in pool:
        th.start()
    for th in pool:
        th.join()
    ids = []
    for name in audit.log_files(path):
        for raw in lines_of(name):
            rec = json.loads(raw)
            if rec["op"] == "call":
                ids.append(rec["id"])
                assert set(rec["reason"]) == {chr(0x41 + int(rec["id"].split("-")[0]))}
    assert sorted(ids) == sorted(f"{t}-{i}" for t in range(threads) for i in range(per))
    report = audit.verify_set(path)
    assert report.ok, report.problems[:3]


def test_concurrent_async_records_are_all_written(logdir: str) -> None:
    log = audit.AuditLog(f"{logdir}/audit.jsonl")

    async def many() -> None:
        await asyncio.gather(*(log.record(id=str(i), op="call") for i in range(200)))

    asyncio.run(many())
    assert sorted(int(json.loads(raw)["id"]) for raw in lines_of(log.path)) == list(range(200))
    assert audit.verify(log.path) == []


def test_concurrent_records_share_fsyncs_in_order(logdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(f"{logdir}/audit.jsonl")
    syncs = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        syncs.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)

    async def many() -> None:
        await asyncio.gather(*(log.record(id=str(i), op="call") for i in range(200)))

    asyncio.run(many())
    # group commit: the records that queue behind a write go out together, one fsync a batch
    assert 1 <= len(syncs) < 50, len(syncs)
    recs = [json.loads(raw) for raw in lines_of(log.path)]
    assert [r["id"] for r in recs] == [str(i) for i in range(200)]  # in the order they were recorded
    assert [r["seq"] for r in recs] == list(range(1, 201))
    assert audit.verify(log.path) == []


def test_a_failed_batch_fails_every_waiter_and_leaves_no_partial_line(
    logdir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = audit.AuditLog(f"{logdir}/audit.jsonl")
    asyncio.run(log.record(id="before", op="call"))

    def broken_fsync(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", broken_fsync)

    async def many() -> list[BaseException | None]:
        return await asyncio.gather(*(log.record(id=str(i), op="call") for i in range(20)), return_exceptions=True)

    results = asyncio.run(many())
    assert all(isinstance(r, Unavailable) for r in results), results
    monkeypatch.undo()
    assert [json.loads(raw)["id"] for raw in lines_of(log.path)] == ["before"]
    asyncio.run(log.record(id="after", op="call"))
    assert [json.loads(raw)["id"] for raw in lines_of(log.path)] == ["before", "after"]
    assert audit.verify(log.path) == []


def test_check_reserves_room_past_the_end_without_changing_the_size(logdir: str) -> None:
    log = audit.AuditLog(f"{logdir}/audit.jsonl")
    asyncio.run(log.record(id="one", op="call"))
    size = os.stat(log.path).st_size
    log.check()
    st = os.stat(log.path)
    if not log._can_reserve:
        pytest.skip("this filesystem cannot fallocate with FALLOC_FL_KEEP_SIZE")
    assert st.st_size == size  # readers never see the reservation
    assert st.st_blocks * 512 >= size + audit.RESERVE_LOW
    asyncio.run(log.record(id="two", op="call"))
    assert [json.loads(raw)["id"] for raw in lines_of(log.path)] == ["one", "two"]
    log.close()  # gives the reservation back
    assert os.stat(log.path).st_blocks * 512 < size + audit.RESERVE_LOW


def test_check_refuses_when_the_filesystem_is_full(logdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(f"{logdir}/audit.jsonl")
    log.check()
    real = os.fstatvfs

    class Full:
        def __init__(self, st: os.statvfs_result) -> None:
            self.f_frsize = st.f_frsize
            self.f_bavail = 0

    monkeypatch.setattr(os, "fstatvfs", lambda fd: Full(real(fd)))
    with pytest.raises(Unavailable, match="filesystem is full"):
        log.check()
    assert "filesystem is full" in log.room_problem  # what status shows
    monkeypatch.undo()
    log.check()
    assert log.room_problem == ""


# --- syslog ------------------------------------------------------------------------------------------

SYSLOG_RE = re.compile(
    rb"<(?P<pri>\d+)>1 (?P<ts>\S+) (?P<host>\S+) (?P<app>\S+) (?P<pid>\d+) (?P<msgid>\S+) "
    rb"\[(?P<sd>mcp-privsep@32473(?: [a-z_]+=\"(?:[^\"\\\]]|\\.)*\")*)\] (?P<msg>.*)",
    re.S,
)


def sd_params(sd: bytes) -> dict[str, str]:
    return {
        m.group(1).decode(): re.sub(r"\\(.)", r"\1", m.group(2).decode())
        for m in re.finditer(rb'([a-z_]+)="((?:[^"\\\]]|\\.)*)"', sd)
    }


def test_syslog_message_is_rfc5424_with_structured_data() -> None:
    rec = {
        "ts": "2024-05-01T12:00:00.123Z",
        "seq": 7,
        "id": "abc",
        "caller": "alice",
        "uid": 1000,
        "op": "call",
        "tool": "demo.echo",
        "decision": "deny",
        "rule": '/etc/x "quoted" ]bracket\\ back',
        "exit": 77,
        "arg_keys": ["a", "b"],
        "reason": "line\nbreak",
        "prev": "0" * 64,
        "hash": "f" * 64,
    }
    msg = audit.format_syslog(rec, audit.SYSLOG_FACILITIES["authpriv"], "host.example", procid=42)
    m = SYSLOG_RE.fullmatch(msg)
    assert m is not None, msg
    assert int(m["pri"]) == 10 * 8 + 4  # authpriv.warning for a denial
    assert (m["ts"], m["host"], m["app"], m["pid"], m["msgid"]) == (
        b"2024-05-01T12:00:00.123Z",
        b"host.example",
        b"mcp-brokerd",
        b"42",
        b"call",
    )
    sd = sd_params(m["sd"])
    assert sd["rule"] == '/etc/x "quoted" ]bracket\\ back'
    assert (sd["caller"], sd["tool"], sd["exit"], sd["seq"], sd["arg_keys"]) == ("alice", "demo.echo", "77", "7", "a,b")
    assert "reason" not in sd and "prev" not in sd
    assert json.loads(m["msg"]) == rec
    allowed = audit.format_syslog({**rec, "decision": "allow"}, audit.SYSLOG_FACILITIES["local3"], "h")
    assert allowed.startswith(b"<158>1 ")  # local3.info


def test_syslog_message_over_the_limit_keeps_structured_data_and_valid_json() -> None:
    rec = {
        "ts": "2024-05-01T12:00:00.000Z",
        "op": "call",
        "caller": "a",
        "args": {"x": "y" * 50000},
        "reason": "r" * 9000,
    }
    msg = audit.format_syslog(rec, 10, "h")
    assert len(msg) <= audit.SYSLOG_MAX_BYTES
    m = SYSLOG_RE.fullmatch(msg)
    assert m is not None
    body = json.loads(m["msg"])
    assert body["msg_truncated"] is True and "args" not in body and len(body["reason"]) == 256


@pytest.fixture
def receiver(tmp_root: str) -> Iterator[tuple[socket.socket, str]]:
    address = f"{tmp_root}/log.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(5)
    try:
        yield sock, address
    finally:
        sock.close()


def test_records_reach_a_real_syslog_socket(logdir: str, receiver: tuple[socket.socket, str]) -> None:
    sock, address = receiver
    log = audit.AuditLog(f"{logdir}/audit.jsonl", syslog_socket=address, syslog_facility="local0")
    written = fill(log, 3)
    for rec in written:
        m = SYSLOG_RE.fullmatch(sock.recv(65536))
        assert m is not None and int(m["pri"]) == 16 * 8 + 6
        assert json.loads(m["msg"]) == rec and sd_params(m["sd"])["hash"] == rec["hash"]
    assert log.syslog is not None and log.syslog.sent == 3 and log.syslog.dropped == 0
    log.configure(max_bytes=0, keep=1, syslog_socket=None, syslog_facility="local0")
    fill(log, 1)
    sock.settimeout(0.2)
    with pytest.raises(TimeoutError):
        sock.recv(65536)


def test_missing_syslog_socket_never_fails_a_write(logdir: str) -> None:
    log = audit.AuditLog(f"{logdir}/audit.jsonl", syslog_socket=f"{logdir}/no-such.sock")
    fill(log, 3)
    assert log.syslog is not None and log.syslog.dropped == 3
    assert len(lines_of(log.path)) == 3


def test_a_syslog_reader_that_never_reads_never_blocks_a_write(
    logdir: str, receiver: tuple[socket.socket, str]
) -> None:
    _sock, address = receiver
    log = audit.AuditLog(f"{logdir}/audit.jsonl", syslog_socket=address)
    started = time.monotonic()
    fill(log, 300, reason="z" * 2000)
    assert time.monotonic() - started < 30
    assert log.syslog is not None and log.syslog.dropped > 0 and log.syslog.sent > 0
    assert len(lines_of(log.path)) == 300


# --- the audit command ----------------------------------------------------------------------------------


@pytest.fixture
def staged(tmp_root: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """A root with an audit log of 6 records at known times (minutes 00..05), as root would see it."""
    paths = Paths(tmp_root)
    os.makedirs(paths.log, 0o700)
    times = iter(f"2024-05-01T12:0{i}:00.000Z" for i in range(6))
    monkeypatch.setattr(audit_log, "timestamp", lambda t=None: next(times))
    log = audit.AuditLog(paths.audit_log)
    rows = [
        ("alice", "call", "demo.echo", "allow", 0, "ok"),
        ("alice", "report", "demo.secret", "deny", 77, None),
        ("bob", "call", "demo.add", "allow", 0, "ok"),
        ("bob", "call", "demo.fail", "allow", 1, "tool_error"),
        ("alice", "call", "demo.slow", "allow", 75, "timeout"),
        ("bob", "report", "", "usage", 64, None),
    ]
    for i, (caller, op, tool, decision, code, outcome) in enumerate(rows):
        rec = {"id": f"id{i}", "caller": caller, "op": op, "tool": tool, "decision": decision, "exit": code}
        if outcome:
            rec.update(outcome=outcome, duration_ms=1.5 * i)
        log.write(rec)
    log.close()
    monkeypatch.undo()
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # the commands are root-only; the files are ours
    yield paths


def run_ctl(paths: Paths, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = ctl_main(["--root", paths.root, "audit", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def ids(out: str) -> list[str]:
    return [json.loads(line)["id"] for line in out.splitlines()]


def test_audit_tails_the_last_records_as_json(staged: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ctl(staged, capsys, "-n", "2", "--json")
    assert code == 0 and ids(out) == ["id4", "id5"]
    code, out, _ = run_ctl(staged, capsys, "--json", "--all")
    assert ids(out) == [f"id{i}" for i in range(6)]
    assert run_ctl(staged, capsys, "--json", "-n", "0")[1] == ""
    assert run_ctl(staged, capsys, "-n", "1", "--all")[0] == 64
    assert out.splitlines()[0] == lines_of(staged.audit_log)[0].decode().rstrip("\n")  # as stored


def test_audit_filters(staged: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    assert ids(run_ctl(staged, capsys, "--json", "--caller", "bob")[1]) == ["id2", "id3", "id5"]
    assert ids(run_ctl(staged, capsys, "--json", "--tool", "demo.fail,demo.slow")[1]) == ["id3", "id4"]
    assert ids(run_ctl(staged, capsys, "--json", "--action", "demo.echo")[1]) == ["id0"]
    assert ids(run_ctl(staged, capsys, "--json", "--decision", "deny", "--decision", "usage")[1]) == ["id1", "id5"]
    assert ids(run_ctl(staged, capsys, "--json", "--caller", "alice", "--decision", "allow", "-n", "1")[1]) == ["id4"]
    since = ("--since", "2024-05-01T12:02:00Z", "--until", "2024-05-01 12:04:00")
    assert ids(run_ctl(staged, capsys, "--json", *since)[1]) == ["id2", "id3", "id4"]
    assert ids(run_ctl(staged, capsys, "--json", "--since", "2024-05-01T14:03:30+02:00")[1]) == ["id4", "id5"]
    assert run_ctl(staged, capsys, "--json", "--since", "1h")[1] == ""  # all of it is older


def test_audit_table(staged: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ctl(staged, capsys, "-n", "3")
    rows = out.splitlines()
    assert code == 0 and rows[0].startswith("TIME (UTC)") and len(rows) == 4
    assert rows[1].split()[:8] == ["2024-05-01", "12:03:00.000", "bob", "call", "demo.fail", "allow", "1", "tool_error"]
    assert rows[3].split()[:7] == ["2024-05-01", "12:05:00.000", "bob", "report", "-", "usage", "64"]


def test_audit_bad_time_is_a_usage_error(staged: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_ctl(staged, capsys, "--since", "yesterday-ish")
    assert code == 64 and "neither an ISO time" in err and err.count("\n") == 1


def test_audit_verify_exit_codes(staged: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_ctl(staged, capsys, "verify", staged.audit_log)
    assert code == 0 and "intact: 6 records in 1 file(s) (records 1..6)" in out
    lines = lines_of(staged.audit_log)
    put_lines(staged.audit_log, lines[:2] + lines[3:])
    code, out, err = run_ctl(staged, capsys, "verify", staged.audit_log)
    assert code == 1
    assert f"{staged.audit_log}:3: 1 line(s) removed before this line (record 3 missing)" in out.splitlines()
    assert "NOT intact" in err and err.count("\n") == 1


def test_audit_needs_root(staged: Paths, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    for argv in ((), ("verify",)):
        code, _, err = run_ctl(staged, capsys, *argv)
        assert code == 77 and "run as root" in err


def test_parse_time() -> None:
    assert parse_time("90s", now=1000.0) == 910.0
    assert parse_time("2h", now=10000.0) == 2800.0
    assert parse_time("1w", now=10**6) == 10**6 - 7 * 86400
    assert parse_time("1970-01-01T00:01:00") == 60.0
    assert parse_time("1970-01-01T01:01:00+01:00") == 60.0
    f = Filter((), (), (), parse_time("1970-01-01T00:01:00Z"), None)
    assert f({"ts": "1970-01-01T00:01:00.000Z"}) and not f({"ts": "1970-01-01T00:00:59.999Z"}) and not f({})


def test_table_row_is_one_line() -> None:
    row = table_row({"ts": "2024-05-01T12:00:00.000Z", "caller": "a", "op": "call", "reason": "two\nlines"})
    assert "\n" not in row and row.endswith("two lines")


FOLLOW = ("audit", "--follow", "--json", "-n", "1")


@needs_root
def test_follow_prints_new_records_across_a_rotation(tmp_root: str) -> None:
    paths = Paths(tmp_root)
    os.makedirs(paths.log, 0o700)
    log = audit.AuditLog(paths.audit_log, max_bytes=700, keep=200)
    fill(log, 3)
    proc = subprocess.Popen(
        [sys.executable, "-c", "from broker.admin.cli import entry; entry()", "--root", tmp_root, *FOLLOW],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    try:
        assert proc.stdout is not None
        sel = selectors.DefaultSelector()
        sel.register(proc.stdout, selectors.EVENT_READ)
        got: list[dict[str, Any]] = []

        def read_until(n: int) -> None:
            deadline = time.monotonic() + 20
            buf = b""
            while len(got) < n and time.monotonic() < deadline:
                if sel.select(0.5):
                    chunk = os.read(proc.stdout.fileno(), 65536)  # type: ignore[union-attr]
                    assert chunk, proc.stderr.read() if proc.stderr else ""
                    buf += chunk
                    *done, buf = buf.split(b"\n")
                    got.extend(json.loads(x) for x in done if x)

        read_until(1)
        first = log.seq
        assert [r["seq"] for r in got] == [first]  # the tail: the newest record
        fill(log, 60)  # a rotation every second record while it follows
        assert len(audit.log_files(paths.audit_log)) > 20
        read_until(log.seq - first + 1)
        assert [r["seq"] for r in got] == list(range(first, log.seq + 1))  # nothing lost, nothing twice, in order
        assert len([r for r in got if r["op"] == "call" and r["seq"] > first]) == 60
    finally:
        proc.terminate()
        proc.wait(10)
