"""A lean MCP client for stdio servers: newline-delimited JSON-RPC over a child's pipes.

Why not the SDK's ``Client`` for stdio: every call there crosses several
anyio memory streams, a dispatcher, pydantic message models and tracing
spans; measured with ``make bench`` that was about half of the daemon's CPU
time per call. This client speaks the same protocol (the ``initialize``
handshake, ``tools/list`` with pagination, ``tools/call``, ``ping``,
``notifications/cancelled``) with one reader task and a table of pending
requests, and hands results over as the SDK's own types (``mcp.types``), so
the rest of the daemon does not know which client served it. Streamable HTTP
servers still use the SDK client.

Server-to-client requests (sampling, elicitation, roots, anything else)
are refused with "method not found"; only ``ping`` is answered. The server
gets exactly the environment it is given (no inherited variables) and runs
in a session of its own so a stop can signal its whole process group. Its
output is read in chunks and split into lines as it arrives: a line over
``max_message`` bytes is dropped while it is read, never buffered whole, and
the request it answers (named in its first bytes) fails; the session goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
from collections.abc import Callable
from types import TracebackType
from typing import IO, Any

import mcp
import mcp.types

log = logging.getLogger("mcp-brokerd")

PROTOCOL_VERSION = "2025-11-25"
#: versions this client can speak; a server answering another one is refused
SUPPORTED_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
#: a server message larger than this is dropped while it is read (the call it answers fails)
MAX_MESSAGE = 16 * 1024 * 1024
READ_CHUNK = 1 << 16
#: how much of a dropped message is kept to find the id of the request it answers
ID_PEEK = 4096
TERMINATE_GRACE = 2.0
KILL_GRACE = 2.0

CONNECTION_CLOSED = -32000
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603


def _closed() -> mcp.MCPError:
    return mcp.MCPError(CONNECTION_CLOSED, "Connection closed")


class StdioClient:
    """One MCP session with a server process over its stdin and stdout."""

    def __init__(
        self,
        command: str,
        args: list[str],
        *,
        env: dict[str, str],
        cwd: str | None,
        errlog: IO[str] | Callable[[str], None],
        on_close: Callable[[str], None] | None = None,
        client_version: str = "0",
        max_message: int = MAX_MESSAGE,
    ) -> None:
        self.command = command
        self.args = args
        self.env = env
        self.cwd = cwd
        self.errlog = errlog
        self.on_close = on_close
        self.client_version = client_version
        self.max_message = max_message
        self.proc: asyncio.subprocess.Process | None = None
        self.protocol_version = ""
        self._reader: asyncio.Task[None] | None = None
        self._stderr: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._closed_why = ""
        self._validators: dict[str, Any] = {}
        self._schemas: dict[str, dict[str, Any] | None] = {}

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> StdioClient:
        self.proc = await asyncio.create_subprocess_exec(
            self.command,
            *self.args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE if callable(self.errlog) else self.errlog,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        self._reader = asyncio.get_running_loop().create_task(self._read_loop())
        if callable(self.errlog):
            self._stderr = asyncio.get_running_loop().create_task(self._stderr_loop(self.errlog))
        try:
            init = await self._request(
                "initialize",
                {
                    "protocolVersion": PROTOCOL_VERSION,
                    "capabilities": {},
                    "clientInfo": {"name": "mcp-privsep", "version": self.client_version},
                },
            )
            version = init.get("protocolVersion") if isinstance(init, dict) else None
            if version not in SUPPORTED_VERSIONS:
                raise mcp.MCPError(INTERNAL_ERROR, f"unsupported protocol version {str(version)[:40]!r}")
            self.protocol_version = str(version)
            await self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close stdin, give the server a moment, then SIGTERM and SIGKILL its process group."""
        proc = self.proc
        if proc is None:
            return
        self._closed_why = self._closed_why or "closed"
        if proc.stdin is not None:
            with contextlib.suppress(OSError, RuntimeError):
                proc.stdin.close()
        for sig, grace in ((None, TERMINATE_GRACE), (signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, KILL_GRACE)):
            if sig is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, sig)
            if await _exited(proc, grace):
                break
        for task in (self._reader, self._stderr):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        # release the pipes now, not at garbage collection (when the loop may be gone); not public API
        transport = getattr(proc, "_transport", None)
        if transport is not None:
            with contextlib.suppress(Exception):
                transport.close()
        self._fail_all()

    # --- the wire -------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None or self._closed_why:
            raise _closed()
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
        try:
            proc.stdin.write(data + b"\n")
            await proc.stdin.drain()
        except (OSError, RuntimeError):  # a dead server: broken pipe, or a transport already closed
            raise _closed() from None

    async def _request(self, method: str, params: dict[str, Any] | None = None) -> Any:
        self._next_id += 1
        msg_id = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        if params is not None:
            message["params"] = params
        try:
            await self._send(message)
            return await fut
        except asyncio.CancelledError:
            # a timeout or a hang-up: tell the server, best effort, without waiting on the pipe
            if not fut.done():
                self._notify_cancelled(msg_id)
            raise
        finally:
            self._pending.pop(msg_id, None)

    def _notify_cancelled(self, msg_id: int) -> None:
        proc = self.proc
        if proc is None or proc.stdin is None or self._closed_why:
            return
        note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": msg_id}}
        with contextlib.suppress(OSError, RuntimeError):
            proc.stdin.write(json.dumps(note).encode() + b"\n")

    async def _read_loop(self) -> None:
        """Split the server's output into lines, each bounded while it is read (never buffered past the cap)."""
        proc = self.proc
        assert proc is not None and proc.stdout is not None
        why = "the server closed its output"
        line = bytearray()
        head: bytes | None = None  # the start of a line over the cap, while the rest of it is skipped
        dropped = 0
        try:
            while True:
                try:
                    chunk = await proc.stdout.read(READ_CHUNK)
                except OSError:
                    why = "reading from the server failed"
                    break
                if not chunk:
                    break
                start = 0
                while start <= len(chunk):
                    nl = chunk.find(b"\n", start)
                    end = nl if nl >= 0 else len(chunk)
                    if head is not None:
                        dropped += end - start
                    elif len(line) + end - start > self.max_message:
                        head = bytes(line[:ID_PEEK]) + chunk[start : start + ID_PEEK]
                        dropped = len(line) + end - start
                        line.clear()
                    else:
                        line += chunk[start:end]
                    if nl < 0:
                        break
                    if head is not None:
                        self._oversized(head, dropped)
                        head = None
                    elif line.strip():
                        await self._dispatch(bytes(line))
                    line.clear()
                    start = nl + 1
        finally:
            if not self._closed_why:
                self._closed_why = why
                if self.on_close is not None:
                    self.on_close(why)
            self._fail_all()

    async def _stderr_loop(self, sink: Callable[[str], None]) -> None:
        """The server's stderr, line by line into ``sink`` (which redacts and bounds it)."""
        proc = self.proc
        assert proc is not None and proc.stderr is not None
        pending = b""
        while True:
            try:
                chunk = await proc.stderr.read(READ_CHUNK)
            except OSError:
                return
            if not chunk:
                if pending:
                    sink(pending.decode("utf-8", "replace"))
                return
            *lines, pending = (pending + chunk).split(b"\n")
            if len(pending) > ID_PEEK * 2:  # a line without end: out in pieces, never buffered whole
                lines.append(pending)
                pending = b""
            for line in lines:
                sink(line.decode("utf-8", "replace"))

    def _oversized(self, head: bytes, size: int) -> None:
        """A message over the cap was dropped unread: fail the request it answers, if its start names one."""
        log.warning("a server sent a message of %d bytes, over the %d-byte cap; dropped", size, self.max_message)
        m = re.search(rb'"id"\s*:\s*(\d{1,18})\b', head)
        fut = self._pending.get(int(m.group(1))) if m else None
        if fut is not None and not fut.done():
            fut.set_exception(
                mcp.MCPError(INTERNAL_ERROR, f"the server's answer was over {self.max_message} bytes; it was dropped")
            )

    async def _dispatch(self, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError:
            log.warning("a server sent a line that is not JSON (%d bytes); ignored", len(line))
            return
        if not isinstance(msg, dict):
            return
        method = msg.get("method")
        if isinstance(method, str):
            if "id" not in msg:
                return  # notifications (progress, logging, list_changed): nothing the broker acts on
            if method == "ping":
                await self._answer({"jsonrpc": "2.0", "id": msg["id"], "result": {}})
            else:  # sampling, elicitation, roots: the broker never lends the agent's side to a server
                refusal = {"code": METHOD_NOT_FOUND, "message": f"the broker refuses {method[:100]} requests"}
                await self._answer({"jsonrpc": "2.0", "id": msg["id"], "error": refusal})
            return
        msg_id = msg.get("id")
        fut = self._pending.get(msg_id) if type(msg_id) is int else None
        if fut is None or fut.done():
            return  # an answer to nothing we asked (or to a request already given up)
        error = msg.get("error")
        if isinstance(error, dict):
            code = error.get("code")
            fut.set_exception(
                mcp.MCPError(
                    code if type(code) is int else INTERNAL_ERROR, str(error.get("message", "")), error.get("data")
                )
            )
        elif "result" in msg:
            fut.set_result(msg["result"])
        else:
            fut.set_exception(mcp.MCPError(INTERNAL_ERROR, "malformed response from the server"))

    async def _answer(self, message: dict[str, Any]) -> None:
        with contextlib.suppress(mcp.MCPError):
            await self._send(message)

    def _fail_all(self) -> None:
        pending, self._pending = self._pending, {}
        for fut in pending.values():
            if not fut.done():
                fut.set_exception(_closed())

    # --- MCP ---------------------------------------------------------------------------------

    async def send_ping(self) -> None:
        await self._request("ping")

    async def list_tools(self, cursor: str | None = None) -> mcp.types.ListToolsResult:
        result = await self._request("tools/list", {"cursor": cursor} if cursor else {})
        try:
            listed = mcp.types.ListToolsResult.model_validate(result)
        except ValueError as exc:
            raise mcp.MCPError(INTERNAL_ERROR, f"malformed tools/list result: {_first_error(exc)}") from None
        for tool in listed.tools:
            self._schemas[tool.name] = tool.output_schema
            self._validators.pop(tool.name, None)
        return listed

    async def call_tool(
        self, name: str, arguments: dict[str, Any], timeout: float | None = None
    ) -> mcp.types.CallToolResult:
        """Call a tool; the caller bounds the wait (``timeout`` is not needed: a pipe has no read timeout)."""
        raw = await self._request("tools/call", {"name": name, "arguments": arguments})
        try:
            result = mcp.types.CallToolResult.model_validate(raw)
        except ValueError as exc:
            raise mcp.MCPError(INTERNAL_ERROR, f"malformed tools/call result: {_first_error(exc)}") from None
        if not result.is_error:
            self._check_structured(name, result)
        return result

    def _check_structured(self, name: str, result: mcp.types.CallToolResult) -> None:
        """What the SDK client does: structured content must match the tool's declared output schema."""
        schema = self._schemas.get(name)
        if schema is None:
            return
        if result.structured_content is None:
            raise mcp.MCPError(INTERNAL_ERROR, f"tool {name} has an output schema but returned no structured content")
        validator = self._validators.get(name)
        if validator is None:
            import jsonschema  # type: ignore[import-untyped]  # no stubs; the SDK depends on it

            try:
                cls = jsonschema.validators.validator_for(schema)
                cls.check_schema(schema)
            except jsonschema.SchemaError:
                raise mcp.MCPError(INTERNAL_ERROR, f"tool {name} declares an invalid output schema") from None
            validator = self._validators[name] = cls(schema)
        try:
            valid = validator.is_valid(result.structured_content)
        except Exception:  # noqa: BLE001 - an unresolvable $ref and the like: the schema is unusable
            raise mcp.MCPError(INTERNAL_ERROR, f"tool {name} declares an unusable output schema") from None
        if not valid:
            raise mcp.MCPError(INTERNAL_ERROR, f"tool {name} returned structured content that breaks its output schema")


def _first_error(exc: ValueError) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


async def _exited(proc: asyncio.subprocess.Process, timeout: float) -> bool:
    """Whether the process exited within ``timeout``; polls, since wait() also waits for pipe EOF."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while proc.returncode is None:
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.02)
    return True
