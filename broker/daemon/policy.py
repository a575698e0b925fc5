"""Policy beyond the allowlist: argument rules, modes, rates, caps, timeouts.

Configured per action in ``broker.toml`` as ``[policy."server.tool"]``, and
optionally per calling user in ``[policy."server.tool".callers.USER]``,
whose keys override the action's (argument rules override per argument).

    [policy."mail.send"]
    mode = "approve"                 # allow (green) | notify (yellow) | approve (red)
    rate = "20/hour"                 # N/second|minute|hour|day, sliding window, survives restarts
    timeout = 20                     # seconds
    max_output_bytes = 65536
    required = ["to"]
    forbidden = ["bcc"]
    [policy."mail.send".args.to]
    pattern = "[^@]+@example\\.org"  # full match
    max_length = 200
    [policy."files.read".args.path]
    path = "/srv/nas/**"             # glob, checked after resolving .. and symlinks

A rule violation raises :class:`ArgumentsRejected` (exit 65) naming the
argument and the rule; the tool is never called.
"""

from __future__ import annotations

import os
import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from broker.core.errors import ArgumentsRejected

RATE_UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
RATE_RE = re.compile(r"\s*(\d+)\s*/\s*(second|minute|hour|day)s?\s*")


def parse_rate(text: str) -> tuple[int, float]:
    """``"20/hour"`` -> (20, 3600.0)."""
    m = RATE_RE.fullmatch(text)
    if not m or int(m.group(1)) < 1:
        raise ValueError("rate must look like '20/hour' (units: second, minute, hour, day)")
    return int(m.group(1)), RATE_UNITS[m.group(2)]


class ArgRule(BaseModel):
    """Constraints on one argument."""

    model_config = ConfigDict(extra="forbid")

    enum: list[Any] | None = None
    pattern: str | None = None
    max_length: int | None = Field(None, ge=0)
    min: float | None = None
    max: float | None = None
    path: str | None = None

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"pattern does not compile: {exc}") from None
        return value

    @field_validator("path")
    @classmethod
    def _absolute_glob(cls, value: str | None) -> str | None:
        if value is not None:
            if not value.startswith("/"):
                raise ValueError("path glob must be absolute")
            if "\0" in value or "/../" in value + "/" or "/./" in value + "/":
                raise ValueError("path glob must be normalised (no '.', '..' or NUL)")
        return value

    def check(self, key: str, value: Any) -> None:
        """Raise ArgumentsRejected when ``value`` breaks this rule."""
        if self.enum is not None and value not in self.enum:
            raise ArgumentsRejected(f"argument {key!r} breaks rule 'enum': not one of the allowed values")
        if self.pattern is not None and (not isinstance(value, str) or re.fullmatch(self.pattern, value) is None):
            raise ArgumentsRejected(f"argument {key!r} breaks rule 'pattern': does not match {self.pattern!r}")
        if self.max_length is not None:
            length = len(value) if isinstance(value, (str, list, dict)) else len(str(value))
            if length > self.max_length:
                raise ArgumentsRejected(f"argument {key!r} breaks rule 'max_length': longer than {self.max_length}")
        if self.min is not None or self.max is not None:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ArgumentsRejected(f"argument {key!r} breaks rule 'range': not a number")
            if self.min is not None and value < self.min:
                raise ArgumentsRejected(f"argument {key!r} breaks rule 'min': below {self.min:g}")
            if self.max is not None and value > self.max:
                raise ArgumentsRejected(f"argument {key!r} breaks rule 'max': above {self.max:g}")
        if self.path is not None and (not isinstance(value, str) or not path_allowed(value, self.path)):
            raise ArgumentsRejected(f"argument {key!r} breaks rule 'path': outside {self.path}")


Mode = Literal["allow", "notify", "approve"]


class RuleSet(BaseModel):
    """What may be set for an action, or for one caller of it."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode | None = None
    rate: str | None = None
    timeout: float | None = Field(None, gt=0, le=3600)
    max_output_bytes: int | None = Field(None, ge=64)
    required: list[str] | None = None
    forbidden: list[str] | None = None
    args: dict[str, ArgRule] = Field(default_factory=dict)

    @field_validator("rate")
    @classmethod
    def _rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value


class ActionPolicy(RuleSet):
    """``[policy."server.tool"]``: rules plus per-caller overrides."""

    callers: dict[str, RuleSet] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _caller_names(self) -> ActionPolicy:
        for name in self.callers:
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.$-]*", name):
                raise ValueError(f"callers.{name}: not a user name")
        return self


class Effective:
    """The merged rules for one (action, caller)."""

    def __init__(self, action: str, caller: str, base: RuleSet | None, override: RuleSet | None) -> None:
        self.action = action
        self.caller = caller
        self.source = "default"
        merged: dict[str, Any] = {}
        args: dict[str, ArgRule] = {}
        for layer, label in ((base, f'policy."{action}"'), (override, f'policy."{action}".callers.{caller}')):
            if layer is None:
                continue
            self.source = label
            merged.update({k: v for k, v in layer.model_dump(exclude={"args"}).items() if v is not None})
            args.update(layer.args)
        self.mode: str = merged.get("mode", "allow")
        self.rate: tuple[int, float] | None = parse_rate(merged["rate"]) if "rate" in merged else None
        self.rate_text: str | None = merged.get("rate")
        self.timeout: float | None = merged.get("timeout")
        self.max_output_bytes: int | None = merged.get("max_output_bytes")
        self.required: list[str] = merged.get("required") or []
        self.forbidden: list[str] = merged.get("forbidden") or []
        self.args = args

    def check_args(self, args: dict[str, Any]) -> None:
        for key in self.required:
            if key not in args:
                raise ArgumentsRejected(f"argument {key!r} breaks rule 'required' of {self.source}")
        for key in self.forbidden:
            if key in args:
                raise ArgumentsRejected(f"argument {key!r} breaks rule 'forbidden' of {self.source}")
        for key, rule in self.args.items():
            if key in args:
                rule.check(key, args[key])

    def rate_key(self) -> str:
        return f"{self.action}\0{self.caller}"

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "mode": self.mode,
            "rate": self.rate_text,
            "timeout": self.timeout,
            "max_output_bytes": self.max_output_bytes,
            "required": self.required,
            "forbidden": self.forbidden,
            "args": {k: v.model_dump(exclude_none=True) for k, v in self.args.items()},
        }


def effective(policies: dict[str, ActionPolicy], action: str, caller: str) -> Effective:
    base = policies.get(action)
    override = base.callers.get(caller) if base is not None else None
    return Effective(action, caller, base, override)


# --- path confinement -----------------------------------------------------------


def glob_regex(glob: str) -> re.Pattern[str]:
    """``*`` and ``?`` stay inside one path segment; ``**`` spans segments."""
    out = []
    i = 0
    while i < len(glob):
        ch = glob[i]
        if glob.startswith("/**", i) and (i + 3 == len(glob) or glob[i + 3] == "/"):
            out.append("(?:/[^/]+)*")  # zero or more whole segments
            i += 3
        elif ch == "*":
            out.append("[^/]*")
            i += 1
        elif ch == "?":
            out.append("[^/]")
            i += 1
        else:
            out.append(re.escape(ch))
            i += 1
    return re.compile("".join(out))


def _literal_prefix(glob: str) -> str:
    """The directory part of a glob before its first wildcard."""
    cut = min((glob.find(c) for c in "*?" if c in glob), default=len(glob))
    head = glob[:cut]
    return head if cut == len(glob) else head.rsplit("/", 1)[0] or "/"


def path_allowed(value: str, glob: str) -> bool:
    """Whether ``value`` resolves (``..`` and symlinks, on this host) inside ``glob``.

    Both sides are resolved with realpath, so a symlinked share root still
    matches and a symlink inside it that points out does not.
    """
    if not value.startswith("/") or "\0" in value:
        return False
    try:
        resolved = os.path.realpath(value, strict=False)
    except (OSError, ValueError):
        return False
    prefix = _literal_prefix(glob)
    real_prefix = os.path.realpath(prefix)
    real_glob = real_prefix.rstrip("/") + glob[len(prefix.rstrip("/")) :] if prefix != "/" else glob
    return glob_regex(real_glob).fullmatch(resolved) is not None
