"""The spawner's loop: one request at a time from the daemon, each bound to its handler by one table.

:data:`HANDLERS` is the whole surface (OpenSSH's ``monitor.c`` dispatch
table): ``hello``, ``load``, ``secrets``, ``start``, ``stop``. A request
outside it, or a malformed frame, is fatal: every server is stopped and
the spawner exits. A request for something that is not configured, or
that cannot run, is answered with an error and changes nothing.

What the spawner trusts: root's configuration files (it reads them itself,
with the same parser as ``check`` and the daemon), the passwd database and
the gate-users map. What it does not: anything in a request beyond the
name of a configured server and, for a per-caller server, one of the
agents the map lists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import select
import signal
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.core import accounts, channel
from broker.core import agents as agent_map
from broker.core import servers as defs_mod
from broker.core.errors import ConfigError, PrivsepError, ProtocolError
from broker.core.paths import Paths
from broker.core.servers import ServerDef
from broker.spawner import kernel, sandbox

log = logging.getLogger("mcp-spawner")

#: the environment every server starts from (then its plain ``env``, then its env file)
BASE_PATH = "/usr/local/bin:/usr/bin:/bin"


class Fatal(Exception):
    """The channel broke its protocol: stop everything and exit."""


@dataclass
class Running:
    """One started instance."""

    keeper: int
    uid: int
    #: stop also kills every process of the uid (a default account, outside a pid namespace only)
    sweep: bool


def substitute(text: str, home: str, agent: str | None) -> str:
    """``{home}`` and ``{agent}`` of a definition filled in for one instance."""
    text = text.replace("{home}", home)
    return text.replace("{agent}", agent) if agent is not None else text


class Spawner:
    """The spawner's state: the definitions as root reads them, and what runs."""

    def __init__(self, paths: Paths, sock: socket.socket) -> None:
        self.paths = paths
        self.sock = sock
        self.defs: dict[str, ServerDef] = {}
        self.agents: dict[str, str] = {}
        self.disabled: frozenset[str] = frozenset()
        self.running: dict[str, Running] = {}

    # --- the loop ----------------------------------------------------------------------------

    def serve(self) -> int:
        """Answer requests until the daemon closes the channel (0) or breaks the protocol (1)."""
        try:
            while True:
                ready, _, _ = select.select([self.sock], [], [], 1.0)
                self.reap()
                if not ready:
                    continue
                try:
                    req, _fds = channel.recv(self.sock, channel.MAX_REQUEST_BYTES)
                except (ProtocolError, OSError) as exc:
                    raise Fatal(f"bad frame from the daemon: {exc}") from None
                if req is None:
                    log.info("the daemon closed the channel; stopping every server")
                    return 0
                try:
                    op = channel.check_request(req)
                except ProtocolError as exc:
                    raise Fatal(f"bad request from the daemon: {exc}") from None
                answer, fds = self.answer(op, req)
                try:
                    channel.send(self.sock, {"op": op, **answer}, channel.MAX_ANSWER_BYTES, fds)
                except (ProtocolError, OSError) as exc:
                    raise Fatal(f"cannot answer the daemon: {exc}") from None
                finally:
                    channel.close_all(fds)
        except Fatal as exc:
            log.error("%s; stopping every server", exc)
            return 1
        finally:
            self.stop_all()

    def answer(self, op: str, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """The handler's answer; a refusal for anything it cannot do (never an exception out of here)."""
        handler = HANDLERS[op]
        try:
            return handler(self, req)
        except (ConfigError, sandbox.SandboxError) as exc:
            return {"ok": False, "error": str(exc)}, []
        except OSError as exc:
            return {"ok": False, "error": sandbox._describe(exc)}, []

    # --- requests ----------------------------------------------------------------------------

    def hello(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        return {"ok": True, "version": channel.VERSION, "host": host_facts(self.disabled)}, []

    def load(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        """Re-read root's definitions; a config with problems keeps the last good one (as the daemon does)."""
        found, sandbox_table, problems = defs_mod.load(self.paths)
        try:
            mapping = agent_map.load(self.paths.gate_users)
        except ConfigError as exc:
            problems.extend(exc.problems)
            mapping = {}
        if not problems:
            self.defs = found
            self.agents = mapping
            self.disabled = defs_mod.host_settings(sandbox_table, self.paths.broker_toml)
        accounts = defs_mod.account_problems(self.defs, self.agents)
        instances: dict[str, Any] = {}
        for defn, agent in defs_mod.instances(self.defs, list(self.agents)):
            key = defs_mod.instance_name(defn.name, agent)
            instances[key] = {
                "server": defn.name,
                "agent": agent,
                "user": defs_mod.account_of(defn, agent),
                "fingerprint": defn.fingerprint(),
                "problem": accounts.get(key),
            }
        return {"ok": True, "instances": instances, "problems": problems}, []

    def secrets(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        defn = self._defn(req["server"])
        found = defs_mod.resolve(defn, self.paths, list(self.agents) if defn.per_caller else [])
        return {
            "ok": True,
            "redact": found.redact,
            "url": found.url,
            "headers": found.headers,
            "fingerprint": found.fingerprint,
        }, []

    def start(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        defn, agent, key = self._instance(req)
        assert defn is not None
        plan, sweep = self.plan(defn, agent)  # a start that cannot happen leaves the running instance alone
        self._stop(key)
        started = sandbox.launch(plan)
        report = started.report
        # in a pid namespace of its own, the keeper's end is the end of every process of the server; without
        # one, stopping it also kills whatever is left with its (own, default) account's uid
        in_namespace = bool(report.get("protections", {}).get("pid_namespace"))
        self.running[key] = Running(started.pid, plan.uid, sweep and not in_namespace)
        log.info("started %s as %s (keeper %d)%s", key, plan.user, started.pid, _warned(report))
        answer = {
            "ok": True,
            "pid": started.pid,
            "user": plan.user,
            "protections": report.get("protections", {}),
            "warnings": report.get("warnings", []),
        }
        return answer, [started.stdin, started.stdout, started.stderr]

    def stop(self, req: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        _defn, _agent, key = self._instance(req, running_ok=True)
        return {"ok": True, "stopped": self._stop(key)}, []

    # --- helpers -----------------------------------------------------------------------------

    def _defn(self, name: str) -> ServerDef:
        defn = self.defs.get(name)
        if defn is None:
            raise ConfigError(f"no server named {name[:100]!r} is configured")
        return defn

    def _instance(self, req: dict[str, Any], running_ok: bool = False) -> tuple[ServerDef | None, str | None, str]:
        """The configured instance a start or stop names; ConfigError for anything else."""
        name, agent = req["server"], req["agent"]
        key = defs_mod.instance_name(name, agent) if isinstance(agent, str) else name
        if running_ok and key in self.running and name not in self.defs:
            return None, agent, key  # removed from the config: it may still be stopped
        defn = self._defn(name)
        if defn.command is None:
            raise ConfigError(f"server {name} is an HTTP server: there is nothing to start")
        if defn.per_caller != (agent is not None):
            raise ConfigError(
                f"server {name} is {'per caller: name the agent' if defn.per_caller else 'not per caller'}"
            )
        if agent is not None and agent not in self.agents:
            raise ConfigError(f"{agent[:100]!r} is not an agent of this installation")
        return defn, agent, key

    def plan(self, defn: ServerDef, agent: str | None) -> tuple[sandbox.Plan, bool]:
        """How to start one instance, from root's definition; ConfigError when it cannot run."""
        key = defs_mod.instance_name(defn.name, agent)
        account = defs_mod.account_of(defn, agent)
        if defn.user is None or agent is not None:
            self.account(account, key)
        problem = defs_mod.account_problems(self.defs, self.agents).get(key)
        if problem is not None:
            raise ConfigError(f"server {key}: {problem}")
        pw = pwd.getpwnam(account)
        home = self.home(key, pw)
        assert defn.command is not None
        hidden = self.paths.hidden_from_servers()
        read_paths = tuple(substitute(x, home, agent) for x in defn.read_paths)
        write_paths = tuple(substitute(x, home, agent) for x in defn.write_paths)
        package = sandbox.hidden_dirs((self.paths.server_package(defn.name),))  # what 'server add' installed
        for path in (*read_paths, *write_paths):
            real = sandbox.trusted_path(path)  # a link the server planted is refused, not followed
            if _within(real, home):
                continue  # inside its own home
            if path not in write_paths and any(_within(real, d) for d in package):
                continue  # its own installed package (root's), bound in read-only
            for h in sandbox.hidden_dirs(hidden):
                if _within(real, h) or _within(h, real):
                    raise ConfigError(f"server {key}: {path} is (or holds) the broker's {h}: a server never sees it")
        # what check enforces, again on root's files: every ${VAR} defined, no secret on the command line
        defs_mod.resolve(defn, self.paths, [agent] if agent is not None else [])
        env = {"PATH": BASE_PATH, "HOME": home, "LANG": "C.UTF-8"}
        env.update({k: substitute(v, home, agent) for k, v in defn.env.items()})
        env.update(self._env_values(defn, agent))
        plan = sandbox.Plan(
            instance=key,
            user=account,
            uid=pw.pw_uid,
            gid=pw.pw_gid,
            home=home,
            command=defn.command,
            args=tuple(substitute(a, home, agent) for a in defn.args),
            cwd=substitute(defn.cwd, home, agent) if defn.cwd else home,
            env=env,
            network=defn.network,
            connect_ports=defn.connect_ports,
            bind_ports=defn.bind_ports,
            read_paths=read_paths,
            write_paths=write_paths,
            limits=defn.limits,
            command_sha256=defn.command_sha256,
            strict=defn.sandbox == "strict",
            hidden=hidden,
            disabled=self.disabled,
        )
        return plan, defn.user is None

    def _env_values(self, defn: ServerDef, agent: str | None) -> dict[str, str]:
        """The instance's env file values (its own NAME@AGENT.env over the server's)."""
        env = defs_mod.read_env_file(defn.env_file) if defn.env_file else {}
        own = defs_mod.instance_env_file(self.paths, defn, agent)
        if own is not None:
            env |= defs_mod.read_env_file(own)
        return env

    def account(self, name: str, instance: str) -> None:
        """A server's default account, made the first time it starts (install and reload make them too)."""
        try:
            pwd.getpwnam(name)
        except KeyError:
            try:
                accounts.create_system_user(name, self.paths.server_home(instance))
            except PrivsepError as exc:
                raise ConfigError(f"server {instance}: its user {name} cannot be made: {exc.message}") from None
            log.info("created the system user %s for server %s", name, instance)

    def home(self, instance: str, pw: pwd.struct_passwd) -> str:
        """The instance's home, made or fixed: a real directory of its own user, 0700, in root's 0755 parent."""
        parent = self.paths.server_homes
        if not os.path.lexists(parent):
            mask = os.umask(0o022)  # under the spawner's 077 a new parent would be 0700: no server could enter it
            try:
                os.makedirs(parent, mode=0o755, exist_ok=True)
            finally:
                os.umask(mask)
        st = os.lstat(parent)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise ConfigError(f"{parent}: must be a directory of root's, not writable by others")
        if stat.S_IMODE(st.st_mode) & 0o111 != 0o111:
            raise ConfigError(f"{parent}: must be searchable by every server's user (mode 0755)")
        home = self.paths.server_home(instance)
        with contextlib.suppress(FileExistsError):
            os.mkdir(home, 0o700)
        fd = os.open(home, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if (st.st_uid, st.st_gid) != (pw.pw_uid, pw.pw_gid):
                os.fchown(fd, pw.pw_uid, pw.pw_gid)
            if stat.S_IMODE(st.st_mode) != 0o700:
                os.fchmod(fd, 0o700)
        finally:
            os.close(fd)
        return home

    def _stop(self, key: str) -> bool:
        running = self.running.pop(key, None)
        if running is None:
            return False
        sandbox.kill_keeper(running.keeper)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(running.keeper, 0)
        if running.sweep:
            sandbox.kill_uid(running.uid)
        log.info("stopped %s", key)
        return True

    def stop_all(self) -> None:
        for key in list(self.running):
            self._stop(key)

    def reap(self) -> None:
        """Collect keepers that ended (their server exited); their instance is no longer running."""
        while True:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for key, running in list(self.running.items()):
                if running.keeper == pid:
                    del self.running[key]
                    if running.sweep:
                        sandbox.kill_uid(running.uid)
                    log.info("%s exited", key)


def _within(path: str, directory: str) -> bool:
    return path == directory or path.startswith(directory.rstrip("/") + "/")


def _warned(report: dict[str, Any]) -> str:
    warnings = report.get("warnings") or []
    return f"; without: {'; '.join(warnings)}" if warnings else ""


def host_facts(disabled: frozenset[str]) -> dict[str, Any]:
    """What this host provides for sandboxes (probed in a throwaway child), and what broker.toml disables."""
    facts: dict[str, Any] = {"landlock_abi": kernel.landlock_abi(), "disabled": sorted(disabled)}
    for name, flag in (
        ("pid_namespace", kernel.CLONE_NEWPID),
        ("mount_namespace", kernel.CLONE_NEWNS),
        ("network_namespace", kernel.CLONE_NEWNET),
    ):
        pid = os.fork()
        if pid == 0:
            code = 1
            with contextlib.suppress(BaseException):
                kernel.unshare(flag)
                code = 0
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        facts[name] = os.waitstatus_to_exitcode(status) == 0
    return facts


Handler = Callable[[Spawner, dict[str, Any]], tuple[dict[str, Any], list[int]]]

#: the whole surface the daemon can reach: one handler per request of broker.core.channel.REQUESTS
HANDLERS: dict[str, Handler] = {
    "hello": Spawner.hello,
    "load": Spawner.load,
    "secrets": Spawner.secrets,
    "start": Spawner.start,
    "stop": Spawner.stop,
}


def run(paths: Paths, fd: int) -> int:
    """The spawner's main: serve the channel on ``fd`` until it closes; every server stops with it."""
    os.umask(0o077)  # nothing it creates is anyone else's to read unless it says so (then it sets the mode)
    sock = socket.socket(fileno=fd)
    spawner = Spawner(paths, sock)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when to stop (Ctrl-C reaches it too)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        return spawner.serve()
    finally:
        spawner.stop_all()
