"""Who is calling: the kernel names the peer (SO_PEERCRED), the gate-users map names the agent.

Each agent's gate user maps to exactly one agent through the root-owned map
``install --agent`` writes (:mod:`broker.core.agents`). Nothing else makes a
caller: not a name in a frame, not a user name's shape. Root, the broker's
own user, the first version's shared ``mcp-gate`` user and every uid the map
does not list are refused. The table is rebuilt when the map or the passwd
database changes (stat-keyed, so an added agent is served at once), and a
broken map knows no caller at all (fail closed).
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd

from broker.core import agents
from broker.core.errors import ConfigError
from broker.core.paths import BROKER_USER, GATE_USER

log = logging.getLogger("mcp-brokerd")

PASSWD = "/etc/passwd"  # noqa: S105 - the passwd database's path


class Caller(tuple[str, int]):
    """(agent, the agent's own uid)."""

    __slots__ = ()

    @property
    def name(self) -> str:
        return self[0]

    @property
    def uid(self) -> int:
        return self[1]


def _stat(path: str) -> tuple[int, ...]:
    try:
        st = os.stat(path)
    except OSError:
        return ()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Callers:
    """gate uid -> Caller, from the map; refuses every uid that is not an agent's gate user."""

    def __init__(self, path: str, passwd: str = PASSWD) -> None:
        self.path = path
        self.passwd = passwd
        self._key: tuple[object, ...] | None = None
        self._table: dict[int, Caller] = {}
        #: why the map is not usable ("" while it is), for status
        self.problem = ""

    def _never(self) -> set[int]:
        out = {0}
        for name in (BROKER_USER, GATE_USER):
            with contextlib.suppress(KeyError):
                out.add(pwd.getpwnam(name).pw_uid)
        return out

    def _load(self) -> None:
        table: dict[int, Caller] = {}
        try:
            mapping = agents.load(self.path)
        except ConfigError as exc:
            self.problem = exc.message
            log.error("no caller is served: %s", exc.message)
            self._table = {}
            return
        never = self._never()
        for agent, gate in mapping.items():
            try:
                gate_uid = pwd.getpwnam(gate).pw_uid
                agent_uid = pwd.getpwnam(agent).pw_uid
            except KeyError:
                log.warning("%s: %s or %s does not exist; that agent is not served", self.path, agent, gate)
                continue
            if gate_uid in never or agent_uid == 0 or gate_uid == agent_uid:
                log.error("%s: %s -> %s would let a system account call; ignored", self.path, agent, gate)
                continue
            table[gate_uid] = Caller((agent, agent_uid))
        self.problem = ""
        self._table = table

    def lookup(self, uid: int) -> Caller | None:
        """The agent whose gate user has ``uid``, or None."""
        key = (_stat(self.path), _stat(self.passwd))
        if key != self._key:
            self._key = key
            self._load()
        return self._table.get(uid)
