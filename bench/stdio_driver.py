"""A raw JSON-RPC driver for one MCP stdio session (no SDK: it measures the server, not a client).

It speaks newline-delimited JSON-RPC 2.0 over a child's stdin/stdout:
``initialize``, ``notifications/initialized``, ``tools/list``, then many
``tools/call``, either one at a time (latency-bound) or with a window of
requests in flight (throughput). The same driver measures ``mcp stdio``
through the broker and, as a reference, the demo server spoken to directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import subprocess
import time
from typing import Any

PROTOCOL_VERSION = "2025-06-18"


class SessionError(Exception):
    """The session did not behave like an MCP server."""


class StdioSession:
    """A child process speaking MCP over stdio, driven with raw JSON lines."""

    def __init__(
        self, argv: list[str], *, user: pwd.struct_passwd | None = None, env: dict[str, str] | None = None
    ) -> None:
        kwargs: dict[str, Any] = {}
        if user is not None:
            kwargs = {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env if env is not None else {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"},
            cwd="/",
            bufsize=0,
            **kwargs,
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        self._buf = b""
        self._next_id = 0
        self.server_info: dict[str, Any] = {}

    # --- framing ------------------------------------------------------------------------

    def send(self, obj: dict[str, Any]) -> None:
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        while data:
            data = data[os.write(self._in, data) :]

    def send_raw(self, data: bytes) -> None:
        while data:
            data = data[os.write(self._in, data) :]

    def read_line(self, timeout: float) -> bytes:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SessionError(f"no answer within {timeout:g} s")
            ready, _, _ = select.select([self._out], [], [], left)
            if not ready:
                continue
            chunk = os.read(self._out, 1 << 20)
            if not chunk:
                raise SessionError(f"the session ended (exit {self.proc.poll()}): {self.stderr_tail()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line

    def read_message(self, timeout: float) -> dict[str, Any]:
        """The next JSON-RPC message that is a response (notifications are skipped)."""
        while True:
            line = self.read_line(timeout)
            if not line.strip():
                continue
            try:
                msg = json.loads(line)
            except ValueError:
                raise SessionError(f"not JSON on stdout: {line[:200]!r}") from None
            if isinstance(msg, dict) and "id" in msg and ("result" in msg or "error" in msg):
                return msg
            if isinstance(msg, dict) and "id" in msg and "method" in msg:
                # a request from the server (sampling, roots, ...): refuse it, as a bare client would
                self.send({"jsonrpc": "2.0", "id": msg["id"], "error": {"code": -32601, "message": "not supported"}})

    def new_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def request(self, method: str, params: dict[str, Any] | None = None, timeout: float = 30) -> dict[str, Any]:
        rid = self.new_id()
        msg: dict[str, Any] = {"jsonrpc": "2.0", "id": rid, "method": method}
        if params is not None:
            msg["params"] = params
        self.send(msg)
        answer = self.read_message(timeout)
        if answer.get("id") != rid:
            raise SessionError(f"answer for id {answer.get('id')}, expected {rid}")
        if "error" in answer:
            raise SessionError(f"{method}: {answer['error']}")
        result: dict[str, Any] = answer["result"]
        return result

    # --- MCP ----------------------------------------------------------------------------

    def initialize(self, timeout: float = 30) -> dict[str, Any]:
        self.server_info = self.request(
            "initialize",
            {
                "protocolVersion": PROTOCOL_VERSION,
                "capabilities": {},
                "clientInfo": {"name": "mcp-privsep-bench", "version": "1"},
            },
            timeout,
        )
        self.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        return self.server_info

    def tools(self) -> list[str]:
        names: list[str] = []
        cursor: str | None = None
        while True:
            page = self.request("tools/list", {"cursor": cursor} if cursor else {})
            names += [t["name"] for t in page.get("tools", [])]
            cursor = page.get("nextCursor")
            if not cursor:
                return names

    def call_sequential(self, tool: str, n: int, timeout: float = 30) -> tuple[list[float], int]:
        """``n`` calls one after another; return (latencies in ms, errors)."""
        latencies: list[float] = []
        errors = 0
        for i in range(n):
            text = f"hi{i}"
            started = time.perf_counter()
            rid = self.new_id()
            self.send(
                {
                    "jsonrpc": "2.0",
                    "id": rid,
                    "method": "tools/call",
                    "params": {"name": tool, "arguments": {"text": text}},
                }
            )
            answer = self.read_message(timeout)
            latencies.append((time.perf_counter() - started) * 1000)
            if answer.get("id") != rid or not _echo_ok(answer, text):
                errors += 1
        return latencies, errors

    def call_pipelined(self, tool: str, n: int, window: int, timeout: float = 60) -> tuple[float, int]:
        """``n`` calls with up to ``window`` in flight; return (elapsed seconds, errors)."""
        sent = 0
        done = 0
        errors = 0
        expected: dict[int, str] = {}
        started = time.perf_counter()
        while done < n:
            while sent < n and len(expected) < window:
                rid = self.new_id()
                text = f"p{rid}"
                expected[rid] = text
                self.send(
                    {
                        "jsonrpc": "2.0",
                        "id": rid,
                        "method": "tools/call",
                        "params": {"name": tool, "arguments": {"text": text}},
                    }
                )
                sent += 1
            answer = self.read_message(timeout)
            text_or_none = expected.pop(answer.get("id"), None)  # type: ignore[arg-type]
            if text_or_none is None or not _echo_ok(answer, text_or_none):
                errors += 1
            done += 1
        return time.perf_counter() - started, errors

    # --- end ------------------------------------------------------------------------------

    def stderr_tail(self) -> str:
        if self.proc.poll() is None or self.proc.stderr is None:
            return ""
        with contextlib.suppress(OSError, ValueError):
            return self.proc.stderr.read().decode(errors="replace").strip()[-300:]
        return ""

    def close(self) -> int | None:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode


def _echo_ok(answer: dict[str, Any], text: str) -> bool:
    result = answer.get("result")
    if not isinstance(result, dict) or result.get("isError"):
        return False
    return any(isinstance(b, dict) and b.get("text") == text for b in result.get("content", []))


def find_tool(names: list[str], server: str, tool: str) -> str | None:
    """The session's name for ``server.tool`` (a broker may spell it server.tool or server__tool)."""
    for candidate in (f"{server}.{tool}", f"{server}__{tool}", f"{server}_{tool}", f"{server}-{tool}", tool):
        if candidate in names:
            return candidate
    for name in names:
        if server in name and name.endswith(tool):
            return name
    return None
