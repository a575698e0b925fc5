"""``mcp-brokerctl doctor``: check a live installation from outside and from the agent's side.

Read-only. Every problem becomes one :class:`Finding` with what is wrong and
the command that fixes it; the CLI prints one line each and exits 1 when
there is any problem (warnings alone keep exit 0).

What is checked:

* **files**: owner, group and mode of every path of :class:`broker.paths.Paths`
  (the README's table), every allowlist, TOML and secret file, the state and
  log files, the commands, and every file of the code's virtualenv (the gate
  and the daemon run it: a writable file there is a way around everything);
  every ancestor directory must be root's and not writable by others (a
  root-owned sticky directory such as /tmp is accepted);
* **installed servers**: each prefix ``server add`` installed still holds
  what it recorded (every file's digest, root's, not writable by others),
  a warning otherwise;
* **config**: the allowlists and ``broker.toml``/``servers.d`` parse (like
  ``mcp-brokerctl check``);
* **sudoers**: the drop-in exists, is ``root:root 0440``, passes ``visudo -cf``,
  holds exactly one ``AGENT ALL=(mcp-gate-AGENT) NOPASSWD: GATE`` rule per agent (its own gate user)
  marker and nothing else (no wildcard, no SETENV, no env_keep, no
  Defaults, no include), and ``sudo -l -U AGENT`` shows the agent no other
  sudo right from any other sudoers file;
* **as each agent** (``runuser``, the agent's real groups): it cannot read
  the config, secrets, allowlists, state or audit log, cannot list the
  secrets directory, cannot write the allowlist, the commands or the code,
  cannot connect to ``gate.sock`` or ``admin.sock``, cannot signal the
  daemon; and ``mcp status`` through sudo does work;
* **the daemon**: it answers on ``admin.sock``, runs as ``mcp-broker``, its
  audit log is healthy, every server is up, no pinned tool definition has
  changed, no server definition changed on disk without a reload (a warning).
"""

from __future__ import annotations

import grp
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.admin import sandbox_view
from broker.admin.check import check_all, check_warnings
from broker.admin.install import SUDOERS_MARK
from broker.core import agents as agent_map
from broker.core import layout, names
from broker.core import servers as core_servers
from broker.core.errors import ConfigError, PrivsepError
from broker.core.paths import BROKER_USER, GATE_GROUP, GATE_USER, SOURCE_OPT, Paths, gate_user_for
from broker.daemon import config

RUNUSER = "/usr/sbin/runuser"
SYSTEM_PYTHON = "/usr/bin/python3"
AGENT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
MAX_LISTED = 5

#: run as the agent: try each access, report "ok" or the errno name; never writes a byte
PROBE = r"""
import errno, json, os, socket, sys
out = []
for how, target in json.load(sys.stdin):
    try:
        if how == "read":
            os.close(os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW))
        elif how == "list":
            os.listdir(target)
        elif how == "write":
            os.close(os.open(target, os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOFOLLOW))
        elif how == "create_in":
            name = os.path.join(target, ".mcp-privsep-doctor-%d" % os.getpid())
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            os.unlink(name)
        elif how == "connect":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            try:
                s.connect(target)
            finally:
                s.close()
        elif how == "signal":
            os.kill(int(target), 0)
        out.append("ok")
    except OSError as exc:
        out.append(errno.errorcode.get(exc.errno or 0, str(exc)))
json.dump(out, sys.stdout)
"""


@dataclass
class Finding:
    """One result: ``level`` is "ok", "warning" or "problem"."""

    level: str
    section: str
    message: str
    fix: str = ""

    def line(self) -> str:
        tag = {"ok": "ok     ", "warning": "WARNING", "problem": "PROBLEM"}[self.level]
        fix = f"  -> fix: {self.fix}" if self.fix and self.level != "ok" else ""
        return f"{tag} {self.section}: {self.message}{fix}"


@dataclass
class Rule:
    """What a path must look like."""

    path: str
    kind: str  # "dir", "file", "sock", "any"
    owner: str
    group: str | None
    forbid: int  # mode bits that must be clear
    need: int = 0  # mode bits that must be set
    why: str = ""
    mode: int | None = None  # the mode the fix command sets
    made_by: str = "install"  # "daemon": missing while the daemon never ran, which is no problem here


def _uid(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def _gid(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def _name_of_uid(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _name_of_gid(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


class Doctor:
    """Runs every check and collects :class:`Finding` objects."""

    def __init__(
        self,
        paths: Paths,
        agents: list[str] | None = None,
        admin: Callable[..., Any] | None = None,
    ) -> None:
        self.paths = paths
        self.findings: list[Finding] = []
        self.admin = admin
        self.explicit_agents = agents or []
        self.status: dict[str, Any] | None = None

    # --- recording ------------------------------------------------------------------

    def problem(self, section: str, message: str, fix: str = "") -> None:
        self.findings.append(Finding("problem", section, message, fix))

    def warning(self, section: str, message: str, fix: str = "") -> None:
        self.findings.append(Finding("warning", section, message, fix))

    def ok(self, section: str, message: str) -> None:
        self.findings.append(Finding("ok", section, message))

    @property
    def problems(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "problem"]

    def run(self) -> list[Finding]:
        """Every check, in order; returns all findings."""
        self.check_users()
        self.check_host()
        self.check_files()
        self.check_package()
        self.check_installed_servers()
        self.check_config()
        agents = self.check_sudoers()
        self.check_daemon()
        for agent in agents:
            self.check_agent(agent)
        return self.findings

    # --- servers installed by 'server add' ------------------------------------------------

    def check_installed_servers(self) -> None:
        """Each prefix 'server add' installed is as it left it (the digest of every file, owners, modes)."""
        from broker.admin.server_install import verify_all

        for level, message, fix in verify_all(self.paths):
            if level == "ok":
                self.ok("servers", message)
            else:
                self.warning("servers", message, fix)

    # --- users ----------------------------------------------------------------------

    def check_users(self) -> None:
        missing = [u for u in (GATE_USER, BROKER_USER) if _uid(u) is None]
        if missing:
            self.problem("users", f"missing system user(s) {', '.join(missing)}", "mcp-brokerctl install")
            return
        try:
            mapping = agent_map.load(self.paths.gate_users)
        except ConfigError as exc:
            self.problem("users", f"{exc.message}: no agent can call", "mcp-brokerctl install (rewrites it)")
            mapping = {}
        gate_users = [g for g in mapping.values() if _uid(g) is not None]
        for agent, gate in mapping.items():
            if _uid(gate) is None:
                self.problem("users", f"gate user {gate} of agent {agent} is missing", "mcp-brokerctl install")
            elif pwd.getpwnam(gate).pw_gid != _gid(GATE_GROUP):
                self.problem(
                    "users",
                    f"gate user {gate} is not in group {GATE_GROUP} (it cannot read the allowlist)",
                    f"usermod --gid {GATE_GROUP} {gate}",
                )
        accounts = (GATE_USER, BROKER_USER, *gate_users)
        for user in _unlocked_users(accounts):
            self.problem("users", f"{user} has a usable password (it must be locked)", f"usermod --lock {user}")
        for user in accounts:
            pw = pwd.getpwnam(user)
            if pw.pw_shell not in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false"):
                self.problem(
                    "users", f"{user} has a login shell ({pw.pw_shell})", f"usermod --shell /usr/sbin/nologin {user}"
                )
            if pw.pw_uid == 0:
                self.problem("users", f"{user} has uid 0", f"give {user} its own system uid")
        if len({_uid(u) for u in gate_users}) != len(gate_users):
            self.problem("users", "two agents share a gate user's uid", "give each gate user its own uid")
        members = grp.getgrnam(GATE_GROUP).gr_mem
        if BROKER_USER not in members:
            self.problem(
                "users",
                f"{BROKER_USER} is not in group {GATE_GROUP} (the daemon cannot re-read the allowlist)",
                f"usermod --append --groups {GATE_GROUP} {BROKER_USER}",
            )
        extra = [m for m in members if m != BROKER_USER]
        if extra:
            self.problem(
                "users",
                f"group {GATE_GROUP} has other members ({', '.join(extra)}): they can read the allowlist "
                "and connect to gate.sock, bypassing sudo",
                f"gpasswd --delete USER {GATE_GROUP}",
            )
        if not self.problems:
            self.ok(
                "users",
                f"{BROKER_USER} and {len(gate_users)} agent gate user(s) are locked system users in their groups",
            )
        self.check_hidepid()

    def check_hidepid(self) -> None:
        """Defence in depth: with hidepid, one agent cannot even see another's processes (their command lines)."""
        try:
            with open("/proc/mounts", encoding="utf-8", errors="replace") as fh:
                mounts = [line.split() for line in fh]
        except OSError:
            return
        options = next((m[3] for m in mounts if len(m) > 3 and m[1] == "/proc"), "")
        if any(o in options.split(",") for o in ("hidepid=invisible", "hidepid=2", "hidepid=noaccess", "hidepid=1")):
            self.ok("users", f"/proc is mounted with {options}: agents cannot see other users' processes")
        else:
            self.warning(
                "users",
                "/proc is mounted without hidepid: every user sees every process (call arguments never go on a "
                "command line, but an agent's own shim shows its argv until it execs)",
                "mount -o remount,hidepid=invisible /proc (and in /etc/fstab: proc /proc proc hidepid=invisible 0 0)",
            )

    # --- the host and the package ---------------------------------------------------------

    def check_host(self) -> None:
        """sudo's "unable to resolve host" warning lands on the stderr of every agent's call."""
        sudo = shutil.which("sudo")
        if sudo is None:
            return
        try:
            proc = subprocess.run([sudo, "-n", "true"], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return
        noise = [line for line in proc.stderr.splitlines() if "unable to resolve host" in line]
        if noise:
            host = socket.gethostname()
            self.warning(
                "host",
                f"sudo prints '{noise[0].strip()[:200]}' on every agent call's stderr",
                f"make the host name resolve: echo '127.0.1.1 {host}' >> /etc/hosts",
            )

    def check_package(self) -> None:
        """The Debian package's code and commands as dpkg shipped them; what pip added to its venv; leftovers."""
        p = self.paths
        if not p.package_commands:
            return
        old = f"{SOURCE_OPT}/venv"  # the previous package's (built by its postinst), or a source install's
        if os.path.isdir(old):
            self.warning(
                "package",
                f"{old} is not the package's code: a server whose command names it runs that old copy",
                f"point those servers at {p.venv}/bin/python (or their own prefix), then: rm -rf {SOURCE_OPT}",
            )
        for cmd in ("/usr/local/bin/mcp", "/usr/local/sbin/mcp-gate"):
            if os.path.lexists(cmd):
                self.warning("package", f"{cmd} is not the package's, and comes first in PATH", f"rm {cmd}")
        try:
            state = _output(["dpkg-query", "-W", "-f", "${db:Status-Status}", "mcp-privsep"])
            if state.strip() != "installed":
                return
            verify, listed = _output(["dpkg", "--verify", "mcp-privsep"]), _output(["dpkg-query", "-L", "mcp-privsep"])
        except (OSError, subprocess.TimeoutExpired):
            return
        # "??5??????   /usr/lib/...": a changed file; conffiles ("c", the init script) are the operator's to edit
        changed = [m[3] for m in re.finditer(r"^(\S+) +(c?) *(/.*)$", verify, re.M) if not m[2]]
        if changed:
            self.warning(
                "package",
                f"{len(changed)} file(s) of the package changed outside dpkg: " + _listed(changed),
                "find out who changed them; then: apt-get install --reinstall mcp-privsep",
            )
        owned = set(listed.splitlines())
        added = []
        for dirpath, dirnames, filenames in os.walk(p.venv):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            added += [f"{dirpath}/{n}" for n in filenames if f"{dirpath}/{n}" not in owned]
        if added:
            self.warning(
                "package",
                f"{len(added)} file(s) in {p.venv} are not the package's (installed into it by hand?); an upgrade "
                "or removal of the package loses them: " + _listed(added),
                "install servers into their own prefix (mcp-brokerctl server add), not into the broker's code",
            )
        if not changed and not added:
            self.ok("package", f"the code in {p.venv} and the commands are as the package shipped them")

    # --- files ----------------------------------------------------------------------

    def rules(self) -> list[Rule]:
        """Every path of the layout table that doctor checks here, and what is inside its directories."""
        p = self.paths
        rules = [
            Rule(e.path(p), e.kind, e.owner, e.group, e.forbid, e.need, e.why, e.mode, e.made_by)
            for e in layout.PATHS
            if e.kind != "link" and e.attr != "sudoers"  # commands: _check_command_link; sudoers: its own section
        ]
        if p.mcp_shim != p.mcp:  # the package's /usr/bin/mcp runs the agents' table install writes
            mcp = layout.entry("mcp")
            why = f"the agents' table {p.mcp} reads"
            rules.append(Rule(p.mcp_shim, "file", mcp.owner, mcp.group, mcp.forbid, mcp.need, why, mcp.mode))
        named = {r.path for r in rules}  # a path the table names itself has its own rule, not its directory's
        for e in layout.CHILDREN:
            directory = e.path(p)
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
            for name in names:
                if name.endswith(e.suffix or "") and not (e.suffix and name.startswith(".")):
                    full = f"{directory}/{name}"
                    if full in named:
                        continue
                    is_dir = os.path.isdir(full) and not os.path.islink(full)
                    mode = e.mode | 0o700 if is_dir else e.mode
                    owner = e.owner
                    if e.owner == "*":
                        owner = self.gate_user(name)
                    elif e.owner == "+":
                        owner = self.server_user(name)
                    rules.append(Rule(full, "any", owner, e.group, 0o7777 & ~mode, e.need, e.why, mode))
        secret = layout.child("secrets")
        for env_file in self._env_files():
            if not env_file.startswith(p.secrets + "/"):
                why = "env file of a server"
                rules.append(Rule(env_file, "file", secret.owner, None, secret.forbid, secret.need, why, secret.mode))
        return rules

    def _env_files(self) -> list[str]:
        try:
            cfg = config.load(self.paths)
        except ConfigError:
            return []
        return sorted({s.spec.env_file for s in cfg.servers.values() if s.spec.env_file})

    def check_path(self, rule: Rule) -> bool:
        """One path against its rule; record problems; return whether it is fine."""
        try:
            st = os.lstat(rule.path)
        except FileNotFoundError:
            if rule.made_by == "daemon" and rule.path != self.paths.audit_log:
                return True  # reported by the daemon check when the daemon is down
            if rule.path == self.paths.audit_log:
                self.warning("files", f"{rule.path} does not exist yet (written on the first decision)")
                return True
            self.problem("files", f"{rule.path} ({rule.why}) is missing", "mcp-brokerctl install")
            return False
        except OSError as exc:
            self.problem("files", f"{rule.path}: {exc.strerror}")
            return False
        ok = True
        want_type = {"dir": stat.S_ISDIR, "file": stat.S_ISREG, "sock": stat.S_ISSOCK}.get(rule.kind)
        if stat.S_ISLNK(st.st_mode):
            self.problem(
                "files", f"{rule.path} ({rule.why}) is a symlink", f"replace it with a real file: rm {rule.path}"
            )
            return False
        if want_type is not None and not want_type(st.st_mode):
            self.problem(
                "files", f"{rule.path} ({rule.why}) is not a {rule.kind}", f"remove it and re-run install: {rule.path}"
            )
            return False
        uid, gid = _uid(rule.owner), _gid(rule.group) if rule.group else None
        owner_text = rule.owner + (f":{rule.group}" if rule.group else "")
        if uid is None or st.st_uid != uid or (rule.group is not None and st.st_gid != gid):
            self.problem(
                "files",
                f"{rule.path} ({rule.why}) is owned by {_name_of_uid(st.st_uid)}:{_name_of_gid(st.st_gid)}, "
                f"expected {owner_text}",
                f"chown {owner_text} {rule.path}",
            )
            ok = False
        mode = stat.S_IMODE(st.st_mode)
        bad = mode & rule.forbid
        lacking = rule.need & ~mode
        if bad or lacking:
            words = []
            if bad & 0o022:
                words.append("writable by " + "/".join(w for b, w in ((0o020, "group"), (0o002, "other")) if bad & b))
            if bad & 0o044:
                words.append("readable by " + "/".join(w for b, w in ((0o040, "group"), (0o004, "other")) if bad & b))
            special = [w for b, w in ((0o4000, "setuid"), (0o2000, "setgid"), (0o1000, "sticky")) if bad & b]
            if special:
                words.append("has the " + "/".join(special) + " bit")
            if bad & 0o011 or bad & 0o100 or bad & 0o400 or bad & 0o200:
                words.append("has extra permission bits")
            if lacking:
                words.append("lacks needed permission bits")
            fix_mode = rule.mode if rule.mode is not None else (mode & ~rule.forbid) | rule.need
            self.problem(
                "files",
                f"{rule.path} ({rule.why}) has mode {mode:04o}: {', '.join(words)}",
                f"chmod {fix_mode:04o} {rule.path}",
            )
            ok = False
        return ok

    def check_files(self) -> None:
        count = 0
        ok = True
        ancestors: set[str] = set()
        rules = self.rules()
        for rule in rules:
            count += 1
            ok = self.check_path(rule) and ok
            ancestors.update(_ancestors(rule.path))
        ancestors -= {r.path for r in rules}  # checked by their own rule
        for cmd in (self.paths.brokerd, self.paths.brokerctl):
            count += 1
            ok = self._check_command_link(cmd) and ok
        venv = self.venv()
        if venv:
            ancestors.update(_ancestors(venv))
            ok = self.check_venv(venv) and ok
        ancestors.update(_ancestors(self.paths.sudoers))
        for a in sorted(ancestors, key=len):
            try:
                st = os.stat(a)
            except OSError:
                continue
            sticky_root = st.st_mode & stat.S_ISVTX and st.st_uid == 0
            if st.st_uid != 0 or (st.st_mode & 0o022 and not sticky_root):
                self.problem(
                    "files",
                    f"{a} (a parent directory) is owned by {_name_of_uid(st.st_uid)} with mode "
                    f"{stat.S_IMODE(st.st_mode):04o}: whoever can write it can swap what is below",
                    f"chown root {a} && chmod go-w {a}",
                )
                ok = False
        if ok:
            self.ok("files", f"{count} paths, their parents and the code have the right owner and mode")

    def _check_command_link(self, path: str) -> bool:
        try:
            target = os.path.realpath(path)
            st = os.stat(path)
        except OSError:
            self.problem("files", f"{path} is missing", "mcp-brokerctl install")
            return False
        if st.st_uid != 0 or st.st_mode & 0o022:
            self.problem(
                "files",
                f"{path} -> {target} is writable by others or not root's",
                f"chown root {target} && chmod go-w {target}",
            )
            return False
        return True

    def venv(self) -> str | None:
        """The virtualenv the installed commands run from."""
        try:
            link = os.readlink(self.paths.brokerctl)
        except OSError:
            link = ""
        if link.endswith("/bin/mcp-brokerctl"):  # the package's link is relative (../lib/mcp-privsep/venv/...)
            return os.path.dirname(os.path.dirname(os.path.normpath(os.path.join(self.paths.sbin, link))))
        try:
            with open(self.paths.gate, encoding="utf-8") as fh:
                m = re.search(r"sys\.path\.append\('([^']+)'\)", fh.read())
        except OSError:
            return None
        if m:
            site = m.group(1)  # VENV/lib/pythonX.Y/site-packages
            return os.path.dirname(os.path.dirname(os.path.dirname(site)))
        return None

    def check_venv(self, venv: str) -> bool:
        bad: list[str] = []
        for dirpath, dirnames, filenames in os.walk(venv):
            for name in [*dirnames, *filenames, ""]:
                full = os.path.join(dirpath, name) if name else dirpath
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if stat.S_ISLNK(st.st_mode):
                    continue
                if st.st_uid != 0 or st.st_mode & 0o022:
                    bad.append(full)
            dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
        if bad:
            shown = ", ".join(bad[:MAX_LISTED]) + (
                f" and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
            )
            self.problem(
                "files",
                f"the code in {venv} has {len(bad)} path(s) not owned by root or writable by others: {shown}",
                f"chown -R root: {venv} && chmod -R go-w {venv}",
            )
            return False
        return True

    # --- config ----------------------------------------------------------------------

    def check_config(self) -> None:
        problems = check_all(self.paths)
        for p in problems:
            self.problem("config", p, "edit the file named, then 'mcp-brokerctl check'")
        if not problems:
            self.ok("config", "allowlists, broker.toml and servers.d parse")
        for w in check_warnings(self.paths):  # what 'check' warns about: plain settings in env files
            self.warning("config", w)

    # --- sudoers ----------------------------------------------------------------------

    def gate_user(self, agent: str) -> str:
        """The agent's gate user, as the map says (the default name when the map does not list it)."""
        try:
            return agent_map.load(self.paths.gate_users).get(agent) or gate_user_for(agent)
        except ConfigError:
            return gate_user_for(agent)

    def server_user(self, instance: str) -> str:
        """The account of a server instance (``NAME`` or ``NAME@AGENT``), as its definition says."""
        name, _, agent = instance.partition("@")
        found, _table, _problems = core_servers.load(self.paths)
        defn = found.get(name)
        if defn is None:
            return core_servers.server_user_for(name, agent or None)
        return core_servers.account_of(defn, agent or None)

    def expected_rule(self, agent: str) -> str:
        return f"{agent} ALL=({self.gate_user(agent)}) NOPASSWD: {self.paths.gate}"

    def check_sudoers(self) -> list[str]:
        """Check the drop-in; return the agents to check from their side."""
        path = self.paths.sudoers
        try:
            st = os.lstat(path)
            with open(path, encoding="utf-8") as fh:
                text = fh.read()
        except FileNotFoundError:
            self.warning(
                "sudoers",
                f"{path} does not exist: no agent can run 'mcp' yet",
                "mcp-brokerctl install --agent USER",
            )
            return list(self.explicit_agents)
        except (OSError, UnicodeDecodeError) as exc:
            self.problem("sudoers", f"{path}: cannot read: {exc}")
            return list(self.explicit_agents)
        before = len(self.problems)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_gid != 0 or stat.S_IMODE(st.st_mode) != 0o440:
            self.problem(
                "sudoers",
                f"{path} is {_name_of_uid(st.st_uid)}:{_name_of_gid(st.st_gid)} {stat.S_IMODE(st.st_mode):04o}, "
                "expected root:root 0440",
                f"chown root:root {path} && chmod 0440 {path}",
            )
        visudo = shutil.which("visudo") or "/usr/sbin/visudo"
        proc = subprocess.run([visudo, "-cf", path], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            self.problem(
                "sudoers",
                f"visudo -cf {path} fails: {(proc.stdout + proc.stderr).strip().splitlines()[0:1]}",
                "mcp-brokerctl install --agent USER (rewrites it)",
            )
        marked = []
        seen_rules: set[str] = set()
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if line.startswith(SUDOERS_MARK.strip()):
                marked.append(line[len(SUDOERS_MARK.strip()) :].strip())
                continue
            if not line or (line.startswith("#") and not re.match(r"#include(dir)?\s", line)):
                continue
            norm = " ".join(line.split())
            agent = norm.split(" ", 1)[0]
            if norm == self.expected_rule(agent) and names.valid_user_name(agent):
                seen_rules.add(agent)
                continue
            if norm == f"{agent} ALL=({GATE_USER}) NOPASSWD: {self.paths.gate}":
                self.problem(
                    "sudoers",
                    f"{path}:{lineno}: half migrated: {agent} still runs the gate as the shared user {GATE_USER}, "
                    "which the daemon no longer accepts as a caller",
                    "mcp-brokerctl install (gives every agent its own gate user and rewrites the rules)",
                )
                continue
            self.problem(
                "sudoers",
                f"{path}:{lineno}: {_sudoers_why(line)}: {line}",
                f"remove the line; the only rule is '{self.expected_rule('AGENT')}' "
                "(mcp-brokerctl install --agent AGENT writes it)",
            )
        for agent in marked:
            if agent not in seen_rules:
                self.problem(
                    "sudoers",
                    f"{path}: agent {agent} has a marker but not the exact rule",
                    f"mcp-brokerctl install --agent {agent}",
                )
        for agent in sorted(seen_rules - set(marked)):
            self.warning(
                "sudoers",
                f"{path}: agent {agent} has a rule but no '{SUDOERS_MARK.strip()} {agent}' marker "
                "(install would drop it when adding an agent)",
                f"mcp-brokerctl install --agent {agent}",
            )
        agents = list(dict.fromkeys([*marked, *sorted(seen_rules), *self.explicit_agents]))
        for agent in agents:
            if _uid(agent) is None:
                self.problem(
                    "sudoers", f"agent {agent} does not exist", f"useradd -m {agent}, or remove it from {path}"
                )
                continue
            self.check_sudo_list(agent)
        if len(self.problems) == before:
            self.ok("sudoers", f"{path}: visudo-clean, exactly one rule per agent ({', '.join(agents) or 'none'})")
        return [a for a in agents if _uid(a) is not None]

    def check_sudo_list(self, agent: str) -> None:
        """``sudo -l -U AGENT``: every right the agent has, from every sudoers file."""
        sudo = shutil.which("sudo") or "/usr/bin/sudo"
        proc = subprocess.run([sudo, "-n", "-l", "-U", agent], capture_output=True, text=True, check=False)
        out = proc.stdout
        defaults, _sep, commands = out.partition("may run the following commands")
        for bad in ("!env_reset", "env_keep", "setenv", "!secure_path"):
            if bad in defaults.split("User ", 1)[0].lower().replace(" ", ""):
                self.problem(
                    "sudoers",
                    f"sudo defaults for {agent} include {bad}: the gate must get sudo's reset environment",
                    f"remove that Defaults entry (visudo; grep -r {bad} /etc/sudoers /etc/sudoers.d)",
                )
        for entry in commands.splitlines()[1:]:
            entry = entry.strip()
            if not entry:
                continue
            if entry.startswith("Sudoers entry") or entry.startswith("RunAs") or entry.startswith("Options"):
                continue
            m = re.fullmatch(r"\(([^)]*)\)\s*((?:[A-Z_]+:\s*)*)(.*)", entry)
            if not m:
                self.problem(
                    "sudoers", f"{agent} may also run via sudo: {entry}", f"remove it from sudoers (sudo -l -U {agent})"
                )
                continue
            runas, tags, cmds = m.group(1).strip(), m.group(2).replace(" ", ""), m.group(3)
            tag_set = {t for t in tags.split(":") if t}
            for cmd in (c.strip() for c in cmds.split(",")):
                fine = (
                    runas == self.gate_user(agent)
                    and tag_set <= {"NOPASSWD"}
                    and re.fullmatch(r"/[^\s*?\[\]]*/mcp-gate", cmd) is not None
                )
                if not fine:
                    self.problem(
                        "sudoers",
                        f"{agent} may also run via sudo: ({runas}) {tags} {cmd}: "
                        f"{_sudoers_why(f'({runas}) {tags} {cmd}')}",
                        f"remove that rule (sudo -l -U {agent} shows it; grep -r {agent} /etc/sudoers /etc/sudoers.d)",
                    )

    # --- daemon ---------------------------------------------------------------------

    def check_daemon(self) -> None:
        if self.admin is None:
            return
        try:
            status = self.admin("status")
        except PrivsepError as exc:
            self.problem("daemon", f"not answering: {exc}", "mcp-brokerd --daemon (or systemctl start mcp-brokerd)")
            return
        self.status = status
        before = len(self.problems)
        pid = int(status.get("pid", 0))
        uid = _proc_uid(pid)
        broker_uid = _uid(BROKER_USER)
        if uid is not None and uid != broker_uid:
            self.problem(
                "daemon",
                f"mcp-brokerd (pid {pid}) runs as {_name_of_uid(uid)}, not {BROKER_USER}",
                "restart it: mcp-brokerctl stop && mcp-brokerd --daemon",
            )
        if status.get("broker") != "up":
            self.problem(
                "daemon", f"broker is {status.get('broker')}", "see the daemon log; check the audit log's disk"
            )
        if status.get("audit") != "ok":
            self.problem("daemon", f"audit log: {status.get('audit')}", f"check {self.paths.audit_log} and its disk")
        trail = status.get("audit_trail")
        for warning in (trail.get("warnings") or []) if isinstance(trail, dict) else []:
            self.warning("audit", warning, f"see mcp-brokerctl status; free space on {self.paths.log}")
        disk = status.get("config")  # policy applies on the next call; what is listed here waits for a reload
        for stale in (disk.get("stale") or []) if isinstance(disk, dict) else []:
            self.warning(
                "config",
                f"config changed on disk: {stale.get('file')}: {stale.get('what')}; the broker runs the old one",
                "mcp-brokerctl reload",
            )
        self.check_sandboxes(status)
        for s in status.get("servers", []):
            if s.get("state") != "up":
                reason = f" ({s['reason']})" if s.get("reason") else ""
                self.problem(
                    "servers",
                    f"server {s['name']} is {s['state']}{reason}",
                    f"check [servers.{s.get('server', s['name'])}] and its env file, then mcp-brokerctl reload",
                )
        for frozen in status.get("frozen", []) or []:
            who = frozen.get("caller", frozen) if isinstance(frozen, dict) else frozen
            self.warning("daemon", f"caller {who} is frozen after repeated denials", f"mcp-brokerctl unfreeze {who}")
        if status.get("pending_approvals"):
            self.warning("daemon", f"{status['pending_approvals']} approval(s) pending", "mcp-brokerctl approvals")
        try:
            pins = self.admin("pins")
        except PrivsepError as exc:
            self.problem("pins", f"cannot list pins: {exc}")
            pins = []
        for p in pins:
            if p.get("state") == "changed":
                self.problem(
                    "pins",
                    f"the definition of {p['action']} changed since it was pinned; calls to it are blocked",
                    f"review and accept: mcp-brokerctl pins accept {p['action']}",
                )
        unreviewed = [p["action"] for p in pins if p.get("state") == "unreviewed" and p.get("policy") != "first-use"]
        if unreviewed:
            self.warning(
                "pins",
                f"{len(unreviewed)} allowlisted tool(s) nobody reviewed are blocked: {', '.join(unreviewed[:5])}"
                + (" ..." if len(unreviewed) > 5 else ""),
                f"review them: mcp-brokerctl pins accept {' '.join(unreviewed[:5])}",
            )
        pins = [p for p in pins if p.get("state") != "unreviewed"]
        if len(self.problems) == before:
            servers = status.get("servers", [])
            self.ok(
                "daemon",
                f"up (pid {pid}, as {BROKER_USER}), audit ok, {len(servers)} server(s) up, "
                f"{len(pins)} pin(s) unchanged",
            )

    def check_sandboxes(self, status: dict[str, Any]) -> None:
        """What the host provides for sandboxes, and for each running stdio server what protects it."""
        host = status.get("host") or {}
        if host:
            have = [n for n in ("pid_namespace", "mount_namespace", "network_namespace") if host.get(n)]
            lacks = [n for n in ("pid_namespace", "mount_namespace", "network_namespace") if not host.get(n)]
            abi = host.get("landlock_abi") or 0
            line = f"this host gives servers: {', '.join(have) or 'no namespaces'}, Landlock ABI {abi}"
            if host.get("disabled"):
                line += f" ([sandbox] disable: {', '.join(host['disabled'])})"
            if lacks or not abi:
                missing = [*lacks] + ([] if abi else ["landlock"])
                self.warning(
                    "sandbox",
                    line + f"; missing: {', '.join(missing)}",
                    'servers start without it (sandbox = "strict" refuses); an LXC container needs nesting',
                )
            else:
                self.ok("sandbox", line)
        for s in status.get("servers", []):
            if s.get("transport") != "stdio" or s.get("state") != "up":
                continue
            for warning in s.get("sandbox_warnings") or []:
                self.warning("sandbox", f"server {s['name']} runs without {warning}")
            described = "; ".join(sandbox_view.protections(s.get("sandbox") or {}))
            self.ok("sandbox", f"server {s['name']}: as {s.get('user')}: {described}")

    # --- the agent's side -----------------------------------------------------------------

    def probes(self) -> list[tuple[str, str, str]]:
        """(how, path, why it must fail) for every access the agent must not have."""
        p = self.paths
        out: list[tuple[str, str, str]] = []

        def existing(path: str) -> bool:
            return os.path.lexists(path)

        for path, why in (
            (p.broker_toml, "the daemon config"),
            (p.allowlist, "the allowlist"),
            (p.audit_log, "the audit log"),
        ):
            if existing(path):
                out.append(("read", path, why))
        for directory, why in (
            (p.secrets, "the secrets"),
            (p.servers_d, "server definitions"),
            (p.allowlist_d, "per-user allowlists"),
            (p.state, "the state"),
            (p.log, "the logs"),
            (p.run, "the sockets"),
            (p.gate_cache, "the gate's cache"),
        ):
            if existing(directory):
                out.append(("list", directory, why))
                try:
                    names = sorted(os.listdir(directory))
                except OSError:
                    names = []
                for name in names:
                    full = f"{directory}/{name}"
                    if os.path.isfile(full) and not os.path.islink(full):
                        out.append(("read", full, why))
        for env_file in self._env_files():
            out.append(("read", env_file, "a server's secrets"))
        commands = ((p.gate, "the gate command"), (p.mcp, "the mcp command"), (p.mcp_shim, "the mcp command's table"))
        for path, why in ((p.allowlist, "the allowlist"), *commands):
            if existing(path):
                out.append(("write", path, why))
        venv = self.venv()
        if venv:
            site = os.path.join(venv, "lib")
            for d in (venv, os.path.join(venv, "bin"), site):
                if os.path.isdir(d):
                    out.append(("create_in", d, "the code"))
        for directory in (p.etc, p.allowlist_d, p.servers_d):
            if existing(directory):
                out.append(("create_in", directory, "the config"))
        sockets = ((p.gate_sock, "gate.sock (only the gate users may)"), (p.admin_sock, "admin.sock (root only)"))
        for sock, why in sockets:
            if existing(sock):
                out.append(("connect", sock, why))
        if self.status and self.status.get("pid"):
            out.append(("signal", str(self.status["pid"]), "the daemon"))
        # de-duplicate, keep order
        seen: set[tuple[str, str]] = set()
        unique = []
        for how, path, why in out:
            if (how, path) not in seen:
                seen.add((how, path))
                unique.append((how, path, why))
        return unique

    def check_agent(self, agent: str) -> None:
        section = f"agent {agent}"
        before = len(self.problems)
        probes = self.probes()
        runuser = shutil.which("runuser") or RUNUSER
        try:
            proc = subprocess.run(
                [runuser, "-u", agent, "--", SYSTEM_PYTHON, "-I", "-S", "-c", PROBE],
                input=json.dumps([[how, path] for how, path, _why in probes]),
                capture_output=True,
                text=True,
                env=AGENT_ENV,
                cwd="/",
                timeout=60,
                check=False,
            )
            err = (proc.stderr or "").strip()
            results = json.loads(proc.stdout) if proc.returncode == 0 else None
        except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
            results = None
            err = str(exc)
        if results is None or len(results) != len(probes):
            self.problem(section, f"could not run a probe as {agent}: {err[:200]}")
            return
        verbs = {
            "read": "can read",
            "list": "can list",
            "write": "can write",
            "create_in": "can create files in",
            "connect": "can connect to",
            "signal": "can signal",
        }
        for (how, path, why), got in zip(probes, results, strict=True):
            if got == "ok":
                target = f"pid {path}" if how == "signal" else path
                self.problem(section, f"{agent} {verbs[how]} {target} ({why})", _agent_fix(how, path, self.paths))
        if self.status is not None:
            mcp = subprocess.run(
                [runuser, "-u", agent, "--", self.paths.mcp, "status", "--json"],
                capture_output=True,
                text=True,
                env=AGENT_ENV,
                cwd="/",
                timeout=60,
                check=False,
            )
            if mcp.returncode != 0:
                line = (mcp.stderr.strip().splitlines() or [f"exit {mcp.returncode}"])[-1]
                self.problem(
                    section,
                    f"'mcp status' as {agent} fails (exit {mcp.returncode}): {line}",
                    f"mcp-brokerctl install --agent {agent}; then mcp-brokerctl doctor again",
                )
        if len(self.problems) == before:
            self.ok(
                section,
                f"cannot reach secrets, config, audit, sockets or the daemon ({len(probes)} probes); "
                + ("'mcp status' works" if self.status is not None else "daemon down, 'mcp status' not tried"),
            )


def _unlocked_users(users: tuple[str, ...]) -> list[str]:
    """Users of ``users`` whose /etc/shadow password field is a usable hash."""
    try:
        with open("/etc/shadow", encoding="utf-8", errors="replace") as fh:
            fields = {line.split(":", 2)[0]: line.split(":", 2)[1] for line in fh if line.count(":") >= 2}
    except OSError:
        return []
    # an empty field means "no password needed": unlocked too
    return [u for u in users if u in fields and not fields[u].startswith(("!", "*"))]


def _output(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False).stdout


def _listed(items: list[str]) -> str:
    return ", ".join(items[:MAX_LISTED]) + (f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _ancestors(path: str) -> list[str]:
    out = []
    d = os.path.dirname(path)
    while d and d != "/":
        out.append(d)
        d = os.path.dirname(d)
    out.append("/")
    return out


def _proc_uid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[2])  # effective
    except OSError:
        return None
    return None


def _sudoers_why(line: str) -> str:
    upper = line.upper()
    if re.search(r"[*?\[\]]", line):
        return "a wildcard (sudo matches it against the arguments: the gate must be the only judge)"
    if "SETENV" in upper or "ENV_KEEP" in upper or "ENV_RESET" in upper:
        return "changes the environment sudo passes (SETENV/env_keep/env_reset)"
    if upper.startswith("DEFAULTS"):
        return "a Defaults line"
    if re.match(r"[#@]include", line):
        return "an include"
    if re.search(r"\bALL\s*$", line) or "(ALL" in upper:
        return "grants ALL"
    return "not the one expected rule"


def _agent_fix(how: str, path: str, paths: Paths) -> str:
    if how == "connect":
        return f"chown {BROKER_USER}:{GATE_GROUP} {paths.run} && chmod 2750 {paths.run}; restart the daemon"
    if how == "signal":
        return "the daemon must run as mcp-broker: mcp-brokerctl stop && mcp-brokerd --daemon"
    if how in ("create_in", "write"):
        return f"chown root {path} && chmod go-w {path}"
    return f"chmod o-rwx {path} (and see the files section for its expected owner and mode)"
