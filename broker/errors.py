"""The one exception root and the sysexits exit codes of the contract.

Library code raises :class:`PrivsepError` subclasses; only the command-line
edges (gate, daemon, admin CLI) turn them into a message and an exit code.
"""

from __future__ import annotations

EX_OK = 0
EX_TOOL_ERROR = 1
EX_USAGE = 64
EX_DATAERR = 65  # arguments rejected (schema or policy constraint)
EX_UNAVAILABLE = 69  # broker or server unavailable
EX_SOFTWARE = 70  # a bug in mcp-privsep itself
EX_TEMPFAIL = 75  # timeout, rate limit, approval pending or expired
EX_NOPERM = 77  # denied
EX_CONFIG = 78  # configuration error

#: Every exit code an agent can see; anything else is a bug.
CONTRACT_EXIT_CODES = frozenset(
    {EX_OK, EX_TOOL_ERROR, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG}
)


class PrivsepError(Exception):
    """Root of every error mcp-privsep reports; carries its exit code."""

    exit_code = EX_SOFTWARE

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code

    def __str__(self) -> str:
        return self.message


class UsageError(PrivsepError):
    """Bad command line or request shape."""

    exit_code = EX_USAGE


class ArgumentsRejected(PrivsepError):
    """Arguments that do not fit the tool's schema or a policy constraint."""

    exit_code = EX_DATAERR


class Unavailable(PrivsepError):
    """The broker, or the server behind a tool, cannot be reached."""

    exit_code = EX_UNAVAILABLE


class TempFail(PrivsepError):
    """Try again later: timeout, rate limit, pending approval."""

    exit_code = EX_TEMPFAIL


class Denied(PrivsepError):
    """The policy says no."""

    exit_code = EX_NOPERM


class ConfigError(PrivsepError):
    """Configuration (allowlist, broker.toml, file modes) is invalid: fail closed."""

    exit_code = EX_CONFIG

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        #: every individual problem, ``file:line:col: message`` where known
        self.problems = problems if problems is not None else [message]
