"""``broker.daemon.upstream.http``: a session closes the HTTP client it made, whichever way it ends.

The SDK leaves an HTTP client it was given open, so a daemon that restarts
a server now and then would otherwise keep every old connection pool. The
server is the bundled demo over streamable HTTP (a real uvicorn), in both
of its modes: dual-era, and refusing the handshake (2026-07-28 only).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.daemon.upstream.http import HttpClient

REPO = str(Path(__file__).resolve().parents[2])
TOKEN = "unit-test-token"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(params=[[], ["--stateless-only"]], ids=["dual-era", "stateless-only"])
def server(request: pytest.FixtureRequest) -> Iterator[str]:
    port = _free_port()
    env = {"PATH": "/usr/bin:/bin", "DEMO_TOKEN": TOKEN, "PYTHONPATH": REPO, "HOME": os.environ.get("HOME", "/")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_servers.demo", "--http", f"127.0.0.1:{port}", *request.param],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        proc.terminate()
        proc.wait(10)


def test_a_session_closes_its_http_client(server: str) -> None:
    async def go() -> None:
        client = HttpClient(server, {"Authorization": f"Bearer {TOKEN}"})
        async with client:
            http = client._http
            assert http is not None and not http.is_closed
            assert (await client.call_tool("echo", {"text": "hi"}, 10)).content[0].text == "hi"  # type: ignore[union-attr]
        assert http.is_closed and client._http is None

    asyncio.run(go())


def test_a_refused_session_closes_its_http_client_too(server: str) -> None:
    async def go() -> None:
        client = HttpClient(server, {"Authorization": "Bearer wrong"})
        http = client._http
        with pytest.raises(BaseException):  # noqa: B017 - the SDK's error, or its task group's
            await client.__aenter__()
        assert http is not None and http.is_closed and client._http is None

    asyncio.run(go())
