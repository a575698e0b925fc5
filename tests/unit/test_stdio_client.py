"""Unit tests for ``broker.daemon.upstream.stdio``: the daemon's lean MCP client, against real server processes.

Two servers: the bundled demo server (an ``mcp`` SDK server, as in
production) and a few lines of raw JSON-RPC written here that misbehave on
purpose: an output that breaks its declared schema, requests of its own
to the client, a stdin EOF it ignores, a slow answer, lines on stderr. No
root is needed: the servers run as the test's own user, started by the
test-only :func:`tests.fakes.local_launch` (in the daemon, the spawner
starts them). :func:`~broker.daemon.upstream.stdio.pipe_streams` is also
tested on its own, over bare pipes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
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
from broker.daemon.upstream.stdio import StdioClient, pipe_streams
from tests.fakes import LocalLaunch, LocalProcess, local_launch

REPO = str(Path(__file__).resolve().parents[2])

RAW_SERVER = r"""
import json, os, signal, sys, time
mode = sys.argv[1]
log = open(sys.argv[2], "a", buffering=1)
if mode == "stubborn":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
if mode == "ancient":  # answers the handshake with a protocol version the client cannot speak
    os.environ["VERSION"] = "1999-01-01"
if mode == "chatty":
    sys.stderr.write("hello from stderr\nsecond line\n"); sys.stderr.flush()
def send(obj):
    sys.stdout.write(json.dumps(obj) + "\n"); sys.stdout.flush()
TOOLS = [{"name": "count", "inputSchema": {"type": "object"},
          "outputSchema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}]
MODERN = "io.modelcontextprotocol/protocolVersion"
for line in sys.stdin:
    msg = json.loads(line)
    log.write(line)
    mid, method = msg.get("id"), msg.get("method")
    if mode == "modern" and mid is not None:  # the stateless era only: no handshake, an envelope on everything
        meta = (msg.get("params") or {}).get("_meta") or {}
        if method == "initialize":
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32022, "message": "Unsupported protocol version",
                  "data": {"supported": ["2026-07-28"], "requested": msg["params"]["protocolVersion"]}}})
            continue
        if meta.get(MODERN) != "2026-07-28" or "io.modelcontextprotocol/clientCapabilities" not in meta:
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32602, "message": "no envelope"}})
            continue
        if method == "server/discover":
            send({"jsonrpc": "2.0", "id": mid, "result": {"supportedVersions": ["2026-07-28"], "capabilities": {},
                  "resultType": "complete", "ttlMs": 0, "cacheScope": "private"}})
            continue
        if method == "ping":
            send({"jsonrpc": "2.0", "id": mid, "error": {"code": -32601, "message": "Method not found"}})
            continue
    if method == "initialize":
        version = os.environ.get("VERSION") or msg["params"]["protocolVersion"]
        send({"jsonrpc": "2.0", "id": mid, "result": {"protocolVersion": version,
              "capabilities": {"tools": {}}, "serverInfo": {"name": "raw", "version": "1"}}})
    elif method == "tools/list":
        send({"jsonrpc": "2.0", "id": mid, "result": {"tools": TOOLS}})
    elif method == "tools/call":
        args = msg["params"]["arguments"]
        if args.get("ask"):
            send({"jsonrpc": "2.0", "id": "s1", "method": "sampling/createMessage", "params": {}})
            send({"jsonrpc": "2.0", "id": "s2", "method": "ping"})
        if args.get("sleep"):
            time.sleep(args["sleep"])
        if args.get("progress"):
            token = msg["params"].get("_meta", {}).get("progressToken")
            for params in ({"progressToken": token, "progress": 1, "total": 3, "message": "m" * 900},
                           {"progressToken": 999, "progress": 2}, {"progressToken": token, "progress": "x"},
                           {"progressToken": token, "progress": 3, "total": "3", "message": 5}):
                send({"jsonrpc": "2.0", "method": "notifications/progress", "params": params})
        n = args.get("n", 1)
        send({"jsonrpc": "2.0", "id": mid, "result": {"content": [{"type": "text", "text": str(n)}],
              "structuredContent": {"n": n}}})
    elif method == "ping":
        send({"jsonrpc": "2.0", "id": mid, "result": {}})
if mode == "stubborn":
    while True:
        time.sleep(1)
"""


def to_stderr(line: str) -> None:
    """The default errlog: a server's stderr lines go to the test's stderr (pytest shows them on failure)."""
    print(line, file=sys.stderr)


def demo_client(**kw: Any) -> StdioClient:
    env = {"PATH": "/usr/bin:/bin", "HOME": tempfile.gettempdir(), "LANG": "C.UTF-8", "PYTHONPATH": REPO}
    kw.setdefault("errlog", to_stderr)
    return StdioClient(local_launch(sys.executable, ["-m", "mcp_servers.demo"], env, REPO), **kw)


def raw_client(tmp_path: Path, mode: str = "plain", **kw: Any) -> tuple[StdioClient, Path, LocalLaunch]:
    """A client of the raw server in ``mode``, the file the server logs what it read to, and its launcher."""
    script = tmp_path / "raw_server.py"
    script.write_text(RAW_SERVER)
    log = tmp_path / "received.jsonl"
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    launch = local_launch(sys.executable, [str(script), mode, str(log)], env, str(tmp_path))
    kw.setdefault("errlog", to_stderr)
    return StdioClient(launch, **kw), log, launch


def only(launch: LocalLaunch) -> LocalProcess:
    """The one process a launcher started."""
    assert len(launch.processes) == 1
    return launch.processes[0]


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


def test_a_server_of_the_stateless_era_only_is_spoken_to_in_its_era(tmp_path: Path) -> None:
    client, log, _launch = raw_client(tmp_path, "modern")

    async def go() -> None:
        async with client:
            assert client.protocol_version == "2026-07-28"
            assert [t.name for t in (await client.list_tools()).tools] == ["count"]
            result = await client.call_tool("count", {"n": 4})
            assert result.structured_content == {"n": 4}
            await client.send_ping()  # no ping in that era: server/discover says it is alive

    run(go)
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    assert [m.get("method") for m in sent] == [
        "initialize",
        "server/discover",
        "tools/list",
        "tools/call",
        "server/discover",
    ]  # no notifications/initialized: there is no handshake to finish
    for m in sent[1:]:
        assert m["params"]["_meta"]["io.modelcontextprotocol/protocolVersion"] == "2026-07-28"
        assert m["params"]["_meta"]["io.modelcontextprotocol/clientCapabilities"] == {}


def test_progress_reaches_the_call_that_asked_and_nothing_else(tmp_path: Path) -> None:
    client, log, _launch = raw_client(tmp_path)
    got: list[dict[str, Any]] = []

    async def go() -> None:
        async with client:
            await client.list_tools()
            await client.call_tool("count", {"n": 1, "progress": True}, progress=got.append)
            await client.call_tool("count", {"n": 2, "progress": True})  # asked for none: none relayed

    run(go)
    # the right token only, bounded, typed: a wrong token, a non-number and wrong types are dropped
    assert got == [{"progress": 1, "total": 3, "message": "m" * 500}, {"progress": 3}]
    sent = [json.loads(line) for line in log.read_text().splitlines()]
    calls = [m for m in sent if m.get("method") == "tools/call"]
    assert calls[0]["params"]["_meta"] == {"progressToken": calls[0]["id"]}  # the broker's own token: its id
    assert "_meta" not in calls[1]["params"]


def test_progress_of_the_demo_servers_work() -> None:
    got: list[dict[str, Any]] = []

    async def go() -> None:
        async with demo_client() as client:
            await client.list_tools()
            done = await client.call_tool("work", {"seconds": 0.2, "steps": 2, "tag": ""}, progress=got.append)
            assert not done.is_error

    run(go)
    assert got[-1] == {"progress": 2, "total": 2, "message": "done"} and len(got) == 3


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
    """Against the demo server; what the server is sent is checked with the raw server, in the next test."""

    async def go() -> None:
        async with demo_client() as client:
            await client.list_tools()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.call_tool("slow", {"seconds": 5}), 0.3)
            echoed = await client.call_tool("echo", {"text": "still here"})
            assert echoed.content[0].text == "still here"  # type: ignore[union-attr]

    run(go)


def test_a_timed_out_call_sends_notifications_cancelled_for_its_id(tmp_path: Path) -> None:
    """What the server reads after a call the client gave up on: a cancellation naming that call."""
    client, log, _launch = raw_client(tmp_path)

    async def go() -> None:
        async with client:
            await client.list_tools()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.call_tool("count", {"n": 1, "sleep": 1.0}), 0.2)
            after = await client.call_tool("count", {"n": 2})  # its late answer to the first is ignored
            assert after.structured_content == {"n": 2}

    run(go)
    received = [json.loads(line) for line in log.read_text().splitlines()]
    slow = next(m for m in received if m.get("method") == "tools/call" and m["params"]["arguments"].get("sleep"))
    cancels = [m for m in received if m.get("method") == "notifications/cancelled"]
    assert [m["params"]["requestId"] for m in cancels] == [slow["id"]]
    assert "id" not in cancels[0]  # a notification, not a request
    later = next(m for m in received if m.get("method") == "tools/call" and m["params"]["arguments"] == {"n": 2})
    assert received.index(cancels[0]) < received.index(later)  # sent at the timeout, not at some later write


def test_structured_content_that_breaks_the_output_schema_is_an_error(tmp_path: Path) -> None:
    client, _log, _launch = raw_client(tmp_path)

    async def go() -> None:
        async with client:
            await client.list_tools()
            ok = await client.call_tool("count", {"n": 3})
            assert ok.structured_content == {"n": 3}
            with pytest.raises(mcp.MCPError, match="breaks its output schema"):
                await client.call_tool("count", {"n": "three"})

    run(go)


def test_raw_server_requests_get_method_not_found_and_ping_an_answer(tmp_path: Path) -> None:
    client, log, _launch = raw_client(tmp_path)

    async def go() -> None:
        async with client:
            await client.list_tools()
            await client.call_tool("count", {"n": 1, "ask": True})
            await client.send_ping()  # by now the server has read our answers to its two requests

    run(go)
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
    client, _log, launch = raw_client(tmp_path, mode="stubborn")

    async def go() -> int:
        async with client:
            await client.list_tools()
            assert client.proc is only(launch)
            pid = only(launch).pid
        return pid

    started = time.monotonic()
    pid = run(go)
    took = time.monotonic() - started
    assert took < stdio_client.TERMINATE_GRACE + 2
    assert only(launch).kills == 1
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
    launch = local_launch(sys.executable, [str(script)], {"PATH": "/usr/bin:/bin", "ONLY": "this"}, "/")
    client = StdioClient(launch, errlog=to_stderr)

    async def go() -> None:
        async with client:
            await client.list_tools()
            environ = Path(f"/proc/{only(launch).pid}/environ").read_bytes().split(b"\0")
            seen.extend(sorted(e.split(b"=", 1)[0].decode() for e in environ if e))

    run(go)
    assert "LEAKED_FROM_THE_DAEMON" not in seen
    assert {"PATH", "ONLY"} <= set(seen)


def test_close_kills_exactly_once_and_only_after_the_grace_when_the_server_ignores_eof(tmp_path: Path) -> None:
    client, _log, launch = raw_client(tmp_path, mode="stubborn")
    closing: list[float] = []

    async def go() -> None:
        async with client:
            await client.list_tools()
            closing.append(time.monotonic())
        await client.aclose()  # a second close is a no-op: no second kill

    run(go)
    proc = only(launch)
    assert proc.kills == 1 and len(proc.kill_times) == 1
    assert proc.exited_before_kill is False  # it was still running: the kill is what ended it
    waited = proc.kill_times[0] - closing[0]
    assert stdio_client.TERMINATE_GRACE - 0.1 <= waited < stdio_client.TERMINATE_GRACE + 1
    assert proc.popen.returncode == -9


def test_close_does_not_wait_out_the_grace_when_the_server_exits_on_eof(tmp_path: Path) -> None:
    client, _log, launch = raw_client(tmp_path)  # its loop over stdin ends at EOF, and so does it
    closed: list[str] = []
    took: list[float] = []

    async def go() -> None:
        async with client:
            client.on_close = closed.append
            await client.list_tools()
            started = time.monotonic()
        took.append(time.monotonic() - started)

    run(go)
    proc = only(launch)
    assert took[0] < stdio_client.TERMINATE_GRACE / 4, took
    assert proc.kills == 1  # still called: it ends whatever the server may have left behind
    assert proc.popen.returncode == 0  # it exited on its own, before the kill
    assert not closed  # a close the client asked for is not reported as the server going away


def test_a_cancelled_close_still_kills_the_server_at_once(tmp_path: Path) -> None:
    client, _log, launch = raw_client(tmp_path, mode="stubborn")

    async def go() -> float:
        await client.__aenter__()
        closing = asyncio.create_task(client.aclose())
        await asyncio.sleep(0.3)  # in the grace now
        started = time.monotonic()
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        return time.monotonic() - started

    took = run(go)
    proc = only(launch)
    assert proc.kills == 1 and proc.popen.returncode == -9
    assert took < 1


def test_a_cancelled_close_ends_cancelled(tmp_path: Path) -> None:
    client, _log, _launch = raw_client(tmp_path, mode="stubborn")

    async def go() -> bool:
        await client.__aenter__()
        closing = asyncio.create_task(client.aclose())
        await asyncio.sleep(0.3)  # in the grace now
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
        return closing.cancelled()

    assert run(go)


def test_a_refused_handshake_still_ends_the_server(tmp_path: Path) -> None:
    client, _log, launch = raw_client(tmp_path, mode="ancient")

    async def go() -> None:
        with pytest.raises(mcp.MCPError, match="unsupported protocol version '1999-01-01'"):
            async with client:
                pytest.fail("the session must not open")
        assert client.proc is None

    run(go)
    assert only(launch).kills == 1 and only(launch).popen.returncode is not None


def test_the_server_stderr_reaches_errlog_line_by_line(tmp_path: Path) -> None:
    lines: list[str] = []
    client, _log, _launch = raw_client(tmp_path, mode="chatty", errlog=lines.append)

    async def go() -> None:
        async with client:
            await client.list_tools()
            deadline = time.monotonic() + 5
            while len(lines) < 2 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)

    run(go)
    assert lines == ["hello from stderr", "second line"]


def test_pipe_streams_carry_data_both_ways_and_see_eof(tmp_path: Path) -> None:
    """Over bare pipes: what the client writes comes out the far end; what is written in comes out the readers."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()

    async def go() -> None:
        stdin, stdout, stderr = await pipe_streams(in_w, out_r, err_r)
        stdin.write(b'{"jsonrpc":"2.0"}\n')
        await stdin.drain()
        assert os.read(in_r, 100) == b'{"jsonrpc":"2.0"}\n'
        os.write(out_w, b"from stdout\n")
        os.write(err_w, b"from stderr\n")
        assert await asyncio.wait_for(stdout.read(100), 5) == b"from stdout\n"
        assert await asyncio.wait_for(stderr.read(100), 5) == b"from stderr\n"
        os.close(out_w)
        os.close(err_w)
        assert await asyncio.wait_for(stdout.read(100), 5) == b""  # the writer closed: EOF
        assert await asyncio.wait_for(stderr.read(100), 5) == b""
        assert stdout.at_eof() and stderr.at_eof()
        stdin.close()
        await asyncio.wait_for(stdin.wait_closed(), 5)

    try:
        run(go)
        # the stream owned the write end of the first pipe: closing it closed the descriptor, so EOF here
        assert os.read(in_r, 100) == b""
    finally:
        os.close(in_r)


def test_pipe_streams_sets_the_descriptors_non_blocking() -> None:
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()

    async def go() -> None:
        stdin, stdout, stderr = await pipe_streams(in_w, out_r, err_r)
        assert not any(os.get_blocking(fd) for fd in (in_w, out_r, err_r))
        stdin.close()
        await stdin.wait_closed()
        for stream in (stdout, stderr):
            stream._transport.close()  # type: ignore[attr-defined]  # what StdioClient.aclose does
        await asyncio.sleep(0)

    try:
        run(go)
        with pytest.raises(BrokenPipeError):  # the read ends were the streams' and are closed now
            os.write(out_w, b"x")
        with pytest.raises(BrokenPipeError):
            os.write(err_w, b"x")
    finally:
        for fd in (in_r, out_w, err_w):
            os.close(fd)
