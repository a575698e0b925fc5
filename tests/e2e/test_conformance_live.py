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
import hashlib
import json
import os
import pwd
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


# --- published clients in node: the MCP Inspector CLI and mcporter, as the agent ----------------------

#: pinned; the Inspector CLI needs Node >= 22, which the ``node`` package of the npm registry provides
CLIENT_PACKAGES = ("node@24.21.0", "@modelcontextprotocol/inspector@2.12.0", "mcporter@0.12.3")
CLIENTS = (
    "/var/cache/mcp-privsep-e2e/npm/clients-" + hashlib.sha256(" ".join(CLIENT_PACKAGES).encode()).hexdigest()[:12]
)
BIN = f"{CLIENTS}/node_modules/.bin"


@pytest.fixture(scope="module")
def clients(everything_cmd: list[str]) -> str:
    """The pinned Node clients, installed into the cache once (npm registry); their bin directory."""
    if not all(os.path.exists(f"{BIN}/{b}") for b in ("node", "mcp-inspector", "mcporter")):
        os.makedirs(CLIENTS, exist_ok=True)
        r = subprocess.run(
            ["npm", "install", "--prefix", CLIENTS, "--no-audit", "--no-fund", "--no-save", *CLIENT_PACKAGES],
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if r.returncode != 0:
            pytest.fail(f"npm install {' '.join(CLIENT_PACKAGES)} failed: {r.stderr[-2000:]}")
    subprocess.run(["chmod", "-R", "a+rX,go-w", "/var/cache/mcp-privsep-e2e"], check=True)
    version = subprocess.run([f"{BIN}/node", "--version"], capture_output=True, text=True, check=True).stdout
    assert version.startswith("v24."), version
    return BIN


@pytest.fixture(scope="module")
def reference(everything_cmd: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """server-everything's own tools and results, by the SDK's client, with no broker in between."""

    async def go() -> tuple[dict[str, Any], dict[str, Any]]:
        async with direct(everything_cmd) as client:
            return await _tools_and_calls(client, "")

    return asyncio.run(go())


def node_client(inst: Installation, *argv: str) -> Any:
    """A Node client as the agent, with the cached Node first on PATH and a home of the agent's own."""
    home = f"{inst.root}/agent-node-home"
    if not os.path.isdir(home):
        os.makedirs(home, mode=0o700)
        pw = pwd.getpwnam(AGENT1)
        os.chown(home, pw.pw_uid, pw.pw_gid)
    env = ["env", f"PATH={BIN}:/usr/local/bin:/usr/bin:/bin", f"HOME={home}", "LANG=C.UTF-8"]
    return subprocess.run(
        [RUNUSER, "-u", AGENT1, "--", *env, *argv], capture_output=True, text=True, check=False, timeout=120, cwd="/"
    )


def _image(result: dict[str, Any]) -> dict[str, Any]:
    images = [b for b in result["content"] if b.get("type") == "image"]
    assert len(images) == 1, result
    return images[0]


def test_the_inspector_cli_lists_and_calls(
    everything: Installation, clients: str, reference: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    ref_tools, ref_calls = reference
    inspector = [f"{clients}/mcp-inspector", "--cli", everything.paths.mcp, "stdio"]
    r = node_client(everything, *inspector, "--method", "tools/list")
    assert r.returncode == 0, r.stderr[-2000:]
    listed = {t["name"]: t for t in json.loads(r.stdout)["tools"] if t["name"].startswith("everything.")}
    assert sorted(listed) == sorted(f"everything.{t}" for t in (*ALLOWED, LONG))
    for name in ALLOWED:
        assert listed[f"everything.{name}"] == {**ref_tools[name], "name": f"everything.{name}"}, name
    r = node_client(everything, *inspector, "--method", "tools/call", "--tool-name", "everything.get-tiny-image")
    assert r.returncode == 0, r.stderr[-2000:]
    image, ref_image = _image(json.loads(r.stdout)), _image(ref_calls["get-tiny-image"])
    assert image["mimeType"] == "image/png" and image["data"] == ref_image["data"]
    r = node_client(everything, *inspector, "--method", "tools/call", "--tool-name", "everything.get-env")
    # not listed, so refused by the client itself, or by the broker: either way it never runs
    said = r.stdout + r.stderr
    assert r.returncode != 0 and ("not in the allowlist" in said or "not found" in said) and "PATH=" not in said, r


def test_mcporter_lists_and_calls(
    everything: Installation, clients: str, reference: tuple[dict[str, Any], dict[str, Any]]
) -> None:
    _ref_tools, ref_calls = reference
    stdio = ["--stdio", f"{everything.paths.mcp} stdio"]
    r = node_client(everything, f"{clients}/mcporter", "list", *stdio, "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    names = {t["name"] for t in json.loads(r.stdout)["tools"]}
    assert {f"everything.{t}" for t in ALLOWED} <= names and f"everything.{TASK_ONLY}" not in names
    r = node_client(everything, f"{clients}/mcporter", "call", *stdio, "everything.get-tiny-image", "--output", "json")
    assert r.returncode == 0, r.stderr[-2000:]
    image, ref_image = _image(json.loads(r.stdout)), _image(ref_calls["get-tiny-image"])
    assert image["mimeType"] == "image/png" and image["data"] == ref_image["data"]
    r = node_client(
        everything, f"{clients}/mcporter", "call", *stdio, "everything.get-sum", "a=2", "b=40", "--output", "json"
    )
    ref_sum = {k: v for k, v in ref_calls["get-sum"].items() if k != "resultType"}  # the SDK model's default
    assert r.returncode == 0 and json.loads(r.stdout) == ref_sum, r
