"""The seam between a server handle and the transport that reaches its server.

:class:`broker.daemon.upstream.handle.ServerHandle` supervises one server
through this Protocol and never asks which transport it has: a stdio child
(:class:`broker.daemon.upstream.stdio.StdioClient`) or a streamable-HTTP
session (:class:`broker.daemon.upstream.http.HttpClient`). Results come back
as the SDK's types (``mcp.types``) either way.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

import mcp

#: what a server said of a call's progress (MCP's ``notifications/progress`` params, less the token)
Progress = Callable[[dict[str, Any]], None]


class Upstream(Protocol):
    """One MCP session with one server; ``async with`` opens and closes it."""

    async def __aenter__(self) -> Upstream: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def list_tools(self, cursor: str | None = None) -> mcp.types.ListToolsResult: ...

    async def call_tool(
        self, name: str, arguments: dict[str, Any], timeout: float, progress: Progress | None = None
    ) -> mcp.types.CallToolResult:
        """Call a tool. The caller cancels at its deadline (the transport tells the server); ``timeout`` is for
        transports with a read timeout; with ``progress``, the server is asked for progress, each report to it."""
        ...

    async def send_ping(self) -> None: ...
