"""Every filesystem location mcp-privsep uses, derived from one root.

The root is ``/`` in production. Tests and staged installs pass another root
to ``mcp-brokerctl install --root``, which bakes it into the generated
``mcp-gate`` script: the agent can never choose it (sudo resets the
environment and the gate accepts no flag that names a path).
"""

from __future__ import annotations

#: Unix users of the contract
GATE_USER = "mcp-gate"
BROKER_USER = "mcp-broker"


class Paths:
    """Locations under one root (``/`` in production)."""

    __slots__ = (
        "admin_sock",
        "allowlist",
        "allowlist_d",
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
        "log",
        "mcp",
        "opt",
        "pidfile",
        "root",
        "run",
        "sbin",
        "secrets",
        "servers_d",
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
        self.run = p + "/run/mcp-privsep"
        self.gate_sock = self.run + "/gate.sock"
        self.admin_sock = self.run + "/admin.sock"
        self.pidfile = self.run + "/mcp-brokerd.pid"
        self.state = p + "/var/lib/mcp-privsep"
        self.log = p + "/var/log/mcp-privsep"
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

    def user_allowlist(self, user: str) -> str:
        """Per-caller allowlist; the caller name was validated by the caller."""
        return f"{self.allowlist_d}/{user}.txt"
