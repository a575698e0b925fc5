"""The audit trail: one hash-chained JSON line per decision, fsynced.

Each record carries ``prev`` (the previous record's hash) and ``hash``
(SHA-256 over ``prev`` and the record's canonical JSON without ``hash``),
so an edited, removed, reordered or truncated line breaks the chain. A
record is written with one ``write`` on an ``O_APPEND`` descriptor and
fsynced before the caller gets its answer; appends are serialised, so
concurrent calls never interleave.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
import time
import uuid
from typing import Any

from broker.errors import Unavailable

GENESIS = "0" * 64


def canonical(record: dict[str, Any]) -> str:
    """The exact text a record's hash covers."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def chain_hash(prev: str, record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256((prev + "\n" + canonical(body)).encode()).hexdigest()


def new_request_id() -> str:
    return uuid.uuid4().hex[:16]


def args_digest(args: Any) -> str:
    """Digest of argument values, logged instead of the values themselves."""
    return "sha256:" + hashlib.sha256(canonical({"a": args}).encode()).hexdigest()[:32]


def _last_hash(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 65536))
            tail = fh.read()
    except FileNotFoundError:
        return GENESIS
    for line in reversed(tail.splitlines()):
        if not line.strip():
            continue
        try:
            value = json.loads(line).get("hash")
        except ValueError:
            break
        if isinstance(value, str):
            return value
        break
    return GENESIS


class AuditLog:
    """Appends records to the audit file; a failure refuses the call."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._alock = asyncio.Lock()
        self._fd = -1
        self._prev = GENESIS
        self.healthy = False
        self.error = ""
        self.open()

    def open(self) -> None:
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
            self._prev = _last_hash(self.path)
            self.healthy = True
            self.error = ""
        except OSError as exc:
            self.healthy = False
            self.error = f"{self.path}: {exc.strerror}"

    def _append(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self._fd < 0:
                raise OSError(self.error or "audit log not open")
            record["prev"] = self._prev
            record["hash"] = chain_hash(self._prev, record)
            line = (canonical(record) + "\n").encode()
            written = os.write(self._fd, line)
            if written != len(line):
                raise OSError("short write to the audit log")
            os.fsync(self._fd)
            self._prev = record["hash"]

    async def record(self, **fields: Any) -> None:
        """Write one record durably; raise Unavailable when that fails."""
        record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"}
        record.update(fields)
        async with self._alock:
            try:
                await asyncio.to_thread(self._append, record)
            except OSError as exc:
                self.healthy = False
                self.error = f"{self.path}: {exc.strerror or exc}"
                raise Unavailable("broker unavailable: the audit log cannot be written, so no call is served") from None
        self.healthy = True

    def check(self) -> None:
        """Refuse to serve when the audit file is gone or unwritable."""
        try:
            st = os.fstat(self._fd) if self._fd >= 0 else None
        except OSError:
            st = None
        if st is None or st.st_nlink == 0:
            self.close()
            self.open()
        if not self.healthy:
            raise Unavailable("broker unavailable: the audit log cannot be written, so no call is served")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def verify(path: str) -> list[str]:
    """Check the chain of one audit file; return problems (empty: intact)."""
    problems: list[str] = []
    prev: str | None = None
    with open(path, "rb") as fh:
        data = fh.read()
    if data and not data.endswith(b"\n"):
        problems.append(f"{path}: last line is truncated")
    for lineno, raw in enumerate(data.splitlines(), 1):
        try:
            record = json.loads(raw)
        except ValueError:
            problems.append(f"{path}:{lineno}: not valid JSON")
            prev = None
            continue
        if not isinstance(record, dict):
            problems.append(f"{path}:{lineno}: not a JSON object")
            continue
        if prev is not None and record.get("prev") != prev:
            problems.append(f"{path}:{lineno}: chain broken (a line before it was removed, reordered or edited)")
        if chain_hash(str(record.get("prev")), record) != record.get("hash"):
            problems.append(f"{path}:{lineno}: hash mismatch (this line was edited)")
        prev = record.get("hash") if isinstance(record.get("hash"), str) else None
    return problems
