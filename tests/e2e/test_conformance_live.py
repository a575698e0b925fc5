"""A published server behind the broker, a published client in front of it: what one sends, the other gets.

The server is ``@modelcontextprotocol/server-everything`` (pinned, installed
from the npm registry into a cache on first use), run by the real daemon
under its own user in its sandbox. The client is the MCP Python SDK's
``Client``, speaking to ``mcp stdio`` as the agent through sudo. The
reference is the same server spoken to directly by the same client, so
nothing here is the broker's own idea of MCP: tool definitions arrive
field for field (title, annotations under their wire names, outputSchema,
execution), an image arrives with its bytes and MIME type, resource links
and embedded resources keep theirs, structured content is intact, and a
tool that is not allowlisted (``get-env``, which would print the server's
environment) is refused without running.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from tests.e2e.harness import AGENT1, AGENT_ENV, ALLOWLIST, RUNUSER, Installation, servers, wait_for, write_servers_d

PACKAGE = "@modelcontextprotocol/server-everything"
VERSION = "2026.8.31"
#: outside every installation root (their var/cache is hidden from servers), readable by every server's user
CACHE = f"/var/cache/mcp-privsep-e2e/npm/server-everything-{VERSION}"
ENTRY = f"{CACHE}/node_modules/{PACKAGE}/dist/index.js"
ALLOWED = [
    "echo",
    "get-tiny-image",
    "get-structured-content",
    "get-resource-links",
    "get-resource-reference",
    "get-sum",
]
#: allowlisted too: the first is never listed (it needs task-augmented calls, which the broker does not make)
TASK_ONLY = "simulate-research-query"
LONG = "trigger-long-running-operation"


def _node() -> str:
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "nodejs", "npm"],
            capture_output=True,
            check=False,
            timeout=600,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
        node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.skip("no node and npm, and apt-get could not install them")
    return node


@pytest.fixture(scope="module")
def everything_cmd() -> list[str]:
    """The pinned server-everything, installed into the cache once (npm registry)."""
    node = _node()
    if not os.path.exists(ENTRY):
        os.makedirs(CACHE, exist_ok=True)
        r = subprocess.run(
            ["npm", "install", "--prefix", CACHE, "--no-audit", "--no-fund", "--no-save", f"{PACKAGE}@{VERSION}"],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if r.returncode != 0 or not os.path.exists(ENTRY):
            pytest.fail(f"npm install {PACKAGE}@{VERSION} failed: {r.stderr[-2000:]}")
    subprocess.run(["chmod", "-R", "a+rX,go-w", "/var/cache/mcp-privsep-e2e"], check=True)
    return [node, ENTRY, "stdio"]


@pytest.fixture(scope="module")
def everything(inst: Installation, everything_cmd: list[str]) -> Iterator[Installation]:
    conf = write_servers_d(
        inst,
        "everything.toml",
        f"[servers.everything]\ncommand = {json.dumps(everything_cmd[0])}\nargs = {json.dumps(everything_cmd[1:])}\n",
    )
    if inst.daemon is None or inst.daemon.poll() is not None:
        inst.start_daemon()
    try:
        assert inst.ctl("reload").code == 0
        up = wait_for(lambda: servers(inst).get("everything", {}).get("state") == "up", 60)
        assert up, (servers(inst).get("everything"), inst.log_tail())
        inst.set_allowlist(ALLOWLIST + "".join(f"everything.{t}\n" for t in (*ALLOWED, TASK_ONLY, LONG)))
        yield inst
    finally:
        os.unlink(conf)
        inst.set_allowlist(ALLOWLIST)
        inst.ctl("reload")


def through_broker(inst: Installation) -> Client:
    params = StdioServerParameters(
        command=RUNUSER, args=["-u", AGENT1, "--", inst.paths.mcp, "stdio"], env=dict(AGENT_ENV), cwd="/"
    )
    return Client(params)


def direct(cmd: list[str]) -> Client:
    return Client(StdioServerParameters(command=cmd[0], args=cmd[1:], env=dict(AGENT_ENV), cwd="/"))


def wire(model: Any) -> Any:
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


async def _tools_and_calls(client: Client, prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    listed = (await client.list_tools()).tools
    tools = {t.name.removeprefix(prefix): wire(t) for t in listed if t.name.startswith(prefix)}
    calls = {
        "get-tiny-image": await client.call_tool(f"{prefix}get-tiny-image", {}),
        "get-structured-content": await client.call_tool(f"{prefix}get-structured-content", {"location": "New York"}),
        "get-resource-links": await client.call_tool(f"{prefix}get-resource-links", {"count": 2}),
        "get-resource-reference": await client.call_tool(
            f"{prefix}get-resource-reference", {"resourceType": "Text", "resourceId": 1}
        ),
        "get-sum": await client.call_tool(f"{prefix}get-sum", {"a": 2, "b": 40}),
    }
    return tools, {k: wire(v) for k, v in calls.items()}


def test_definitions_and_results_arrive_as_the_server_sent_them(
    everything: Installation, everything_cmd: list[str]
) -> None:
    async def both() -> tuple[tuple[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]:
        async with direct(everything_cmd) as ref_client:
            ref = await _tools_and_calls(ref_client, "")
        async with through_broker(everything) as client:
            got = await _tools_and_calls(client, "everything.")
            refused = await client.call_tool("everything.get-env", {})
            assert refused.is_error and "not in the allowlist" in refused.content[0].text
            assert "PATH" not in refused.content[0].text
        return ref, got

    (ref_tools, ref_calls), (tools, calls) = asyncio.run(both())
    # exactly the allowlisted tools (less the task-only one), each definition field for field
    assert sorted(tools) == sorted([*ALLOWED, LONG])
    for name in ALLOWED:
        assert tools[name] == {**ref_tools[name], "name": f"everything.{name}"}, name
    assert tools["echo"]["annotations"]["readOnlyHint"] is True and tools["echo"]["title"]
    assert "outputSchema" in tools["get-structured-content"]
    # the image: the same bytes, its MIME type present
    image = [b for b in calls["get-tiny-image"]["content"] if b["type"] == "image"]
    ref_image = [b for b in ref_calls["get-tiny-image"]["content"] if b["type"] == "image"]
    assert image and image[0]["mimeType"] == "image/png" and image[0]["data"] == ref_image[0]["data"]
    # every call's result, block for block (server-everything's results do not vary between calls)
    for name, result in ref_calls.items():
        if name in ("get-resource-links", "get-resource-reference"):
            continue  # compared below: their resources are of the moment (a clock in their text)
        assert calls[name] == result, name
    embedded = [b["resource"] for b in calls["get-resource-reference"]["content"] if b["type"] == "resource"]
    ref_embedded = [b["resource"] for b in ref_calls["get-resource-reference"]["content"] if b["type"] == "resource"]
    assert [(r["uri"], r["mimeType"], sorted(r)) for r in embedded] == [
        (r["uri"], r["mimeType"], sorted(r)) for r in ref_embedded
    ]
    links = [b for b in calls["get-resource-links"]["content"] if b["type"] == "resource_link"]
    ref_links = [b for b in ref_calls["get-resource-links"]["content"] if b["type"] == "resource_link"]
    assert [sorted(b) for b in links] == [sorted(b) for b in ref_links] and all("mimeType" in b for b in links)


def test_mcp_call_json_prints_the_image_in_wire_form(everything: Installation) -> None:
    r = everything.mcp("call", "everything.get-tiny-image", "--json")
    assert r.code == 0, r
    result = json.loads(r.out)
    image = [b for b in result["content"] if b["type"] == "image"]
    assert image and image[0]["mimeType"] == "image/png" and len(image[0]["data"]) > 100
    assert result["isError"] is False
    plain = everything.mcp("call", "everything.get-tiny-image")
    assert "[image image/png, " in plain.out, plain


def test_describe_shows_the_whole_definition(everything: Installation) -> None:
    r = everything.mcp("describe", "everything.get-structured-content", "--json")
    assert r.code == 0, r
    shown = json.loads(r.out)
    assert shown["name"] == "everything.get-structured-content"
    assert {"title", "inputSchema", "outputSchema", "annotations"} <= set(shown)
    assert shown["annotations"]["readOnlyHint"] is True


def test_a_task_only_tool_is_not_offered_and_status_says_why(everything: Installation) -> None:
    r = everything.mcp("status")
    assert f"everything.{TASK_ONLY}: not offered (task-only" in r.out, r.out
    assert f"everything.{TASK_ONLY}" not in everything.mcp("list").out
    r = everything.mcp("call", f"everything.{TASK_ONLY}", "topic=x")
    assert r.code != 0 and "Traceback" not in r.err, r
    assert f"everything.{TASK_ONLY}: not offered" in everything.ctl("status").out


def test_a_cancelled_long_running_operation_stops_at_the_server(everything: Installation) -> None:
    """Its progress stops, its result never arrives, and the audit says cancelled."""
    from tests.e2e.test_cancel_progress_live import Session

    s = Session(everything)
    try:
        call = {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "tools/call",
            "params": {
                "name": f"everything.{LONG}",
                "arguments": {"duration": 6, "steps": 12},
                "_meta": {"progressToken": "long"},
            },
        }
        s.send(call)
        first = s.until(lambda m: m.get("method") == "notifications/progress", 20)
        assert first is not None and first["params"]["progressToken"] == "long", first
        s.send({"jsonrpc": "2.0", "method": "notifications/cancelled", "params": {"requestId": 1}})
        time.sleep(0.5)
        s.read(0.3)  # what was already on its way
        after = s.read(7.0)
    finally:
        s.close()
    assert not [m for m in after if m.get("method") == "notifications/progress"], after
    assert not any(m.get("id") == 1 for m in after), after
    outcomes = [r.get("outcome") for r in everything.records() if r.get("tool") == f"everything.{LONG}"]
    assert outcomes[-1] == "cancelled", outcomes
