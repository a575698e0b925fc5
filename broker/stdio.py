"""``mcp stdio``: the gate as an MCP server on stdin/stdout, one sudo per session.

Any MCP client can launch ``{"command": "mcp", "args": ["stdio"]}``. The
session speaks newline-delimited JSON-RPC (the MCP stdio transport) and
answers a closed set of methods: ``initialize``, ``ping``, ``tools/list``
(exactly the caller's allowed tools, with their pinned definitions) and
``tools/call`` (forwarded through the daemon with every policy and audit
rule of ``mcp call``). Everything else is refused with "method not found".
While the session is open the gate watches the allowlist and sends
``notifications/tools/list_changed`` when it changes.

Standard library only; imported by the gate for this verb alone.
"""

from __future__ import annotations

import os
import select
import sys
import threading
import time

from broker import __version__, allowlist, protocol
from broker.errors import PrivsepError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, BinaryIO

    from broker.paths import Paths

HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
MAX_LINE = 4 * 1024 * 1024
MAX_IN_FLIGHT = 16
POLL_SECONDS = 1.0

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603


class Session:
    """One stdio session for one caller."""

    def __init__(
        self,
        paths: Paths,
        user: str,
        uid: int,
        exchange: Callable[..., dict[str, Any]],
        check: Callable[[str | None], None],
        out: BinaryIO,
        err: Any,
    ) -> None:
        self.paths = paths
        self.user = user
        self.uid = uid
        self.exchange = exchange
        self.check = check
        self.out = out
        self.err = err
        self.lock = threading.Lock()
        self.slots = threading.BoundedSemaphore(MAX_IN_FLIGHT)
        self.workers: list[threading.Thread] = []
        self.initialized = False
        self.allowlist_key = self._allowlist_key()

    # --- output ---------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        data = (protocol.dumps(message) + "\n").encode("utf-8", "replace")
        with self.lock:
            self.out.write(data)
            self.out.flush()

    def reply(self, msg_id: Any, result: dict[str, Any]) -> None:
        self.send({"jsonrpc": "2.0", "id": msg_id, "result": result})

    def error(self, msg_id: Any, code: int, message: str) -> None:
        self.send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}})

    # --- the allowlist watch ----------------------------------------------------

    def _allowlist_key(self) -> bytes | None:
        try:
            data, path, _st = allowlist.locate(self.paths.allowlist, self.paths.allowlist_d, self.user)
        except PrivsepError:
            return None
        return path.encode() + b"\0" + data

    def poll_allowlist(self) -> None:
        key = self._allowlist_key()
        if key != self.allowlist_key:
            self.allowlist_key = key
            if self.initialized:
                self.send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})

    # --- requests -------------------------------------------------------------

    def handle_line(self, line: bytes) -> None:
        try:
            msg = protocol.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            self.error(None, PARSE_ERROR, "parse error")
            return
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            self.error(msg.get("id") if isinstance(msg, dict) else None, INVALID_REQUEST, "invalid request")
            return
        method = msg.get("method")
        if not isinstance(method, str):
            return  # a response to a request we never send: ignore
        msg_id = msg.get("id")
        params = msg.get("params")
        if params is None:
            params = {}
        if "id" not in msg:
            return  # notifications (initialized, cancelled, ...) need no answer
        if type(msg_id) not in (int, str) or not isinstance(params, dict):
            self.error(msg_id if type(msg_id) in (int, str) else None, INVALID_REQUEST, "invalid request")
            return
        if method == "initialize":
            self.initialize(msg_id, params)
        elif method == "ping":
            self.reply(msg_id, {})
        elif method == "tools/list":
            self.tools_list(msg_id)
        elif method == "tools/call":
            self.slots.acquire()
            worker = threading.Thread(target=self._call_worker, args=(msg_id, params), daemon=True)
            self.workers = [w for w in self.workers if w.is_alive()]
            self.workers.append(worker)
            worker.start()
        else:
            self.error(msg_id, METHOD_NOT_FOUND, f"method not found: {method[:100]}")

    def initialize(self, msg_id: Any, params: dict[str, Any]) -> None:
        requested = params.get("protocolVersion")
        version = requested if requested in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[-1]
        self.initialized = True
        self.reply(
            msg_id,
            {
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "mcp-privsep", "version": __version__},
                "instructions": (
                    "Tools brokered by mcp-privsep: each call is checked against an allowlist and policy and "
                    "audited; credentials stay with the broker."
                ),
            },
        )

    def tools_list(self, msg_id: Any) -> None:
        try:
            self.check(None)
            answer = self.exchange(protocol.request("catalog", caller=self.user, uid=self.uid), 60.0)
        except PrivsepError as exc:
            self.error(msg_id, INTERNAL_ERROR, str(exc))
            return
        if not answer.get("ok"):
            self.error(msg_id, INTERNAL_ERROR, str(answer.get("error", "the broker refused")))
            return
        result = answer.get("result")
        tools = result.get("tools", []) if isinstance(result, dict) else []
        self.reply(msg_id, {"tools": tools})

    def _call_worker(self, msg_id: Any, params: dict[str, Any]) -> None:
        try:
            self.reply(msg_id, self.call(params))
        except _RpcError as exc:
            self.error(msg_id, exc.code, exc.message)
        except Exception as exc:  # noqa: BLE001 - one failed call must not end the session
            self.error(msg_id, INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
        finally:
            self.slots.release()

    def call(self, params: dict[str, Any]) -> dict[str, Any]:
        name = params.get("name")
        args = params.get("arguments")
        if args is None:
            args = {}
        if not isinstance(name, str) or allowlist.action_error(name) is not None:
            raise _RpcError(INVALID_PARAMS, "tools/call needs a tool name of the form server.tool")
        if not isinstance(args, dict):
            raise _RpcError(INVALID_PARAMS, "tools/call arguments must be an object")
        try:
            self.check(name)
            answer = self.exchange(
                protocol.request("call", caller=self.user, uid=self.uid, tool=name, kv=[], args=args, timeout=None),
                900.0,
            )
        except PrivsepError as exc:
            return _refusal(str(exc), exc.exit_code)
        if not answer.get("ok"):
            code = answer.get("exit")
            return _refusal(str(answer.get("error", "the broker refused")), code if type(code) is int else 70)
        result = answer.get("result")
        if not isinstance(result, dict):
            raise _RpcError(INTERNAL_ERROR, "malformed answer from the broker")
        content = result.get("content") if not result.get("truncated") else None
        if not content:
            content = [{"type": "text", "text": str(result.get("text", ""))}]
        out: dict[str, Any] = {"content": content, "isError": bool(result.get("is_error"))}
        if "structured_content" in result and result["structured_content"] is not None:
            out["structuredContent"] = result["structured_content"]
        return out


class _RpcError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _refusal(message: str, exit_code: int) -> dict[str, Any]:
    """A refusal the model can read: a tool result with isError, saying why."""
    text = " ".join(message.split())
    return {
        "content": [{"type": "text", "text": f"mcp-privsep refused the call (exit {exit_code}): {text}"}],
        "isError": True,
    }


def serve(session: Session, fd: int = 0) -> int:
    """Read JSON-RPC lines from ``fd`` until EOF; return the exit code."""
    buf = b""
    last_poll = time.monotonic()
    while True:
        try:
            ready, _, _ = select.select([fd], [], [], POLL_SECONDS)
        except InterruptedError:
            continue
        # at most once a second, busy or idle: edits are noticed without re-reading per message
        if time.monotonic() - last_poll >= POLL_SECONDS:
            session.poll_allowlist()
            last_poll = time.monotonic()
        if not ready:
            continue
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1 :]
            if line.strip():
                session.handle_line(line)
        if len(buf) > MAX_LINE:
            session.error(None, INVALID_REQUEST, f"message longer than {MAX_LINE} bytes")
            return 64
    if buf.strip():
        session.handle_line(buf)
    for worker in session.workers:
        worker.join(timeout=930)
    return 0


def run(
    paths: Paths,
    user: str,
    uid: int,
    exchange: Callable[..., dict[str, Any]],
    check: Callable[[str | None], None],
) -> int:
    out = sys.stdout.buffer
    session = Session(paths, user, uid, exchange, check, out, sys.stderr)
    try:
        return serve(session)
    except BrokenPipeError:
        return 0
