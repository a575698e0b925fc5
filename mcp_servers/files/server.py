"""The confined file share: an MCP server over configured roots.

Run by the broker like any stdio server, as ``mcp-broker`` (the command line
lives in :mod:`mcp_servers.files.cli`)::

    python -m mcp_servers.files --root nas=/srv/nas:ro --root inbox=/srv/agent-inbox:rw

Each ``--root NAME=PATH[:ro|:rw]`` is read-only unless it ends in ``:rw``.
Each read-write root has a quota, ``--quota NAME=SIZE[,FILES]`` (by default
1 GiB of regular files and 100,000 entries): a write, append or mkdir that
would take the root over it is refused before anything is written.
The agent sees only the root names, never the host paths. Tools: ``roots``,
``list``, ``stat``, ``read`` and ``search`` (read-only), and, in read-write
roots only, ``write``, ``append``, ``mkdir``, ``move`` and ``delete``. Every
path is resolved by :mod:`mcp_servers.files.confine` one component at a time
from a descriptor on the root, never following a symbolic link.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Annotated, Any, Literal

from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from mcp_servers.files import confine
from mcp_servers.files.confine import FilesError, Share

server: MCPServer[Any] = MCPServer(
    "files",
    version="1",
    instructions=(
        "A confined file share. Call 'roots' to see the roots and whether each is read-only (ro) or "
        "read-write (rw), and each rw root's quota and usage. Every path is relative to its root; '..', absolute "
        "paths and symbolic links are refused."
    ),
)

_share: Share | None = None


def _hints(*, read_only: bool, destructive: bool, idempotent: bool) -> ToolAnnotations:
    """Truthful annotations; policy and ``allow --read-only`` rely on them."""
    return ToolAnnotations(
        read_only_hint=read_only, destructive_hint=destructive, idempotent_hint=idempotent, open_world_hint=False
    )


READ_ONLY = _hints(read_only=True, destructive=False, idempotent=True)

RootArg = Annotated[str, Field(description="The name of a root (see the 'roots' tool).")]
PathArg = Annotated[
    str,
    Field(
        description="A path relative to the root, like 'docs/a.txt'; '' is the root itself. No '..', no leading '/'."
    ),
]
ContentArg = Annotated[str, Field(description=f"The content (at most {confine.WRITE_MAX} bytes once decoded).")]
EncodingArg = Annotated[
    Literal["text", "base64"], Field(description="'text' writes the content as UTF-8; 'base64' decodes it first.")
]


_QUOTA = " Refused, with nothing written, when it would take the root over its quota (see 'roots')."


def configure(roots: list[confine.Root]) -> None:
    """Serve these roots (the command line does this; tests may too)."""
    global _share  # the one piece of process state, set once at start-up
    _share = Share(roots)


def _run(call: Callable[[Share], dict[str, Any]]) -> dict[str, Any]:
    """Run one operation; every refusal becomes a one-line tool error without host paths."""
    if _share is None:
        raise ToolError("the files server has no roots configured")
    try:
        return call(_share)
    except FilesError as exc:
        raise ToolError(exc.message) from None
    except OSError as exc:  # a failure the core did not name: say what, never where
        raise ToolError(os.strerror(exc.errno).lower() if exc.errno else "I/O error") from None


@server.tool(
    description=(
        "List the roots of this share and whether each is read-only ('ro') or read-write ('rw'). A rw root also "
        "shows its quota ('quota': bytes of regular files and number of entries it may hold) and what it holds "
        "now ('used'; at_least=true when it is already over and was not counted to the end)."
    ),
    annotations=READ_ONLY,
)
def roots() -> dict[str, Any]:
    return _run(lambda s: s.list_roots())


@server.tool(
    name="list",
    description=(
        "List a directory: names, types, sizes and modification times, sorted by name, "
        f"at most 'limit' entries (default {confine.LIST_DEFAULT}) from 'offset'. "
        "Symbolic links are shown, never followed."
    ),
    annotations=READ_ONLY,
)
def list_dir(
    root: RootArg,
    path: PathArg = "",
    offset: Annotated[int, Field(description="Skip this many entries.")] = 0,
    limit: Annotated[
        int, Field(description=f"At most this many entries (1-{confine.LIST_MAX}).")
    ] = confine.LIST_DEFAULT,
) -> dict[str, Any]:
    return _run(lambda s: s.list_dir(root, path, offset, limit))


@server.tool(
    name="stat",
    description=(
        "Type, size, permission bits and modification time of a path (a symbolic link is reported, not followed)."
    ),
    annotations=READ_ONLY,
)
def stat_path(root: RootArg, path: PathArg = "") -> dict[str, Any]:
    return _run(lambda s: s.stat(root, path))


@server.tool(
    description=(
        f"Read a regular file from a byte offset, at most max_bytes (default {confine.READ_DEFAULT}, at most "
        f"{confine.READ_MAX}). Text comes back as UTF-8; a file that is not UTF-8 text is refused unless "
        "binary=true, which returns base64. The answer carries next_offset to continue."
    ),
    annotations=READ_ONLY,
)
def read(
    root: RootArg,
    path: PathArg,
    offset: Annotated[int, Field(description="Byte offset to start at.")] = 0,
    max_bytes: Annotated[int, Field(description=f"At most this many bytes (1-{confine.READ_MAX}).")] = (
        confine.READ_DEFAULT
    ),
    binary: Annotated[bool, Field(description="Return the bytes as base64 instead of text.")] = False,
) -> dict[str, Any]:
    return _run(lambda s: s.read(root, path, offset, max_bytes, binary))


@server.tool(
    description=(
        "Search under a directory of a root for entries whose name matches a glob ('name', like '*.pdf') and/or "
        "regular files containing a text ('contains', reported by line). Bounded work: it stops at max_results, "
        "max_files visited, max_bytes read or time_limit seconds and says which limit it hit."
    ),
    annotations=READ_ONLY,
)
def search(
    root: RootArg,
    path: PathArg = "",
    name: Annotated[str | None, Field(description="A glob matched against each entry's name.")] = None,
    contains: Annotated[str | None, Field(description="A text to find in regular files.")] = None,
    ignore_case: bool = False,
    max_results: Annotated[int, Field(description=f"1-{confine.SEARCH_RESULTS_MAX}")] = confine.SEARCH_RESULTS_DEFAULT,
    max_files: Annotated[int, Field(description=f"1-{confine.SEARCH_FILES_MAX}")] = confine.SEARCH_FILES_DEFAULT,
    max_bytes: Annotated[int, Field(description=f"0-{confine.SEARCH_BYTES_MAX}")] = confine.SEARCH_BYTES_DEFAULT,
    time_limit: Annotated[float, Field(description=f"Seconds, 0.1-{confine.SEARCH_TIME_MAX:g}")] = (
        confine.SEARCH_TIME_DEFAULT
    ),
) -> dict[str, Any]:
    return _run(
        lambda s: s.search(root, path, name, contains, ignore_case, max_results, max_files, max_bytes, time_limit)
    )


@server.tool(
    description=(
        "Write a file in a read-write root, atomically (a temporary file renamed into place). Refuses to replace "
        "an existing file unless overwrite=true; never replaces a directory or a symbolic link. Replacing a file "
        "counts only its growth against the quota." + _QUOTA
    ),
    annotations=_hints(read_only=False, destructive=True, idempotent=True),
)
def write(
    root: RootArg,
    path: PathArg,
    content: ContentArg,
    encoding: EncodingArg = "text",
    overwrite: Annotated[bool, Field(description="Replace the file if it exists.")] = False,
) -> dict[str, Any]:
    return _run(lambda s: s.write(root, path, content, encoding, overwrite))


@server.tool(
    description="Append to a regular file in a read-write root (create=true makes it when missing)." + _QUOTA,
    annotations=_hints(read_only=False, destructive=False, idempotent=False),
)
def append(
    root: RootArg,
    path: PathArg,
    content: ContentArg,
    encoding: EncodingArg = "text",
    create: Annotated[bool, Field(description="Create the file when it does not exist.")] = False,
) -> dict[str, Any]:
    return _run(lambda s: s.append(root, path, content, encoding, create))


@server.tool(
    description=(
        "Make a directory in a read-write root (parents=true makes missing parents too); an existing one is fine. "
        "Each directory made is one entry of the quota." + _QUOTA
    ),
    annotations=_hints(read_only=False, destructive=False, idempotent=True),
)
def mkdir(
    root: RootArg,
    path: PathArg,
    parents: Annotated[bool, Field(description="Create missing parent directories.")] = False,
) -> dict[str, Any]:
    return _run(lambda s: s.mkdir(root, path, parents))


@server.tool(
    description=(
        "Move or rename a file or directory within one read-write root. Refuses to replace an existing "
        "destination unless overwrite=true (a directory is never replaced)."
    ),
    annotations=_hints(read_only=False, destructive=True, idempotent=False),
)
def move(
    root: RootArg,
    src: Annotated[str, Field(description="The path to move, relative to the root.")],
    dst: Annotated[str, Field(description="The new path, relative to the same root.")],
    overwrite: Annotated[bool, Field(description="Replace an existing destination file.")] = False,
) -> dict[str, Any]:
    return _run(lambda s: s.move(root, src, dst, overwrite))


@server.tool(
    description=(
        "Delete a file, a symbolic link (never its target) or an empty directory in a read-write root; "
        f"recursive=true deletes a directory with its contents (at most {confine.DELETE_MAX} entries)."
    ),
    annotations=_hints(read_only=False, destructive=True, idempotent=True),
)
def delete(
    root: RootArg,
    path: PathArg,
    recursive: Annotated[bool, Field(description="Delete a directory with everything in it.")] = False,
) -> dict[str, Any]:
    return _run(lambda s: s.delete(root, path, recursive))
