"""Everything that crosses a socket between the gate, the daemon and the admin CLI.

One module, because the gate imports it on every agent call (each module
costs it time): the JSON codec, the frames, the closed op sets of
``gate.sock`` and ``admin.sock``, and the one client of that protocol.

**The codec.** ``import json`` compiles regular expressions at import time,
which the gate cannot afford, so :func:`loads` and :func:`dumps` drive
``_json``'s encoder and scanner directly, with their error path: the C
scanner reports a syntax error by constructing
``json.decoder.JSONDecodeError``, which it looks up in ``sys.modules`` only;
in a process that never imported ``json`` that lookup fails and the scanner
returns NULL without an exception (a ``SystemError``), so :func:`loads`
provides the module for the length of the scan. :func:`loads` parses
exactly one strict JSON value (no NaN or Infinity, nothing after it) or
raises ``ValueError``; a number too large for a float raises
:class:`broker.core.errors.NonFiniteNumber`, or, with ``out_of_range="mark"``,
becomes :data:`OUT_OF_RANGE` so a caller can refuse just the request that
holds it. :func:`dumps` writes compact JSON (non-ASCII kept as UTF-8) and
refuses non-finite numbers; :func:`to_utf8` never fails (lone surrogates
become U+FFFD); :func:`sanitize` makes an untrusted peer's value encodable
and says what it replaced.

**The frames.** A frame is a 4-byte big-endian length followed by that many
bytes of UTF-8 JSON holding one object. Requests come from a closed set
(:data:`OPS` on ``gate.sock``, :data:`ADMIN_OPS` on ``admin.sock``); each op
has a closed set of keys with fixed types. Anything else, an oversized
frame, or malformed JSON is a protocol violation: the daemon closes the
connection (OpenSSH's monitor rule).

**The client.** :func:`connect` opens a socket to the daemon and checks, with
SO_PEERCRED, that the process serving it is the broker (or root) before a
byte is sent; :func:`exchange` sends one request and returns the answer,
relaying interim ``pending`` frames (a call held for an operator's
approval); :func:`admin_request` is ``exchange`` on ``admin.sock`` with the
daemon's refusal raised.

Standard library only, and only C modules (``_json``, ``_socket``).
"""

from __future__ import annotations

import _json
import _socket
import sys

from broker.core.errors import NonFiniteNumber, PrivsepError, ProtocolError, Unavailable, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; the gate never needs it: names for the type checker only
    from collections.abc import Callable
    from typing import Any, ClassVar, TypedDict

    #: key -> (allowed types, required)
    Schema = dict[str, tuple[tuple[type, ...], bool]]

    class Answer(TypedDict, total=False):
        """The daemon's answer to one request: ``ok`` with ``result``, or ``exit`` and ``error``.

        An interim frame of a call held for approval carries ``pending`` (the
        approval id) and ``wait`` (seconds it may stay pending) instead.
        """

        ok: bool
        result: Any
        exit: int
        error: str
        pending: str
        wait: float
        #: a server's JSON-RPC error (exit 1), for the stdio endpoint to relay as such
        rpc_error: dict[str, Any]

# --- the codec --------------------------------------------------------------


class _OutOfRange:
    """The value of a JSON number too large for a float, when the caller asked to see it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OUT_OF_RANGE"


OUT_OF_RANGE = _OutOfRange()


def _no_default(obj: object) -> object:
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# non-ASCII stays as UTF-8 (at most 4 bytes a character, not 12 as \ud83d\ude00 escapes)
_encode = _json.make_encoder(None, _no_default, _json.encode_basestring, None, ":", ",", False, False, False)


def _finite(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # inf - inf is nan; only finite numbers give 0
        raise NonFiniteNumber(f"number {text[:40]} is out of range")
    return value


def _finite_or_mark(text: str) -> object:
    value = float(text)
    return value if value - value == 0.0 else OUT_OF_RANGE


def _constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


class _Strict:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float: Callable[[str], object] = staticmethod(_finite)
    parse_int = int
    parse_constant = staticmethod(_constant)
    memo: ClassVar[dict[str, Any]] = {}


class _Marking(_Strict):
    parse_float = staticmethod(_finite_or_mark)


# typeshed wants a JSONDecoder; any object with these attributes is what the C scanner reads
_scan_strict = _json.make_scanner(_Strict())  # type: ignore[arg-type]
_scan_marking = _json.make_scanner(_Marking())  # type: ignore[arg-type]
_WS = " \t\n\r"


class _DecodeError(ValueError):
    """What the C scanner raises for a syntax error (it calls it with msg, doc, pos)."""

    def __init__(self, msg: str, doc: str, pos: int) -> None:
        super().__init__(f"{msg} at character {pos}")


_decoder_stand_in = type(sys)("json.decoder")
_decoder_stand_in.JSONDecodeError = _DecodeError  # type: ignore[attr-defined]


def loads(text: str, out_of_range: str = "raise") -> Any:
    """Parse exactly one JSON value; raise ValueError otherwise (see the module docstring)."""
    scan = _scan_marking if out_of_range == "mark" else _scan_strict
    n = len(text)
    i = 0
    while i < n and text[i] in _WS:
        i += 1
    modules = sys.modules
    stand_in = "json.decoder" not in modules
    if stand_in:
        modules["json.decoder"] = _decoder_stand_in
    try:
        value, end = scan(text, i)
    except StopIteration as exc:
        raise ValueError(f"invalid JSON at character {exc.value}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    finally:
        if stand_in and modules.get("json.decoder") is _decoder_stand_in:
            del modules["json.decoder"]
    while end < n and text[end] in _WS:
        end += 1
    if end != n:
        raise ValueError(f"extra data after JSON value at character {end}")
    return value


def dumps(obj: object) -> str:
    """Compact JSON; NaN and infinities are refused (ValueError)."""
    return "".join(_encode(obj, 0))


def to_utf8(text: str) -> bytes:
    """UTF-8 of ``text``, any lone surrogate replaced by U+FFFD (never fails)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # a str holds surrogates only unpaired: UTF-16 with surrogatepass, decoded with replace, fixes exactly those
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace").encode("utf-8")


def contains(value: object, marker: object) -> bool:
    """Whether ``marker`` (e.g. :data:`OUT_OF_RANGE`) occurs anywhere inside a parsed JSON value."""
    if value is marker:
        return True
    if isinstance(value, list):
        return any(contains(v, marker) for v in value)
    if isinstance(value, dict):
        return any(contains(v, marker) for v in value.values())
    return False


def sanitize(value: Any) -> tuple[Any, dict[str, int]]:
    """(an encodable copy of ``value``, what was replaced: ``{"surrogates": n, "non_finite": m}``).

    The fast path is one encoding attempt: a clean value comes back as it is.
    """
    try:
        dumps(value).encode("utf-8")
        return value, {}
    except (ValueError, UnicodeEncodeError):
        pass
    counts = {"surrogates": 0, "non_finite": 0}
    return _clean(value, counts), {k: v for k, v in counts.items() if v}


def _clean(value: Any, counts: dict[str, int]) -> Any:
    if isinstance(value, str):
        fixed = to_utf8(value).decode("utf-8")
        if fixed != value:
            counts["surrogates"] += 1
        return fixed
    if isinstance(value, float) and value - value != 0.0:
        counts["non_finite"] += 1
        return None
    if isinstance(value, list):
        return [_clean(v, counts) for v in value]
    if isinstance(value, dict):
        return {_clean(str(k), counts): _clean(v, counts) for k, v in value.items()}
    if value is OUT_OF_RANGE:
        counts["non_finite"] += 1
        return None
    return value


def call_result(result: Any) -> dict[str, Any] | None:
    """The MCP ``CallToolResult`` of a daemon's call answer (``mcp stdio``, ``mcp call --json``); None if malformed.

    The daemon sends it in wire form already, with ``text`` (its blocks
    joined) beside it for ``mcp call``; a result without blocks (structured
    content only, or over the cap) gets that text as its one block, as MCP
    asks of a tool with structured content.
    """
    if not isinstance(result, dict):
        return None
    content = result.get("content")
    if not isinstance(content, list) or not content:
        content = [{"type": "text", "text": str(result.get("text", ""))}]
    out: dict[str, Any] = {"content": content, "isError": result.get("isError") is True}
    if result.get("structuredContent") is not None:
        out["structuredContent"] = result["structuredContent"]
    if isinstance(result.get("_meta"), dict) and result["_meta"]:
        out["_meta"] = result["_meta"]
    return out


# --- frames and the closed sets of requests ---------------------------------

#: 2: the caller is the peer's uid, no longer a field of the request
PROTOCOL_VERSION = 2
MAX_REQUEST_BYTES = 2 * 1024 * 1024
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


def encode_frame(obj: dict[str, Any], limit: int = MAX_RESPONSE_BYTES) -> bytes:
    """Serialise one message as a frame; refuse one larger than ``limit``.

    Never fails on content: a lone surrogate becomes U+FFFD and a non-finite
    number ``null`` (the daemon sanitizes and flags what servers send before
    it gets here; this is the net under that).
    """
    try:
        text = dumps(obj)
    except ValueError:
        text = dumps(sanitize(obj)[0])
    payload = to_utf8(text)
    if len(payload) > limit:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {limit}-byte cap")
    return len(payload).to_bytes(4, "big") + payload


def frame_length(header: bytes, limit: int) -> int:
    """Length announced by a 4-byte header, checked against ``limit``."""
    if len(header) != 4:
        raise ProtocolError("truncated frame header")
    n = int.from_bytes(header, "big")
    if n == 0 or n > limit:
        raise ProtocolError(f"frame of {n} bytes outside 1..{limit}")
    return n


def decode_payload(payload: bytes) -> dict[str, Any]:
    """Parse a frame body; it must be one JSON object."""
    try:
        obj = loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"malformed frame: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("frame is not a JSON object")
    return obj


# --- the closed set of requests ---------------------------------------------

_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OBJ_OR_NONE = (dict, type(None))
_LIST = (list,)
_BOOL = (bool,)

#: op -> {key: (allowed types, required)}; "v", "op" are always required.
#: gate.sock. No request names its caller: the daemon knows it from the peer's uid (SO_PEERCRED).
OPS: dict[str, Schema] = {
    "list": {},
    "describe": {"tool": (_STR, True)},
    "call": {
        "tool": (_STR, True),
        "kv": (_LIST, True),
        "args": (_OBJ_OR_NONE, True),
        "timeout": (_OPT_NUM, True),
        # ask the server for progress; reports come back as interim {"progress": {...}} frames
        "progress": (_BOOL, False),
    },
    "status": {},
    # mcp stdio: the allowed tools with their full pinned definitions
    "catalog": {},
    # mcp stdio: held open; the daemon sends {"changed": true} whenever the caller's tool list changes
    "watch": {},
    # the gate's own refusals, forwarded so the daemon can audit them (they count only against their caller)
    "report": {
        "verb": (_STR, True),
        "tool": (_STR, True),
        "exit": (_INT, True),
        "reason": (_STR, True),
    },
    # mcp propose: a server the agent asks the operator for (queued; see broker.core.proposal for the bounds)
    "propose": {
        "name": (_STR, True),
        "manager": (_STR, True),
        "package": (_STR, True),
        "version": (_STR, True),
        "tools": (_LIST, True),
        "why": (_STR, True),
    },
    # mcp propose --status: the caller's own proposals
    "proposals": {},
}

#: admin.sock (root only) has its own closed set.
_OPT_STR = (str, type(None))

ADMIN_OPS: dict[str, Schema] = {
    "status": {},
    "reload": {},
    "tools": {"server": (_OPT_STR, True)},
    "approvals": {"status": (_OPT_STR, True)},
    "approve": {"id": (_STR, True)},
    "reject": {"id": (_STR, True)},
    "unfreeze": {"caller": (_STR, True)},
    "freezes": {},
    "pins": {},
    "pin_show": {"action": (_STR, True)},
    "pin_accept": {"action": (_STR, True), "hash": (_OPT_STR, False)},
    "explain": {"caller": (_STR, True), "tool": (_STR, True), "kv": (_LIST, True)},
    # agents' server proposals: all of them, or those of one status; an operator's step on one (audited)
    "proposals": {"status": (_OPT_STR, True)},
    "proposal_decide": {"id": (_STR, True), "decision": (_STR, True), "reason": (_OPT_STR, False)},
}

MAX_STRING = 1024  # caller and tool names, reasons
#: the strings some ops may send longer than MAX_STRING: op -> key -> most characters
LONG_STRINGS: dict[str, dict[str, int]] = {"propose": {"why": 2000}}
MAX_KV = 256


def validate_request(obj: dict[str, Any], ops: dict[str, Schema], version: int = PROTOCOL_VERSION) -> str:
    """Check a request against the closed set; return its op."""
    if obj.get("v") != version or type(obj.get("v")) is not int:
        raise ProtocolError("unsupported protocol version")
    op = obj.get("op")
    if type(op) is not str or op not in ops:
        raise ProtocolError(f"unknown op {op!r}")
    spec = ops[op]
    for key in obj:
        if key not in spec and key not in ("v", "op"):
            raise ProtocolError(f"unexpected key {key!r} for op {op}")
    for key, (types, required) in spec.items():
        if key not in obj:
            if required:
                raise ProtocolError(f"missing key {key!r} for op {op}")
            continue
        value = obj[key]
        # bool is an int subclass; never accept it where a number is meant
        if type(value) not in types:
            raise ProtocolError(f"key {key!r} has the wrong type")
        if type(value) is str and len(value) > MAX_STRING and len(value) > LONG_STRINGS.get(op, {}).get(key, 0):
            raise ProtocolError(f"key {key!r} is too long")
    if "kv" in spec:
        kv = obj["kv"]
        if len(kv) > MAX_KV:
            raise ProtocolError("too many arguments")
        for pair in kv:
            if type(pair) is not list or len(pair) != 2 or type(pair[0]) is not str or type(pair[1]) is not str:
                raise ProtocolError("kv must be a list of [key, value] string pairs")
    return op


def request(op: str, **fields: Any) -> dict[str, Any]:
    """Build a request object."""
    fields["v"] = PROTOCOL_VERSION
    fields["op"] = op
    return fields


# --- the client ---------------------------------------------------------------

CONNECT_TIMEOUT = 5.0
#: the longest extra wait an approval frame may ask for
MAX_PENDING_WAIT = 7 * 86400


def connect(sock_path: str, broker_uid: int | None, timeout: float = CONNECT_TIMEOUT) -> Any:
    """A connected socket to the daemon whose server uid is checked (SO_PEERCRED).

    ``broker_uid``, when known, is the only non-root uid the socket's server
    may have; anyone else listening there is refused before a byte is sent.
    """
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(sock_path)
        except OSError as exc:
            raise Unavailable(f"broker unavailable: cannot connect to the broker ({exc.strerror or exc})") from None
        if broker_uid is not None:
            uid = peer_uid(sock)
            if uid not in (0, broker_uid):
                raise Unavailable(f"broker unavailable: {sock_path} is served by uid {uid}, not the broker")
    except BaseException:
        sock.close()
        raise
    return sock


def peer_uid(sock: Any) -> int:
    """The uid of the process at the other end of a connected Unix socket."""
    return peer_cred(sock)[1]


def peer_cred(sock: Any) -> tuple[int, int]:
    """The pid and uid of the process at the other end of a connected Unix socket (as the kernel saw it connect)."""
    cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(cred[0:4], sys.byteorder), int.from_bytes(cred[4:8], sys.byteorder)


def exchange(
    sock_path: str,
    message: dict[str, Any],
    wait: float,
    broker_uid: int | None,
    on_pending: Callable[[str], None] | None = None,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
) -> Answer:
    """Send one request to the daemon (gate.sock, or admin.sock for root) and return its answer.

    Interim ``pending`` frames (a call held for approval) go to ``on_pending``,
    ``progress`` frames (a call that asked for progress) to ``on_progress``.
    """
    try:
        frame = encode_frame(message, MAX_REQUEST_BYTES)
    except ProtocolError as exc:
        raise UsageError(f"request too large or malformed: {exc}") from None
    sock = connect(sock_path, broker_uid)
    try:
        sock.settimeout(wait)
        try:
            sock.sendall(frame)
            while True:
                header = recv_exact(sock, 4)
                answer = decode_payload(recv_exact(sock, frame_length(header, MAX_RESPONSE_BYTES)))
                report = answer.get("progress")
                if on_progress is not None and isinstance(report, dict) and len(answer) == 1:
                    on_progress(report)
                    continue
                pending = answer.get("pending")
                if pending is None or on_pending is None:
                    return answer  # type: ignore[return-value]  # checked by the caller
                # held for an operator's approval: say so, then wait as long as it may take
                on_pending(str(pending))
                extra = answer.get("wait")
                if isinstance(extra, (int, float)) and 0 <= extra <= MAX_PENDING_WAIT:
                    sock.settimeout(wait + float(extra))
        except TimeoutError:
            raise Unavailable(f"broker unavailable: no answer within {wait:g} s") from None
        except OSError as exc:
            raise Unavailable(f"broker unavailable: connection failed ({exc.strerror or exc})") from None
        except ProtocolError as exc:
            raise Unavailable(f"broker unavailable: {exc}") from None
    finally:
        sock.close()


def recv_exact(sock: Any, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(min(n, 1 << 20))
        if not chunk:
            raise ProtocolError("the broker closed the connection")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def admin_request(sock_path: str, broker_uid: int | None, op: str, timeout: float = 30.0, **fields: Any) -> Any:
    """One request over admin.sock (root only); the daemon's refusal becomes a PrivsepError."""
    answer = exchange(sock_path, request(op, **fields), timeout, broker_uid)
    if not answer.get("ok"):
        code = answer.get("exit")
        raise PrivsepError(str(answer.get("error")), code if type(code) is int else 1)
    return answer.get("result")
