"""``mcp-brokerctl server add | upgrade | remove``: an MCP server from PyPI or npm, pinned, hashed, root's.

What ``server add NAME --pip PACKAGE==VERSION`` (or ``--npm PACKAGE@VERSION``) does:

1. **resolve**, unprivileged: the whole dependency set is resolved and
   downloaded (``pip download --only-binary=:all:``; npm: a lockfile from
   ``npm install --package-lock-only --ignore-scripts``) by the server's own
   user (``mcp-srv-NAME``, made now if it is new) in a sandbox of the
   spawner's (:func:`broker.spawner.sandbox.launch`: its own namespaces, the
   system read-only, the broker's directories hidden, Landlock);
2. **show** every package it would install with its hash (the sha256 root
   computed of each wheel; npm: each lockfile entry's integrity), and the
   command the server will run, and ask (``--yes``, or a terminal prompt);
3. **build**, unprivileged, without network for pip (``python3 -m venv
   --without-pip`` from ``/usr/bin/python3``, then ``pip install --no-index
   --only-binary=:all: --require-hashes --no-deps -r requirements.txt``; npm:
   ``npm ci --ignore-scripts --omit=dev`` from that lockfile): no install
   script of any package runs (wheels have none; npm's are switched off);
4. **hand it to root**: once every process of the build is gone, the
   release is made root's (``root:root``, 0755/0644, no set-id bit, no
   special file, no hard link), and a manifest of every file's digest is
   recorded beside it (``doctor`` compares it);
5. **configure**: ``servers.d/NAME.toml`` (``command`` the console script
   with its ``command_sha256``, or ``node`` and the package's bin;
   ``read_paths`` the prefix), an env-file template
   ``secrets/NAME.env`` (root 0600, the variables the package's description
   mentions, commented out), then what ``mcp-brokerctl reload`` does.

The layout (under ``--root`` like every path)::

    /var/lib/mcp-privsep-packages/            root 0755, hidden from every server
      NAME/                                   root 0755: the prefix, NAME's read_paths (bound in read-only)
        install.json                          what is installed: package, hashes, the manifest of every file
        RELEASE/                              VERSION-TIMESTAMP: root's, read-only to the server
          requirements.txt  venv/             pip: every wheel with --hash=sha256:..., the virtualenv
          package.json  package-lock.json  node_modules/     npm: the lockfile with every integrity
      .build/NAME-XXXX/                       the build's scratch home (the server's user's; removed after)

It is apart from the broker's code (``/opt/mcp-privsep/venv`` or the Debian
package's), which nothing here touches, so upgrading the broker never
removes an installed server. ``server upgrade`` builds a new release beside
the running one, swaps the definition atomically (one rename), reloads and
then removes the old release. ``server remove`` denies the server's tools,
removes its definition, reloads, and removes its prefix (its env file only
with ``--purge``; its user is kept, as Debian keeps system users).

:func:`add_server`, :func:`upgrade_server` and :func:`remove_server` are
the API (``proposals adopt`` calls :func:`add_server`); :func:`verify_all`
is doctor's check.
"""

from __future__ import annotations

import configparser
import contextlib
import datetime
import fcntl
import hashlib
import importlib.util
import json
import os
import pwd
import re
import secrets
import select
import shutil
import stat
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import click

from broker.admin import screen
from broker.core import layout, names, wire
from broker.core import servers as core_servers
from broker.core.errors import (
    EX_FAILED,
    EX_NOPERM,
    EX_UNAVAILABLE,
    ConfigError,
    PrivsepError,
    UsageError,
)
from broker.core.paths import BROKER_USER, Paths

#: the interpreter every installed server's virtualenv is made from
SYSTEM_PYTHON = "/usr/bin/python3"
#: the build's PATH (the spawner's for servers)
BUILD_PATH = "/usr/local/bin:/usr/bin:/bin"
#: seconds one step of a build may take
STEP_SECONDS = 900.0
#: what a step's output may grow to before it is cut (the tail is kept)
MAX_OUTPUT = 1 << 20
#: the longest server name ``server add`` takes (a directory, a user, a file name)
MAX_NAME = 64
#: the marker of a servers.d file ``server add`` wrote (``remove`` deletes only such a file)
TOML_MARK = "# Written by 'mcp-brokerctl server add'"
INSTALL_JSON = "install.json"
MANIFEST_FORMAT = 1
#: names in an env file the package may mention that are no secrets of its own
_COMMON_VARIABLES = frozenset(
    {"PATH", "HOME", "LANG", "USER", "SHELL", "TERM", "PWD", "TMPDIR", "NODE_ENV", "NODE_OPTIONS", "PYTHONPATH"}
)
MAX_VARIABLES = 30

# --- what is installed: exact pins only --------------------------------------------------------

_PIP_NAME = r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?"
#: PEP 440 public versions (no local part, no wildcard)
_PIP_VERSION = r"(?:[0-9]+!)?[0-9]+(?:\.[0-9]+)*(?:(?:a|b|rc)[0-9]+)?(?:\.post[0-9]+)?(?:\.dev[0-9]+)?"
PIP_SPEC_RE = re.compile(
    rf"(?P<package>{_PIP_NAME})(?P<extras>\[{_PIP_NAME}(?:,{_PIP_NAME})*\])?==(?P<version>{_PIP_VERSION})"
)
_NPM_NAME = r"(?:@[a-z0-9][a-z0-9._~-]*/)?[a-z0-9][a-z0-9._~-]*"
#: semver 2.0, exact (no range, no tag)
_NPM_VERSION = r"(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)\.(?:0|[1-9][0-9]*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?"
NPM_SPEC_RE = re.compile(rf"(?P<package>{_NPM_NAME})@(?P<version>{_NPM_VERSION})")
#: a wheel's file name: distribution, version, (build,) python, abi, platform
_WHEEL_RE = re.compile(r"([A-Za-z0-9_.]+)-([A-Za-z0-9_.!+]+)(?:-[0-9][A-Za-z0-9_.]*)?-[^-/]+-[^-/]+-[^-/]+\.whl")
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")
_INTEGRITY_RE = re.compile(r"sha(?:256|384|512)-[A-Za-z0-9+/]+={0,2}")

#: pip, resolving and downloading (as the server's user, in its sandbox): wheels only
PIP_DOWNLOAD_FLAGS = ("--only-binary=:all:", "--no-cache-dir", "--progress-bar", "off", "--no-input")
#: pip, installing (no network): exactly the hashed wheels, none of their own dependencies, no sdist, no script
PIP_INSTALL_FLAGS = (
    "--no-index",
    "--only-binary=:all:",
    "--require-hashes",
    "--no-deps",
    "--no-cache-dir",
    "--progress-bar",
    "off",
    "--no-input",
    "--no-warn-script-location",
)
#: npm, resolving: a lockfile of the whole tree, nothing run
NPM_LOCK_FLAGS = ("install", "--package-lock-only", "--ignore-scripts", "--no-audit", "--no-fund")
#: npm, installing from that lockfile: no install script, no dev dependency
NPM_CI_FLAGS = ("ci", "--ignore-scripts", "--omit=dev", "--no-audit", "--no-fund")


@dataclass(frozen=True)
class Spec:
    """What to install: ``pip`` ``PACKAGE==VERSION`` or ``npm`` ``PACKAGE@VERSION``, pinned exactly."""

    kind: str  # "pip" or "npm"
    package: str
    version: str
    extras: str = ""

    @property
    def text(self) -> str:
        if self.kind == "pip":
            return f"{self.package}{self.extras}=={self.version}"
        return f"{self.package}@{self.version}"

    @property
    def registry(self) -> str:
        return "PyPI" if self.kind == "pip" else "npm"


def parse_spec(pip: str | None, npm: str | None) -> Spec:
    """The one pinned package of ``--pip`` or ``--npm``; UsageError for anything not pinned exactly."""
    if (pip is None) == (npm is None):
        raise UsageError("name exactly one package: --pip PACKAGE==VERSION or --npm PACKAGE@VERSION")
    if pip is not None:
        m = PIP_SPEC_RE.fullmatch(pip)
        if m is None:
            raise UsageError(
                f"--pip {pip!r}: expected PACKAGE==VERSION, one exact version "
                "(no range, no wildcard, no URL, no local version: what is installed must be pinned)"
            )
        return Spec("pip", m["package"], m["version"], m["extras"] or "")
    assert npm is not None
    m = NPM_SPEC_RE.fullmatch(npm)
    if m is None:
        raise UsageError(
            f"--npm {npm!r}: expected PACKAGE@VERSION with an exact version x.y.z "
            "(no range, no tag such as latest, no git or file source: what is installed must be pinned)"
        )
    return Spec("npm", m["package"], m["version"])


def check_name(name: str) -> None:
    """A server name ``server add`` can use for a directory, a user and files; UsageError otherwise."""
    if not names.valid_server_name(name) or len(name) > MAX_NAME or name.startswith("-"):
        raise UsageError(f"server name {name!r}: use 1-{MAX_NAME} of A-Z a-z 0-9 _ - (not starting with '-')")


def normalize(package: str) -> str:
    """PEP 503's form of a Python package name (what pip compares)."""
    return re.sub(r"[-_.]+", "-", package).lower()


# --- the plan: what the operator confirms -------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """One file of the resolved set: a wheel with root's sha256 of it, or an npm lockfile entry."""

    name: str
    version: str
    digest: str  # "sha256:HEX" (pip) or the lockfile's integrity "sha512-..." (npm)
    source: str = ""  # the wheel's file name, or the tarball's URL


@dataclass
class Plan:
    """Everything ``server add`` (or ``upgrade``) would install and write, shown before it does."""

    name: str
    spec: Spec
    artifacts: list[Artifact]
    prefix: str
    release: str
    toml_path: str
    env_file: str
    user: str
    command: str
    args: tuple[str, ...]
    #: the console script's or bin's name
    entry: str
    #: for an upgrade: the installed spec it replaces
    replaces: str | None = None

    @property
    def release_dir(self) -> str:
        return f"{self.prefix}/{self.release}"

    def lines(self) -> list[str]:
        """What the operator reads before saying yes (names from the registry go through screen)."""
        verb = f"upgrade {self.name}: {self.replaces} -> {self.spec.text}" if self.replaces else "install"
        out = [
            f"server {self.name}: {verb} ({self.spec.registry}, {len(self.artifacts)} package(s), "
            + ("no install scripts: wheels only" if self.spec.kind == "pip" else "install scripts off")
            + ")"
        ]
        width = max((len(screen.name(a.name)) + len(screen.name(a.version)) for a in self.artifacts), default=10) + 3
        for a in self.artifacts:
            label = f"{screen.name(a.name)} {screen.name(a.version)}"
            out.append(f"  {label:<{width}} {screen.text(a.digest, 200)}")
        out += [
            f"into {self.release_dir} (root's, read-only to the server), built as {self.user} in a sandbox",
            f"runs {screen.text(' '.join((self.command, *self.args)), 500)}  (as {self.user}, sandboxed)",
            f"writes {self.toml_path}" + ("" if self.replaces else f" and {self.env_file} (if missing)"),
        ]
        return out


def requirements_text(spec: Spec, artifacts: list[Artifact]) -> str:
    """A pip requirements file with one exact pin and its ``--hash`` per wheel (``--require-hashes`` reads it)."""
    out = [
        f"# {spec.text} and every dependency, resolved by 'mcp-brokerctl server add'; the sha256 of each wheel",
        "# (pip install --require-hashes --no-deps --only-binary=:all: -r this-file)",
    ]
    for a in sorted(artifacts, key=lambda x: normalize(x.name)):
        algorithm, _, hexdigest = a.digest.partition(":")
        if algorithm != "sha256" or not _SHA256_HEX.fullmatch(hexdigest):
            raise ValueError(f"{a.name}: not a sha256 digest: {a.digest!r}")
        out.append(f"{a.name}=={a.version} \\\n    --hash=sha256:{hexdigest}")
    return "\n".join(out) + "\n"


def _toml_string(value: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(value, ensure_ascii=False)


def toml_text(plan: Plan, command_sha256: str | None) -> str:
    """The ``servers.d/NAME.toml`` of an installed server."""
    hashes = "requirements.txt" if plan.spec.kind == "pip" else "package-lock.json"
    lines = [
        f"{TOML_MARK} from {plan.spec.registry}: {plan.spec.text}",
        f"# hashes: {plan.release_dir}/{hashes}; every file's digest: {plan.prefix}/{INSTALL_JSON}",
        f"# 'mcp-brokerctl server upgrade {plan.name}' and 'server remove {plan.name}' manage this file;",
        "# the rest may be edited as for any server.",
        f"[servers.{plan.name}]",
        f"command = {_toml_string(plan.command)}",
    ]
    if command_sha256 is not None:
        lines.append(f'command_sha256 = "{command_sha256}"')
    lines += [
        "args = [" + ", ".join(_toml_string(a) for a in plan.args) + "]",
        f"env_file = {_toml_string(plan.env_file)}",
        f"read_paths = [{_toml_string(plan.prefix)}]",
    ]
    return "\n".join(lines) + "\n"


def env_template(name: str, spec: Spec, variables: list[str]) -> str:
    """The env file's first text: what it is for, and the variables the package mentions, commented out."""
    out = [
        f"# Secrets of server {name} ({spec.text}): KEY=VALUE lines, read only by the spawner (root 0600).",
        "# Every value here is a secret the broker redacts from everything agents see; plain settings",
        f"# (a log level, a time zone) belong in env = {{ ... }} of servers.d/{name}.toml instead.",
    ]
    if variables:
        out.append(f"# Variables the package's description mentions (uncomment and fill in those {name} needs):")
        out += [f"#{v}=" for v in variables]
    else:
        out.append("# The package's description mentions no environment variable; add any it needs here.")
    return "\n".join(out) + "\n"


def documented_variables(text: str) -> list[str]:
    """Environment variable names a README shows being set (an ``"env": {...}`` block, ``export X=``, ``-e X``)."""
    found: list[str] = []
    var = r"[A-Z][A-Z0-9]*_[A-Z0-9_]*[A-Z0-9]"
    patterns = [
        re.compile(rf"^\s*(?:export\s+)?({var})=", re.MULTILINE),
        re.compile(rf"(?:-e|--env)\s+[\"']?({var})\b"),
        re.compile(rf"\b(?:env(?:ironment)?\s+var(?:iable)?s?|env var)\b[^\n]{{0,80}}?`({var})`", re.IGNORECASE),
        re.compile(rf"`({var})`[^\n]{{0,40}}\benv(?:ironment)?\b", re.IGNORECASE),
    ]
    for p in patterns:
        found += p.findall(text)
    for block in re.findall(r"\"env\"\s*:\s*\{([^{}]{0,4000})\}", text):
        found += re.findall(rf"\"({var})\"\s*:", block)
    out: list[str] = []
    for v in found:
        if v not in out and v not in _COMMON_VARIABLES:
            out.append(v)
    return out[:MAX_VARIABLES]


# --- argv of each step (what runs, as the server's user, in its sandbox) ------------------------


def pip_command() -> list[str]:
    """How to run pip (its code from the broker's interpreter, or the system's); UsageError when there is none."""
    if importlib.util.find_spec("pip") is not None:
        return [sys.executable, "-m", "pip"]
    probe = subprocess.run([SYSTEM_PYTHON, "-c", "import pip"], capture_output=True, check=False)
    if probe.returncode == 0:
        return [SYSTEM_PYTHON, "-m", "pip"]
    raise UsageError("installing from PyPI needs pip: apt-get install python3-pip")


def pip_download_argv(pip: list[str], spec: Spec, dest: str) -> list[str]:
    """Resolve and download the whole set, wheels only, with tags of the interpreter the venv is made from."""
    return [*pip, "--python", SYSTEM_PYTHON, "download", *PIP_DOWNLOAD_FLAGS, "--dest", dest, spec.text]


_PIP_SAVED = re.compile(r"^\s*(?:Saved|File was already downloaded) (\S+)\s*$", re.MULTILINE)


def downloaded_files(output: str) -> list[str]:
    """The wheels ``pip download`` chose (downloaded, or found in its destination already), from its output."""
    out: list[str] = []
    for path in _PIP_SAVED.findall(output):
        name = os.path.basename(path)
        if name not in out:
            out.append(name)
    return out


def venv_argv(venv: str) -> list[str]:
    return [SYSTEM_PYTHON, "-m", "venv", "--without-pip", venv]


def pip_install_argv(pip: list[str], venv: str, wheels: str, requirements: str) -> list[str]:
    return [
        *pip,
        "--python",
        f"{venv}/bin/python",
        "install",
        *PIP_INSTALL_FLAGS,
        "--find-links",
        wheels,
        "-r",
        requirements,
    ]


def npm_command() -> list[str]:
    npm = shutil.which("npm", path=BUILD_PATH)
    if npm is None or shutil.which("node", path=BUILD_PATH) is None:
        raise UsageError("installing from npm needs node and npm: apt-get install nodejs npm")
    return [npm]


def npm_lock_argv(npm: list[str]) -> list[str]:
    return [*npm, *NPM_LOCK_FLAGS]


def npm_ci_argv(npm: list[str]) -> list[str]:
    return [*npm, *NPM_CI_FLAGS]


def npm_package_json(name: str, spec: Spec) -> str:
    """The one-dependency package.json the lockfile is made for."""
    doc = {
        "name": f"mcp-privsep-server-{name.lower()}",
        "version": "0.0.0",
        "private": True,
        "description": f"mcp-privsep server {name}: {spec.text}",
        "dependencies": {spec.package: spec.version},
    }
    return json.dumps(doc, indent=2) + "\n"


# --- reading what the registry gave (root reads, never runs) ------------------------------------


def _sha256_file(path: str) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PrivsepError(f"{path}: not a regular file", EX_FAILED)
        digest = hashlib.sha256()
        while chunk := os.read(fd, 1 << 20):
            digest.update(chunk)
        return digest.hexdigest()
    finally:
        os.close(fd)


def wheel_artifacts(directory: str, spec: Spec, chosen: list[str]) -> list[Artifact]:
    """Each chosen wheel with root's sha256 of it; PrivsepError for anything else, or without the package."""
    found: list[Artifact] = []
    seen: dict[str, str] = {}
    for filename in sorted(chosen):
        m = _WHEEL_RE.fullmatch(filename)
        if m is None:
            raise PrivsepError(f"the resolution holds {screen.name(filename)}, which is no wheel: refused", EX_FAILED)
        name, version = m[1], m[2]
        key = normalize(name)
        if key in seen:
            raise PrivsepError(f"the resolution holds two files of {screen.name(name)}: refused", EX_FAILED)
        seen[key] = filename
        found.append(Artifact(name, version, "sha256:" + _sha256_file(f"{directory}/{filename}"), filename))
    top = [a for a in found if normalize(a.name) == normalize(spec.package)]
    if not top or top[0].version != spec.version:
        raise PrivsepError(f"the resolution holds no wheel of {spec.text}", EX_FAILED)
    return found


def _read_member(archive: zipfile.ZipFile, member: str, limit: int = 1 << 20) -> str:
    with archive.open(member) as fh:
        return fh.read(limit).decode("utf-8", errors="replace")


def wheel_metadata(path: str) -> tuple[dict[str, str], str]:
    """(console scripts: name -> entry point, the description) of a wheel, read as a zip (nothing is run)."""
    scripts: dict[str, str] = {}
    description = ""
    try:
        with zipfile.ZipFile(path) as archive:
            members = [n for n in archive.namelist() if n.count("/") == 1 and n.split("/")[0].endswith(".dist-info")]
            for member in members:
                if member.endswith("/entry_points.txt"):
                    parser = configparser.ConfigParser(interpolation=None, delimiters=("=",))
                    parser.optionxform = str  # type: ignore[assignment,method-assign]
                    parser.read_string(_read_member(archive, member))
                    if parser.has_section("console_scripts"):
                        scripts = {k.strip(): v.strip() for k, v in parser.items("console_scripts")}
                elif member.endswith("/METADATA"):
                    description = _read_member(archive, member)
    except (OSError, zipfile.BadZipFile, configparser.Error, KeyError) as exc:
        raise PrivsepError(f"{path}: cannot read the wheel: {exc}", EX_FAILED) from None
    return scripts, description


def choose_entry(entries: dict[str, Any], package: str, wanted: str | None, what: str) -> str:
    """The console script (or bin) to run: ``--entry``, the one named like the package, or the only one."""
    if wanted is not None:
        if wanted not in entries:
            listed = ", ".join(sorted(entries)) or "none"
            raise UsageError(f"--entry {wanted!r}: {package} has no such {what} (it has: {listed})")
        return wanted
    if not entries:
        raise UsageError(f"{package} has no {what}: there is nothing to run as an MCP server")
    base = package.rsplit("/", 1)[-1]
    for candidate in (package, base, normalize(base)):
        if candidate in entries:
            return candidate
    if len(entries) == 1:
        return next(iter(entries))
    raise UsageError(f"{package} has several {what}s ({', '.join(sorted(entries))}): name one with --entry")


def lock_artifacts(lock: dict[str, Any], spec: Spec) -> tuple[list[Artifact], dict[str, str]]:
    """Each package of an npm lockfile (v2/v3) with its integrity, and the top package's bins."""
    if not isinstance(lock.get("lockfileVersion"), int) or lock["lockfileVersion"] < 2:
        raise PrivsepError("the npm lockfile is older than version 2 (npm 7): refused", EX_FAILED)
    packages = lock.get("packages")
    if not isinstance(packages, dict):
        raise PrivsepError("the npm lockfile has no packages: refused", EX_FAILED)
    found: list[Artifact] = []
    bins: dict[str, str] = {}
    for key, entry in sorted(packages.items()):
        if key == "":
            continue
        if not isinstance(key, str) or "node_modules/" not in key or not isinstance(entry, dict):
            raise PrivsepError(f"the npm lockfile has an entry {screen.name(key)} it cannot read: refused", EX_FAILED)
        pkg = key.rsplit("node_modules/", 1)[1]
        version, resolved, integrity = entry.get("version"), entry.get("resolved"), entry.get("integrity")
        if entry.get("link") or not isinstance(resolved, str) or not resolved.startswith(("https://", "http://")):
            raise PrivsepError(
                f"{screen.name(pkg)}: not a registry tarball ({screen.text(resolved)}): only registry packages "
                "with an integrity are installed",
                EX_FAILED,
            )
        if not isinstance(integrity, str) or not _INTEGRITY_RE.fullmatch(integrity.split()[0]):
            raise PrivsepError(f"{screen.name(pkg)}: the lockfile holds no integrity for it: refused", EX_FAILED)
        if not isinstance(version, str):
            raise PrivsepError(f"{screen.name(pkg)}: the lockfile holds no version for it: refused", EX_FAILED)
        found.append(Artifact(pkg, version, integrity.split()[0], resolved))
        if key == f"node_modules/{spec.package}":
            if version != spec.version:
                raise PrivsepError(f"the lockfile holds {spec.package} {version}, not {spec.version}", EX_FAILED)
            raw = entry.get("bin") or {}
            if isinstance(raw, dict):
                bins = {str(k): str(v) for k, v in raw.items()}
    if not any(a.name == spec.package for a in found):
        raise PrivsepError(f"the lockfile holds no {spec.text}", EX_FAILED)
    return found, bins


# --- the build: the server's user, the spawner's sandbox ---------------------------------------


class _Build:
    """Steps run as the server's user in a sandbox, with a scratch home of their own."""

    def __init__(self, paths: Paths, user: pwd.struct_passwd, scratch: str, echo: Callable[[str], None]) -> None:
        from broker.spawner import sandbox  # root's, standard library only: the spawner's own sandbox

        self.sandbox = sandbox
        self.user = user
        self.scratch = scratch
        self.echo = echo
        self.hidden = paths.hidden_from_servers()
        _found, table, _problems = core_servers.load(paths)
        try:
            self.disabled = core_servers.host_settings(table, paths.broker_toml)
        except ConfigError:
            self.disabled = frozenset()
        self.env = {
            "PATH": BUILD_PATH,
            "HOME": scratch,
            "LANG": "C.UTF-8",
            "PIP_NO_INPUT": "1",
            "PIP_DISABLE_PIP_VERSION_CHECK": "1",
            "npm_config_update_notifier": "false",
            "npm_config_cache": f"{scratch}/.npm",
        }
        for key in ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY"):
            if os.environ.get(key):
                self.env[key] = os.environ[key]
        self.warned: set[str] = set()

    def run(
        self,
        what: str,
        argv: list[str],
        network: str,
        writes: tuple[str, ...] = (),
        reads: tuple[str, ...] = (),
        cwd: str | None = None,
    ) -> str:
        """Run one step; its output, or PrivsepError with its last lines."""
        sandbox = self.sandbox
        plan = sandbox.Plan(
            instance=f"build {what}",
            user=self.user.pw_name,
            uid=self.user.pw_uid,
            gid=self.user.pw_gid,
            home=self.scratch,
            command=argv[0],
            args=tuple(argv[1:]),
            cwd=cwd or self.scratch,
            env=dict(self.env),
            network=network,
            read_paths=reads,
            write_paths=writes,
            hidden=self.hidden,
            disabled=self.disabled,
        )
        try:
            started = sandbox.launch(plan)
        except sandbox.SandboxError as exc:
            raise PrivsepError(f"{what}: the build's sandbox did not start: {exc}", EX_FAILED) from None
        os.close(started.stdin)
        output, timed_out = _collect((started.stdout, started.stderr), STEP_SECONDS)
        if timed_out:
            sandbox.kill_keeper(started.pid)
        _pid, status = os.waitpid(started.pid, 0)
        if not started.report.get("protections", {}).get("pid_namespace"):
            sandbox.kill_uid(self.user.pw_uid)  # nothing of the build may outlive it
        for warning in started.report.get("warnings") or []:
            if warning not in self.warned:
                self.warned.add(warning)
                self.echo(f"note: the build's sandbox lacks {screen.line(warning)}")
        code = os.waitstatus_to_exitcode(status)
        text = output.decode("utf-8", errors="replace")
        if timed_out or code != 0:
            tail = text.strip().splitlines()[-15:] or ["(no output)"]
            for row in tail:
                self.echo(f"  {screen.line(row)}")
            why = f"took over {STEP_SECONDS:g} s" if timed_out else f"exit {code}"
            raise PrivsepError(f"{what} failed ({why}): {screen.line(tail[-1])}", EX_FAILED)
        return text


def _collect(fds: tuple[int, int], seconds: float) -> tuple[bytes, bool]:
    """Everything written to both pipes until both close (the tail past MAX_OUTPUT); whether time ran out."""
    data = b""
    open_fds = set(fds)
    deadline = time.monotonic() + seconds
    try:
        while open_fds:
            left = deadline - time.monotonic()
            if left <= 0:
                return data, True
            ready, _, _ = select.select(list(open_fds), [], [], left)
            for fd in ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    open_fds.discard(fd)
                    continue
                data = (data + chunk)[-MAX_OUTPUT:]
    finally:
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)
    return data, False


def make_root_owned(top: str) -> None:
    """Every path under ``top`` root's, 0755 or 0644, no set-id bit; refuse special files and hard links.

    Called once no process of the build is left; the walk is by
    descriptor and follows no link.
    """

    def fix(name: str, dir_fd: int | None, where: str) -> None:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            os.chown(name, 0, 0, dir_fd=dir_fd, follow_symlinks=False)
            return
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise PrivsepError(f"the build left {where}, which is no file or directory: refused", EX_FAILED)
        if stat.S_ISREG(st.st_mode) and st.st_nlink > 1:
            raise PrivsepError(f"the build left {where} as a hard link: refused", EX_FAILED)
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        fd = os.open(name, flags, dir_fd=dir_fd)
        try:
            now = os.fstat(fd)
            if (now.st_ino, now.st_dev) != (st.st_ino, st.st_dev):
                raise PrivsepError(f"{where} changed while it was made root's: refused", EX_FAILED)
            os.fchown(fd, 0, 0)
            executable = stat.S_ISDIR(now.st_mode) or now.st_mode & 0o100
            os.fchmod(fd, 0o755 if executable else 0o644)
        finally:
            os.close(fd)

    fix(top, None, top)
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(top, follow_symlinks=False):
        for name in (*dirnames, *filenames):
            fix(name, dir_fd, os.path.join(dirpath, name))


def manifest(top: str) -> dict[str, str]:
    """Every path under ``top`` (relative) and what it is: ``dir``, ``link:TARGET``, ``sha256:HEX`` or ``other``."""
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(top, follow_symlinks=False):
        rel_dir = os.path.relpath(dirpath, top)
        for name in sorted((*dirnames, *filenames)):
            rel = name if rel_dir == "." else f"{rel_dir}/{name}"
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                out[rel] = "link:" + os.readlink(name, dir_fd=dir_fd)
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = "dir"
            elif stat.S_ISREG(st.st_mode):
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
                digest = hashlib.sha256()
                try:
                    while chunk := os.read(fd, 1 << 20):
                        digest.update(chunk)
                finally:
                    os.close(fd)
                out[rel] = "sha256:" + digest.hexdigest()
            else:
                out[rel] = "other"
    return out


def manifest_changes(recorded: dict[str, str], now: dict[str, str]) -> list[str]:
    """What differs, one phrase per path, sorted: ``changed X``, ``added X``, ``removed X``."""
    out = [f"changed {p}" for p in sorted(recorded.keys() & now.keys()) if recorded[p] != now[p]]
    out += [f"added {p}" for p in sorted(now.keys() - recorded.keys())]
    out += [f"removed {p}" for p in sorted(recorded.keys() - now.keys())]
    return out


# --- files root writes ------------------------------------------------------------------------


def _ensure_root_dir(path: str, mode: int) -> None:
    """A real directory of root's with exactly ``mode``; ConfigError for a link or another owner's."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, mode)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{path}: must be a directory (not a link)")
    if st.st_uid != 0 or st.st_gid != 0 or stat.S_IMODE(st.st_mode) != mode:
        os.chown(path, 0, 0, follow_symlinks=False)
        os.chmod(path, mode)


def _write_atomic(path: str, text: str, mode: int, uid: int = 0, gid: int = 0) -> None:
    from broker.admin.install import replace_file

    replace_file(path, text, mode, uid, gid)


def _servers_d_owner() -> tuple[int, int, int]:
    from broker.admin.install import owner_ids

    return owner_ids(layout.child("servers_d"))


@contextlib.contextmanager
def _locked(paths: Paths) -> Iterator[None]:
    """One ``server`` command at a time on this installation."""
    os.makedirs(os.path.dirname(paths.server_packages), mode=0o755, exist_ok=True)
    _ensure_root_dir(paths.server_packages, 0o755)
    fd = os.open(f"{paths.server_packages}/.lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PrivsepError("another 'mcp-brokerctl server' command is running; try again after it", 75) from None
        yield
    finally:
        os.close(fd)


# --- installed servers: their record ------------------------------------------------------------


def read_record(paths: Paths, name: str) -> dict[str, Any] | None:
    """``install.json`` of an installed server, or None when ``server add`` installed no such server."""
    path = f"{paths.server_package(name)}/{INSTALL_JSON}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    with os.fdopen(fd, "rb") as fh:
        data = fh.read(64 << 20)
    try:
        record = json.loads(data)
    except ValueError:
        raise ConfigError(f"{path}: not JSON; 'mcp-brokerctl server remove {name}' and add it again") from None
    if not isinstance(record, dict) or record.get("format") != MANIFEST_FORMAT or record.get("name") != name:
        raise ConfigError(f"{path}: not a record of server {name}")
    return record


def installed(paths: Paths) -> list[str]:
    """The servers ``server add`` installed here."""
    try:
        entries = sorted(os.listdir(paths.server_packages))
    except FileNotFoundError:
        return []
    return [n for n in entries if not n.startswith(".") and os.path.isfile(f"{paths.server_package(n)}/{INSTALL_JSON}")]


@dataclass
class Installed:
    """What ``add_server`` or ``upgrade_server`` installed, and the server's state after the reload."""

    name: str
    spec: str
    prefix: str
    release: str
    toml_path: str
    env_file: str
    user: str
    command: str
    args: tuple[str, ...]
    artifacts: list[Artifact] = field(default_factory=list)
    #: "up", "down (why)", or "broker not running"
    state: str = ""
    tools: int | None = None


# --- the API ---------------------------------------------------------------------------------

Echo = Callable[[str], None]
Confirm = Callable[[str], bool]


def add_server(
    paths: Paths,
    name: str,
    pip: str | None = None,
    npm: str | None = None,
    yes: bool = False,
    echo: Echo = click.echo,
    confirm: Confirm | None = None,
    entry: str | None = None,
    args: tuple[str, ...] = (),
    cache: str | None = None,
) -> Installed:
    """Install ``pip`` (``PACKAGE==VERSION``) or ``npm`` (``PACKAGE@VERSION``) as server ``name``, after review.

    Shows the plan (every package and its hash, the command), asks (``yes``
    skips the question; ``confirm`` replaces the terminal prompt; with
    neither and no terminal it refuses), builds, configures and reloads.
    PrivsepError (one line) for everything that stops it; nothing is left
    behind by a refusal or a failed build.
    """
    check_name(name)
    spec = parse_spec(pip, npm)
    _require_root()
    with _locked(paths):
        defined = _defined_in(paths, name)
        if defined is not None:
            raise UsageError(
                f"server {name} is already defined in {defined}"
                + (f"; 'mcp-brokerctl server upgrade {name}' replaces its package" if read_record(paths, name) else "")
            )
        prefix = paths.server_package(name)
        if os.path.lexists(prefix):
            raise UsageError(
                f"{prefix} exists (a server add that did not finish?): 'mcp-brokerctl server remove {name}'"
            )
        return _install(paths, name, spec, yes, echo, confirm, entry, args, cache, None)


def upgrade_server(
    paths: Paths,
    name: str,
    pip: str | None = None,
    npm: str | None = None,
    yes: bool = False,
    echo: Echo = click.echo,
    confirm: Confirm | None = None,
    cache: str | None = None,
) -> Installed:
    """Install another version of an installed server beside the running one, and swap to it atomically.

    Without ``pip`` or ``npm`` the recorded package is installed again (a
    fresh release from the registry: what doctor suggests when a prefix
    changed). The servers.d file keeps every edit but the release's paths
    and the command's hash.
    """
    check_name(name)
    wanted = parse_spec(pip, npm) if pip is not None or npm is not None else None
    _require_root()
    with _locked(paths):
        record = read_record(paths, name)
        if record is None:
            raise UsageError(f"server {name} was not installed by 'mcp-brokerctl server add'")
        if wanted is None:
            recorded = str(record.get("spec"))
            spec = parse_spec(recorded, None) if record.get("kind") == "pip" else parse_spec(None, recorded)
        else:
            spec = wanted
        if spec.kind != record["kind"]:
            raise UsageError(f"server {name} was installed from {record['kind']}; remove it and add it again instead")
        return _install(paths, name, spec, yes, echo, confirm, record.get("entry"), (), cache, record)


def remove_server(paths: Paths, name: str, purge: bool = False, echo: Echo = click.echo) -> None:
    """Deny the server's tools, remove its definition, reload, remove its prefix (its env file with ``purge``)."""
    check_name(name)
    _require_root()
    with _locked(paths):
        record = read_record(paths, name)
        prefix = paths.server_package(name)
        toml_path = f"{paths.servers_d}/{name}.toml"
        ours = _written_by_us(toml_path)
        if record is None and not ours and not os.path.lexists(prefix):
            raise UsageError(f"server {name} was not installed by 'mcp-brokerctl server add': nothing removed")
        _deny_everywhere(paths, name, echo)
        if ours:
            os.unlink(toml_path)
            echo(f"removed {toml_path}")
        elif os.path.lexists(toml_path):
            echo(f"note: {toml_path} was not written by 'server add': kept (edit or remove it yourself)")
        _reload(paths, echo)
        if os.path.lexists(prefix):
            shutil.rmtree(prefix)
            echo(f"removed {prefix}")
        env_file = f"{paths.secrets}/{name}.env"
        if purge and os.path.lexists(env_file):
            os.unlink(env_file)
            echo(f"removed {env_file}")
        elif os.path.lexists(env_file):
            echo(f"kept {env_file} (--purge removes it)")
        user = core_servers.server_user_for(name)
        echo(f"server {name}: removed (its user {user} is kept, as system users are)")


# --- the steps ----------------------------------------------------------------------------------


def _require_root() -> None:
    if os.geteuid() != 0:
        raise PrivsepError(
            "server: must run as root (it makes users, builds in sandboxes, writes root's files)", EX_NOPERM
        )


def _defined_in(paths: Paths, name: str) -> str | None:
    """The file that defines server ``name`` now, if any (a broken file that names it counts too)."""
    found, _sandbox, _problems = core_servers.load(paths)
    if name in found:
        return found[name].source
    toml_path = f"{paths.servers_d}/{name}.toml"
    return toml_path if os.path.lexists(toml_path) else None


def _written_by_us(toml_path: str) -> bool:
    try:
        with open(toml_path, encoding="utf-8", errors="replace") as fh:
            return fh.read(len(TOML_MARK)) == TOML_MARK
    except OSError:
        return False


def _install(
    paths: Paths,
    name: str,
    spec: Spec,
    yes: bool,
    echo: Echo,
    confirm: Confirm | None,
    entry: str | None,
    args: tuple[str, ...],
    cache: str | None,
    record: dict[str, Any] | None,
) -> Installed:
    from broker.admin.install import Report, ensure_system_user

    tool = pip_command() if spec.kind == "pip" else npm_command()
    if cache is not None:
        cache = os.path.abspath(cache)
        os.makedirs(cache, mode=0o755, exist_ok=True)
        _ensure_root_dir(cache, 0o755)
    prefix = paths.server_package(name)
    account = core_servers.server_user_for(name)
    report = Report()
    pw = ensure_system_user(account, paths.server_home(name), report)
    for line in report.lines:
        echo(line)
    build_root = f"{paths.server_packages}/.build"
    _ensure_root_dir(build_root, 0o711)
    scratch = f"{build_root}/{name}-{secrets.token_hex(4)}"
    os.mkdir(scratch, 0o700)
    os.chown(scratch, pw.pw_uid, pw.pw_gid)
    build = _Build(paths, pw, scratch, echo)
    release = _release_name(spec, prefix)
    release_dir = f"{prefix}/{release}"
    made_prefix = False
    done = False
    try:
        echo(f"resolving {spec.text} from {spec.registry} (as {account}, in a sandbox) ...")
        if spec.kind == "pip":
            wheels = f"{scratch}/wheels"
            _seed(wheels, cache, pw)
            output = build.run("pip download", pip_download_argv(tool, spec, wheels), "host")
            artifacts = wheel_artifacts(wheels, spec, downloaded_files(output))
            top = next(a for a in artifacts if normalize(a.name) == normalize(spec.package))
            scripts, description = wheel_metadata(f"{wheels}/{top.source}")
            chosen = choose_entry(scripts, spec.package, entry, "console script")
            command, command_args = f"{release_dir}/venv/bin/{chosen}", args
        else:
            lockdir = f"{scratch}/lock"
            os.mkdir(lockdir, 0o755)
            _write_plain(f"{lockdir}/package.json", npm_package_json(name, spec))
            os.chown(lockdir, pw.pw_uid, pw.pw_gid)
            build.run("npm lockfile", npm_lock_argv(tool), "host", writes=(lockdir,), cwd=lockdir)
            lock_bytes = _read_regular(f"{lockdir}/package-lock.json", 64 << 20)
            try:
                lock = json.loads(lock_bytes)
            except ValueError:
                raise PrivsepError("npm wrote a lockfile that is not JSON", EX_FAILED) from None
            artifacts, bins = lock_artifacts(lock, spec)
            chosen = choose_entry(bins, spec.package, entry, "bin")
            bin_path = os.path.normpath(bins[chosen])
            if bin_path.startswith(("/", "..")):
                raise PrivsepError(f"{spec.package}: its bin {screen.text(bins[chosen])} is outside it", EX_FAILED)
            node = os.path.realpath(shutil.which("node", path=BUILD_PATH) or "/usr/bin/node")
            command, command_args = node, (f"{release_dir}/node_modules/{spec.package}/{bin_path}", *args)
            description = ""
        plan = Plan(
            name=name,
            spec=spec,
            artifacts=artifacts,
            prefix=prefix,
            release=release,
            toml_path=f"{paths.servers_d}/{name}.toml",
            env_file=f"{paths.secrets}/{name}.env",
            user=account,
            command=command,
            args=command_args,
            entry=chosen,
            replaces=record["spec"] if record is not None else None,
        )
        for line in plan.lines():
            echo(line)
        if not _confirmed(plan, yes, confirm):
            raise PrivsepError(f"server {name}: not confirmed; nothing installed", EX_FAILED)
        # --- build the release, as the server's user, in its sandbox ------------------------------
        made_prefix = not os.path.lexists(prefix)
        _ensure_root_dir(prefix, 0o755)
        os.mkdir(release_dir, 0o755)
        if spec.kind == "pip":
            requirements = requirements_text(spec, artifacts)
            _write_plain(f"{scratch}/requirements.txt", requirements)
            os.chown(release_dir, pw.pw_uid, pw.pw_gid)
            echo(f"building {release_dir} (no network, no install scripts) ...")
            build.run("venv", venv_argv(f"{release_dir}/venv"), "none", writes=(release_dir,))
            argv = pip_install_argv(tool, f"{release_dir}/venv", f"{scratch}/wheels", f"{scratch}/requirements.txt")
            build.run("pip install", argv, "none", writes=(release_dir,))
        else:
            _write_plain(f"{release_dir}/package.json", npm_package_json(name, spec))
            _write_plain(f"{release_dir}/package-lock.json", lock_bytes.decode("utf-8"))
            os.chown(release_dir, pw.pw_uid, pw.pw_gid)
            echo(f"building {release_dir} (npm ci from the lockfile, install scripts off) ...")
            build.run("npm ci", npm_ci_argv(tool), "host", writes=(release_dir,), cwd=release_dir)
        make_root_owned(release_dir)
        if spec.kind == "pip":
            _write_plain(f"{release_dir}/requirements.txt", requirements)
            if cache is not None:
                _keep_in_cache(f"{scratch}/wheels", artifacts, cache)
        command_sha256 = _check_built(plan)
        variables = documented_variables(description or _npm_readme(plan))
        files = manifest(release_dir)
        new_record = {
            "format": MANIFEST_FORMAT,
            "name": name,
            "kind": spec.kind,
            "package": spec.package,
            "version": spec.version,
            "spec": spec.text,
            "release": release,
            "entry": chosen,
            "command": command,
            "command_sha256": command_sha256,
            "installed": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "artifacts": [
                {"name": a.name, "version": a.version, "digest": a.digest, "source": a.source} for a in artifacts
            ],
            "files": files,
        }
        # --- configure, swap, reload ----------------------------------------------------------------
        from broker.admin.check import check_all

        before = set(check_all(paths))
        made_env = record is None and _write_env_template(plan, spec, variables)
        old_toml = None
        if record is None:
            text = toml_text(plan, command_sha256)
        else:
            old_toml, text = _upgraded_toml(plan, record, command_sha256)
        _write_atomic(f"{prefix}/.{INSTALL_JSON}.new", json.dumps(new_record, indent=1) + "\n", 0o644)
        uid, gid, mode = _servers_d_owner()
        _write_atomic(plan.toml_path, text, mode, uid, gid)
        new_problems = [p for p in check_all(paths) if p not in before]
        if new_problems:
            if old_toml is not None:
                _write_atomic(plan.toml_path, old_toml, mode, uid, gid)
            else:
                os.unlink(plan.toml_path)
            if made_env:
                os.unlink(plan.env_file)
            raise ConfigError(f"server {name}: its definition does not check: {new_problems[0]}", new_problems)
        os.replace(f"{prefix}/.{INSTALL_JSON}.new", f"{prefix}/{INSTALL_JSON}")
        echo(f"wrote {plan.toml_path}")
        if made_env:
            echo(
                f"wrote {plan.env_file} (root 0600): "
                + (", ".join(variables) + " commented out" if variables else "an empty template")
            )
        done = True
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
        if not done:
            shutil.rmtree(release_dir, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{prefix}/.{INSTALL_JSON}.new")
            if made_prefix:
                shutil.rmtree(prefix, ignore_errors=True)
    result = Installed(
        name, spec.text, prefix, release, plan.toml_path, plan.env_file, account, command, command_args, artifacts
    )
    up = _reload(paths, echo)
    if record is not None:
        old = f"{prefix}/{record['release']}"
        if os.path.lexists(old) and record["release"] != release:
            shutil.rmtree(old)
            echo(f"removed the previous release {old}")
    if up:
        result.state, result.tools = _wait_up(paths, name)
        echo(f"server {name}: {result.state}" + (f", {result.tools} tools" if result.tools is not None else ""))
        if result.state != "up":
            raise PrivsepError(
                f"server {name}: installed, but it is {result.state} ('mcp-brokerctl status')", EX_FAILED
            )
    else:
        result.state = "broker not running"
    echo(f"next: mcp-brokerctl tools {name}; mcp-brokerctl allow {name}.TOOL (shows and pins its definition)")
    return result


def _release_name(spec: Spec, prefix: str) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    base = re.sub(r"[^A-Za-z0-9._-]", "_", spec.version) + "-" + stamp
    name, n = base, 1
    while os.path.lexists(f"{prefix}/{name}"):
        n += 1
        name = f"{base}.{n}"
    return name


def _confirmed(plan: Plan, yes: bool, confirm: Confirm | None) -> bool:
    question = f"Install {plan.spec.text} as server {plan.name}?"
    if yes:
        return True
    if confirm is not None:
        return confirm(question)
    if not sys.stdin.isatty():
        raise UsageError(f"server {plan.name}: review the list above, then run again with --yes to install it")
    return click.confirm(question, default=False)


def _write_plain(path: str, text: str) -> None:
    """A new file of root's, 0644 (in a directory no build process can reach now)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        os.fchmod(fd, 0o644)  # whatever root's umask is: the build and the server read it
        fh.write(text)


def _read_regular(path: str, limit: int) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise PrivsepError(f"{path}: {exc.strerror}", EX_FAILED) from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise PrivsepError(f"{path}: not a regular file", EX_FAILED)
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise PrivsepError(f"{path}: larger than {limit} bytes", EX_FAILED)
    return data


def _seed(wheels: str, cache: str | None, owner: pwd.struct_passwd) -> None:
    """The download directory, holding root's wheels of ``cache`` (hard links, else copies): pip keeps those of
    them it chooses and whose hash the index confirms, and downloads only the rest."""
    os.mkdir(wheels, 0o755)
    for filename in sorted(os.listdir(cache)) if cache else []:
        source = f"{cache}/{filename}"
        if _WHEEL_RE.fullmatch(filename) is None or not stat.S_ISREG(os.lstat(source).st_mode):
            continue
        try:
            os.link(source, f"{wheels}/{filename}", follow_symlinks=False)
        except OSError:
            shutil.copyfile(source, f"{wheels}/{filename}", follow_symlinks=False)
            os.chmod(f"{wheels}/{filename}", 0o644)
    os.chown(wheels, owner.pw_uid, owner.pw_gid)


def _keep_in_cache(wheels: str, artifacts: list[Artifact], cache: str) -> None:
    """Root's copy of each wheel that is not in ``cache`` yet (their hashes were checked by pip on install)."""
    for a in artifacts:
        target = f"{cache}/{a.source}"
        if os.path.lexists(target):
            continue
        data = _read_regular(f"{wheels}/{a.source}", 1 << 30)
        if "sha256:" + hashlib.sha256(data).hexdigest() != a.digest:
            continue
        tmp = f"{cache}/.{a.source}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fd, 0o644)  # a build reads it (a hard link in its download directory)
            fh.write(data)
        os.replace(tmp, target)


def _check_built(plan: Plan) -> str | None:
    """What the build must have made: the command to run (its sha256 for a console script)."""
    if plan.spec.kind == "pip":
        script = plan.command
        try:
            st = os.lstat(script)
        except FileNotFoundError:
            raise PrivsepError(f"the build made no {script}", EX_FAILED) from None
        if not stat.S_ISREG(st.st_mode):
            raise PrivsepError(f"{script} is not a regular file", EX_FAILED)
        return _sha256_file(script)
    pkg_json = f"{plan.release_dir}/node_modules/{plan.spec.package}/package.json"
    try:
        version = json.loads(_read_regular(pkg_json, 4 << 20)).get("version")
    except ValueError:
        version = None
    if version != plan.spec.version:
        raise PrivsepError(f"the build did not install {plan.spec.text} ({pkg_json})", EX_FAILED)
    if not os.path.isfile(plan.args[0]):
        raise PrivsepError(f"the build made no {plan.args[0]}", EX_FAILED)
    return None


def _npm_readme(plan: Plan) -> str:
    if plan.spec.kind != "npm":
        return ""
    base = f"{plan.release_dir}/node_modules/{plan.spec.package}"
    for candidate in ("README.md", "readme.md", "README"):
        with contextlib.suppress(PrivsepError):
            return _read_regular(f"{base}/{candidate}", 1 << 20).decode("utf-8", errors="replace")
    return ""


def _upgraded_toml(plan: Plan, record: dict[str, Any], command_sha256: str | None) -> tuple[str, str]:
    """(the servers.d file now, with the old release's paths and command hash replaced by the new ones)."""
    old = _read_regular(plan.toml_path, 4 << 20).decode("utf-8")
    old_release = f"{plan.prefix}/{record['release']}"
    if old_release not in old:
        raise ConfigError(
            f"{plan.toml_path} does not run {old_release}: edit it back, "
            f"or 'server remove {plan.name}' and add it again"
        )
    new = old.replace(f"{old_release}/", f"{plan.release_dir}/")
    old_sha, new_sha = record.get("command_sha256"), command_sha256
    if old_sha and new_sha:
        new = new.replace(f'"{old_sha}"', f'"{new_sha}"')
    mark = f"{TOML_MARK} from {plan.spec.registry}: {plan.spec.text}"
    new = re.sub(rf"^{re.escape(TOML_MARK)} from .*$", mark, new, count=1, flags=re.MULTILINE)
    return old, new


def _write_env_template(plan: Plan, spec: Spec, variables: list[str]) -> bool:
    """The env file's template, root 0600, unless the file exists (an operator's secrets are never replaced)."""
    if os.path.lexists(plan.env_file):
        return False
    os.makedirs(os.path.dirname(plan.env_file), mode=0o700, exist_ok=True)
    fd = os.open(plan.env_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(env_template(plan.name, spec, variables))
        os.fchown(fh.fileno(), 0, 0)
    return True


def _deny_everywhere(paths: Paths, name: str, echo: Echo) -> None:
    """``deny 'NAME.*'`` in the allowlist and every allowed-actions.d file: a server of that name added later is
    reviewed afresh."""
    from broker.admin import allowlist_edit

    files = [paths.allowlist]
    with contextlib.suppress(FileNotFoundError):
        files += [f"{paths.allowlist_d}/{n}" for n in sorted(os.listdir(paths.allowlist_d)) if n.endswith(".txt")]
    for path in files:
        if not os.path.isfile(path):
            continue
        result = allowlist_edit.deny(path, [f"{name}.*"])
        for action in result.done:
            echo(f"denied {action} in {path}")


def _broker_uid() -> int | None:
    try:
        return pwd.getpwnam(BROKER_USER).pw_uid
    except KeyError:
        return None


def _reload(paths: Paths, echo: Echo) -> bool:
    """What ``mcp-brokerctl reload`` does (server users, then the daemon's reload); False when it is not running."""
    from broker.admin.install import Report, install_servers
    from broker.core import agents as agent_map

    report = Report()
    try:
        install_servers(paths, list(agent_map.load(paths.gate_users)), report)
    except (ConfigError, OSError, PrivsepError) as exc:
        echo(f"reload: server users not updated: {exc}")
    for line in report.lines:
        echo(f"reload: {line}")
    try:
        result = wire.admin_request(paths.admin_sock, _broker_uid(), "reload", 60.0)
    except PrivsepError as exc:
        if exc.exit_code != EX_UNAVAILABLE:
            raise
        echo("note: the broker is not running; it reads the new definition when it starts")
        return False
    echo(f"reload: added {result['added']}, removed {result['removed']}, restarted {result['restarted']}")
    return True


def _wait_up(paths: Paths, name: str, seconds: float = 60.0) -> tuple[str, int | None]:
    """The server's state once it is up or has failed to start (or after ``seconds``), and its tools."""
    deadline = time.monotonic() + seconds
    state = "not started"
    while True:
        try:
            status = wire.admin_request(paths.admin_sock, _broker_uid(), "status", 10.0)
        except PrivsepError as exc:
            return f"unknown ({exc})", None
        for s in status.get("servers", []):
            if s.get("name") == name:
                state = str(s.get("state"))
                if state == "up":
                    return "up", s.get("tools")
                if state == "down" and s.get("reason"):
                    state = f"down ({screen.line(s['reason'])})"
                    if s.get("restarts", 0) >= 1:
                        return state, None
        if time.monotonic() > deadline:
            return state, None
        time.sleep(0.2)


# --- doctor -------------------------------------------------------------------------------------


def verify_all(paths: Paths) -> list[tuple[str, str, str]]:
    """(level, message, fix) for every installed server: "ok", or a "warning" where its prefix changed since
    ``server add`` (a file's digest, an owner, a mode) or a build was left behind."""
    out: list[tuple[str, str, str]] = []
    for name in installed(paths):
        out.extend(verify(paths, name))
    build_root = f"{paths.server_packages}/.build"
    with contextlib.suppress(FileNotFoundError):
        for left in sorted(os.listdir(build_root)):
            out.append(("warning", f"{build_root}/{left}: a build that did not finish", f"rm -rf {build_root}/{left}"))
    return out


def verify(paths: Paths, name: str) -> list[tuple[str, str, str]]:
    """Doctor's check of one installed server (see :func:`verify_all`)."""
    prefix = paths.server_package(name)
    fix = f"mcp-brokerctl server upgrade {name}  (installs the recorded package again)"
    try:
        record = read_record(paths, name)
    except ConfigError as exc:
        return [("warning", exc.message, fix)]
    if record is None:
        return []
    found: list[str] = []
    for path in (paths.server_packages, prefix, f"{prefix}/{INSTALL_JSON}"):
        st = os.lstat(path)
        if st.st_uid != 0 or st.st_mode & 0o022 or stat.S_ISLNK(st.st_mode):
            found.append(f"{path} is not root's or is writable by others")
    release = f"{prefix}/{record['release']}"
    extra = [n for n in os.listdir(prefix) if n not in (INSTALL_JSON, record["release"])]
    found += [f"{prefix}/{n} is not part of the installed release" for n in sorted(extra)]
    if not os.path.isdir(release) or os.path.islink(release):
        found.append(f"{release} is missing")
    else:
        bad = []
        for dirpath, dirnames, filenames, dir_fd in os.fwalk(release, follow_symlinks=False):
            for n in (".", *dirnames, *filenames):
                st = os.stat(n, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISLNK(st.st_mode) and (st.st_uid != 0 or st.st_mode & 0o7022):
                    bad.append(os.path.normpath(os.path.join(dirpath, n)))
        if bad:
            found.append(f"{len(bad)} path(s) not root's, writable by others or set-id: {', '.join(bad[:3])}")
        changes = manifest_changes(record.get("files") or {}, manifest(release))
        if changes:
            shown = ", ".join(changes[:5]) + (f" and {len(changes) - 5} more" if len(changes) > 5 else "")
            found.append(f"{len(changes)} file(s) differ from what 'server add' installed: {shown}")
    toml_path = f"{paths.servers_d}/{name}.toml"
    if not _written_by_us(toml_path):
        found.append(f"{toml_path} is missing or no longer the one 'server add' wrote")
    if found:
        return [("warning", f"server {name} ({record['spec']}): {why}", fix) for why in found]
    count = len(record.get("files") or {})
    return [("ok", f"server {name} ({record['spec']}): {count} files as 'server add' installed them", "")]


# --- the commands -------------------------------------------------------------------------------


def _paths_of(ctx: click.Context) -> Paths:
    return Paths((ctx.find_root().obj or {}).get("root", "/"))


@click.group("server")
def server() -> None:
    """Install MCP servers from PyPI or npm: pinned, hashed, built unprivileged, root's and read-only.

    Each goes into its own prefix under /var/lib/mcp-privsep-packages/NAME,
    apart from the broker's own code, and gets servers.d/NAME.toml and an
    env-file template secrets/NAME.env.
    """


@server.command("add")
@click.argument("name")
@click.option("--pip", "pip_spec", metavar="PACKAGE==VERSION", help="A PyPI package, pinned exactly.")
@click.option("--npm", "npm_spec", metavar="PACKAGE@VERSION", help="An npm package, pinned exactly (x.y.z).")
@click.option("--entry", metavar="NAME", help="The console script (pip) or bin (npm) to run, if it has several.")
@click.option("--arg", "args", multiple=True, metavar="ARG", help="An argument of the server's command (repeatable).")
@click.option("--cache", metavar="DIR", help="Root's directory of wheels to reuse and add to (pip).")
@click.option("--yes", "-y", is_flag=True, help="Install without asking (after printing what).")
@click.pass_context
def add_cmd(
    ctx: click.Context,
    name: str,
    pip_spec: str | None,
    npm_spec: str | None,
    entry: str | None,
    args: tuple[str, ...],
    cache: str | None,
    yes: bool,
) -> None:
    """Resolve, show (with hashes), and on confirmation install a package as server NAME, then reload."""
    add_server(_paths_of(ctx), name, pip_spec, npm_spec, yes=yes, entry=entry, args=args, cache=cache)


@server.command("upgrade")
@click.argument("name")
@click.option("--pip", "pip_spec", metavar="PACKAGE==VERSION", help="The new PyPI version, pinned exactly.")
@click.option("--npm", "npm_spec", metavar="PACKAGE@VERSION", help="The new npm version, pinned exactly.")
@click.option("--cache", metavar="DIR", help="Root's directory of wheels to reuse and add to (pip).")
@click.option("--yes", "-y", is_flag=True, help="Install without asking (after printing what).")
@click.pass_context
def upgrade_cmd(
    ctx: click.Context, name: str, pip_spec: str | None, npm_spec: str | None, cache: str | None, yes: bool
) -> None:
    """Install another version beside the running one and swap to it (none named: the same again)."""
    upgrade_server(_paths_of(ctx), name, pip_spec, npm_spec, yes=yes, cache=cache)


@server.command("remove")
@click.argument("name")
@click.option("--purge", is_flag=True, help="Also remove its env file (its secrets).")
@click.pass_context
def remove_cmd(ctx: click.Context, name: str, purge: bool) -> None:
    """Deny its tools, remove its definition and its prefix, reload (its env file is kept unless --purge)."""
    remove_server(_paths_of(ctx), name, purge)


@server.command("list")
@click.pass_context
def list_cmd(ctx: click.Context) -> None:
    """The servers 'server add' installed, with their package and release."""
    paths = _paths_of(ctx)
    found = installed(paths)
    if not found:
        click.echo("server: none installed by 'server add'")
    for name in found:
        record = read_record(paths, name) or {}
        click.echo(f"{name}  {record.get('spec')}  {paths.server_package(name)}/{record.get('release')}")
