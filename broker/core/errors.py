"""The one exception root, its subclasses, and the sysexits exit codes of the contract.

Library code raises :class:`PrivsepError` subclasses; only the command-line
edges (gate, daemon, admin CLI) turn them into a message and an exit code.
Each class says what it is: its exit code and the audit ``decision`` word a
refusal of its kind is recorded under. Nothing else in the code base maps
exit codes to words.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; the gate imports this module
    from typing import ClassVar

EX_OK = 0
EX_TOOL_ERROR = 1
EX_USAGE = 64
EX_DATAERR = 65  # arguments rejected (schema or policy constraint)
EX_UNAVAILABLE = 69  # broker or server unavailable
EX_SOFTWARE = 70  # a bug in mcp-privsep itself
EX_TEMPFAIL = 75  # timeout, rate limit, approval pending or expired
EX_NOPERM = 77  # denied
EX_CONFIG = 78  # configuration error
EX_INTERRUPTED = 130  # the caller pressed Ctrl-C (128 + SIGINT)

# the operator's commands (mcp-brokerctl, mcp-brokerd's start) use these besides the ones above
EX_FAILED = 1  # the command did what it could and says what failed (check found problems, ...)
EX_NOINPUT = 66  # an input file cannot be opened
EX_NOUSER = 67  # a user named on the command line does not exist
EX_CANTCREAT = 73  # an output file cannot be created
EX_IOERR = 74  # writing or reading back failed

#: Every exit code an agent can see; anything else is a bug.
CONTRACT_EXIT_CODES = frozenset(
    {
        EX_OK,
        EX_TOOL_ERROR,
        EX_USAGE,
        EX_DATAERR,
        EX_UNAVAILABLE,
        EX_SOFTWARE,
        EX_TEMPFAIL,
        EX_NOPERM,
        EX_CONFIG,
        EX_INTERRUPTED,
    }
)
#: What an error answered by the daemon may carry: a refusal, a server's error (1), the daemon's own bug (70).
REFUSAL_EXIT_CODES = frozenset(
    {EX_TOOL_ERROR, EX_USAGE, EX_DATAERR, EX_UNAVAILABLE, EX_SOFTWARE, EX_TEMPFAIL, EX_NOPERM, EX_CONFIG}
)


class PrivsepError(Exception):
    """Root of every error mcp-privsep reports; carries its exit code."""

    exit_code: int = EX_SOFTWARE
    #: the audit record's ``decision`` for a refusal of this kind (see :func:`decision_for`)
    decision: ClassVar[str] = "error"

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
    decision = "usage"


class ArgumentsRejected(PrivsepError):
    """Arguments that do not fit the tool's schema or a policy constraint."""

    exit_code = EX_DATAERR
    decision = "rejected"


class Unavailable(PrivsepError):
    """The broker, or the server behind a tool, cannot be reached."""

    exit_code = EX_UNAVAILABLE
    decision = "unavailable"


class TempFail(PrivsepError):
    """Try again later: timeout, rate limit, pending approval."""

    exit_code = EX_TEMPFAIL
    decision = "tempfail"


class Denied(PrivsepError):
    """The policy says no."""

    exit_code = EX_NOPERM
    decision = "deny"


class ConfigError(PrivsepError):
    """Configuration (allowlist, broker.toml, file modes) is invalid: fail closed."""

    exit_code = EX_CONFIG
    decision = "config_error"

    def __init__(self, message: str, problems: list[str] | None = None) -> None:
        super().__init__(message)
        #: every individual problem, ``file:line:col: message`` where known
        self.problems = problems if problems is not None else [message]


class ServerError(PrivsepError):
    """The server answered the call with a JSON-RPC error: the tool failed (exit 1), with its message."""

    exit_code = EX_TOOL_ERROR
    decision = "allow"  # the broker allowed the call; the server refused it

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        #: the JSON-RPC error code the server answered with
        self.code = code


class Cancelled(PrivsepError):
    """The caller gave up on a call while its server worked on it (Ctrl-C, ``notifications/cancelled``)."""

    exit_code = EX_INTERRUPTED
    decision = "allow"  # the broker allowed the call; its caller cancelled it


class NonFiniteNumber(ValueError):
    """A JSON number too large for a float (``1e400``): valid syntax, but no value any side can represent."""


class ProtocolError(PrivsepError):
    """A frame that breaks the gate <-> daemon protocol; the connection must be closed."""


class ImportProblem(PrivsepError):
    """An MCP client config cannot be imported as it is; carries every problem."""

    exit_code = EX_DATAERR

    def __init__(self, message: str, problems: list[str] | None = None, exit_code: int = EX_DATAERR) -> None:
        super().__init__(message, exit_code)
        self.problems = problems if problems is not None else [message]


#: the error class of each refusal exit code, for answers that arrive as a code
_BY_CODE: dict[int, type[PrivsepError]] = {
    cls.exit_code: cls for cls in (UsageError, ArgumentsRejected, Unavailable, TempFail, Denied, ConfigError)
}


def decision_for(exit_code: int) -> str:
    """The audit ``decision`` word of a refusal with this exit code ("error" for any other code)."""
    cls = _BY_CODE.get(exit_code)
    return cls.decision if cls is not None else PrivsepError.decision
