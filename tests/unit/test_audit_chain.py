"""Edge cases of ``broker.daemon.audit.chain`` that ``test_audit.py`` does not reach.

The set of files when the directory is missing, the anchor's format,
what counts as a record, reading lines backwards (empty files, blank
lines, tiny blocks), a trail without record numbers (chained by hash
alone), the cap on listed problems, an edited anchor, and ``verify_set``
retrying when the trail changes under it.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any

import pytest

from broker.daemon import audit
from broker.daemon.audit import chain


@pytest.fixture
def logdir(tmp_root: str) -> str:
    path = os.path.join(tmp_root, "log")
    os.mkdir(path, 0o700)
    return path


def fill(path: str, n: int, **kwargs: Any) -> audit.AuditLog:
    log = audit.AuditLog(path, **kwargs)
    for i in range(n):
        log.write({"id": f"r{i}", "op": "call", "decision": "allow"})
    return log


def chained(records: list[dict[str, Any]]) -> bytes:
    """Lines of hand-made records, hash-chained from the genesis (with whatever fields they have)."""
    prev = audit.GENESIS
    out = []
    for rec in records:
        rec = {**rec, "prev": prev}
        rec["hash"] = audit.chain_hash(prev, rec)
        prev = rec["hash"]
        out.append(audit.canonical(rec).encode() + b"\n")
    return b"".join(out)


# --- files and the anchor ------------------------------------------------------------------------


def test_a_missing_directory_has_no_files(tmp_root: str) -> None:
    path = os.path.join(tmp_root, "nowhere", "audit.jsonl")
    assert audit.rotated(path) == []
    assert audit.log_files(path) == []
    report = audit.verify_set(path)
    assert report.ok and report.records == 0 and report.files == []


def test_rotated_names_only_numbered_siblings(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    for name in ("audit.jsonl.1", "audit.jsonl.12", "audit.jsonl.0", "audit.jsonl.x", "audit.jsonl.1.gz", "other.1"):
        with open(f"{logdir}/{name}", "wb"):
            pass
    assert audit.rotated(path) == [(1, f"{path}.1"), (12, f"{path}.12")]
    assert audit.log_files(path) == [f"{path}.12", f"{path}.1"]  # oldest first; the live file does not exist


@pytest.mark.parametrize(
    ("text", "found"),
    [
        (b"00000000000000000007 " + b"a" * 64 + b"\n", (7, "a" * 64)),
        (b"7 " + b"b" * 64, (7, "b" * 64)),
    ],
)
def test_read_head(logdir: str, text: bytes, found: tuple[int, str]) -> None:
    with open(f"{logdir}/h", "wb") as fh:
        fh.write(text)
    assert audit.read_head(f"{logdir}/h") == found


@pytest.mark.parametrize(
    "text", [b"", b"x", b"7 " + b"A" * 64, b"7 " + b"a" * 63, b"-1 " + b"a" * 64, b"7  " + b"a" * 64]
)
def test_read_head_rejects_anything_else(logdir: str, text: bytes) -> None:
    with open(f"{logdir}/h", "wb") as fh:
        fh.write(text)
    with pytest.raises(ValueError, match="not an audit anchor"):
        audit.read_head(f"{logdir}/h")


def test_read_head_of_a_missing_anchor_is_none(logdir: str) -> None:
    assert audit.read_head(f"{logdir}/none") is None


@pytest.mark.parametrize(
    "raw",
    [b"[1, 2]", b'"text"', b"{", b'{"hash": "h"}', b'{"prev": "p"}', b'{"hash": 1, "prev": "p"}', b"\xff"],
)
def test_what_is_not_a_record(raw: bytes) -> None:
    assert chain.parse_record(raw) is None


def test_a_record_needs_only_a_hash_and_a_prev() -> None:
    assert chain.parse_record(b'{"hash": "h", "prev": "p", "x": 1}') == {"hash": "h", "prev": "p", "x": 1}


# --- reading backwards -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "lines"),
    [
        (b"", []),
        (b"\n", [b""]),
        (b"a\nb\nc\n", [b"c", b"b", b"a"]),
        (b"a\nb\nc", [b"c", b"b", b"a"]),  # a last line without its newline is what is there
        (b"a\n\nb\n", [b"b", b"", b"a"]),
        (b"long line here\nx\n", [b"x", b"long line here"]),
    ],
)
@pytest.mark.parametrize("block", [1, 2, 3, 65536])
def test_reverse_lines(data: bytes, lines: list[bytes], block: int) -> None:
    fh = io.BytesIO(data)
    fh.fileno = lambda: -1  # type: ignore[method-assign]  # not used: ``end`` is given
    assert list(audit.reverse_lines(fh, len(data), block)) == lines


def test_reverse_lines_stops_at_end(logdir: str) -> None:
    with open(f"{logdir}/f", "wb") as fh:
        fh.write(b"one\ntwo\nthree\n")
    with open(f"{logdir}/f", "rb") as fh:
        assert list(audit.reverse_lines(fh)) == [b"three", b"two", b"one"]
        assert list(audit.reverse_lines(fh, end=8)) == [b"two", b"one"]


def test_last_record_skips_blank_lines_and_answers_none_otherwise(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = fill(path, 2)
    with open(path, "rb") as fh:
        last = json.loads(fh.read().splitlines()[-1])
    log.close()
    with open(path, "ab") as fh:
        fh.write(b"\n  \n\n")
    assert chain.last_record(path) == last
    assert chain.last_record(f"{logdir}/missing") is None
    with open(f"{logdir}/blank", "wb") as fh:
        fh.write(b"\n\n")
    assert chain.last_record(f"{logdir}/blank") is None
    with open(f"{logdir}/bad", "wb") as fh:
        fh.write(b'{"ok": 1}\nnot json\n')
    assert chain.last_record(f"{logdir}/bad") is None  # the last line decides, a valid one before it does not


# --- verification -------------------------------------------------------------------------------------


def test_a_trail_without_record_numbers_is_checked_by_hash_alone(logdir: str) -> None:
    path = f"{logdir}/old.jsonl"
    lines = chained([{"id": f"r{i}", "op": "call"} for i in range(5)]).splitlines(keepends=True)
    with open(path, "wb") as fh:
        fh.write(b"".join(lines))
    report = audit.verify_files([path])
    assert report.ok and report.records == 5 and report.first_seq is None and report.last_seq is None
    with open(path, "wb") as fh:
        fh.write(b"".join(lines[:2] + lines[3:]))
    assert audit.verify_files([path]).problems == [
        f"{path}:3: chain broken: a line before it was removed, reordered or edited"
    ]


def test_an_unreadable_line_in_a_trail_without_numbers_is_named_once(logdir: str) -> None:
    path = f"{logdir}/old.jsonl"
    lines = chained([{"id": f"r{i}"} for i in range(3)]).splitlines(keepends=True)
    lines[1] = b"garbage\n"
    with open(path, "wb") as fh:
        fh.write(b"".join(lines))
    assert audit.verify_files([path]).problems == [f"{path}:2: not a valid audit record (edited or cut)"]


def test_problems_beyond_the_cap_are_counted(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    extra = 7
    with open(path, "wb") as fh:
        fh.write(b"\n" * (chain.MAX_PROBLEMS + extra))
    report = audit.verify_files([path])
    assert not report.ok
    assert len(report.problems) == chain.MAX_PROBLEMS + 1
    assert report.problems[0] == f"{path}:1: empty line (inserted, or a line was cut out)"
    assert report.problems[-1] == f"... and {extra} more problem(s)"
    assert report.more == extra


def test_an_edited_anchor_is_a_problem_of_the_set(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    fill(path, 3).close()
    with open(audit.head_path(path), "wb") as fh:
        fh.write(b"edited\n")
    report = audit.verify_set(path)
    assert report.records == 3
    assert report.problems == [f"{audit.head_path(path)}: not an audit anchor (the anchor was edited)"]
    assert audit.verify_set(path, use_head=False).ok


def test_an_anchor_ahead_of_an_empty_set_names_the_missing_file(logdir: str) -> None:
    report = audit.verify_files([], head=(4, "c" * 64))
    assert report.problems == [
        "(no audit file): the tail was cut: the trail ends at record 0 but the broker wrote through record 4 "
        "(4 record(s) missing at the end)"
    ]


def test_verify_set_retries_when_the_trail_changes_under_it(logdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = f"{logdir}/audit.jsonl"
    log = fill(path, 30, max_bytes=1500, keep=5)
    log.close()
    assert len(audit.log_files(path)) > 2
    real = chain.verify_files
    seen: list[list[str]] = []

    def rotating(files: list[str], head: tuple[int, str] | None = None) -> audit.Report:
        seen.append(list(files))
        report = real(files, head)
        if len(seen) == 1:
            os.unlink(files[0])  # retention removes the oldest file in the middle of the check
        return report

    monkeypatch.setattr(chain, "verify_files", rotating)
    report = audit.verify_set(path)
    assert len(seen) == 2 and seen[1] == seen[0][1:]
    assert report.ok, report.problems
    assert report.files == seen[1]


def test_verify_set_gives_up_after_its_attempts(logdir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = f"{logdir}/audit.jsonl"
    fill(path, 2).close()
    real = chain.verify_files
    calls: list[int] = []

    def always_moving(files: list[str], head: tuple[int, str] | None = None) -> audit.Report:
        calls.append(1)
        report = real(files, head)
        os.rename(path, path + ".tmp")  # a new inode at the same name every time
        _replace(path)
        return report

    monkeypatch.setattr(chain, "verify_files", always_moving)
    report = audit.verify_set(path, attempts=3)
    assert len(calls) == 3
    assert report.records == 2


def _replace(path: str) -> None:
    """Put a copy of ``path.tmp`` back at ``path`` (another inode)."""
    with open(path + ".tmp", "rb") as src, open(path, "wb") as dst:
        dst.write(src.read())
    os.unlink(path + ".tmp")


# --- two-phase records: intents without an outcome ----------------------------------------------------


def two_phase(log: audit.AuditLog, *events: tuple[str, str]) -> None:
    """Write ``(what, id)`` events: "start", "intent", "outcome" or "other"."""
    for what, request in events:
        if what == "start":
            log.write({"id": request, "op": "start", "decision": "start"})
        elif what == "other":
            log.write({"id": request, "op": "list", "decision": "allow"})
        else:
            log.write({"id": request, "op": "call", "decision": "allow", "phase": what})


def test_unfinished_calls_are_the_intents_without_an_outcome_since_the_last_start(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    two_phase(
        log,
        ("intent", "old"),  # before the last start: the start before this one closed its books
        ("start", "s1"),
        ("intent", "a"),
        ("outcome", "a"),
        ("intent", "b"),
        ("other", "x"),
        ("intent", "c"),
    )
    found = audit.unfinished_calls(path)
    assert [r["id"] for r in found] == ["b", "c"]  # oldest first
    assert all(r["phase"] == "intent" and r["op"] == "call" for r in found)


def test_unfinished_calls_without_any_start_read_the_whole_trail_across_rotations(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path, max_bytes=1200, keep=10)
    two_phase(log, ("intent", "first"), *[("other", f"o{i}") for i in range(12)], ("intent", "last"))
    assert len(audit.log_files(path)) > 1
    with open(path, "ab") as fh:
        fh.write(b"\n")  # a blank line is skipped, not a record
    assert [r["id"] for r in audit.unfinished_calls(path)] == ["first", "last"]


def test_unfinished_calls_stop_at_the_scan_limit(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    log = audit.AuditLog(path)
    two_phase(log, ("intent", "far"), *[("other", f"o{i}") for i in range(5)], ("intent", "near"))
    assert [r["id"] for r in audit.unfinished_calls(path, limit=200)] == ["near"]
    assert [r["id"] for r in audit.unfinished_calls(path)] == ["far", "near"]


def test_an_outcome_closes_only_its_own_intent(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    two_phase(audit.AuditLog(path), ("start", "s"), ("intent", "a"), ("intent", "b"), ("outcome", "b"))
    assert [r["id"] for r in audit.unfinished_calls(path)] == ["a"]
    assert audit.unfinished_calls(f"{logdir}/none.jsonl") == []


def test_verify_notes_a_call_that_reached_its_server_without_an_outcome(logdir: str) -> None:
    path = f"{logdir}/audit.jsonl"
    two_phase(audit.AuditLog(path), ("intent", "done"), ("outcome", "done"), ("intent", "hung"), ("other", "x"))
    report = audit.verify_set(path)
    assert report.ok  # not a broken chain: the broker stopped while the call ran
    assert report.dangling == ["hung"]
    assert report.notes == [
        f"{path}:3: call hung reached its server but has no outcome record: the broker stopped while it "
        "ran (its next start records the outcome as unknown)"
    ]
