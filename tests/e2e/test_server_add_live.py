"""``mcp-brokerctl server add``, live: a published server from PyPI, pinned and hashed, in a compartment of its own.

Into the shared installation, through the real command:
``server add time --pip mcp-server-time==OLD --yes`` resolves the whole set
as ``mcp-srv-time`` in a sandbox, prints every wheel with its sha256, builds
without network or install scripts, and leaves a root-owned prefix the
server can read and not write, a requirements file with a ``--hash`` for
every wheel, ``servers.d/time.toml`` and a root 0600 env template. Then:

- the daemon runs it under its own user (``status --json`` says so, and
  ``/proc`` agrees), and that user cannot write its prefix;
- ``allow time.get_current_time`` shows and pins the definition, and the
  agent's ``mcp call time.get_current_time timezone=UTC`` works through
  real sudo;
- doctor is green about it, and warns once a file of the prefix changes;
- ``server upgrade time --pip mcp-server-time==NEW`` builds beside the
  running release, swaps the definition, reloads and removes the old one;
  the call still works;
- ``server remove time`` denies its tools, removes the definition and the
  prefix, keeps the env file (``--purge`` is not given), and the agent's
  call is denied again.

Downloads are kept in ``/var/cache/mcp-privsep-e2e/server-wheels`` (the
``--cache`` option: root's wheels, reused when pip chooses them and the
index confirms their hashes), so a warm run resolves against PyPI without
downloading. Skipped, saying so, only when PyPI cannot be reached.
"""

from __future__ import annotations

import glob
import json
import os
import pwd
import stat
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from broker.admin import server_install
from tests.e2e.harness import ALLOWLIST, RUNUSER, VENV, Installation, Result, descends_from

OLD = "2026.10.10"
NEW = "2026.10.19"
PACKAGE = "mcp-server-time"
CACHE = "/var/cache/mcp-privsep-e2e/server-wheels"
USER = "mcp-srv-time"


def _pypi_problem() -> str | None:
    try:
        with urllib.request.urlopen(f"https://pypi.org/simple/{PACKAGE}/", timeout=15) as answer:
            answer.read(1)
    except OSError as exc:
        return f"PyPI is unreachable ({exc}): server add installs {PACKAGE} from it"
    return None


class Added:
    """The installation after ``server add``, with what the command printed."""

    def __init__(self, inst: Installation, result: Result, seconds: float) -> None:
        self.inst = inst
        self.result = result
        self.seconds = seconds

    @property
    def prefix(self) -> str:
        return self.inst.paths.server_package("time")

    def record(self) -> dict[str, Any]:
        with open(f"{self.prefix}/install.json", encoding="utf-8") as fh:
            data: dict[str, Any] = json.load(fh)
        return data


@pytest.fixture(scope="module")
def added(inst: Installation) -> Iterator[Added]:
    problem = _pypi_problem()
    if problem:
        pytest.skip(problem)
    os.makedirs(CACHE, mode=0o755, exist_ok=True)
    started = time.monotonic()
    result = inst.ctl("server", "add", "time", "--pip", f"{PACKAGE}=={OLD}", "--yes", "--cache", CACHE)
    seconds = time.monotonic() - started
    print(f"server add took {seconds:.1f} s")
    try:
        assert result.code == 0, result.err + result.out
        yield Added(inst, result, seconds)
    finally:
        if os.path.lexists(inst.paths.server_package("time")) or os.path.lexists(f"{inst.paths.servers_d}/time.toml"):
            inst.ctl("server", "remove", "time", "--purge")
        inst.set_allowlist(ALLOWLIST)


def _status(inst: Installation) -> dict[str, dict[str, Any]]:
    out = inst.ctl("status", "--json")
    assert out.code == 0, out.err
    return {s["name"]: s for s in json.loads(out.out)["servers"]}


def _call(inst: Installation) -> Result:
    return inst.mcp("call", "time.get_current_time", "timezone=UTC")


def test_add_shows_every_hash_and_leaves_a_root_owned_prefix(added: Added) -> None:
    p = added.inst.paths
    record = added.record()
    out = added.result.out
    assert record["spec"] == f"{PACKAGE}=={OLD}" and record["kind"] == "pip"
    release = f"{added.prefix}/{record['release']}"
    requirements = Path(f"{release}/requirements.txt").read_text()
    for artifact in record["artifacts"]:
        hexdigest = artifact["digest"].removeprefix("sha256:")
        assert artifact["digest"] in out, artifact  # shown before it was installed
        assert f"{artifact['name']}=={artifact['version']} \\\n    --hash=sha256:{hexdigest}" in requirements
    assert any(a["name"] == "mcp_server_time" and a["version"] == OLD for a in record["artifacts"])
    assert "no install scripts" in out and f"built as {USER} in a sandbox" in out
    # every path root's, nothing writable by group or other, no set-id bit; the digests as recorded
    for dirpath, dirnames, filenames in os.walk(added.prefix):
        for name in (".", *dirnames, *filenames):
            st = os.lstat(os.path.join(dirpath, name))
            assert st.st_uid == 0 and st.st_gid == 0, os.path.join(dirpath, name)
            if not stat.S_ISLNK(st.st_mode):
                assert not st.st_mode & 0o7022, os.path.join(dirpath, name)
    assert server_install.manifest_changes(record["files"], server_install.manifest(release)) == []
    assert os.listdir(f"{p.server_packages}/.build") == []  # the build's scratch is gone
    assert not release.startswith((p.state + "/", p.opt + "/", VENV + "/"))  # apart from the broker's own
    # the definition, and the env file's template
    toml = Path(f"{p.servers_d}/time.toml").read_text()
    assert f'read_paths = ["{added.prefix}"]' in toml and f"{release}/venv/bin/{PACKAGE}" in toml
    assert f'command_sha256 = "{record["command_sha256"]}"' in toml
    st = os.stat(f"{p.servers_d}/time.toml")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o640)
    env = os.stat(f"{p.secrets}/time.env")
    assert (env.st_uid, env.st_gid, stat.S_IMODE(env.st_mode)) == (0, 0, 0o600)
    assert added.inst.ctl("check").code == 0
    assert all(os.path.isfile(f"{CACHE}/{a['source']}") for a in record["artifacts"])  # kept for the next run


def test_the_server_runs_as_its_own_user_and_cannot_write_its_prefix(added: Added) -> None:
    inst = added.inst
    server = _status(inst)["time"]
    assert server["state"] == "up", server
    box = server["sandbox"]
    pw = pwd.getpwnam(USER)
    assert box["user"] == USER and box["uid"] == pw.pw_uid and box["command_sha256"] == "verified"
    assert box.get("writable", [inst.paths.server_home("time")]) == [inst.paths.server_home("time")]
    assert inst.daemon is not None
    running = [
        int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit() and _uid_of(int(pid)) == pw.pw_uid and descends_from(int(pid), inst.daemon.pid)
    ]
    assert running, "no process of mcp-srv-time under the daemon"
    release = f"{added.prefix}/{added.record()['release']}"
    probe = (
        "import os, sys\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        os.close(os.open(path, os.O_WRONLY | os.O_APPEND))\n"
        "        print('writable', path)\n"
        "    except OSError as exc:\n"
        "        print(exc.errno, path)\n"
        "try:\n"
        "    open(sys.argv[1] + '.new', 'w')\n"
        "    print('created')\n"
        "except OSError:\n"
        "    pass\n"
    )
    targets = [f"{release}/venv/bin/{PACKAGE}", f"{added.prefix}/install.json", f"{release}/requirements.txt"]
    done = subprocess.run(
        [RUNUSER, "-u", USER, "--", "/usr/bin/python3", "-c", probe, *targets],
        capture_output=True,
        text=True,
        check=False,
    )
    assert "writable" not in done.stdout and "created" not in done.stdout, done.stdout + done.stderr


def _uid_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def test_allow_pins_the_definition_and_the_agent_calls_it(added: Added) -> None:
    inst = added.inst
    assert _call(inst).code == 77  # not allowed yet
    allowed = inst.ctl("allow", "time.get_current_time")
    assert allowed.code == 0, allowed.err
    assert "get_current_time" in allowed.out and "timezone" in allowed.out  # the definition, shown
    pins = inst.ctl("pins")
    assert any(line.startswith("ok") and "time.get_current_time" in line for line in pins.out.splitlines()), pins.out
    called = _call(inst)
    assert called.code == 0, called.err
    assert "UTC" in called.out and "datetime" in called.out


def test_doctor_warns_when_the_prefix_changes_outside_server_add(added: Added) -> None:
    from broker.admin.doctor import Doctor

    def findings() -> list[tuple[str, str]]:
        doctor = Doctor(added.inst.paths)
        doctor.check_installed_servers()
        return [(f.level, f.message) for f in doctor.findings]

    assert [level for level, _m in findings()] == ["ok"]
    target = f"{added.prefix}/{added.record()['release']}/venv/bin/{PACKAGE}"
    original = Path(target).read_bytes()
    try:
        with open(target, "ab") as fh:
            fh.write(b"# planted\n")
        seen = findings()
        assert seen and all(level == "warning" for level, _m in seen)
        assert any(f"changed venv/bin/{PACKAGE}" in m for _l, m in seen), seen
    finally:
        with open(target, "wb") as fh:
            fh.write(original)
    assert [level for level, _m in findings()] == ["ok"]


def test_upgrade_builds_beside_swaps_and_removes_the_old_release(added: Added) -> None:
    inst = added.inst
    before = added.record()
    started = time.monotonic()
    done = inst.ctl("server", "upgrade", "time", "--pip", f"{PACKAGE}=={NEW}", "--yes", "--cache", CACHE)
    print(f"server upgrade took {time.monotonic() - started:.1f} s")
    assert done.code == 0, done.err + done.out
    after = added.record()
    assert after["spec"] == f"{PACKAGE}=={NEW}" and after["release"] != before["release"]
    assert f"{PACKAGE}=={OLD} -> {PACKAGE}=={NEW}" in done.out
    assert sorted(os.listdir(added.prefix)) == sorted(["install.json", after["release"]])
    toml = Path(f"{inst.paths.servers_d}/time.toml").read_text()
    assert after["release"] in toml and before["release"] not in toml and f"=={NEW}" in toml.splitlines()[0]
    assert "restarted ['time']" in done.out
    server = _status(inst)["time"]
    assert server["state"] == "up"
    called = _call(inst)
    if called.code == 77:  # the new version describes its tool differently: a person reviews it again
        assert inst.ctl("pins", "accept", "time.get_current_time", "--yes").code == 0
        called = _call(inst)
    assert called.code == 0, called.err


def test_remove_denies_its_tools_and_restores_the_installation(added: Added) -> None:
    inst = added.inst
    p = inst.paths
    done = inst.ctl("server", "remove", "time")
    assert done.code == 0, done.err + done.out
    assert "denied time.get_current_time" in done.out
    assert not os.path.lexists(added.prefix) and not os.path.lexists(f"{p.servers_d}/time.toml")
    assert os.path.isfile(f"{p.secrets}/time.env")  # kept without --purge
    assert "time" not in _status(inst)
    assert "time." not in Path(p.allowlist).read_text()
    assert _call(inst).code == 77
    assert inst.ctl("check").code == 0
    assert inst.ctl("server", "remove", "time").code == 64  # nothing of it is left
    os.unlink(f"{p.secrets}/time.env")
    assert not glob.glob(f"{VENV}/lib/python3*/site-packages/mcp_server_time*")  # the broker's code: untouched
    assert inst.mcp("call", "demo.echo", "text=still here").code == 0
