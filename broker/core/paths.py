"""Every filesystem location mcp-privsep uses, derived from one root.

The root is ``/`` in production. Tests and staged installs pass another root
to ``mcp-brokerctl install --root``, which bakes it into the generated
``mcp-gate`` script: the agent can never choose it (sudo resets the
environment and the gate accepts no flag that names a path).
"""

from __future__ import annotations

#: Unix users and groups of the contract
BROKER_USER = "mcp-broker"
#: the group of every agent's gate user: it reads the allowlist and reaches gate.sock
GATE_GROUP = "mcp-gate"
#: the one shared gate user of the first version; kept as a user, never a caller once agents have their own
GATE_USER = "mcp-gate"
GATE_USER_PREFIX = "mcp-gate-"
#: Linux (useradd) refuses longer user names
MAX_USER_NAME = 32


def gate_user_for(agent: str) -> str:
    """The gate user of ``agent``: ``mcp-gate-AGENT``, or, for a name too long, a cut name with a digest."""
    name = GATE_USER_PREFIX + agent
    if len(name) <= MAX_USER_NAME:
        return name
    import hashlib  # only for long names: the gate never calls this

    digest = hashlib.sha256(agent.encode()).hexdigest()[:8]
    return f"{GATE_USER_PREFIX}{agent[: MAX_USER_NAME - len(GATE_USER_PREFIX) - 9]}-{digest}"


class Paths:
    """Locations under one root (``/`` in production)."""

    __slots__ = (
        "admin_sock",
        "allowlist",
        "allowlist_d",
        "audit_key",
        "audit_log",
        "bin",
        "broker_toml",
        "brokerctl",
        "brokerd",
        "cache",
        "etc",
        "gate",
        "gate_cache",
        "gate_sock",
        "gate_users",
        "log",
        "mcp",
        "opt",
        "pidfile",
        "root",
        "run",
        "sbin",
        "secrets",
        "server_homes",
        "servers_d",
        "spawner_log",
        "state",
        "venv",
    )

    def __init__(self, root: str = "/") -> None:
        root = root.rstrip("/") or "/"
        if not root.startswith("/"):
            raise ValueError(f"root must be an absolute path: {root!r}")
        self.root = root
        p = "" if root == "/" else root
        self.etc = p + "/etc/mcp-privsep"
        self.broker_toml = self.etc + "/broker.toml"
        self.servers_d = self.etc + "/servers.d"
        self.allowlist = self.etc + "/allowed-actions.txt"
        self.allowlist_d = self.etc + "/allowed-actions.d"
        self.secrets = self.etc + "/secrets"
        #: AGENT -> gate user, one per line; root writes it (install --agent), the daemon reads it
        self.gate_users = self.etc + "/gate-users"
        self.run = p + "/run/mcp-privsep"
        self.gate_sock = self.run + "/gate.sock"
        self.admin_sock = self.run + "/admin.sock"
        self.pidfile = self.run + "/mcp-brokerd.pid"
        self.state = p + "/var/lib/mcp-privsep"
        self.audit_key = self.state + "/audit.key"
        self.log = p + "/var/log/mcp-privsep"
        self.spawner_log = self.log + "/spawner.log"
        #: each server's own home (its user's, 0700), outside the broker's state: root's directory, 0755
        self.server_homes = p + "/var/lib/mcp-privsep-servers"
        self.audit_log = self.log + "/audit.jsonl"
        self.cache = p + "/var/cache/mcp-privsep"
        self.gate_cache = self.cache + "/gate"
        self.opt = p + "/opt/mcp-privsep"
        self.venv = self.opt + "/venv"
        self.bin = p + "/usr/local/bin"
        self.sbin = p + "/usr/local/sbin"
        self.mcp = self.bin + "/mcp"
        self.gate = self.sbin + "/mcp-gate"
        self.brokerd = self.sbin + "/mcp-brokerd"
        self.brokerctl = self.sbin + "/mcp-brokerctl"

    @property
    def sudoers(self) -> str:
        """The sudoers drop-in; always under the real /etc/sudoers.d.

        sudo ignores drop-in names containing a dot, so a staged root gets a
        hex suffix rather than its path.
        """
        if self.root == "/":
            return "/etc/sudoers.d/mcp-privsep"
        import hashlib  # not at module level: the gate imports this module

        digest = hashlib.sha256(self.root.encode()).hexdigest()[:12]
        return f"/etc/sudoers.d/mcp-privsep-{digest}"

    def server_home(self, instance: str) -> str:
        """The home of one server instance (``NAME`` or ``NAME@AGENT``, validated by the caller)."""
        return f"{self.server_homes}/{instance}"

    def hidden_from_servers(self) -> tuple[str, ...]:
        """Directories no server may see: the broker's own, and every server's home (each sees its own)."""
        return (self.etc, self.state, self.log, self.run, self.cache, self.server_homes)

    def gate_cache_of(self, agent: str) -> str:
        """The gate's cache directory for one agent (its gate user's own)."""
        return f"{self.gate_cache}/{agent}"

    def user_allowlist(self, user: str) -> str:
        """Per-caller allowlist; the caller name was validated by the caller."""
        return f"{self.allowlist_d}/{user}.txt"
