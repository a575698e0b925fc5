"""``broker.toml`` and ``servers.d/*.toml``: the daemon's configuration.

``[broker]`` and ``[policy.*]`` are validated here with pydantic; server
definitions by :mod:`broker.core.servers`, the parser the spawner and
``check`` use too. Every problem is reported with its file and key path.
The daemon never reads a secret env file (they are root's, 0600): what it
must know of one (values to redact, an HTTP server's filled-in url and
headers) the spawner reads and sends it, into :attr:`Server.secrets`.

Policy applies on the next call, like the allowlist: the daemon keys the
files by their stat identities (:class:`OnDisk`), reads them again when a
key changes, and takes from them what needs no process started
(:func:`with_policy`: ``[policy.*]``, ``[limits.*]``, ``[broker]`` but for
:data:`PROCESS_SETTINGS`, a server's ``pin``). Server definitions, the
``[sandbox]`` table and the process settings wait for a reload; what
differs on disk meanwhile is :func:`differences` (``status`` shows it).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from broker.core import servers as core_servers
from broker.core import tomlpos
from broker.core.errors import ConfigError
from broker.core.names import action_error
from broker.core.paths import Paths
from broker.core.servers import Secrets, ServerDef
from broker.daemon.limits import Quota
from broker.daemon.policy import ActionPolicy


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
    pin: Literal["review", "first-use"] = Field(
        "review",
        description="an allowlisted tool nobody reviewed: review (blocked until 'mcp-brokerctl pins accept', "
        "or pinned by 'mcp-brokerctl allow') or first-use (its first call pins it); [servers.NAME] pin overrides",
    )
    # --- per-caller quotas (each may be set again per caller in [limits.NAME]) ---
    max_sessions: int = Field(
        16, ge=1, le=10_000, description="gate processes (mcp stdio sessions, mcp calls) a caller may have connected"
    )
    max_connections: int = Field(128, ge=1, le=100_000, description="connections to gate.sock a caller may hold")
    max_calls_in_flight: int = Field(
        16, ge=1, le=10_000, description="calls a caller may have running (until their answers are read)"
    )
    max_pending_approvals: int = Field(8, ge=1, le=10_000, description="approval requests a caller may have pending")
    audit_bytes_per_window: int = Field(
        64 * 1024 * 1024, ge=0, description="audit bytes a caller may cause per window before it is throttled (0: off)"
    )
    audit_window: float = Field(3600.0, gt=0, le=7 * 86400, description="the window of audit_bytes_per_window")
    write_timeout: float = Field(
        10.0, gt=0, le=600, description="seconds a gate may leave an answer unread before it is dropped"
    )
    cancel_grace: float = Field(
        30.0, gt=0, le=3600, description="seconds a server may ignore a cancel (when idle) before it is restarted"
    )
    audit_max_bytes: int = Field(
        64 * 1024 * 1024, ge=0, description="rotate audit.jsonl before it grows beyond this many bytes (0: never)"
    )
    audit_keep: int = Field(
        10, ge=0, le=999, description="rotated audit files kept at least (audit.jsonl.1 ... .N; see audit_keep_days)"
    )
    audit_syslog: bool | Literal["auto"] = Field(
        "auto",
        description="mirror every audit record to syslog (RFC 5424): auto (when the socket exists at start or "
        "reload), true (required: a missing socket is reported in status) or false",
    )
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
    audit_keep_days: float = Field(
        30.0,
        ge=0,
        le=36500,
        description="a rotated audit file holding a record younger than this many days is never deleted, "
        "even beyond audit_keep (0: audit_keep alone decides)",
    )
    servers_log_max_bytes: int = Field(
        8 * 1024 * 1024,
        ge=0,
        description="rotate servers.log (and mcp-brokerd.log) before it grows beyond this many bytes (0: never)",
    )
    servers_log_keep: int = Field(3, ge=0, le=99, description="rotated servers.log files kept (servers.log.1 ... .N)")

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


class CallerLimits(BaseModel):
    """One ``[limits.CALLER]`` table: that caller's quotas instead of the ``[broker]`` defaults."""

    model_config = ConfigDict(extra="forbid")

    max_sessions: int | None = Field(None, ge=1, le=10_000)
    max_connections: int | None = Field(None, ge=1, le=100_000)
    max_calls_in_flight: int | None = Field(None, ge=1, le=10_000)
    max_pending_approvals: int | None = Field(None, ge=1, le=10_000)
    audit_bytes_per_window: int | None = Field(None, ge=0)
    audit_window: float | None = Field(None, gt=0, le=7 * 86400)


class FileModel(BaseModel):
    """One TOML file: ``broker.toml`` may hold ``[broker]``; both may hold servers."""

    model_config = ConfigDict(extra="forbid")

    broker: BrokerSettings | None = None
    #: validated by broker.core.servers (one parser for the daemon, the spawner and check)
    servers: dict[str, Any] = Field(default_factory=dict)
    #: host settings of the sandbox, the spawner's (broker.core.servers.host_settings)
    sandbox: dict[str, Any] | None = None
    policy: dict[str, ActionPolicy] = Field(default_factory=dict)
    limits: dict[str, CallerLimits] = Field(default_factory=dict)

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
    """A validated server definition and what the spawner told of its secrets (never logged)."""

    name: str
    source: str
    spec: ServerDef
    #: from the spawner: values to redact, the HTTP url and headers filled in, the env files' fingerprint
    secrets: Secrets | None = None
    #: why the spawner cannot serve it (its env file, its user), if it cannot
    problem: str | None = None
    #: the host's ``[sandbox] disable``: a stdio server started under other protections must be started again
    host: frozenset[str] = frozenset()

    @property
    def url(self) -> str | None:
        return self.secrets.url if self.secrets is not None else None

    @property
    def headers(self) -> dict[str, str]:
        return self.secrets.headers if self.secrets is not None else {}

    def secret_values(self) -> dict[str, str]:
        """Every secret value the broker knows of this server, by name."""
        return dict(self.secrets.redact) if self.secrets is not None else {}

    def fingerprint(self) -> tuple[Any, ...]:
        """Equal fingerprints mean a reload can keep the running session."""
        host = tuple(sorted(self.host)) if self.spec.transport == "stdio" else ()
        return (self.spec.fingerprint(), self.secrets.fingerprint if self.secrets else None, self.problem, host)


@dataclass
class Config:
    """The whole daemon configuration."""

    settings: BrokerSettings
    servers: dict[str, Server]
    files: list[str]
    policy: dict[str, ActionPolicy] = field(default_factory=dict)
    #: ``[limits.CALLER]``: a caller's quotas instead of the defaults
    limits: dict[str, CallerLimits] = field(default_factory=dict)
    _quotas: dict[str, Quota] = field(default_factory=dict, repr=False, compare=False)

    def quota(self, caller: str) -> Quota:
        """``caller``'s quotas: ``[broker]``'s, with its ``[limits.CALLER]`` over them (made once per config)."""
        found = self._quotas.get(caller)
        if found is None:
            found = self._quotas[caller] = Quota.of(self.settings, self.limits.get(caller))
        return found

    def secrets(self) -> dict[str, str]:
        """Every secret value of every server, by name (for redaction)."""
        found: dict[str, str] = {}
        for server in self.servers.values():
            found.update(server.secret_values())
        return found


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc if p != "function-after")


def load(paths: Paths) -> Config:
    """Load ``broker.toml`` and ``servers.d/*.toml``; report every problem (secrets are the spawner's)."""
    problems: list[str] = []
    files = core_servers.config_files(paths)
    settings: BrokerSettings | None = None
    host: frozenset[str] = frozenset()
    documents: list[tuple[str, dict[str, Any]]] = []
    policy: dict[str, tuple[str, ActionPolicy]] = {}
    limits: dict[str, CallerLimits] = {}
    for path in files:
        try:
            raw = core_servers.read_toml(path)
        except ConfigError as exc:
            problems.append(exc.message)
            continue
        documents.append((path, raw))  # its servers are checked even when the rest of the file is not valid
        try:
            model = FileModel.model_validate(raw)
        except ValidationError as exc:
            for e in exc.errors():
                if e["loc"][:1] != ("servers",):  # the servers' own problems are the core parser's to report
                    problems.append(f"{path}: {_loc(e['loc'])}: {e['msg']}")
            continue
        if model.limits:
            if path != paths.broker_toml:
                problems.append(f"{path}: [limits] belongs in {paths.broker_toml}")
            else:
                limits = model.limits
        if model.broker is not None:
            if path != paths.broker_toml:
                problems.append(f"{path}: [broker] belongs in {paths.broker_toml}")
            settings = model.broker
        if model.sandbox is not None:
            if path != paths.broker_toml:
                problems.append(f"{path}: [sandbox] belongs in {paths.broker_toml}")
            else:
                try:
                    host = core_servers.host_settings(model.sandbox, path)
                except ConfigError as exc:
                    problems.extend(exc.problems)
        for action, rules in model.policy.items():
            if action in policy:
                problems.append(f"{path}: policy.{action}: already defined in {policy[action][0]}")
                continue
            policy[action] = (path, rules)
    defs, more = core_servers.collect(documents)
    problems.extend(more)
    if problems:
        extra = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + extra, problems)
    return Config(
        settings=settings or BrokerSettings(),
        servers={name: Server(name, d.source, d, host=host) for name, d in defs.items()},
        files=files,
        policy={a: rules for a, (_p, rules) in policy.items()},
        limits=limits,
    )


# --- the files on disk, for policy that applies on the next call --------------------------------

#: ``[broker]`` settings that running parts hold (server sessions, the audit log's files and syslog mirror, the
#: logs' rotation): they apply on reload, like server definitions. Every other ``[broker]`` setting, and
#: ``[policy.*]``, ``[limits.*]`` and a server's ``pin``, is policy: read again when the files change.
PROCESS_SETTINGS = frozenset(
    {
        "connect_timeout",
        "max_server_message_bytes",
        "max_listed_tools",
        "restart_backoff_max",
        "cancel_grace",
        "audit_max_bytes",
        "audit_keep",
        "audit_keep_days",
        "audit_syslog",
        "audit_syslog_socket",
        "audit_syslog_facility",
        "servers_log_max_bytes",
        "servers_log_keep",
    }
)


def _identity(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):
        return None
    # ctime too: an editor or 'cp -p' may put the old mtime back, never the old ctime
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class OnDisk:
    """The identities (stat) of ``broker.toml``, ``servers.d`` and its files: equal keys, same files.

    A few stats per call and nothing else: ``servers.d`` is listed again only
    when the directory itself changed (a file added, removed or renamed over).
    """

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._dir: tuple[int, ...] | None = None
        self._listed = False
        #: the config files, as last listed
        self.files: list[str] = [paths.broker_toml]

    def key(self) -> tuple[object, ...]:
        """The identities of every config file now; ConfigError when ``servers.d`` cannot be listed."""
        directory = _identity(self.paths.servers_d)
        if not self._listed or directory != self._dir:
            self._listed = False  # a listing that fails is tried again on the next call
            self.files = core_servers.config_files(self.paths)
            self._dir, self._listed = directory, True
        return (directory, *((f, _identity(f)) for f in self.files))


def with_policy(running: Config, fresh: Config) -> Config:
    """The running config with ``fresh``'s policy: what needs no process started or reopened."""
    kept = {k: getattr(running.settings, k) for k in PROCESS_SETTINGS}
    for name, server in running.servers.items():
        new = fresh.servers.get(name)
        if new is not None and new.spec.pin != server.spec.pin and new.spec.fingerprint() == server.spec.fingerprint():
            # pin is the daemon's decision, not part of what runs (the fingerprint leaves it out); handles share
            # this Server, so every instance sees it
            server.spec = dataclasses.replace(server.spec, pin=new.spec.pin)
    return Config(
        settings=fresh.settings.model_copy(update=kept),
        servers=running.servers,
        files=fresh.files,
        policy=fresh.policy,
        limits=fresh.limits,
    )


def differences(running: Config, fresh: Config, broker_toml: str) -> list[dict[str, str]]:
    """What on disk differs from what runs and needs a reload: ``{"file": ..., "what": ...}`` each."""
    out: list[dict[str, str]] = []
    for name, server in fresh.servers.items():
        now = running.servers.get(name)
        if now is None:
            out.append({"file": server.source, "what": f"servers.{name} added"})
        elif now.spec.fingerprint() != server.spec.fingerprint():
            out.append({"file": server.source, "what": f"servers.{name} changed"})
    out.extend(
        {"file": server.source, "what": f"servers.{name} removed"}
        for name, server in running.servers.items()
        if name not in fresh.servers
    )
    if any(s.host != running.servers[n].host for n, s in fresh.servers.items() if n in running.servers):
        out.append({"file": broker_toml, "what": "[sandbox] changed"})
    changed = sorted(k for k in PROCESS_SETTINGS if getattr(running.settings, k) != getattr(fresh.settings, k))
    if changed:
        out.append({"file": broker_toml, "what": f"[broker] {', '.join(changed)} changed"})
    return out


def located(exc: ConfigError, files: list[str]) -> ConfigError:
    """``exc`` with each problem at its ``file:line:col`` where the files on disk say it is."""
    cache: dict[str, bytes | None] = {}

    def read(path: str) -> bytes | None:
        if path not in cache:
            try:
                with open(path, "rb") as fh:
                    cache[path] = fh.read(core_servers.MAX_CONFIG_BYTES + 1)
            except OSError:
                cache[path] = None
        return cache[path]

    problems = [tomlpos.locate(p, files, read) for p in exc.problems]
    extra = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return ConfigError(problems[0] + extra, problems)
