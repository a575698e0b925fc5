"""``mcp-brokerctl edit`` and policy on the next call, against the real installation (privileged).

``$EDITOR`` is a script that puts prepared text into the copy it is given;
``mcp-brokerctl edit`` runs off a terminal (stdin is /dev/null), so a
refused check abandons the edit. What is checked:

* a broken allowlist and a broken policy are refused with ``file:line:col``
  and never installed (the files keep their bytes; calls go on as before);
* a good policy edit is seen by the very next ``mcp call``, with no reload
  (the demo server keeps its process);
* ``broker.toml`` broken by hand (not through edit) makes the next call fail
  closed with 78 naming the file and line, ``status`` says so, and fixing the
  file by hand restores calls;
* a server definition changed on disk without a reload: ``status`` says so,
  and ``edit server NAME`` reloads (only that server starts; demo keeps its
  process).

Every test puts broker.toml, the allowlist and servers.d back and reloads.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import ALLOWLIST, CTL, PYTHON, Installation, Result, servers, wait_for, write

POLICY_LINE = 'mode = "sometimes"'


@pytest.fixture
def edits(live: Installation) -> Iterator[Installation]:
    """The live installation; broker.toml, the allowlist and servers.d put back (and reloaded) afterwards."""
    p = live.paths
    toml = Path(p.broker_toml).read_bytes()
    listed = set(os.listdir(p.servers_d))
    try:
        yield live
    finally:
        write(p.broker_toml, toml.decode(), 0, pwd.getpwnam("mcp-broker").pw_gid, 0o640)
        for name in set(os.listdir(p.servers_d)) - listed:
            os.unlink(f"{p.servers_d}/{name}")
        live.set_allowlist(ALLOWLIST)
        assert live.ctl("reload").code == 0


def edit_with(inst: Installation, text: str, *args: str) -> Result:
    """``mcp-brokerctl edit ARGS`` with an $EDITOR that replaces the copy with ``text``."""
    content = f"{inst.root}/edit-content"
    Path(content).write_text(text, encoding="utf-8")
    script = f"{inst.root}/edit-editor.sh"
    Path(script).write_text(f'#!/bin/sh\ncat {content} > "$1"\n', encoding="utf-8")
    os.chmod(script, 0o755)
    env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", "EDITOR": script}
    proc = subprocess.run(
        [CTL, "--root", inst.root, "edit", *args],
        capture_output=True,
        text=True,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
        timeout=120,
    )
    return Result(proc.returncode, proc.stdout, proc.stderr)


def snapshot(path: str) -> tuple[int, bytes]:
    return os.stat(path).st_ino, Path(path).read_bytes()


def line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_edit_refuses_a_broken_allowlist_with_file_line_col_and_installs_nothing(edits: Installation) -> None:
    before = snapshot(edits.paths.allowlist)
    r = edit_with(edits, ALLOWLIST + "demo.add extra words\n")
    assert r.code == 1, r
    line = ALLOWLIST.count("\n") + 1
    assert f"{edits.paths.allowlist}:{line}:10: unexpected text after the entry" in r.err, r
    assert "nothing installed" in r.err
    assert snapshot(edits.paths.allowlist) == before
    assert edits.mcp("call", "demo.echo", "text=still").out == "still\n"


def test_edit_refuses_a_broken_policy_with_file_line_col_and_installs_nothing(edits: Installation) -> None:
    before = snapshot(edits.paths.broker_toml)
    text = before[1].decode() + f'\n[policy."demo.echo"]\n{POLICY_LINE}\n'
    r = edit_with(edits, text, "config")
    assert r.code == 1, r
    where = f"{edits.paths.broker_toml}:{line_of(text, POLICY_LINE)}:1: policy.demo.echo.mode: Input should be"
    assert where in r.err, r
    assert snapshot(edits.paths.broker_toml) == before
    assert edits.mcp("call", "demo.echo", "text=still").out == "still\n"


def test_a_good_policy_edit_is_seen_by_the_next_call_without_a_reload(edits: Installation) -> None:
    assert edits.mcp("call", "demo.echo", "text=much-too-long").code == 0
    pids = edits.server_pids()
    text = Path(edits.paths.broker_toml).read_text() + '\n[policy."demo.echo".args.text]\nmax_length = 5\n'
    r = edit_with(edits, text, "config")
    assert r.code == 0, r
    assert "policy applies from the next call" in r.out and "reload" not in r.out, r
    st = os.stat(edits.paths.broker_toml)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, pwd.getpwnam("mcp-broker").pw_gid, 0o640)
    r = edits.mcp("call", "demo.echo", "text=much-too-long")
    assert r.code == 65 and "max_length" in r.err, r
    assert edits.mcp("call", "demo.echo", "text=short").out == "short\n"
    assert edits.server_pids() == pids  # nothing was restarted


def test_a_policy_broken_by_hand_fails_closed_naming_the_file_until_fixed(edits: Installation) -> None:
    p = edits.paths
    good = Path(p.broker_toml).read_text()
    broken = good + f'\n[policy."demo.echo"]\n{POLICY_LINE}\n'
    gid = pwd.getpwnam("mcp-broker").pw_gid
    write(p.broker_toml, broken, 0, gid, 0o640)
    where = f"{p.broker_toml}:{line_of(broken, POLICY_LINE)}:1"
    r = edits.mcp("call", "demo.echo", "text=x")
    assert r.code == 78 and where in r.err and "every call is refused" in r.err, r
    assert edits.mcp("list").code == 78
    s = edits.mcp("status")
    assert s.code == 0 and "degraded" in s.out and where in s.out, s
    status = edits.ctl("status")
    assert status.code == 0 and "config on disk is invalid" in status.out and where in status.out, status
    write(p.broker_toml, good + '\n[policy."demo.echo"]\nmode = "allow"\n', 0, gid, 0o640)
    assert edits.mcp("call", "demo.echo", "text=back").out == "back\n"
    assert "config on disk is invalid" not in edits.ctl("status").out


def test_status_says_when_server_definitions_on_disk_differ_and_edit_server_reloads(edits: Installation) -> None:
    p = edits.paths
    extra = f"{p.servers_d}/extra.toml"
    definition = f'[servers.extra]\ncommand = "{PYTHON}"\nargs = ["-m", "mcp_servers.demo"]\n'
    write(extra, definition, 0, pwd.getpwnam("mcp-broker").pw_gid, 0o640)
    r = edits.ctl("status")
    assert r.code == 0, r
    assert f"config changed on disk: {extra} (servers.extra added); run mcp-brokerctl reload" in r.out, r.out
    disk = json.loads(edits.ctl("status", "--json").out)["config"]
    assert disk == {"error": None, "problems": [], "stale": [{"file": extra, "what": "servers.extra added"}]}
    assert edits.mcp("call", "demo.echo", "text=policy-still-live").code == 0  # nothing broken: calls go on
    os.unlink(extra)
    assert "config changed on disk" not in edits.ctl("status").out
    # the same server through edit: installed, then the broker is reloaded; only the new server starts
    pids = edits.server_pids()
    r = edit_with(edits, definition, "server", "extra")
    assert r.code == 0, r
    assert f"edit: created {extra}" in r.out and "reloaded: added ['extra']" in r.out, r
    assert "config changed on disk" not in edits.ctl("status").out
    assert wait_for(lambda: servers(edits).get("extra", {}).get("state") == "up", 20), servers(edits)
    assert set(pids) <= set(edits.server_pids())
    edits.set_allowlist(ALLOWLIST + "extra.echo\n")
    assert edits.mcp("call", "extra.echo", "text=new").out == "new\n"
