"""Every installed path, with its type, owner, group and mode: written once, read by everyone.

Postfix's ``postfix-files`` is the model: ``mcp-brokerctl install`` creates
what this table says, ``doctor`` checks what it says, ``uninstall`` removes
the paths it marks as install's, and the packaging (systemd unit, OpenRC
script, Debian package) is tested against it. A path's rights are never
written down anywhere else.

Modes are exact: install sets them, and doctor reports any bit beyond them
(``forbid`` is everything the mode lacks) and any ``need`` bit that is
missing (the bits without which the product does not work, e.g. group read
of the allowlist for the daemon). Owners and groups are user names of the
contract, resolved where the table is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from broker.core.paths import BROKER_USER, GATE_GROUP, Paths

Kind = Literal["dir", "file", "sock", "link"]
#: who brings the path into being: install, the running daemon, or the operator (install writes an example once)
Maker = Literal["install", "daemon", "operator"]


@dataclass(frozen=True)
class Entry:
    """One path (``attr`` of :class:`Paths`) or, with ``suffix``, the files inside a directory."""

    attr: str
    kind: Kind
    owner: str  # "*": the agent's own gate user (a directory per agent); "+": the instance's server user
    group: str | None  # None: any group
    mode: int
    why: str
    made_by: Maker = "install"
    need: int = 0
    #: for a "children" entry: names ending so (``""``: every name) inside the directory ``attr``
    suffix: str | None = None

    @property
    def forbid(self) -> int:
        """Mode bits that must be clear: everything the exact mode lacks."""
        return 0o7777 & ~self.mode

    def path(self, paths: Paths) -> str:
        return str(getattr(paths, self.attr))


ROOT = "root"

#: Every path, in the order install creates them (parents first).
PATHS: tuple[Entry, ...] = (
    Entry("etc", "dir", ROOT, ROOT, 0o751, "config directory", need=0o001),
    Entry("servers_d", "dir", ROOT, BROKER_USER, 0o750, "server definitions", need=0o050),
    Entry("allowlist_d", "dir", ROOT, GATE_GROUP, 0o750, "per-user allowlists", need=0o050),
    Entry("secrets", "dir", ROOT, ROOT, 0o700, "secrets (only the spawner, root, reads them)", need=0o700),
    Entry("run", "dir", BROKER_USER, GATE_GROUP, 0o2750, "sockets", need=0o2050),
    Entry("state", "dir", BROKER_USER, BROKER_USER, 0o700, "state", need=0o700),
    Entry("log", "dir", BROKER_USER, BROKER_USER, 0o700, "audit log directory", need=0o700),
    Entry("cache", "dir", ROOT, ROOT, 0o755, "cache"),
    Entry("server_homes", "dir", ROOT, ROOT, 0o755, "servers' homes (one directory per server instance)"),
    Entry("gate_cache", "dir", ROOT, GATE_GROUP, 0o750, "gate caches (one directory per agent's gate user)"),
    Entry("broker_toml", "file", ROOT, BROKER_USER, 0o640, "daemon config", made_by="operator", need=0o040),
    Entry("allowlist", "file", ROOT, GATE_GROUP, 0o640, "allowlist", made_by="operator", need=0o040),
    Entry("gate_users", "file", ROOT, BROKER_USER, 0o640, "agents and their gate users", need=0o040),
    Entry("gate_sock", "sock", BROKER_USER, GATE_GROUP, 0o660, "gate socket", made_by="daemon", need=0o020),
    Entry("admin_sock", "sock", BROKER_USER, None, 0o600, "admin socket", made_by="daemon"),
    Entry("pidfile", "file", BROKER_USER, None, 0o644, "pid file", made_by="daemon"),
    Entry("audit_log", "file", BROKER_USER, None, 0o600, "audit log", made_by="daemon"),
    Entry("audit_key", "file", BROKER_USER, None, 0o600, "the key of the audit's argument digests", made_by="daemon"),
    Entry("spawner_log", "file", ROOT, None, 0o600, "the spawner's log", made_by="daemon"),
    Entry("mcp", "file", ROOT, None, 0o755, "agent command", need=0o005),
    Entry("gate", "file", ROOT, None, 0o755, "gate command", need=0o005),
    Entry("brokerd", "link", ROOT, None, 0o777, "daemon command"),
    Entry("brokerctl", "link", ROOT, None, 0o777, "admin command"),
    Entry("sudoers", "file", ROOT, ROOT, 0o440, "sudoers drop-in", need=0o440),
)

#: What the files inside a directory must look like (a directory inside gets the execute bits its mode implies).
CHILDREN: tuple[Entry, ...] = (
    Entry("servers_d", "file", ROOT, BROKER_USER, 0o640, "server definitions", "operator", 0o040, ".toml"),
    Entry("allowlist_d", "file", ROOT, GATE_GROUP, 0o640, "per-user allowlist", "operator", 0o040, ".txt"),
    Entry("secrets", "file", ROOT, None, 0o600, "secret", "operator", 0o400, ""),
    Entry("state", "file", BROKER_USER, None, 0o600, "state", "daemon", 0, ""),
    Entry("log", "file", BROKER_USER, None, 0o600, "log", "daemon", 0, ""),
    Entry("server_homes", "dir", "+", None, 0o700, "a server instance's home (its own user's)", "daemon", 0o700, ""),
    Entry("gate_cache", "dir", "*", GATE_GROUP, 0o700, "an agent's gate cache", "install", 0o700, ""),
)


def entry(attr: str) -> Entry:
    """The table's entry for one path of :class:`Paths`."""
    for e in PATHS:
        if e.attr == attr:
            return e
    raise KeyError(attr)


def child(attr: str) -> Entry:
    """The rule for files inside the directory ``attr``."""
    for e in CHILDREN:
        if e.attr == attr:
            return e
    raise KeyError(attr)
