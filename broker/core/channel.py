"""The daemon <-> spawner channel: one socketpair, a closed set of requests, descriptors passed with answers.

The daemon (``mcp-broker``) asks; the spawner (root) answers each request
in order, with the same op. Frames are the gate protocol's (a 4-byte length
and one JSON object, size-capped both ways); an answer to ``start`` carries
the server's stdin, stdout and stderr as SCM_RIGHTS descriptors on its
first byte. Requests name a configured server (and, for a per-caller
instance, the agent) and nothing else: no command, path, user or
environment ever crosses this channel towards root, so a daemon taken over
can start only what root's configuration defines, only as it defines it.

For the spawner, a request outside :data:`REQUESTS` (an unknown op, a key
it does not take, a wrong type, an oversized or malformed frame) is fatal,
as in OpenSSH's monitor: it stops every server and exits. For the daemon,
an answer whose op or shape is not what it asked for is fatal to the
channel (:func:`check_answer`).
"""

from __future__ import annotations

import os
import socket
from typing import Any

from broker.core import wire
from broker.core.errors import ProtocolError

VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 16 * 1024 * 1024
#: a start answer's descriptors: the server's stdin (write end), stdout and stderr (read ends)
START_FDS = 3

_STR = (str,)
_OPT_STR = (str, type(None))
_DICT = (dict,)
_LIST = (list,)
_INT = (int,)
_BOOL = (bool,)

#: op -> {key: (allowed types, required)}; "v" and "op" are always required
REQUESTS: dict[str, wire.Schema] = {
    # what the host provides (Landlock ABI, namespaces), once at start-up
    "hello": {},
    # (re)read the server definitions and the agents map: which instances exist, which cannot run and why
    "load": {},
    # the secret values the daemon must redact, and an HTTP server's url and headers with them filled in
    "secrets": {"server": (_STR, True)},
    # start one configured instance under its own user and sandbox; its pipes come back as descriptors
    "start": {"server": (_STR, True), "agent": (_OPT_STR, True)},
    # stop it: its whole process tree, whatever it forked
    "stop": {"server": (_STR, True), "agent": (_OPT_STR, True)},
}

#: op -> {key: types} of a successful answer (besides "op" and "ok")
ANSWERS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"version": _INT, "host": _DICT},
    "load": {"instances": _DICT, "problems": _LIST},
    "secrets": {"redact": _DICT, "url": _OPT_STR, "headers": _DICT, "fingerprint": _STR},
    "start": {"pid": _INT, "user": _STR, "protections": _DICT, "warnings": _LIST},
    "stop": {"stopped": _BOOL},
}


def request(op: str, **fields: Any) -> dict[str, Any]:
    return {"v": VERSION, "op": op, **fields}


def check_request(obj: dict[str, Any]) -> str:
    """The op of a well-formed request; ProtocolError otherwise."""
    return wire.validate_request(obj, REQUESTS, VERSION)


def check_answer(op: str, obj: dict[str, Any], fds: list[int]) -> dict[str, Any]:
    """An answer to ``op``, checked (OpenSSH's ``monitor_wrap``): its op, its keys' types, its descriptors."""
    if obj.get("op") != op or type(obj.get("ok")) is not bool:
        raise ProtocolError(f"the spawner answered {str(obj.get('op'))[:40]!r} to {op}")
    if not obj["ok"]:
        if type(obj.get("error")) is not str or fds:
            raise ProtocolError(f"malformed refusal from the spawner to {op}")
        return obj
    for key, types in ANSWERS[op].items():
        if type(obj.get(key)) not in types:
            raise ProtocolError(f"the spawner's answer to {op} has a bad {key!r}")
    if len(fds) != (START_FDS if op == "start" else 0):
        raise ProtocolError(f"the spawner's answer to {op} came with {len(fds)} descriptors")
    return obj


def send(sock: socket.socket, obj: dict[str, Any], limit: int, fds: list[int] | tuple[int, ...] = ()) -> None:
    """One frame, with ``fds`` attached to its first byte."""
    frame = wire.encode_frame(obj, limit)
    sent = socket.send_fds(sock, [frame], list(fds)) if fds else sock.send(frame)
    if sent < len(frame):
        sock.sendall(frame[sent:])


def recv(sock: socket.socket, limit: int, max_fds: int = 0) -> tuple[dict[str, Any] | None, list[int]]:
    """One frame and the descriptors that came with it; (None, []) at a clean end of the channel.

    A frame over ``limit``, a truncated one, descriptors beyond ``max_fds``
    (closed, never used) or malformed JSON: ProtocolError.
    """
    fds: list[int] = []
    header = b""
    try:
        while len(header) < 4:
            if not header and max_fds:
                chunk, got, flags, _addr = socket.recv_fds(sock, 4, max_fds)
                fds.extend(got)
                for fd in got:  # no child the receiver starts may inherit a server's pipe
                    os.set_inheritable(fd, False)
                if flags & socket.MSG_CTRUNC:
                    raise ProtocolError("descriptors were cut off")
            else:
                chunk = sock.recv(4 - len(header))
            if not chunk:
                if header:
                    raise ProtocolError("the channel closed inside a frame")
                return None, []
            header += chunk
        n = wire.frame_length(header, limit)
        payload = wire.recv_exact(sock, n)
        return wire.decode_payload(payload), fds
    except BaseException:
        close_all(fds)
        raise


def close_all(fds: list[int]) -> None:
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
