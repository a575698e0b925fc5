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

Warnings (:func:`check_warnings`) are apart from problems: they never make
the config invalid (``check`` still exits 0). Each is an env-file value that
looks like a plain setting (short, a common word, a number, a path, a URL
without credentials, a host): the broker redacts every env-file value from
everything agents see, so such a value blanks ordinary words out of results.
A warning names the server, the env file and the key, never the value.
"""

from __future__ import annotations

from broker.core import agents as agent_map
from broker.core import allowlist
from broker.core import servers as core_servers
from broker.core.errors import ConfigError
from broker.core.paths import Paths
from broker.daemon import config
from broker.daemon.redact import MIN_SECRET_LENGTH


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


def check_warnings(paths: Paths, owners: frozenset[int] = frozenset({0})) -> list[str]:
    """Env-file values that look like plain settings, one line each (key names only, never a value).

    An env file that cannot be read is left to :func:`check_all`, which
    reports it as a problem; ``owners`` are the uids an env file may belong
    to (root's; tests pass their own).
    """
    try:
        agents = list(agent_map.load(paths.gate_users))
    except ConfigError:
        agents = []
    found, _sandbox, _problems = core_servers.load(paths)
    warnings: list[str] = []
    for defn in found.values():
        files = [defn.env_file] if defn.env_file else []
        if defn.per_caller:
            files += [f for f in (core_servers.instance_env_file(paths, defn, a) for a in agents) if f]
        for path in files:
            try:
                env = core_servers.read_env_file(path, owners)
            except ConfigError:
                continue
            for key, value in env.items():
                why = core_servers.plain_setting(value)
                if why is not None:
                    warnings.append(_plain_warning(defn, path, key, value, why))
    return warnings


def _plain_warning(defn: core_servers.ServerDef, path: str, key: str, value: str, why: str) -> str:
    if len(value) < MIN_SECRET_LENGTH:
        harm = "too short to be redacted at all, so it is no secret to the broker"
    else:
        harm = "every env-file value is a secret the broker blanks out of every result agents see"
    if defn.command is not None:
        fix = f'if it is a plain setting, move it to env = {{ {key} = "..." }} in {defn.source}'
    else:
        fix = f"if it is a plain setting, write it into url or headers of {defn.source} instead of ${{{key}}}"
    return f"{defn.source}: servers.{defn.name}: env_file {path}: the value of {key} is {why} ({harm}); {fix}"
