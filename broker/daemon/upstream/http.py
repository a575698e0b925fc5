"""Streamable-HTTP servers, through the MCP SDK's client, behind the :class:`Upstream` seam.

The session carries the server's secret headers (filled from its env file);
redirects are not followed, so a credential is never sent to another host.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Literal

import httpx2
import mcp
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from broker.daemon.upstream.client import Progress

CONNECT_SECONDS = 30.0
MODERN_VERSION: Literal["2026-07-28"] = "2026-07-28"
UNSUPPORTED_PROTOCOL_VERSION = -32022
#: the SDK's own read timeout is a backstop only: the handle cancels a call at its deadline
READ_SECONDS = 3600.0


class HttpClient:
    """One streamable-HTTP MCP session."""

    def __init__(self, url: str, headers: dict[str, str], on_list_changed: Callable[[], None] | None = None) -> None:
        self.url = url
        self.headers = headers
        self.on_list_changed = on_list_changed
        self.protocol_version = ""
        self._http: httpx2.AsyncClient | None = None
        self._client = self._connector("legacy")

    def _connector(self, mode: Literal["legacy", "2026-07-28"]) -> Client:
        # the SDK leaves an HTTP client it was given open: this session closes its own (see aclose)
        self._http = httpx2.AsyncClient(
            headers=self.headers, timeout=httpx2.Timeout(CONNECT_SECONDS, read=READ_SECONDS), follow_redirects=False
        )
        return Client(
            streamable_http_client(self.url, http_client=self._http), mode=mode, message_handler=self._on_message
        )

    async def _close_http(self) -> None:
        http, self._http = self._http, None
        if http is not None:
            await http.aclose()

    async def _on_message(self, message: Any) -> None:
        """Server notifications: a tools list change is acted on; the rest (logging, progress ...) is not."""
        method = getattr(message, "method", None) or getattr(getattr(message, "root", None), "method", None)
        if method == "notifications/tools/list_changed" and self.on_list_changed is not None:
            self.on_list_changed()

    async def __aenter__(self) -> HttpClient:
        try:
            try:
                await self._client.__aenter__()
            except (mcp.MCPError, BaseExceptionGroup) as exc:  # the SDK's task group wraps what its session raised
                # a server of the stateless era only refuses the handshake, naming what it speaks: speak that
                # (the SDK's client then sends the envelope and the HTTP headers that revision requires)
                if not _refuses_the_handshake(exc):
                    raise
                await self._close_http()
                self._client = self._connector(MODERN_VERSION)
                await self._client.__aenter__()
        except BaseException:
            await self._close_http()
            raise
        self.protocol_version = self._client.protocol_version
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        try:
            await self._client.__aexit__(exc_type, exc, tb)
        finally:
            await self._close_http()

    async def list_tools(self, cursor: str | None = None) -> mcp.types.ListToolsResult:
        return await self._client.list_tools(cursor=cursor)

    async def call_tool(
        self, name: str, arguments: dict[str, Any], timeout: float, progress: Progress | None = None
    ) -> mcp.types.CallToolResult:
        relay = None
        if progress is not None:
            report_to = progress

            async def relay(progress: float, total: float | None, message: str | None) -> None:
                report: dict[str, Any] = {"progress": progress}
                if total is not None:
                    report["total"] = total
                if message is not None:
                    report["message"] = message[:500]
                report_to(report)

        try:
            return await self._client.call_tool(
                name, arguments, read_timeout_seconds=timeout + 1, progress_callback=relay
            )
        except RuntimeError as exc:  # the SDK client's verdict on structured content that breaks its schema
            raise mcp.MCPError(-32603, str(exc)[:500]) from None

    async def send_ping(self) -> None:
        """Is it alive? ``ping``; in the stateless era, which has none, ``server/discover``."""
        if self.protocol_version == MODERN_VERSION:
            await self._client.session.send_discover(MODERN_VERSION)
        else:
            await self._client.send_ping()


def _refuses_the_handshake(exc: BaseException) -> bool:
    """Whether ``exc`` is (or holds) the -32022 answer of a server that speaks 2026-07-28 only."""
    if isinstance(exc, BaseExceptionGroup):
        return any(_refuses_the_handshake(e) for e in exc.exceptions)
    if not isinstance(exc, mcp.MCPError):
        return False
    data = exc.error.data if isinstance(exc.error.data, dict) else {}
    return exc.error.code == UNSUPPORTED_PROTOCOL_VERSION and MODERN_VERSION in (data.get("supported") or [])
