"""Every filesystem location mcp-privsep uses, derived from one root.

The root is ``/`` in production. Tests and staged installs pass another root
to ``mcp-brokerctl install --root``, which bakes it into the generated
``mcp-gate`` script: the agent can never choose it (sudo resets the
environment and the gate accepts no flag that names a path).

Two layouts put the code and the commands in different places (config,
state, logs and sockets are the same in both):

* ``source`` (``make install``, ``mcp-brokerctl install`` from a venv): the
  code in ``/opt/mcp-privsep/venv``, the commands in ``/usr/local/bin`` and
  ``/usr/local/sbin``, all written by ``install``;
* ``deb`` (the Debian package): the code in ``/usr/lib/mcp-privsep/venv`` and
  the commands in ``/usr/bin`` and ``/usr/sbin``, every file shipped in the
  ``.deb`` (``dpkg -S`` and ``dpkg --verify`` know them); ``install`` writes
  only the agents' table that ``/usr/bin/mcp`` reads, ``/etc/mcp-privsep/mcp.sh``.

The layout is the code's own location: this module running from the
package's venv under the root (``ROOT/usr/lib/mcp-privsep/``) is the ``deb``
layout, anything else is ``source``; a caller may name it (tests do).
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
#: the Debian package's code (a dpkg-owned virtualenv in it); its commands are in /usr/bin and /usr/sbin
PACKAGE_LIB = "/usr/lib/mcp-privsep"
#: a source install's code (``make install``); its commands are in /usr/local/bin and /usr/local/sbin
SOURCE_OPT = "/opt/mcp-privsep"
LAYOUTS = ("source", "deb")


def code_layout(root: str = "/") -> str:
    """``"deb"`` when this code runs from the Debian package's virtualenv under ``root``, else ``"source"``."""
    prefix = ("" if root.rstrip("/") in ("", "/") else root.rstrip("/")) + PACKAGE_LIB + "/"
    return "deb" if __file__.startswith(prefix) else "source"


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
        "layout",
        "log",
        "mcp",
        "mcp_shim",
        "opt",
        "pidfile",
        "root",
        "run",
        "sbin",
        "secrets",
        "server_homes",
        "server_packages",
        "servers_d",
        "spawner_log",
        "state",
        "venv",
    )

    def __init__(self, root: str = "/", layout: str | None = None) -> None:
        root = root.rstrip("/") or "/"
        if not root.startswith("/"):
            raise ValueError(f"root must be an absolute path: {root!r}")
        layout = layout or code_layout(root)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}: {layout!r}")
        self.root = root
        self.layout = layout
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
        #: servers installed by `mcp-brokerctl server add`, one root-owned prefix each (hidden; each sees its own)
        self.server_packages = p + "/var/lib/mcp-privsep-packages"
        self.audit_log = self.log + "/audit.jsonl"
        self.cache = p + "/var/cache/mcp-privsep"
        self.gate_cache = self.cache + "/gate"
        #: the code's directory (the virtualenv is in it)
        self.opt = p + (PACKAGE_LIB if layout == "deb" else SOURCE_OPT)
        self.venv = self.opt + "/venv"
        self.bin = p + ("/usr/bin" if layout == "deb" else "/usr/local/bin")
        self.sbin = p + ("/usr/sbin" if layout == "deb" else "/usr/local/sbin")
        self.mcp = self.bin + "/mcp"
        self.gate = self.sbin + "/mcp-gate"
        self.brokerd = self.sbin + "/mcp-brokerd"
        self.brokerctl = self.sbin + "/mcp-brokerctl"
        #: where install writes the agent shim: the mcp command itself, or the table the package's mcp reads
        self.mcp_shim = self.etc + "/mcp.sh" if self.package_commands else self.mcp

    @property
    def package_commands(self) -> bool:
        """Whether the commands and the code are the Debian package's (dpkg owns them; install never writes them).

        Only at the real root: a staged root of the package layout (tests) gets
        commands written by install, with the staging root baked in.
        """
        return self.layout == "deb" and self.root == "/"

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

    def server_package(self, name: str) -> str:
        """The prefix a server installed by ``server add`` runs from (root's; its read_paths, read-only)."""
        return f"{self.server_packages}/{name}"

    def hidden_from_servers(self) -> tuple[str, ...]:
        """Directories no server may see: the broker's own, every server's home and package (each sees its own)."""
        return (self.etc, self.state, self.log, self.run, self.cache, self.server_homes, self.server_packages)

    def gate_cache_of(self, agent: str) -> str:
        """The gate's cache directory for one agent (its gate user's own)."""
        return f"{self.gate_cache}/{agent}"

    def user_allowlist(self, user: str) -> str:
        """Per-caller allowlist; the caller name was validated by the caller."""
        return f"{self.allowlist_d}/{user}.txt"
