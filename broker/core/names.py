"""Names that flow everywhere: ``server.tool`` actions, user names, ``k=v`` arguments.

The grammar is the design contract's: server names ``[A-Za-z0-9_-]+``, tool
names ``[A-Za-z0-9_.-]`` of 1 to 128 characters, compared as whole strings
(no case folding, no normalisation). The gate imports this on every call:
standard library only, no ``re``.
"""

from __future__ import annotations

MAX_TOOL_NAME = 128

SERVER_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")
TOOL_CHARS = SERVER_CHARS | {"."}
_USER_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.$")


class Action(tuple[str, str]):
    """A parsed, well-formed ``server.tool``: ``Action.parse("files.read") == ("files", "read")``."""

    __slots__ = ()

    def __new__(cls, server: str, tool: str) -> Action:
        return super().__new__(cls, (server, tool))

    @property
    def server(self) -> str:
        return self[0]

    @property
    def tool(self) -> str:
        return self[1]

    def __str__(self) -> str:
        return f"{self[0]}.{self[1]}"

    @classmethod
    def parse(cls, text: str) -> Action:
        """The action ``text`` names; ValueError with the reason when it is not well formed."""
        problem = action_problem(text)
        if problem is not None:
            raise ValueError(problem[1])
        server, _, tool = text.partition(".")
        return cls(server, tool)


def action_problem(entry: str) -> tuple[int, str] | None:
    """(0-based column, message) of the first problem in a ``server.tool`` name, or None."""
    server, dot, tool = entry.partition(".")
    for i, ch in enumerate(server):
        if ch not in SERVER_CHARS:
            return i, _bad_char(ch)
    if not dot:
        return 0, "expected server.tool"
    if not server:
        return 0, "empty server name"
    first = len(server) + 1
    if not tool:
        return first, "empty tool name"
    for i, ch in enumerate(tool, first):
        if ch not in TOOL_CHARS:
            return i, _bad_char(ch)
    if len(tool) > MAX_TOOL_NAME:
        return first, f"tool name longer than {MAX_TOOL_NAME} characters"
    return None


def action_error(action: str) -> str | None:
    """Why ``action`` is not a well-formed ``server.tool`` name, or None."""
    problem = action_problem(action)
    return None if problem is None else problem[1]


def _bad_char(ch: str) -> str:
    if ch in "*?[]{}":
        return f"wildcard {ch!r} not allowed (entries are exact names; 'mcp-brokerctl allow' expands patterns)"
    return f"character {ch!r} not allowed in a server.tool name"


def valid_server_name(name: str) -> bool:
    return bool(name) and all(ch in SERVER_CHARS for ch in name)


def valid_user_name(user: str) -> bool:
    """Whether ``user`` is safe to use as ``allowed-actions.d/USER.txt`` and in a sudoers rule."""
    return 0 < len(user) <= 64 and user[0] not in ".-" and all(ch in _USER_CHARS for ch in user)


def split_kv(item: str) -> tuple[str, str] | None:
    """(key, value) of ``key=value`` or ``key:value``, cut at the first separator; None if it has none."""
    eq = item.find("=")
    colon = item.find(":")
    cut = min(p for p in (eq, colon) if p >= 0) if eq >= 0 or colon >= 0 else -1
    if cut <= 0:
        return None
    return item[:cut], item[cut + 1 :]
