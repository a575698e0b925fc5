"""Privileged test of the Debian package as a file: ``make deb``, its control data, its contents, lintian.

What this covers:

* ``make deb`` builds ``mcp-privsep_VERSION-REVISION_ARCH.deb`` with dpkg-deb;
* its control data: Depends on python3 of this minor version, sudo, passwd,
  procps (the unit's ``ExecReload=/bin/kill``) and what the shared
  libraries of the dependencies link against (libc6); Pre-Depends on the
  init-system-helpers that know ``invoke-rc.d --skip-systemd-native``;
  ``/etc/init.d/mcp-brokerd`` is a conffile; the md5sums match;
* its contents: the code installed as a virtualenv in
  ``/usr/lib/mcp-privsep/venv`` (so dpkg knows every file), the commands
  in ``/usr/bin`` and ``/usr/sbin`` (the gate and the ``mcp`` command are
  exactly what :mod:`broker.admin.install` makes for the package; the
  daemon's and admin's commands are links into the venv), the unit and the
  init script naming ``/usr/sbin``; every file root-owned and not
  group/other-writable; nothing in ``/usr/local`` or ``/opt``, no bytecode,
  no sudoers file (that is written at install time after ``visudo -cf``) and
  no trace of the build directory;
* ``apt-get install --simulate ./the.deb`` accepts it here; lintian
  (installed by this test when apt can) reports no error.

Installing, upgrading, removing and purging it for real is
``test_deb_debian_live.py``, in a freshly bootstrapped Debian 12 root; it
shares the package built here (:func:`built_deb`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from broker.admin import install
from broker.core.paths import Paths

REPO = Path(__file__).resolve().parents[2]
VENV = "/usr/lib/mcp-privsep/venv"
DEB_KEY = pytest.StashKey[str]()


def run(
    *argv: str, env: dict[str, str] | None = None, check: bool = True, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def make_deb(src: Path, out: str, revision: str | None = None) -> str:
    """``make deb`` of the tree ``src`` into ``out``; the path of the package."""
    env = dict(os.environ)
    env["PIP"] = f"{sys.executable} -m pip"  # skip the throw-away build venv; same interpreter family
    if revision is not None:
        env["DEB_REVISION"] = revision
    proc = subprocess.run(
        ["make", "-s", "-C", str(src), "deb", f"DEB_OUT={out}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    found = sorted(Path(out).glob("mcp-privsep_*.deb"))
    assert len(found) == 1, found
    return str(found[0])


def built_deb(config: pytest.Config) -> str:
    """The package of this work tree, built once per test session (both package test modules use it)."""
    if DEB_KEY not in config.stash:
        out = tempfile.mkdtemp(prefix="mcp-privsep-deb-out-")
        config.add_cleanup(lambda: shutil.rmtree(out, ignore_errors=True))
        config.stash[DEB_KEY] = make_deb(REPO, out)
    return config.stash[DEB_KEY]


@pytest.fixture(scope="module")
def deb(request: pytest.FixtureRequest) -> str:
    return built_deb(request.config)


@pytest.fixture(scope="module")
def tree(deb: str) -> str:
    """The package unpacked (payload and DEBIAN/)."""
    tmp = tempfile.mkdtemp(prefix="mcp-privsep-deb-x-")
    run("dpkg-deb", "-x", deb, tmp)
    run("dpkg-deb", "-e", deb, f"{tmp}/DEBIAN")
    yield tmp
    shutil.rmtree(tmp, ignore_errors=True)


def _field(info: str, name: str) -> str:
    m = re.search(rf"^ {name}: (.*)$", info, re.MULTILINE)
    assert m, f"no {name} in the control file"
    return m.group(1)


def test_control_data(deb: str, tree: str) -> None:
    info = run("dpkg-deb", "--info", deb).stdout
    assert _field(info, "Package") == "mcp-privsep"
    assert _field(info, "Architecture") == run("dpkg", "--print-architecture").stdout.strip()
    assert re.fullmatch(r"\d+\.\d+\.\d+-\d+", _field(info, "Version"))
    depends = [d.strip() for d in _field(info, "Depends").split(",")]
    major, minor = sys.version_info[:2]
    for dep in (f"python3 (>= {major}.{minor})", f"python3 (<< {major}.{minor + 1})", "sudo", "passwd", "procps"):
        assert dep in depends, depends
    assert any(d.startswith("libc6 (>= ") for d in depends), depends  # the wheels' shared libraries
    assert _field(info, "Pre-Depends") == "init-system-helpers (>= 1.54~)"
    assert Path(f"{tree}/DEBIAN/conffiles").read_text() == "/etc/init.d/mcp-brokerd\n"
    for script in ("postinst", "prerm", "postrm"):
        mode = os.stat(f"{tree}/DEBIAN/{script}").st_mode
        assert mode & 0o111 and not mode & 0o022, script
        run("sh", "-n", f"{tree}/DEBIAN/{script}")
        text = Path(f"{tree}/DEBIAN/{script}").read_text()
        if script == "postinst":  # only the upgrade from 0.1.0-1 takes back the commands that version wrote there
            retire = re.search(r"^retire_old_commands\(\) \{\n.*?^\}\n", text, re.M | re.S)
            assert retire is not None
            text = text.replace(retire[0], "")
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert "/usr/local" not in code, f"{script} touches /usr/local"
    for line in Path(f"{tree}/DEBIAN/md5sums").read_text().splitlines():
        digest, name = line.split(None, 1)
        assert hashlib.md5(Path(tree, name.strip()).read_bytes()).hexdigest() == digest, name


def test_contents(deb: str, tree: str) -> None:
    listing = run("dpkg-deb", "--contents", deb).stdout.splitlines()
    paths = []
    for line in listing:
        perms, owner, *_rest = line.split()
        path = line.split(" ./", 1)[1].split(" -> ")[0] if " ./" in line else ""
        assert owner == "root/root", line
        assert perms[0] == "l" or (perms[5] != "w" and perms[8] != "w"), line  # not group- or world-writable
        paths.append(path.rstrip("/"))
    assert not [p for p in paths if p.split("/")[0] == "opt" or p.startswith(("usr/local", "etc/sudoers"))]
    assert not [p for p in paths if "__pycache__" in p or p.endswith((".pyc", ".whl"))]
    for needed in ("broker/gate/verbs.py", "broker/daemon/main.py", "agent/helper.py", "mcp_servers/demo/__main__.py"):
        assert f"usr/lib/mcp-privsep/venv/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages/" \
            f"{needed}" in paths, needed
    site = f"{tree}{VENV}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    dists = {p.name.split("-")[0].lower() for p in Path(site).glob("*.dist-info")}
    for needed in ("mcp_privsep", "mcp", "click", "pydantic", "pydantic_core", "tomli_w", "python_daemon", "uvicorn"):
        assert needed in dists, (needed, dists)
    # the commands: what install makes for the package, and links into the venv
    assert Path(f"{tree}/usr/sbin/mcp-gate").read_text() == install.packaged_gate_script(VENV)
    assert Path(f"{tree}/usr/bin/mcp").read_text() == install.packaged_mcp_command(Paths("/", layout="deb"))
    for cmd in ("mcp-brokerd", "mcp-brokerctl"):
        link = os.readlink(f"{tree}/usr/sbin/{cmd}")
        assert os.path.normpath(os.path.join("/usr/sbin", link)) == f"{VENV}/bin/{cmd}"
        assert Path(f"{tree}{VENV}/bin/{cmd}").read_text().startswith(f"#!{VENV}/bin/python\n")
    python = os.readlink(f"{tree}{VENV}/bin/python3")
    assert os.path.normpath(os.path.join(f"{VENV}/bin", python)) == "/usr/bin/python3"
    assert not [p for p in paths if re.search(r"venv/bin/(pip|activate)", p)]
    # the unit and the init script run the package's commands
    unit = Path(f"{tree}/lib/systemd/system/mcp-brokerd.service").read_text()
    assert "ExecStart=/usr/sbin/mcp-brokerd --foreground\n" in unit and "/usr/local" not in unit
    init = Path(f"{tree}/etc/init.d/mcp-brokerd").read_text()
    assert "DAEMON=/usr/sbin/mcp-brokerd\n" in init and "CTL=/usr/sbin/mcp-brokerctl\n" in init
    assert "/usr/local" not in init
    assert os.stat(f"{tree}/etc/init.d/mcp-brokerd").st_mode & 0o777 == 0o755
    assert "usr/share/bash-completion/completions/mcp-brokerctl" in paths
    shipped = Path(tree, "usr/share/bash-completion/completions/mcp-brokerctl").read_text()
    assert shipped == (REPO / "packaging/mcp-brokerctl.bash-completion").read_text()
    assert "usr/share/doc/mcp-privsep/copyright" in paths
    example = Path(f"{tree}/usr/share/doc/mcp-privsep/examples/broker.toml").read_text()
    assert f'command = "{VENV}/bin/python"' in example
    # nothing names the directory it was built in
    proc = run("grep", "-rlF", "/tmp/mcp-privsep-deb.", tree, check=False)
    assert proc.returncode == 1, proc.stdout


def test_apt_would_install_it(deb: str) -> None:
    proc = run("apt-get", "install", "--simulate", "--no-install-recommends", deb, check=False, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Inst mcp-privsep" in proc.stdout


def test_lintian_finds_no_error(deb: str) -> None:
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for update in (False, True):  # an outdated package index is refreshed once
        if shutil.which("lintian") is not None:
            break
        if update:
            run("apt-get", "update", "-qq", env=env, check=False, timeout=600)
        run("apt-get", "install", "-y", "-qq", "--no-install-recommends", "lintian", env=env, check=False, timeout=600)
    if shutil.which("lintian") is None:
        pytest.skip("lintian is not installed and apt-get could not install it")
    proc = run("lintian", "--tag-display-limit", "0", deb, check=False, timeout=600)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("E:")]
    assert not errors, "\n".join(errors)
