"""Privileged end-to-end tests of the operator commands: allow/deny, tools, import, doctor, uninstall.

Against real installations, through real sudo, as the agent users:

* ``allow`` mid-flight makes a tool callable by the agent at once (same
  daemon, no reload), ``deny`` takes it away again; ``allow 'demo.*'``
  writes today's tools one per line and never a wildcard; ``allow
  --read-only`` takes exactly the tools a server annotates read-only;
* ``import`` of an mcporter config and of a Claude Desktop config each yield
  a broker that serves the same servers (a stdio demo server and the
  streamable-HTTP demo server behind a bearer token, the token travelling
  only through the env file), with no secret value in any ``.toml``; the
  agent's calls work, and a server's own secret comes back redacted;
* ``doctor`` is all green on a good install and names each problem after
  the allowlist is made group-writable, a secret world-readable and a
  sudoers line with a wildcard is added; with the secrets really exposed it
  notices, *as the agent*, that the agent can read them;
* ``uninstall`` cuts the agents off and keeps the config; ``--purge`` removes it.

The allow tests use the shared ``live`` installation (its allowlist is
restored after each test); the others use one installation of their own,
because they break it on purpose.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import AGENT1, AGENT2, PYTHON, Installation, gate_user

ANNOTATED_SERVER = """
from mcp.server import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("ann")


@server.tool(description="Look, do not touch.", annotations=ToolAnnotations(readOnlyHint=True))
def look() -> str:
    return "looked"


@server.tool(description="Also read-only.", annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
def peek() -> str:
    return "peeked"


@server.tool(description="Destroys things.", annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=True))
def wipe() -> str:
    return "wiped"


@server.tool(description="No annotations at all.")
def plain() -> str:
    return "plain"


server.run()
"""


def _entries(path: str) -> list[str]:
    from broker.core import allowlist

    return list(allowlist.from_bytes(Path(path).read_bytes(), path).actions)


# --- allow / deny on the shared installation --------------------------------------------------


def test_allow_mid_flight_makes_a_tool_callable_at_once_and_deny_takes_it_back(live: Installation) -> None:
    assert live.daemon is not None
    pid = live.daemon.pid
    denied = live.mcp("call", "demo.show", "to=x")
    assert denied.code == 77, denied
    allowed = live.ctl("allow", "demo.show")
    assert allowed.code == 0, allowed
    assert "allowed demo.show" in allowed.out
    ok = live.mcp("call", "demo.show", "to=x")
    assert ok.code == 0, ok
    assert '"to": "x"' in ok.out
    # idempotent: the file is not rewritten
    inode = os.stat(live.paths.allowlist).st_ino
    again = live.ctl("allow", "demo.show")
    assert again.code == 0 and "already allowed" in again.out
    assert os.stat(live.paths.allowlist).st_ino == inode
    # comments and order survive
    text = Path(live.paths.allowlist).read_text()
    assert "demo.whoami   # trailing comment\n" in text and "#demo.secret - never\n" in text
    assert _entries(live.paths.allowlist).index("demo.show") == _entries(live.paths.allowlist).index("demo.big") + 1
    gone = live.ctl("deny", "demo.show")
    assert gone.code == 0 and "denied demo.show" in gone.out
    assert live.mcp("call", "demo.show", "to=x").code == 77
    assert live.daemon.pid == pid and live.daemon.poll() is None
    st = os.stat(live.paths.allowlist)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o640)


def test_allow_star_expands_to_todays_tools_and_never_writes_a_wildcard(live: Installation) -> None:
    offered = json.loads(live.ctl("tools", "demo", "--json").out)["tools"]
    names = {t["action"] for t in offered}
    assert "demo.secret" in names and len(names) >= 8
    result = live.ctl("allow", "demo.*")
    assert result.code == 0, result
    assert "demo.* -> " in result.out
    text = Path(live.paths.allowlist).read_text()
    assert "*" not in text
    assert names <= set(_entries(live.paths.allowlist))
    assert live.ctl("check").code == 0
    listed = live.mcp("list")
    assert "demo.secret" in listed.out
    # every tool now shows as allowed
    rows = json.loads(live.ctl("tools", "demo", "--json").out)["tools"]
    assert all(r["allowed"] for r in rows)
    # deny with a pattern removes the server's entries from the file (no daemon needed)
    result = live.ctl("deny", "demo.*")
    assert result.code == 0
    assert not [a for a in _entries(live.paths.allowlist) if a.startswith("demo.")]
    assert live.mcp("call", "demo.echo", "text=hi").code == 77


def test_allow_refuses_a_wildcard_it_cannot_expand_and_writes_nothing(live: Installation) -> None:
    before = Path(live.paths.allowlist).read_bytes()
    for args, code in ((("demo.zzz*",), 1), (("nosuch.*",), 69), (("de*.echo",), 64), (("demo echo",), 64)):
        result = live.ctl("allow", *args)
        assert result.code == code, (args, result)
        assert result.err.count("\n") == 1 and "Traceback" not in result.err
    assert Path(live.paths.allowlist).read_bytes() == before


def test_per_user_allow_creates_the_users_own_file(live: Installation) -> None:
    path = live.paths.user_allowlist(AGENT1)
    try:
        result = live.ctl("allow", "--user", AGENT1, "demo.add")
        assert result.code == 0, result
        assert "replaces" in result.err
        assert _entries(path) == ["demo.add"]
        assert live.mcp("call", "demo.add", "a=1", "b=2").code == 0
        assert live.mcp("call", "demo.echo", "text=x").code == 77  # the user's file replaced the global one
        tools = json.loads(live.ctl("tools", "--user", AGENT1, "--json").out)
        assert tools["allowlist"] == path
        assert {r["action"] for r in tools["tools"] if r["allowed"]} == {"demo.add"}
    finally:
        if os.path.exists(path):
            os.unlink(path)
    assert live.ctl("deny", "--user", AGENT1, "demo.add").code == 1
    assert live.ctl("allow", "--user", "no-such-user-xyz", "demo.add").code == 67


# --- an installation of our own -----------------------------------------------------------------


@pytest.fixture(scope="module")
def own() -> Iterator[Installation]:
    """A separate staging install: no noauth/web servers, an annotated server, the HTTP demo server up."""
    inst = Installation()
    try:
        inst.install()
        os.unlink(f"{inst.paths.servers_d}/web.toml")
        os.unlink(f"{inst.paths.secrets}/web.env")
        broker = pwd.getpwnam("mcp-broker")
        server_py = f"{inst.root}/annotated_server.py"
        Path(server_py).write_text(ANNOTATED_SERVER)
        os.chmod(server_py, 0o644)
        toml = f"{inst.paths.servers_d}/ann.toml"
        Path(toml).write_text(f'[servers.ann]\ncommand = "{PYTHON}"\nargs = ["{server_py}"]\n')
        os.chown(toml, 0, broker.pw_gid)
        os.chmod(toml, 0o640)
        inst.start_http()
        inst.start_daemon(wait_servers=("demo", "ann"))
        yield inst
    finally:
        inst.teardown()


def test_tools_shows_annotations_and_allow_read_only_takes_only_read_only_tools(own: Installation) -> None:
    shown = own.ctl("tools", "ann")
    assert shown.code == 0, shown
    lines = shown.out.splitlines()
    look = next(line for line in lines if "ann.look" in line)
    wipe = next(line for line in lines if "ann.wipe" in line)
    assert "denied" in look and "read-only" in look
    assert "destructive" in wipe
    result = own.ctl("allow", "--read-only", "ann")
    assert result.code == 0, result
    assert "ann read-only -> ann.look, ann.peek" in result.out
    entries = _entries(own.paths.allowlist)
    assert "ann.look" in entries and "ann.peek" in entries
    assert "ann.wipe" not in entries and "ann.plain" not in entries
    assert own.mcp("call", "ann.look").out.strip() == "looked"
    assert own.mcp("call", "ann.wipe").code == 77
    rows = {r["action"]: r for r in json.loads(own.ctl("tools", "ann", "--json").out)["tools"]}
    assert rows["ann.look"]["allowed"] and rows["ann.look"]["pin"] == "pinned"  # pinned at first use
    assert not rows["ann.wipe"]["allowed"] and rows["ann.wipe"]["pin"] == "unpinned"
    assert own.ctl("deny", "ann.*").code == 0


def _secret_free_tomls(inst: Installation, secrets: list[str]) -> None:
    for path in Path(inst.paths.etc).rglob("*.toml"):
        text = path.read_text()
        for s in secrets:
            assert s not in text, f"{s[:4]}... in {path}"


def _wait_up(inst: Installation, names: tuple[str, ...], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        status = json.loads(inst.ctl("status", "--json").out)
        states = {s["name"]: s["state"] for s in status["servers"]}
        if all(states.get(n) == "up" for n in names):
            return
        time.sleep(0.2)
    raise AssertionError(f"servers not up: {states}")


def _import_and_serve(own: Installation, config_text: str, name: str, names: tuple[str, str], secret: str) -> None:
    src_dir = f"{own.root}/import-src"
    os.makedirs(src_dir, exist_ok=True)
    src = f"{src_dir}/{name}"
    Path(src).write_text(config_text)
    os.chmod(src, 0o600)
    result = own.ctl("import", src)
    assert result.code == 0, result
    assert secret not in result.out + result.err and own.token not in result.out + result.err
    stdio, http = names
    env = f"{own.paths.secrets}/{stdio}.env"
    st = os.stat(env)
    assert (pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode)) == ("root", 0o600)  # the spawner's to read
    assert f"DEMO_SECRET={secret}" in Path(env).read_text()
    assert own.token in Path(f"{own.paths.secrets}/{http}.env").read_text()
    _secret_free_tomls(own, [secret, own.token])
    assert own.ctl("reload").code == 0
    _wait_up(own, (stdio, http))
    assert own.ctl("allow", f"{stdio}.echo", f"{stdio}.secret", f"{http}.echo", f"{http}.whoami").code == 0
    assert own.mcp("call", f"{stdio}.echo", "text=via-stdio").out.strip() == "via-stdio"
    assert own.mcp("call", f"{http}.echo", "text=via-http").out.strip() == "via-http"  # the bearer token works
    leaked = own.mcp("call", f"{stdio}.secret")
    assert leaked.code == 0 and secret not in leaked.out and "REDACTED" in leaked.out
    # importing the same file again is refused: the names exist now
    again = own.ctl("import", src)
    assert again.code == 65 and "already exists" in again.err


def test_import_of_an_mcporter_config_serves_the_same_servers(own: Installation) -> None:
    secret = "mp-secret-" + os.urandom(8).hex()
    text = f"""// mcporter config (JSONC)
{{
  "mcpServers": {{
    "mp-demo": {{
      "command": "{PYTHON} -m mcp_servers.demo",   // a command string, as mcporter allows
      "env": {{ "DEMO_SECRET": "{secret}" }},
    }},
    "mp-web": {{ "baseUrl": "http://127.0.0.1:{own.port}/mcp", "bearerToken": "{own.token}" }},
  }},
  "imports": ["cursor"],
}}
"""
    _import_and_serve(own, text, "mcporter.json", ("mp-demo", "mp-web"), secret)
    toml = Path(f"{own.paths.servers_d}/imported.toml").read_text()
    assert 'Authorization = "Bearer ${BEARER_TOKEN}"' in toml


def test_import_of_a_claude_desktop_config_serves_the_same_servers(own: Installation) -> None:
    secret = "cd-secret-" + os.urandom(8).hex()
    doc = {
        "mcpServers": {
            "cd-demo": {"command": PYTHON, "args": ["-m", "mcp_servers.demo"], "env": {"DEMO_SECRET": secret}},
            "cd-web": {
                "url": f"http://127.0.0.1:{own.port}/mcp",
                "headers": {"Authorization": f"Bearer {own.token}"},
            },
        }
    }
    _import_and_serve(own, json.dumps(doc), "claude_desktop_config.json", ("cd-demo", "cd-web"), secret)
    st = os.stat(f"{own.paths.servers_d}/imported.toml")
    assert (st.st_uid, pwd.getpwnam("mcp-broker").pw_gid, stat.S_IMODE(st.st_mode)) == (0, st.st_gid, 0o640)


# --- doctor --------------------------------------------------------------------------------


def _doctor(inst: Installation) -> tuple[int, list[str]]:
    result = inst.ctl("doctor")
    assert "Traceback" not in result.err
    return result.code, [line for line in result.out.splitlines() if line.startswith("PROBLEM")]


def test_doctor_is_all_green_on_a_good_install(own: Installation) -> None:
    result = own.ctl("doctor")
    assert result.code == 0, result.out + result.err
    assert "doctor: all green" in result.out
    assert f"ok      agent {AGENT1}: cannot reach" in result.out
    assert f"ok      agent {AGENT2}: cannot reach" in result.out
    assert "'mcp status' works" in result.out


def test_doctor_names_each_problem_and_is_green_again_after_the_fixes(own: Installation) -> None:
    p = own.paths
    secret = f"{p.secrets}/demo.env"
    sudoers_before = Path(p.sudoers).read_text()
    wildcard = f"{AGENT1} ALL=(mcp-gate) NOPASSWD: {p.gate} *\n"
    try:
        os.chmod(p.allowlist, 0o660)
        os.chmod(secret, 0o604)
        with open(p.sudoers, "a", encoding="utf-8") as fh:
            fh.write(wildcard)
        assert subprocess.run(["visudo", "-cf", p.sudoers], capture_output=True, check=False).returncode == 0
        code, problems = _doctor(own)
        assert code == 1
        text = "\n".join(problems)
        assert f"{p.allowlist} (allowlist) has mode 0660: writable by group" in text
        assert f"chmod 0640 {p.allowlist}" in text
        assert f"{secret} (secret) has mode 0604: readable by other" in text
        assert f"chmod 0600 {secret}" in text
        assert f"{p.sudoers}:" in text and "a wildcard" in text and wildcard.strip() in text
        assert f"{AGENT1} may also run via sudo" in text  # seen through 'sudo -l -U' too
    finally:
        os.chmod(p.allowlist, 0o640)
        os.chmod(secret, 0o600)
        Path(p.sudoers).write_text(sudoers_before)
    code, problems = _doctor(own)
    assert code == 0, problems


def test_doctor_sees_as_the_agent_what_the_agent_can_really_reach(own: Installation) -> None:
    """Expose the secrets for real; the probe that runs as the agent must notice it can read them."""
    p = own.paths
    secret = f"{p.secrets}/demo.env"
    try:
        os.chmod(p.secrets, 0o711)
        os.chmod(secret, 0o604)
        # the attack itself, as the agent: the secret is readable now
        stolen = own.as_user(AGENT1, "/bin/cat", secret)
        assert stolen.code == 0 and "DEMO_SECRET=" in stolen.out
        code, problems = _doctor(own)
        assert code == 1
        assert any(f"agent {AGENT1}: {AGENT1} can read {secret}" in line for line in problems), problems
    finally:
        os.chmod(p.secrets, 0o700)
        os.chmod(secret, 0o600)
    assert own.as_user(AGENT1, "/bin/cat", secret).code != 0
    assert _doctor(own)[0] == 0


# --- uninstall (last: it takes the installation apart) ----------------------------------------------


def test_uninstall_keeps_config_and_purge_removes_it(own: Installation) -> None:
    p = own.paths
    result = own.ctl("uninstall")
    assert result.code == 0, result
    assert not os.path.exists(p.sudoers)
    assert not os.path.exists(p.mcp) and not os.path.exists(p.gate) and not os.path.lexists(p.brokerctl)
    assert own.daemon is not None
    own.daemon.wait(15)  # stopped through its pid file
    assert os.path.exists(p.broker_toml) and os.path.exists(f"{p.secrets}/demo.env")
    assert os.path.exists(p.audit_log)
    # the agent is cut off: no sudo rule, no command
    assert own.as_user(AGENT1, "sudo", "-n", "-u", gate_user(AGENT1), p.gate, "list").code != 0
    refused = own.ctl("uninstall", "--purge")
    assert refused.code == 64 and "--yes" in refused.err
    purged = own.ctl("uninstall", "--purge", "--yes")
    assert purged.code == 0, purged
    for gone in (p.etc, p.state, p.log, p.run):
        assert not os.path.exists(gone), gone
    own.daemon = None
