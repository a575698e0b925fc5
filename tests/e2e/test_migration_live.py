"""An installation made by the previous version is migrated in place by ``install``, with no operator edit.

The previous version (the last one before per-agent gate users) is taken
from this repository's own history and its installer run for real into a
staging root: one shared ``mcp-gate`` sudo target, an agent, the operator's
allowlists, secrets and a server of their own. Then today's ``install``
runs with no argument: the agent gets its own gate user, map line and
sudoers rule, the operator's files stay byte for byte, calls work, and the
shared gate user is refused on ``gate.sock``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import BASE, PYTHON, VENV, Installation, connect_as, ensure_user, gate_user, write

REPO = Path(__file__).resolve().parents[2]
#: the last version with one shared gate user
PREVIOUS = "f982fe1"
AGENT = "mcpt-mig"
#: a read-write root of the bundled files server, configured the first version's way (no write_paths)
INBOX = f"{BASE}/migration-inbox"


def previous_tree(into: str) -> str:
    try:
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", PREVIOUS], capture_output=True, check=True, timeout=60
        ).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"the previous version ({PREVIOUS}) is not in this clone's history: {exc}")
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True, timeout=60)
    return into


@pytest.fixture(scope="module")
def old() -> Iterator[Installation]:
    """A staging root installed by the previous version, with an operator's changes; torn down after."""
    ensure_user(AGENT)
    inst = Installation()
    src = previous_tree(tempfile.mkdtemp(prefix="mcp-privsep-previous-"))
    try:
        subprocess.run(
            [
                PYTHON,
                "-c",
                f"import sys; sys.path.insert(0, {src!r}); from broker.ctl import entry; entry()",
                "--root",
                inst.root,
                "install",
                "--agent",
                AGENT,
                "--venv",
                VENV,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        )
        p = inst.paths
        gid = pwd.getpwnam("mcp-gate").pw_gid
        broker = pwd.getpwnam("mcp-broker")
        allowed = "# the operator's allowlist\ndemo.echo\ndemo.add   # sums\nfiles.read\nfiles.write\n"
        write(p.allowlist, allowed, 0, gid, 0o640)
        write(p.user_allowlist("nobody"), "demo.add\n", 0, gid, 0o640)
        write(f"{p.secrets}/extra.env", "EXTRA_TOKEN=operator-secret-0123456789\n", broker.pw_uid, broker.pw_gid, 0o600)
        write(f"{p.servers_d}/extra.toml", '# the operator\'s own server\n[servers.extra]\nurl = "http://127.0.0.1:9/mcp"\n',
              0, broker.pw_gid, 0o640)  # fmt: skip
        # the files server with a read-write root the broker's user owned (every server ran as mcp-broker)
        subprocess.run(["rm", "-rf", INBOX], check=False)
        os.makedirs(f"{INBOX}/notes", mode=0o750)
        write(f"{INBOX}/notes/old.txt", "written before the upgrade\n", broker.pw_uid, broker.pw_gid, 0o600)
        for d in (INBOX, f"{INBOX}/notes"):
            os.chown(d, broker.pw_uid, broker.pw_gid)
        files = (
            f'[servers.files]\ncommand = "{PYTHON}"\nargs = ["-m", "mcp_servers.files", "--root", "inbox={INBOX}:rw"]\n'
        )
        write(f"{p.servers_d}/files.toml", files, 0, broker.pw_gid, 0o640)
        # its daemon ran: the state file its own code made (so the upgrade keeps first-use pins for what is allowed)
        make_state = "import sys; sys.path.insert(0, sys.argv[1]); from broker.state import State; State(sys.argv[2])"
        subprocess.run([PYTHON, "-c", make_state, src, f"{p.state}/state.db"], check=True, cwd="/", timeout=60)
        for name in os.listdir(p.state):  # made by root here; the daemon that made it ran as mcp-broker
            if name.startswith("state.db"):
                os.chown(f"{p.state}/{name}", broker.pw_uid, broker.pw_gid)
        yield inst
    finally:
        inst.teardown()
        subprocess.run(["rm", "-rf", src, INBOX], check=False)


def digests(inst: Installation) -> dict[str, str]:
    """sha256 of every operator file: config, allowlists, secrets, servers."""
    out = {}
    for directory in (inst.paths.etc, inst.paths.allowlist_d, inst.paths.secrets, inst.paths.servers_d):
        for name in sorted(os.listdir(directory)):
            full = f"{directory}/{name}"
            if os.path.isfile(full) and full != inst.paths.gate_users:
                out[full] = hashlib.sha256(Path(full).read_bytes()).hexdigest()
    return out


def test_install_migrates_the_previous_version_in_place(old: Installation) -> None:
    p = old.paths
    sudoers = Path(p.sudoers).read_text()
    assert f"{AGENT} ALL=(mcp-gate) NOPASSWD: {p.gate}" in sudoers  # the previous version's shape
    assert not os.path.exists(p.gate_users)
    before = digests(old)

    r = old.ctl("install")  # no agent named: the ones the previous version knew are migrated
    assert r.code == 0, r.err
    assert f"{INBOX} now belongs to mcp-srv-files" in r.out, r.out

    assert digests(old) == before  # every operator file byte for byte
    rules = [ln for ln in Path(p.sudoers).read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert rules == [f"{AGENT} ALL=({gate_user(AGENT)}) NOPASSWD: {p.gate}"]
    assert f"{AGENT} {gate_user(AGENT)}" in Path(p.gate_users).read_text()
    assert pwd.getpwnam(gate_user(AGENT)).pw_gid == pwd.getpwnam("mcp-gate").pw_gid
    assert old.ctl("install").code == 0 and digests(old) == before  # idempotent

    old.start_daemon(wait_servers=("demo", "files"))
    r = old.mcp("call", "demo.echo", "text=after the upgrade", user=AGENT)
    assert (r.code, r.out) == (0, "after the upgrade\n"), r
    assert old.records()[-1]["caller"] == AGENT
    # the files server, now its own user in its sandbox: its read-write root still works, unedited
    r = old.mcp("call", "files.read", "root=inbox", "path=notes/old.txt", user=AGENT)
    assert r.code == 0 and json.loads(r.out)["content"] == "written before the upgrade\n", r
    r = old.mcp("call", "files.write", "root=inbox", "path=notes/new.txt", "content=after", user=AGENT)
    assert r.code == 0, r
    owner = pwd.getpwnam("mcp-srv-files").pw_uid
    assert {os.lstat(f"{INBOX}/{x}").st_uid for x in ("", "notes", "notes/old.txt", "notes/new.txt")} == {owner}
    # the shared gate user of the previous version is no caller any more
    with connect_as("mcp-gate", p.gate_sock) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b'\x00\x00\x00\x0e{"v":2,"op":1}')
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(16) == b""  # closed unanswered
    assert "refused connection from uid" in old.log_tail()
    doctor = old.ctl("doctor", "-q")
    assert "half migrated" not in doctor.out, doctor.out


def test_doctor_names_a_half_migrated_installation(old: Installation) -> None:
    p = old.paths
    original = Path(p.sudoers).read_text()
    try:
        with open(p.sudoers, "a") as fh:
            fh.write(f"{AGENT} ALL=(mcp-gate) NOPASSWD: {p.gate}\n")
        r = old.ctl("doctor", "-q")
        assert r.code == 1 and "half migrated" in r.out and "mcp-brokerctl install" in r.out, r.out
    finally:
        with contextlib.suppress(OSError):
            Path(p.sudoers).write_text(original)
            os.chmod(p.sudoers, 0o440)
