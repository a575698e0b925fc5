"""A fake ``mcp-brokerd`` on a real Unix socket, for the gate and ``mcp stdio`` unit tests.

:class:`FakeDaemon` listens on a path (``gate.sock`` of a staged root) and
speaks the real frame protocol: each connection is served by its own
thread and stays open for as many requests as the client sends. It records
every frame it reads (``frames``, raw payloads, decodable or not), every
decoded request (``requests``) and the uid the kernel names as the peer of
each connection (``peer_uids``, SO_PEERCRED: what the real daemon names the
caller by, since protocol v2 requests carry no caller), counts connections
and requests in flight, and answers with ``answer``:

* a dict: that frame for every request;
* a callable ``answer(request)`` returning what to do with this request:

  - a dict: send it as one frame; the connection stays open;
  - a list of dicts: send them in order (an approval's interim ``pending``
    frame, then the answer);
  - bytes: send them as they are (garbage), then close the connection;
  - None: close the connection without answering (a dropped request).

``delay`` seconds are slept before each answer. With ``validate`` (the
default) a request must pass :func:`broker.core.wire.validate_request`
before it is recorded and answered; otherwise the connection is closed, as
the daemon does (so a request naming a ``caller`` or ``uid``, as the first
version's gate did, is refused: unexpected key). Without it every decoded
request is recorded, so a test can check what the client sent. :func:`by_op` answers like a daemon would.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any, Union

from broker.core import wire

#: what an answer function returns (see the module docstring)
Reply = Union[dict[str, Any], list[dict[str, Any]], bytes, None]  # noqa: UP007 - a runtime alias
Answer = Union[dict[str, Any], Callable[[dict[str, Any]], Reply]]  # noqa: UP007


def by_op(req: dict[str, Any], refuse: int | None = None) -> dict[str, Any]:
    """A daemon's answer to each op; with ``refuse``, every request but a report is refused with that code."""
    op = req.get("op")
    if op == "report":
        return {"ok": True, "result": None}
    if refuse is not None:
        return {"ok": False, "exit": refuse, "error": f"refused with {refuse}"}
    if op == "call":
        return {"ok": True, "result": {"is_error": False, "text": "called"}}
    if op == "describe":
        return {"ok": True, "result": {"name": req.get("tool"), "input_schema": {"type": "object"}}}
    if op == "list":
        return {"ok": True, "result": {"tools": [{"name": "demo.echo", "description": "echo"}]}}
    if op == "catalog":
        return {"ok": True, "result": {"tools": [{"name": "demo.echo"}]}}
    return {"ok": True, "result": {"broker": "up", "servers": [{"name": "demo", "state": "up", "reason": ""}]}}


class FakeDaemon:
    """A fake daemon on ``path``: one thread per connection, persistent connections, everything recorded."""

    def __init__(
        self,
        path: str,
        answer: Answer = by_op,
        *,
        validate: bool = True,
        delay: float = 0.0,
        backlog: int = 64,
    ) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path = path
        self.default_answer = answer
        self.answer: Answer = answer
        self.validate = validate
        self.delay = delay
        self.lock = threading.Lock()
        self.frames: list[bytes] = []
        self.requests: list[dict[str, Any]] = []
        self.peer_uids: list[int] = []
        self.connections = 0
        self.active = 0
        self.max_active = 0
        self.conns: list[socket.socket] = []
        self.stop = False
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(backlog)
        self.sock.settimeout(0.1)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    # --- what the tests read and set ------------------------------------------------------------

    def reset(self) -> None:
        """Forget what was recorded and go back to the answer given at construction."""
        with self.lock:
            self.frames.clear()
            self.requests.clear()
            self.peer_uids.clear()
            self.answer = self.default_answer

    def ops(self, op: str) -> list[dict[str, Any]]:
        """The requests of one op, in the order they arrived."""
        with self.lock:
            return [r for r in self.requests if r.get("op") == op]

    def calls(self, key: str = "text") -> list[str]:
        """The ``key`` argument of every ``call`` request (``"None"`` where it is absent)."""
        return [str((r.get("args") or {}).get(key)) for r in self.ops("call")]

    def close_all(self) -> None:
        """Shut every open connection down (what a daemon restart does to a client's idle connections)."""
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.stop = True
        self.close_all()
        self.thread.join(2)
        self.sock.close()

    # --- serving -------------------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            try:
                uid = wire.peer_uid(conn)
            except OSError:
                uid = -1
            with self.lock:
                self.connections += 1
                self.conns.append(conn)
                self.peer_uids.append(uid)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            while not self.stop:
                header = _exact(conn, 4)
                if header is None:
                    return
                payload = _exact(conn, wire.frame_length(header, wire.MAX_REQUEST_BYTES))
                if payload is None:
                    return
                with self.lock:
                    self.frames.append(payload)
                req = wire.decode_payload(payload)
                if self.validate:
                    wire.validate_request(req, wire.OPS)
                with self.lock:
                    self.requests.append(req)
                    self.active += 1
                    self.max_active = max(self.max_active, self.active)
                try:
                    if not self._reply(conn, req):
                        return
                finally:
                    with self.lock:
                        self.active -= 1
        except (OSError, ValueError, TypeError, wire.ProtocolError):
            return  # this connection only: every other one, and the listener, live on
        finally:
            with self.lock:
                if conn in self.conns:
                    self.conns.remove(conn)
            conn.close()

    def _reply(self, conn: socket.socket, req: dict[str, Any]) -> bool:
        """Answer one request; False closes the connection."""
        if self.delay:
            time.sleep(self.delay)
        answer = self.answer
        reply = answer if isinstance(answer, dict) else answer(req)
        if reply is None:
            return False
        if isinstance(reply, bytes):
            conn.sendall(reply)
            return False
        for frame in reply if isinstance(reply, list) else [reply]:
            conn.sendall(wire.encode_frame(frame))
        return True


def _exact(conn: socket.socket, n: int) -> bytes | None:
    """Exactly ``n`` bytes, or None when the peer closed first."""
    data = b""
    while len(data) < n:
        chunk = conn.recv(min(n - len(data), 1 << 20))
        if not chunk:
            return None
        data += chunk
    return data


def unframe(data: bytes, wait: float = 5.0) -> tuple[list[str], str | None]:
    """What the gate's ``read_frame`` makes of ``data`` arriving on a real pipe (the gate's stdin).

    A thread writes ``data`` and then closes the write end, so a frame larger
    than the pipe's buffer arrives in pieces, as it does from the shim.
    """
    from broker.gate.verbs import read_frame

    r, w = os.pipe()

    def feed() -> None:
        try:
            with contextlib.suppress(OSError):  # the reader stopped early (a refused frame): EPIPE
                _write_all(w, data)
        finally:
            os.close(w)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        return read_frame(r, wait)
    finally:
        os.close(r)  # a writer still blocked on a full pipe gets EPIPE and ends
        writer.join(5)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
