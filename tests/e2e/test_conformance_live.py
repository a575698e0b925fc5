"""Published servers behind the broker, published clients in front of it: what one sends, the other gets.

Servers: ``@modelcontextprotocol/server-everything`` over stdio (run by the
real daemon under its own user, in its sandbox) and over streamable HTTP,
and ``mcp-server-time`` and ``mcp-server-git`` from PyPI; all pinned,
installed from the registries into ``/var/cache/mcp-privsep-e2e`` on first
use. Clients, as the agent through sudo and ``mcp stdio``: the MCP Python
SDK's ``Client``, the MCP Inspector CLI (on Node 24 from the npm registry)
and mcporter. The reference is each server spoken to directly, so nothing
here is the broker's own idea of MCP: tool definitions arrive field for
field (title, annotations under their wire names, outputSchema,
execution), an image arrives with its bytes and MIME type, resource links
and embedded resources keep theirs, structured content is intact,
progress is relayed, a cancelled long-running operation stops at its
server, a task-only tool is not offered (and status says why), and a tool
that is not allowlisted (``get-env``, which would print the server's
environment) is refused without running.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mcp import Client, StdioServerParameters
from mcp.client.streamable_http import streamable_http_client

from broker.core.servers import server_user_for
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


def through_broker(inst: Installation, mode: str = "auto") -> Client:
    params = StdioServerParameters(
        command=RUNUSER, args=["-u", AGENT1, "--", inst.paths.mcp, "stdio"], env=dict(AGENT_ENV), cwd="/"
    )
    return Client(params, mode=mode)


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


@pytest.mark.parametrize("mode", ["auto", "legacy", "2026-07-28"])
def test_definitions_and_results_arrive_as_the_server_sent_them(
    everything: Installation, everything_cmd: list[str], mode: str
) -> None:
    async def both() -> tuple[tuple[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]:
        async with direct(everything_cmd) as ref_client:
            ref = await _tools_and_calls(ref_client, "")
        async with through_broker(everything, mode) as client:
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


# --- published Python servers: mcp-server-time and mcp-server-git (PyPI), behind the broker -------------

PY_SERVERS = ("mcp-server-time==2026.10.19", "mcp-server-git==2026.10.19")
PY_VENV = "/var/cache/mcp-privsep-e2e/py/servers-" + hashlib.sha256(" ".join(PY_SERVERS).encode()).hexdigest()[:12]
PY_TOOLS = {"time": ["get_current_time", "convert_time"], "git": ["git_log", "git_status"]}


@pytest.fixture(scope="module")
def py_servers(inst: Installation) -> Iterator[tuple[Installation, str]]:
    """Both servers in a virtualenv of their own (the system's Python, pinned versions), and a repository."""
    if not os.path.exists(f"{PY_VENV}/bin/mcp-server-git"):
        subprocess.run(["/usr/bin/python3", "-m", "venv", PY_VENV], check=True, timeout=120)
        r = subprocess.run(
            [f"{PY_VENV}/bin/pip", "install", "-q", "--disable-pip-version-check", *PY_SERVERS],
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if r.returncode != 0:
            pytest.fail(f"pip install {' '.join(PY_SERVERS)} failed: {r.stderr[-2000:]}")
    if shutil.which("git") is None:
        subprocess.run(["apt-get", "install", "-y", "-qq", "git"], capture_output=True, check=False, timeout=600)
    subprocess.run(["chmod", "-R", "a+rX,go-w", "/var/cache/mcp-privsep-e2e"], check=True)
    repo = f"{inst.root}/repo"
    os.makedirs(repo, exist_ok=True)
    git = ["git", "-C", repo, "-c", "user.name=e2e", "-c", "user.email=e2e@example.org"]
    subprocess.run(["git", "init", "-q", repo], check=True)
    with open(f"{repo}/README", "w") as fh:
        fh.write("a repository behind the broker\n")
    subprocess.run([*git, "add", "README"], check=True)
    subprocess.run(
        [*git, "commit", "-q", "-m", "first commit"],
        check=True,
        env={**os.environ, "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z", "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z"},
    )
    conf = write_servers_d(
        inst,
        "pyservers.toml",
        f'[servers.time]\ncommand = "{PY_VENV}/bin/mcp-server-time"\n\n'
        f'[servers.git]\ncommand = "{PY_VENV}/bin/mcp-server-git"\nargs = ["--repository", "{repo}"]\n',
    )
    if inst.daemon is None or inst.daemon.poll() is not None:
        inst.start_daemon()
    try:
        assert inst.ctl("reload").code == 0
        owner = pwd.getpwnam(server_user_for("git"))  # git refuses a repository of another user's
        subprocess.run(["chown", "-R", f"{owner.pw_uid}:{owner.pw_gid}", repo], check=True)
        up = wait_for(lambda: all(servers(inst).get(n, {}).get("state") == "up" for n in PY_TOOLS), 60)
        assert up, ({n: servers(inst).get(n) for n in PY_TOOLS}, inst.log_tail())
        inst.set_allowlist(ALLOWLIST + "".join(f"{s}.{t}\n" for s, ts in PY_TOOLS.items() for t in ts))
        yield inst, repo
    finally:
        os.unlink(conf)
        inst.set_allowlist(ALLOWLIST)
        inst.ctl("reload")


def as_server_user(server: str, command: list[str]) -> Client:
    """The server spoken to directly, as its own user (git trusts only its own repositories), in the era the
    broker speaks to it (the handshake: a stateless-era server stamps its own serverInfo into each result)."""
    args = ["-u", server_user_for(server), "--", *command]
    return Client(StdioServerParameters(command=RUNUSER, args=args, env=dict(AGENT_ENV), cwd="/"), mode="legacy")


def test_published_python_servers_behind_the_broker(py_servers: tuple[Installation, str]) -> None:
    inst, repo = py_servers
    calls = {
        "time": ("convert_time", {"source_timezone": "UTC", "time": "12:00", "target_timezone": "Asia/Tokyo"}),
        "git": ("git_log", {"repo_path": repo, "max_count": 1}),
    }
    commands = {
        "time": [f"{PY_VENV}/bin/mcp-server-time"],
        "git": [f"{PY_VENV}/bin/mcp-server-git", "--repository", repo],
    }

    async def both(server: str) -> tuple[Any, Any, Any, Any]:
        tool, args = calls[server]
        async with as_server_user(server, commands[server]) as ref_client:
            ref_tools = {t.name: wire(t) for t in (await ref_client.list_tools()).tools}
            ref = wire(await ref_client.call_tool(tool, args))
        async with through_broker(inst) as client:
            listed = {t.name: wire(t) for t in (await client.list_tools()).tools if t.name.startswith(f"{server}.")}
            got = wire(await client.call_tool(f"{server}.{tool}", args))
        return ref_tools, ref, listed, got

    for server, tools in PY_TOOLS.items():
        ref_tools, ref, listed, got = asyncio.run(both(server))
        assert sorted(listed) == sorted(f"{server}.{t}" for t in tools), server
        for t in tools:
            assert listed[f"{server}.{t}"] == {**ref_tools[t], "name": f"{server}.{t}"}, (server, t)
        assert got == ref and not got.get("isError"), (server, got, ref)


# --- server-everything over streamable HTTP -----------------------------------------------------------------


@pytest.fixture(scope="module")
def everything_http(inst: Installation, everything_cmd: list[str]) -> Iterator[tuple[Installation, str]]:
    """server-everything's streamable-HTTP transport (as nobody, on a free loopback port), behind the broker."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nobody = pwd.getpwnam("nobody")
    log = open(f"{inst.root}/everything-http.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [everything_cmd[0], everything_cmd[1], "streamableHttp"],
        env={"PATH": "/usr/bin:/bin", "PORT": str(port), "HOME": "/"},
        user=nobody.pw_uid,
        group=nobody.pw_gid,
        extra_groups=[],
        cwd="/",
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}/mcp"
    conf = ""
    try:
        assert wait_for(lambda: _listening(port), 30), Path(f"{inst.root}/everything-http.log").read_text()
        conf = write_servers_d(inst, "everything-http.toml", f'[servers.evhttp]\nurl = "{url}"\n')
        assert inst.ctl("reload").code == 0
        up = wait_for(lambda: servers(inst).get("evhttp", {}).get("state") == "up", 60)
        assert up, (servers(inst).get("evhttp"), inst.log_tail())
        inst.set_allowlist(ALLOWLIST + "".join(f"evhttp.{t}\n" for t in (*ALLOWED, LONG)))
        yield inst, url
    finally:
        if conf:
            os.unlink(conf)
        inst.set_allowlist(ALLOWLIST)
        inst.ctl("reload")
        proc.terminate()
        proc.wait(10)
        log.close()


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.2):
            return True
    except OSError:
        return False


def test_server_everything_over_streamable_http(everything_http: tuple[Installation, str]) -> None:
    inst, url = everything_http
    progress: list[float] = []

    async def both() -> tuple[tuple[dict[str, Any], dict[str, Any]], tuple[dict[str, Any], dict[str, Any]]]:
        async with Client(streamable_http_client(url), mode="legacy") as ref_client:
            ref = await _tools_and_calls(ref_client, "")
        async with through_broker(inst) as client:
            got = await _tools_and_calls(client, "evhttp.")

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append(value)

            done = await client.call_tool(f"evhttp.{LONG}", {"duration": 1, "steps": 4}, progress_callback=on_progress)
            assert not done.is_error
        return ref, got

    (ref_tools, ref_calls), (tools, calls) = asyncio.run(both())
    assert sorted(tools) == sorted([*ALLOWED, LONG])
    for name in ALLOWED:
        assert tools[name] == {**ref_tools[name], "name": f"evhttp.{name}"}, name
    image, ref_image = _image(calls["get-tiny-image"]), _image(ref_calls["get-tiny-image"])
    assert image["mimeType"] == "image/png" and image["data"] == ref_image["data"]
    assert calls["get-structured-content"] == ref_calls["get-structured-content"]
    assert progress and progress == sorted(progress), progress  # relayed from the HTTP server, through the broker


# --- the SDK's own progress, cancellation and list_changed, with server-everything -------------------------


def test_the_sdk_client_sees_progress_cancels_and_is_told_of_changes(everything: Installation) -> None:
    inst = everything
    # its own allowlist: the fixtures of the other servers in this module reset it when they end
    inst.set_allowlist(ALLOWLIST + "".join(f"everything.{t}\n" for t in (*ALLOWED, TASK_ONLY, LONG)))
    changes: list[str] = []
    progress: list[float] = []

    async def on_message(message: Any) -> None:
        if "tools/list_changed" in repr(message) or "ToolListChanged" in type(message).__name__:
            changes.append("changed")

    async def session() -> None:
        async with Client(
            StdioServerParameters(
                command=RUNUSER, args=["-u", AGENT1, "--", inst.paths.mcp, "stdio"], env=dict(AGENT_ENV), cwd="/"
            ),
            mode="legacy",
            message_handler=on_message,
        ) as client:
            first = asyncio.Event()

            async def on_progress(value: float, total: float | None, message: str | None) -> None:
                progress.append(value)
                first.set()

            call = asyncio.ensure_future(
                client.call_tool(f"everything.{LONG}", {"duration": 8, "steps": 16}, progress_callback=on_progress)
            )
            await asyncio.wait_for(first.wait(), 20)
            call.cancel()  # the SDK tells the session notifications/cancelled
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await call
            await asyncio.sleep(3)
            seen = len(progress)
            await asyncio.sleep(3)
            assert len(progress) == seen, progress  # no progress after the cancel: the server stopped
            await asyncio.sleep(1.5)  # the session's watch is open
            fewer = [t for t in (*ALLOWED, LONG) if t != "get-sum"]  # a tool it sees goes
            inst.set_allowlist(ALLOWLIST + "".join(f"everything.{t}\n" for t in fewer))
            for _ in range(50):
                if changes:
                    break
                await asyncio.sleep(0.2)
            assert changes, "no list_changed after an allowlist edit"
            changes.clear()
            for pid in inst.server_pids(marker=ENTRY):
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                if changes:
                    break
                await asyncio.sleep(0.2)
            assert changes, "no list_changed after the server restarted"

    try:
        asyncio.run(session())
    finally:
        inst.set_allowlist(ALLOWLIST + "".join(f"everything.{t}\n" for t in (*ALLOWED, TASK_ONLY, LONG)))
        wait_for(lambda: servers(inst).get("everything", {}).get("state") == "up", 30)
    outcomes = [r.get("outcome") for r in inst.records() if r.get("tool") == f"everything.{LONG}"]
    assert outcomes[-1] == "cancelled", outcomes
