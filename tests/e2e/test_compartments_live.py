"""Credential compartments, attacked by a malicious MCP server (``tests/e2e/servers/malicious.py``).

The server is allowlisted for one harmless tool and runs the way the
spawner runs every server: its own user, its own sandbox. From inside it
tries what a compromised npm or PyPI package would: read another server's
secrets and environment, broker.toml, the audit trail and state.db; write
them; signal or ptrace the daemon, the spawner and another server; connect
to the broker's sockets; reach the network under ``network = "none"``; take
a TCP port; approve a pending call; leave a detached child behind a stop.
Every attempt must fail, its harmless tool must still work, and what it
sees from inside must be what ``mcp-brokerctl status`` claims.

Per-caller instances (``per_caller = true``) get the same treatment between
two agents; a ``sandbox = "strict"`` server must refuse to start where a
protection is missing, made missing through root's broker.toml only.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.core.servers import instance_name, server_user_for
from broker.daemon import audit
from tests.e2e.harness import (
    AGENT1,
    AGENT2,
    ALLOWLIST,
    PYTHON,
    Installation,
    descends_from,
    servers,
    wait_for,
    write,
    write_servers_d,
)

MALICIOUS = Path(__file__).parent / "servers" / "malicious.py"
MAL_TOOLS = "".join(f"mal.{t}\n" for t in ("hello", "inspect", "attack", "orphan"))
PC_TOOLS = "".join(f"pc.{t}\n" for t in ("hello", "inspect", "attack", "put"))
MAL_SECRET = "mal-own-secret-3f9a7c"


def _uids_of(pid: int) -> set[int]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:") and line.split()[1] in ("Z", "X"):
                return set()
            if line.startswith("Uid:"):
                return {int(x) for x in line.split()[1:5]}
    except OSError:
        pass
    return set()


def processes_of(uid: int) -> list[int]:
    return [int(n) for n in os.listdir("/proc") if n.isdigit() and uid in _uids_of(int(n))]


def spawner_pid(inst: Installation) -> int:
    assert inst.daemon is not None
    for n in os.listdir("/proc"):
        if n.isdigit():
            try:
                cmd = Path(f"/proc/{n}/cmdline").read_bytes()
            except OSError:
                continue
            if b"broker.spawner" in cmd and descends_from(int(n), inst.daemon.pid) and _uids_of(int(n)) == {0}:
                stat = Path(f"/proc/{n}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == inst.daemon.pid:
                    return int(n)
    raise AssertionError("no spawner under the daemon")


def call_json(inst: Installation, tool: str, args: dict[str, Any] | None = None, user: str = AGENT1) -> Any:
    r = inst.mcp("call", tool, "--args", json.dumps(args or {}), user=user)
    assert r.code == 0, r
    return json.loads(r.out)


def pid_of(inst: Installation, account: str, marker: str = "malicious_server.py") -> int:
    uid = pwd.getpwnam(account).pw_uid
    found = [p for p in processes_of(uid) if marker.encode() in Path(f"/proc/{p}/cmdline").read_bytes()]
    assert found, f"no process of {account}"
    return min(found)


@pytest.fixture(scope="module")
def mal(inst: Installation) -> Iterator[Installation]:
    """The shared installation with the malicious server (network none) and a per-caller instance of it."""
    script = f"{inst.root}/malicious_server.py"
    shutil.copyfile(MALICIOUS, script)
    os.chmod(script, 0o644)
    env_file = f"{inst.paths.secrets}/mal.env"
    write(env_file, f"MAL_TOKEN={MAL_SECRET}\n", 0, 0, 0o600)
    conf = write_servers_d(
        inst,
        "mal.toml",
        f"""
[servers.mal]
command = "{PYTHON}"
args = ["{script}"]
env_file = "{env_file}"
env = {{ MAL_SETTING = "plain" }}
network = "none"

[servers.pc]
command = "{PYTHON}"
args = ["{script}"]
per_caller = true
""",
    )
    if inst.daemon is None or inst.daemon.poll() is not None:
        inst.start_daemon()
    assert inst.ctl("reload").code == 0
    want = ("mal", instance_name("pc", AGENT1), instance_name("pc", AGENT2))
    assert wait_for(lambda: all(servers(inst).get(n, {}).get("state") == "up" for n in want), 30), servers(inst)
    inst.set_allowlist(ALLOWLIST + MAL_TOOLS + PC_TOOLS)
    gate_gid = pwd.getpwnam("mcp-gate").pw_gid
    write(inst.paths.user_allowlist(AGENT2), "demo.add\n" + PC_TOOLS, 0, gate_gid, 0o640)
    try:
        yield inst
    finally:
        os.unlink(conf)
        os.unlink(env_file)
        write(inst.paths.user_allowlist(AGENT2), "demo.add\n", 0, gate_gid, 0o640)
        inst.set_allowlist(ALLOWLIST)
        if inst.daemon is not None and inst.daemon.poll() is None:
            inst.ctl("reload")


def test_the_harmless_tool_works(mal: Installation) -> None:
    r = mal.mcp("call", "mal.hello")
    assert (r.code, r.out) == (0, "hello\n"), r


def test_a_malicious_server_reaches_nothing_beyond_itself(mal: Installation) -> None:
    p = mal.paths
    assert mal.daemon is not None
    demo = mal.server_pids()[0]
    daemon, spawner = mal.daemon.pid, spawner_pid(mal)
    chain_before = audit.verify_set(p.audit_log)
    plan = {
        "read": [
            f"{p.secrets}/demo.env",
            f"{p.secrets}/web.env",
            f"{p.secrets}/mal.env",  # its own file too: only the spawner reads env files
            p.broker_toml,
            p.gate_users,
            p.audit_log,
            p.audit_log + ".head",
            p.audit_key,
            f"{p.state}/state.db",
            p.spawner_log,
            mal.daemon_log,
            f"{p.server_homes}/demo",
            f"{p.server_home(instance_name('pc', AGENT1))}",
        ],
        "write": [
            p.audit_log,
            p.audit_log + ".head",
            f"{p.state}/state.db",
            p.broker_toml,
            f"{mal.root}/written-by-mal",  # outside its write paths, in a directory only root may write
            "/usr/local/mal-was-here",
            "/etc/mal-was-here",
        ],
        "environ": [demo, daemon, spawner],
        "signal": [demo, daemon, spawner],
        "ptrace": [demo, daemon, spawner],
        "connect": [p.admin_sock, p.gate_sock],
        "tcp": [f"127.0.0.1:{mal.port}", "10.0.0.1:443"],
        "listen": [mal.port, 0],
    }
    report = call_json(mal, "mal.attack", {"plan": plan})
    holes = [f"{kind} {target}" for kind, results in report.items() for target, got in results.items() if got == "ok"]
    assert holes == [], holes
    assert set(report) == set(plan), report  # every kind of attempt was made
    # nothing it tried changed anything: the processes live, the trail is whole, nothing was written
    for pid in (demo, daemon, spawner):
        assert _uids_of(pid), f"pid {pid} is gone"
    assert not os.path.exists(f"{mal.root}/written-by-mal") and not os.path.exists("/usr/local/mal-was-here")
    assert audit.verify_set(p.audit_log).ok and chain_before.ok
    assert mal.mcp("call", "mal.hello").out == "hello\n"
    assert mal.mcp("call", "demo.echo", "text=still-here").out == "still-here\n"


def test_what_it_sees_from_inside_is_what_status_claims(mal: Installation) -> None:
    seen = call_json(mal, "mal.inspect")
    status = servers(mal)["mal"]
    box = status["sandbox"]
    account = pwd.getpwnam(server_user_for("mal"))
    # its own user, no other group, no capability, no_new_privs
    assert status["user"] == account.pw_name == box["user"]
    assert seen["uid"] == seen["euid"] == account.pw_uid == box["uid"]
    assert seen["gid"] == account.pw_gid and seen["groups"] == []
    assert seen["status"]["NoNewPrivs"] == "1" and box["no_new_privs"] is True
    for cap in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
        assert int(seen["status"][cap], 16) == 0, (cap, seen["status"])
    # its own pid namespace: it is pid 1 and sees nothing else
    assert box["pid_namespace"] is True and seen["pid"] == 1 and seen["visible_pids"] == [1]
    # no network at all under network = "none"
    assert box["network"] == "none" and box["network_namespace"] is True and seen["interfaces"] == ["lo"]
    # the file system: a private empty /tmp, a read-only system, its own writable home
    assert box["private_tmp"] is True and seen["tmp_writable"] == "ok" and seen["tmp_entries"] == []
    assert box["system_read_only"] is True and seen["root_writable"] in ("EROFS", "EACCES")
    root_mount = [m for m in seen["mounts"] if m.split()[0] == "/"]
    assert root_mount and "ro" in root_mount[0].split()[1].split(","), seen["mounts"]
    assert seen["home"] == mal.paths.server_home("mal") and seen["home_writable"] == "ok"
    assert box["broker_dirs_hidden"] is True and box["landlock"] >= 1
    # the limits it lives under are the ones status reports
    assert seen["rlimits"] == box["rlimits"]
    # only its stdin, stdout and stderr (and the descriptor of the listing itself)
    assert set(seen["fds"]) <= {0, 1, 2, 3}, seen["fds"]
    # its environment: the minimal one, its plain settings, its own secret; no other server's
    assert set(seen["env_keys"]) == {"PATH", "HOME", "LANG", "MAL_SETTING", "MAL_TOKEN"}, seen["env_keys"]
    # and the operator's screen says all of this in words
    text = mal.ctl("status").out
    assert "server mal [stdio]: up" in text and f"runs as {account.pw_name} (uid {account.pw_uid})" in text, text
    assert f"writes only in {', '.join(box['writable'])} and its /tmp" in text, text
    assert box["writable"][0] == seen["home"]


def test_an_argument_holding_its_secret_freezes_the_caller_and_echoes_nothing(mal: Installation) -> None:
    try:
        r = mal.mcp("call", "mal.attack", "--args", json.dumps({"plan": {"read": [MAL_SECRET]}}))
        assert r.code == 77 and "frozen until an operator lifts it" in r.err, r
        assert MAL_SECRET not in r.out + r.err and "MAL_TOKEN" not in r.out + r.err, r
    finally:
        assert mal.ctl("unfreeze", AGENT1).code == 0


def test_a_server_cannot_approve_a_held_call(mal: Installation) -> None:
    policy = '[policy."demo.echo"]\nmode = "approve"\n'
    mal.set_policy(policy, broker_extra="approval_ttl = 60")
    try:
        proc = mal.spawn_mcp("call", "demo.echo", "text=held")
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert line.startswith("mcp: pending approval "), line
        approval = line.split()[3].rstrip(",")
        p = mal.paths
        plan = {
            "write": [f"{p.state}/state.db", f"{p.state}/state.db-journal", f"{p.state}/state.db-wal"],
            "connect": [p.admin_sock],
            "signal": [mal.daemon.pid if mal.daemon else 1],
        }
        report = call_json(mal, "mal.attack", {"plan": plan})
        assert all(got != "ok" for results in report.values() for got in results.values()), report
        listing = json.loads(mal.ctl("approvals", "--json").out)
        assert [a["status"] for a in listing if a["id"] == approval] == ["pending"]
        assert proc.poll() is None
        assert mal.ctl("reject", approval).code == 0
        proc.communicate(timeout=20)
        assert proc.returncode == 77
    finally:
        mal.set_policy("")


def test_per_caller_instances_cannot_reach_each_other(mal: Installation) -> None:
    one, two = instance_name("pc", AGENT1), instance_name("pc", AGENT2)
    seen1 = call_json(mal, "pc.inspect", user=AGENT1)
    seen2 = call_json(mal, "pc.inspect", user=AGENT2)
    u1, u2 = pwd.getpwnam(server_user_for("pc", AGENT1)), pwd.getpwnam(server_user_for("pc", AGENT2))
    assert (seen1["uid"], seen2["uid"]) == (u1.pw_uid, u2.pw_uid) and u1.pw_uid != u2.pw_uid
    assert (seen1["home"], seen2["home"]) == (mal.paths.server_home(one), mal.paths.server_home(two))
    status = servers(mal)
    assert status[one]["sandbox"]["uid"] == u1.pw_uid and status[two]["sandbox"]["uid"] == u2.pw_uid
    # agent 2's instance keeps a file in its home
    r = mal.mcp("call", "pc.put", "path=notes.txt", "text=agent two's notes", user=AGENT2)
    assert r.code == 0, r
    theirs = f"{mal.paths.server_home(two)}/notes.txt"
    assert Path(theirs).read_text() == "agent two's notes"
    other = pid_of(mal, u2.pw_name)
    plan = {
        "read": [theirs, mal.paths.server_home(two)],
        "write": [theirs, f"{mal.paths.server_home(two)}/planted"],
        "environ": [other],
        "signal": [other],
        "ptrace": [other],
    }
    report = call_json(mal, "pc.attack", {"plan": plan}, user=AGENT1)
    assert all(got != "ok" for results in report.values() for got in results.values()), report
    assert Path(theirs).read_text() == "agent two's notes" and not os.path.exists(
        f"{mal.paths.server_home(two)}/planted"
    )
    assert _uids_of(other) == {u2.pw_uid}
    # each agent reaches only its own instance: agent 1's call never runs as agent 2's user
    assert call_json(mal, "pc.inspect", user=AGENT2)["uid"] == u2.pw_uid


def test_a_stop_leaves_no_process_behind(mal: Installation) -> None:
    conf = write_servers_d(
        mal, "orph.toml", f'[servers.orph]\ncommand = "{PYTHON}"\nargs = ["{mal.root}/malicious_server.py"]\n'
    )
    mal.set_allowlist(ALLOWLIST + MAL_TOOLS + PC_TOOLS + "orph.orphan\n")
    try:
        assert mal.ctl("reload").code == 0
        assert wait_for(lambda: servers(mal).get("orph", {}).get("state") == "up", 30), servers(mal)
        uid = pwd.getpwnam(server_user_for("orph")).pw_uid
        r = mal.mcp("call", "orph.orphan")
        assert r.code == 0 and r.out.strip().isdigit(), r
        assert wait_for(lambda: len(processes_of(uid)) >= 2, 5), processes_of(uid)  # the server and its orphan
    finally:
        os.unlink(conf)
        mal.set_allowlist(ALLOWLIST + MAL_TOOLS + PC_TOOLS)
    assert mal.ctl("reload").code == 0  # the server is gone from the config: stopped, with its whole tree
    left = lambda: [Path(f"/proc/{p}/cmdline").read_bytes() for p in processes_of(uid)]  # noqa: E731
    assert wait_for(lambda: not processes_of(uid), 10), left()


def test_a_strict_server_refuses_to_start_without_a_protection(mal: Installation) -> None:
    """Landlock made missing by root's broker.toml ([sandbox] disable), never by an environment variable."""
    conf = write_servers_d(
        mal,
        "strict.toml",
        f"""
[servers.strict]
command = "{PYTHON}"
args = ["{mal.root}/malicious_server.py"]
sandbox = "strict"

[servers.lenient]
command = "{PYTHON}"
args = ["{mal.root}/malicious_server.py"]
""",
    )
    mal.write_broker_toml(policy='[sandbox]\ndisable = ["landlock"]\n')
    try:
        assert mal.ctl("check").code == 0
        assert mal.ctl("reload").code == 0
        assert wait_for(lambda: servers(mal).get("lenient", {}).get("state") == "up", 30), servers(mal)
        assert wait_for(lambda: "landlock" in servers(mal).get("strict", {}).get("reason", ""), 30), servers(mal)
        strict = servers(mal)["strict"]
        assert strict["state"] == "down" and "strict" in strict["reason"], strict
        assert not processes_of(pwd.getpwnam(server_user_for("strict")).pw_uid)
        lenient = servers(mal)["lenient"]
        assert lenient["sandbox"]["landlock"] == 0
        assert any("landlock" in w for w in lenient["sandbox_warnings"]), lenient
        assert "WITHOUT landlock" in mal.ctl("status").out
        # a server that was running under Landlock is started again under the host's new setting by that reload
        assert wait_for(lambda: servers(mal)["mal"].get("sandbox", {}).get("landlock") == 0, 30), servers(mal)["mal"]
    finally:
        os.unlink(conf)
        mal.write_broker_toml()
        assert mal.ctl("reload").code == 0
    assert wait_for(lambda: (servers(mal)["mal"].get("sandbox", {}).get("landlock") or 0) >= 1, 30)


def test_the_spawner_ends_with_the_daemon_and_takes_every_server_with_it(mal: Installation) -> None:
    assert mal.daemon is not None
    spawner = spawner_pid(mal)
    # this installation's servers (the host may run others under the same default accounts)
    ours = [p for p in (int(n) for n in os.listdir("/proc") if n.isdigit()) if descends_from(p, spawner)]
    assert len(ours) >= 4, ours  # keepers and servers: demo, mal, both pc instances
    try:
        mal.daemon.kill()  # SIGKILL: no clean shutdown; the channel just closes
        mal.daemon.wait()
        mal.daemon = None
        assert wait_for(lambda: not _uids_of(spawner), 10), "the spawner outlived its daemon"
        left = lambda: [p for p in ours if _uids_of(p)]  # noqa: E731
        assert wait_for(lambda: not left(), 10), f"servers outlived the spawner: {left()}"
    finally:
        mal.start_daemon()
    assert wait_for(lambda: servers(mal).get("mal", {}).get("state") == "up", 30)


def test_the_spawner_is_not_reachable_from_outside(mal: Installation) -> None:
    """No socket or file names it: the channel is a socketpair the daemon holds, and nothing else."""
    spawner = spawner_pid(mal)
    fds = os.listdir(f"/proc/{spawner}/fd")
    sockets = [
        os.readlink(f"/proc/{spawner}/fd/{fd}")
        for fd in fds
        if os.readlink(f"/proc/{spawner}/fd/{fd}").startswith("socket:")
    ]
    assert len(sockets) == 1, sockets
    inode = sockets[0][len("socket:[") : -1]
    unix = Path("/proc/net/unix").read_text().splitlines()[1:]
    named = [line for line in unix if line.split()[6] == inode and len(line.split()) > 7]
    assert named == [], named  # unnamed: no path anyone could connect to
    out = subprocess.run(["ps", "-o", "user=", "-p", str(spawner)], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "root"
