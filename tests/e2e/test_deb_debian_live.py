"""The Debian package on a freshly bootstrapped Debian 12, as an operator would use it.

The root is ``debootstrap --variant=minbase bookworm`` (cached for the day
under ``/var/cache/mcp-privsep-e2e/debian/``), made a host without systemd:
``sysvinit-core`` installed, runlevel 2 in utmp, the host name in
/etc/hosts, system users in a uid range of their own. Every command runs in
it with ``chroot``, inside a private mount namespace (its /proc and /dev
vanish with the namespace). Packages come from deb.debian.org (the test
skips, saying so, only when that mirror is unreachable and nothing is
cached). What is asserted, in order (the tests share the root):

1. the previous release (0.1.0-1, built from git history: its postinst built
   /opt/mcp-privsep/venv and wrote commands to /usr/local) installs with
   ``apt-get install ./pkg.deb``, an agent calls through it, and the
   operator changes the config and adds a server that runs from that venv;
   upgrading to this package keeps every operator file byte for byte (the
   config, the secrets, the agents' list, a server's home), keeps that
   server working, takes back the old commands in /usr/local (and writes
   nothing there), rewrites the agent's sudo rule to /usr/sbin/mcp-gate,
   and restarts the daemon;
2. the daemon runs from the init script: ``invoke-rc.d mcp-brokerd
   stop|start|reload``, ``/etc/init.d/mcp-brokerd status``, and
   ``update-rc.d`` links in /etc/rc2.d;
3. an agent call works (``mcp-brokerctl install --agent``, ``pins accept
   --yes demo.echo``, ``runuser -u AGENT -- mcp call demo.echo``); doctor
   is all green; without the host name in /etc/hosts, sudo's "unable to
   resolve host" reaches the agent's stderr and doctor warns;
4. dpkg knows every file of the code (``dpkg -S``, ``dpkg -L``) and
   ``dpkg --verify`` reports an edited gate file (so does doctor);
5. the unit passes ``systemd-analyze verify`` (systemd installed in the
   root, not running), which does check that its Exec commands exist;
6. ``apt remove`` then ``apt install`` keeps each agent's sudo rule (the
   same drop-in, byte for byte) and its calls work again;
7. ``apt purge`` keeps the audit trail and says where; a fresh install
   starts the daemon by itself; ``MCP_PRIVSEP_PURGE_AUDIT=yes apt purge``
   deletes it.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.harness import BASE
from tests.e2e.test_deb_live import REPO, built_deb, make_deb

#: the last commit of the /opt layout: the package 0.1.0-1 this one upgrades
PREVIOUS_COMMIT = "e829a5b2df2e088baca1483a360ce640d3e82cf3"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
CACHE = "/var/cache/mcp-privsep-e2e/debian"
#: a host without systemd (its /sbin/init and runlevel: invoke-rc.d runs init scripts only there)
ENVIRONMENT = ("sysvinit-core",)
#: downloaded into the cached root, not installed: installs need the mirror less
PREFETCH = ("python3", "python3-venv", "sudo", "passwd", "procps", "psmisc", "systemd")
AGENT = "agent1"
VENV = "/usr/lib/mcp-privsep/venv"
SITE = f"{VENV}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
ROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # root's PATH on Debian
LOGIN_DEFS = """
# mcp-privsep tests: this root's users must not share uids with the host's (same kernel)
SYS_UID_MIN 60100
SYS_UID_MAX 60999
SYS_GID_MIN 60100
SYS_GID_MAX 60999
UID_MIN 61000
UID_MAX 61999
GID_MIN 61000
GID_MAX 61999
"""


def sh(*argv: str, check: bool = True, timeout: float = 600, **kw: Any) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


# --- the Debian root ------------------------------------------------------------------------------------


def _mirror_problem() -> str | None:
    try:
        with urllib.request.urlopen(f"{MIRROR}/dists/{SUITE}/Release", timeout=20) as resp:
            resp.read(64)
    except OSError as exc:
        return f"{MIRROR} is unreachable ({exc}): cannot bootstrap Debian 12"
    return None


def base_root() -> str:
    """Today's cached Debian 12 root (made on first use: debootstrap, then the environment above)."""
    os.makedirs(CACHE, mode=0o755, exist_ok=True)
    final = f"{CACHE}/{SUITE}-minbase-{time.strftime('%Y%m%d')}"
    with open(f"{CACHE}/.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.exists(f"{final}/.complete"):
            return final
        for old in glob.glob(f"{CACHE}/{SUITE}-*"):  # yesterday's, or a half-made one
            shutil.rmtree(old, ignore_errors=True)
        problem = _mirror_problem()
        if problem:
            pytest.skip(problem)
        if shutil.which("debootstrap") is None:
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            sh("apt-get", "install", "-y", "-qq", "debootstrap", env=env)
        tmp = f"{final}.tmp"
        sh("debootstrap", "--variant=minbase", SUITE, tmp, MIRROR, timeout=900)
        Path(f"{tmp}/etc/hosts").write_text(f"127.0.0.1\tlocalhost\n127.0.1.1\t{socket.gethostname()}\n")
        with open(f"{tmp}/etc/login.defs", "a") as fh:
            fh.write(LOGIN_DEFS)
        with Chroot(tmp) as root:
            root.run("apt-get", "update", "-q")
            root.apt("install", *ENVIRONMENT)
            root.run("apt-get", "install", "-y", "-q", "--no-install-recommends", "--download-only", *PREFETCH)
        Path(f"{tmp}/.complete").touch()
        os.rename(tmp, final)
        return final


class Chroot:
    """A Debian root, entered with chroot from a private mount namespace that holds its /proc and /dev."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.holder = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "sleep", "infinity"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        mine = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 10
        while os.readlink(f"/proc/{self.holder.pid}/ns/mnt") == mine:
            assert time.monotonic() < deadline, "unshare made no mount namespace"
            time.sleep(0.01)
        r = root
        self.host("mount", "--bind", r, r)  # a mount point: the spawner makes mounts private from "/"
        self.host("mount", "-t", "proc", "proc", f"{r}/proc")
        self.host("mount", "-t", "tmpfs", "-o", "mode=0755,size=16m", "tmpfs", f"{r}/dev")
        for name, major, minor in (("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8),
                                   ("urandom", 1, 9), ("tty", 5, 0)):  # fmt: skip
            self.host("mknod", "-m", "666", f"{r}/dev/{name}", "c", str(major), str(minor))
        self.host("mkdir", "-m", "1777", f"{r}/dev/shm")

    def __enter__(self) -> Chroot:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, *argv: str) -> None:
        sh("nsenter", "-t", str(self.holder.pid), "-m", "--", *argv)

    def run(
        self, *argv: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 600
    ) -> subprocess.CompletedProcess[str]:
        base = {"PATH": ROOT_PATH, "LANG": "C.UTF-8", "HOME": "/root", "DEBIAN_FRONTEND": "noninteractive"}
        pairs = [f"{k}={v}" for k, v in {**base, **(env or {})}.items()]
        prefix = ["nsenter", "-t", str(self.holder.pid), "-m", "--", "chroot", self.root, "/usr/bin/env", "-i"]
        return sh(*prefix, *pairs, *argv, check=check, timeout=timeout)

    def apt(self, verb: str, *args: str, env: dict[str, str] | None = None) -> str:
        """``apt-get VERB -y ARGS`` (installs without recommends); an outdated index is refreshed once."""
        argv = ["apt-get", verb, "-y", "-q", "-o", "Dpkg::Use-Pty=0", "--no-install-recommends", *args]
        proc = self.run(*argv, env=env, check=False)
        if proc.returncode != 0 and ("404" in proc.stdout + proc.stderr or "Unable to locate" in proc.stderr):
            self.run("apt-get", "update", "-q")
            proc = self.run(*argv, env=env, check=False)
        assert proc.returncode == 0, f"apt-get {verb} {args} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout + proc.stderr

    def path(self, p: str) -> Path:
        return Path(self.root + p)

    def processes(self) -> list[int]:
        """Every process whose root is this one (the daemon, the spawner, the servers)."""
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                with contextlib.suppress(OSError):
                    if os.readlink(f"/proc/{entry}/root") == self.root:
                        found.append(int(entry))
        return found

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.run("/usr/sbin/mcp-brokerctl", "stop", check=False, timeout=60)
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in self.processes():
                with contextlib.suppress(OSError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + 10
            while self.processes() and time.monotonic() < deadline:
                time.sleep(0.1)
        self.holder.kill()
        self.holder.wait()


def set_runlevel(root: Chroot, level: str = "2") -> None:
    """A RUN_LVL record in utmp, as init writes at boot: ``runlevel`` (and so invoke-rc.d) reads it."""
    record = struct.pack(
        "hxxi32s4s32s256shhiii16s20s",
        1,  # RUN_LVL
        ord(level) + 256 * ord("N"),
        b"~",
        b"~~",
        b"runlevel",
        b"",
        0,
        0,
        0,
        int(time.time()),
        0,
        b"",
        b"",
    )
    root.path("/run/utmp").write_bytes(record)
    assert root.run("runlevel").stdout.split() == ["N", level]


def drop_stale_roots() -> None:
    """The roots of killed runs (a few hundred MB each): over an hour old, no process left in them."""
    roots = glob.glob(f"{BASE}/debian-root-*")
    if not roots:
        return
    in_use = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                in_use.add(os.readlink(f"/proc/{entry}/root"))
    for root in roots:
        with contextlib.suppress(OSError):
            if root not in in_use and time.time() - os.stat(root).st_mtime > 3600:  # not a run that is starting
                shutil.rmtree(root, ignore_errors=True)


def previous_deb(out: str) -> tuple[str, bool]:
    """The package of the previous release, built from git history; else this tree's as revision 1 (False)."""
    git = shutil.which("git")
    if git and sh(git, "-C", str(REPO), "cat-file", "-e", f"{PREVIOUS_COMMIT}^{{commit}}", check=False).returncode == 0:
        src = f"{out}/src"
        os.makedirs(src)
        archive = subprocess.Popen([git, "-C", str(REPO), "archive", PREVIOUS_COMMIT], stdout=subprocess.PIPE)
        sh("tar", "-x", "-C", src, stdin=archive.stdout)
        assert archive.wait() == 0
        return make_deb(Path(src), f"{out}/dist"), True
    return make_deb(REPO, f"{out}/dist", revision="1"), False


def in_thread(fn: Callable[[], Any]) -> Callable[[], Any]:
    """Start ``fn`` now; the returned function waits for it and returns its result (or raises what it raised)."""
    box: dict[str, Any] = {}

    def body() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # pytest.skip included: re-raised in the caller
            box["error"] = exc

    thread = threading.Thread(target=body, daemon=True)
    thread.start()

    def result() -> Any:
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    return result


# --- the scenario ---------------------------------------------------------------------------------------


def tree_digest(root: Chroot, *dirs: str, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """path -> sha256 of every file below ``dirs`` (inside the root)."""
    out = {}
    for d in dirs:
        for p in sorted(root.path(d).rglob("*")):
            name = str(p)[len(root.root) :]
            if p.is_file() and not p.is_symlink() and name not in skip:
                out[name] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@dataclass
class Debian:
    root: Chroot
    new_deb: str
    old_deb: str
    from_previous_release: bool
    upgrade_output: str = ""
    before: dict[str, str] = field(default_factory=dict)
    #: what debootstrap put in /usr/local (base-files' empty tree and its man link): all that may be there
    usr_local: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def agent(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = self.root.run("runuser", "-u", AGENT, "--", *argv, env={"HOME": f"/home/{AGENT}"}, check=False)
        if check:
            assert proc.returncode == 0, f"{argv} as {AGENT}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        return proc

    def ctl(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.root.run("mcp-brokerctl", *argv, check=check)

    def wait_up(self, *servers: str) -> None:
        deadline = time.monotonic() + 60
        while True:
            out = self.ctl("status", check=False).stdout
            if all(f"server {s} [stdio]: up" in out for s in servers):
                return
            assert time.monotonic() < deadline, f"servers {servers} not up:\n{out}"
            time.sleep(0.3)


#: what an upgrade must keep byte for byte (config, allowlists, secrets, the agents' list; servers' homes)
OPERATOR_FILES = ("/etc/mcp-privsep", "/var/lib/mcp-privsep-servers")
#: ... except the agents' table, which install writes again from the agents' list
INSTALL_WRITES = ("/etc/mcp-privsep/mcp.sh",)

OPS_SERVER = """\
# an operator's server, run from the previous package's venv (as its README invited)
[servers.ops]
command = "/opt/mcp-privsep/venv/bin/python"
args = ["-m", "mcp_servers.demo"]
env_file = "/etc/mcp-privsep/secrets/ops.env"
"""


@pytest.fixture(scope="module")
def debian(request: pytest.FixtureRequest) -> Iterator[Debian]:
    started = time.monotonic()
    drop_stale_roots()
    work = tempfile.mkdtemp(prefix="mcp-privsep-debian-")
    try:
        base = in_thread(base_root)
        old = in_thread(lambda: previous_deb(work))
        new_deb = built_deb(request.config)
        base_dir = base()
        old_deb, from_previous = old()
        built = time.monotonic()
        os.makedirs(BASE, mode=0o755, exist_ok=True)
        root_dir = tempfile.mkdtemp(prefix="debian-root-", dir=BASE)
        os.rmdir(root_dir)
        sh("cp", "-a", "--reflink=auto", base_dir, root_dir)
        os.unlink(f"{root_dir}/.complete")
        for deb in (old_deb, new_deb):
            shutil.copy(deb, f"{root_dir}/root/")
        root = Chroot(root_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    d = Debian(root, f"/root/{os.path.basename(new_deb)}", f"/root/{os.path.basename(old_deb)}", from_previous)
    d.timings["build and bootstrap"] = built - started
    d.usr_local = usr_local_files(root)
    try:
        set_runlevel(root)
        t = time.monotonic()
        # --- the previous release, used as its README said ------------------------------------------------
        root.apt("install", d.old_deb)
        root.run("useradd", "--create-home", "--shell", "/bin/sh", AGENT)
        d.ctl("install", "--agent", AGENT)
        etc = root.path("/etc/mcp-privsep")
        with open(etc / "broker.toml", "a") as fh:
            fh.write("# the operator's own note\n")
        with open(etc / "allowed-actions.txt", "a") as fh:
            fh.write("ops.echo   # the operator's server\n")
        (etc / "servers.d/ops.toml").write_text(OPS_SERVER)
        (etc / "secrets/ops.env").write_text("OPS_TOKEN=ops-0123456789abcdef\n")
        os.chmod(etc / "secrets/ops.env", 0o600)
        if not from_previous:  # this tree's venv has the same module
            (etc / "servers.d/ops.toml").write_text(OPS_SERVER.replace("/opt/mcp-privsep", "/usr/lib/mcp-privsep"))
        root.run("chown", "root:mcp-broker", "/etc/mcp-privsep/servers.d/ops.toml")
        root.run("chmod", "0640", "/etc/mcp-privsep/servers.d/ops.toml")
        d.ctl("install")  # the new server's user
        if root.run("/etc/init.d/mcp-brokerd", "status", check=False).returncode != 0:
            root.run("mcp-brokerd", "--daemon")  # 0.1.0-1 did not start it
        else:
            d.ctl("reload")  # a package that did: it learns of the new server
        d.wait_up("demo", "ops")
        d.ctl("pins", "accept", "--yes", "demo.echo", "ops.echo")
        assert d.agent("mcp", "call", "demo.echo", "text=before").stdout.strip() == "before"
        assert d.agent("mcp", "call", "ops.echo", "text=ops-before").stdout.strip() == "ops-before"
        home = root.path("/var/lib/mcp-privsep-servers/ops/notes.txt")
        home.write_text("what the ops server keeps\n")
        d.before = tree_digest(root, *OPERATOR_FILES, skip=INSTALL_WRITES)
        d.timings["previous release"] = time.monotonic() - t
        # --- the upgrade ---------------------------------------------------------------------------------
        t = time.monotonic()
        d.upgrade_output = root.apt("install", d.new_deb)
        d.timings["upgrade"] = time.monotonic() - t
        yield d
    finally:
        d.timings["total"] = time.monotonic() - started
        print(f"\ntest_deb_debian_live timings (s): {', '.join(f'{k} {v:.0f}' for k, v in d.timings.items())}")
        root.close()
        shutil.rmtree(root.root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def usr_local_files(root: Chroot) -> list[str]:
    return sorted(str(p) for p in root.path("/usr/local").rglob("*") if not p.is_dir() or p.is_symlink())


def test_upgrade_from_the_previous_package_keeps_operator_files_and_servers(debian: Debian) -> None:
    d, root = debian, debian.root
    version = os.path.basename(d.new_deb).split("_")[1]
    assert f"Unpacking mcp-privsep ({version}) over " in d.upgrade_output, d.upgrade_output
    after = tree_digest(root, *OPERATOR_FILES, skip=INSTALL_WRITES)
    assert after == d.before  # byte for byte: config, allowlist, secrets, gate-users, servers' homes
    assert usr_local_files(root) == d.usr_local
    rule = f"{AGENT} ALL=(mcp-gate-{AGENT}) NOPASSWD: /usr/sbin/mcp-gate"
    assert rule in root.path("/etc/sudoers.d/mcp-privsep").read_text()
    if d.from_previous_release:
        assert "removed /usr/local/bin/mcp" in d.upgrade_output, d.upgrade_output
        assert root.path("/opt/mcp-privsep/venv/bin/python").exists()  # servers may still run from it: kept
    d.wait_up("demo", "ops")
    assert root.run("sh", "-c", "for c in mcp-brokerctl mcp-brokerd; do command -v $c; done").stdout.split() == [
        "/usr/sbin/mcp-brokerctl",
        "/usr/sbin/mcp-brokerd",
    ]
    assert d.agent("sh", "-c", "command -v mcp").stdout.strip() == "/usr/bin/mcp"
    assert d.agent("mcp", "call", "demo.echo", "text=after").stdout.strip() == "after"
    assert d.agent("mcp", "call", "ops.echo", "text=ops-after").stdout.strip() == "ops-after"


def test_the_daemon_runs_from_the_init_script(debian: Debian) -> None:
    d, root = debian, debian.root
    assert not root.path("/run/systemd/system").exists()  # no systemd here: the init script's turn
    assert glob.glob(f"{root.root}/etc/rc2.d/S*mcp-brokerd"), "update-rc.d made no start link"
    assert glob.glob(f"{root.root}/etc/rc0.d/K*mcp-brokerd"), "update-rc.d made no stop link"
    root.run("invoke-rc.d", "mcp-brokerd", "stop")
    assert root.run("/etc/init.d/mcp-brokerd", "status", check=False).returncode == 3
    assert d.agent("mcp", "call", "demo.echo", "text=x", check=False).returncode == 69
    root.run("invoke-rc.d", "mcp-brokerd", "start")
    assert root.run("/etc/init.d/mcp-brokerd", "status").stdout.strip().endswith("mcp-brokerd is running.")
    pid = int(root.path("/run/mcp-privsep/mcp-brokerd.pid").read_text())
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1] == b"/usr/sbin/mcp-brokerd"
    root.run("invoke-rc.d", "mcp-brokerd", "reload")
    d.wait_up("demo")
    assert d.agent("mcp", "call", "demo.echo", "text=init").stdout.strip() == "init"


def test_an_agent_call_works_and_doctor_is_green(debian: Debian) -> None:
    d, root = debian, debian.root
    other = "agent2"
    root.run("useradd", "--create-home", "--shell", "/bin/sh", other)
    d.ctl("install", "--agent", other)
    d.ctl("pins", "accept", "--yes", "demo.echo")
    proc = root.run("runuser", "-u", other, "--", "mcp", "call", "demo.echo", "text=x", check=False)
    assert (proc.returncode, proc.stdout.strip(), proc.stderr) == (0, "x", ""), proc
    doctor = d.ctl("doctor", check=False)
    assert doctor.returncode == 0 and "doctor: all green" in doctor.stdout, doctor.stdout + doctor.stderr
    assert f"ok      package: the code in {VENV} and the commands are as the package shipped them" in doctor.stdout
    if d.from_previous_release:
        assert "WARNING package: /opt/mcp-privsep/venv is not the package's code" in doctor.stdout, doctor.stdout
    # sudo's host name noise: on every call's stderr, and doctor says how to fix it
    hosts = root.path("/etc/hosts")
    kept = hosts.read_text()
    hosts.write_text("127.0.0.1\tlocalhost\n")
    try:
        noisy = d.agent("mcp", "call", "demo.echo", "text=y")
        assert "unable to resolve host" in noisy.stderr, noisy
        warned = d.ctl("doctor", "-q", check=False).stdout
        assert "WARNING host: sudo prints 'sudo: unable to resolve host" in warned, warned
        assert f"127.0.1.1 {socket.gethostname()}" in warned
    finally:
        hosts.write_text(kept)
    assert d.agent("mcp", "call", "demo.echo", "text=z").stderr == ""


def test_dpkg_knows_every_file_and_verify_sees_a_modified_gate(debian: Debian) -> None:
    d, root = debian, debian.root
    gate_py = f"{SITE}/broker/gate/verbs.py"
    owners = root.run("dpkg", "-S", "/usr/sbin/mcp-gate", "/usr/bin/mcp", "/usr/sbin/mcp-brokerd", gate_py).stdout
    assert [line.split(":")[0] for line in owners.splitlines()] == ["mcp-privsep"] * 4, owners
    listed = set(root.run("dpkg", "-L", "mcp-privsep").stdout.splitlines())
    unowned = [
        str(p)[len(root.root) :]
        for p in root.path(VENV).rglob("*")
        if "__pycache__" not in p.parts and str(p)[len(root.root) :] not in listed
    ]
    assert not unowned, unowned[:10]
    assert root.path(f"{SITE}/broker/gate/__pycache__").is_dir()  # postinst compiled it (py3compile)
    assert root.run("dpkg", "--verify", "mcp-privsep").stdout == ""
    for target in (gate_py, "/usr/sbin/mcp-gate"):
        path = root.path(target)
        original = path.read_bytes()
        try:
            path.write_bytes(original + b"# changed behind dpkg's back\n")
            verify = root.run("dpkg", "--verify", "mcp-privsep", check=False).stdout
            assert re.search(rf"^..5\S* +{re.escape(target)}$", verify, re.M), verify
            warned = d.ctl("doctor", "-q", check=False).stdout
            assert "WARNING package: 1 file(s) of the package changed outside dpkg: " + target in warned, warned
        finally:
            path.write_bytes(original)
    assert root.run("dpkg", "--verify", "mcp-privsep").stdout == ""


def test_the_unit_passes_systemd_analyze_verify(debian: Debian) -> None:
    root = debian.root
    if root.run("sh", "-c", "command -v systemd-analyze", check=False).returncode != 0:
        root.apt("install", "systemd")  # installed, not running: /run/systemd/system stays absent
    assert not root.path("/run/systemd/system").exists()
    proc = root.run("systemd-analyze", "verify", "--man=no", "mcp-brokerd.service", check=False)
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr
    # the check is real: it does look for the Exec commands in this root
    unit = root.path("/lib/systemd/system/mcp-brokerd.service").read_text()
    broken = root.path("/etc/systemd/system/mcp-brokerd-broken.service")
    broken.write_text(unit.replace("ExecReload=/bin/kill", "ExecReload=/bin/no-such-kill"))
    try:
        proc = root.run("systemd-analyze", "verify", "--man=no", broken.name, check=False)
        assert proc.returncode != 0 and "/bin/no-such-kill" in proc.stdout + proc.stderr, proc
    finally:
        broken.unlink()


def test_remove_then_install_keeps_the_agents_sudo_rules(debian: Debian) -> None:
    d, root = debian, debian.root
    dropin = root.path("/etc/sudoers.d/mcp-privsep")
    rules = dropin.read_bytes()
    agents = root.path("/etc/mcp-privsep/gate-users").read_bytes()
    out = root.apt("remove", "mcp-privsep")
    assert "removed the sudoers drop-in" in out and "restores each agent's sudo rule" in out, out
    assert not dropin.exists() and not root.path(VENV).exists()
    assert root.run("dpkg-query", "-W", "-f", "${db:Status-Abbrev}", "mcp-privsep").stdout.strip() == "rc"
    assert f"mcp-gate-{AGENT}" not in root.run("sudo", "-l", "-U", AGENT, check=False).stdout
    assert not root.path("/run/mcp-privsep/mcp-brokerd.pid").exists()
    assert root.path("/etc/mcp-privsep/gate-users").read_bytes() == agents
    out = root.apt("install", d.new_deb)
    assert dropin.read_bytes() == rules  # every agent's rule, as it was
    assert usr_local_files(root) == d.usr_local
    d.wait_up("demo")
    assert d.agent("mcp", "call", "demo.echo", "text=again").stdout.strip() == "again"


def test_purge_keeps_the_audit_trail_unless_confirmed(debian: Debian) -> None:
    d, root = debian, debian.root
    audit = root.path("/var/log/mcp-privsep/audit.jsonl")
    trail = audit.read_bytes()
    assert trail.count(b"\n") > 10
    out = root.apt("purge", "mcp-privsep")
    assert "KEPT the audit trail in /var/log/mcp-privsep" in out and "MCP_PRIVSEP_PURGE_AUDIT=yes" in out, out
    assert audit.read_bytes().startswith(trail)  # every record (the daemon's last ones come after)
    assert root.path("/var/log/mcp-privsep/audit.jsonl.head").exists()
    for gone in ("/etc/mcp-privsep", "/var/lib/mcp-privsep", "/etc/init.d/mcp-brokerd", "/etc/sudoers.d/mcp-privsep"):
        assert not root.path(gone).exists(), gone
    assert not glob.glob(f"{root.root}/etc/rc?.d/*mcp-brokerd")
    assert root.run("dpkg-query", "-W", "mcp-privsep", check=False).returncode != 0
    # a first install: the daemon starts by itself, nothing goes to /usr/local
    out = root.apt("install", d.new_deb)
    assert "Starting mcp-privsep broker: mcp-brokerd" in out, out
    assert root.run("/etc/init.d/mcp-brokerd", "status").returncode == 0
    assert usr_local_files(root) == d.usr_local
    out = root.apt("purge", "mcp-privsep", env={"MCP_PRIVSEP_PURGE_AUDIT": "yes"})
    assert "deleted the audit trail /var/log/mcp-privsep" in out, out
    assert not root.path("/var/log/mcp-privsep").exists()
