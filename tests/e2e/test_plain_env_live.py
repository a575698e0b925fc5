"""Plain settings stay plain on a real installation (issue 17): ``env = {...}`` is never redacted.

Two demo servers are added through ``servers.d`` and a reload, each under its
own user and sandbox as the spawner runs every server:

* ``plainenv`` has ``env = { NODE_ENV = "production" }`` and an env file
  holding a real secret as ``DEMO_SECRET``: the agent's ``echo
  text=production`` comes back whole, and the secret (which its ``secret``
  tool returns from its environment) is still redacted;
* ``plainonly`` has its ``DEMO_SECRET`` in ``env`` (a plain setting, no env
  file): the value reaches the server and comes back unredacted.

And ``mcp-brokerctl check`` on the same installation: a repository path in
both an env file and ``args`` is refused with the way out (move it to
``env``), and once it is in ``env`` the config is valid. No test passes a
secret as an argument (an argument holding a known secret freezes the caller).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import pytest

from tests.e2e.harness import ALLOWLIST, PYTHON, Installation, servers, wait_for, write, write_servers_d

#: the env-file secret of ``plainenv`` (never an argument of any call here)
SECRET = "plain-env-secret-" + secrets.token_hex(12)
#: the plain setting of ``plainonly``, returned by its ``secret`` tool
PLAIN = "production-" + secrets.token_hex(4)
TOOLS = "plainenv.echo\nplainenv.secret\nplainonly.secret\n"


@pytest.fixture(scope="module")
def plain(inst: Installation) -> Iterator[Installation]:
    env_file = f"{inst.paths.secrets}/plainenv.env"
    write(env_file, f"# a real secret only\nDEMO_SECRET={SECRET}\n", 0, 0, 0o600)
    conf = write_servers_d(
        inst,
        "plainenv.toml",
        f"""
[servers.plainenv]
command = "{PYTHON}"
args = ["-m", "mcp_servers.demo"]
env_file = "{env_file}"
env = {{ NODE_ENV = "production" }}

[servers.plainonly]
command = "{PYTHON}"
args = ["-m", "mcp_servers.demo"]
env = {{ DEMO_SECRET = "{PLAIN}" }}
""",
    )
    if inst.daemon is None or inst.daemon.poll() is not None:
        inst.start_daemon()
    try:
        r = inst.ctl("reload")
        assert r.code == 0, r.out + r.err
        assert wait_for(
            lambda: all(servers(inst).get(n, {}).get("state") == "up" for n in ("plainenv", "plainonly")), 30
        ), servers(inst)
        inst.set_allowlist(ALLOWLIST + TOOLS)
        yield inst
    finally:
        os.unlink(conf)
        os.unlink(env_file)
        inst.set_allowlist(ALLOWLIST)
        if inst.daemon is not None and inst.daemon.poll() is None:
            inst.ctl("reload")


def test_a_plain_word_survives_in_results(plain: Installation) -> None:
    r = plain.mcp("call", "plainenv.echo", "text=production")
    assert (r.code, r.out) == (0, "production\n"), r
    r = plain.mcp("call", "plainenv.echo", "text=NODE_ENV=production, ready")
    assert (r.code, r.out) == (0, "NODE_ENV=production, ready\n"), r


def test_the_env_file_secret_is_still_redacted(plain: Installation) -> None:
    r = plain.mcp("call", "plainenv.secret")
    assert r.code == 0, r
    assert SECRET not in r.out + r.err and "REDACTED" in r.out, r


def test_a_plain_env_value_reaches_the_server_unredacted(plain: Installation) -> None:
    r = plain.mcp("call", "plainonly.secret")
    assert (r.code, r.out) == (0, f"{PLAIN}\n"), r


def test_check_sends_a_repository_path_in_args_to_env(plain: Installation) -> None:
    repo = "/srv/mcp-privsep-e2e-repository"
    env_file = f"{plain.paths.secrets}/plaincheck.env"
    table = f"""
[servers.plaincheck]
command = "{PYTHON}"
args = ["-m", "mcp_servers.demo", "--repository", "{repo}"]
env_file = "{env_file}"
"""
    conf = f"{plain.paths.servers_d}/plaincheck.toml"
    try:
        # the path as an env-file "secret": refused (a command line is world-readable), with the way out
        write(env_file, f"REPO={repo}\n", 0, 0, 0o600)
        write_servers_d(plain, "plaincheck.toml", table)
        r = plain.ctl("check")
        assert r.code == 1, r
        line = next(ln for ln in r.err.splitlines() if "servers.plaincheck.args" in ln)
        assert "holds a secret from its env file" in line
        assert "the value of REPO is an absolute path: if it is a plain setting, move it from the env file" in line
        assert 'to env = { REPO = "..." }' in line
        assert repo not in line  # the value is never printed
        # the same path as a plain setting: valid (a warning about nothing, exit 0)
        write(env_file, f"DEMO_SECRET={SECRET}\n", 0, 0, 0o600)
        write_servers_d(plain, "plaincheck.toml", table + f'env = {{ REPO = "{repo}" }}\n')
        r = plain.ctl("check")
        assert r.code == 0, r
        assert SECRET not in r.out + r.err
    finally:
        for path in (conf, env_file):
            if os.path.lexists(path):
                os.unlink(path)
