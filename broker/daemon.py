"""``mcp-brokerd``: the credential-holding side, running as ``mcp-broker``.

It listens on ``gate.sock`` (peers: mcp-gate or root, by SO_PEERCRED) and
``admin.sock`` (root only), keeps one warm MCP session per configured
server, and decides every request itself: it re-reads the caller's
allowlist, types the arguments by the tool's schema, enforces timeouts and
output caps, audits, and only then answers. It trusts no decision the gate
made (Postfix's rule).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import difflib
import fcntl
import hashlib
import json
import logging
import os
import pwd
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import mcp

from broker import __version__, allowlist, audit, config, policy, protocol
from broker.coerce import build_arguments
from broker.errors import (
    EX_CONFIG,
    EX_DATAERR,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    EX_TOOL_ERROR,
    EX_UNAVAILABLE,
    ArgumentsRejected,
    ConfigError,
    Denied,
    PrivsepError,
    TempFail,
    Unavailable,
)
from broker.paths import BROKER_USER, GATE_USER, Paths
from broker.redact import Redactor
from broker.servers import ServerHandle, base_environment
from broker.state import State

log = logging.getLogger("mcp-brokerd")

HEALTH_INTERVAL = 10.0
READY_WAIT = 10.0


class UserCache:
    """Name -> uid from the passwd database, remembered while ``/etc/passwd`` is unchanged.

    Entries also expire after ``TTL`` seconds, for name services that are
    not the file (NSS); the lookup otherwise parses the file on every call.
    """

    TTL = 2.0

    def __init__(self, passwd: str = "/etc/passwd") -> None:  # noqa: S107 - the passwd database's path
        self.passwd = passwd
        self._key: tuple[int, ...] | None = None
        self._uids: dict[str, tuple[float, int | None]] = {}

    def uid(self, name: str) -> int | None:
        try:
            st = os.stat(self.passwd)
            key: tuple[int, ...] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except OSError:
            key = ()
        now = time.monotonic()
        if key != self._key:
            self._key = key
            self._uids.clear()
        hit = self._uids.get(name)
        if hit is not None and now - hit[0] < self.TTL:
            return hit[1]
        try:
            uid: int | None = pwd.getpwnam(name).pw_uid
        except (KeyError, ValueError):  # ValueError: a NUL in the name, which no user has
            uid = None
        if len(self._uids) > 4096:
            self._uids.clear()
        self._uids[name] = (now, uid)
        return uid


class Conn:
    """One client connection: lets a handler send interim frames and notice a hang-up."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, obj: dict[str, Any]) -> None:
        self.writer.write(protocol.encode_frame(obj))
        await self.writer.drain()

    async def closed(self) -> None:
        """Return when the peer hangs up (used only while nothing else reads)."""
        while await self.reader.read(4096):
            pass


class Broker:
    """The daemon's state and request handlers."""

    def __init__(self, paths: Paths, cfg: config.Config, gate_uid: int) -> None:
        self.paths = paths
        self.cfg = cfg
        self.gate_uid = gate_uid
        self.allowlists = allowlist.Cache(paths.allowlist, paths.allowlist_d)
        self._users = UserCache()
        self._digests: dict[str, tuple[mcp.types.Tool, str, str]] = {}
        self.audit = audit.AuditLog(paths.audit_log, **audit.options(cfg.settings))
        self.state = State(f"{paths.state}/state.db")
        self.redactor = Redactor(cfg.secrets())
        self.handles: dict[str, ServerHandle] = {}
        self.base_env = base_environment(paths.state)
        self.started = time.time()
        self.stopping = asyncio.Event()
        self._servers: list[asyncio.AbstractServer] = []
        self._errlog = open_errlog(paths)
        self._approval_waiters: dict[str, asyncio.Future[str]] = {}
        #: fire-and-forget tasks, referenced so they are not garbage-collected mid-flight
        self.background: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # --- servers ------------------------------------------------------------

    def _handle(self, server: config.Server) -> ServerHandle:
        s = self.cfg.settings
        return ServerHandle(
            server,
            connect_timeout=s.connect_timeout,
            backoff_max=s.restart_backoff_max,
            base_env=self.base_env,
            errlog=self._errlog,
        )

    def start_servers(self) -> None:
        for server in self.cfg.servers.values():
            handle = self._handle(server)
            self.handles[server.name] = handle
            handle.start()

    async def reload(self) -> dict[str, Any]:
        """Re-read config: start added servers, stop removed, restart changed."""
        cfg = config.load(self.paths)
        old = self.handles
        added: list[str] = []
        changed: list[str] = []
        new: dict[str, ServerHandle] = {}
        for name, server in cfg.servers.items():
            current = old.get(name)
            if current is not None and current.server.fingerprint() == server.fingerprint():
                current.server = server
                new[name] = current
                continue
            (changed if current is not None else added).append(name)
            new[name] = self._handle(server)
        removed = [n for n in old if n not in cfg.servers]
        self.cfg = cfg
        self.redactor = Redactor(cfg.secrets())
        self.audit.configure(**audit.options(cfg.settings))
        for name in removed + changed:
            await old[name].stop()
        self.handles = new
        for name in added + changed:
            new[name].start()
        log.info("reloaded: added %s, removed %s, restarted %s", added, removed, changed)
        return {"added": added, "removed": removed, "restarted": changed}

    async def health_loop(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), HEALTH_INTERVAL)
            for handle in list(self.handles.values()):
                await handle.health()

    # --- sockets ------------------------------------------------------------

    async def serve(self) -> None:
        gate = await asyncio.start_unix_server(self._gate_conn, path=self.paths.gate_sock)
        os.chmod(self.paths.gate_sock, 0o660)
        admin = await asyncio.start_unix_server(self._admin_conn, path=self.paths.admin_sock)
        os.chmod(self.paths.admin_sock, 0o600)
        self._servers = [gate, admin]

    async def close(self) -> None:
        for srv in self._servers:
            srv.close()
        for handle in self.handles.values():
            await handle.stop()
        for path in (self.paths.gate_sock, self.paths.admin_sock):
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.audit.close()
        self.state.close()

    async def _gate_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._conn(reader, writer, {0, self.gate_uid}, protocol.OPS, self._dispatch_gate)

    async def _admin_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._conn(reader, writer, {0}, protocol.ADMIN_OPS, self._dispatch_admin)

    async def _conn(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        uids: set[int],
        ops: dict[str, Any],
        dispatch: Any,
    ) -> None:
        conn = Conn(reader, writer)
        try:
            sock = writer.get_extra_info("socket")
            cred = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            peer_uid = int.from_bytes(cred[4:8], sys.byteorder)
            if peer_uid not in uids:
                log.warning("refused connection from uid %d", peer_uid)
                return
            while True:
                try:
                    header = await reader.readexactly(4)
                except asyncio.IncompleteReadError:
                    return
                n = protocol.frame_length(header, protocol.MAX_REQUEST_BYTES)
                async with asyncio.timeout(30):  # not wait_for: that costs a task per request
                    payload = await reader.readexactly(n)
                req = protocol.decode_payload(payload)
                op = protocol.validate_request(req, ops)
                answer = await dispatch(op, req, peer_uid, conn)
                await conn.send(answer)
        except (TimeoutError, protocol.ProtocolError, asyncio.IncompleteReadError) as exc:
            log.warning("closing connection: %s", exc)
        except (ConnectionError, BrokenPipeError):
            pass
        except Exception:
            log.exception("unexpected error on a connection")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    # --- gate requests ------------------------------------------------------

    def _caller(self, req: dict[str, Any], peer_uid: int) -> str:
        """The calling user named by the gate, checked against the passwd database."""
        user, uid = req["caller"], req["uid"]
        known = self._users.uid(user)
        if known is None:
            raise protocol.ProtocolError(f"unknown caller {user[:64]!r}")
        if known != uid:
            raise protocol.ProtocolError(f"caller {user[:64]!r} does not have uid {uid}")
        if peer_uid != 0 and uid == self.gate_uid:
            raise protocol.ProtocolError("the gate user cannot be a caller")
        return str(user)

    async def _dispatch_gate(self, op: str, req: dict[str, Any], peer_uid: int, conn: Conn) -> dict[str, Any]:
        caller = self._caller(req, peer_uid)
        started = time.monotonic()
        entry: dict[str, Any] = {"id": audit.new_request_id(), "caller": caller, "uid": req["uid"], "op": op}
        if op == "report":
            entry.update(
                tool=req["tool"],
                verb=req["verb"],
                decision=_DECISIONS.get(req["exit"], "error"),
                source="gate",
                exit=req["exit"],
                reason=self.redactor.text(req["reason"]),
            )
            if req["exit"] == EX_NOPERM:  # the rule that denied: the caller's allowlist
                with contextlib.suppress(PrivsepError, OSError):
                    entry["rule"] = allowlist.locate(self.paths.allowlist, self.paths.allowlist_d, caller)[1]
            # the gate's own denials feed the denial budget too; a report can only hurt its caller
            froze = None
            if req["exit"] == EX_NOPERM and self.state.frozen_until(caller) is None:
                froze = await self._count_denial(caller, Denied(req["reason"]))
            with contextlib.suppress(PrivsepError):
                await self.audit.record(**entry)
                if froze is not None:
                    await self._audit_freeze(caller, req["uid"], froze)
            return {"ok": True, "result": None}
        if "tool" in req:
            entry["tool"] = req["tool"]
        try:
            self.audit.check()
            result, extra = await self._handle_op(op, req, caller, conn, entry)
        except PrivsepError as exc:
            message = self.redactor.text(exc.message)
            entry.update(getattr(exc, "audit_extra", {}))
            entry.update(
                decision=entry.get("decision") or _decision(exc),
                outcome=entry.get("outcome") or _decision(exc),
                exit=exc.exit_code,
                reason=_bounded(message),
                duration_ms=round((time.monotonic() - started) * 1000, 3),
            )
            froze = await self._count_denial(caller, exc)
            try:
                await self.audit.record(**entry)
                if froze is not None:
                    await self._audit_freeze(caller, req["uid"], froze)
            except Unavailable as audit_exc:
                exc, message = audit_exc, audit_exc.message
            return {"ok": False, "exit": exc.exit_code, "error": message}
        entry.update(extra)
        entry["exit"] = 1 if isinstance(result, dict) and result.get("is_error") and op == "call" else 0
        entry["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
        try:
            await self.audit.record(**entry)
        except Unavailable as exc:
            return {"ok": False, "exit": exc.exit_code, "error": exc.message}
        return {"ok": True, "result": result}

    async def _audit_freeze(self, caller: str, uid: int, reason: str) -> None:
        await self.audit.record(
            id=audit.new_request_id(), caller=caller, uid=uid, op="freeze", decision="freeze", reason=reason
        )

    async def _count_denial(self, caller: str, exc: PrivsepError) -> str | None:
        """Feed the denial budget; return a reason when this denial froze the caller."""
        s = self.cfg.settings
        if s.denial_budget <= 0 or exc.exit_code not in (EX_NOPERM, EX_DATAERR) or getattr(exc, "frozen", False):
            return None
        if self.state.record_denial(caller, s.denial_budget, s.denial_window, s.freeze_seconds):
            until = self.state.frozen_until(caller)
            log.warning("caller %s frozen until %s", caller, _when(until))
            return f"more than {s.denial_budget} denials within {s.denial_window:g} s; frozen until {_when(until)}"
        return None

    def _check_frozen(self, caller: str) -> None:
        until = self.state.frozen_until(caller)
        if until is not None:
            exc = Denied(f"denied: {caller} is frozen until {_when(until)} after repeated denials")
            exc.frozen = True  # type: ignore[attr-defined]
            exc.audit_extra = {"rule": "denial_budget"}  # type: ignore[attr-defined]
            raise exc

    async def _handle_op(
        self, op: str, req: dict[str, Any], caller: str, conn: Conn, entry: dict[str, Any]
    ) -> tuple[Any, dict[str, Any]]:
        if op == "status":
            return self._status(caller), {"decision": "allow"}
        self._check_frozen(caller)
        allowed = self.allowlists.get(caller)
        entry["rule"] = allowed.path  # a call's policy source replaces it once the allowlist passes
        if op == "list":
            return await self._list(allowed), {"decision": "allow"}
        if op == "catalog":
            return await self._catalog(allowed), {"decision": "allow"}
        tool = req["tool"]
        if not allowed.allows(tool):
            raise Denied(f"denied: {tool} is not in the allowlist for {caller}")
        server_name, _, tool_name = tool.partition(".")
        handle = self.handles.get(server_name)
        if handle is None:
            raise Unavailable(f"server {server_name} is not configured in the broker")
        if op == "describe":
            spec = await self._tool(handle, tool, READY_WAIT)
            definition = json.loads(tool_digest(spec)[1])
            definition["name"] = tool
            return self.redactor.deep(definition), {"decision": "allow"}
        return await self._call(handle, tool, tool_name, req, caller, conn, entry)

    async def _tool(self, handle: ServerHandle, action: str, wait: float) -> mcp.types.Tool:
        """The tool's live definition, refused when it differs from its pin."""
        await handle.ready(wait)
        spec = handle.tools.get(action.partition(".")[2])
        if spec is None:
            raise Unavailable(f"server {handle.name} does not offer a tool named {action.partition('.')[2]}")
        if self.pin_state(action, spec) == "changed":
            raise Denied(
                f"denied: the definition of {action} changed since it was allowed; "
                "an operator must review it ('mcp-brokerctl pins accept')"
            )
        return spec

    def pin_state(self, action: str, spec: mcp.types.Tool) -> str:
        """'pinned' (first sight records the pin), or 'changed'."""
        # a listed definition never changes in place (a re-list brings new objects): hash it once
        hit = self._digests.get(action)
        if hit is not None and hit[0] is spec:
            digest, definition = hit[1], hit[2]
        else:
            digest, definition = tool_digest(spec)
            self._digests[action] = (spec, digest, definition)  # one entry per action: bounded
        pinned = self.state.pin(action)
        if pinned is None:
            self.state.set_pin(action, digest, definition)
            return "pinned"
        return "pinned" if pinned[0] == digest else "changed"

    async def _call(
        self,
        handle: ServerHandle,
        tool: str,
        tool_name: str,
        req: dict[str, Any],
        caller: str,
        conn: Conn,
        entry: dict[str, Any],
    ) -> tuple[Any, dict[str, Any]]:
        settings = self.cfg.settings
        rules = policy.effective(self.cfg.policy, tool, caller)
        entry["rule"] = rules.source
        entry["mode"] = rules.mode
        timeout = req["timeout"] or rules.timeout or handle.server.spec.timeout or settings.call_timeout
        timeout = min(float(timeout), settings.max_call_timeout)
        spec = await self._tool(handle, tool, min(timeout, READY_WAIT))
        args = build_arguments(req["kv"], req["args"], spec.input_schema or {})
        digest = audit.args_digest(args)
        entry.update(_arg_keys(args), args_size=len(protocol.dumps(args)), args_digest=digest)
        if settings.log_argument_values:
            entry["args"] = self.redactor.deep(args)
            self.audit.ensure_room(audit.RESERVE_LOW + entry["args_size"])  # this record is larger than most
        rules.check_args(args)
        if rules.rate is not None:
            retry = self.state.rate_check(rules.rate_key(), *rules.rate)
            if retry:
                raise TempFail(f"rate limit {rules.rate_text} for {tool} reached; retry in {retry:.0f} s")
        if rules.mode == "approve":
            entry["approval"] = await self._await_approval(caller, tool, args, digest, conn)
        if rules.rate is not None:
            self.state.rate_record(rules.rate_key(), rules.rate[1])
        entry["decision"] = "allow"
        if rules.mode == "notify":
            self._notify(entry)
        try:
            result = await handle.call(tool_name, args, timeout)
        except mcp.MCPError as exc:
            entry["outcome"] = "server_error"
            if exc.code == -32602:
                raise ArgumentsRejected(f"{tool}: the server rejected the arguments: {exc}") from None
            raise PrivsepError(f"{tool}: the server answered with an error: {exc}", EX_TOOL_ERROR) from None
        except TempFail:
            entry["outcome"] = "timeout"
            raise
        except PrivsepError:
            entry["outcome"] = "server_failed"
            raise
        rendered = render_result(result, rules.max_output_bytes or settings.max_output_bytes, self.redactor)
        return rendered, {
            "outcome": "tool_error" if result.is_error else "ok",
            "result_size": rendered.pop("_size"),
        }

    async def _await_approval(self, caller: str, tool: str, args: dict[str, Any], digest: str, conn: Conn) -> str:
        """Hold a red-zone call until an operator decides; return the approval id."""
        used = self.state.take_approved(caller, tool, digest)
        if used is not None:
            return used.id
        pending = self.state.pending_for(caller, tool, digest) or self.state.create_approval(
            caller, tool, digest, self.redactor.deep(args), self.cfg.settings.approval_ttl
        )
        if pending.id not in self._approval_waiters:
            await self.audit.record(
                id=audit.new_request_id(),
                caller=caller,
                op="approval",
                tool=tool,
                decision="pending",
                approval=pending.id,
                args_digest=digest,
            )
        waiter = self._approval_waiters.setdefault(pending.id, asyncio.get_running_loop().create_future())
        wait = max(0.0, pending.expires - time.time())
        await conn.send({"pending": pending.id, "wait": wait})
        hangup: asyncio.Future[Any] = asyncio.ensure_future(conn.closed())
        try:
            watched: set[asyncio.Future[Any]] = {waiter, hangup}
            done, _ = await asyncio.wait(watched, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
        finally:
            hangup.cancel()
        if waiter in done:
            decision = waiter.result()
            if decision == "rejected":
                raise Denied(f"denied: approval {pending.id} was rejected by an operator")
            if decision == "approved" and self.state.consume(pending.id):
                return pending.id
            raise TempFail(f"approval {pending.id} was already used; call again to request a new one")
        if hangup in done:
            raise TempFail(f"approval {pending.id} still pending; the caller left")
        self.state.expire_approvals()
        self._approval_waiters.pop(pending.id, None)
        raise TempFail(f"approval {pending.id} expired without a decision")

    def _notify(self, entry: dict[str, Any]) -> None:
        """Yellow zone: run the operator's hook with a JSON summary, without waiting for it."""
        command = self.cfg.settings.notify_command
        if not command:
            return
        summary = {k: entry.get(k) for k in ("id", "caller", "tool", "arg_keys", "args_digest", "args_size", "rule")}
        summary["ts"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.spawn(_run_hook(command, json.dumps(summary).encode(), self.base_env))

    async def _offered(
        self, allowed: allowlist.Allowlist
    ) -> AsyncIterator[tuple[str, ServerHandle, mcp.types.Tool | None]]:
        """Each allowed action of a configured server, with its live definition if offered."""
        for action in allowed.actions:
            server_name, _, tool_name = action.partition(".")
            handle = self.handles.get(server_name)
            if handle is None:
                continue
            if handle.state != "up":
                with contextlib.suppress(PrivsepError):
                    await handle.ready(2.0)
            yield action, handle, handle.tools.get(tool_name) if handle.state == "up" else None

    async def _list(self, allowed: allowlist.Allowlist) -> dict[str, Any]:
        tools = []
        async for action, handle, spec in self._offered(allowed):
            if spec is not None:
                changed = self.pin_state(action, spec) == "changed"
                description = "(blocked: definition changed)" if changed else first_line(spec.description)
                description = self.redactor.text(description)
                tools.append({"name": action, "description": description})
            elif handle.state != "up":
                tools.append({"name": action, "description": "(server unavailable)"})
        return {"tools": tools}

    async def _catalog(self, allowed: allowlist.Allowlist) -> dict[str, Any]:
        """Full MCP tool definitions for ``mcp stdio``: allowed, offered, and matching their pins."""
        tools = []
        async for action, _handle, spec in self._offered(allowed):
            if spec is None or self.pin_state(action, spec) == "changed":
                continue
            definition = json.loads(tool_digest(spec)[1])
            entry: dict[str, Any] = {
                "name": action,
                "description": self.redactor.text(definition["description"]),
                "inputSchema": definition["input_schema"] or {"type": "object"},
            }
            if definition["annotations"]:
                entry["annotations"] = definition["annotations"]
            tools.append(entry)
        return {"tools": tools}

    def _status(self, caller: str) -> dict[str, Any]:
        try:
            mentioned = set(self.allowlists.get(caller).servers())
            problem = ""
        except ConfigError as exc:
            mentioned, problem = set(), exc.message
        servers = [
            {"name": h.name, "state": h.state, "reason": h.reason, "tools": len(h.tools)}
            for h in self.handles.values()
            if h.name in mentioned
        ]
        status: dict[str, Any] = {"broker": "up", "version": __version__, "servers": servers}
        if problem:
            status["allowlist"] = problem
        if not self.audit.healthy:
            status["broker"] = "degraded: audit log unwritable"
        return status

    # --- admin requests -----------------------------------------------------

    async def _dispatch_admin(self, op: str, req: dict[str, Any], peer_uid: int, conn: Conn) -> dict[str, Any]:
        try:
            result = await self._admin_op(op, req)
        except PrivsepError as exc:
            return {"ok": False, "exit": exc.exit_code, "error": exc.message}
        return {"ok": True, "result": result}

    async def _admin_op(self, op: str, req: dict[str, Any]) -> Any:
        if op == "status":
            return self._admin_status()
        if op == "reload":
            return await self.reload()
        if op == "tools":
            return self._admin_tools(req.get("server"))
        if op == "approvals":
            return [a.as_dict() for a in self.state.approvals(req.get("status"))]
        if op in ("approve", "reject"):
            return await self._decide(req["id"], "approved" if op == "approve" else "rejected")
        if op == "unfreeze":
            found = self.state.unfreeze(req["caller"])
            await self.audit.record(
                id=audit.new_request_id(), caller=req["caller"], op="unfreeze", decision="unfreeze", by="root"
            )
            return {"unfrozen": found}
        if op == "freezes":
            return self.state.freezes()
        if op == "pins":
            return self._pins()
        if op == "pin_accept":
            return await self._pin_accept(req["action"])
        if op == "explain":
            return await self._explain(req)
        raise PrivsepError(f"unhandled op {op}", EX_SOFTWARE)

    async def _decide(self, approval_id: str, status: str) -> dict[str, Any]:
        decided = self.state.decide(approval_id, status, "root")
        if decided is None:
            current = self.state.get_approval(approval_id)
            why = f"it is {current.status}" if current else "no such approval"
            raise PrivsepError(f"approval {approval_id} cannot be {status}: {why}", 1)
        await self.audit.record(
            id=audit.new_request_id(),
            caller=decided.caller,
            op="approval",
            tool=decided.action,
            decision=status,
            approval=approval_id,
            by="root",
        )
        waiter = self._approval_waiters.pop(approval_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(status)
        return decided.as_dict()

    def _pins(self) -> list[dict[str, Any]]:
        out = []
        pins = self.state.pins()
        for action, (digest, _definition) in sorted(pins.items()):
            server, _, tool = action.partition(".")
            handle = self.handles.get(server)
            spec = handle.tools.get(tool) if handle is not None else None
            state = "not offered now" if spec is None else "ok" if tool_digest(spec)[0] == digest else "changed"
            out.append({"action": action, "hash": digest, "state": state})
        return out

    async def _pin_accept(self, action: str) -> dict[str, Any]:
        server, _, tool = action.partition(".")
        handle = self.handles.get(server)
        spec = handle.tools.get(tool) if handle is not None else None
        if spec is None:
            raise PrivsepError(f"{action}: the server does not offer this tool now", 1)
        digest, definition = tool_digest(spec)
        old = self.state.pin(action)
        diff = "".join(
            difflib.unified_diff(
                _pretty(old[1]).splitlines(keepends=True) if old else [],
                _pretty(definition).splitlines(keepends=True),
                fromfile=f"{action} (pinned)",
                tofile=f"{action} (offered now)",
            )
        )
        self.state.set_pin(action, digest, definition)
        await self.audit.record(
            id=audit.new_request_id(), op="pin_accept", tool=action, decision="pin", pin_hash=digest
        )
        return {"action": action, "hash": digest, "diff": diff, "changed": old is None or old[0] != digest}

    async def _explain(self, req: dict[str, Any]) -> dict[str, Any]:
        """What a call would meet, step by step, without calling anything (like doas -C)."""
        caller, tool = req["caller"], req["tool"]
        steps: list[dict[str, str]] = []

        def step(name: str, verdict: str, why: str) -> dict[str, Any]:
            steps.append({"check": name, "verdict": verdict, "why": why})
            return {"caller": caller, "tool": tool, "steps": steps, "verdict": verdict}

        until = self.state.frozen_until(caller)
        if until is not None:
            return step("freeze", "deny (77)", f"{caller} is frozen until {_when(until)}")
        step("freeze", "pass", "not frozen")
        try:
            allowed = self.allowlists.get(caller)
        except ConfigError as exc:
            return step("allowlist", "config error (78)", exc.message)
        if not allowed.allows(tool):
            return step("allowlist", "deny (77)", f"{tool} is not in {allowed.path}")
        step("allowlist", "pass", f"listed in {allowed.path}")
        handle = self.handles.get(tool.partition(".")[0])
        if handle is None:
            return step("server", "unavailable (69)", "server not configured")
        spec = handle.tools.get(tool.partition(".")[2])
        if spec is None:
            return step("server", "unavailable (69)", f"server is {handle.state}, tool not offered")
        if self.pin_state(tool, spec) == "changed":
            return step("pin", "deny (77)", "definition changed since pinned; run 'mcp-brokerctl pins accept'")
        step("pin", "pass", "definition matches its pin")
        rules = policy.effective(self.cfg.policy, tool, caller)
        try:
            args = build_arguments(req["kv"], None, spec.input_schema or {})
            rules.check_args(args)
        except ArgumentsRejected as exc:
            return step("arguments", "rejected (65)", exc.message)
        step("arguments", "pass", f"typed by the schema and checked against {rules.source}")
        if rules.rate is not None:
            retry = self.state.rate_check(rules.rate_key(), *rules.rate)
            if retry:
                return step("rate", "try later (75)", f"{rules.rate_text} reached; retry in {retry:.0f} s")
            step("rate", "pass", f"under {rules.rate_text}")
        verdict = {"allow": "allow", "notify": "allow, operator notified", "approve": "held for approval"}
        result = step("mode", verdict[rules.mode], f"mode {rules.mode} from {rules.source}")
        result["policy"] = rules.describe()
        return result

    def _admin_status(self) -> dict[str, Any]:
        return {
            "broker": "up",
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "audit": self.audit.error if not self.audit.healthy else (self.audit.room_problem or "ok"),
            "servers": [
                {
                    "name": h.name,
                    "state": h.state,
                    "reason": h.reason,
                    "tools": len(h.tools),
                    "restarts": h.restarts,
                    "transport": "stdio" if h.server.spec.command else "http",
                }
                for h in self.handles.values()
            ],
            "frozen": self.state.freezes(),
            "pending_approvals": len(self.state.approvals("pending")),
        }

    def _admin_tools(self, server: str | None) -> dict[str, Any]:
        out = {}
        for h in self.handles.values():
            if server is not None and h.name != server:
                continue
            out[h.name] = [
                {
                    "name": t.name,
                    "description": first_line(t.description),
                    "annotations": t.annotations.model_dump(mode="json", exclude_none=True) if t.annotations else {},
                }
                for t in h.tools.values()
            ]
        if server is not None and server not in out:
            raise Unavailable(f"no server named {server}")
        return out


_DECISIONS = {77: "deny", 78: "config_error", 65: "rejected", 69: "unavailable", 75: "tempfail", 64: "usage"}


#: the audit log's reservation covers records this size (audit.RESERVE_LOW is several of them)
MAX_AUDIT_TEXT = 4096
MAX_AUDIT_KEYS = 64


def _bounded(text: str) -> str:
    """A reason for the audit record: a server's error text can be any size, a record may not."""
    if len(text) <= MAX_AUDIT_TEXT:
        return text
    return text[:MAX_AUDIT_TEXT] + f" [... {len(text) - MAX_AUDIT_TEXT} more characters]"


def _arg_keys(args: dict[str, Any]) -> dict[str, Any]:
    """``arg_keys`` for the audit record, bounded like every field (the count says what was cut)."""
    keys = sorted(args)
    if len(keys) <= MAX_AUDIT_KEYS and sum(len(k) for k in keys) <= MAX_AUDIT_TEXT:
        return {"arg_keys": keys}
    kept = [k[:64] for k in keys[:MAX_AUDIT_KEYS]]
    return {"arg_keys": kept, "arg_keys_total": len(keys)}


def _decision(exc: PrivsepError) -> str:
    return _DECISIONS.get(exc.exit_code, "error")


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts or 0))


def _pretty(definition: str) -> str:
    return json.dumps(json.loads(definition), indent=2, sort_keys=True) + "\n"


def tool_digest(spec: mcp.types.Tool) -> tuple[str, str]:
    """(sha256, canonical JSON) of what pinning covers: name, description, schema, annotations."""
    definition = json.dumps(
        {
            "name": spec.name,
            "description": spec.description or "",
            "input_schema": spec.input_schema,
            "annotations": spec.annotations.model_dump(mode="json", exclude_none=True) if spec.annotations else {},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(definition.encode()).hexdigest(), definition


async def _run_hook(command: list[str], payload: bytes, env: dict[str, str]) -> None:
    try:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
            cwd=env.get("HOME", "/"),
        )
        await asyncio.wait_for(proc.communicate(payload), 60)
        if proc.returncode:
            log.warning("notify hook exited with %s", proc.returncode)
    except (OSError, TimeoutError) as exc:
        log.warning("notify hook failed: %s", exc)


def first_line(text: str | None) -> str:
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


def render_result(result: mcp.types.CallToolResult, cap: int, redactor: Redactor) -> dict[str, Any]:
    """The answer the gate prints: joined text, blocks, structured content; redacted, then capped."""
    texts: list[str] = []
    blocks: list[dict[str, Any]] = []
    for block in result.content:
        data = redactor.deep(block.model_dump(mode="json", exclude_none=True))
        blocks.append(data)
        kind = data.get("type")
        if kind == "text":
            texts.append(str(data.get("text", "")))
        elif kind in ("image", "audio"):
            texts.append(f"[{kind} {data.get('mimeType', '')}, {len(str(data.get('data', '')))} bytes base64]")
        elif kind == "resource_link":
            texts.append(f"[resource {data.get('uri', '')}]")
        elif kind == "resource":
            res = data.get("resource", {})
            texts.append(str(res.get("text", f"[resource {res.get('uri', '')}]")))
    text = "\n".join(texts)
    structured = redactor.deep(result.structured_content)
    if not text and structured is not None:
        text = protocol.dumps(structured)
    out: dict[str, Any] = {"is_error": bool(result.is_error), "text": text, "content": blocks}
    if structured is not None:
        out["structured_content"] = structured
    # text, blocks (images, embedded blobs) and structured content all count against the cap
    size = max(len(text.encode("utf-8", "replace")), len(protocol.dumps(blocks)), len(protocol.dumps(structured)))
    out["_size"] = size
    if size > cap:
        cut = text.encode("utf-8", "replace")[:cap].decode("utf-8", "ignore")
        out["text"] = cut + f"\n[output truncated: the result was {size} bytes, over the {cap}-byte cap]"
        out["truncated"] = True
        out["content"] = []
        out.pop("structured_content", None)
    return out


def open_errlog(paths: Paths) -> Any:
    """Where stdio servers' stderr goes: a broker-private log file."""
    try:
        return open(f"{paths.log}/servers.log", "a", buffering=1, encoding="utf-8", errors="replace")
    except OSError:
        return sys.stderr


# --- process set-up -----------------------------------------------------------


def drop_privileges() -> tuple[int, int]:
    """Become mcp-broker when started by root; return (broker uid, gate uid)."""
    try:
        broker = pwd.getpwnam(BROKER_USER)
        gate = pwd.getpwnam(GATE_USER)
    except KeyError as exc:
        raise ConfigError(f"system user {exc.args[0]} is missing (run 'mcp-brokerctl install')") from None
    if os.geteuid() == 0:
        os.initgroups(BROKER_USER, broker.pw_gid)
        os.setgid(broker.pw_gid)
        os.setuid(broker.pw_uid)
    elif os.geteuid() != broker.pw_uid:
        raise ConfigError(f"mcp-brokerd must run as {BROKER_USER} (or be started by root)")
    if os.getuid() == 0 or os.geteuid() == 0:
        raise ConfigError("refusing to run with root privileges")
    return broker.pw_uid, gate.pw_uid


def clean_environment(home: str) -> None:
    """The daemon keeps nothing of its launcher's environment."""
    os.environ.clear()
    os.environ.update({"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"})


def lock_pidfile(path: str) -> int:
    """Take the pid file lock; a held lock means a live daemon, a stale file is reused."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        try:
            pid = os.pread(fd, 32, 0).decode().strip()
        finally:
            os.close(fd)
        raise PrivsepError(f"mcp-brokerd is already running (pid {pid or 'unknown'})", 1) from None
    return fd


def write_pid(fd: int) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def clear_stale_socket(path: str) -> None:
    """Remove a socket left by a dead daemon (we hold the pid lock, so it is dead)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


async def run_broker(paths: Paths, cfg: config.Config, gate_uid: int, ready: Any) -> int:
    broker = Broker(paths, cfg, gate_uid)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, broker.stopping.set)

    def on_hup() -> None:
        async def do() -> None:
            try:
                await broker.reload()
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: %s", exc)

        broker.background.add(task := loop.create_task(do()))
        task.add_done_callback(broker.background.discard)

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    clear_stale_socket(paths.gate_sock)
    clear_stale_socket(paths.admin_sock)
    await broker.serve()
    broker.start_servers()
    health = asyncio.create_task(broker.health_loop())
    log.info("mcp-brokerd %s ready (pid %d), %d servers", __version__, os.getpid(), len(cfg.servers))
    ready(None)
    await broker.stopping.wait()
    log.info("stopping")
    health.cancel()
    await broker.close()
    return EX_OK


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="mcp-brokerd",
        description="The mcp-privsep broker daemon. Start it as root (it drops to mcp-broker) or as mcp-broker.",
    )
    p.add_argument("--root", default="/", help="install root (default /; tests use a staging root)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--foreground", action="store_true", help="stay in the foreground (default; for supervisors)")
    mode.add_argument("--daemon", action="store_true", help="detach with python-daemon; the pid file is in the run dir")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--version", action="version", version=f"mcp-brokerd {__version__}")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    ns = parse_args(argv)
    paths = Paths(ns.root)
    logging.basicConfig(
        level=ns.log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s mcp-brokerd[%(process)d] %(levelname)s %(message)s",
    )
    try:
        _broker_uid, gate_uid = drop_privileges()
        clean_environment(paths.state)
        os.umask(0o077)
        os.chdir(paths.state)
        cfg = config.load(paths)
        pid_fd = lock_pidfile(paths.pidfile)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"mcp-brokerd: {problem}", file=sys.stderr)
        return EX_CONFIG
    except PrivsepError as exc:
        print(f"mcp-brokerd: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:
        print(f"mcp-brokerd: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        return EX_UNAVAILABLE
    if ns.daemon:
        return _daemonize(paths, cfg, gate_uid, pid_fd)
    write_pid(pid_fd)
    try:
        return asyncio.run(run_broker(paths, cfg, gate_uid, lambda _x: None))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(paths.pidfile)


def _daemonize(paths: Paths, cfg: config.Config, gate_uid: int, pid_fd: int) -> int:
    """Detach with python-daemon; report readiness or failure to the launcher."""
    import daemon  # python-daemon

    r, w = os.pipe()
    child = os.fork()
    if child:
        os.close(w)
        os.waitpid(child, 0)
        chunks = []
        while chunk := os.read(r, 4096):
            chunks.append(chunk)
        os.close(r)
        message = b"".join(chunks).decode(errors="replace").strip()
        if message.startswith("ready"):
            print(f"mcp-brokerd: started ({message})")
            return EX_OK
        print(f"mcp-brokerd: failed to start: {message or 'the daemon exited during start-up'}", file=sys.stderr)
        return EX_UNAVAILABLE
    os.close(os.open("/dev/null", os.O_RDONLY))
    log_fh = open(f"{paths.log}/mcp-brokerd.log", "a", buffering=1, encoding="utf-8")  # noqa: SIM115
    ctx = daemon.DaemonContext(
        working_directory=paths.state,
        umask=0o077,
        detach_process=True,
        files_preserve=[w, pid_fd, log_fh.fileno()],
        stdout=log_fh,
        stderr=log_fh,
        signal_map={},
    )
    code = EX_SOFTWARE
    try:
        ctx.open()
        for h in logging.getLogger().handlers:
            if isinstance(h, logging.StreamHandler):
                h.setStream(log_fh)
        write_pid(pid_fd)

        def ready(_x: object) -> None:
            os.write(w, f"ready, pid {os.getpid()}\n".encode())
            os.close(w)

        code = asyncio.run(run_broker(paths, cfg, gate_uid, ready))
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.write(w, f"{type(exc).__name__}: {exc}\n".encode())
        log.exception("daemon failed")
    finally:
        with contextlib.suppress(OSError):
            os.unlink(paths.pidfile)
    os._exit(code)


__all__ = ["Broker", "main"]


def entry() -> None:
    sys.exit(main())
