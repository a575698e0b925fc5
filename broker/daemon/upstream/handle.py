"""A warm MCP session per configured server, with restart: :class:`ServerHandle`.

Each handle owns a supervisor task that connects (having the spawner start
a stdio server under its own user and sandbox, or opening a streamable-HTTP
session with the secret headers the spawner filled in), lists the tools,
serves calls until the session breaks, and reconnects with exponential
backoff. A handle serves one instance: a server, or one agent's instance
of a per-caller server (``NAME@AGENT``). It reaches its
server through the :class:`broker.daemon.upstream.client.Upstream` seam.
Server-to-client requests (sampling, elicitation, roots) are refused by
both transports: neither advertises such a capability, the stdio client
answers them "method not found", the SDK client has no callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

import httpx2
import mcp

from broker import __version__
from broker.core import wire
from broker.core.errors import PrivsepError, TempFail, Unavailable
from broker.core.servers import instance_name
from broker.daemon.config import Server
from broker.daemon.upstream.client import Progress, Upstream
from broker.daemon.upstream.fair import FairQueue
from broker.daemon.upstream.http import HttpClient
from broker.daemon.upstream.spawner import SpawnerClient, Started
from broker.daemon.upstream.stdio import ServerProcess, StdioClient

log = logging.getLogger("mcp-brokerd")

#: the most pages of tools/list read from one server
MAX_PAGES = 100

#: "starting": a (re)connect is under way; "up": serving; "down": failed or stopped (``reason`` says why)
ServerState = Literal["starting", "up", "down"]


class _Broken(Exception):
    """The session is unusable; the supervisor must reconnect."""


class ServerHandle:
    """One server: its live session, its tools, its health."""

    def __init__(
        self,
        server: Server,
        *,
        spawner: SpawnerClient | None,
        connect_timeout: float,
        backoff_max: float,
        errlog: Callable[[str], None],
        agent: str | None = None,
        max_message: int = 16 * 1024 * 1024,
        max_tools: int = 2000,
        cancel_grace: float = 30.0,
    ) -> None:
        self.server = server
        self.name = server.name
        self.agent = agent
        #: the key of this instance in status and logs: NAME, or NAME@AGENT
        self.instance = instance_name(server.name, agent)
        self.spawner = spawner
        self.connect_timeout = connect_timeout
        self.backoff_max = backoff_max
        self.errlog = errlog
        self.max_message = max_message
        self.max_tools = max_tools
        self.cancel_grace = cancel_grace
        #: calls sent at once, the rest waiting round-robin by caller
        self.queue = FairQueue(server.spec.concurrency)
        #: when the server last answered a call (monotonic): a server that answers is alive
        self.answered = 0.0
        self.client: Upstream | None = None
        self.tools: dict[str, mcp.types.Tool] = {}
        #: tools the server offers that no agent is shown, each with why (task-only tools)
        self.hidden: dict[str, str] = {}
        self._relisting: asyncio.Future[None] | None = None
        self._relist_again = False
        self.state: ServerState = "starting"
        self.reason = ""
        self.restarts = 0
        #: what the spawner reported of the running process (its user, protections, warnings)
        self.started: Started | None = None
        self._broken = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        #: a connect is in progress (as opposed to waiting out the back-off after a failure)
        self._attempting = False
        #: the last attempt never came up (a server failing at start, not one that crashed while serving)
        self._start_failed = False
        self._changed = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.in_flight = 0

    def configure(
        self,
        *,
        connect_timeout: float,
        backoff_max: float,
        max_message: int,
        max_tools: int,
        cancel_grace: float = 30.0,
    ) -> None:
        """New ``[broker]`` settings: the next connect uses them; the live session's read cap changes now."""
        self.cancel_grace = cancel_grace
        self.connect_timeout = connect_timeout
        self.backoff_max = backoff_max
        self.max_message = max_message
        self.max_tools = max_tools
        if isinstance(self.client, StdioClient):
            self.client.max_message = max_message

    # --- lifecycle ----------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._supervise(), name=f"server:{self.name}")

    async def stop(self) -> None:
        self._stopping = True
        self._broken.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(self._task, timeout=10)
            except (TimeoutError, asyncio.CancelledError):
                self._task.cancel()
                with contextlib.suppress(BaseException):
                    await self._task

    def _client(self) -> Upstream:
        srv = self.server
        if srv.problem is not None:
            raise Unavailable(srv.problem)
        if srv.spec.command is not None:
            spawner = self.spawner
            if spawner is None:
                raise Unavailable("no spawner: stdio servers cannot be started")

            async def launch() -> ServerProcess:
                process = await spawner.start(self.name, self.agent)
                self.started = process.started
                return process

            return StdioClient(
                launch,
                errlog=self.errlog,
                on_close=self.mark_broken,  # an exited server is restarted now, not at the next ping
                on_list_changed=self.list_changed,
                client_version=__version__,
                max_message=self.max_message,
            )
        if srv.url is None:
            raise Unavailable("its url is not known yet (the spawner has not read its env file)")
        return HttpClient(srv.url, srv.headers, on_list_changed=self.list_changed)

    def list_changed(self) -> None:
        """The server says its tools changed: list them again (once at a time; a burst makes one more)."""
        if self._relisting is not None and not self._relisting.done():
            self._relist_again = True
            return
        self._relisting = asyncio.ensure_future(self._relist())

    async def _relist(self) -> None:
        while True:
            self._relist_again = False
            client = self.client
            if client is None or self.state != "up":
                return
            try:
                tools = await self._list_all(client)
            except (_Broken, mcp.MCPError, OSError, TimeoutError, httpx2.HTTPError) as exc:
                log.warning("server %s: listing its tools again failed: %s", self.name, exc)
                return
            if self.client is client:
                self._apply(tools)
                log.info("server %s changed its tools: %d now", self.name, len(self.tools))
            if not self._relist_again:
                return

    def _apply(self, tools: dict[str, mcp.types.Tool]) -> None:
        """Offer ``tools``, less those no agent may be shown (each call is checked against its pin anyway)."""
        self.hidden = {name: TASK_ONLY for name, t in tools.items() if _task_only(t)}
        if self.hidden:
            log.warning("server %s: %s hidden (%s)", self.name, ", ".join(sorted(self.hidden)), TASK_ONLY)
        self.tools = {name: t for name, t in tools.items() if name not in self.hidden}

    async def _supervise(self) -> None:
        backoff = 0.25
        while not self._stopping:
            started = time.monotonic()
            self._attempting = True
            self._start_failed = True  # until this attempt comes up
            try:
                await self._session_once()
            except asyncio.CancelledError:
                raise
            except BaseException as exc:  # noqa: BLE001 - any failure means: reconnect later
                self._mark_down(_describe_failure(exc))
            finally:
                self._attempting = False
                self._signal()
            if self._stopping:
                break
            if time.monotonic() - started > 30:
                backoff = 0.25
            self.restarts += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, self.backoff_max)
        self._mark_down("stopped")

    async def _session_once(self) -> None:
        client = self._client()
        if self.state != "down":  # a retry keeps showing why it is down until it is up again
            self.state = "starting"
        async with contextlib.AsyncExitStack() as stack:
            await asyncio.wait_for(stack.enter_async_context(client), self.connect_timeout)
            self._apply(await self._list_all(client))
            tools = self.tools
            self.client = client
            self.state = "up"
            self._start_failed = False
            self.reason = ""
            self._broken.clear()
            self._signal()
            log.info("server %s up with %d tools", self.name, len(tools))
            await self._broken.wait()
            self.client = None
            if not self._stopping:
                raise _Broken(self.reason or "session broke")

    async def _list_all(self, client: Upstream) -> dict[str, mcp.types.Tool]:
        """Every page of ``tools/list``, bounded: a server may not offer endless pages or tools."""
        tools: dict[str, mcp.types.Tool] = {}
        cursor: str | None = None
        for _page in range(MAX_PAGES):
            listed = await asyncio.wait_for(client.list_tools(cursor=cursor), self.connect_timeout)
            for tool in listed.tools:
                tool = self._clean(tool)
                tools[tool.name] = tool
            if len(tools) > self.max_tools:
                raise _Broken(f"offers more than {self.max_tools} tools (max_listed_tools)")
            cursor = listed.next_cursor
            if not cursor:
                return tools
        raise _Broken(f"lists its tools over more than {MAX_PAGES} pages")

    def _clean(self, tool: mcp.types.Tool) -> mcp.types.Tool:
        """A definition every side can encode: lone surrogates and non-finite numbers replaced (and logged)."""
        clean, fixed = wire.sanitize(tool.model_dump(mode="json", by_alias=True, exclude_none=True))
        if not fixed:
            return tool
        log.warning("server %s: a tool definition held %s; replaced", self.name, fixed)
        return mcp.types.Tool.model_validate(clean)

    def _mark_down(self, reason: str) -> None:
        self.client = None
        again = self.state == "down" and self.reason == reason
        self.state = "down"
        self.reason = reason
        if not self._stopping and not again:  # a retry failing the same way is not news
            log.warning("server %s down: %s", self.instance, reason)

    def mark_broken(self, reason: str) -> None:
        if self.state == "up":
            self.reason = reason
        self._broken.set()

    # --- use ----------------------------------------------------------------

    async def ready(self, wait: float) -> Upstream:
        """The live client, waiting up to ``wait`` seconds while a (re)connect is under way.

        A server that crashed while serving is waited for (it restarts within
        a second or so); one whose last start failed, and that is waiting out
        its back-off, is refused at once with its reason rather than holding
        the caller until a retry that would most likely fail again.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            if self.client is not None and self.state == "up":
                return self.client
            why = f": {self.reason}" if self.reason else ""
            if self.state == "down" and not self._attempting and self._start_failed:
                raise Unavailable(f"server {self.name} is unavailable{why} (it is retried in the background)")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise Unavailable(f"server {self.name} is unavailable{why}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    @property
    def waitable(self) -> bool:
        """A (re)connect is under way or due soon: a caller may wait in :meth:`ready`."""
        if self.state == "up":
            return False
        return not (self.state == "down" and not self._attempting and self._start_failed)

    def _signal(self) -> None:
        """Wake everyone waiting in :meth:`ready`: the state changed."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def call(
        self,
        tool: str,
        arguments: dict[str, Any],
        timeout: float,
        spec: mcp.types.Tool | None = None,
        progress: Progress | None = None,
        caller: str = "",
    ) -> mcp.types.CallToolResult:
        """Call a tool; the daemon's own timeout answers 75, a dead server 69.

        With ``spec``, the call is made only while the server still offers
        exactly that definition (the one the decision checked against its pin).
        The call waits its turn among ``caller``'s and other callers' calls
        (:class:`FairQueue`); the wait counts against its timeout. A timeout
        cancels this call only: the server is restarted for it only by the
        rule of :meth:`_after_cancel`.
        """
        started = time.monotonic()
        deadline = started + timeout
        client = await self.ready(min(timeout, self.connect_timeout))
        if spec is not None and self.tools.get(tool) is not spec:
            raise Unavailable(f"server {self.name} restarted with other tool definitions; call again")
        try:
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                await self.queue.acquire(caller)
        except TimeoutError:
            raise TempFail(
                f"{self.name}.{tool} timed out after {timeout:g} s waiting for the server "
                f"(it serves {self.queue.slots} call(s) at once; calls are taken in turn by caller)"
            ) from None
        handed_over = False
        self.in_flight += 1
        remaining = max(0.01, deadline - time.monotonic())
        try:
            # asyncio.timeout, not wait_for: wait_for wraps the call in one more task on every call
            async with asyncio.timeout(remaining):
                result = await client.call_tool(tool, arguments, remaining, progress)
            self.answered = time.monotonic()
            return result
        except TimeoutError:
            # the request was cancelled at the server (notifications/cancelled); a server serving one call at a
            # time keeps its slot until it shows it is free again, so no other call is sent behind a stuck one
            handed_over = self.queue.slots == 1
            self._background.add(task := asyncio.create_task(self._after_cancel(client, handed_over)))
            task.add_done_callback(self._background.discard)
            raise TempFail(f"{self.name}.{tool} timed out after {timeout:g} s") from None
        except mcp.MCPError as exc:
            if _is_connection_loss(exc):
                self.mark_broken("the server closed the connection")
                raise Unavailable(f"server {self.name} failed during the call (it will be restarted)") from None
            self.answered = time.monotonic()
            raise
        except (OSError, httpx2.HTTPError) as exc:
            self.mark_broken(_describe_failure(exc))
            raise Unavailable(f"server {self.name} failed during the call (it will be restarted)") from None
        finally:
            self.in_flight -= 1
            if not handed_over:
                self.queue.release()

    async def _after_cancel(self, client: Upstream, holding: bool) -> None:
        """After a call was cancelled for its timeout: restart the server only if it is unhealthy.

        The rule: a ping is sent at once, behind whatever the server is doing
        (a server that handles one request at a time answers it only once it
        has let go of the cancelled call). The server is restarted when that
        ping is still unanswered ``cancel_grace`` seconds after the cancel
        and no other call is in flight then; while other callers' calls run,
        it is never restarted for this one (they end, or time out, first).
        With ``holding``, this check holds the server's only slot until done,
        so no other call is sent behind a call the server may still be doing.
        """
        cancelled = time.monotonic()
        ping = asyncio.ensure_future(client.send_ping())
        try:
            while self.client is client and not self._stopping:
                done, _ = await asyncio.wait({ping}, timeout=0.2)
                if done:
                    return  # it answered (an error answer too): it let go of the cancelled call
                if not self.in_flight and time.monotonic() - cancelled >= self.cancel_grace:
                    self.mark_broken(f"ignored a cancel for {self.cancel_grace:g} s (no answer to a ping)")
                    return
        finally:
            if ping.done():
                if not ping.cancelled():
                    ping.exception()  # retrieved: a failed ping is an answer here, not an error to log
            else:
                ping.cancel()
            if holding:
                self.queue.release()

    async def health(self) -> None:
        """Ping an idle session so a dead stdio process is noticed.

        A busy session is left alone: a server that handles one request at a
        time cannot answer a ping during a long call, and calls already notice
        a dead process themselves.
        """
        client = self.client
        if client is None or self.in_flight:
            return
        try:
            await asyncio.wait_for(client.send_ping(), 5.0)
        except Exception as exc:  # noqa: BLE001
            if self.client is client:
                self.mark_broken(_describe_failure(exc))


def _is_connection_loss(exc: mcp.MCPError) -> bool:
    return "connection closed" in str(exc).lower()


def _describe_failure(exc: BaseException) -> str:
    """A short reason for status output: no command lines, URLs or secrets."""
    if isinstance(exc, BaseExceptionGroup):
        inner = exc.exceptions[0] if exc.exceptions else exc
        return _describe_failure(inner)
    if isinstance(exc, _Broken):
        return str(exc)
    if isinstance(exc, PrivsepError):  # the spawner's refusal: why the server cannot run
        return exc.message[:500]
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return "did not start in time"
    if isinstance(exc, FileNotFoundError):
        return "command not found"
    if isinstance(exc, PermissionError):
        return "permission denied starting the server"
    if isinstance(exc, httpx2.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    if isinstance(exc, httpx2.HTTPError):
        return "HTTP connection failed"
    if isinstance(exc, mcp.MCPError):
        if _is_connection_loss(exc):
            return "connection closed"
        if "error response" in str(exc):  # the SDK drops the HTTP status; 401/403 is the usual cause
            return "the server answered with an HTTP error (check its URL and credentials)"
        return "protocol error"
    if isinstance(exc, OSError):
        return "I/O error"
    return type(exc).__name__


#: why a task-only tool is never offered
TASK_ONLY = "task-only: it can only be called as a task, and the broker does not run tasks"


def _task_only(tool: mcp.types.Tool) -> bool:
    """A tool whose server requires task-augmented calls (2025-11-25 ``execution.taskSupport``)."""
    execution = getattr(tool, "execution", None)
    return getattr(execution, "task_support", None) == "required"
