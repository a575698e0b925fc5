"""The one client of the broker's wire protocol: the gate, the stdio endpoint and the admin CLI use it.

``connect`` opens a socket to the daemon and checks, with SO_PEERCRED, that
the process serving it is the broker (or root) before a byte is sent;
``exchange`` sends one request and returns the answer, relaying interim
``pending`` frames (a call held for an operator's approval); ``admin_request``
is ``exchange`` on ``admin.sock`` with the daemon's refusal raised.

Standard library only, and only C modules (``_socket``): the gate imports
this on every call.
"""

from __future__ import annotations

import _socket
import sys

from broker.core import protocol
from broker.core.errors import PrivsepError, ProtocolError, Unavailable, UsageError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from broker.core.protocol import Answer

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
    cred = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)
    return int.from_bytes(cred[4:8], sys.byteorder)


def exchange(
    sock_path: str,
    message: dict[str, Any],
    wait: float,
    broker_uid: int | None,
    on_pending: Callable[[str], None] | None = None,
) -> Answer:
    """Send one request to the daemon (gate.sock, or admin.sock for root) and return its answer.

    Interim ``pending`` frames (a call held for approval) go to ``on_pending``.
    """
    try:
        frame = protocol.encode_frame(message, protocol.MAX_REQUEST_BYTES)
    except ProtocolError as exc:
        raise UsageError(f"request too large or malformed: {exc}") from None
    sock = connect(sock_path, broker_uid)
    try:
        sock.settimeout(wait)
        try:
            sock.sendall(frame)
            while True:
                header = recv_exact(sock, 4)
                answer = protocol.decode_payload(
                    recv_exact(sock, protocol.frame_length(header, protocol.MAX_RESPONSE_BYTES))
                )
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
    answer = exchange(sock_path, protocol.request(op, **fields), timeout, broker_uid)
    if not answer.get("ok"):
        code = answer.get("exit")
        raise PrivsepError(str(answer.get("error")), code if type(code) is int else 1)
    return answer.get("result")
