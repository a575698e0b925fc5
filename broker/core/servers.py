"""Server definitions: the ``[servers.NAME]`` tables, their users, sandboxes and secret files.

Three processes read the same definitions, each for its own part: the
spawner (root) starts a server only as its definition says, under its own
user and sandbox, and is the only process that reads secret env files; the
daemon (``mcp-broker``) keeps a session with each server and enforces
policy, and learns a server's secret values only from the spawner (the ones
it must redact or put in HTTP headers); ``mcp-brokerctl check`` (root)
validates everything offline. One parser serves them all, so the three
cannot disagree about what a definition means. Standard library only: the
spawner imports it.

Every problem is ``FILE: servers.NAME.KEY: message``. A definition that is
accepted here can still be refused when a server starts (its user is a
login account, its env file is not root's), and then says so in ``status``.
"""

from __future__ import annotations

import collections
import hashlib
import itertools
import json
import math
import os
import pwd
import re
import stat
import tomllib
import urllib.parse
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from broker.core.errors import ConfigError
from broker.core.names import valid_server_name, valid_user_name
from broker.core.paths import BROKER_USER, GATE_USER, GATE_USER_PREFIX, MAX_USER_NAME, Paths

SERVER_USER_PREFIX = "mcp-srv-"
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_ENV_FILE_BYTES = 1024 * 1024
MAX_CONFIG_BYTES = 4 * 1024 * 1024
SHA256_RE = re.compile(r"[0-9a-f]{64}")
#: shells that mean "cannot log in": a server's account must have one
NO_LOGIN_SHELLS = frozenset({"/usr/sbin/nologin", "/sbin/nologin", "/bin/false", "/usr/bin/false", ""})

Network = Literal["host", "none"]
SandboxMode = Literal["auto", "strict"]
#: how an allowlisted tool nobody reviewed is treated (see ``[broker] pin``)
PinPolicy = Literal["review", "first-use"]
PIN_POLICIES: tuple[PinPolicy, ...] = ("review", "first-use")

#: the protections a host can lack; ``[sandbox] disable`` names any of them (see :func:`host_settings`)
PROTECTIONS = ("pid_namespace", "mount_namespace", "network_namespace", "landlock")

#: placeholders a stdio definition may use in args, cwd, env values, read_paths and write_paths
PLACEHOLDERS = ("{home}", "{agent}")


@dataclass(frozen=True)
class Limits:
    """Resource limits of a server's processes (``None``: unlimited)."""

    memory: int | None = 4 << 30  # RLIMIT_DATA: address space would break runtimes that reserve it (V8, Go)
    processes: int | None = 512  # RLIMIT_NPROC, per uid (each server has its own); threads count
    open_files: int | None = 4096  # RLIMIT_NOFILE
    file_size: int | None = 4 << 30  # RLIMIT_FSIZE


@dataclass(frozen=True)
class ServerDef:
    """One validated ``[servers.NAME]`` table (no secret in it: env files are read apart)."""

    name: str
    source: str
    command: str | None = None
    args: tuple[str, ...] = ()
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    env_file: str | None = None
    #: plain settings of a stdio server's environment (not secrets: secrets go in env_file)
    env: dict[str, str] = field(default_factory=dict)
    timeout: float | None = None
    #: calls sent to it at once (1: a server that handles one request at a time); beyond it calls wait
    #: in the daemon, served round-robin across callers
    concurrency: int = 16
    #: how an allowlisted tool nobody reviewed is treated: None follows ``[broker] pin`` ("review": blocked
    #: until ``mcp-brokerctl pins accept``; "first-use": pinned by its first call)
    pin: PinPolicy | None = None
    #: the account it runs as; None: its own ``mcp-srv-NAME``, created by install and reload
    user: str | None = None
    #: one instance, under its own user, for each calling agent
    per_caller: bool = False
    sandbox: SandboxMode = "auto"
    network: Network = "host"
    #: with network = "host": the only TCP ports it may connect to (Landlock); None: any
    connect_ports: tuple[int, ...] | None = None
    #: TCP ports it may listen on (0: an ephemeral port); none by default (Landlock)
    bind_ports: tuple[int, ...] = ()
    read_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()
    limits: Limits = field(default_factory=Limits)
    #: the command's file must hash to this (it is run from the descriptor that was hashed)
    command_sha256: str | None = None

    @property
    def transport(self) -> str:
        return "stdio" if self.command is not None else "http"

    def fingerprint(self) -> str:
        """Equal fingerprints mean a reload can keep the running session (the env file is hashed apart)."""
        data = asdict(self)
        data.pop("source")
        data.pop("pin")  # a decision of the daemon's: changing it restarts nothing
        return hashlib.sha256(json.dumps(data, sort_keys=True, default=list).encode()).hexdigest()


# --- parsing ------------------------------------------------------------------------------------

_STDIO_ONLY = (
    "args",
    "cwd",
    "env",
    "user",
    "per_caller",
    "sandbox",
    "network",
    "connect_ports",
    "bind_ports",
    "read_paths",
    "write_paths",
    "memory",
    "processes",
    "open_files",
    "file_size",
    "command_sha256",
)
_KEYS = frozenset({"command", "url", "headers", "env_file", "timeout", "concurrency", "pin", *_STDIO_ONLY})
_SIZE_RE = re.compile(r"(\d+)\s*([KMGT]?)i?B?", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


class _Problems:
    """Problems of one table, each with its place."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.found: list[str] = []

    def add(self, key: str, message: str) -> None:
        self.found.append(f"{self.where}.{key}: {message}" if key else f"{self.where}: {message}")


def _string(table: dict[str, Any], key: str, p: _Problems) -> str | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        p.add(key, "must be a string")
        return None
    if "\0" in value:
        p.add(key, "must not contain a NUL character")
        return None
    return value


def _absolute(table: dict[str, Any], key: str, p: _Problems, home_ok: bool = False) -> str | None:
    value = _string(table, key, p)
    in_home = home_ok and value is not None and (value == "{home}" or value.startswith("{home}/"))
    if value is not None and not (value.startswith("/") or in_home):
        p.add(key, "must be an absolute path")
        return None
    return value


def _strings(table: dict[str, Any], key: str, p: _Problems) -> tuple[str, ...]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and "\0" not in v for v in value):
        p.add(key, "must be a list of strings")
        return ()
    return tuple(value)


def _mapping(table: dict[str, Any], key: str, p: _Problems) -> dict[str, str]:
    value = table.get(key, {})
    if not isinstance(value, dict) or not all(isinstance(v, str) and "\0" not in v for v in value.values()):
        p.add(key, "must be a table of strings")
        return {}
    return dict(value)


def _paths(table: dict[str, Any], key: str, p: _Problems) -> tuple[str, ...]:
    found = _strings(table, key, p)
    for path in found:
        parts = path.split("/")
        spelled_root = all(part in ("", ".") for part in parts[1:]) if path.startswith("/") else False
        if (not path.startswith(("/", "{home}/")) and path != "{home}") or ".." in parts or spelled_root:
            p.add(key, f"{path!r}: must be an absolute path, not / and without ..")
            return ()
    return found


#: the bundled files server (``python -m mcp_servers.files --root NAME=PATH[:ro|:rw]``)
FILES_MODULE = "mcp_servers.files"
_FILES_ROOT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def files_server_roots(args: tuple[str, ...]) -> tuple[str, ...] | None:
    """The ``:rw`` root paths of a definition that runs the bundled files server; None when it runs another.

    Its read-write roots are write paths by their nature: the sandbox grants
    them without a second line in the config (the first version had no
    ``write_paths``, and an upgrade must need no operator edit). Paths the
    server itself would refuse (relative ones) are left to it.
    """
    specs = _files_root_specs(args)
    if specs is None:
        return None
    found: list[str] = []
    for spec in specs:
        name, sep, rest = spec.partition("=")
        head, colon, mode = rest.rpartition(":")
        if not sep or not colon or mode != "rw" or not _FILES_ROOT_NAME.fullmatch(name) or ".." in head.split("/"):
            continue
        path = os.path.normpath(head) if head.startswith("/") else head
        absolute = path.startswith("/") and path != "/"
        if (absolute or path == "{home}" or path.startswith("{home}/")) and path not in found:
            found.append(path)
    return tuple(found)


def _files_root_specs(args: tuple[str, ...]) -> list[str] | None:
    """The ``--root`` values of a definition that runs the bundled files server; None when it runs another."""
    runs_it = any(a == "-m" and b == FILES_MODULE for a, b in itertools.pairwise(args)) or f"-m{FILES_MODULE}" in args
    if not runs_it:
        return None
    specs = [b for a, b in itertools.pairwise(args) if a == "--root"]
    return specs + [a.removeprefix("--root=") for a in args if a.startswith("--root=")]


def files_root_clashes(args: tuple[str, ...], own: tuple[str, ...], homes: tuple[str, ...] = ()) -> list[str]:
    """Each root (ro or rw) of a files server that is, lies inside or holds one of ``own``, as one message.

    ``own`` are the broker's own directories (``check`` passes
    :meth:`Paths.hidden_from_servers` and the code directory); ``homes`` the
    server's own homes, where a root is its own business (``{home}`` is one).
    A root is compared as written and as resolved (a link to a broker
    directory is the directory), and parsed as the server parses it:
    ``NAME=PATH``, read-only unless ``:rw``. Relative paths are left to the
    server, which refuses them.
    """
    found: list[str] = []

    def inside(a: str, b: str) -> bool:
        return a == b or a.startswith(b.rstrip("/") + "/")

    for spec in _files_root_specs(args) or ():
        rest = spec.partition("=")[2]
        head, colon, mode = rest.rpartition(":")
        path = head if colon and mode in ("ro", "rw") else rest
        if path == "{home}" or path.startswith("{home}/"):
            if ".." in path.split("/"):
                found.append(f"--root {spec}: climbs out of the server's home with '..'")
            continue
        if not path.startswith("/"):
            continue
        forms = {os.path.normpath(path), os.path.realpath(path)}
        if any(inside(f, os.path.realpath(h)) or inside(f, os.path.normpath(h)) for f in forms for h in homes):
            continue
        for d in own:
            clash = None
            for f in forms:
                for g in {os.path.normpath(d), os.path.realpath(d)}:
                    if f == g:
                        clash = "is"
                    elif inside(f, g):
                        clash = clash or "lies inside"
                    elif inside(g, f):
                        clash = clash or "holds"
            if clash:
                found.append(
                    f"--root {spec}: {clash} the broker's own directory {d} "
                    "(a files server root may not be at, inside or above the broker's directories)"
                )
                break
    return found


def _with_files_roots(write_paths: tuple[str, ...], args: tuple[str, ...]) -> tuple[str, ...]:
    return write_paths + tuple(x for x in files_server_roots(args) or () if x not in write_paths)


def parse_size(value: object) -> int | None:
    """Bytes from ``123``, ``"512M"``, ``"4 GiB"``; None for ``"unlimited"``; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError('must be a number of bytes, a size like "512M", or "unlimited"')
    if isinstance(value, int):
        if value <= 0:
            raise ValueError("must be positive")
        return value
    if isinstance(value, str):
        if value == "unlimited":
            return None
        m = _SIZE_RE.fullmatch(value.strip())
        if m and int(m.group(1)) > 0:
            return int(m.group(1)) * _SIZE_UNITS[m.group(2).upper()]
    raise ValueError('must be a number of bytes, a size like "512M", or "unlimited"')


def _count(value: object) -> int | None:
    if value == "unlimited":
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError('must be a positive integer or "unlimited"')
    return value


def _limits(table: dict[str, Any], p: _Problems) -> Limits:
    defaults = Limits()
    values: dict[str, int | None] = {}
    parsers = (("memory", parse_size), ("processes", _count), ("open_files", _count), ("file_size", parse_size))
    for key, parse in parsers:
        if key not in table:
            values[key] = getattr(defaults, key)
            continue
        try:
            values[key] = parse(table[key])
        except ValueError as exc:
            p.add(key, str(exc))
            values[key] = getattr(defaults, key)
    return Limits(**values)


def parse_server(name: str, table: object, source: str) -> ServerDef:
    """The definition ``[servers.NAME]`` of ``source`` holds; ConfigError with every problem."""
    p = _Problems(f"{source}: servers.{name}")
    if not valid_server_name(name):
        p.add("", "server names are [A-Za-z0-9_-]+")
        raise ConfigError(p.found[0], p.found)
    if not isinstance(table, dict):
        p.add("", "must be a table")
        raise ConfigError(p.found[0], p.found)
    for key in sorted(set(table) - _KEYS):
        p.add(key, "unknown key")
    command = _absolute(table, "command", p)
    url = _string(table, "url", p)
    if url is not None and not url.startswith(("http://", "https://")):
        p.add("url", "must be an http:// or https:// URL")
    if ("command" in table) == ("url" in table):
        p.add("", "set exactly one of 'command' (stdio) or 'url' (streamable HTTP)")
    if url is not None:
        for key in _STDIO_ONLY:
            if key in table:
                p.add(key, "applies to stdio servers only")
    if command is not None and "headers" in table:
        p.add("headers", "applies to HTTP servers only")
    args = _strings(table, "args", p)
    for arg in args:
        if VAR_RE.search(arg):
            p.add("args", "cannot take ${VAR}: command lines are readable by every user")
            break
    env = _mapping(table, "env", p)
    for key in env:
        if not ENV_KEY_RE.fullmatch(key):
            p.add("env", f"{key!r} is not a variable name")
    timeout = table.get("timeout")
    number = isinstance(timeout, int | float) and not isinstance(timeout, bool)
    if timeout is not None and not (number and 0 < timeout <= 3600):
        p.add("timeout", "must be a number of seconds, more than 0 and at most 3600")
        timeout = None
    concurrency = table.get("concurrency", ServerDef.concurrency)
    if not (isinstance(concurrency, int) and not isinstance(concurrency, bool) and 1 <= concurrency <= 1024):
        p.add("concurrency", "must be a whole number of calls sent at once, from 1 to 1024")
        concurrency = ServerDef.concurrency
    pin = table.get("pin")
    if pin is not None and pin not in PIN_POLICIES:
        p.add("pin", 'must be "review" (an operator reviews each tool first) or "first-use" (its first call pins it)')
        pin = None
    user = _string(table, "user", p)
    if user is not None and not valid_user_name(user):
        p.add("user", "is not a user name")
    per_caller = table.get("per_caller", False)
    if not isinstance(per_caller, bool):
        p.add("per_caller", "must be true or false")
        per_caller = False
    if per_caller and user is not None:
        p.add("user", "cannot be set with per_caller = true: each instance has its own user")
    sandbox = table.get("sandbox", "auto")
    if sandbox not in ("auto", "strict"):
        p.add("sandbox", 'must be "auto" (start with what the host provides, with a warning) or "strict"')
        sandbox = "auto"
    network = table.get("network", "host")
    if network not in ("host", "none"):
        p.add("network", 'must be "host" or "none"')
        network = "host"
    ports = table.get("connect_ports")
    connect_ports: tuple[int, ...] | None = None
    if ports is not None:
        if not isinstance(ports, list) or not all(
            isinstance(n, int) and not isinstance(n, bool) and 0 < n < 65536 for n in ports
        ):
            p.add("connect_ports", "must be a list of TCP ports (1-65535)")
        elif network == "none":
            p.add("connect_ports", 'applies to network = "host" only')
        else:
            connect_ports = tuple(sorted(set(ports)))
    bind = table.get("bind_ports", [])
    bind_ports: tuple[int, ...] = ()
    if not isinstance(bind, list) or not all(
        isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 65536 for n in bind
    ):
        p.add("bind_ports", "must be a list of TCP ports (0-65535; 0 is an ephemeral port)")
    else:
        bind_ports = tuple(sorted(set(bind)))
    digest = _string(table, "command_sha256", p)
    if digest is not None and not SHA256_RE.fullmatch(digest):
        p.add("command_sha256", "must be 64 lowercase hexadecimal digits")
    if not per_caller:
        for key in ("args", "env", "cwd", "read_paths", "write_paths"):
            raw = table.get(key)
            values = raw.values() if isinstance(raw, dict) else raw if isinstance(raw, list) else [raw]
            if any(isinstance(v, str) and "{agent}" in v for v in values):
                p.add(key, "{agent} applies to per_caller = true servers only")
    defn = ServerDef(
        name=name,
        source=source,
        command=command,
        args=args,
        cwd=_absolute(table, "cwd", p, home_ok=True),
        url=url,
        headers=_mapping(table, "headers", p),
        env_file=_absolute(table, "env_file", p),
        env=env,
        timeout=float(timeout) if timeout is not None else None,
        concurrency=concurrency,
        pin=pin,
        user=user,
        per_caller=per_caller,
        sandbox=sandbox,
        network=network,
        connect_ports=connect_ports,
        bind_ports=bind_ports,
        read_paths=_paths(table, "read_paths", p),
        write_paths=_with_files_roots(_paths(table, "write_paths", p), args),
        limits=_limits(table, p),
        command_sha256=digest,
    )
    if p.found:
        raise ConfigError(p.found[0], p.found)
    return defn


def config_files(paths: Paths) -> list[str]:
    """``broker.toml`` and then ``servers.d/*.toml`` in name order (dot-files skipped)."""
    try:
        extra = sorted(n for n in os.listdir(paths.servers_d) if n.endswith(".toml") and not n.startswith("."))
    except FileNotFoundError:
        extra = []
    except OSError as exc:
        raise ConfigError(f"{paths.servers_d}: {exc.strerror}") from None
    return [paths.broker_toml, *(f"{paths.servers_d}/{n}" for n in extra)]


def read_toml(path: str) -> dict[str, Any]:
    """One config file, parsed; ConfigError naming the file."""
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def collect(documents: list[tuple[str, dict[str, Any]]]) -> tuple[dict[str, ServerDef], list[str]]:
    """Every server of the parsed files (in order), and every problem (a name defined twice names both)."""
    found: dict[str, ServerDef] = {}
    defined_in: dict[str, str] = {}  # broken definitions count too: a second one is still a duplicate
    problems: list[str] = []
    for path, doc in documents:
        tables = doc.get("servers", {})
        if not isinstance(tables, dict):
            problems.append(f"{path}: servers: must be a table")
            continue
        for name, table in tables.items():
            if name in defined_in:
                problems.append(f"{path}: servers.{name}: already defined in {defined_in[name]}")
                continue
            defined_in[name] = path
            try:
                found[name] = parse_server(name, table, path)
            except ConfigError as exc:
                problems.extend(exc.problems)
    return found, problems


def load(paths: Paths) -> tuple[dict[str, ServerDef], dict[str, Any], list[str]]:
    """Read every config file: (servers, the ``[sandbox]`` table, problems). Nothing else is interpreted."""
    documents: list[tuple[str, dict[str, Any]]] = []
    problems: list[str] = []
    sandbox: dict[str, Any] = {}
    for path in config_files(paths):
        try:
            doc = read_toml(path)
        except ConfigError as exc:
            problems.append(exc.message)
            continue
        documents.append((path, doc))
        if "sandbox" in doc:
            if path != paths.broker_toml:
                problems.append(f"{path}: [sandbox] belongs in {paths.broker_toml}")
            else:
                sandbox = doc["sandbox"]
    servers, more = collect(documents)
    try:
        host_settings(sandbox, paths.broker_toml)
    except ConfigError as exc:
        more.extend(exc.problems)
    return servers, sandbox, problems + more


def host_settings(table: object, source: str) -> frozenset[str]:
    """The ``[sandbox]`` table: ``disable = [...]`` names protections this host must not use."""
    if not isinstance(table, dict):
        raise ConfigError(f"{source}: sandbox: must be a table")
    problems = [f"{source}: sandbox.{k}: unknown key" for k in sorted(set(table) - {"disable"})]
    disable = table.get("disable", [])
    if not isinstance(disable, list) or not all(isinstance(x, str) for x in disable):
        problems.append(f"{source}: sandbox.disable: must be a list of names")
        disable = []
    for item in disable:
        if item not in PROTECTIONS:
            problems.append(f"{source}: sandbox.disable: {item!r} is none of {', '.join(PROTECTIONS)}")
    if problems:
        raise ConfigError(problems[0], problems)
    return frozenset(disable)


# --- users --------------------------------------------------------------------------------------


def instance_name(server: str, agent: str | None) -> str:
    """``NAME`` or, for a per-caller instance, ``NAME@AGENT`` (the key of its home, env file and status)."""
    return server if agent is None else f"{server}@{agent}"


def server_user_for(server: str, agent: str | None = None) -> str:
    """The default account of a server (``mcp-srv-NAME``) or per-caller instance (``mcp-srv-NAME.AGENT``).

    Server names hold no dot, so the two kinds never meet. A name that is too
    long or not lowercase is cut and given a digest of the whole.
    """
    whole = server if agent is None else f"{server}.{agent}"
    name = SERVER_USER_PREFIX + whole
    if len(name) <= MAX_USER_NAME and name == name.lower() and "$" not in whole:
        return name
    digest = hashlib.sha256(whole.encode()).hexdigest()[:8]
    keep = MAX_USER_NAME - len(SERVER_USER_PREFIX) - 9
    cut = "".join(ch for ch in whole.lower() if ch.isalnum() or ch in "_-.")[:keep]
    return f"{SERVER_USER_PREFIX}{cut}-{digest}"


def account_of(defn: ServerDef, agent: str | None = None) -> str:
    """The account an instance of ``defn`` runs as."""
    if defn.user is not None and agent is None:
        return defn.user
    return server_user_for(defn.name, agent)


def instances(defs: dict[str, ServerDef], agents: list[str]) -> list[tuple[ServerDef, str | None]]:
    """Every instance to run: one per server, or one per agent for a per-caller server."""
    out: list[tuple[ServerDef, str | None]] = []
    for defn in defs.values():
        if defn.command is None:
            continue
        if defn.per_caller:
            out.extend((defn, agent) for agent in agents)
        else:
            out.append((defn, None))
    return out


def account_problems(defs: dict[str, ServerDef], agent_map: dict[str, str], missing_ok: bool = False) -> dict[str, str]:
    """instance -> why its account cannot run it (uid 0, a system account of ours, a login shell, shared).

    ``missing_ok``: an account that does not exist yet is no problem (install
    and reload create the default ones; an explicit ``user =`` must exist).
    """
    never: dict[int, str] = {0: "root"}
    for name in (BROKER_USER, GATE_USER, *agent_map.values()):
        try:
            never[pwd.getpwnam(name).pw_uid] = f"the account {name}"
        except KeyError:
            continue
    for name in agent_map:
        try:
            never.setdefault(pwd.getpwnam(name).pw_uid, f"the agent {name}")
        except KeyError:
            continue
    problems: dict[str, str] = {}
    used: dict[int, str] = {}
    for defn, agent in instances(defs, list(agent_map)):
        key = instance_name(defn.name, agent)
        account = account_of(defn, agent)
        try:
            pw = pwd.getpwnam(account)
        except KeyError:
            if defn.user is not None or not missing_ok:
                problems[key] = f"its user {account} does not exist" + (
                    "" if defn.user is not None else " (run 'mcp-brokerctl reload' or 'install')"
                )
            continue
        if pw.pw_uid in never:
            problems[key] = f"its user {account} is {never[pw.pw_uid]}: a server never runs as that"
        elif account.startswith(GATE_USER_PREFIX):
            problems[key] = f"its user {account} is a gate user: a server never runs as that"
        elif pw.pw_shell not in NO_LOGIN_SHELLS:
            problems[key] = f"its user {account} has a login shell ({pw.pw_shell}); a server's account must not"
        elif pw.pw_uid in used:
            problems[key] = f"its user {account} (uid {pw.pw_uid}) already runs {used[pw.pw_uid]}; each needs its own"
        else:
            used[pw.pw_uid] = key
    return problems


# --- secrets ------------------------------------------------------------------------------------


def read_env_file(path: str, owners: frozenset[int] = frozenset({0})) -> dict[str, str]:
    """Parse a ``KEY=VALUE`` secret file that only its owner (root) can read; ConfigError otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{path}: env file missing") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open env file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: env file is not a regular file")
        if st.st_uid not in owners:
            raise ConfigError(
                f"{path}: env file must be owned by root (owner uid {st.st_uid}); "
                "'mcp-brokerctl install' fixes the files it knows"
            )
        if st.st_mode & 0o077:
            raise ConfigError(
                f"{path}: env file is accessible by group or other (mode {stat.S_IMODE(st.st_mode):04o}); "
                "secrets must be 0600"
            )
        data = os.read(fd, MAX_ENV_FILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_ENV_FILE_BYTES:
        raise ConfigError(f"{path}: env file too large")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: env file is not valid UTF-8") from None
    env: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[7:].lstrip()
        key, eq, value = line.partition("=")
        key = key.strip()
        if not eq or not ENV_KEY_RE.fullmatch(key):
            raise ConfigError(f"{path}:{lineno}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if "\0" in value:
            raise ConfigError(f"{path}:{lineno}: a value must not contain a NUL character")
        env[key] = value
    return env


def instance_env_file(paths: Paths, defn: ServerDef, agent: str | None) -> str | None:
    """A per-caller instance's own ``secrets/NAME@AGENT.env``, when it exists."""
    if agent is None:
        return None
    path = f"{paths.secrets}/{instance_name(defn.name, agent)}.env"
    return path if os.path.lexists(path) else None


def substitute(template: str, env: dict[str, str], where: str) -> str:
    """``${VAR}`` filled from ``env`` (a server's env file only); ConfigError for an undefined one."""

    def repl(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in env:
            raise ConfigError(f"{where}: ${{{key}}} is not defined in the server's env_file")
        return env[key]

    return VAR_RE.sub(repl, template)


# --- plain settings in env files -----------------------------------------------------------------
#
# Every env-file value is a secret the broker redacts from whatever agents see. A plain setting put
# there (NODE_ENV=production, a repository path) is blanked out of every result, and a path that is
# also in ``args`` makes ``check`` refuse the definition. These heuristics say when a value looks like
# such a setting, so that ``check`` can warn and ``import`` can put it in ``env = { ... }`` instead.
# They only ever advise: nothing here decides what the broker redacts.

#: below this an env-file value is no credential worth the name, and redacting it mangles results
MIN_SECRET_CHARS = 8
#: values too common to be secrets (compared in lower case): redacting one blanks it out everywhere
COMMON_VALUES = frozenset(
    (
        *("production", "prod", "development", "dev", "staging", "stage", "test", "testing", "local"),
        *("true", "false", "yes", "no", "on", "off", "enabled", "disabled", "enable", "disable"),
        *("none", "null", "nil", "default", "auto", "json", "text", "utf-8", "utf8", "stdio", "http", "https"),
        *("info", "debug", "warn", "warning", "error", "trace", "verbose", "notice", "critical", "fatal"),
        *("silent", "quiet", "localhost", "127.0.0.1", "0.0.0.0", "::1"),  # noqa: S104 - a value compared, not bound
    )
)
#: prefixes of well-known credentials (GitHub, OpenAI/Anthropic, Stripe, Slack, AWS, Google, GitLab, ...)
TOKEN_PREFIXES = (
    "sk-",
    "sk_",
    "pk_",
    "rk_",
    "ghp_",
    "gho_",
    "ghu_",
    "ghs_",
    "ghr_",
    "github_pat_",
    "glpat-",
    "xoxb-",
    "xoxp-",
    "xoxa-",
    "xoxr-",
    "xapp-",
    "AKIA",
    "ASIA",
    "AIza",
    "ya29.",
    "eyJ",
    "shpat_",
    "ntn_",
    "secret_",
    "lin_api_",
    "hf_",
)
_TOKENISH_RE = re.compile(r"[A-Za-z0-9_\-+/=.~]{20,}")
_NUMBER_RE = re.compile(r"[+-]?\d+(?:\.\d+)?")
_HOST_RE = re.compile(
    r"(?:(?:\d{1,3}\.){3}\d{1,3}|[a-z0-9](?:[a-z0-9-]*[a-z0-9])?(?:\.[a-z0-9-]+)*\.[a-z]{2,})(?::\d{1,5})?"
)
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://\S+")
#: query parameter names that carry a credential in a URL
_SECRET_PARAM_RE = re.compile(r"token|key|secret|password|passwd|pwd|auth|sig|signature|credential|session", re.I)


def _entropy(text: str) -> float:
    counts = collections.Counter(text)
    return -sum(c / len(text) * math.log2(c / len(text)) for c in counts.values())


def looks_like_token(value: str) -> bool:
    """Heuristic: a known credential prefix, or a long high-entropy word that is not a path or a name."""
    v = value.strip()
    if len(v) >= 12 and v.startswith(TOKEN_PREFIXES):
        return True
    if not _TOKENISH_RE.fullmatch(v) or v.startswith(("/", "./", "../", "~")):
        return False
    segments = [part for part in re.split(r"[-_./+=~]", v) if part]
    if all(part.isalpha() or part.isdigit() for part in segments):
        return False  # words and numbers joined: package names, hosts, dates, versions
    digits = sum(c.isdigit() for c in v)
    letters = sum(c.isalpha() for c in v)
    return digits >= 2 and letters >= 2 and _entropy(v) >= 3.5


def url_has_credentials(url: str) -> bool:
    """Whether a URL carries a credential: a password, a token-like user, a key-like query parameter or part."""
    try:
        parts = urllib.parse.urlsplit(url)
        user, password = parts.username, parts.password
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return True  # it does not parse: no promise that it holds nothing
    if password or (user and looks_like_token(user)):
        return True  # a user alone (postgres://app@db/x) is a name; a token as the user (https://TOKEN@host) is not
    if any(v and (_SECRET_PARAM_RE.search(k) or looks_like_token(v)) for k, v in query):
        return True
    return any(looks_like_token(seg) for seg in (*parts.path.split("/"), parts.fragment) if seg)


def _looks_like_path(value: str) -> bool:
    if not value.startswith(("/", "~/", "{home}/")) or "\n" in value or value.startswith("//"):
        return False
    return not any(looks_like_token(seg) for seg in value.split("/"))  # base64 may start with a slash


def plain_setting(value: str) -> str | None:
    """Why an env-file value looks like a plain setting rather than a secret; None when it may be one.

    One of "shorter than 8 characters", "a common word", "a number", "an
    absolute path", "a URL without credentials", "a host name or address".
    An empty value is None: nothing is redacted for it. Used by ``check``
    (a warning, never an error) and ``import`` (where the value goes).
    """
    v = value.strip()
    if not v:
        return None
    if v.lower() in COMMON_VALUES:
        return "a common word"
    if _NUMBER_RE.fullmatch(v):
        return "a number"
    if _looks_like_path(v):
        return "an absolute path"
    if len(v) < MIN_SECRET_CHARS:
        return f"shorter than {MIN_SECRET_CHARS} characters"
    if _URL_RE.fullmatch(v) and not url_has_credentials(v):
        return "a URL without credentials"
    if _HOST_RE.fullmatch(v) and not any(looks_like_token(label) for label in v.split(".")):
        return "a host name or address"
    return None


@dataclass(frozen=True)
class Secrets:
    """What the env files of a server hold, as the daemon may learn it (from the spawner)."""

    #: every value to redact from results and errors, by name (``NAME.KEY``)
    redact: dict[str, str]
    #: an HTTP server's url and headers with ``${VAR}`` filled in
    url: str | None
    headers: dict[str, str]
    #: changes when an env file's content changes (a reload restarts the server)
    fingerprint: str


#: what a value in args most likely is when it is no secret at all (a short one may well be a secret)
_PLAIN_IN_ARGS = (
    "a common word",
    "a number",
    "an absolute path",
    "a URL without credentials",
    "a host name or address",
)


def _plain_hint(key: str, value: str) -> str:
    """For a value that is in ``args`` too: the way out when it is a plain setting, not a secret."""
    why = plain_setting(value)
    if why not in _PLAIN_IN_ARGS:
        return ""
    fix = f'move it from the env file to env = {{ {key} = "..." }}, which is not redacted'
    return f" (the value of {key} is {why}: if it is a plain setting, {fix})"


def resolve(defn: ServerDef, paths: Paths, agents: list[str], owners: frozenset[int] = frozenset({0})) -> Secrets:
    """Read a server's env files (root only) and work out what the daemon needs; ConfigError otherwise."""
    where = f"{defn.source}: servers.{defn.name}"
    envs: dict[str | None, dict[str, str]] = {}
    try:
        base = read_env_file(defn.env_file, owners) if defn.env_file else {}
        envs[None] = base
        if defn.per_caller:
            for name in agents:
                own = instance_env_file(paths, defn, name)
                envs[name] = base | (read_env_file(own, owners) if own else {})
    except ConfigError as exc:
        raise ConfigError(f"{exc.message} (env_file of servers.{defn.name} in {defn.source})") from None
    for env in envs.values():
        both = sorted(set(env) & set(defn.env))
        if both:
            raise ConfigError(f"{where}.env: {both[0]} is set both here and in its env file; keep it in one place")
        for key, value in env.items():
            if len(value) >= 4 and any(value in arg for arg in [*defn.args, defn.command or ""]):
                raise ConfigError(
                    f"{where}.args: holds a secret from its env file; command lines are world-readable"
                    + _plain_hint(key, value)
                )
    url = substitute(defn.url, base, f"{where}.url") if defn.url is not None else None
    headers = {k: substitute(v, base, f"{where}.headers.{k}") for k, v in defn.headers.items()}
    redact: dict[str, str] = {}
    for agent, env in envs.items():
        prefix = instance_name(defn.name, agent)
        redact.update({f"{prefix}.{k}": v for k, v in env.items() if v})
    for key, value in headers.items():
        if value and value not in redact.values():
            redact[f"{defn.name}.header.{key}"] = value
    digest = hashlib.sha256(json.dumps(sorted((str(a), sorted(e.items())) for a, e in envs.items())).encode())
    return Secrets(redact=redact, url=url, headers=headers, fingerprint=digest.hexdigest())
