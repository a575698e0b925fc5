"""``mcp stdio``: the gate as an MCP server on stdin/stdout, one sudo per session.

Any MCP client can launch ``{"command": "mcp", "args": ["stdio"]}``. The
session speaks newline-delimited JSON-RPC (the MCP stdio transport) in both
protocol eras: the handshake era (``initialize``, then requests; ``ping``)
and the stateless 2026-07-28 revision, where each request carries its
version and capabilities in ``_meta`` and ``server/discover`` replaces the
handshake (a version it does not serve gets -32022 with the ones it does).
It answers a closed set of methods: ``tools/list`` (exactly the caller's
allowed tools, with their pinned definitions) and ``tools/call`` (forwarded
through the daemon with every policy and audit rule of ``mcp call``);
everything else is refused with "method not found". A call with
``_meta.progressToken`` gets the server's ``notifications/progress`` under
that token; ``notifications/cancelled`` closes the call's connection, so
the daemon cancels it at its server and it is never answered; the ``_meta``
key ``mcp-privsep/timeout`` asks for a longer timeout (up to the daemon's
``max_call_timeout``). While the session is open (or a 2026-07-28 client
listens on ``subscriptions/listen``), one ``watch`` connection carries the
daemon's word that the caller's tool list changed (the allowlist, a server
up or down or changing its own list, a pin), and the client gets
``notifications/tools/list_changed``; without that connection (a daemon
restarting) the gate's own look at the allowlist, once a second, says so.

One thread, one ``select`` loop: requests are forwarded over up to
``MAX_IN_FLIGHT`` persistent ``gate.sock`` connections, each carrying one
request at a time, so a client that pipelines calls gets them served side by
side without a connection, a thread or a peer-credential check per call.
While every connection is busy the gate stops reading stdin (back-pressure,
no unbounded queue). A connection that breaks fails only the request it was
carrying; a request is re-sent on a fresh connection only when the daemon
provably never read it (the send itself failed), so no call runs twice.

Standard library only; imported by the gate for this verb alone.
"""

from __future__ import annotations

import errno
import os
import select
import time
from collections import deque

from broker import __version__
from broker.core import allowlist, names, wire
from broker.core.errors import EX_DATAERR, EX_SOFTWARE, EX_UNAVAILABLE, ConfigError, Denied, PrivsepError, ProtocolError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any, BinaryIO, TextIO

    from broker.core.paths import Paths

HANDSHAKE_VERSIONS = ("2024-11-05", "2025-03-26", "2025-06-18", "2025-11-25")
#: revisions of the stateless era: no handshake, every request says its version in ``_meta``
MODERN_VERSIONS = ("2026-07-28",)
PROTOCOL_VERSION_META = "io.modelcontextprotocol/protocolVersion"
CLIENT_CAPABILITIES_META = "io.modelcontextprotocol/clientCapabilities"
SERVER_INFO_META = "io.modelcontextprotocol/serverInfo"
SUBSCRIPTION_ID_META = "io.modelcontextprotocol/subscriptionId"
MAX_LISTENS = 16
UNSUPPORTED_PROTOCOL_VERSION = -32022
#: ``tools/call`` ``_meta`` key: seconds the call may take (the daemon caps it at max_call_timeout)
TIMEOUT_META = "mcp-privsep/timeout"
MAX_TIMEOUT = 7 * 86400
MAX_LINE = 4 * 1024 * 1024
MAX_IN_FLIGHT = 16
POLL_SECONDS = 1.0
#: how long the gate waits for the daemon's answer; the daemon's own call timeout answers first
CALL_WAIT = 900.0
LIST_WAIT = 60.0
REPORT_WAIT = 5.0
SEND_TIMEOUT = 30.0
#: seconds before a watch connection the daemon closed is opened again
WATCH_RETRY = 5.0

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
INSTRUCTIONS = (
    "Tools brokered by mcp-privsep: each call is checked against an allowlist and policy and "
    "audited; credentials stay with the broker."
)

_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ECONNREFUSED)


class _Job:
    """One request for the daemon: a call, the catalog for tools/list, or a refusal report."""

    __slots__ = ("frame", "kind", "msg_id", "progress", "wait")

    def __init__(self, kind: str, msg_id: Any, frame: bytes, wait: float, progress: Any = None) -> None:
        self.kind = kind
        self.msg_id = msg_id
        self.frame = frame
        self.wait = wait
        #: the client's progress token, when it asked for progress
        self.progress = progress


class _Link:
    """One persistent gate.sock connection; it carries one job at a time."""

    __slots__ = ("buf", "deadline", "fd", "job", "sock")

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self.fd: int = sock.fileno()
        self.buf = b""
        self.job: _Job | None = None
        self.deadline = 0.0

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


class Session:
    """One stdio session for one caller."""

    def __init__(
        self,
        paths: Paths,
        user: str,
        connect: Callable[[], Any],
        out: BinaryIO,
        err: TextIO,
    ) -> None:
        self.paths = paths
        self.user = user
        self.connect = connect
        self.out = out
        self.err = err
        self.initialized = False
        self.idle: list[_Link] = []
        self.busy: dict[int, _Link] = {}
        self.backlog: deque[_Job] = deque()
        self._out: list[bytes] = []
        #: ids of requests in flight that came in the stateless era (their results say ``resultType``)
        self._modern: set[Any] = set()
        #: open ``subscriptions/listen`` streams (2026-07-28) that asked for tools/list_changed, by request id
        self.listens: set[Any] = set()
        #: the ``watch`` connection: the daemon's word that the caller's tool list changed
        self.watcher: _Link | None = None
        self.watch_retry = 0.0
        self.allowlists = allowlist.Cache(paths.allowlist, paths.allowlist_d)
        self.allowlist_key = self._allowlist_key()

    # --- output ---------------------------------------------------------------

    def send(self, message: dict[str, Any]) -> None:
        """Queue one message; :meth:`flush` writes everything queued at once."""
        self._out.append((wire.dumps(message) + "\n").encode("utf-8", "replace"))

    def flush(self) -> None:
        if self._out:
            data = b"".join(self._out)
            self._out.clear()
            self.out.write(data)
            self.out.flush()

    def reply(self, msg_id: Any, result: dict[str, Any]) -> None:
        if msg_id in self._modern:
            self._modern.discard(msg_id)
            result = {**result, "resultType": "complete"}
        self.send({"jsonrpc": "2.0", "id": msg_id, "result": result})

    def error(self, msg_id: Any, code: int, message: str, data: Any = None) -> None:
        self._modern.discard(msg_id)
        error: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        self.send({"jsonrpc": "2.0", "id": msg_id, "error": error})

    # --- the allowlist ----------------------------------------------------------

    def _allowlist_key(self) -> bytes | None:
        try:
            data, path, _st = allowlist.locate(self.paths.allowlist, self.paths.allowlist_d, self.user)
        except PrivsepError:
            return None
        return path.encode() + b"\0" + data

    def poll_allowlist(self) -> None:
        key = self._allowlist_key()
        if key != self.allowlist_key:
            self.allowlist_key = key
            if self.watcher is None:  # with a watch open, the daemon says so (it sees the allowlist too)
                self.notify_changed()

    def notify_changed(self) -> None:
        """Tell the client its tool list changed: in its session, and on every listen stream that asked."""
        if self.initialized:
            self.send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed"})
        for listen in sorted(self.listens, key=str):
            params = {"_meta": {SUBSCRIPTION_ID_META: listen}}
            self.send({"jsonrpc": "2.0", "method": "notifications/tools/list_changed", "params": params})

    # --- the daemon's change feed (servers up or down, pins, a server's own list change) -----------

    def ensure_watch(self, now: float) -> None:
        """Hold a ``watch`` connection open while someone listens (a session, or a listen stream)."""
        if self.watcher is not None or not (self.initialized or self.listens) or now < self.watch_retry:
            return
        try:
            link = _Link(self.connect())
            link.sock.settimeout(SEND_TIMEOUT)
            link.sock.sendall(wire.encode_frame(wire.request("watch"), wire.MAX_REQUEST_BYTES))
            link.sock.setblocking(False)
        except (OSError, PrivsepError):
            self.watch_retry = now + WATCH_RETRY
            return
        self.watcher = link

    def on_watch_readable(self) -> None:
        link = self.watcher
        assert link is not None
        try:
            chunk = link.sock.recv(1 << 16)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        if not chunk:  # the daemon restarted, or refused: the allowlist poll covers until it is back
            link.close()
            self.watcher = None
            self.watch_retry = time.monotonic() + WATCH_RETRY
            return
        link.buf += chunk
        while len(link.buf) >= 4:
            try:
                n = wire.frame_length(link.buf[:4], wire.MAX_RESPONSE_BYTES)
            except ProtocolError:
                link.buf = b""
                return
            if len(link.buf) < 4 + n:
                return
            payload, link.buf = link.buf[4 : 4 + n], link.buf[4 + n :]
            try:
                frame = wire.decode_payload(payload)
            except ProtocolError:
                continue
            if frame == {"changed": True}:
                self.notify_changed()

    def check(self, tool: str | None) -> None:
        """The gate's own check on each request: a stat-keyed cache of the full, fail-closed read."""
        allowed = self.allowlists.get(self.user)  # raises ConfigError on a broken file
        if tool is not None and not allowed.allows(tool):
            raise Denied(f"denied: {tool} is not in the allowlist for {self.user}")

    # --- requests -------------------------------------------------------------

    def handle_line(self, line: bytes) -> None:
        """Answer one line; whatever it holds, the session and every call in flight go on."""
        try:
            self._handle_line(line)
        except Exception as exc:  # noqa: BLE001 - one bad line must never end the session
            self.error(None, INTERNAL_ERROR, f"internal error on this message: {type(exc).__name__}")

    def _handle_line(self, line: bytes) -> None:
        try:
            msg = wire.loads(line.decode("utf-8"), out_of_range="mark")
        except (UnicodeDecodeError, ValueError):
            self.error(None, PARSE_ERROR, "parse error")
            return
        if not isinstance(msg, dict) or msg.get("jsonrpc") != "2.0":
            msg_id = msg.get("id") if isinstance(msg, dict) else None
            self.error(msg_id if type(msg_id) in (int, str) else None, INVALID_REQUEST, "invalid request")
            return
        method = msg.get("method")
        if not isinstance(method, str):
            return  # a response to a request we never send: ignore
        msg_id = msg.get("id")
        params = msg.get("params")
        if params is None:
            params = {}
        if "id" not in msg:
            if method == "notifications/cancelled" and isinstance(params, dict):
                self.cancel(params.get("requestId"))
            return  # notifications need no answer (initialized, and cancelled: the request is never answered)
        if type(msg_id) not in (int, str) or not isinstance(params, dict):
            self.error(msg_id if type(msg_id) in (int, str) else None, INVALID_REQUEST, "invalid request")
            return
        if wire.contains(params, wire.OUT_OF_RANGE):
            why = "arguments rejected: a number exceeds a double's range"
            if method == "tools/call":
                self.reply(msg_id, _refusal(why, EX_DATAERR))
            else:
                self.error(msg_id, INVALID_PARAMS, why)
            return
        meta = params.get("_meta")
        if method != "initialize" and isinstance(meta, dict) and PROTOCOL_VERSION_META in meta:
            # the stateless era (2026-07-28): this request carries its own version; no handshake is needed
            if not self._modern_envelope(msg_id, meta):
                return
            if method == "server/discover":
                self.reply(msg_id, self.discover())
                return
            if method == "subscriptions/listen":
                self.listen(msg_id, params)
                return
            if method not in ("tools/list", "tools/call"):  # ping and the rest are gone from that era
                self.error(msg_id, METHOD_NOT_FOUND, f"method not found: {method[:100]}")
                return
            self._modern.add(msg_id)
        if method == "initialize":
            self.initialize(msg_id, params)
        elif method == "ping":
            self.reply(msg_id, {})
        elif method == "tools/list":
            self.tools_list(msg_id)
        elif method == "tools/call":
            self.call(msg_id, params)
        else:
            self.error(msg_id, METHOD_NOT_FOUND, f"method not found: {method[:100]}")

    def _modern_envelope(self, msg_id: Any, meta: dict[str, Any]) -> bool:
        """Whether a stateless-era request's envelope is one this session serves; else it is answered."""
        version = meta.get(PROTOCOL_VERSION_META)
        if not isinstance(version, str) or not isinstance(meta.get(CLIENT_CAPABILITIES_META), dict):
            why = (
                f"params._meta needs {PROTOCOL_VERSION_META!r} (a string) and {CLIENT_CAPABILITIES_META!r} (an object)"
            )
            self.error(msg_id, INVALID_PARAMS, why)
            return False
        if version not in MODERN_VERSIONS:
            data = {"supported": list(MODERN_VERSIONS), "requested": version[:100]}
            self.error(msg_id, UNSUPPORTED_PROTOCOL_VERSION, "Unsupported protocol version", data)
            return False
        return True

    def listen(self, msg_id: Any, params: dict[str, Any]) -> None:
        """``subscriptions/listen`` (2026-07-28): a stream left open; of its filter, toolsListChanged is honoured."""
        wanted = params.get("notifications")
        if not isinstance(wanted, dict):
            self.error(msg_id, INVALID_PARAMS, "subscriptions/listen needs params.notifications (an object)")
            return
        if msg_id in self.listens or len(self.listens) >= MAX_LISTENS:
            self.error(msg_id, INVALID_REQUEST, f"at most {MAX_LISTENS} listen streams, each with its own id")
            return
        honored = {"toolsListChanged": True} if wanted.get("toolsListChanged") is True else {}
        if honored:
            self.listens.add(msg_id)
        ack = {"notifications": honored, "_meta": {SUBSCRIPTION_ID_META: msg_id}}
        self.send({"jsonrpc": "2.0", "method": "notifications/subscriptions/acknowledged", "params": ack})
        if not honored:  # nothing it could be told: the stream ends at once
            self.reply(msg_id, {"resultType": "complete", "_meta": {SUBSCRIPTION_ID_META: msg_id}})

    def discover(self) -> dict[str, Any]:
        """``server/discover`` (2026-07-28): what ``initialize`` says in the handshake era, without a session."""
        return {
            "supportedVersions": list(MODERN_VERSIONS),
            "capabilities": {"tools": {"listChanged": True}},
            "instructions": INSTRUCTIONS,
            "ttlMs": 0,
            "cacheScope": "private",
            "resultType": "complete",
            "_meta": {SERVER_INFO_META: {"name": "mcp-privsep", "version": __version__}},
        }

    def initialize(self, msg_id: Any, params: dict[str, Any]) -> None:
        requested = params.get("protocolVersion")
        version = requested if requested in HANDSHAKE_VERSIONS else HANDSHAKE_VERSIONS[-1]
        self.initialized = True
        self.reply(
            msg_id,
            {
                "protocolVersion": version,
                "capabilities": {"tools": {"listChanged": True}},
                "serverInfo": {"name": "mcp-privsep", "version": __version__},
                "instructions": INSTRUCTIONS,
            },
        )

    def tools_list(self, msg_id: Any) -> None:
        try:
            self.check(None)
        except PrivsepError as exc:
            self.error(msg_id, INTERNAL_ERROR, str(exc))
            return
        message = wire.request("catalog")
        self.submit(_Job("list", msg_id, wire.encode_frame(message, wire.MAX_REQUEST_BYTES), LIST_WAIT))

    def call(self, msg_id: Any, params: dict[str, Any]) -> None:
        name = params.get("name")
        args = params.get("arguments")
        if args is None:
            args = {}
        if not isinstance(name, str) or names.action_error(name) is not None:
            self.error(msg_id, INVALID_PARAMS, "tools/call needs a tool name of the form server.tool")
            return
        if not isinstance(args, dict):
            self.error(msg_id, INVALID_PARAMS, "tools/call arguments must be an object")
            return
        try:
            self.check(name)
        except (Denied, ConfigError) as exc:
            self.reply(msg_id, _refusal(str(exc), exc.exit_code))
            self.report(name, exc)
            return
        meta = params.get("_meta")
        meta = meta if isinstance(meta, dict) else {}
        timeout = meta.get(TIMEOUT_META)
        if timeout is not None and (type(timeout) not in (int, float) or not 0 < timeout <= MAX_TIMEOUT):
            self.error(msg_id, INVALID_PARAMS, f"_meta.{TIMEOUT_META} must be a number of seconds, more than 0")
            return
        token = meta.get("progressToken")
        if token is not None and type(token) not in (int, str):
            self.error(msg_id, INVALID_PARAMS, "_meta.progressToken must be a string or an integer")
            return
        fields: dict[str, Any] = {"tool": name, "kv": [], "args": args, "timeout": timeout}
        if token is not None:
            fields["progress"] = True
        try:
            frame = wire.encode_frame(wire.request("call", **fields), wire.MAX_REQUEST_BYTES)
        except ProtocolError as exc:
            self.reply(msg_id, _refusal(f"request too large or malformed: {exc}", 64))
            return
        self.submit(_Job("call", msg_id, frame, CALL_WAIT, token))

    def cancel(self, msg_id: Any) -> None:
        """The client gave up on a call (its link is closed: the daemon cancels it at its server) or a listen."""
        if type(msg_id) not in (int, str):
            return
        if msg_id in self.listens:
            self.listens.discard(msg_id)
            return
        for job in list(self.backlog):
            if job.kind == "call" and job.msg_id == msg_id:
                self.backlog.remove(job)  # never sent: nothing ran
                return
        for link in list(self.busy.values()):
            if link.job is not None and link.job.kind == "call" and link.job.msg_id == msg_id:
                del self.busy[link.fd]
                link.job = None
                link.close()
                return

    def report(self, tool: str, exc: PrivsepError) -> None:
        """Let the daemon audit a refusal the gate made itself (its answer is not awaited)."""
        message = wire.request(
            "report",
            verb="stdio",
            tool=tool,
            exit=exc.exit_code,
            reason=str(exc)[:1000],
        )
        self.submit(_Job("report", None, wire.encode_frame(message, wire.MAX_REQUEST_BYTES), REPORT_WAIT))

    # --- the links to the daemon ----------------------------------------------------

    @property
    def full(self) -> bool:
        return len(self.busy) >= MAX_IN_FLIGHT

    def submit(self, job: _Job) -> None:
        if self.full or self.backlog:
            self.backlog.append(job)
            return
        self._start(job)

    def drain_backlog(self) -> None:
        while self.backlog and not self.full:
            self._start(self.backlog.popleft())

    def _start(self, job: _Job) -> None:
        """Send ``job`` on an idle link (or a new one); a send refused by a stale link is retried once."""
        for _attempt in range(2):
            try:
                link = self._link()
            except PrivsepError as exc:
                self.finish_failed(job, exc.message, exc.exit_code)
                return
            try:
                link.sock.settimeout(SEND_TIMEOUT)
                link.sock.sendall(job.frame)
            except OSError as exc:
                link.close()
                # EPIPE/ECONNRESET on a reused link: the daemon closed it before reading; safe to resend
                if exc.errno in _GONE:
                    continue
                self.finish_failed(job, f"broker unavailable: connection failed ({exc.strerror or exc})")
                return
            link.job = job
            link.deadline = time.monotonic() + job.wait
            self.busy[link.fd] = link
            return
        self.finish_failed(job, "broker unavailable: the broker keeps closing the connection")

    def _link(self) -> _Link:
        while self.idle:
            link = self.idle.pop()
            # an idle link that is readable was closed by the daemon (a restart): never reuse it
            ready, _, _ = select.select([link.fd], [], [], 0)
            if not ready:
                return link
            link.close()
        return _Link(self.connect())

    def on_readable(self, link: _Link) -> None:
        try:
            chunk = link.sock.recv(1 << 20)
        except OSError as exc:
            self._drop(link, f"broker unavailable: connection failed ({exc.strerror or exc})")
            return
        if not chunk:
            self._drop(link, "broker unavailable: the broker closed the connection")
            return
        link.buf += chunk
        while len(link.buf) >= 4 and link.job is not None:
            try:
                n = wire.frame_length(link.buf[:4], wire.MAX_RESPONSE_BYTES)
            except ProtocolError as exc:
                self._drop(link, f"broker unavailable: {exc}")
                return
            if len(link.buf) < 4 + n:
                return
            payload, link.buf = link.buf[4 : 4 + n], link.buf[4 + n :]
            try:
                answer = wire.decode_payload(payload)
            except ProtocolError as exc:
                self._drop(link, f"broker unavailable: {exc}")
                return
            report = answer.get("progress")
            if isinstance(report, dict) and set(answer) == {"progress"}:
                if link.job.progress is not None:
                    self.send(_progress(link.job.progress, report))
                continue
            pending = answer.get("pending")
            if pending is not None:
                # held for an operator's approval: say so on stderr, then wait as long as it may take
                self.err.write(f"mcp: pending approval {pending}, waiting\n")
                self.err.flush()
                extra = answer.get("wait")
                if isinstance(extra, (int, float)) and 0 <= extra <= 7 * 86400:
                    link.deadline = time.monotonic() + link.job.wait + float(extra)
                continue
            job, link.job = link.job, None
            del self.busy[link.fd]
            if link.buf:  # more than one answer to one request: the link is not trusted again
                link.close()
            else:
                self.idle.append(link)
            self.finish(job, answer)

    def _drop(self, link: _Link, message: str) -> None:
        self.busy.pop(link.fd, None)
        link.close()
        if link.job is not None:
            job, link.job = link.job, None
            self.finish_failed(job, message)

    def expire(self, now: float) -> None:
        for link in [lk for lk in self.busy.values() if lk.deadline <= now]:
            wait = link.job.wait if link.job is not None else 0.0
            self._drop(link, f"broker unavailable: no answer within {wait:g} s")

    def next_deadline(self) -> float | None:
        return min((lk.deadline for lk in self.busy.values()), default=None)

    # --- answers ----------------------------------------------------------------------

    def finish_failed(self, job: _Job, message: str, exit_code: int = EX_UNAVAILABLE) -> None:
        self.finish(job, {"ok": False, "exit": exit_code, "error": message})

    def finish(self, job: _Job, answer: dict[str, Any]) -> None:
        if job.kind == "report":
            return
        if job.kind == "list":
            if not answer.get("ok"):
                self.error(job.msg_id, INTERNAL_ERROR, str(answer.get("error", "the broker refused")))
                return
            result = answer.get("result")
            tools = result.get("tools", []) if isinstance(result, dict) else []
            listed: dict[str, Any] = {"tools": tools}
            if job.msg_id in self._modern:  # a cacheable result in that era: never cached (the allowlist may change)
                listed.update(ttlMs=0, cacheScope="private")
            self.reply(job.msg_id, listed)
            return
        if not answer.get("ok"):
            rpc = answer.get("rpc_error")
            if isinstance(rpc, dict) and type(rpc.get("code")) is int:  # the server's own JSON-RPC error, relayed
                self.error(job.msg_id, rpc["code"], str(rpc.get("message", "")))
                return
            code = answer.get("exit")
            self.reply(
                job.msg_id,
                _refusal(str(answer.get("error", "the broker refused")), code if type(code) is int else EX_SOFTWARE),
            )
            return
        result = wire.call_result(answer.get("result"))
        if result is None:
            self.error(job.msg_id, INTERNAL_ERROR, "malformed answer from the broker")
            return
        self.reply(job.msg_id, result)

    def close(self) -> None:
        for link in [*self.idle, *self.busy.values(), *([self.watcher] if self.watcher else [])]:
            link.close()
        self.watcher = None
        self.idle.clear()
        self.busy.clear()


def _refusal(message: str, exit_code: int) -> dict[str, Any]:
    """A refusal the model can read: a tool result with isError, saying why."""
    text = " ".join(message.split())
    return {
        "content": [{"type": "text", "text": f"mcp-privsep refused the call (exit {exit_code}): {text}"}],
        "isError": True,
    }


def _progress(token: Any, report: dict[str, Any]) -> dict[str, Any]:
    """``notifications/progress`` for the client's own token, from the daemon's checked report."""
    params: dict[str, Any] = {"progressToken": token}
    for key, kinds in (("progress", (int, float)), ("total", (int, float)), ("message", (str,))):
        if type(report.get(key)) in kinds:
            params[key] = report[key]
    return {"jsonrpc": "2.0", "method": "notifications/progress", "params": params}


def serve(session: Session, fd: int = 0) -> int:
    """Read JSON-RPC lines from ``fd`` until EOF and every answer is out; return the exit code."""
    buf = b""
    eof = False
    skipping = False
    last_poll = time.monotonic()
    try:
        while not (eof and not session.busy and not session.backlog):
            watch = list(session.busy)
            if session.watcher is not None:
                watch.append(session.watcher.fd)
            reading = not eof and not session.full and not session.backlog
            if reading:
                watch.append(fd)
            now = time.monotonic()
            timeout = POLL_SECONDS
            deadline = session.next_deadline()
            if deadline is not None:
                timeout = max(0.0, min(timeout, deadline - now))
            try:
                ready, _, _ = select.select(watch, [], [], timeout)
            except InterruptedError:
                continue
            now = time.monotonic()
            # at most once a second, busy or idle: edits are noticed without re-reading per message
            if now - last_poll >= POLL_SECONDS:
                session.poll_allowlist()
                session.ensure_watch(now)
                last_poll = now
            for ready_fd in ready:
                if ready_fd == fd:
                    continue
                if session.watcher is not None and ready_fd == session.watcher.fd:
                    session.on_watch_readable()
                    continue
                link = session.busy.get(ready_fd)
                if link is not None:
                    session.on_readable(link)
            session.expire(now)
            session.drain_backlog()
            if reading and fd in ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    eof = True
                    if buf.strip() and not skipping:
                        session.handle_line(buf)
                    buf = b""
                else:
                    buf += chunk
                    start = 0
                    while True:
                        nl = buf.find(b"\n", start)
                        if nl < 0:
                            break
                        line = buf[start:nl]
                        start = nl + 1
                        if skipping:  # the end of a line too long to read: dropped, already answered
                            skipping = False
                        elif line.strip():
                            session.handle_line(line)
                    buf = buf[start:]
                    if len(buf) > MAX_LINE:
                        # refuse this one message, drop the rest of it, and serve the next
                        if not skipping:
                            session.error(None, INVALID_REQUEST, f"message longer than {MAX_LINE} bytes")
                        skipping = True
                        buf = b""
            session.flush()
    finally:
        session.close()
    return 0


def run(paths: Paths, user: str, connect: Callable[[], Any], err: TextIO) -> int:
    import sys

    session = Session(paths, user, connect, sys.stdout.buffer, err)
    try:
        return serve(session)
    except BrokenPipeError:
        return 0
