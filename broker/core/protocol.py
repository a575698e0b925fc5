"""The gate <-> daemon protocol: size-capped, length-prefixed JSON frames.

A frame is a 4-byte big-endian length followed by that many bytes of UTF-8
JSON holding one object. Requests come from a closed set (``OPS`` on
``gate.sock``, ``ADMIN_OPS`` on ``admin.sock``); each op has a closed set of
keys with fixed types. Anything else, an oversized frame, or malformed JSON
is a protocol violation: the daemon closes the connection (OpenSSH's
monitor rule). JSON goes through :mod:`broker.core.codec`.
"""

from __future__ import annotations

from broker.core.codec import dumps, loads, sanitize, to_utf8
from broker.core.errors import ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; the gate never needs it: names for the type checker only
    from typing import Any, TypedDict

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


#: 2: the caller is the peer's uid, no longer a field of the request
PROTOCOL_VERSION = 2
MAX_REQUEST_BYTES = 2 * 1024 * 1024
MAX_RESPONSE_BYTES = 64 * 1024 * 1024


# --- frames -----------------------------------------------------------------


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
    },
    "status": {},
    # mcp stdio: the allowed tools with their full pinned definitions
    "catalog": {},
    # the gate's own refusals, forwarded so the daemon can audit them (they count only against their caller)
    "report": {
        "verb": (_STR, True),
        "tool": (_STR, True),
        "exit": (_INT, True),
        "reason": (_STR, True),
    },
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
    "pin_accept": {"action": (_STR, True)},
    "explain": {"caller": (_STR, True), "tool": (_STR, True), "kv": (_LIST, True)},
}

MAX_STRING = 1024  # caller and tool names, reasons
MAX_KV = 256


def validate_request(obj: dict[str, Any], ops: dict[str, Schema]) -> str:
    """Check a request against the closed set; return its op."""
    if obj.get("v") != PROTOCOL_VERSION or type(obj.get("v")) is not int:
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
        if type(value) is str and len(value) > MAX_STRING:
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
