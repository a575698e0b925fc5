"""The agent's side for real: an MCP client over ``mcp stdio``, ``key=@path``, ``mcp skill``."""

from __future__ import annotations

import asyncio
import json
import os
import pwd
from typing import Any

from mcp import Client, StdioServerParameters

from tests.e2e.harness import AGENT1, AGENT_ENV, RUNUSER, Installation

STDIO_ALLOWLIST = "demo.echo\ndemo.add\n"


def _client(inst: Installation, user: str = AGENT1, **kw: Any) -> Client:
    params = StdioServerParameters(
        command=RUNUSER, args=["-u", user, "--", inst.paths.mcp, "stdio"], env=dict(AGENT_ENV), cwd="/"
    )
    return Client(params, **kw)


def test_stdio_session_lists_calls_refuses_and_sees_allowlist_edits(live: Installation) -> None:
    live.set_allowlist(STDIO_ALLOWLIST)
    changed = asyncio.Event()

    async def on_message(message: Any) -> None:
        # the SDK hands over its notification model; its repr names the method
        if "tools/list_changed" in repr(message) or "ToolListChanged" in type(message).__name__:
            changed.set()

    async def session() -> None:
        async with _client(live, message_handler=on_message, mode="legacy") as client:
            names = sorted(t.name for t in (await client.list_tools()).tools)
            assert names == ["demo.add", "demo.echo"]
            result = await client.call_tool("demo.echo", {"text": "over stdio"})
            assert not result.is_error and result.content[0].text == "over stdio"
            result = await client.call_tool("demo.add", {"a": 2, "b": 3})
            assert result.content[0].text == "5"
            refused = await client.call_tool("demo.whoami", {})
            assert refused.is_error and "not in the allowlist" in refused.content[0].text
            refused = await client.call_tool("demo.secret", {})
            assert refused.is_error and "DEMO_SECRET" not in refused.content[0].text
            await client.send_ping()  # legacy-mode ping: the session negotiates a handshake version
            # the operator allows a tool mid-session: the client is told, and sees it
            live.set_allowlist(STDIO_ALLOWLIST + "demo.whoami\n")
            await asyncio.wait_for(changed.wait(), 10)
            names = sorted(t.name for t in (await client.list_tools()).tools)
            assert names == ["demo.add", "demo.echo", "demo.whoami"]
            who = await client.call_tool("demo.whoami", {})
            assert not who.is_error and "mcp-srv-demo" in who.content[0].text

    asyncio.run(session())


def test_a_stateless_client_listens_for_allowlist_edits(live: Installation) -> None:
    """2026-07-28: no session to push on; the client opens subscriptions/listen and is told there."""
    live.set_allowlist(STDIO_ALLOWLIST)

    async def session() -> list[str]:
        async with _client(live, mode="2026-07-28") as client:
            async with client.listen(tools_list_changed=True) as sub:
                assert sub.honored.tools_list_changed is True
                live.set_allowlist(STDIO_ALLOWLIST + "demo.whoami\n")
                await asyncio.wait_for(sub.__anext__(), 10)
            return sorted(t.name for t in (await client.list_tools()).tools)

    assert asyncio.run(session()) == ["demo.add", "demo.echo", "demo.whoami"]


def test_the_sdk_client_in_every_mode_lists_and_calls(live: Installation) -> None:
    """auto (server/discover, no fallback needed), legacy (initialize) and pinned to 2026-07-28."""
    live.set_allowlist(STDIO_ALLOWLIST)
    seen: dict[str, tuple[list[str], str, str]] = {}

    async def session(mode: str) -> None:
        async with _client(live, mode=mode) as client:
            names = sorted(t.name for t in (await client.list_tools()).tools)
            result = await client.call_tool("demo.add", {"a": 20, "b": 22})
            seen[mode] = (names, result.content[0].text, str(client.protocol_version))

    for mode in ("auto", "legacy", "2026-07-28"):
        asyncio.run(session(mode))
    for mode, (names, text, _version) in seen.items():
        assert (names, text) == (["demo.add", "demo.echo"], "42"), mode
    assert seen["legacy"][2] == "2025-11-25"
    assert seen["2026-07-28"][2] == "2026-07-28" and seen["auto"][2] == "2026-07-28"  # auto took the new era


def test_an_unknown_stateless_version_gets_32022(live: Installation) -> None:
    import subprocess

    meta = {"io.modelcontextprotocol/protocolVersion": "2099-01-01", "io.modelcontextprotocol/clientCapabilities": {}}
    line = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/list", "params": {"_meta": meta}}) + "\n"
    r = subprocess.run(
        [RUNUSER, "-u", AGENT1, "--", live.paths.mcp, "stdio"],
        input=line,
        capture_output=True,
        text=True,
        env=dict(AGENT_ENV),
        cwd="/",
        timeout=30,
    )
    answer = json.loads(r.stdout.splitlines()[0])
    assert answer["error"]["code"] == -32022
    assert answer["error"]["data"] == {"supported": ["2026-07-28"], "requested": "2099-01-01"}


def test_stdio_refuses_every_other_method(live: Installation) -> None:
    import subprocess

    lines = [
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-06-18",
                "capabilities": {},
                "clientInfo": {"name": "t", "version": "1"},
            },
        },
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "resources/list"},
        {"jsonrpc": "2.0", "id": 3, "method": "prompts/list"},
        {"jsonrpc": "2.0", "id": 4, "method": "sampling/createMessage", "params": {}},
        {"jsonrpc": "2.0", "id": 5, "method": "tools/call", "params": {"name": "../etc", "arguments": {}}},
        {"jsonrpc": "2.0", "id": 6, "method": "ping"},
    ]
    payload = "".join(json.dumps(m) + "\n" for m in lines) + "this is not json\n"
    proc = subprocess.run(
        [RUNUSER, "-u", AGENT1, "--", live.paths.mcp, "stdio"],
        input=payload,
        capture_output=True,
        text=True,
        env=AGENT_ENV,
        cwd="/",
        timeout=30,
    )
    answers = {m.get("id"): m for m in map(json.loads, proc.stdout.splitlines())}
    assert answers[1]["result"]["protocolVersion"] == "2025-06-18"
    assert answers[1]["result"]["capabilities"] == {"tools": {"listChanged": True}}
    for i in (2, 3, 4):
        assert answers[i]["error"]["code"] == -32601
    assert answers[5]["error"]["code"] == -32602
    assert answers[6]["result"] == {}
    assert answers[None]["error"]["code"] == -32700
    assert proc.returncode == 0


def test_stdio_takes_no_arguments(live: Installation) -> None:
    r = live.mcp("stdio", "--config", "/tmp/x")
    assert r.code == 64


def test_key_at_path_reads_the_file_as_the_agent(live: Installation) -> None:
    mine = f"{live.root}/agent-note.txt"
    with open(mine, "w") as fh:
        fh.write("from a file\n")
    os.chown(mine, pwd.getpwnam(AGENT1).pw_uid, -1)
    os.chmod(mine, 0o600)
    r = live.mcp("call", "demo.echo", f"text=@{mine}", "--json")
    assert r.code == 0, r.err
    assert json.loads(r.out)["content"][0]["text"] == "from a file\n"
    r = live.mcp("call", "demo.echo", "text=@@literal")
    assert r.out == "@literal\n"
    # the agent cannot use @ to make the broker read a file for it
    r = live.mcp("call", "demo.echo", f"text=@{live.paths.secrets}/demo.env")
    assert r.code == 65 and "cannot read" in r.err and "DEMO_SECRET" not in r.out
    r = live.mcp("call", "demo.echo", "--args", json.dumps({"text": f"@{live.paths.secrets}/demo.env"}))
    assert r.out.strip() == f"@{live.paths.secrets}/demo.env"  # literal to the gate


def test_skill_describes_the_allowed_tools(live: Installation) -> None:
    live.set_allowlist(STDIO_ALLOWLIST)
    r = live.mcp("skill")
    assert r.code == 0, r.err
    assert r.out.startswith("---\nname: mcp-privsep\ndescription: ")  # a skill file's YAML front matter
    assert "\n---\n\n# Tools through mcp-privsep\n" in r.out
    assert "### demo.echo" in r.out and "### demo.add" in r.out and "demo.whoami" not in r.out
    assert "`a` (integer, required)" in r.out
    assert "cannot read those credentials" in r.out
