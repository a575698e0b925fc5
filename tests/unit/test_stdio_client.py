"""Unit tests for ``broker.stdio_client``: the daemon's lean MCP client, against real server processes.

Two servers: the bundled demo server (an ``mcp`` SDK server, as in
production) and a few lines of raw JSON-RPC written here that misbehave on
purpose: an output that breaks its declared schema, requests of its own
to the client, a stdin EOF it ignores. No root is needed: the servers run
as the test's own user.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import mcp
import pytest

from broker.daemon.upstream import stdio as stdio_client
from broker.daemon.upstream.stdio import StdioClient

REPO = str(Path(__file__).resolve().parents[2])

RAW_SERVER = r"""
import json, os, signal, sys, time
mode = sys.argv[1]
log = open(sys.argv[2], "a", buffering=1)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
TOOLS = [{"name": "count", "inputSchema": {"type": "object"},
          "outputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}]
for line in sys.stdin:
    msg = json.loads(line)
    log.write(line)
    mid, method = msg.get("id"), msg.get("method")
    if method == "initialize":
        send({"jsonrpc": "2.0", "id": mid, "result": {"protocolVersion": msg["params"]["protocolVersion"],
              "capabilities": {"tools": {}}, "serverInfo": {"name": "raw", "version": "1"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": mid, "result": {"tools": TOOLS}})
    elif method == "tools/call":
        args = msg["params"]["arguments"]
        if args.get("ask"):
            send({"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "params": {}})
            send({"jsonrpc": "2.0", "id": "s2", "method": "ping"})
        n = args.get("n", 1)
        send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": str(n)}],
              "structuredContent": {"n": n}}})
    elif method == "ping":
        send({"jsonrpc": "2.0", "id": mid, "result": {}})
if mode == "stubborn":
    while True:
        time.sleep(1)
"""


def demo_client(**kw: Any) -> StdioClient:
    env = {"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir(), "LANG": "C.UTF-8", "PYTHONPATH": REPO}
    return StdioClient(sys.executable, ["-m", "mcp_servers.demo"], env=env, cwd=REPO, errlog=sys.stderr, **kw)


def raw_client(tmp_path: Path, mode: str = "plain", **kw: Any) -> tuple[StdioClient, Path]:
    script = tmp_path / "raw_server.py"
    script.write_text(RAW_SERVER)
    log = tmp_path / "received.jsonl"
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    client = StdioClient(
        sys.executable, [str(script), mode, str(log)], env=env, cwd=str(tmp_path), errlog=sys.stderr, **kw
    )
    return client, log


def run(coro: Callable[[], Awaitable[Any]]) -> Any:
    return asyncio.run(coro())


def test_handshake_list_and_call_the_demo_server() -> None:
    async def go() -> None:
        async with demo_client() as client:
            assert client.protocol_version in stdio_client.SUPPORTED_VERSIONS
            listed = await client.list_tools()
            tools = {t.name: t for t in listed.tools}
            assert {"echo", "add", "crash", "ask_client"} <= set(tools)
            assert tools["echo"].input_schema["properties"]["text"]["type"] == "string"
            echoed = await client.call_tool("echo", {"text": "hé"})
            assert not echoed.is_error and echoed.content[0].text == "hé"  # type: ignore[union-attr]
            added = await client.call_tool("add", {"a": 2, "b": 3})
            assert added.structured_content == {"result": 5}
            failed = await client.call_tool("fail", {"message": "nope"})
            assert failed.is_error
            await client.send_ping()

    run(go)


def test_requests_from_the_server_to_the_client_are_refused() -> None:
    async def go() -> None:
        async with demo_client() as client:
            await client.list_tools()
            outcome = (await client.call_tool("ask_client", {})).structured_content
            assert outcome is not None and set(outcome) == {"sampling", "elicitation", "roots"}
            assert all(str(v).startswith("refused") for v in outcome.values()), outcome

    run(go)


def test_a_crash_fails_the_call_and_reports_the_close_at_once() -> None:
    closed: list[str] = []

    async def go() -> None:
        async with demo_client(on_close=closed.append) as client:
            await client.list_tools()
            with pytest.raises(mcp.MCPError, match="Connection closed"):
                await client.call_tool("crash", {})
            assert closed and "closed its output" in closed[0]
            started = time.monotonic()
            with pytest.raises(mcp.MCPError, match="Connection closed"):
                await client.call_tool("echo", {"text": "after"})
            assert time.monotonic() - started < 1

    run(go)


def test_a_timed_out_call_leaves_the_session_usable_and_is_cancelled_at_the_server(tmp_path: Path) -> None:
    async def go() -> None:
        async with demo_client() as client:
            await client.list_tools()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.call_tool("slow", {"seconds": 5}), 0.3)
            echoed = await client.call_tool("echo", {"text": "still here"})
            assert echoed.content[0].text == "still here"  # type: ignore[union-attr]

    run(go)


def test_structured_content_that_breaks_the_output_schema_is_an_error(tmp_path: Path) -> None:
    client, _log = raw_client(tmp_path)

    async def go() -> None:
        async with client:
            await client.list_tools()
            ok = await client.call_tool("count", {"n": 3})
            assert ok.structured_content == {"n": 3}
            with pytest.raises(mcp.MCPError, match="breaks its output schema"):
                await client.call_tool("count", {"n": "three"})

    run(go)


def test_raw_server_requests_get_method_not_found_and_ping_an_answer(tmp_path: Path) -> None:
    client, log = raw_client(tmp_path)

    async def go() -> None:
        async with client:
            await client.list_tools()
            await client.call_tool("count", {"n": 1, "ask": True})
            await client.send_ping()  # by now the server has read our answers to its two requests

    run(go)
    import json

    received = [json.loads(line) for line in log.read_text().splitlines()]
    answers = {m["id"]: m for m in received if "method" not in m}
    assert answers["s1"]["error"]["code"] == -32601
    assert answers["s2"]["result"] == {}


def test_a_message_over_the_cap_fails_its_call_and_the_session_goes_on() -> None:
    """A server's oversized answer is dropped while it is read: its call fails, nothing else does."""
    closed: list[str] = []

    async def go() -> tuple[str, str]:
        async with demo_client(on_close=closed.append, max_message=256 * 1024) as client:
            await client.list_tools()
            with pytest.raises(mcp.MCPError, match="over 262144 bytes") as failed:
                await client.call_tool("big", {"size": 1_000_000})
            after = await client.call_tool("echo", {"text": "still here"})
            return str(failed.value), str(after.content[0].text)  # type: ignore[union-attr]

    message, text = run(go)
    assert "over 262144 bytes" in message and text == "still here"
    assert not closed  # the session was never ended for it


def test_close_kills_a_server_that_ignores_eof_and_sigterm(tmp_path: Path) -> None:
    client, _log = raw_client(tmp_path, mode="stubborn")

    async def go() -> int:
        async with client:
            await client.list_tools()
            assert client.proc is not None
            pid = client.proc.pid
        return pid

    started = time.monotonic()
    pid = run(go)
    took = time.monotonic() - started
    assert took < stdio_client.TERMINATE_GRACE + 2 * stdio_client.KILL_GRACE + 2
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_the_server_gets_only_the_environment_it_is_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LEAKED_FROM_THE_DAEMON", "secret")
    script = tmp_path / "env_server.py"
    script.write_text(
        "import json, os, sys\n"
        "for line in sys.stdin:\n"
        "    m = json.loads(line)\n"
        "    if m.get('method') == 'initialize':\n"
        "        r = {'protocolVersion': m['params']['protocolVersion'], 'capabilities': {},\n"
        "             'serverInfo': {'name': json.dumps(sorted(os.environ)), 'version': '1'}}\n"
        "        print(json.dumps({'jsonrpc': '2.0', 'id': m['id'], 'result': r}), flush=True)\n"
        "    elif 'id' in m:\n"
        "        print(json.dumps({'jsonrpc': '2.0', 'id': m['id'], 'result': {'tools': []}}), flush=True)\n"
    )
    seen: list[str] = []
    client = StdioClient(
        sys.executable, [str(script)], env={"PATH": "/usr/bin:/bin", "ONLY": "this"}, cwd="/", errlog=sys.stderr
    )

    async def go() -> None:
        async with client:
            await client.list_tools()
            assert client.proc is not None
            environ = Path(f"/proc/{client.proc.pid}/environ").read_bytes().split(b"\0")
            seen.extend(sorted(e.split(b"=", 1)[0].decode() for e in environ if e))

    run(go)
    assert "LEAKED_FROM_THE_DAEMON" not in seen
    assert {"PATH", "ONLY"} <= set(seen)
