"""The files server as an MCP server: tools, truthful annotations, clear errors, its command line."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from mcp import Client, StdioServerParameters

from mcp_servers.files import server as files_server
from mcp_servers.files.confine import Root

READ_TOOLS = {"roots", "list", "stat", "read", "search"}
WRITE_TOOLS = {"write", "append", "mkdir", "move", "delete"}


@pytest.fixture
def share_dirs() -> Iterator[tuple[str, str, str]]:
    base = tempfile.mkdtemp(prefix="files-server-")
    ro, rw = f"{base}/ro", f"{base}/rw"
    os.makedirs(f"{ro}/docs")
    os.makedirs(rw)
    with open(f"{ro}/docs/hello.txt", "w", encoding="utf-8") as fh:
        fh.write("hello from the share\n")
    os.makedirs(f"{base}/outside")
    with open(f"{base}/outside/secret.txt", "w", encoding="utf-8") as fh:
        fh.write("outside\n")
    os.symlink(f"{base}/outside/secret.txt", f"{ro}/pw")
    try:
        yield base, ro, rw
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _call(coro: Any) -> Any:
    return asyncio.run(coro)


def test_tools_and_annotations_are_truthful(share_dirs: tuple[str, str, str]) -> None:
    _base, ro, rw = share_dirs
    files_server.configure([Root("nas", ro, False), Root("inbox", rw, True)])

    async def go() -> dict[str, Any]:
        async with Client(files_server.server) as client:
            return {t.name: t for t in (await client.list_tools()).tools}

    tools = _call(go())
    assert set(tools) == READ_TOOLS | WRITE_TOOLS
    for name in READ_TOOLS:
        ann = tools[name].annotations
        assert ann.read_only_hint is True and ann.destructive_hint is False and ann.idempotent_hint is True
    for name in WRITE_TOOLS:
        assert tools[name].annotations.read_only_hint is False
    destructive = {n for n in WRITE_TOOLS if tools[n].annotations.destructive_hint}
    assert destructive == {"write", "move", "delete"}
    idempotent = {n for n in WRITE_TOOLS if tools[n].annotations.idempotent_hint}
    assert idempotent == {"write", "mkdir", "delete"}
    assert all(tools[n].annotations.open_world_hint is False for n in tools)
    assert set(tools["read"].input_schema["required"]) == {"root", "path"}


def test_calls_answer_and_refusals_are_clear_tool_errors(share_dirs: tuple[str, str, str]) -> None:
    base, ro, rw = share_dirs
    files_server.configure([Root("nas", ro, False), Root("inbox", rw, True)])

    async def go() -> list[Any]:
        async with Client(files_server.server) as client:
            return [
                await client.call_tool("read", {"root": "nas", "path": "docs/hello.txt"}),
                await client.call_tool("write", {"root": "nas", "path": "x.txt", "content": "no"}),
                await client.call_tool("read", {"root": "nas", "path": "../rw"}),
                await client.call_tool("read", {"root": "nas", "path": "pw"}),
                await client.call_tool("write", {"root": "inbox", "path": "note.txt", "content": "yes"}),
                await client.call_tool("roots", {}),
            ]

    ok, ro_write, dotdot, link, wrote, roots = _call(go())
    assert not ok.is_error and ok.structured_content["content"] == "hello from the share\n"
    assert ro_write.is_error and "root 'nas' is read-only: write is refused" in ro_write.content[0].text
    assert dotdot.is_error and "'..' is refused" in dotdot.content[0].text
    assert link.is_error and "nas:pw: is a symbolic link" in link.content[0].text
    assert not wrote.is_error
    with open(f"{rw}/note.txt", encoding="utf-8") as fh:
        assert fh.read() == "yes"
    assert roots.structured_content == {
        "roots": [
            {"name": "nas", "mode": "ro"},
            {
                "name": "inbox",
                "mode": "rw",
                "quota": {"bytes": 1 << 30, "files": 100_000},
                "used": {"bytes": 3, "files": 1, "at_least": False},
            },
        ]
    }
    for result in (ok, ro_write, dotdot, link, wrote, roots):
        assert base not in str(result.model_dump())
    assert not os.path.exists(f"{ro}/x.txt")


def test_runs_over_stdio_from_its_command_line(share_dirs: tuple[str, str, str]) -> None:
    _base, ro, rw = share_dirs
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_servers.files", "--root", f"nas={ro}:ro", "--root", f"inbox={rw}:rw"],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": os.getcwd()},
    )

    async def go() -> Any:
        async with Client(params, mode="legacy") as client:
            return await client.call_tool("search", {"root": "nas", "name": "*.txt"})

    result = _call(go())
    assert not result.is_error
    assert result.structured_content["results"] == [{"path": "docs/hello.txt", "type": "file"}]


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["--root", "nas"], 78, "expected NAME=PATH"),
        (["--root", "nas=relative/path"], 78, "must be absolute"),
        (["--root", "nas=/nonexistent-files-root"], 78, "is not a directory"),
        ([], 78, "no roots"),
        (["--bogus"], 64, "unrecognized arguments"),
    ],
)
def test_command_line_errors_are_one_line_with_sysexits(argv: list[str], code: int, message: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mcp_servers.files", *argv],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_read_only_root_inside_a_writable_one_is_refused(share_dirs: tuple[str, str, str]) -> None:
    base, ro, _rw = share_dirs
    proc = subprocess.run(
        [sys.executable, "-m", "mcp_servers.files", "--root", f"all={base}:rw", "--root", f"nas={ro}"],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 78 and "lies inside read-write root 'all'" in proc.stderr
