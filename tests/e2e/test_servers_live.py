"""Real servers behind the broker: stdio restart, streamable HTTP with injected credentials."""

from __future__ import annotations

import json
import os
import signal
import time

from tests.e2e.harness import Installation


def test_killing_a_stdio_server_mid_call_errors_then_recovers(live: Installation) -> None:
    assert live.mcp("call", "demo.echo", "text=warm").code == 0
    before = live.server_pids()
    assert len(before) == 1
    proc = live.spawn_mcp("call", "demo.slow", "seconds=20")
    time.sleep(1.0)
    os.kill(before[0], signal.SIGKILL)
    out, err = proc.communicate(timeout=15)
    assert proc.returncode == 69, (proc.returncode, out, err)
    assert "failed during the call" in err and err.count("\n") == 1
    r = live.mcp("call", "demo.echo", "text=again")
    assert (r.code, r.out) == (0, "again\n"), (r, live.log_tail())
    after = live.server_pids()
    assert after and after != before


def test_a_server_that_exits_during_a_call(live: Installation) -> None:
    r = live.mcp("call", "demo.crash")
    assert r.code == 69 and "Traceback" not in r.err
    assert live.mcp("call", "demo.echo", "text=back").out == "back\n"


def test_tool_error_exits_1(live: Installation) -> None:
    r = live.mcp("call", "demo.fail", "message=boom")
    assert r.code == 1 and "boom" in r.err + r.out


def test_timeout_is_enforced_by_the_daemon(live: Installation) -> None:
    started = time.monotonic()
    r = live.mcp("call", "demo.slow", "seconds=10", "--timeout", "1")
    assert r.code == 75 and "timed out" in r.err
    assert time.monotonic() - started < 8
    assert live.mcp("call", "demo.echo", "text=ok").code == 0


def test_output_is_capped(live: Installation) -> None:
    r = live.mcp("call", "demo.big", "size=3000000", "--json")
    assert r.code == 0
    result = json.loads(r.out)
    text = result["content"][0]["text"]  # a CallToolResult in MCP's wire form; the broker's note in _meta
    assert "mcp-privsep/truncated" in result["_meta"] and "[output truncated" in text
    assert len(text) < 1_100_000


def test_http_server_gets_the_bearer_token_from_the_secret_file(live: Installation) -> None:
    r = live.mcp("call", "web.echo", "text=over-http")
    assert (r.code, r.out) == (0, "over-http\n"), r
    who = json.loads(live.mcp("call", "web.whoami", "--json").out)
    assert who["structuredContent"]["user"] == "mcp-broker"
    # the same server without the injected header is refused by the server itself
    r = live.mcp("call", "noauth.echo", "text=x")
    assert r.code == 69 and "unavailable" in r.err
    assert live.token not in r.err + r.out
    status = live.mcp("status", "--json")
    servers = {s["name"]: s for s in json.loads(status.out)["servers"]}
    assert servers["web"]["state"] == "up" and servers["noauth"]["state"] == "down"
    assert "HTTP error" in servers["noauth"]["reason"]
    # status shows no commands, URLs or secrets
    assert "127.0.0.1" not in status.out and "python" not in status.out and live.token not in status.out
