"""A small real MCP server for the demo and the tests.

Tools: ``echo``, ``add``, ``slow``, ``fail``, ``big``, ``whoami`` (the uid the
server runs as) and ``secret`` (returns ``DEMO_SECRET`` from its environment,
which the broker fills from the server's secret env file; it exists so tests
can prove the agent never sees it unredacted).

Over stdio it trusts its parent. Over streamable HTTP (``--http HOST:PORT``,
loopback only) every request must carry ``Authorization: Bearer $DEMO_TOKEN``:
the broker injects that header from the server's secret env file, so a call
without the credential fails for real.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os
import sys
from typing import Any

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

server: MCPServer[Any] = MCPServer("demo", version="1")


@server.tool(description="Return the text unchanged.")
def echo(text: str) -> str:
    return text


@server.tool(description="Add two integers.")
def add(a: int, b: int) -> int:
    return a + b


@server.tool(description="Sleep for the given number of seconds, then answer.")
async def slow(seconds: float = 1.0) -> str:
    await asyncio.sleep(seconds)
    return f"slept {seconds}"


@server.tool(description="Always fail with a tool error.")
def fail(message: str = "demo failure") -> str:
    raise ToolError(message)


@server.tool(description="Return a large text of the given size in bytes.")
def big(size: int = 100_000) -> str:
    return "x" * max(0, min(size, 50_000_000))


@server.tool(description="Report the uid and user name the server runs as.")
def whoami() -> dict[str, Any]:
    import pwd

    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return {"uid": uid, "user": name}


@server.tool(description="Return the server's own secret (to prove redaction).")
def secret() -> str:
    return os.environ.get("DEMO_SECRET", "")


@server.tool(description="Exit the server process at once (to test crash recovery).")
def crash() -> str:
    os._exit(3)


class _BearerAuth:
    """ASGI middleware demanding ``Authorization: Bearer <token>``."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            got = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.expected):
                await send(
                    {
                        "type": "http.response.start",
                        "status": 401,
                        "headers": [(b"content-type", b"text/plain")],
                    }
                )
                await send({"type": "http.response.body", "body": b"missing or wrong bearer token\n"})
                return
        await self.app(scope, receive, send)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mcp_servers.demo", description=__doc__)
    parser.add_argument("--http", metavar="HOST:PORT", help="serve streamable HTTP on loopback")
    ns = parser.parse_args(argv)
    if ns.http is None:
        server.run()
        return 0
    host, _, port = ns.http.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1", "[::1]"):
        parser.error("--http serves on loopback only")
    token = os.environ.get("DEMO_TOKEN", "")
    if not token:
        print("demo: DEMO_TOKEN must be set for --http", file=sys.stderr)
        return 78
    import uvicorn

    app = _BearerAuth(server.streamable_http_app(host=host.strip("[]")), token)
    uvicorn.run(app, host=host.strip("[]"), port=int(port), log_level="warning")
    return 0
