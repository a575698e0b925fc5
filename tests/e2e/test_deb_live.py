"""Privileged test of the Debian package: ``make deb``, inspect it, install it into a staging root, remove it.

What this covers:

* ``make deb`` builds ``mcp-privsep_VERSION-1_ARCH.deb`` with dpkg-deb;
* its control data (Depends on python3 of this minor version, python3-venv,
  sudo, passwd) and contents (the project's wheel and its pinned
  dependencies' wheels, the bash completion, the systemd unit; every file
  root-owned and not group/other-writable; nothing under /usr/local and no
  sudoers file: that is written at install time after ``visudo -cf``), and
  that the md5sums match;
* ``apt-get install --simulate ./the.deb`` accepts it (dependency
  resolution on this machine); lintian, when installed, reports no error;
* the maintainer scripts, run for real against a staging root
  (``MCP_PRIVSEP_ROOT``, which only these scripts read): postinst builds the
  virtualenv offline from the shipped wheels and runs ``mcp-brokerctl
  install``; with an agent added and the daemon started, ``mcp-brokerctl
  doctor`` is all green and the agent's ``mcp call`` works through sudo;
  prerm (remove) takes the sudoers drop-in away and stops the daemon;
  postrm remove and purge leave no file behind that the package did not
  ship.

What it does not cover: ``apt install`` / ``dpkg -i`` into the real root
(it would replace the /opt/mcp-privsep/venv other work on this machine
uses), the systemd branch of the scripts (no systemd here), and an upgrade
from an older version.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import AGENT1, BASE, RUNUSER, ensure_user

REPO = Path(__file__).resolve().parents[2]
AGENT_ENV = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}


def run(
    *argv: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def deb() -> Iterator[str]:
    """``make deb`` into a temporary directory; the path of the package."""
    out = tempfile.mkdtemp(prefix="mcp-privsep-deb-out-")
    env = dict(os.environ)
    env["PIP"] = f"{sys.executable} -m pip"  # skip the throw-away build venv; same interpreter family
    try:
        proc = subprocess.run(
            ["make", "-s", "-C", str(REPO), "deb", f"DEB_OUT={out}"],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
            check=False,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        found = sorted(Path(out).glob("mcp-privsep_*.deb"))
        assert len(found) == 1, found
        yield str(found[0])
    finally:
        shutil.rmtree(out, ignore_errors=True)


def _field(info: str, name: str) -> str:
    m = re.search(rf"^ {name}: (.*)$", info, re.MULTILINE)
    assert m, f"no {name} in the control file"
    return m.group(1)


def test_package_metadata_and_contents(deb: str) -> None:
    info = run("dpkg-deb", "--info", deb).stdout
    assert _field(info, "Package") == "mcp-privsep"
    assert _field(info, "Architecture") == run("dpkg", "--print-architecture").stdout.strip()
    depends = _field(info, "Depends")
    major, minor = sys.version_info[:2]
    for dep in (f"python3 (>= {major}.{minor})", f"python3 (<< {major}.{minor + 1})", "python3-venv", "sudo"):
        assert dep in depends, depends
    listing = run("dpkg-deb", "--contents", deb).stdout.splitlines()
    paths = []
    for line in listing:
        perms, owner, *_rest = line.split()
        path = line.split(" ./", 1)[1] if " ./" in line else ""
        assert owner == "root/root", line
        assert perms[5] != "w" and perms[8] != "w", line  # not group- or world-writable
        paths.append(path)
    wheels = {p.rsplit("/", 1)[1].split("-")[0].lower() for p in paths if p.endswith(".whl")}
    for needed in ("mcp_privsep", "mcp", "click", "pydantic", "pydantic_core", "tomli_w", "python_daemon", "uvicorn"):
        assert needed in wheels, (needed, wheels)
    assert "usr/share/bash-completion/completions/mcp-brokerctl" in paths
    assert "lib/systemd/system/mcp-brokerd.service" in paths
    assert "usr/share/doc/mcp-privsep/copyright" in paths
    assert not [p for p in paths if p.startswith(("usr/local", "etc/sudoers", "opt/"))]
    with tempfile.TemporaryDirectory() as tmp:
        run("dpkg-deb", "-x", deb, tmp)
        shipped = Path(tmp, "usr/share/bash-completion/completions/mcp-brokerctl").read_text()
        assert shipped == (REPO / "packaging/mcp-brokerctl.bash-completion").read_text()
        assert "_MCP_BROKERCTL_COMPLETE=bash_complete" in shipped
        run("dpkg-deb", "-e", deb, f"{tmp}/DEBIAN")
        for script in ("postinst", "prerm", "postrm"):
            mode = os.stat(f"{tmp}/DEBIAN/{script}").st_mode
            assert mode & 0o111 and not mode & 0o022, script
            run("sh", "-n", f"{tmp}/DEBIAN/{script}")
        for line in Path(f"{tmp}/DEBIAN/md5sums").read_text().splitlines():
            digest, name = line.split(None, 1)
            assert hashlib.md5(Path(tmp, name.strip()).read_bytes()).hexdigest() == digest, name


def test_apt_would_install_it(deb: str) -> None:
    proc = run("apt-get", "install", "--simulate", "--no-install-recommends", deb, check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Inst mcp-privsep" in proc.stdout


def test_lintian_finds_no_error(deb: str) -> None:
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed (apt-get install lintian to run this check)")
    proc = run("lintian", "--tag-display-limit", "0", deb, check=False)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert not errors, "\n".join(errors)


def _sudoers_of(root: str) -> str:
    return f"/etc/sudoers.d/mcp-privsep-{hashlib.sha256(root.encode()).hexdigest()[:12]}"


def _daemon_pid(root: str) -> int | None:
    try:
        return int(Path(f"{root}/run/mcp-privsep/mcp-brokerd.pid").read_text().strip())
    except (OSError, ValueError):
        return None


def test_installs_passes_doctor_and_removes_cleanly(deb: str) -> None:
    ensure_user(AGENT1)
    # not under /tmp: the staged daemon's servers (the packaged venv's python) run with a private /tmp
    os.makedirs(BASE, mode=0o755, exist_ok=True)
    root = tempfile.mkdtemp(prefix="deb-root-", dir=BASE)
    os.chmod(root, 0o755)
    ctrl = f"{root}.ctrl"
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "MCP_PRIVSEP_ROOT": root}
    pid = None
    try:
        run("dpkg-deb", "-x", deb, root)
        run("dpkg-deb", "-e", deb, ctrl)
        payload = {str(p.relative_to(root)) for p in Path(root).rglob("*") if not p.is_dir()}
        # --- install ---------------------------------------------------------------------
        run(f"{ctrl}/postinst", "configure", "", env=env)
        venv = f"{root}/opt/mcp-privsep/venv"
        assert os.path.realpath(f"{venv}/bin/python").startswith("/usr/bin/python3")
        ctl = f"{root}/usr/local/sbin/mcp-brokerctl"
        assert os.readlink(ctl) == f"{venv}/bin/mcp-brokerctl"
        assert not os.path.exists(_sudoers_of(root))  # no agent yet, so no sudoers drop-in
        run(ctl, "--root", root, "install", "--agent", AGENT1)
        assert os.path.exists(_sudoers_of(root))
        run(f"{root}/usr/local/sbin/mcp-brokerd", "--root", root, "--daemon")
        pid = _daemon_pid(root)
        deadline = time.monotonic() + 30
        while "server demo [stdio]: up" not in run(ctl, "--root", root, "status", check=False).stdout:
            assert time.monotonic() < deadline, "the packaged daemon's demo server did not come up"
            time.sleep(0.2)
        doctor = run(ctl, "--root", root, "doctor", check=False)
        assert doctor.returncode == 0, doctor.stdout + doctor.stderr
        assert "doctor: all green" in doctor.stdout and f"ok      agent {AGENT1}" in doctor.stdout
        def echo() -> subprocess.CompletedProcess[str]:
            argv = [RUNUSER, "-u", AGENT1, "--", f"{root}/usr/local/bin/mcp", "call", "demo.echo", "text=packaged"]
            return subprocess.run(argv, capture_output=True, text=True, env=AGENT_ENV, cwd="/", timeout=60, check=False)

        # the operator reviews the allowlisted tool (review is the default: an unreviewed tool is blocked)
        blocked = echo()
        assert blocked.returncode == 77 and "has not been reviewed" in blocked.stderr, blocked
        reviewed = run(ctl, "--root", root, "pins", "accept", "--yes", "demo.echo")
        assert '"name": "echo"' in reviewed.stdout and "pinned at 2:" in reviewed.stdout, reviewed.stdout
        call = echo()
        assert call.returncode == 0 and call.stdout.strip() == "packaged", call
        # --- remove, then purge ----------------------------------------------------------------
        run(f"{ctrl}/prerm", "remove", env=env)
        assert not os.path.exists(_sudoers_of(root))
        assert pid is not None
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1][:3]
        run(f"{ctrl}/postrm", "remove", env=env)
        assert not os.path.exists(venv)
        assert os.path.exists(f"{root}/etc/mcp-privsep/broker.toml")  # kept until purge
        run(f"{ctrl}/postrm", "purge", env=env)
        left = {str(p.relative_to(root)) for p in Path(root).rglob("*") if not p.is_dir()}
        assert left <= payload, sorted(left - payload)
        for gone in (
            "etc/mcp-privsep",
            "var/lib/mcp-privsep",
            "var/log/mcp-privsep",
            "run/mcp-privsep",
            "opt/mcp-privsep",
        ):
            assert not os.path.exists(f"{root}/{gone}"), gone
        gate = run("sudo", "-l", "-U", AGENT1, check=False).stdout
        assert f"{root}/usr/local/sbin/mcp-gate" not in gate
    finally:
        if pid is not None:
            with contextlib.suppress(OSError):
                if root.encode() in Path(f"/proc/{pid}/cmdline").read_bytes():  # still our daemon, not a reused pid
                    os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(_sudoers_of(root))
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(ctrl, ignore_errors=True)
