"""``mcp-brokerctl install``: users, directories, commands, sudoers, examples.

Idempotent and additive: running it again (say, to add an agent) never
touches an operator's existing config, allowlists or secrets. Each agent
gets its own gate user (``mcp-gate-AGENT``, group ``mcp-gate``, locked, no
shell), its line in the map the daemon names callers by (``gate-users``), its
row in the ``mcp`` shim's table and its one sudoers rule. The sudoers drop-in
is validated with ``visudo -cf`` before it is moved into place.

An installation of the first version (one shared ``mcp-gate`` user, rules
``AGENT ALL=(mcp-gate) ...``) is migrated in place by the same run: every
agent found in the drop-in gets its gate user, map line and new rule, and
the old rule is gone.
"""

from __future__ import annotations

import grp
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass, field

from broker.core import agents as agent_map
from broker.core import layout
from broker.core.errors import EX_FAILED, ConfigError, PrivsepError
from broker.core.names import valid_user_name
from broker.core.paths import BROKER_USER, GATE_GROUP, GATE_USER, Paths, gate_user_for

NOLOGIN = "/usr/sbin/nologin"
SUDOERS_MARK = "# mcp-privsep agent: "


@dataclass
class Report:
    """What install did, for the operator."""

    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


def _run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise PrivsepError(f"{' '.join(cmd)} failed: {(proc.stderr or proc.stdout).strip()}", EX_FAILED)


def ensure_system_user(name: str, home: str, report: Report) -> pwd.struct_passwd:
    """A locked system user with no shell and its own group."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        pass
    _run(["useradd", "--system", "--user-group", "--no-create-home", "--home-dir", home, "--shell", NOLOGIN, name])
    _run(["usermod", "--lock", name])
    report.add(f"created system user {name}")
    return pwd.getpwnam(name)


def ensure_gate_user(agent: str, report: Report) -> pwd.struct_passwd:
    """The agent's own gate user: a locked system user in group mcp-gate, with no home and no shell."""
    name = gate_user_for(agent)
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        group = grp.getgrnam(GATE_GROUP).gr_gid
        _run(["useradd", "--system", "--gid", str(group), "--no-create-home", "--home-dir", "/nonexistent",
              "--shell", NOLOGIN, name])  # fmt: skip
        _run(["usermod", "--lock", name])
        report.add(f"created gate user {name} for agent {agent}")
        return pwd.getpwnam(name)
    if pw.pw_gid != grp.getgrnam(GATE_GROUP).gr_gid:
        raise ConfigError(f"user {name} exists but its group is not {GATE_GROUP}: it cannot be {agent}'s gate user")
    return pw


def ensure_group_member(user: str, group: str, report: Report) -> None:
    if user in grp.getgrnam(group).gr_mem:
        return
    _run(["usermod", "--append", "--groups", group, user])
    report.add(f"added {user} to group {group}")


def owner_ids(e: layout.Entry) -> tuple[int, int, int]:
    """(uid, gid, mode) an entry of the layout table asks for; "any group" is the owner's own."""
    owner = pwd.getpwnam(e.owner)
    gid = grp.getgrnam(e.group).gr_gid if e.group is not None else owner.pw_gid
    return owner.pw_uid, gid, e.mode


def ensure_dir(path: str, uid: int, gid: int, mode: int) -> None:
    os.makedirs(path, mode=0o755, exist_ok=True)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


def write_new(path: str, text: str, uid: int, gid: int, mode: int, report: Report) -> bool:
    """Write ``path`` only if it does not exist; return whether it was written."""
    if os.path.lexists(path):
        return False
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    report.add(f"wrote {path}")
    return True


def replace_file(path: str, text: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    """Atomically put ``text`` at ``path`` (write, fsync, rename)."""
    directory = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".mcp-privsep.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chown(tmp, uid, gid)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def site_packages(venv: str) -> str:
    return sysconfig.get_path("purelib", vars={"base": venv, "platbase": venv})


def gate_script(paths: Paths, venv: str, broker_uid: int) -> str:
    return f'''#!/usr/bin/python3 -IS
"""mcp-gate: generated by 'mcp-brokerctl install'; do not edit (re-run install)."""
import sys
sys.path.append({site_packages(venv)!r})
from broker.gate.verbs import run
run(root={paths.root!r}, broker_uid={broker_uid})
'''


def agent_shim(paths: Paths, venv: str, mapping: dict[str, str]) -> str:
    """The ``mcp`` script, with its table of agent uid -> gate user (agents without a user yet are left out)."""
    from agent import render

    table = {}
    for agent, gate in mapping.items():
        try:
            table[pwd.getpwnam(agent).pw_uid] = gate
        except KeyError:
            continue
    return render(table, paths.gate, os.path.join(site_packages(venv), "agent", "helper.py"))


def sudoers_rule(paths: Paths, agent: str, gate: str) -> str:
    return f"{agent} ALL=({gate}) NOPASSWD: {paths.gate}"


def sudoers_text(paths: Paths, mapping: dict[str, str]) -> str:
    lines = [
        "# mcp-privsep: generated by 'mcp-brokerctl install'; edit with 'mcp-brokerctl install --agent USER'.",
        "# Each agent may run exactly one command, as its own gate user, with sudo's default environment reset.",
    ]
    for agent, gate in mapping.items():
        lines.append(f"{SUDOERS_MARK}{agent}")
        lines.append(sudoers_rule(paths, agent, gate))
    return "\n".join(lines) + "\n"


def sudoers_agents(path: str) -> list[str]:
    try:
        with open(path, encoding="utf-8") as fh:
            return [line[len(SUDOERS_MARK) :].strip() for line in fh if line.startswith(SUDOERS_MARK)]
    except FileNotFoundError:
        return []


def install_sudoers(paths: Paths, mapping: dict[str, str], report: Report) -> None:
    """Write the drop-in for exactly these agents (visudo-checked first); unchanged text is left alone."""
    visudo = shutil.which("visudo") or "/usr/sbin/visudo"
    if not os.path.exists(visudo):
        raise PrivsepError("sudo is not installed (apt-get install -y sudo)", EX_FAILED)
    target = paths.sudoers
    text = sudoers_text(paths, mapping)
    try:
        with open(target, encoding="utf-8") as fh:
            if fh.read() == text:
                return
    except FileNotFoundError:
        pass
    # a dot in the name makes sudo ignore the file while it is being validated
    fd, tmp = tempfile.mkstemp(dir="/etc/sudoers.d", prefix=".mcp-privsep.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, layout.entry("sudoers").mode)
        proc = subprocess.run([visudo, "-cf", tmp], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise PrivsepError(f"visudo rejected the sudoers drop-in: {(proc.stdout + proc.stderr).strip()}", EX_FAILED)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    report.add(f"sudoers drop-in {target}: " + ", ".join(f"{a} as {g}" for a, g in mapping.items()))


def install_agents(paths: Paths, agents: list[str], report: Report) -> dict[str, str]:
    """Every agent (the map's, the drop-in's of any version, and ``agents``) with its own gate user, map line
    and gate cache; returns agent -> gate user."""
    try:
        mapping = agent_map.load(paths.gate_users)
    except ConfigError as exc:
        raise ConfigError(f"{exc.message} (fix or remove it; install rewrites it from the sudoers drop-in)") from None
    known = list(mapping)
    for agent in [*sudoers_agents(paths.sudoers), *agents]:  # the drop-in of the first version counts too
        if agent not in mapping and valid_user_name(agent):
            try:
                pwd.getpwnam(agent)
            except KeyError:
                report.add(f"agent {agent} of the sudoers drop-in no longer exists; left out")
                continue
            mapping[agent] = gate_user_for(agent)
    cache = layout.child("gate_cache")
    for agent, gate in mapping.items():
        pw = ensure_gate_user(agent, report) if gate == gate_user_for(agent) else pwd.getpwnam(gate)
        ensure_dir(paths.gate_cache_of(agent), pw.pw_uid, pw.pw_gid, cache.mode)
    if list(mapping) != known or not os.path.exists(paths.gate_users):
        uid, gid, mode = owner_ids(layout.entry("gate_users"))
        replace_file(paths.gate_users, agent_map.render(mapping), mode, uid, gid)
        added = [a for a in mapping if a not in known]
        report.add(f"wrote {paths.gate_users}" + (f": added {', '.join(added)}" if added else ""))
    for name in os.listdir(paths.gate_cache):  # the first version's markers lay here, owned by the shared user
        full = f"{paths.gate_cache}/{name}"
        if name.startswith("valid-") and os.path.isfile(full) and not os.path.islink(full):
            os.unlink(full)
    return mapping


EXAMPLE_BROKER_TOML = """\
# mcp-privsep broker configuration. Servers may also be added as
# {servers_d}/NAME.toml files with the same [servers.NAME] tables.

[broker]
call_timeout = 30          # seconds a call may take unless the caller asks for less
max_call_timeout = 300     # cap on 'mcp call --timeout'
max_output_bytes = 1048576 # longer results are truncated, and say so

[servers.demo]
command = "{python}"
args = ["-m", "mcp_servers.demo"]
env_file = "{secrets}/demo.env"
"""

EXAMPLE_ALLOWLIST = """\
# mcp-privsep allowlist: one server.tool per line, compared as a whole string.
# No wildcards; 'mcp-brokerctl allow SERVER.TOOL' edits this file safely.
# A per-agent file in allowed-actions.d/USER.txt replaces this one for USER.

# demo server
demo.echo
demo.whoami
demo.add
#demo.secret   - never: it returns the server's credential
"""


def install(paths: Paths, agents: list[str], venv: str | None = None) -> Report:
    """Install or update mcp-privsep under ``paths``; see the module docstring."""
    if os.geteuid() != 0:
        raise PrivsepError("install must run as root", EX_FAILED)
    for agent in agents:
        if not valid_user_name(agent):
            raise ConfigError(f"agent name {agent!r} is not a valid user name")
        try:
            pwd.getpwnam(agent)
        except KeyError:
            raise ConfigError(
                f"agent user {agent!r} does not exist (create it first, e.g. useradd -m {agent})"
            ) from None
        if agent in ("root", GATE_USER, BROKER_USER) or agent.startswith(("mcp-gate-", "mcp-srv-")):
            raise ConfigError(f"{agent!r} cannot be an agent (it is one of mcp-privsep's own users)")
    venv = venv or sys.prefix
    report = Report()
    ensure_system_user(GATE_USER, "/nonexistent", report)
    broker = ensure_system_user(BROKER_USER, "/var/lib/mcp-privsep", report)
    # the broker re-reads the allowlist, which only root and the gate users' group may read
    ensure_group_member(BROKER_USER, GATE_GROUP, report)

    for parent in (
        paths.root,
        os.path.dirname(paths.etc),
        os.path.dirname(paths.run),
        os.path.dirname(paths.state),
        os.path.dirname(paths.log),
        paths.bin,
        paths.sbin,
    ):
        os.makedirs(parent, mode=0o755, exist_ok=True)
    for e in layout.PATHS:
        if e.kind == "dir" and e.made_by == "install":
            ensure_dir(e.path(paths), *owner_ids(e))

    python = os.path.join(venv, "bin", "python")
    example = EXAMPLE_BROKER_TOML.format(python=python, secrets=paths.secrets, servers_d=paths.servers_d)
    write_new(paths.broker_toml, example, *owner_ids(layout.entry("broker_toml")), report)
    write_new(paths.allowlist, EXAMPLE_ALLOWLIST, *owner_ids(layout.entry("allowlist")), report)
    write_new(
        f"{paths.secrets}/demo.env",
        f"# secrets of the demo server\nDEMO_SECRET=demo-{secrets.token_hex(16)}\nDEMO_TOKEN={secrets.token_hex(24)}\n",
        *owner_ids(layout.child("secrets")),
        report,
    )

    mapping = install_agents(paths, agents, report)
    replace_file(paths.gate, gate_script(paths, venv, broker.pw_uid), layout.entry("gate").mode)
    replace_file(paths.mcp, agent_shim(paths, venv, mapping), layout.entry("mcp").mode)
    for name, target in ((paths.brokerd, "mcp-brokerd"), (paths.brokerctl, "mcp-brokerctl")):
        link = os.path.join(venv, "bin", target)
        if os.path.islink(name) or os.path.exists(name):
            os.unlink(name)
        os.symlink(link, name)
    report.add(f"commands: {paths.mcp}, {paths.gate}, {paths.brokerd}, {paths.brokerctl}")
    if mapping or os.path.exists(paths.sudoers):
        install_sudoers(paths, mapping, report)
    return report
