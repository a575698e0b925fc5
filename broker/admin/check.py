"""``mcp-brokerctl check``: every problem of the allowlists and the config, offline (like ``visudo -c``).

Besides what the daemon checks when it loads its config, ``check`` (root)
checks what the spawner checks when it starts a server: each env file is
root's and 0600, every ``${VAR}`` is defined, no secret is on a command
line, and each server's account may run it (not root, not one of
mcp-privsep's own users, no login shell, not shared with another server).
A bundled files server's root (read-only or read-write) may not be, lie
inside or hold one of the broker's own directories: those a server never
sees (:meth:`Paths.hidden_from_servers`: its config and secrets, state,
logs and audit trail, sockets, caches, the servers' homes) and its code
(``/opt/mcp-privsep``, the venv); a root in the server's own home is fine.
"""

from __future__ import annotations

from broker.core import agents as agent_map
from broker.core import allowlist
from broker.core import servers as core_servers
from broker.core.errors import ConfigError
from broker.core.paths import Paths
from broker.daemon import config


def broker_dirs(paths: Paths) -> tuple[str, ...]:
    """The broker's own directories, which no files server root may overlap: the hidden ones and its code."""
    return (*paths.hidden_from_servers(), paths.opt)


def check_all(paths: Paths) -> list[str]:
    """Every problem in the allowlists and the config, each as ``file:line:col: message`` where known."""
    problems = allowlist.check_all(paths.allowlist, paths.allowlist_d)
    try:
        config.load(paths)
    except ConfigError as exc:
        problems.extend(exc.problems)
    try:
        agents = agent_map.load(paths.gate_users)
    except ConfigError as exc:
        problems.extend(exc.problems)
        agents = {}
    found, _sandbox, _reported = core_servers.load(paths)  # its problems are config.load's, reported above
    for defn in found.values():
        try:
            core_servers.resolve(defn, paths, list(agents) if defn.per_caller else [])
        except ConfigError as exc:
            problems.extend(exc.problems)
    own = broker_dirs(paths)
    for defn in found.values():
        homes = tuple(
            paths.server_home(core_servers.instance_name(defn.name, agent))
            for agent in (list(agents) if defn.per_caller else [None])
        )
        for why in core_servers.files_root_clashes(defn.args, own, homes):
            problems.append(f"{defn.source}: servers.{defn.name}: {why}")
    for instance, why in core_servers.account_problems(found, agents, missing_ok=True).items():
        defn = found[instance.partition("@")[0]]
        problems.append(f"{defn.source}: servers.{defn.name}: {instance}: {why}")
    return problems
