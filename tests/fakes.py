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

:func:`local_launch` is a test-only stand-in for the spawner, for the
stdio client's unit tests: it starts a server as a plain child of the test
process (the test's own user, no sandbox), on ``os.pipe()`` pipes wrapped by
:func:`broker.daemon.upstream.stdio.pipe_streams`, and :meth:`LocalProcess.kill`
SIGKILLs the child's process group and reaps it. The product never starts a
server this way: in the daemon, only the spawner does.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
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
        return {"ok": True, "result": {"isError": False, "text": "called"}}
    if op == "describe":
        return {"ok": True, "result": {"name": req.get("tool"), "inputSchema": {"type": "object"}}}
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


# --- a local stand-in for the spawner (unit tests of the stdio client only) ---------------------


class LocalProcess:
    """A server started by :class:`LocalLaunch`: the ``ServerProcess`` of ``broker.daemon.upstream.stdio``.

    Test-only. Its three pipes are owned by the streams (the child's ends are
    closed in the parent, so the child's exit is seen as EOF). It records
    what a test checks about how it was ended: ``kills`` (how many times
    :meth:`kill` was called), ``kill_times`` (``time.monotonic()`` at each
    call) and ``exited_before_kill`` (the child had already exited on its
    own when :meth:`kill` was first called).
    """

    def __init__(
        self,
        popen: subprocess.Popen[bytes],
        streams: tuple[asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamReader],
    ) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.stdin, self.stdout, self.stderr = streams
        self.kills = 0
        self.kill_times: list[float] = []
        self.exited_before_kill: bool | None = None

    def exited(self) -> bool:
        """Whether the child has exited (without reaping it: its pid stays ours until :meth:`kill`)."""
        if self.popen.returncode is not None:
            return True
        try:
            info = os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return True
        return info is not None

    async def kill(self, reap_within: float = 5.0) -> None:
        """SIGKILL the child's whole process group, then reap the child, polling (the loop is never blocked)."""
        self.kills += 1
        self.kill_times.append(time.monotonic())
        if self.exited_before_kill is None:
            self.exited_before_kill = self.exited()
        if self.popen.returncode is None:  # not reaped yet, so the group id cannot have been reused
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        deadline = time.monotonic() + reap_within
        while self.popen.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)


class LocalLaunch:
    """A ``Launch`` that starts ``command args`` as a local child (test-only: see :func:`local_launch`).

    Every process it started is in ``processes`` (the newest last), so a test
    can check one after the client has let go of it.
    """

    def __init__(self, command: str, args: list[str], env: dict[str, str], cwd: str | None) -> None:
        self.command = command
        self.args = list(args)
        self.env = dict(env)
        self.cwd = cwd
        self.processes: list[LocalProcess] = []

    async def __call__(self) -> LocalProcess:
        from broker.daemon.upstream.stdio import pipe_streams

        pipes = [os.pipe() for _ in range(3)]  # (read, write) each; not inheritable until dup2'd onto 0, 1, 2
        (in_r, in_w), (out_r, out_w), (err_r, err_w) = pipes
        child_ends, our_ends = (in_r, out_w, err_w), (in_w, out_r, err_r)
        try:
            popen = subprocess.Popen(
                [self.command, *self.args],
                stdin=in_r,
                stdout=out_w,
                stderr=err_w,
                env=self.env,
                cwd=self.cwd,
                close_fds=True,
                start_new_session=True,  # a process group of its own, for kill()
            )
        except BaseException:
            for fd in (*child_ends, *our_ends):
                os.close(fd)
            raise
        for fd in child_ends:  # the child's now; kept here, its exit would never read as EOF
            os.close(fd)
        try:
            streams = await pipe_streams(*our_ends)
        except BaseException:
            for fd in our_ends:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()
            raise
        proc = LocalProcess(popen, streams)
        self.processes.append(proc)
        return proc


def local_launch(command: str, args: list[str], env: dict[str, str], cwd: str | None) -> LocalLaunch:
    """A test-only ``Launch``: each call starts ``command args`` with exactly ``env``, in ``cwd``.

    What the spawner does for the daemon, minus everything that makes it
    safe (no other user, no sandbox): for unit tests of the stdio client only.
    """
    return LocalLaunch(command, args, env, cwd)
