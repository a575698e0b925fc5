"""A real mcp-privsep installation in a staging root, for privileged tests.

Everything is real: system users, the sudoers drop-in (validated by visudo),
the root-owned virtualenv the tests run from, the daemon started as root
(it starts the spawner and drops to mcp-broker), a stdio demo server in its
own sandbox under its own user, a streamable-HTTP demo server demanding a
bearer token, and agent users calling ``mcp`` through sudo.

Staging roots live under :data:`BASE`, not ``/tmp``: every server gets a
private, empty ``/tmp``, so a test server's script or data under ``/tmp``
would not exist for it.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from broker.core.paths import Paths

AGENT1 = "mcpt-agent1"
AGENT2 = "mcpt-agent2"
OUTSIDER = "mcpt-outsider"  # a user with no sudo rule at all
VENV = sys.prefix
PYTHON = f"{VENV}/bin/python"
CTL = f"{VENV}/bin/mcp-brokerctl"
BROKERD = f"{VENV}/bin/mcp-brokerd"
RUNUSER = shutil.which("runuser") or "/usr/sbin/runuser"
AGENT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
#: where staging roots are made (outside /tmp: see the module docstring)
BASE = "/srv/mcp-privsep-e2e"

ALLOWLIST = """\
# test allowlist
demo.echo
demo.whoami   # trailing comment
demo.add
demo.slow
demo.crash
demo.fail
demo.big
#demo.secret - never
web.echo
web.whoami
noauth.echo
"""


#: every secret found in a broker log by :meth:`Installation.check_logs` ("file: secret name"), for the last test
LOG_LEAKS: list[str] = []
#: the installations whose logs were checked
LOGS_CHECKED: list[str] = []


def ensure_user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
        return pwd.getpwnam(name)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write(path: str, text: str, uid: int = 0, gid: int = 0, mode: int = 0o644) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chown(path, uid, gid)
    os.chmod(path, mode)


@dataclass
class Result:
    code: int
    out: str
    err: str


class Installation:
    """One staging root with its daemon and servers."""

    def __init__(self) -> None:
        os.makedirs(BASE, mode=0o755, exist_ok=True)
        base = tempfile.mkdtemp(prefix="root-", dir=BASE)
        os.chmod(base, 0o755)
        self.root = base
        self.paths = Paths(base)
        self.daemon: subprocess.Popen[bytes] | None = None
        self.http: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.web_secret = "websecret-" + secrets.token_hex(8)
        #: a secret in the streamable-HTTP server's URL: what an HTTP library logs at INFO
        self.url_key = "urlkey-" + secrets.token_hex(8)
        #: the foreground daemon's output: root's, 0600 (no server may read it)
        self.daemon_log = f"{base}/foreground.log"

    # --- set-up -------------------------------------------------------------

    def install(self) -> None:
        for user in (AGENT1, AGENT2, OUTSIDER):
            ensure_user(user)
        self.ctl("install", "--agent", AGENT1, "--agent", AGENT2, check=True)
        broker = pwd.getpwnam("mcp-broker")
        gate = pwd.getpwnam("mcp-gate")
        p = self.paths
        self.write_broker_toml()
        with open(f"{p.secrets}/demo.env", "a", encoding="utf-8") as fh:
            fh.write(f"DEMO_ECHO_DESCRIPTION_FILE={self.root}/echo-description.txt\n")
        write(
            f"{p.secrets}/web.env",
            f"DEMO_TOKEN={self.token}\nDEMO_SECRET={self.web_secret}\nWEB_URL_KEY={self.url_key}\n",
            0,
            0,
            0o600,
        )
        write(
            f"{p.servers_d}/web.toml",
            f"""
[servers.web]
url = "http://127.0.0.1:{self.port}/mcp?key=${{WEB_URL_KEY}}"
env_file = "{p.secrets}/web.env"
headers = {{ Authorization = "Bearer ${{DEMO_TOKEN}}" }}

[servers.noauth]
url = "http://127.0.0.1:{self.port}/mcp"
""",
            0,
            broker.pw_gid,
            0o640,
        )
        self.set_allowlist(ALLOWLIST)
        write(p.user_allowlist(AGENT2), "demo.add\n", 0, gate.pw_gid, 0o640)

    def write_broker_toml(self, broker_extra: str = "", policy: str = "") -> None:
        """The test broker.toml: denial budget off unless a test turns it on."""
        broker = pwd.getpwnam("mcp-broker")
        p = self.paths
        budget = "" if "denial_budget" in broker_extra else "denial_budget = 0"
        # the tests allowlist by hand: their tools are trusted on first use unless a test says otherwise
        # (tests/e2e/test_pins_live.py checks the default, review)
        if "pin =" not in broker_extra:
            budget += '\npin = "first-use"'
        write(
            p.broker_toml,
            f"""
[broker]
call_timeout = 10
max_call_timeout = 30
connect_timeout = 15
restart_backoff_max = 1
{budget}
{broker_extra}

[servers.demo]
command = "{PYTHON}"
args = ["-m", "mcp_servers.demo"]
env_file = "{p.secrets}/demo.env"

{policy}
""",
            0,
            broker.pw_gid,
            0o640,
        )

    def set_policy(self, policy: str = "", broker_extra: str = "") -> None:
        """Rewrite broker.toml with this policy and reload the running daemon."""
        self.write_broker_toml(broker_extra, policy)
        self.ctl("reload", check=True)

    def set_allowlist(self, text: str, mode: int = 0o640) -> None:
        gate = pwd.getpwnam("mcp-gate")
        tmp = self.paths.allowlist + ".tmp"
        write(tmp, text, 0, gate.pw_gid, mode)
        os.replace(tmp, self.paths.allowlist)

    def start_http(self) -> None:
        broker = pwd.getpwnam("mcp-broker")
        env = {"PATH": "/usr/bin:/bin", "DEMO_TOKEN": self.token, "DEMO_SECRET": self.web_secret, "HOME": "/"}
        self.http = subprocess.Popen(
            [PYTHON, "-m", "mcp_servers.demo", "--http", f"127.0.0.1:{self.port}"],
            env=env,
            user=broker.pw_uid,
            group=broker.pw_gid,
            extra_groups=[],
            cwd="/",
            stdout=subprocess.DEVNULL,
            stderr=open(f"{self.root}/http.log", "wb"),  # noqa: SIM115
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return
            time.sleep(0.1)
        raise RuntimeError("HTTP demo server did not start")

    def start_daemon(self, wait_servers: tuple[str, ...] = ("demo", "web")) -> None:
        fd = os.open(self.daemon_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with open(fd, "ab") as log:
            self.daemon = subprocess.Popen(
                [BROKERD, "--root", self.root, "--foreground", "--log-level", "debug"],
                stdout=log,
                stderr=log,
                env={"PATH": "/usr/bin:/bin"},
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.daemon.poll() is not None:
                raise RuntimeError(f"daemon exited: {self.log_tail()}")
            status = self.ctl("status", "--json")
            if status.code == 0:
                import json

                states = {s["name"]: s["state"] for s in json.loads(status.out)["servers"]}
                if all(states.get(n) == "up" for n in wait_servers):
                    return
            time.sleep(0.1)
        raise RuntimeError(f"daemon not ready: {self.log_tail()}")

    def stop_daemon(self) -> None:
        if self.daemon is not None and self.daemon.poll() is None:
            self.daemon.send_signal(signal.SIGTERM)
            try:
                self.daemon.wait(15)
            except subprocess.TimeoutExpired:
                self.daemon.kill()
                self.daemon.wait()
        self.daemon = None

    def restart_daemon(self) -> None:
        self.stop_daemon()
        self.start_daemon()

    def secret_values(self) -> dict[str, str]:
        """Every secret of every server of this installation (env-file values that are not paths), by name."""
        found = {"web.url_key": self.url_key, "web.token": self.token, "web.secret": self.web_secret}
        with contextlib.suppress(OSError):
            for name in os.listdir(self.paths.secrets):
                for line in Path(f"{self.paths.secrets}/{name}").read_text(errors="replace").splitlines():
                    key, eq, value = line.partition("=")
                    if eq and not key.startswith("#") and len(value) >= 8 and not value.startswith("/"):
                        found[f"{name}:{key}"] = value
        return found

    def check_logs(self) -> None:
        """Look for every secret in every log the broker wrote here; what is found goes to LOG_LEAKS."""
        files = {self.daemon_log}
        for directory, _dirs, names in os.walk(self.paths.log):
            files |= {os.path.join(directory, n) for n in names}
        values = self.secret_values()
        for path in sorted(files):
            try:
                data = Path(path).read_bytes()
            except OSError:
                continue
            for name, value in values.items():
                if value.encode() in data:
                    LOG_LEAKS.append(f"{path}: {name}")
        LOGS_CHECKED.append(self.root)

    def teardown(self) -> None:
        self.stop_daemon()
        self.check_logs()
        if self.http is not None:
            self.http.kill()
            self.http.wait()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.paths.sudoers)
        shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self, n: int = 4000) -> str:
        try:
            return Path(self.daemon_log).read_text(errors="replace")[-n:]
        except FileNotFoundError:
            return ""

    def digest(self, args: object) -> str:
        """The digest the daemon records for these arguments (keyed with the install's own key)."""
        from broker.daemon import audit

        with open(self.paths.audit_key, "rb") as fh:
            return audit.args_digest(args, fh.read())

    def records(self) -> list[dict[str, object]]:
        """Every record of the live audit file, in order."""
        import json

        with open(self.paths.audit_log, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    # --- acting -------------------------------------------------------------

    def ctl(self, *args: str, check: bool = False) -> Result:
        proc = subprocess.run([CTL, "--root", self.root, *args], capture_output=True, text=True, check=False)
        if check and proc.returncode != 0:
            raise RuntimeError(f"mcp-brokerctl {args} failed: {proc.stderr}")
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def as_user(self, user: str, *argv: str, stdin: str | None = None, timeout: float = 60) -> Result:
        """Run a command as ``user`` with a fresh login-less environment."""
        proc = subprocess.run(
            [RUNUSER, "-u", user, "--", *argv],
            capture_output=True,
            text=True,
            input=stdin,
            env=AGENT_ENV,
            cwd="/",
            timeout=timeout,
            check=False,
        )
        return Result(proc.returncode, proc.stdout, proc.stderr)

    def mcp(self, *argv: str, user: str = AGENT1, stdin: str | None = None, timeout: float = 60) -> Result:
        """The agent's own command: ``mcp ARGS`` through the installed shim and sudo."""
        return self.as_user(user, self.paths.mcp, *argv, stdin=stdin, timeout=timeout)

    def spawn_mcp(self, *argv: str, user: str = AGENT1, stdin: bool = False) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [RUNUSER, "-u", user, "--", self.paths.mcp, *argv],
            stdin=subprocess.PIPE if stdin else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=AGENT_ENV,
            cwd="/",
            start_new_session=True,  # so kill_tree reaches sudo and the gate too
        )

    @staticmethod
    def kill_tree(proc: subprocess.Popen[str]) -> None:
        """Kill an agent command with everything it started (runuser, sudo, the gate)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def server_pids(self, marker: str = "mcp_servers.demo") -> list[int]:
        """Pids of stdio demo servers this daemon's spawner started (its descendants, not the keepers)."""
        assert self.daemon is not None
        found = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            ours = marker.encode() in cmd and b"--http" not in cmd and b"broker.spawner" not in cmd
            if ours and descends_from(int(entry), self.daemon.pid):
                found.append(int(entry))
        return found


def parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def descends_from(pid: int, ancestor: int) -> bool:
    """Whether ``ancestor`` is among the parents of ``pid``."""
    seen = 0
    current: int | None = pid
    while current and current != 1 and seen < 64:
        current = parent_of(current)
        if current == ancestor:
            return True
        seen += 1
    return False


def server_account(server: str, agent: str | None = None) -> pwd.struct_passwd:
    """The default account of a server instance, made now if missing (as install and reload make it)."""
    from broker.admin.install import Report, ensure_system_user
    from broker.core.servers import instance_name, server_user_for

    return ensure_system_user(server_user_for(server, agent), f"/nonexistent/{instance_name(server, agent)}", Report())


# --- speaking gate.sock as a gate user -------------------------------------------------------------

_CONNECT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
socket.send_fds(socket.socket(fileno=int(sys.argv[2])), [b"x"], [s.fileno()])
"""


def connect_as(user: str, path: str, timeout: float = 10.0) -> socket.socket:
    """A socket connected to ``path`` by a process running as ``user`` (its SO_PEERCRED), handed back here.

    What a compromised gate process of that user could do: the daemon sees exactly that uid.
    """
    pw = pwd.getpwnam(user)
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        subprocess.run(
            ["/usr/bin/python3", "-I", "-c", _CONNECT, path, str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            user=pw.pw_uid,
            group=pw.pw_gid,
            extra_groups=[],
            cwd="/",
            env={"PATH": "/usr/bin:/bin"},
            check=True,
            capture_output=True,
            timeout=timeout,
        )
        _msg, fds, _flags, _addr = socket.recv_fds(mine, 1, 1)
    finally:
        mine.close()
        theirs.close()
    sock = socket.socket(fileno=fds[0])
    sock.settimeout(timeout)
    return sock


def gate_exchange(user: str, path: str, request: dict[str, object]) -> dict[str, Any] | None:
    """One request on gate.sock as ``user``; the answer, or None when the daemon closed the connection."""
    from broker.core import wire

    with connect_as(user, path) as sock:
        sock.sendall(wire.encode_frame(request, wire.MAX_REQUEST_BYTES))
        header = sock.recv(4, socket.MSG_WAITALL)
        if len(header) < 4:
            return None
        payload = sock.recv(wire.frame_length(header, wire.MAX_RESPONSE_BYTES), socket.MSG_WAITALL)
    return wire.decode_payload(payload)


def gate_user(agent: str) -> str:
    from broker.core.paths import gate_user_for

    return gate_user_for(agent)


# --- helpers the robustness tests and the fuzzers share ------------------------------------------

HOSTILE = Path(__file__).parent / "servers" / "hostile.py"
HOSTILE_TOOLS = [
    "nan",
    "surrogate_text",
    "surrogate_error",
    "rpc_error",
    "huge",
    "wrong_id",
    "garbage",
    "record",
    "fuzz",
]


def clean(r: Result) -> Result:
    """No traceback anywhere, a contract exit code, and every stderr line the gate's own."""
    from broker.core.errors import CONTRACT_EXIT_CODES

    assert "Traceback" not in r.out + r.err, r
    assert "SystemError" not in r.out + r.err, r
    assert r.code in CONTRACT_EXIT_CODES, r
    for line in r.err.splitlines():
        assert line.startswith("mcp: "), r
    return r


def wait_for(predicate: Callable[[], object], timeout: float, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def servers(inst: Installation) -> dict[str, dict[str, Any]]:
    """The daemon's view of its servers (admin status), by name."""
    import json

    r = inst.ctl("status", "--json")
    assert r.code == 0, r.err
    return {s["name"]: s for s in json.loads(r.out)["servers"]}


def write_servers_d(inst: Installation, name: str, text: str) -> str:
    path = f"{inst.paths.servers_d}/{name}"
    Path(path).write_text(text, encoding="utf-8")
    os.chown(path, 0, pwd.getpwnam("mcp-broker").pw_gid)
    os.chmod(path, 0o640)
    return path


def hostile_calls(inst: Installation) -> list[dict[str, Any]]:
    """Every tools/call the hostile server received, in order."""
    import json

    path = Path(f"{inst.root}/hostile-log/calls.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def verify_ok(inst: Installation) -> None:
    r = inst.ctl("audit", "verify")
    assert r.code == 0, r.out + r.err


def other_agent_is_served(inst: Installation) -> None:
    r = inst.mcp("call", "demo.add", "a=2", "b=3", user=AGENT2)
    assert (r.code, r.out) == (0, "5\n"), r


def add_hostile_servers(inst: Installation) -> Callable[[], None]:
    """Configure the hostile server (and one whose listing never ends); return what undoes it."""
    import json

    account = server_account("hostile")
    script = f"{inst.root}/hostile_server.py"
    shutil.copyfile(HOSTILE, script)
    os.chmod(script, 0o644)
    logdir = f"{inst.root}/hostile-log"
    os.makedirs(logdir, exist_ok=True)
    os.chown(logdir, account.pw_uid, account.pw_gid)
    os.chmod(logdir, 0o700)
    env_file = f"{inst.paths.secrets}/hostile.env"
    write(env_file, f"HOSTILE_LOG={logdir}/calls.jsonl\n", 0, 0, 0o600)
    conf = write_servers_d(
        inst,
        "hostile.toml",
        f"""
[servers.hostile]
command = "{PYTHON}"
args = [{json.dumps(script)}]
env_file = "{env_file}"
write_paths = [{json.dumps(logdir)}]

[servers.pages]
command = "{PYTHON}"
args = [{json.dumps(script)}]
env = {{ HOSTILE_MODE = "endless_pages" }}
""",
    )
    inst.write_broker_toml("max_server_message_bytes = 1048576")
    if inst.daemon is None or inst.daemon.poll() is not None:
        inst.start_daemon()
    assert inst.ctl("reload").code == 0
    assert wait_for(lambda: servers(inst).get("hostile", {}).get("state") == "up", 20), servers(inst)
    inst.set_allowlist(ALLOWLIST + "demo.show\n" + "".join(f"hostile.{t}\n" for t in HOSTILE_TOOLS) + "pages.t0\n")

    def undo() -> None:
        os.unlink(conf)
        os.unlink(env_file)
        inst.write_broker_toml()
        inst.set_allowlist(ALLOWLIST)
        if inst.daemon is not None and inst.daemon.poll() is None:
            inst.ctl("reload")

    return undo
