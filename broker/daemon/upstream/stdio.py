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
are refused with "method not found"; only ``ping`` is answered. The client
does not start its server: a :data:`Launch` does (in the daemon, the
spawner, which runs it under its own user and sandbox and ends its whole
process tree on :meth:`ServerProcess.kill`). Its
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
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Protocol

import mcp
import mcp.types

from broker.daemon.upstream.client import Progress

log = logging.getLogger("mcp-brokerd")

PROTOCOL_VERSION = "2025-11-25"
#: versions this client can speak; a server answering another one is refused
SUPPORTED_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
#: the stateless era: no handshake; every request carries its version and the client's capabilities in _meta
MODERN_VERSION = "2026-07-28"
UNSUPPORTED_PROTOCOL_VERSION = -32022
PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
CLIENT_INFO_META = "io.modelcontextprotocol/clientInfo"
#: a server message larger than this is dropped while it is read (the call it answers fails)
MAX_MESSAGE = 16 * 1024 * 1024
READ_CHUNK = 1 << 16
#: how much of a dropped message is kept to find the id of the request it answers
ID_PEEK = 4096
#: seconds a server has to exit on its own once its stdin is closed, before it is killed
TERMINATE_GRACE = 2.0

CONNECTION_CLOSED = -32000
METHOD_NOT_FOUND = -32601
INTERNAL_ERROR = -32603


def _closed() -> mcp.MCPError:
    return mcp.MCPError(CONNECTION_CLOSED, "Connection closed")


class ServerProcess(Protocol):
    """A started stdio server: its pipes as streams, and how to end it (its whole process tree)."""

    @property
    def stdin(self) -> asyncio.StreamWriter: ...

    @property
    def stdout(self) -> asyncio.StreamReader: ...

    @property
    def stderr(self) -> asyncio.StreamReader | None: ...

    async def kill(self) -> None: ...


#: starts the server (the daemon's is the spawner; unit tests start a local child)
Launch = Callable[[], Awaitable[ServerProcess]]


async def pipe_streams(
    stdin: int, stdout: int, stderr: int
) -> tuple[asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamReader]:
    """asyncio streams over a server's pipe descriptors (which they own from here on)."""
    loop = asyncio.get_running_loop()
    for fd in (stdin, stdout, stderr):
        os.set_blocking(fd, False)
    # the transports own these file objects and close them (no context manager: they outlive this call)
    out = asyncio.StreamReader(limit=READ_CHUNK, loop=loop)
    out_file = open(stdout, "rb", 0)  # noqa: SIM115
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(out, loop=loop), out_file)
    err = asyncio.StreamReader(limit=READ_CHUNK, loop=loop)
    err_file = open(stderr, "rb", 0)  # noqa: SIM115
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(err, loop=loop), err_file)
    in_file = open(stdin, "wb", 0)  # noqa: SIM115
    transport, protocol = await loop.connect_write_pipe(
        lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader(loop=loop), loop=loop), in_file
    )
    return asyncio.StreamWriter(transport, protocol, None, loop), out, err


class StdioClient:
    """One MCP session with a server process over its stdin and stdout."""

    def __init__(
        self,
        launch: Launch,
        *,
        errlog: Callable[[str], None],
        on_close: Callable[[str], None] | None = None,
        on_list_changed: Callable[[], None] | None = None,
        client_version: str = "0",
        max_message: int = MAX_MESSAGE,
    ) -> None:
        self.launch = launch
        self.errlog = errlog
        self.on_close = on_close
        self.on_list_changed = on_list_changed
        self.client_version = client_version
        self.max_message = max_message
        self.proc: ServerProcess | None = None
        self.protocol_version = ""
        self._reader: asyncio.Task[None] | None = None
        self._stderr: asyncio.Task[None] | None = None
        self._pending: dict[int, asyncio.Future[Any]] = {}
        self._next_id = 0
        self._closed_why = ""
        self._validators: dict[str, Any] = {}
        self._schemas: dict[str, dict[str, Any] | None] = {}
        #: progress tokens of calls in flight (the broker's own: the request's id) -> where reports go
        self._progress: dict[int, Progress] = {}

    # --- lifecycle ------------------------------------------------------------------

    async def __aenter__(self) -> StdioClient:
        self.proc = await self.launch()
        loop = asyncio.get_running_loop()
        self._reader = loop.create_task(self._read_loop())
        if self.proc.stderr is not None:
            self._stderr = loop.create_task(self._stderr_loop(self.errlog))
        try:
            try:
                init = await self._request(
                    "initialize",
                    {
                        "protocolVersion": PROTOCOL_VERSION,
                        "capabilities": {},
                        "clientInfo": {"name": "mcp-privsep", "version": self.client_version},
                    },
                )
            except mcp.MCPError as exc:
                # a server of the stateless era only: it refuses the handshake, naming the versions it speaks
                supported = exc.error.data.get("supported") if isinstance(exc.error.data, dict) else None
                if exc.error.code != UNSUPPORTED_PROTOCOL_VERSION or MODERN_VERSION not in (supported or []):
                    raise
                await self._discover()
            else:
                version = init.get("protocolVersion") if isinstance(init, dict) else None
                if version not in SUPPORTED_VERSIONS:
                    raise mcp.MCPError(INTERNAL_ERROR, f"unsupported protocol version {str(version)[:40]!r}")
                self.protocol_version = str(version)
                await self._send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        except BaseException:
            await self.aclose()
            raise
        return self

    async def _discover(self) -> None:
        """Speak the stateless era from now on: ``server/discover`` must name it; every request then says it."""
        self.protocol_version = MODERN_VERSION
        found = await self._request("server/discover", {})
        versions = found.get("supportedVersions") if isinstance(found, dict) else None
        if not isinstance(versions, list) or MODERN_VERSION not in versions:
            raise mcp.MCPError(INTERNAL_ERROR, "the server speaks neither a handshake version nor 2026-07-28")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close stdin, give the server a moment to exit on its own, then end its whole process tree."""
        proc = self.proc
        if proc is None:
            return
        self.proc = None
        self._closed_why = self._closed_why or "closed"
        with contextlib.suppress(OSError, RuntimeError):
            proc.stdin.close()
        reader = self._reader
        cancelled: asyncio.CancelledError | None = None
        if reader is not None and not reader.done():
            try:
                await asyncio.wait_for(asyncio.shield(reader), TERMINATE_GRACE)
            except asyncio.CancelledError as exc:  # still end the server and release its pipes, then say so
                cancelled = exc
            except Exception:  # noqa: BLE001, S110 - a timeout or a reader that failed: the kill below ends it
                pass
        try:
            await proc.kill()
        finally:
            for task in (self._reader, self._stderr):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(BaseException):
                        await task
            for stream in (proc.stdout, proc.stderr):
                transport = getattr(stream, "_transport", None)  # release the pipe now, not at garbage collection
                if transport is not None:
                    with contextlib.suppress(Exception):
                        transport.close()
            self._fail_all()
        if cancelled is not None:
            raise cancelled

    # --- the wire -------------------------------------------------------------------------

    async def _send(self, message: dict[str, Any]) -> None:
        proc = self.proc
        if proc is None or self._closed_why:
            raise _closed()
        data = json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "surrogatepass")
        try:
            proc.stdin.write(data + b"\n")
            await proc.stdin.drain()
        except (OSError, RuntimeError):  # a dead server: broken pipe, or a transport already closed
            raise _closed() from None

    async def _request(
        self, method: str, params: dict[str, Any] | None = None, progress: Progress | None = None
    ) -> Any:
        self._next_id += 1
        msg_id = self._next_id
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": msg_id, "method": method}
        meta: dict[str, Any] = {}
        if self.protocol_version == MODERN_VERSION:
            meta[PROTOCOL_VERSION_META] = MODERN_VERSION
            meta[CLIENT_CAPABILITIES_META] = {}
            meta[CLIENT_INFO_META] = {"name": "mcp-privsep", "version": self.client_version}
        if progress is not None:
            # the token is the broker's (its request id), never the agent's: reports map back to this call only
            meta["progressToken"] = msg_id
            self._progress[msg_id] = progress
        if meta:
            params = {**(params or {}), "_meta": meta}
        if params is not None:
            message["params"] = params
        try:
            await self._send(message)
            return await fut
        except asyncio.CancelledError:
            # a timeout or a hang-up: tell the server, best effort, without waiting on the pipe (the wait
            # being cancelled cancelled the future first; only an answer that already arrived needs nothing)
            if fut.cancelled() or not fut.done():
                self._notify_cancelled(msg_id)
            raise
        finally:
            self._pending.pop(msg_id, None)
            self._progress.pop(msg_id, None)

    def _notify_cancelled(self, msg_id: int) -> None:
        proc = self.proc
        if proc is None or self._closed_why:
            return
        note = {"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": msg_id}}
        with contextlib.suppress(OSError, RuntimeError):
            proc.stdin.write(json.dumps(note).encode() + b"\n")

    async def _read_loop(self) -> None:
        """Split the server's output into lines, each bounded while it is read (never buffered past the cap)."""
        proc = self.proc
        assert proc is not None
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
                if method == "notifications/progress":
                    self._on_progress(msg.get("params"))
                elif method == "notifications/tools/list_changed" and self.on_list_changed is not None:
                    self.on_list_changed()
                return  # other notifications (logging, resources ...): nothing the broker acts on
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

    def _on_progress(self, params: object) -> None:
        """A progress report for a call in flight that asked for them; anything else is dropped."""
        if not isinstance(params, dict):
            return
        token = params.get("progressToken")
        relay = self._progress.get(token) if type(token) is int else None
        value = params.get("progress")
        if relay is None or type(value) not in (int, float):
            return
        report: dict[str, Any] = {"progress": value}
        total = params.get("total")
        if type(total) in (int, float):
            report["total"] = total
        message = params.get("message")
        if isinstance(message, str):
            report["message"] = message[:500]
        relay(report)

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
        """Is it alive? ``ping``; in the stateless era, which has none, ``server/discover``."""
        await self._request("server/discover" if self.protocol_version == MODERN_VERSION else "ping", {})

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
        self, name: str, arguments: dict[str, Any], timeout: float | None = None, progress: Progress | None = None
    ) -> mcp.types.CallToolResult:
        """Call a tool; the caller bounds the wait (``timeout`` is not needed: a pipe has no read timeout)."""
        raw = await self._request("tools/call", {"name": name, "arguments": arguments}, progress)
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
