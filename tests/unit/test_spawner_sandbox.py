"""Privileged tests of ``broker.spawner.sandbox.launch``: what a server really sees from inside its sandbox.

No mocks: real locked system users, real namespaces, real mounts, real
Landlock. Each test launches :data:`spawner_helpers.PROBE` (a Python
script) as the server; it inspects its own situation and prints one JSON
report, and the test compares what it *saw* with what the sandbox's
report (``Started.report["protections"]``) claims:

- identity: its own uid and gid, no supplementary groups, no capability
  in any set (the bounding set too), no_new_privs;
- a pid namespace of its own (it is pid 1 and sees nothing else), so it
  can neither signal nor trace the test process; and, where the pid
  namespace is off, Landlock's scopes still stop signals, ptrace and
  abstract unix sockets towards a process of the *same* uid outside;
- the file system: / read-only, a fresh private /tmp, the hidden
  directories empty and their files gone, its home and write_paths
  writable, read_paths read-only, and nothing else writable even where
  Unix permissions would allow it (Landlock, checked on its own with the
  mount namespace off);
- the network: ``none`` leaves only ``lo`` and no way out; ``connect_ports``
  lets exactly those TCP ports through;
- resource limits as planned; ``command_sha256`` checked before exec;
- stopping kills the whole tree, whatever it forked and detached;
- ``strict`` turns a missing protection into a refusal.

The pure function ``readable_roots`` is tested on a temporary tree.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from broker.core.servers import Limits
from broker.spawner import kernel, sandbox
from broker.spawner.sandbox import Plan, SandboxError, Started
from tests.unit import spawner_helpers as h

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real users, namespaces and Landlock")

DENIED = {"EROFS", "EACCES", "EPERM"}
ZERO_CAPS = "0000000000000000"
SECRET_CFG = "TOP-SECRET-CONFIG-VALUE"
SECRET_STATE = "TOP-SECRET-STATE-VALUE"


@dataclass
class Env:
    base: str
    pw1: pwd.struct_passwd
    pw2: pwd.struct_passwd
    home1: str
    home2: str
    probe: str
    tree: str
    hidden: tuple[str, ...]
    secret_files: tuple[str, ...]
    rw: str
    ro: str
    ro_file: str
    outside: str


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    pw1, pw2 = h.ensure_user(h.USER1), h.ensure_user(h.USER2)
    with h.staging("mcp-privsep-ut-sandbox-") as base:
        homes = []
        for name, pw in (("home1", pw1), ("home2", pw2)):
            home = f"{base}/homes/{name}"
            os.makedirs(home, mode=0o700)
            os.chmod(f"{base}/homes", 0o755)
            os.chown(home, pw.pw_uid, pw.pw_gid)
            os.chmod(home, 0o700)
            homes.append(home)
        probe = h.write(f"{base}/bin/probe.py", h.PROBE)
        tree = h.write(f"{base}/bin/tree.py", h.TREE)
        # what a server must never see: world-readable on purpose, so only the sandbox can hide it
        cfg = h.write(f"{base}/etc/mcp-privsep/allowed-actions.txt", SECRET_CFG)
        state = h.write(f"{base}/var/lib/mcp-privsep/state.json", SECRET_STATE)
        shared = h.write(f"{base}/homes/left-behind.txt", SECRET_STATE)
        # like Paths.hidden_from_servers(): the broker's directories, and the parent of every server's home
        hidden = (f"{base}/etc/mcp-privsep", f"{base}/var/lib/mcp-privsep", f"{base}/homes")
        rw = f"{base}/data/rw"
        os.makedirs(rw)
        os.chmod(rw, 0o1777)
        ro = f"{base}/data/ro"
        os.makedirs(ro)
        os.chmod(ro, 0o1777)  # world-writable: only the sandbox makes it read-only
        ro_file = h.write(f"{ro}/readme.txt", "readable")
        outside = f"{base}/outside"
        os.makedirs(outside)
        os.chmod(outside, 0o1777)
        yield Env(
            base, pw1, pw2, homes[0], homes[1], probe, tree, hidden, (cfg, state, shared), rw, ro, ro_file, outside
        )


def plan(env: Env, tasks: dict[str, Any] | None = None, **overrides: Any) -> Plan:
    fields: dict[str, Any] = {
        "instance": "ut",
        "user": h.USER1,
        "uid": env.pw1.pw_uid,
        "gid": env.pw1.pw_gid,
        "home": env.home1,
        "command": h.PYTHON,
        "args": ("-I", env.probe, json.dumps(tasks or {})),
        "cwd": env.home1,
        "env": {"PATH": "/usr/bin:/bin", "HOME": env.home1, "LANG": "C.UTF-8"},
        "hidden": env.hidden,
    }
    fields.update(overrides)
    return Plan(**fields)


def finish(started: Started, timeout: float = 15.0) -> tuple[bytes, bytes, int]:
    """Close its stdin, read its output to the end, reap the keeper: (stdout, stderr, exit code)."""
    os.close(started.stdin)
    try:
        out = h.read_all(started.stdout, timeout)
        err = h.read_all(started.stderr, timeout)
    finally:
        os.close(started.stdout)
        os.close(started.stderr)
    _, status = os.waitpid(started.pid, 0)
    return out, err, os.waitstatus_to_exitcode(status)


def probe(env: Env, tasks: dict[str, Any] | None = None, **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Launch the probe: (what it saw, the sandbox's report)."""
    started = sandbox.launch(plan(env, tasks, **overrides))
    out, err, code = finish(started)
    assert code == 0, f"the probe failed ({code}): {err.decode(errors='replace')[-3000:]}"
    return h.parse_report(out, err), started.report


def reap_zombies() -> None:
    """Collect this process's dead children (a keeper that a failed launch killed)."""
    me = str(os.getpid())
    for pid in h.all_pids():
        try:
            with open(f"/proc/{pid}/stat", encoding="utf-8") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] == "Z" and fields[1] == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.fixture(autouse=True)
def nothing_left(env: Env) -> Iterator[None]:
    """After each test: no process of the test users is left, and no dead keeper is left unreaped."""
    yield
    reap_zombies()
    for pw in (env.pw1, env.pw2):
        left = h.wait_no_uid(pw.pw_uid, timeout=3.0)
        for pid in left:
            h.kill_quietly(pid)
        assert not left, f"processes of {pw.pw_name} outlived the test: {left}"


def mount_at(report: dict[str, Any], point: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [m for m in report["mounts"] if m["point"] == point]
    assert found, f"no mount at {point}: {[m['point'] for m in report['mounts']]}"
    return found[-1]  # the top one


# --- identity -----------------------------------------------------------------------------------


def test_the_server_runs_as_its_user_without_groups_capabilities_or_new_privileges(env: Env) -> None:
    seen, report = probe(env)
    assert (seen["uid"], seen["euid"]) == (env.pw1.pw_uid, env.pw1.pw_uid)
    assert (seen["gid"], seen["egid"]) == (env.pw1.pw_gid, env.pw1.pw_gid)
    assert set(seen["groups"]) <= {env.pw1.pw_gid}, "supplementary groups survived"
    st = seen["status"]
    assert st["NoNewPrivs"] == "1"
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert st[cap] == ZERO_CAPS, f"{cap} is {st[cap]}"
    assert st["Seccomp"] is not None  # reported only: the sandbox installs no seccomp filter (yet)
    p = report["protections"]
    assert report["ok"] is True and report["warnings"] == []
    assert (p["user"], p["uid"]) == (h.USER1, env.pw1.pw_uid)
    assert p["no_new_privs"] is True
    assert p["landlock"] == kernel.landlock_abi() >= 6
    assert p["landlock_scope"] is True
    assert p["command_sha256"] == "not set"
    # its environment is the plan's, not the spawner's
    assert seen["env"] == {"PATH": "/usr/bin:/bin", "HOME": env.home1, "LANG": "C.UTF-8"}
    assert seen["cwd"] == env.home1


# --- processes ----------------------------------------------------------------------------------


def test_a_pid_namespace_of_its_own_hides_and_protects_outside_processes(env: Env) -> None:
    me = os.getpid()
    seen, report = probe(env, {"kill": [me, 1], "ptrace": [me]})
    assert seen["pid"] == 1, "the server is not the first process of a pid namespace"
    assert seen["proc_pids"] == [1], f"/proc shows more than itself: {seen['proc_pids']}"
    assert seen["proc_of"][str(me)] is False
    assert seen["kill"][str(me)] == "ESRCH"
    assert seen["ptrace"][str(me)] in {"ESRCH", "EPERM"}
    assert seen["kill"]["1"] == "ok"  # itself, the only process it knows
    p = report["protections"]
    assert p["pid_namespace"] is True and p["own_proc"] is True
    proc = mount_at(seen, "/proc")
    assert proc["fstype"] == "proc" and "hidepid=" in proc["super"], proc


def test_landlock_scopes_stop_signals_ptrace_and_abstract_sockets_to_the_same_uid_outside(env: Env) -> None:
    """With the pid namespace off, a process of the *same* uid outside is visible, and still out of reach."""
    sleeper = subprocess.Popen(
        ["/bin/sleep", "60"], user=env.pw1.pw_uid, group=env.pw1.pw_gid, extra_groups=[], cwd="/"
    )
    name = f"mcp-privsep-ut-{os.getpid()}-{time.monotonic_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind("\0" + name)
        server.listen(4)
        tasks = {"kill": [sleeper.pid], "ptrace": [sleeper.pid], "abstract": [name]}
        seen, report = probe(env, tasks, disabled=frozenset({"pid_namespace"}))
        assert report["protections"]["pid_namespace"] is False
        assert any(w.startswith("pid_namespace") for w in report["warnings"])
        # hidepid=2 asks "may it ptrace it?", and Landlock says no: it does not even see it in /proc
        assert seen["proc_of"][str(sleeper.pid)] is False
        assert seen["kill"][str(sleeper.pid)] == "EPERM"
        assert seen["ptrace"][str(sleeper.pid)] == "EPERM"
        assert seen["abstract"][name] == "EPERM"
        # the control: without Landlock, the same uid reaches it (so the EPERMs above are Landlock's)
        seen, _ = probe(env, tasks, disabled=frozenset({"pid_namespace", "landlock"}))
        assert seen["proc_of"][str(sleeper.pid)] is True
        assert seen["kill"][str(sleeper.pid)] == "ok"
        assert seen["abstract"][name] == "ok"
        assert seen["ptrace"][str(sleeper.pid)] == "ok"
    finally:
        server.close()
        sleeper.kill()
        sleeper.wait()


# --- the file system -----------------------------------------------------------------------------


def test_the_file_system_is_read_only_with_a_private_tmp_hidden_dirs_and_its_own_paths(env: Env) -> None:
    marker = tempfile.NamedTemporaryFile(prefix="mcp-privsep-ut-marker-", dir="/tmp")  # noqa: SIM115
    try:
        tasks = {
            "write": [
                "/usr/mcp-ut-probe",
                "/etc/mcp-ut-probe",
                f"{env.outside}/escaped",
                f"{env.ro}/written",
                "/tmp/mine",
                "/var/tmp/mine",
                "/dev/shm/mine",
                f"{env.home1}/mine",
                f"{env.rw}/mine",
                f"{env.hidden[0]}/planted",
                f"{env.home2}/planted",
            ],
            "read": [*env.secret_files, env.ro_file, f"{env.home1}/mine"],
            "listdir": list(env.hidden),
        }
        seen, report = probe(env, tasks, write_paths=(env.rw,), read_paths=(env.ro,))
    finally:
        marker.close()
    p = report["protections"]
    assert p["system_read_only"] is True and p["private_tmp"] is True and p["broker_dirs_hidden"] is True
    assert p["writable"] == [os.path.realpath(x) for x in (env.home1, env.rw)]  # what status says it may write
    assert "ro" in mount_at(seen, "/")["options"].split(",")
    w = seen["write"]
    for path in ("/usr/mcp-ut-probe", "/etc/mcp-ut-probe", f"{env.outside}/escaped", f"{env.ro}/written"):
        assert w[path] in DENIED, f"{path}: {w[path]}"
    for path in (f"{env.hidden[0]}/planted", f"{env.home2}/planted"):
        assert w[path] in DENIED | {"ENOENT"}, f"{path}: {w[path]}"
    for path in ("/tmp/mine", "/var/tmp/mine", "/dev/shm/mine", f"{env.home1}/mine", f"{env.rw}/mine"):
        assert w[path] == "ok", f"{path}: {w[path]}"
    # the private /tmp: a tmpfs of its own, empty at the start (the test's marker in the real /tmp is not there)
    for point in scratch_dirs():
        assert mount_at(seen, point)["fstype"] == "tmpfs"
    assert seen["tmp"] == {"ok": []}
    # hidden: empty (or not even listable), and their files are gone
    for d in env.hidden[:2]:
        assert seen["listdir"][d] in ({"ok": []}, "EACCES"), f"{d}: {seen['listdir'][d]}"
    # the homes' parent holds its own home only (every other server's is gone)
    assert seen["listdir"][env.hidden[2]] in ({"ok": ["home1"]}, "EACCES"), seen["listdir"][env.hidden[2]]
    for f in env.secret_files:
        assert seen["read"][f] in {"ENOENT", "EACCES"}, f"{f}: {seen['read'][f]}"
    assert SECRET_CFG not in json.dumps(seen) and SECRET_STATE not in json.dumps(seen)
    assert seen["read"][env.ro_file] == {"ok": "readable"}
    assert seen["read"][f"{env.home1}/mine"] == {"ok": "x"}
    # what it wrote where it may is real, outside the sandbox too; nothing leaked where it may not
    assert os.path.exists(f"{env.rw}/mine") and os.path.exists(f"{env.home1}/mine")
    assert not os.path.exists(f"{env.outside}/escaped") and not os.path.exists(f"{env.ro}/written")
    assert not os.path.exists(f"{env.hidden[0]}/planted") and not os.path.exists("/tmp/mine")
    for path in (f"{env.rw}/mine", f"{env.home1}/mine"):
        os.unlink(path)


def scratch_dirs() -> tuple[str, ...]:
    return tuple(d for d in sandbox.SCRATCH if os.path.isdir(d) and not os.path.islink(d))


def test_landlock_alone_confines_writes_and_hides_dirs_where_unix_permissions_allow(env: Env) -> None:
    """The mount namespace off: the only thing between the server and a world-writable directory is Landlock."""
    tasks = {
        "write": [f"{env.outside}/escaped", f"{env.rw}/mine", f"{env.home1}/mine"],
        "read": list(env.secret_files),
    }
    seen, report = probe(env, tasks, write_paths=(env.rw,), disabled=frozenset({"mount_namespace"}))
    assert report["protections"]["system_read_only"] is False
    assert any(w.startswith("mount_namespace") for w in report["warnings"])
    assert seen["write"][f"{env.outside}/escaped"] == "EACCES"
    assert seen["write"][f"{env.rw}/mine"] == "ok"
    assert seen["write"][f"{env.home1}/mine"] == "ok"
    for f in env.secret_files:
        assert seen["read"][f] == "EACCES", f"{f}: {seen['read'][f]}"
    assert not os.path.exists(f"{env.outside}/escaped")
    # the control: with Landlock off too, Unix permissions alone let it write and read there
    seen, _ = probe(env, tasks, write_paths=(env.rw,), disabled=frozenset({"mount_namespace", "landlock"}))
    assert seen["write"][f"{env.outside}/escaped"] == "ok"
    assert seen["read"][env.secret_files[0]] == {"ok": SECRET_CFG}
    for path in (f"{env.outside}/escaped", f"{env.rw}/mine", f"{env.home1}/mine"):
        os.unlink(path)


def test_a_hidden_directory_reached_through_a_symlink_is_hidden_too(env: Env) -> None:
    """An operator who moved /etc/mcp-privsep (or /var/lib/mcp-privsep) elsewhere and left a symlink."""
    real = f"{env.base}/elsewhere/mcp-privsep"
    secret = h.write(f"{real}/allowed-actions.txt", SECRET_CFG)
    link = f"{env.base}/linked-etc"
    os.symlink(real, link)
    try:
        seen, report = probe(env, {"read": [f"{link}/allowed-actions.txt", secret]}, hidden=(*env.hidden, link))
        assert report["protections"]["broker_dirs_hidden"] is True
        assert SECRET_CFG not in json.dumps(seen), f"the server read the hidden file: {seen['read']}"
    finally:
        os.unlink(link)


# --- the network ---------------------------------------------------------------------------------


def test_network_none_leaves_only_loopback_and_no_way_out(env: Env) -> None:
    lst = h.listener()
    port = lst.getsockname()[1]
    try:
        seen, report = probe(env, {"connect": [port], "bind_tcp": True}, network="none")
    finally:
        lst.close()
    assert seen["ifaces"] == ["lo"]
    assert seen["connect"][str(port)] != "ok"
    assert seen["bind_tcp"] != "ok"
    p = report["protections"]
    assert p["network"] == "none" and p["network_namespace"] is True and p["landlock_net"] is True


def test_connect_ports_lets_exactly_those_tcp_ports_through(env: Env) -> None:
    allowed, other = h.listener(), h.listener()
    p_ok, p_no = allowed.getsockname()[1], other.getsockname()[1]
    try:
        seen, report = probe(env, {"connect": [p_ok, p_no], "bind_tcp": True}, connect_ports=(p_ok,))
        assert seen["connect"][str(p_ok)] == "ok"
        assert seen["connect"][str(p_no)] == "EACCES"
        assert seen["bind_tcp"] == "EACCES"
        p = report["protections"]
        assert p["network"] == f"host, tcp ports {p_ok}" and p["landlock_net"] is True
        assert p["network_namespace"] is False
        assert len(seen["ifaces"]) >= 1
        # the control: network host without ports reaches both
        seen, report = probe(env, {"connect": [p_ok, p_no]})
        assert seen["connect"] == {str(p_ok): "ok", str(p_no): "ok"}
        # ... but listening is still refused: no server may take a port the daemon connects to
        assert report["protections"]["landlock_net"] is True and report["protections"]["tcp_listen"] == []
    finally:
        allowed.close()
        other.close()


SQUAT = r"""
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
    s.listen(1)
except OSError as exc:
    print("refused", exc.errno, flush=True)
    sys.exit(0)
print("listening", flush=True)
s.settimeout(10)
conn, _ = s.accept()
print(repr(conn.recv(200)), flush=True)
"""


def test_a_server_cannot_listen_on_a_tcp_port_the_daemon_may_connect_to(env: Env) -> None:
    script = h.write(f"{env.base}/bin/squat.py", SQUAT)
    probe_sock = socket.socket()
    probe_sock.bind(("127.0.0.1", 0))
    port = probe_sock.getsockname()[1]
    probe_sock.close()
    started = sandbox.launch(plan(env, args=("-I", script, str(port))))
    try:
        first = h.read_line(started.stdout)
        if first == b"listening\n":
            with socket.create_connection(("127.0.0.1", port), timeout=5) as daemon:
                daemon.sendall(b"POST /mcp HTTP/1.1\r\nAuthorization: Bearer another-servers-token\r\n\r\n")
            leaked = h.read_line(started.stdout)
            assert b"another-servers-token" not in leaked, f"the server listened on 127.0.0.1:{port} and got {leaked!r}"
        assert first.startswith(b"refused"), first
    finally:
        finish(started)


# --- limits, the command ----------------------------------------------------------------------------


def test_resource_limits_are_the_plans(env: Env) -> None:
    limits = Limits(memory=256 << 20, processes=64, open_files=256, file_size=1 << 20)
    big = f"{env.home1}/big"
    seen, report = probe(env, {"fill": [[big, (1 << 20) + 1]]}, limits=limits)
    r = seen["rlimits"]
    assert r["RLIMIT_DATA"] == [limits.memory, limits.memory]
    assert r["RLIMIT_NPROC"] == [limits.processes, limits.processes]
    assert r["RLIMIT_NOFILE"] == [limits.open_files, limits.open_files]
    assert r["RLIMIT_FSIZE"] == [limits.file_size, limits.file_size]
    assert seen["fill"][big] == "EFBIG"
    assert os.path.getsize(big) == 1 << 20
    os.unlink(big)
    assert report["protections"]["rlimits"] == dataclasses.asdict(limits)
    # the private /tmp is memory: no larger than its limit
    tmp = mount_at(seen, "/tmp")
    assert tmp["fstype"] == "tmpfs" and f"size={(256 << 20) // 1024}k" in tmp["super"], tmp


def test_unlimited_limits_are_infinity(env: Env) -> None:
    # (processes stays finite: raising RLIMIT_NPROC above the spawner's hard limit needs CAP_SYS_RESOURCE)
    limits = Limits(memory=None, processes=64, open_files=1024, file_size=None)
    seen, report = probe(env, limits=limits)
    assert seen["rlimits"]["RLIMIT_DATA"] == [None, None]
    assert seen["rlimits"]["RLIMIT_FSIZE"] == [None, None]
    assert report["protections"]["rlimits"]["memory"] is None


def _sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def test_command_sha256_refuses_a_wrong_digest_and_runs_the_right_one(env: Env) -> None:
    with pytest.raises(SandboxError, match="sha256"):
        sandbox.launch(plan(env, command_sha256="0" * 64))
    reap_zombies()
    seen, report = probe(env, command_sha256=_sha256(h.PYTHON))
    assert report["protections"]["command_sha256"] == "verified"
    assert seen["uid"] == env.pw1.pw_uid


def test_command_sha256_runs_a_verified_script(env: Env) -> None:
    script = h.write(f"{env.base}/bin/hello.sh", "#!/bin/sh\necho verified-script-ran\n", mode=0o755)
    started = sandbox.launch(plan(env, command=script, args=(), command_sha256=_sha256(script)))
    out, _err, code = finish(started)
    assert started.report["protections"]["command_sha256"] == "verified"
    assert (out, code) == (b"verified-script-ran\n", 0)


def test_a_command_that_cannot_be_executed_is_an_error(env: Env) -> None:
    with pytest.raises(SandboxError, match="cannot execute"):
        sandbox.launch(plan(env, command=f"{env.base}/bin/missing", args=()))
    reap_zombies()
    with pytest.raises(SandboxError, match="a path of its definition"):
        sandbox.launch(plan(env, read_paths=(f"{env.base}/no/such/dir",)))
    reap_zombies()


# --- stopping -------------------------------------------------------------------------------------


def start_tree(env: Env, **overrides: Any) -> Started:
    """The TREE server as USER2: it forks, detaches a grandchild, and says so."""
    started = sandbox.launch(
        plan(
            env,
            user=h.USER2,
            uid=env.pw2.pw_uid,
            gid=env.pw2.pw_gid,
            home=env.home2,
            cwd=env.home2,
            args=("-I", env.tree),
            **overrides,
        )
    )
    assert h.read_line(started.stdout).startswith(b"grandchild ")
    assert h.read_line(started.stdout) == b"ready\n"
    assert len(h.live_pids_of_uid(env.pw2.pw_uid)) == 2  # the server and its detached grandchild
    return started


def close_pipes(started: Started) -> None:
    for fd in (started.stdin, started.stdout, started.stderr):
        os.close(fd)


def test_kill_keeper_kills_the_whole_tree_detached_grandchildren_too(env: Env) -> None:
    started = start_tree(env)
    t = time.monotonic()
    sandbox.kill_keeper(started.pid)
    os.waitpid(started.pid, 0)
    assert h.wait_no_uid(env.pw2.pw_uid, timeout=2.0) == []
    assert time.monotonic() - t < 2.0
    assert h.read_all(started.stdout) == b""  # its end: every writer is gone
    close_pipes(started)
    sandbox.kill_keeper(started.pid)  # a second stop of a gone keeper is harmless


def test_kill_uid_kills_every_process_of_the_uid(env: Env) -> None:
    started = start_tree(env)
    seen = sandbox.kill_uid(env.pw2.pw_uid)
    assert seen >= 2
    assert h.wait_no_uid(env.pw2.pw_uid, timeout=2.0) == []
    _, status = os.waitpid(started.pid, 0)  # its server gone, the keeper ends
    assert os.waitstatus_to_exitcode(status) != 0
    close_pipes(started)


def test_without_a_pid_namespace_the_keeper_leaves_a_detached_child_that_kill_uid_catches(env: Env) -> None:
    """Why a default account's stop also sweeps its uid: without a pid namespace, a detached child survives."""
    started = start_tree(env, disabled=frozenset({"pid_namespace"}))
    assert started.report["protections"]["pid_namespace"] is False
    sandbox.kill_keeper(started.pid)
    os.waitpid(started.pid, 0)
    time.sleep(0.2)
    left = h.live_pids_of_uid(env.pw2.pw_uid)
    assert len(left) == 1, f"expected exactly the detached grandchild, got {left}"
    assert sandbox.kill_uid(env.pw2.pw_uid) >= 1
    assert h.wait_no_uid(env.pw2.pw_uid) == []
    close_pipes(started)


def test_kill_uid_does_not_spin_on_zombies(env: Env) -> None:
    """A zombie of the uid (here our own unreaped child; on a host whose init reaps slowly, a killed server's)."""
    pid = os.fork()
    if pid == 0:
        os.setresgid(env.pw2.pw_gid, env.pw2.pw_gid, env.pw2.pw_gid)
        os.setresuid(env.pw2.pw_uid, env.pw2.pw_uid, env.pw2.pw_uid)
        os._exit(0)
    try:
        deadline = time.monotonic() + 5
        while "Z" not in h._status(pid).get("State", "") and time.monotonic() < deadline:
            time.sleep(0.01)
        t = time.monotonic()
        seen = sandbox.kill_uid(env.pw2.pw_uid)
        took = time.monotonic() - t
        assert (seen, took < 0.2) == (0, True), f"kill_uid saw {seen} and took {took:.2f} s for one zombie"
    finally:
        os.waitpid(pid, 0)


# --- strict --------------------------------------------------------------------------------------


def test_strict_refuses_to_start_without_landlock(env: Env) -> None:
    with pytest.raises(SandboxError, match="landlock") as info:
        sandbox.launch(plan(env, strict=True, disabled=frozenset({"landlock"})))
    assert "strict" in str(info.value)
    reap_zombies()
    assert h.wait_no_uid(env.pw1.pw_uid) == []


@pytest.mark.parametrize("missing", ["pid_namespace", "mount_namespace"])
def test_strict_refuses_to_start_without_a_namespace(env: Env, missing: str) -> None:
    with pytest.raises(SandboxError, match=missing):
        sandbox.launch(plan(env, strict=True, disabled=frozenset({missing})))
    reap_zombies()


def test_strict_with_everything_available_starts(env: Env) -> None:
    seen, report = probe(env, strict=True, network="none")
    assert report["warnings"] == []
    assert seen["uid"] == env.pw1.pw_uid and seen["pid"] == 1


def test_auto_without_landlock_starts_and_says_so(env: Env) -> None:
    seen, report = probe(env, disabled=frozenset({"landlock"}))
    assert report["protections"]["landlock"] == 0
    assert any("landlock" in w for w in report["warnings"])
    assert seen["status"]["NoNewPrivs"] == "1"  # the rest still holds


# --- readable_roots ----------------------------------------------------------------------------------


@pytest.fixture
def tree() -> Iterator[str]:
    top = tempfile.mkdtemp(prefix="mcp-privsep-ut-roots-")
    for d in ("etc/mcp-privsep/secrets", "etc/ssl", "var/lib/mcp-privsep", "var/lib/apt", "var/log", "usr/bin"):
        os.makedirs(f"{top}/{d}")
    for f in ("etc/passwd", "etc/mcp-privsep/broker.toml", "var/lib/dpkg-status"):
        h.write(f"{top}/{f}", "x")
    os.symlink("usr/bin", f"{top}/bin")
    os.symlink("/etc", f"{top}/etc/loop")
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_readable_roots_without_hidden_is_the_top(tree: str) -> None:
    assert sandbox.readable_roots([], top=tree) == [tree]
    assert sandbox.readable_roots([f"{tree}-other/x", "/elsewhere"], top=tree) == [tree]


def test_readable_roots_excludes_the_hidden_dir_and_keeps_its_siblings(tree: str) -> None:
    roots = sandbox.readable_roots([f"{tree}/etc/mcp-privsep"], top=tree)
    assert roots == sorted([f"{tree}/etc/passwd", f"{tree}/etc/ssl", f"{tree}/usr", f"{tree}/var"])
    # symlinks are never roots (their targets are granted, or not, as themselves)
    assert f"{tree}/bin" not in roots and f"{tree}/etc/loop" not in roots


def test_readable_roots_with_several_and_nested_hidden_dirs(tree: str) -> None:
    hidden = [
        f"{tree}/var/lib/mcp-privsep",
        f"{tree}/etc/mcp-privsep/secrets",  # inside another hidden dir: nothing more to cut
        f"{tree}/etc/mcp-privsep/",  # a trailing slash is the same directory
        f"{tree}/var/lib/mcp-privsep/deeper/still",
    ]
    roots = sandbox.readable_roots(hidden, top=tree)
    assert roots == sorted(
        [
            f"{tree}/etc/passwd",
            f"{tree}/etc/ssl",
            f"{tree}/usr",
            f"{tree}/var/lib/apt",
            f"{tree}/var/lib/dpkg-status",
            f"{tree}/var/log",
        ]
    )
    for r in roots:
        for x in hidden:
            x = os.path.normpath(x)
            assert not (r == x or r.startswith(x + "/") or x.startswith(r + "/")), (r, x)


def test_readable_roots_hiding_the_top_or_a_missing_dir(tree: str) -> None:
    assert sandbox.readable_roots([tree], top=tree) == []
    roots = sandbox.readable_roots([f"{tree}/etc/absent/deeper"], top=tree)
    assert f"{tree}/etc" not in roots and f"{tree}/etc/ssl" in roots and f"{tree}/usr" in roots


def test_readable_roots_on_the_real_root_exclude_the_hidden_dirs() -> None:
    roots = sandbox.readable_roots(["/etc/mcp-privsep", "/var/lib/mcp-privsep"])
    assert "/" not in roots and "/etc" not in roots and "/var" not in roots and "/var/lib" not in roots
    assert "/usr" in roots and "/etc/passwd" in roots
    assert not any(r == "/etc/mcp-privsep" or r.startswith("/etc/mcp-privsep/") for r in roots)
