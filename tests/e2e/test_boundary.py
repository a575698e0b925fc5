"""The security boundary, crossed for real as agent users through sudo.

Each test does something an agent (or a prompt injection driving it) would
try, and asserts both the refusal and that nothing leaked.
"""

from __future__ import annotations

import json
import os
import pwd

import pytest

from tests.e2e.harness import AGENT1, AGENT2, OUTSIDER, PYTHON, Installation, connect_as, gate_user


def test_whoami_runs_as_the_servers_own_user(live: Installation) -> None:
    r = live.mcp("call", "demo.whoami", "--json")
    assert r.code == 0, r.err
    who = json.loads(r.out)["structuredContent"]
    assert (who["uid"], who["user"]) == (pwd.getpwnam("mcp-srv-demo").pw_uid, "mcp-srv-demo")
    assert who["uid"] not in (0, pwd.getpwnam("mcp-broker").pw_uid, pwd.getpwnam(AGENT1).pw_uid)


def test_echo_prints_the_text(live: Installation) -> None:
    r = live.mcp("call", "demo.echo", "text=hi")
    assert (r.code, r.out, r.err) == (0, "hi\n", "")


def test_arguments_typed_by_schema(live: Installation) -> None:
    r = live.mcp("call", "demo.add", "a=2", "b:40")
    assert (r.code, r.out.strip()) == (0, "42"), r.err
    r = live.mcp("call", "demo.add", "--args", '{"a": 1, "b": 2}')
    assert (r.code, r.out.strip()) == (0, "3"), r.err
    r = live.mcp("call", "demo.add", "--args", "-", stdin='{"a": 5, "b": 6}')
    assert (r.code, r.out.strip()) == (0, "11"), r.err
    r = live.mcp("call", "demo.add", "a=two", "b=1")
    assert r.code == 65 and "'a'" in r.err and r.err.count("\n") == 1


def test_list_shows_only_allowlisted_tools(live: Installation) -> None:
    r = live.mcp("list", "--json")
    assert r.code == 0, r.err
    names = [t["name"] for t in json.loads(r.out)["tools"]]
    assert "demo.echo" in names and "web.echo" in names
    assert "demo.secret" not in names and "demo.big" in names
    # noauth is allowlisted but its server cannot connect: shown as unavailable, nothing else
    assert all(n.split(".")[0] in {"demo", "web", "noauth"} for n in names)
    r2 = live.mcp("list", user=AGENT2)
    assert r2.code == 0 and r2.out.split()[0] == "demo.add" and "demo.echo" not in r2.out


def test_describe_gives_the_schema_of_an_allowed_tool_only(live: Installation) -> None:
    r = live.mcp("describe", "demo.add", "--json")
    assert r.code == 0
    schema = json.loads(r.out)["inputSchema"]
    assert set(schema["properties"]) == {"a", "b"}
    assert live.mcp("describe", "demo.secret").code == 77


def test_not_allowlisted_tool_is_denied_and_secret_never_shown(live: Installation) -> None:
    with open(f"{live.paths.secrets}/demo.env") as fh:
        secret = next(ln.split("=", 1)[1] for ln in fh.read().splitlines() if ln.startswith("DEMO_SECRET="))
    r = live.mcp("call", "demo.secret")
    assert r.code == 77
    assert "not in the allowlist" in r.err
    assert secret not in r.out + r.err


@pytest.mark.parametrize("typo", ["demo.ech", "demo.echoo", "Demo.echo", "demo.ECHO", "demo.echo.", "demo.echo "])
def test_typo_is_denied_never_corrected(live: Installation, typo: str) -> None:
    r = live.mcp("call", typo, "text=hi")
    assert r.code in (64, 77), (typo, r)
    assert "hi" not in r.out


@pytest.mark.parametrize(
    "extra",
    [
        ["--config", "/tmp/evil.json"],
        ["--stdio", "sh -c id"],
        ["--http-url", "http://127.0.0.1:1"],
        ["--cwd", "/tmp"],
        ["-c", "x"],
        ["--env", "X=1"],
        ["--output", "/tmp/x"],
        ["--root", "/tmp"],
    ],
)
def test_extra_flags_after_tool_are_usage_errors(live: Installation, extra: list[str]) -> None:
    r = live.mcp("call", "demo.echo", "text=hi", *extra)
    assert r.code == 64, r
    assert r.out == "" and r.err.startswith("mcp: ") and r.err.count("\n") == 1
    assert "Traceback" not in r.err


def test_agent_cannot_read_secrets_config_or_audit(live: Installation) -> None:
    p = live.paths
    targets = [
        f"{p.secrets}/demo.env",
        f"{p.secrets}/web.env",
        p.broker_toml,
        f"{p.servers_d}/web.toml",
        p.audit_log,
        p.allowlist,
        p.user_allowlist(AGENT2),
    ]
    for target in targets:
        assert os.path.exists(target), target
        r = live.as_user(AGENT1, "cat", target)
        assert r.code != 0 and r.out == "", target
    for directory in (p.secrets, p.log, p.state, p.run, p.servers_d):
        r = live.as_user(AGENT1, "ls", directory)
        assert r.code != 0, directory


def test_agent_cannot_connect_to_broker_sockets(live: Installation) -> None:
    code = (
        "import socket,sys\n"
        "for path in sys.argv[1:]:\n"
        "    s = socket.socket(socket.AF_UNIX)\n"
        "    try:\n"
        "        s.connect(path)\n"
        "        print('CONNECTED', path)\n"
        "    except OSError as e:\n"
        "        print('refused', path, e.errno)\n"
    )
    r = live.as_user(AGENT1, PYTHON, "-c", code, live.paths.gate_sock, live.paths.admin_sock)
    assert "CONNECTED" not in r.out and r.out.count("refused") == 2, r


def test_gate_user_is_refused_on_admin_socket(live: Installation) -> None:
    # even code running as a gate user (the sudo target) or the old shared one cannot reach admin.sock
    code = (
        "import socket,sys\ns=socket.socket(socket.AF_UNIX)\n"
        'try:\n    s.connect(sys.argv[1]); s.sendall(b\'\\x00\\x00\\x00\\x17{"v":1,"op":"reload"}  \')\n'
        "    print('DATA', s.recv(10))\nexcept OSError as e:\n    print('refused', e.errno)\n"
    )
    for user in (gate_user(AGENT1), "mcp-gate"):
        r = live.as_user(user, PYTHON, "-c", code, live.paths.admin_sock)
        assert "refused" in r.out or "DATA b''" in r.out, r


def test_sudo_grants_nothing_but_the_gate(live: Installation) -> None:
    mine, theirs = gate_user(AGENT1), gate_user(AGENT2)
    for argv in [
        ["sudo", "-n", "-u", mine, "/bin/sh", "-c", "id"],
        ["sudo", "-n", "-u", mine, PYTHON, "-c", "print(1)"],
        ["sudo", "-n", "-u", "mcp-broker", live.paths.gate, "list"],
        ["sudo", "-n", "-u", "root", live.paths.gate, "list"],
        ["sudo", "-n", "-E", "-u", mine, live.paths.gate, "list"],
        ["sudo", "-n", "-u", mine, "env", "X=1", live.paths.gate, "list"],
        ["sudo", "-n", "-u", mine, "-g", "root", live.paths.gate, "list"],
        ["sudo", "-n", "-i", "-u", mine],
        ["sudo", "-n", "-u", theirs, live.paths.gate, "list"],  # another agent's gate user
        ["sudo", "-n", "-u", "mcp-gate", live.paths.gate, "list"],  # the first version's shared gate user
    ]:
        r = live.as_user(AGENT1, *argv)
        assert r.code != 0 and "uid=" not in r.out, argv
    # a user with no sudo rule gets nothing, not even the gate
    r = live.mcp("call", "demo.echo", "text=hi", user=OUTSIDER)
    assert r.code != 0 and "hi" not in r.out


def test_sudo_environment_cannot_steer_the_gate(live: Installation) -> None:
    # sudo resets the environment; the gate ignores everything but SUDO_USER/SUDO_UID anyway
    r = live.as_user(
        AGENT1,
        "env",
        "SUDO_USER=root",
        "SUDO_UID=0",
        "PYTHONPATH=/tmp",
        "PYTHONSTARTUP=/tmp/x",
        live.paths.mcp,
        "call",
        "demo.echo",
        "text=ok",
    )
    assert (r.code, r.out) == (0, "ok\n"), r
    r = live.mcp("call", "demo.echo", "text=hi", user=AGENT2)
    assert r.code == 77  # agent2's own allowlist holds only demo.add, whatever the caller claims


def test_agent_cannot_signal_or_trace_broker_processes(live: Installation) -> None:
    assert live.daemon is not None
    pids = [live.daemon.pid, *live.server_pids()]
    code = (
        "import os,sys\nfor p in map(int, sys.argv[1:]):\n"
        "    try:\n        os.kill(p, 0); print('SIGNALLED', p)\n"
        "    except PermissionError:\n        print('eperm', p)\n"
        "    try:\n        open(f'/proc/{p}/environ','rb').read(); print('ENVIRON', p)\n"
        "    except PermissionError:\n        print('eperm', p)\n"
    )
    r = live.as_user(AGENT1, PYTHON, "-c", code, *map(str, pids))
    assert "SIGNALLED" not in r.out and "ENVIRON" not in r.out, r.out
    assert r.out.count("eperm") == 2 * len(pids)


def test_forged_frames_on_gate_socket_close_the_connection(live: Installation) -> None:
    # as the agent's own gate user (a compromised gate): malformed frames are dropped, the daemon lives on
    for payload in (
        b"\xff\xff\xff\xff",
        b"\x00\x00\x00\x05hello",
        b'\x00\x00\x00\x0c{"op":"zzz"}',
        b'\x00\x00\x00\x1f{"v":1,"op":"list","caller":"x"}',
    ):
        s = connect_as(gate_user(AGENT1), live.paths.gate_sock)
        s.sendall(payload)
        s.settimeout(5)
        assert s.recv(100) == b""
        s.close()
    assert live.mcp("call", "demo.echo", "text=still").out == "still\n"


def test_agent_cannot_pose_as_another_agent(live: Installation) -> None:
    # sudo refuses to set SUDO_USER/SUDO_UID from the command line (no SETENV, env_reset)
    agent2 = pwd.getpwnam(AGENT2)
    r = live.as_user(
        AGENT1,
        "sudo",
        "-n",
        "-u",
        gate_user(AGENT1),
        f"SUDO_USER={AGENT2}",
        f"SUDO_UID={agent2.pw_uid}",
        live.paths.gate,
        "call",
        "demo.add",
        "a=1",
        "b=1",
    )
    assert r.code != 0 and r.out == ""
