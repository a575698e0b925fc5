"""``broker.toml`` and ``servers.d/*.toml``: the daemon's configuration.

Validated with pydantic; every problem is reported with its file and key
path. Secret env files (``KEY=VALUE`` lines) must be private to the broker;
``${VAR}`` in a server's ``url`` and ``headers`` is filled from that
server's own env file only, never in ``args`` (a command line is readable
by every user through /proc).
"""

from __future__ import annotations

import os
import pwd
import re
import stat
import tomllib
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker.core.errors import ConfigError
from broker.core.names import action_error
from broker.core.paths import BROKER_USER, Paths
from broker.daemon.policy import ActionPolicy

NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
ENV_KEY_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_ENV_FILE_BYTES = 1024 * 1024


class BrokerSettings(BaseModel):
    """The ``[broker]`` table."""

    model_config = ConfigDict(extra="forbid")

    call_timeout: float = Field(30.0, gt=0, le=3600, description="default seconds a call may take")
    max_call_timeout: float = Field(300.0, gt=0, le=3600, description="cap on a caller's --timeout")
    max_output_bytes: int = Field(1_048_576, ge=1024, description="result text beyond this is truncated")
    connect_timeout: float = Field(20.0, gt=0, le=600, description="seconds to start and initialise a server")
    max_server_message_bytes: int = Field(
        16 * 1024 * 1024, ge=65536, description="a stdio server's message beyond this is dropped while read"
    )
    max_listed_tools: int = Field(2000, ge=1, le=100_000, description="a server offering more tools is refused")
    restart_backoff_max: float = Field(30.0, gt=0, le=3600)
    approval_ttl: float = Field(900.0, gt=0, le=7 * 86400, description="seconds an approval request stays valid")
    notify_command: list[str] | None = Field(None, description="hook run (as mcp-broker) for mode = notify")
    denial_budget: int = Field(10, ge=0, description="denials allowed per window before a freeze (0: off)")
    denial_window: float = Field(600.0, gt=0)
    freeze_seconds: float = Field(900.0, gt=0)
    log_argument_values: bool = Field(False, description="audit argument values (redacted) too")
    audit_max_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="rotate audit.jsonl before it grows beyond this many bytes (0: never)"
    )
    audit_keep: int = Field(10, ge=0, le=999, description="rotated audit files kept (audit.jsonl.1 ... .N)")
    audit_syslog: bool = Field(False, description="mirror every audit record to syslog (RFC 5424)")
    audit_syslog_socket: str = Field("/dev/log", description="the local syslog datagram socket")
    audit_syslog_facility: Literal[
        "auth",
        "authpriv",
        "daemon",
        "user",
        "local0",
        "local1",
        "local2",
        "local3",
        "local4",
        "local5",
        "local6",
        "local7",
    ] = Field("authpriv", description="syslog facility of the audit mirror")

    @field_validator("notify_command")
    @classmethod
    def _hook_absolute(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and (not value or not value[0].startswith("/")):
            raise ValueError("notify_command must start with an absolute path")
        return value

    @field_validator("audit_syslog_socket")
    @classmethod
    def _socket_absolute(cls, value: str) -> str:
        if not value.startswith("/"):
            raise ValueError("audit_syslog_socket must be an absolute path")
        return value

    @model_validator(mode="after")
    def _timeouts(self) -> BrokerSettings:
        if self.call_timeout > self.max_call_timeout:
            raise ValueError("call_timeout exceeds max_call_timeout")
        return self


class ServerSpec(BaseModel):
    """One ``[servers.NAME]`` table: a stdio command or a streamable-HTTP url."""

    model_config = ConfigDict(extra="forbid")

    command: str | None = None
    args: list[str] = Field(default_factory=list)
    cwd: str | None = None
    url: str | None = None
    headers: dict[str, str] = Field(default_factory=dict)
    env_file: str | None = None
    #: plain settings for a stdio server's environment (not secrets: never redacted; secrets go in env_file)
    env: dict[str, str] = Field(default_factory=dict)
    timeout: float | None = Field(None, gt=0, le=3600)

    @field_validator("command", "cwd", "env_file")
    @classmethod
    def _absolute(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("/"):
            raise ValueError("must be an absolute path")
        return value

    @field_validator("url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _one_transport(self) -> ServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("set exactly one of 'command' (stdio) or 'url' (streamable HTTP)")
        if self.url is not None and (self.args or self.cwd):
            raise ValueError("'args' and 'cwd' apply to stdio servers only")
        if self.command is not None and self.headers:
            raise ValueError("'headers' apply to HTTP servers only")
        if self.url is not None and self.env:
            raise ValueError("'env' applies to stdio servers only")
        for key in self.env:
            if not ENV_KEY_RE.fullmatch(key):
                raise ValueError(f"env: {key!r} is not a variable name")
        for arg in self.args:
            if VAR_RE.search(arg):
                raise ValueError("'args' cannot take ${VAR}: command lines are readable by every user")
        return self


class FileModel(BaseModel):
    """One TOML file: ``broker.toml`` may hold ``[broker]``; both may hold servers."""

    model_config = ConfigDict(extra="forbid")

    broker: BrokerSettings | None = None
    servers: dict[str, ServerSpec] = Field(default_factory=dict)
    policy: dict[str, ActionPolicy] = Field(default_factory=dict)

    @field_validator("policy")
    @classmethod
    def _actions(cls, value: dict[str, ActionPolicy]) -> dict[str, ActionPolicy]:
        for action in value:
            problem = action_error(action)
            if problem is not None:
                raise ValueError(f"{action!r}: {problem}")
        return value


@dataclass
class Server:
    """A validated server with its secrets resolved (never logged)."""

    name: str
    source: str
    spec: ServerSpec
    env: dict[str, str] = field(default_factory=dict)
    url: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def secrets(self) -> dict[str, str]:
        """Every secret value the broker injects into this server, by name."""
        found = {f"{self.name}.{k}": v for k, v in self.env.items() if v}
        for key, value in self.headers.items():
            if value and value not in found.values():
                found[f"{self.name}.header.{key}"] = value
        return found

    def fingerprint(self) -> tuple[Any, ...]:
        """Equal fingerprints mean a reload can keep the running session."""
        return (
            self.spec.model_dump_json(),
            tuple(sorted(self.env.items())),
            self.url,
            tuple(sorted(self.headers.items())),
        )


@dataclass
class Config:
    """The whole daemon configuration."""

    settings: BrokerSettings
    servers: dict[str, Server]
    files: list[str]
    policy: dict[str, ActionPolicy] = field(default_factory=dict)

    def secrets(self) -> dict[str, str]:
        """Every secret value of every server, by name (for redaction)."""
        found: dict[str, str] = {}
        for server in self.servers.values():
            found.update(server.secrets())
        return found


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if p != "function-after")


def _read_toml(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: missing") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid UTF-8") from None


def read_env_file(path: str, check_owner: bool = True) -> dict[str, str]:
    """Parse a ``KEY=VALUE`` secret file, refusing one other users could read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{path}: env file missing") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open env file: {exc.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise ConfigError(f"{path}: env file is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if check_owner and st.st_uid not in _secret_owners():
            raise ConfigError(f"{path}: env file must be owned by {BROKER_USER} or root (owner uid {st.st_uid})")
        if check_owner and st.st_mode & 0o077:
            raise ConfigError(
                f"{path}: env file is accessible by group or other (mode {stat.S_IMODE(st.st_mode):04o}); "
                "secrets must be 0600"
            )
        data = fh.read(MAX_ENV_FILE_BYTES + 1)
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
        env[key] = value
    return env


def _secret_owners() -> set[int]:
    try:
        return {0, pwd.getpwnam(BROKER_USER).pw_uid}
    except KeyError:
        return {0}


def _substitute(template: str, env: dict[str, str], where: str) -> str:
    def repl(match: re.Match[str]) -> str:
        key = match.group(1)
        if key not in env:
            raise ConfigError(f"{where}: ${{{key}}} is not defined in the server's env_file")
        return env[key]

    return VAR_RE.sub(repl, template)


def _server(name: str, source: str, spec: ServerSpec, check_owner: bool) -> Server:
    where = f"{source}: servers.{name}"
    try:
        env = read_env_file(spec.env_file, check_owner) if spec.env_file else {}
    except ConfigError as exc:
        raise ConfigError(f"{exc.message} (env_file of servers.{name} in {source})") from None
    both = sorted(set(env) & set(spec.env))
    if both:
        raise ConfigError(f"{where}.env: {both[0]} is set both here and in env_file; keep it in one place")
    server = Server(name=name, source=source, spec=spec, env=env)
    if spec.url is not None:
        server.url = _substitute(spec.url, env, f"{where}.url")
        server.headers = {k: _substitute(v, env, f"{where}.headers.{k}") for k, v in spec.headers.items()}
    for value in env.values():
        if len(value) >= 4 and any(value in arg for arg in [*spec.args, spec.command or ""]):
            raise ConfigError(f"{where}.args: holds a secret from its env_file; command lines are world-readable")
    return server


def load(paths: Paths, check_owner: bool = True) -> Config:
    """Load ``broker.toml`` and ``servers.d/*.toml``; report every problem."""
    problems: list[str] = []
    files = [paths.broker_toml]
    try:
        extra = sorted(n for n in os.listdir(paths.servers_d) if n.endswith(".toml") and not n.startswith("."))
    except FileNotFoundError:
        extra = []
    except OSError as exc:
        raise ConfigError(f"{paths.servers_d}: {exc.strerror}") from None
    files += [f"{paths.servers_d}/{n}" for n in extra]
    settings: BrokerSettings | None = None
    servers: dict[str, Server] = {}
    defined_in: dict[str, str] = {}
    policy: dict[str, tuple[str, ActionPolicy]] = {}
    for path in files:
        try:
            raw = _read_toml(path)
            model = FileModel.model_validate(raw)
        except ConfigError as exc:
            problems.append(exc.message)
            continue
        except ValidationError as exc:
            for e in exc.errors():
                problems.append(f"{path}: {_loc(e['loc'])}: {e['msg']}")
            continue
        if model.broker is not None:
            if path != paths.broker_toml:
                problems.append(f"{path}: [broker] belongs in {paths.broker_toml}")
            settings = model.broker
        for action, rules in model.policy.items():
            if action in policy:
                problems.append(f"{path}: policy.{action}: already defined in {policy[action][0]}")
                continue
            policy[action] = (path, rules)
        for name, spec in model.servers.items():
            if not NAME_RE.fullmatch(name):
                problems.append(f"{path}: servers.{name}: server names are [A-Za-z0-9_-]+")
                continue
            if name in defined_in:
                problems.append(f"{path}: servers.{name}: already defined in {defined_in[name]}")
                continue
            defined_in[name] = path
            try:
                servers[name] = _server(name, path, spec, check_owner)
            except ConfigError as exc:
                problems.append(exc.message)
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more, problems)
    return Config(
        settings=settings or BrokerSettings(),
        servers=servers,
        files=files,
        policy={a: rules for a, (_p, rules) in policy.items()},
    )
