"""``mcp-brokerctl check``: every problem of the allowlists and the config, offline (like ``visudo -c``).

Besides what the daemon checks when it loads its config, ``check`` (root)
checks what the spawner checks when it starts a server: each env file is
root's and 0600, every ``${VAR}`` is defined, no secret is on a command
line, and each server's account may run it (not root, not one of
mcp-privsep's own users, no login shell, not shared with another server).
"""

from __future__ import annotations

from broker.core import agents as agent_map
from broker.core import allowlist
from broker.core import servers as core_servers
from broker.core.errors import ConfigError
from broker.core.paths import Paths
from broker.daemon import config


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
    for instance, why in core_servers.account_problems(found, agents, missing_ok=True).items():
        defn = found[instance.partition("@")[0]]
        problems.append(f"{defn.source}: servers.{defn.name}: {instance}: {why}")
    return problems
