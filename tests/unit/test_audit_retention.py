"""Audit retention by age, the disk warning of ``status``, the syslog mirror's "auto" default (issue 16).

Retention: a flood of records (small ``max_bytes``, ``keep = 2``) never
rotates away records younger than ``keep_days``; more files are kept
instead, and the chain over all of them verifies (by the chain code and by
``mcp-brokerctl audit verify``). Files older than ``keep_days`` *and* beyond
``keep`` do go; ``keep_days = 0`` is the count-only rotation. Status: a
warning when the log's filesystem is low on space, or fills within a week at
the recent write rate (a fake ``statvfs``), shown by ``status`` and
``doctor``. Syslog: "auto" mirrors exactly when the socket exists (a real
AF_UNIX datagram socket in a temporary directory), ``true`` reports a
missing socket.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.admin.cli import audit_trail_lines
from broker.admin.cli import main as ctl_main
from broker.admin.doctor import Doctor
from broker.core.paths import Paths
from broker.daemon import audit
from broker.daemon.audit import log as audit_log
from broker.daemon.config import BrokerSettings

DAY = 86400.0


@pytest.fixture
def path(tmp_root: str) -> str:
    logdir = os.path.join(tmp_root, "log")
    os.mkdir(logdir, 0o700)
    return f"{logdir}/audit.jsonl"


def fill(log: audit.AuditLog, n: int, tag: str = "r") -> list[dict[str, Any]]:
    return [log.write({"id": f"{tag}{i}", "op": "call", "decision": "allow", "reason": "x" * 100}) for i in range(n)]


def trail(path: str) -> list[dict[str, Any]]:
    """Every record of the trail, oldest file first."""
    out = []
    for name in audit.log_files(path):
        with open(name, "rb") as fh:
            out += [json.loads(raw) for raw in fh.read().splitlines() if raw.strip()]
    return out


def shift_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + seconds)


# --- retention -------------------------------------------------------------------------------------


def test_a_flood_never_rotates_away_records_younger_than_keep_days(path: str) -> None:
    log = audit.AuditLog(path, max_bytes=2000, keep=2, keep_days=30)
    written = fill(log, 200)
    files = audit.log_files(path)
    assert len(files) > 10  # far beyond keep = 2: every file is younger than 30 days
    assert files[0] == f"{path}.{len(files) - 1}" and files[-1] == path  # numbered on, without gaps
    kept = trail(path)
    assert [r["seq"] for r in kept] == list(range(1, log.seq + 1))  # not one record lost
    assert {r["id"] for r in written} <= {r["id"] for r in kept}
    assert kept[0]["prev"] == audit.GENESIS
    rotations = [r for r in kept if r["op"] == "rotate"]
    assert rotations and "deleted_files" not in rotations[-1] and rotations[-1]["kept_for_age"] == len(files) - 3
    report = audit.verify_set(path)
    assert report.ok, report.problems
    assert (report.first_seq, report.last_seq, report.records) == (1, log.seq, log.seq)
    for name in files:  # each file alone is whole too
        assert audit.verify(name) == []
        assert os.stat(name).st_mode & 0o777 == 0o600


def test_the_cli_verifies_and_reads_more_files_than_audit_keep(
    tmp_root: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = Paths(tmp_root)
    os.makedirs(paths.log, 0o700)
    log = audit.AuditLog(paths.audit_log, max_bytes=2000, keep=1, keep_days=30)
    fill(log, 120)
    log.close()
    files = audit.log_files(paths.audit_log)
    assert len(files) > 5
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr("broker.admin.audit_reader.permission_problems", lambda _path: [])  # not mcp-broker's here
    assert ctl_main(["--root", paths.root, "audit", "verify"]) == 0
    out = capsys.readouterr().out
    assert f"intact: {log.seq} records in {len(files)} file(s) (records 1..{log.seq})" in out
    assert ctl_main(["--root", paths.root, "audit", "--json", "--all"]) == 0
    shown = [json.loads(line)["seq"] for line in capsys.readouterr().out.splitlines()]
    assert shown == list(range(1, log.seq + 1))


def test_files_older_than_keep_days_and_beyond_keep_go(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(path, max_bytes=2000, keep=2, keep_days=30)
    old = fill(log, 100, "old")
    assert len(audit.log_files(path)) > 5
    shift_clock(monkeypatch, 31 * DAY)  # a month later: the first flood is past keep_days
    new = fill(log, 100, "new")
    kept = trail(path)
    ids = {r["id"] for r in kept}
    assert {r["id"] for r in new} <= ids  # young records all stay
    assert not {r["id"] for r in old} <= ids  # old ones beyond keep went
    cutoff = time.time() - 30 * DAY
    for n, name in audit.rotated(path):
        if n > 2:  # beyond keep: only files with a record younger than keep_days
            with open(name, "rb") as fh:
                newest = json.loads(fh.read().splitlines()[-1])
            assert audit_log._parse_ts(newest["ts"]) > cutoff, name
    assert [r["seq"] for r in kept] == list(range(kept[0]["seq"], log.seq + 1))  # only the oldest end went
    assert any(r.get("deleted_files") for r in kept if r["op"] == "rotate")
    report = audit.verify_set(path)
    assert report.ok, report.problems
    assert any("starts after a rotation" in note for note in report.notes)


def test_keep_days_zero_is_count_only(path: str) -> None:
    log = audit.AuditLog(path, max_bytes=2000, keep=2, keep_days=0)
    fill(log, 100)
    assert audit.log_files(path) == [f"{path}.2", f"{path}.1", path]
    assert audit.verify_set(path).ok


def test_keep_zero_still_keeps_young_files(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(path, max_bytes=1500, keep=0, keep_days=1)
    fill(log, 40)
    first = audit.log_files(path)
    assert len(first) > 3 and trail(path)[0]["seq"] == 1
    shift_clock(monkeypatch, 2 * DAY)
    fill(log, 40, "later")
    assert trail(path)[0]["seq"] > 1  # now the old ones may go
    assert audit.verify_set(path).ok


def test_configure_and_options_carry_keep_days(path: str) -> None:
    log = audit.AuditLog(path)
    assert log.keep_days == 0  # a bare AuditLog rotates by count, as before
    log.configure(**audit.options(BrokerSettings(audit_keep_days=7, audit_syslog=False)))
    assert log.keep_days == 7
    assert BrokerSettings().audit_keep_days == 30
    with pytest.raises(ValueError):
        BrokerSettings(audit_keep_days=-1)


# --- the disk warning --------------------------------------------------------------------------


class FakeVfs:
    def __init__(self, free: int, total: int) -> None:
        self.f_frsize = 4096
        self.f_bavail = free // 4096
        self.f_blocks = total // 4096


def test_status_warns_when_the_disk_is_low(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    log = audit.AuditLog(path)
    monkeypatch.setattr(os, "statvfs", lambda _p: FakeVfs(free=500 * 2**20, total=100 * 2**30))
    st = log.trail_status()
    assert st["free_bytes"] == 500 * 2**20 and st["total_bytes"] == 100 * 2**30
    (warning,) = st["warnings"]
    assert "500.0 MiB free" in warning and "less than 1.0 GiB" in warning and "every call is refused" in warning
    # 10 % of a small disk is the threshold there
    monkeypatch.setattr(os, "statvfs", lambda _p: FakeVfs(free=500 * 2**20, total=4 * 2**30))
    assert log.trail_status()["warnings"] == []
    monkeypatch.setattr(os, "statvfs", lambda _p: FakeVfs(free=300 * 2**20, total=4 * 2**30))
    assert "less than 409.6 MiB" in log.trail_status()["warnings"][0]


def test_status_warns_when_the_write_rate_fills_the_disk_within_a_week(
    path: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = audit.AuditLog(path)
    assert log.trail_status()["bytes_per_day"] is None  # not measured yet
    fill(log, 100)
    assert log.written == os.path.getsize(path)
    later = time.monotonic() + 3600  # those bytes over an hour
    per_day = log.written * 24
    monkeypatch.setattr(os, "statvfs", lambda _p: FakeVfs(free=3 * per_day, total=5 * 3 * per_day))
    st = log.trail_status(now=later)
    assert abs(st["bytes_per_day"] - per_day) < per_day * 0.01
    assert 2.9 <= st["days_left"] <= 3.1
    (warning,) = st["warnings"]
    assert "fills in about" in warning and "every call is refused" in warning
    monkeypatch.setattr(os, "statvfs", lambda _p: FakeVfs(free=30 * per_day, total=5 * 30 * per_day))
    st = log.trail_status(now=later)
    assert st["warnings"] == [] and st["days_left"] > 7


def test_the_status_and_doctor_commands_show_the_warning(tmp_root: str) -> None:
    st = {
        "files": 14,
        "keep": 10,
        "keep_days": 30.0,
        "free_bytes": 2**30,
        "total_bytes": 2**34,
        "bytes_per_day": 2**29,
        "days_left": 2.0,
        "syslog": "off",
        "warnings": ["the audit log's filesystem fills in about 2.0 days"],
    }
    lines = audit_trail_lines(st)
    assert lines[0].startswith("audit trail: 14 file(s) kept") and "full in ~2.0 days" in lines[0]
    assert lines[1:] == ["warning: audit: the audit log's filesystem fills in about 2.0 days"]
    assert audit_trail_lines(None) == []  # an older daemon

    def admin(op: str, **_fields: Any) -> Any:
        if op == "status":
            return {"broker": "up", "pid": 0, "audit": "ok", "servers": [], "host": {}, "audit_trail": st}
        return []

    doctor = Doctor(Paths(tmp_root), admin=admin)
    doctor.check_daemon()
    found = [f for f in doctor.findings if f.section == "audit"]
    assert [(f.level, f.message) for f in found] == [("warning", st["warnings"][0])]


def test_admin_status_carries_the_trail(path: str) -> None:
    import asyncio
    import types

    from broker.daemon import service

    log = audit.AuditLog(path)
    fake = types.SimpleNamespace(
        started=time.time(),
        audit=log,
        servers=types.SimpleNamespace(all=list),
        spawner=None,
        state=types.SimpleNamespace(freezes=list, approvals=lambda _status: []),
        _server_status=None,
        _holdings=dict,
        _disk_report=dict,
    )
    st = asyncio.run(service.Broker.admin_status(fake, {}))  # type: ignore[arg-type]
    assert st["audit"] == "ok"
    assert st["audit_trail"]["files"] == 1 and isinstance(st["audit_trail"]["warnings"], list)
    json.dumps(st)  # it goes over the wire


# --- the syslog mirror: "auto" -----------------------------------------------------------------


@pytest.fixture
def listener(tmp_root: str) -> Iterator[tuple[socket.socket, str]]:
    address = f"{tmp_root}/dev-log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2)
    try:
        yield sock, address
    finally:
        sock.close()


def test_auto_is_the_default_and_mirrors_where_the_socket_exists(
    path: str, listener: tuple[socket.socket, str]
) -> None:
    sock, address = listener
    settings = BrokerSettings(audit_syslog_socket=address)
    assert settings.audit_syslog == "auto"
    opts = audit.options(settings)
    assert opts["syslog_socket"] == address and opts["syslog_required"] is False
    log = audit.AuditLog(path, **opts)
    rec = log.write({"id": "m1", "op": "call", "decision": "allow"})
    message = sock.recv(65536).decode()
    assert 'id="m1"' in message and rec["hash"] in message
    st = log.trail_status()
    assert st["syslog"] == f"{address}: 1 sent, 0 dropped"
    assert not [w for w in st["warnings"] if "syslog" in w]
    log.close()


def test_auto_without_a_socket_is_off_and_a_reload_turns_it_on(
    path: str, tmp_root: str, listener: tuple[socket.socket, str]
) -> None:
    sock, address = listener
    missing = f"{tmp_root}/no-log"
    log = audit.AuditLog(path, **audit.options(BrokerSettings(audit_syslog_socket=missing)))
    assert log.syslog is None and log.trail_status()["syslog"] == "off"
    log.write({"id": "quiet", "op": "call", "decision": "allow"})
    with open(missing, "w"):  # a file, not a socket: still off
        pass
    assert audit.options(BrokerSettings(audit_syslog_socket=missing))["syslog_socket"] is None
    log.configure(**audit.options(BrokerSettings(audit_syslog_socket=address)))  # reload: the socket is there now
    log.write({"id": "heard", "op": "call", "decision": "allow"})
    assert 'id="heard"' in sock.recv(65536).decode()
    log.close()


def test_false_is_off_even_with_a_socket(path: str, listener: tuple[socket.socket, str]) -> None:
    _sock, address = listener
    assert audit.options(BrokerSettings(audit_syslog=False, audit_syslog_socket=address))["syslog_socket"] is None


def test_true_with_a_missing_socket_is_reported_in_status(path: str, tmp_root: str) -> None:
    missing = f"{tmp_root}/no-log"
    opts = audit.options(BrokerSettings(audit_syslog=True, audit_syslog_socket=missing))
    assert opts["syslog_socket"] == missing and opts["syslog_required"] is True
    log = audit.AuditLog(path, **opts)
    log.write({"id": "lost", "op": "call", "decision": "allow"})  # never fails the write
    st = log.trail_status()
    assert st["syslog"] == f"{missing}: 0 sent, 1 dropped"
    assert any(f"audit_syslog = true but {missing} is not a socket" in w for w in st["warnings"])


def test_a_failing_auto_mirror_is_reported_in_status(path: str, tmp_root: str) -> None:
    address = f"{tmp_root}/gone-log"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    log = audit.AuditLog(path, **audit.options(BrokerSettings(audit_syslog_socket=address)))
    sock.close()
    os.unlink(address)  # the syslog daemon went away
    log.write({"id": "x", "op": "call", "decision": "allow"})
    assert any("syslog mirror is failing" in w for w in log.trail_status()["warnings"])


def test_the_setting_accepts_auto_true_false_only() -> None:
    assert BrokerSettings(audit_syslog=True).audit_syslog is True
    assert BrokerSettings(audit_syslog=False).audit_syslog is False
    with pytest.raises(ValueError):
        BrokerSettings(audit_syslog="sometimes")  # type: ignore[arg-type]
