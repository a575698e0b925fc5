"""``mcp-gate``: the only program an agent may run through sudo.

It runs as the agent's gate user, once per agent call. It accepts a closed
set of verbs, checks the requested ``server.tool`` against the root-owned
allowlist, and forwards permitted requests over ``gate.sock`` to
``mcp-brokerd``, which checks everything again. No flag names a file, a
config, a server, a URL, a directory or a variable; the install root is
baked into the generated ``/usr/local/sbin/mcp-gate`` script.

Speed matters: this module and everything it imports must be standard
library only and cheap to import (no ``json``, ``socket``, ``argparse``,
``typing``; their C cores are used directly).
"""

from __future__ import annotations

import io  # loaded by the interpreter already: free
import posix as os  # not os: see allowlist.py
import sys

from broker import __version__
from broker.core import allowlist, names, wire
from broker.core.errors import (
    EX_INTERRUPTED,
    EX_OK,
    EX_SOFTWARE,
    EX_TOOL_ERROR,
    EX_USAGE,
    REFUSAL_EXIT_CODES,
    ArgumentsRejected,
    ConfigError,
    Denied,
    NonFiniteNumber,
    PrivsepError,
    UsageError,
)
from broker.core.paths import Paths

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, TextIO

    from broker.core.wire import Answer

MAX_ARGV_BYTES = 256 * 1024
MAX_ARGC = 1024
MAX_STDIN_BYTES = 1024 * 1024
MAX_TIMEOUT = 3600.0
#: Allowlists larger than this are validated once per content digest and the
#: verdict remembered in the gate's cache directory.
CACHE_THRESHOLD = 64 * 1024
DEFAULT_WAIT = 900.0

HELP = """\
usage: mcp VERB [ARGS]

Call the MCP tools your administrator allowed, through the mcp-privsep broker.
Credentials stay with the broker; you only ever see tool results.

verbs:
  mcp list [--json]                  the tools you may call, with descriptions
  mcp describe SERVER.TOOL [--json]  the input schema of an allowed tool
  mcp call SERVER.TOOL [k=v ...] [--args JSON|-] [--json] [--timeout S]
                                     call a tool; k=v or k:v pairs are typed by
                                     the tool's schema (numbers, booleans, null,
                                     JSON arrays/objects); --args takes a JSON
                                     object, or - to read one from stdin
  mcp status [--json]                is the broker up, are its servers healthy
  mcp stdio                          an MCP server on stdin/stdout offering exactly
                                     your allowed tools (for MCP clients)
  mcp propose NAME --pip PACKAGE==VERSION | --npm PACKAGE@VERSION
              [--tool TOOL ...] [--why TEXT|-] [--json]
                                     ask the operator for a new MCP server; it is
                                     queued (at most 4 pending), and nothing is
                                     installed or run unless the operator adopts it
  mcp propose --status [--json]      your own proposals and what became of them
  mcp help | --help | --version

exit codes: 0 ok, 1 the tool reported an error, 64 usage, 65 arguments
rejected, 69 broker unavailable, 75 try again later (timeout, rate limit,
approval pending), 77 denied, 78 configuration error.
"""

_CALL_FLAGS = ("--json", "--args", "--timeout")
_PLAIN_FLAGS = ("--json",)


class Request:
    """A parsed command line."""

    __slots__ = ("args", "json", "kv", "timeout", "tool", "verb")

    def __init__(self, verb: str) -> None:
        self.verb = verb
        self.tool = ""
        self.kv: list[list[str]] = []
        self.args: dict[str, Any] | None = None
        self.json = False
        self.timeout: float | None = None


def parse_argv(argv: list[str], stdin: TextIO | None) -> Request:
    """Parse the agent's arguments; raise UsageError on anything unexpected."""
    if len(argv) > MAX_ARGC:
        raise UsageError("too many arguments")
    size = 0
    for arg in argv:
        try:
            size += len(arg.encode("utf-8"))
        except UnicodeEncodeError:
            raise UsageError("an argument is not valid UTF-8") from None
    if size > MAX_ARGV_BYTES:
        raise UsageError(f"arguments exceed {MAX_ARGV_BYTES} bytes")
    if not argv:
        raise UsageError("missing verb (try 'mcp help')")
    verb = argv[0]
    if verb in ("help", "--help", "-h"):
        if len(argv) > 1:
            raise UsageError(f"'{verb}' takes no arguments")
        return Request("help")
    if verb == "--version":
        if len(argv) > 1:
            raise UsageError("'--version' takes no arguments")
        return Request("version")
    if verb == "propose":
        from broker.core import proposal  # this verb only: nothing more on the call path

        req = Request("propose")
        # args: the proposal's fields, or None for --status (the caller's own proposals)
        req.args, req.json = proposal.parse_argv(argv[1:], stdin)
        return req
    if verb not in ("list", "describe", "call", "status", "stdio"):
        raise UsageError(f"unknown verb {verb!r} (try 'mcp help')")
    req = Request(verb)
    allowed = _CALL_FLAGS if verb == "call" else () if verb == "stdio" else _PLAIN_FLAGS
    rest = argv[1:]
    positional: list[str] = []
    i = 0
    only_positional = False
    while i < len(rest):
        arg = rest[i]
        i += 1
        if only_positional or not arg.startswith("-") or arg == "-":
            positional.append(arg)
            continue
        if arg == "--" and verb == "call":
            only_positional = True
            continue
        name, eq, inline = arg.partition("=")
        if name not in allowed:
            raise UsageError(f"unknown option {name!r} for '{verb}' (try 'mcp help')")
        if name == "--json":
            if eq:
                raise UsageError("--json takes no value")
            req.json = True
            continue
        if eq:
            value = inline
        elif i < len(rest):
            value = rest[i]
            i += 1
        else:
            raise UsageError(f"{name} needs a value")
        if name == "--timeout":
            req.timeout = _parse_timeout(value)
        else:
            if req.args is not None:
                raise UsageError("--args given twice")
            req.args = _parse_args_json(value, stdin)
    if verb in ("describe", "call"):
        if not positional:
            raise UsageError(f"'{verb}' needs SERVER.TOOL")
        req.tool = positional[0]
        problem = names.action_error(req.tool)
        if problem is not None:
            raise UsageError(f"bad tool name {req.tool!r}: {problem}")
        positional = positional[1:]
    if verb == "call":
        seen = set(req.args or ())
        for item in positional:
            pair = names.split_kv(item)
            if pair is None:
                raise UsageError(f"expected key=value or key:value, got {item!r}")
            key, value = pair
            if key in seen:
                raise UsageError(f"argument {key!r} given twice")
            seen.add(key)
            req.kv.append([key, value])
    elif positional:
        raise UsageError(f"unexpected argument {positional[0]!r} for '{verb}'")
    return req


def _parse_timeout(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise UsageError(f"--timeout takes seconds, got {value!r}") from None
    if not 0 < seconds <= MAX_TIMEOUT:  # also rejects nan
        raise UsageError(f"--timeout must be between 0 and {MAX_TIMEOUT:g} seconds")
    return seconds


def _parse_args_json(value: str, stdin: TextIO | None) -> dict[str, Any]:
    if value == "-":
        if stdin is None:
            raise UsageError("--args -: no standard input")
        source = getattr(stdin, "buffer", stdin)
        try:
            raw = source.read(MAX_STDIN_BYTES + 1)
            if len(raw) > MAX_STDIN_BYTES:
                raise UsageError(f"--args -: standard input exceeds {MAX_STDIN_BYTES} bytes")
            value = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--args -: cannot read standard input: {exc}") from None
    try:
        obj = wire.loads(value)
    except NonFiniteNumber as exc:
        raise ArgumentsRejected(f"--args: {exc}: no JSON number may exceed a double's range") from None
    except ValueError as exc:
        raise UsageError(f"--args: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise UsageError("--args: expected a JSON object")
    return obj


# --- identity and policy ----------------------------------------------------


def caller_name(environ: dict[str, str]) -> str:
    """The calling agent as sudo names it (``SUDO_USER``), or the real user when not run through sudo.

    It picks the allowlist and words the messages; it is never a credential:
    the daemon names the caller by this process's uid, the agent's gate user.
    """
    user = environ.get("SUDO_USER")
    if user:
        return user
    import pwd

    real = os.getuid()
    try:
        return pwd.getpwuid(real).pw_name
    except KeyError:
        raise ConfigError(f"uid {real} has no user name") from None


def check_allowlist(paths: Paths, user: str, tool: str | None) -> None:
    """Fail closed on a bad allowlist; deny a tool that is not listed."""
    data, path, _st = allowlist.locate(paths.allowlist, paths.allowlist_d, user)
    if len(data) < CACHE_THRESHOLD:
        parsed = allowlist.from_bytes(data, path)
        allowed = tool is None or parsed.allows(tool)
    else:
        _validate_cached(paths.gate_cache_of(user), data, path)
        allowed = tool is None or allowlist.contains_line(data, tool)
    if not allowed:
        raise Denied(f"denied: {tool} is not in the allowlist for {user}")


def _validate_cached(cache_dir: str, data: bytes, path: str) -> None:
    """Full validation, skipped when this exact content was validated before."""
    import _sha256  # type: ignore[import-not-found]  # the C module: hashlib would load OpenSSL

    marker = f"{cache_dir}/valid-{_sha256.sha256(data).hexdigest()}"
    try:
        os.stat(marker)
        return
    except OSError:
        pass
    allowlist.from_bytes(data, path)  # raises on any error: nothing is cached
    try:
        os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError:
        pass  # no cache directory: validate every time


# --- talking to the daemon --------------------------------------------------


def _report(paths: Paths, verb: str, tool: str, exit_code: int, reason: str, broker_uid: int | None) -> None:
    """Best effort: let the daemon audit a refusal the gate made itself (it knows the caller by this uid)."""
    message = wire.request("report", verb=verb, tool=tool, exit=exit_code, reason=reason[:1000])
    try:
        wire.exchange(paths.gate_sock, message, 2.0, broker_uid)
    except PrivsepError:
        pass  # the daemon is down: the refusal must not wait for it


# --- output -----------------------------------------------------------------


def _print_result(req: Request, answer: Answer, out: TextIO, err: TextIO) -> int:
    result = answer.get("result")
    if req.json:
        out.write(wire.dumps(wire.call_result(result) if req.verb == "call" else result) + "\n")
    elif req.verb == "propose":
        from broker.core import proposal

        out.write(proposal.render(result))
    elif req.verb == "list":
        tools = result.get("tools", []) if isinstance(result, dict) else []
        width = max((len(t.get("name", "")) for t in tools), default=0)
        for t in tools:
            out.write(f"{t.get('name', ''):<{width}}  {t.get('description', '')}".rstrip() + "\n")
    elif req.verb == "describe":
        import json  # only here: pretty output is not on the call path

        out.write(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    elif req.verb == "status":
        _print_status(result, out)
    else:
        text = result.get("text", "") if isinstance(result, dict) else ""
        if text:
            out.write(text if text.endswith("\n") else text + "\n")
    if req.verb == "call" and isinstance(result, dict):
        meta = result.get("_meta")
        fixed = meta.get("mcp-privsep/sanitized") if isinstance(meta, dict) else None
        if isinstance(fixed, dict) and fixed:
            what = ", ".join(f"{n} {k.replace('_', '-')}" for k, n in fixed.items())
            err.write(f"mcp: note: the server's answer held what no JSON can carry ({what}); replaced\n")
        if result.get("isError") is True:
            return EX_TOOL_ERROR
    return EX_OK


def _print_status(result: Any, out: TextIO) -> None:
    if not isinstance(result, dict):
        return
    out.write(f"broker: {result.get('broker', 'unknown')}\n")
    for s in result.get("servers", []):
        line = f"server {s.get('name')}: {s.get('state')}"
        if s.get("reason"):
            line += f" ({s['reason']})"
        out.write(line + "\n")
        hidden = s.get("hidden")
        if isinstance(hidden, dict):
            for tool, why in hidden.items():
                out.write(f"  {tool}: not offered ({why})\n")


def _fail(req: Request | None, exc: PrivsepError, out: TextIO, err: TextIO) -> int:
    message = " ".join(str(exc).split()) or "error"
    err.write(f"mcp: {message}\n")
    if req is not None and req.json:
        out.write(wire.dumps({"error": message, "exit": exc.exit_code}) + "\n")
    return exc.exit_code


# --- entry points -----------------------------------------------------------


def main(
    argv: list[str] | None = None,
    *,
    root: str = "/",
    broker_uid: int | None = None,
    environ: dict[str, str] | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
    stderr: TextIO | None = None,
) -> int:
    """Run one gate invocation; return the exit code. Testable in-process."""
    argv = sys.argv[1:] if argv is None else argv
    if environ is None:
        environ = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in os.environ.items()}
    out = sys.stdout if stdout is None else stdout
    err = sys.stderr if stderr is None else stderr
    req: Request | None = None
    try:
        req = parse_argv(argv, sys.stdin if stdin is None else stdin)
    except PrivsepError as exc:  # a usage error (64) or arguments no tool may take (65)
        bare = Request("usage")
        bare.json = "--json" in argv  # the request did not parse, but the caller asked for JSON
        code = _fail(bare, exc, out, err)
        out.flush()
        err.flush()
        _report_refusal(argv, root, broker_uid, environ, exc)
        return code
    try:
        return _run(req, Paths(root), broker_uid, environ, out, err)
    except PrivsepError as exc:
        return _fail(req, exc, out, err)
    except Exception as exc:  # noqa: BLE001 - the edge: never a traceback to the agent
        return _fail(req, PrivsepError(f"internal error: {type(exc).__name__}: {exc}", EX_SOFTWARE), out, err)


def _report_refusal(
    argv: list[str], root: str, broker_uid: int | None, environ: dict[str, str], exc: PrivsepError
) -> None:
    try:
        verb = argv[0][:64] if argv else ""
        _report(Paths(root), verb, "", exc.exit_code, str(exc), broker_uid)
    except Exception:  # noqa: BLE001, S110 - best effort only; the refusal is already reported
        pass


def _run(req: Request, paths: Paths, broker_uid: int | None, environ: dict[str, str], out: TextIO, err: TextIO) -> int:
    if req.verb == "help":
        out.write(HELP)
        return EX_OK
    if req.verb == "version":
        out.write(f"mcp-privsep {__version__}\n")
        return EX_OK
    user = caller_name(environ)

    def on_pending(approval_id: str) -> None:
        err.write(f"mcp: pending approval {approval_id}, waiting\n")
        err.flush()

    if req.verb == "stdio":
        from broker.gate import endpoint

        return endpoint.run(paths, user, lambda: wire.connect(paths.gate_sock, broker_uid), err)
    if req.verb == "propose":  # names no tool: no allowlist to check; the daemon decides (and audits) it
        message = wire.request("proposals") if req.args is None else wire.request("propose", **req.args)
        answer = wire.exchange(paths.gate_sock, message, 60.0, broker_uid)
        if not answer.get("ok"):
            refused = answer.get("exit")
            if type(refused) is not int or refused not in REFUSAL_EXIT_CODES:
                refused = EX_SOFTWARE
            return _fail(req, PrivsepError(str(answer.get("error", "the broker refused")), refused), out, err)
        return _print_result(req, answer, out, err)
    if req.verb in ("list", "describe", "call"):
        try:
            check_allowlist(paths, user, req.tool or None)
        except (Denied, ConfigError) as exc:
            code = _fail(req, exc, out, err)
            # audited by the daemon, but only once the caller has its answer
            out.flush()
            err.flush()
            _report(paths, req.verb, req.tool, code, str(exc), broker_uid)
            return code
    fields: dict[str, Any] = {}
    if req.verb in ("describe", "call"):
        fields["tool"] = req.tool
    on_progress = None
    if req.verb == "call":
        fields.update(kv=req.kv, args=req.args, timeout=req.timeout)
        if _is_terminal(err):  # a person watching: one line that updates in place; otherwise quiet
            fields["progress"] = True
            on_progress = ProgressLine(err)
    wait = (req.timeout + 10.0) if req.timeout is not None else DEFAULT_WAIT

    request = wire.request(req.verb, **fields)
    try:
        answer = wire.exchange(paths.gate_sock, request, wait, broker_uid, on_pending, on_progress)
    finally:
        if on_progress is not None:
            on_progress.clear()
    if not answer.get("ok"):
        refused = answer.get("exit")
        if type(refused) is not int or refused not in REFUSAL_EXIT_CODES:
            refused = EX_SOFTWARE
        return _fail(req, PrivsepError(str(answer.get("error", "the broker refused")), refused), out, err)
    return _print_result(req, answer, out, err)


def _interrupt_once(_signum: int, _frame: object) -> None:
    """SIGINT: KeyboardInterrupt the first time only. A terminal's Ctrl-C reaches the gate twice (itself, and
    relayed by sudo); the second must not break into the handling of the first."""
    if _INTERRUPTED:
        return
    _INTERRUPTED.append(True)
    raise KeyboardInterrupt


_INTERRUPTED: list[bool] = []


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


class ProgressLine:
    """A call's progress on a terminal: one line, rewritten in place, cleared before the result."""

    WIDTH = 100

    def __init__(self, err: TextIO) -> None:
        self.err = err
        self.shown = False

    def __call__(self, report: dict[str, Any]) -> None:
        value, total, message = report.get("progress"), report.get("total"), report.get("message")
        if type(value) not in (int, float):
            return
        text = f"{value:g}/{total:g}" if type(total) in (int, float) else f"{value:g}"
        if isinstance(message, str) and message:
            # a server's words on a person's terminal: no control character (no escape sequence) gets through
            text += ": " + "".join(c if c.isprintable() else " " for c in message)
        self.err.write(f"\rmcp: progress {text}"[: self.WIDTH] + "\x1b[K")
        self.err.flush()
        self.shown = True

    def clear(self) -> None:
        if self.shown:
            self.err.write("\r\x1b[K")
            self.err.flush()


#: the first line of the frame the ``mcp`` shim hands the gate on stdin: "mcp-args 1 COUNT STDIN_BYTES"
FRAME_MAGIC = b"mcp-args"
FRAME_VERSION = b"1"
#: how long the gate waits for the shim's frame (it is written before the gate even starts)
FRAME_WAIT = 5.0
NO_FRAME = "no argument frame on standard input (run mcp calls through the 'mcp' command)"


def read_frame(fd: int, wait: float = FRAME_WAIT) -> tuple[list[str], str | None]:
    """The call's arguments from the shim's length-framed payload on ``fd``: (items, the agent's stdin or None).

    Arguments never travel on a command line (``/proc/*/cmdline`` is readable
    by every local user): the shim sends ``mcp-args 1 N S`` and then N items,
    each ``\\n`` LENGTH SPACE BYTES, and for ``--args -`` one more ``\\n`` and S
    bytes of what it read from the agent's stdin (UTF-8). Exactly that much is
    read, never "until EOF": an agent's harness may leave stdin open. Any
    problem, a wait over ``wait`` seconds included, is a UsageError. (Closures,
    not a class, and ``time``, not ``select``: this runs on every call, and
    a class or a shared library costs the gate more than the whole parse.)
    """
    import time

    deadline = time.monotonic() + wait
    buf = bytearray()
    limit = MAX_ARGV_BYTES + MAX_STDIN_BYTES + 64 * (MAX_ARGC + 2)
    malformed = "malformed argument frame on standard input"

    def need(n: int) -> None:
        while len(buf) < n:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:  # the shim writes the frame before the gate starts: this is rare
                if time.monotonic() >= deadline:
                    raise UsageError(NO_FRAME) from None
                time.sleep(0.002)
                continue
            except OSError as exc:
                raise UsageError(f"standard input is closed or not readable ({exc.strerror or exc})") from None
            if not chunk:
                raise UsageError("the argument frame on standard input is cut short")
            buf.extend(chunk)
            if len(buf) > limit:
                raise UsageError(f"arguments exceed {limit} bytes")

    def expect(pos: int, what: bytes, problem: str) -> None:
        need(pos + len(what))
        if bytes(buf[pos : pos + len(what)]) != what:
            raise UsageError(problem)

    def number(start: int, end: bytes) -> tuple[int, int]:
        i = start
        while True:
            need(i + 1)
            if buf[i : i + 1] == end:
                break
            if not buf[i : i + 1].isdigit() or i - start > 9:
                raise UsageError(malformed)
            i += 1
        if i == start:
            raise UsageError(malformed)
        return int(buf[start:i]), i + 1

    try:
        was_blocking = os.get_blocking(fd)
        os.set_blocking(fd, False)  # so a missing frame times out
    except OSError as exc:
        raise UsageError(f"standard input is closed or not readable ({exc.strerror or exc})") from None
    try:
        expect(0, FRAME_MAGIC + b" ", NO_FRAME)
        pos = len(FRAME_MAGIC) + 1
        expect(pos, FRAME_VERSION + b" ", "argument frame of another version on standard input")
        count, pos = number(pos + 2, b" ")
        size, pos = number(pos, b"\n")
        if count > MAX_ARGC or size > MAX_STDIN_BYTES:
            raise UsageError("too many or too large arguments")
        pos -= 1  # each item begins with the newline that ends what is before it
        items: list[str] = []
        for _ in range(count):
            expect(pos, b"\n", malformed)
            length, pos = number(pos + 1, b" ")
            need(pos + length)
            items.append(bytes(buf[pos : pos + length]).decode("utf-8", "surrogateescape"))
            pos += length
        stdin: str | None = None
        if size:
            expect(pos, b"\n", malformed)
            need(pos + 1 + size)
            try:
                stdin = bytes(buf[pos + 1 : pos + 1 + size]).decode("utf-8")
            except UnicodeDecodeError:
                raise UsageError("--args -: standard input is not valid UTF-8") from None
        return items, stdin
    finally:
        if was_blocking:
            try:
                os.set_blocking(fd, True)
            except OSError:
                pass


def _say(message: str) -> None:
    """One line on stderr, even when sys.stderr is gone; silent if fd 2 is closed too."""
    try:
        os.write(2, f"mcp: {message}\n".encode("utf-8", "backslashreplace"))
    except OSError:
        pass


def _unusable(fd: int, write: bool) -> bool:
    """Whether ``fd`` is closed or not open for writing (reading): a zero-length write (read) says so."""
    try:
        if write:
            os.write(fd, b"")
        else:
            os.read(fd, 0)
    except OSError:
        return True
    return False


def run(root: str = "/", broker_uid: int | None = None) -> None:
    """Entry point of the generated ``mcp-gate`` script: harden, then main(); never a traceback.

    A closed standard output (or, for ``mcp stdio``, input) is refused before
    anything is asked of the daemon (64): nothing should run whose answer
    cannot be delivered. Ctrl-C is exit 130 with one line.
    """
    code = EX_SOFTWARE
    import _signal  # type: ignore[import-not-found]  # loaded at start-up already (signal would import enum)

    _signal.signal(_signal.SIGINT, _interrupt_once)
    try:
        os.chdir("/")
        os.umask(0o077)
        os.closerange(3, 1 << 20)
        argv = sys.argv[1:]
        if _unusable(1, write=True) or sys.stdout is None:
            _say("standard output is closed or not writable; nothing was done")
            os._exit(EX_USAGE)
        if argv[:1] == ["stdio"] and (_unusable(0, write=False) or sys.stdin is None):
            _say("mcp stdio: standard input is closed or not readable; nothing was done")
            os._exit(EX_USAGE)
        environ = {k.decode(): os.environ[k].decode(errors="replace") for k in (b"SUDO_USER",) if k in os.environ}
        stdin: Any = None
        if argv[:1] == ["call"] or argv[:1] == ["propose"]:
            # a call's (a proposal's) arguments come in the shim's frame on stdin, never on this command line
            if len(argv) > (2 if argv[0] == "call" else 1):
                _say(f"mcp-gate takes {argv[0]}'s arguments on standard input only: run it through the 'mcp' command")
                os._exit(EX_USAGE)
            try:
                items, piped = read_frame(0)
            except UsageError as exc:
                _say(str(exc))
                os._exit(EX_USAGE)
            argv = argv + items
            stdin = io.StringIO(piped or "")
        # the caller's locale must not make a tool result unprintable
        sys.stdout.reconfigure(encoding="utf-8", errors="backslashreplace")  # type: ignore[union-attr]
        if sys.stderr is not None:
            sys.stderr.reconfigure(encoding="utf-8", errors="backslashreplace")  # type: ignore[union-attr]
        stderr: TextIO = sys.stderr if sys.stderr is not None else io.StringIO()  # fd 2 closed: said nowhere
        code = main(argv, root=root, broker_uid=broker_uid, environ=environ, stdin=stdin, stderr=stderr)
        sys.stdout.flush()
        stderr.flush()
    except KeyboardInterrupt:
        _say("interrupted")
        code = EX_INTERRUPTED
    except OSError as exc:  # the answer could not be written: the reader went away (a broken pipe)
        _say(f"cannot write the answer: {exc.strerror or exc}")
        code = EX_USAGE
    except BaseException as exc:  # noqa: BLE001 - the edge: never a traceback to the agent
        _say(f"internal error: {type(exc).__name__}")
        code = EX_SOFTWARE
    # everything is flushed and nothing needs finalising: skipping interpreter
    # teardown saves about 2 ms on every agent call
    os._exit(code)


__all__ = ["main", "run"]
