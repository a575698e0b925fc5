"""Streamable-HTTP servers, through the MCP SDK's client, behind the :class:`Upstream` seam.

The session carries the server's secret headers (filled from its env file);
redirects are not followed, so a credential is never sent to another host.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

import httpx2
import mcp
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from broker.daemon.upstream.client import Progress

CONNECT_SECONDS = 30.0
#: the SDK's own read timeout is a backstop only: the handle cancels a call at its deadline
READ_SECONDS = 3600.0


class HttpClient:
    """One streamable-HTTP MCP session."""

    def __init__(self, url: str, headers: dict[str, str], on_list_changed: Callable[[], None] | None = None) -> None:
        http = httpx2.AsyncClient(
            headers=headers, timeout=httpx2.Timeout(CONNECT_SECONDS, read=READ_SECONDS), follow_redirects=False
        )
        self.on_list_changed = on_list_changed
        self._client = Client(
            streamable_http_client(url, http_client=http), mode="legacy", message_handler=self._on_message
        )

    async def _on_message(self, message: Any) -> None:
        """Server notifications: a tools list change is acted on; the rest (logging, progress ...) is not."""
        method = getattr(message, "method", None) or getattr(getattr(message, "root", None), "method", None)
        if method == "notifications/tools/list_changed" and self.on_list_changed is not None:
            self.on_list_changed()

    async def __aenter__(self) -> HttpClient:
        await self._client.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._client.__aexit__(exc_type, exc, tb)

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
        await self._client.send_ping()
