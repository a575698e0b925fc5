"""The agents and their gate users: ``/etc/mcp-privsep/gate-users``, one ``AGENT GATE_USER`` a line.

``mcp-brokerctl install --agent AGENT`` creates the agent's gate user and
writes its line; the daemon maps the uid that SO_PEERCRED reports on
``gate.sock`` to the agent through this file, and only through it: it never
takes a caller's name from a frame, nor derives one from a user name. The
file is root's, like the allowlist, and fails closed the same way: any bad
line is ``file:line:col: message`` and no caller is known until it is fixed.
"""

from __future__ import annotations

import posix as os

from broker.core.errors import ConfigError
from broker.core.names import valid_user_name

HEADER = (
    "# mcp-privsep: each agent and its own gate user (the sudo target of its 'mcp' calls).\n"
    "# Written by 'mcp-brokerctl install --agent USER'; the daemon names callers by it.\n"
)
MAX_BYTES = 1024 * 1024


def parse(text: str, path: str) -> dict[str, str]:
    """agent -> gate user; every problem reported at once, as ``path:line:col: message``."""
    found: dict[str, str] = {}
    users: dict[str, str] = {}
    problems: list[str] = []
    for lineno, raw in enumerate(text.split("\n"), 1):
        line = raw.split("#", 1)[0]
        fields = line.split()
        if not fields:
            continue
        col = len(line) - len(line.lstrip()) + 1
        if len(fields) != 2:
            problems.append(f"{path}:{lineno}:{col}: expected AGENT GATE_USER")
            continue
        agent, gate = fields
        if not valid_user_name(agent) or not valid_user_name(gate):
            problems.append(f"{path}:{lineno}:{col}: not a user name")
        elif agent in found:
            problems.append(f"{path}:{lineno}:{col}: agent {agent} is listed twice")
        elif gate in users:
            problems.append(f"{path}:{lineno}:{col}: gate user {gate} already serves agent {users[gate]}")
        else:
            found[agent] = gate
            users[gate] = agent
    if problems:
        raise ConfigError(problems[0], problems)
    return found


def load(path: str) -> dict[str, str]:
    """Read and check the map (root's, a regular file, not writable by group or other); {} when it is absent."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o170000 != 0o100000:
            raise ConfigError(f"{path}: not a regular file")
        if st.st_uid != 0 or st.st_mode & 0o022:
            raise ConfigError(f"{path}: must be root's and not writable by group or other")
        data = os.read(fd, MAX_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_BYTES} bytes")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    return parse(text, path)


def render(mapping: dict[str, str]) -> str:
    return HEADER + "".join(f"{agent} {gate}\n" for agent, gate in mapping.items())
