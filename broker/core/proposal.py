"""An agent's proposal of a new MCP server (``mcp propose``): its fields, their bounds, and its command line.

An agent can often find the server it needs and say how to install it; it
cannot install anything. ``mcp propose NAME --pip PACKAGE==VERSION`` (or
``--npm PACKAGE@VERSION``), with the tools it wants (``--tool``, repeatable)
and why (``--why TEXT``, or ``--why -`` for the text on stdin), puts a
request in a queue that only root reads whole and only root decides on
(``mcp-brokerctl proposals``): nothing of it is installed, let alone run,
before an operator adopts it with ``server add`` and its review.
``mcp propose --status`` shows the caller its own proposals, no one else's.

Every field is bounded, and the same rules are checked twice: by the gate,
for a clear usage error (64) before anything is sent, and again by the
daemon (:func:`problem`), which trusts no gate. The name is a server name
(``[A-Za-z0-9_-]``, at most :data:`MAX_NAME`); the package a PyPI name
(``[A-Za-z0-9._-]``, starting and ending with a letter or digit) or an npm
name (lowercase, optionally ``@scope/``), at most :data:`MAX_PACKAGE`; the
version an exact pin (PyPI: a public version starting with a digit, no
wildcard, range or local part; npm: ``MAJOR.MINOR.PATCH`` with an optional
pre-release and build, never a range or a tag); at most :data:`MAX_TOOLS` tool names; ``why`` free text
(any character: the operator's screen shows it defanged) of at most
:data:`MAX_WHY` characters. An agent has at most :data:`MAX_PENDING`
pending at once (75 beyond that).

Standard library only, no ``re``: the gate imports it for this verb alone.
"""

from __future__ import annotations

from broker.core import names, wire
from broker.core.errors import UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO

MANAGERS = ("pip", "npm")
MAX_NAME = 64
MAX_PACKAGE = 214  # npm's limit; PyPI's names are shorter in practice
MAX_VERSION = 64
MAX_TOOLS = 32
#: wire.py lets this one string be longer than its MAX_STRING; the two agree by construction
MAX_WHY = wire.LONG_STRINGS["propose"]["why"]
#: pending proposals one agent may have at once
MAX_PENDING = 4

_DIGITS = frozenset("0123456789")
_ALNUM = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789")
_PIP_NAME = _ALNUM | frozenset("._-")
_PIP_VERSION = _ALNUM | frozenset(".!_-")  # a public version: no local "+..." part
_NPM_NAME = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-._~")
_SEMVER_TAIL = _ALNUM | frozenset(".-")

USAGE = (
    "usage: mcp propose NAME (--pip PACKAGE==VERSION | --npm PACKAGE@VERSION) [--tool TOOL ...] "
    "[--why TEXT|-] [--json]  or  mcp propose --status [--json]"
)


# --- the rules ------------------------------------------------------------------------------------


def name_problem(name: str) -> str | None:
    if not names.valid_server_name(name):
        return "a server name is letters, digits, '_' and '-'"
    if len(name) > MAX_NAME:
        return f"a server name has at most {MAX_NAME} characters"
    return None


def _pip_problem(package: str, version: str) -> str | None:
    if not package or not package.isascii() or any(ch not in _PIP_NAME for ch in package):
        return "a PyPI package name is letters, digits, '.', '_' and '-' (no extras, URLs or paths)"
    if package[0] not in _ALNUM or package[-1] not in _ALNUM:
        return "a PyPI package name starts and ends with a letter or digit"
    if not version or version[0] not in _DIGITS or any(ch not in _PIP_VERSION for ch in version):
        return "the version must be an exact pin such as 1.2.3 (PACKAGE==VERSION; no wildcard or range)"
    return None


def _semver(version: str) -> bool:
    core, plus, build = version.partition("+")
    core, dash, pre = core.partition("-")
    parts = core.split(".")
    if len(parts) != 3 or not all(p and all(ch in _DIGITS for ch in p) and (p == "0" or p[0] != "0") for p in parts):
        return False
    for tail, present in ((pre, dash), (build, plus)):
        if present and (not tail or any(ch not in _SEMVER_TAIL for ch in tail) or ".." in tail):
            return False
    return True


def _npm_problem(package: str, version: str) -> str | None:
    scope, slash, bare = package.rpartition("/") if package.startswith("@") else ("", "", package)
    if slash and (len(scope) < 2 or scope[1] not in _ALNUM or any(ch not in _NPM_NAME for ch in scope[1:])):
        return "an npm scope is '@' and lowercase letters, digits, '-', '.', '_' or '~'"
    if not bare or bare[0] not in _ALNUM or any(ch not in _NPM_NAME for ch in bare):
        return "an npm package name is lowercase letters, digits, '-', '.', '_' and '~' (optionally @scope/)"
    if not _semver(version):
        return "the version must be an exact pin such as 1.2.3 (PACKAGE@VERSION; no range or tag)"
    return None


def package_problem(manager: str, package: str, version: str) -> str | None:
    """Why ``manager``/``package``/``version`` is not an exact pin of a package, or None."""
    if manager not in MANAGERS:
        return f"the package manager must be one of {', '.join(MANAGERS)}"
    if len(package) > MAX_PACKAGE:
        return f"a package name has at most {MAX_PACKAGE} characters"
    if len(version) > MAX_VERSION:
        return f"a version has at most {MAX_VERSION} characters"
    return _pip_problem(package, version) if manager == "pip" else _npm_problem(package, version)


def tools_problem(tools: object) -> str | None:
    if type(tools) is not list:
        return "tools must be a list of tool names"
    if len(tools) > MAX_TOOLS:
        return f"at most {MAX_TOOLS} tools may be named"
    seen: set[str] = set()
    for tool in tools:
        if type(tool) is not str:
            return "tools must be a list of tool names"
        # a tool's name as the MCP spec allows it: checked as the tool part of a server.tool name
        problem = names.action_error("x." + tool)
        if problem is not None:
            return f"bad tool name {tool[:64]!r}: {problem}"
        if tool in seen:
            return f"tool {tool!r} named twice"
        seen.add(tool)
    return None


def why_problem(why: object) -> str | None:
    if type(why) is not str:
        return "why must be text"
    if len(why) > MAX_WHY:
        return f"why has at most {MAX_WHY} characters (it has {len(why)})"
    try:
        why.encode("utf-8")
    except UnicodeEncodeError:
        return "why is not valid UTF-8"
    return None


def problem(fields: dict[str, Any]) -> str | None:
    """Why a ``propose`` request's fields are not a proposal the broker keeps, or None (the daemon's check)."""
    for key in ("name", "manager", "package", "version"):
        if type(fields.get(key)) is not str:
            return f"{key} must be text"
    return (
        name_problem(fields["name"])
        or package_problem(fields["manager"], fields["package"], fields["version"])
        or tools_problem(fields.get("tools"))
        or why_problem(fields.get("why"))
    )


def spec(manager: str, package: str, version: str) -> str:
    """The pin as the package manager writes it: ``pkg==1.2`` (pip) or ``pkg@1.2.0`` (npm)."""
    return f"{package}=={version}" if manager == "pip" else f"{package}@{version}"


# --- the command line (the gate) ------------------------------------------------------------------


def _split(manager: str, value: str) -> tuple[str, str]:
    if manager == "pip":
        package, eq, version = value.partition("==")
        if not eq:
            raise UsageError(f"--pip takes PACKAGE==VERSION (an exact pin), got {value[:100]!r}")
    else:
        at = value.rfind("@")
        if at <= 0:
            raise UsageError(f"--npm takes PACKAGE@VERSION (an exact version), got {value[:100]!r}")
        package, version = value[:at], value[at + 1 :]
    return package, version


def _read_why(stdin: TextIO | None) -> str:
    if stdin is None:
        raise UsageError("--why -: no standard input")
    source = getattr(stdin, "buffer", stdin)
    most = MAX_WHY * 4 + 1  # UTF-8 bytes of the longest text, and its newline
    try:
        raw = source.read(most + 1)
        if len(raw) > most:
            raise UsageError(f"--why -: why has at most {MAX_WHY} characters")
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--why -: cannot read standard input as UTF-8 text: {exc}") from None
    return text[:-1] if text.endswith("\n") else text


def parse_argv(rest: list[str], stdin: TextIO | None) -> tuple[dict[str, Any] | None, bool]:
    """(the proposal's fields, or None for ``--status``; ``--json``) from the words after ``propose``."""
    fields: dict[str, Any] = {"tools": [], "why": ""}
    positional: list[str] = []
    as_json = status = False
    why_given = False
    i = 0
    while i < len(rest):
        arg = rest[i]
        i += 1
        if not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        flag, eq, inline = arg.partition("=")
        if flag in ("--json", "--status"):
            if eq:
                raise UsageError(f"{flag} takes no value")
            if flag == "--json":
                as_json = True
            else:
                status = True
            continue
        if flag not in ("--pip", "--npm", "--tool", "--why"):
            raise UsageError(f"unknown option {flag!r} for 'propose' ({USAGE})")
        if eq:
            value = inline
        elif i < len(rest):
            value = rest[i]
            i += 1
        else:
            raise UsageError(f"{flag} needs a value")
        if flag == "--tool":
            fields["tools"].append(value)
        elif flag == "--why":
            if why_given:
                raise UsageError("--why given twice")
            why_given = True
            fields["why"] = _read_why(stdin) if value == "-" else value
        else:
            if "manager" in fields:
                raise UsageError("give one package: --pip PACKAGE==VERSION or --npm PACKAGE@VERSION")
            fields["manager"] = flag[2:]
            fields["package"], fields["version"] = _split(fields["manager"], value)
    if status:
        if positional or len(fields) > 2 or fields["tools"] or why_given:
            raise UsageError("'propose --status' takes only --json")
        return None, as_json
    if not positional:
        raise UsageError(f"'propose' needs the server's NAME ({USAGE})")
    if len(positional) > 1:
        raise UsageError(f"unexpected argument {positional[1][:100]!r} for 'propose'")
    if "manager" not in fields:
        raise UsageError("'propose' needs the package: --pip PACKAGE==VERSION or --npm PACKAGE@VERSION")
    fields["name"] = positional[0]
    found = problem(fields)
    if found is not None:
        raise UsageError(f"propose: {found}")
    return fields, as_json


def render(result: Any) -> str:
    """What ``mcp propose`` prints (without ``--json``): the queued proposal, or the caller's own list."""
    if isinstance(result, dict) and "proposals" in result:
        rows = result["proposals"]
        if not rows:
            return "no proposals of yours are on record\n"
        out = []
        for p in rows:
            line = f"{p.get('id')}  {p.get('status', ''):<8} {p.get('name')}  {p.get('manager')} {p.get('spec')}"
            if p.get("tools"):
                line += f"  tools: {', '.join(p['tools'])}"
            if p.get("note"):
                line += f"  ({' '.join(str(p['note']).split())})"
            out.append(line)
        return "\n".join(out) + "\n"
    if not isinstance(result, dict):
        return ""
    return (
        f"proposal {result.get('id')} queued: server {result.get('name')} from {result.get('manager')} "
        f"{result.get('spec')} ({result.get('pending')} of {result.get('max_pending')} pending); "
        "the operator reviews it: nothing is installed or run unless they adopt it\n"
    )
