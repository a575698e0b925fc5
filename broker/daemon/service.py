"""The daemon serving: its two sockets, one dispatch table each, and the handler of every op.

``gate.sock`` takes the gate's requests (peers: an agent's own gate user,
by SO_PEERCRED, which names the caller through the gate-users map:
:mod:`broker.daemon.callers`) and ``admin.sock`` root's. Each socket has one table
(:data:`GATE_ROUTES`, :data:`ADMIN_ROUTES`, OpenSSH's monitor) binding each
op of the protocol to its handler and to who may send it; a frame that
breaks the protocol closes the connection. Every gate request is decided by
:func:`broker.daemon.decision.decide` and leaves exactly one final audit
record, built in one place (:meth:`Broker._dispatch_gate`) from what the
handler returns (:class:`Outcome`), whatever the handler raised; a call that
reaches its server has an intent record before it (two-phase audit). The
daemon trusts no decision the gate made (Postfix's rule). Before each
request the config files are stat'ed (:meth:`Broker.policy_now`): changed
policy applies to it, and a broken file refuses it with 78.

This module holds no decision logic of its own and no process set-up
(:mod:`broker.daemon.main`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import IO, Any, Literal

import mcp

from broker import __version__
from broker.core import agents, allowlist, names, wire
from broker.core.allowlist import Allowlist
from broker.core.errors import (
    EX_DATAERR,
    EX_FAILED,
    EX_NOPERM,
    EX_OK,
    EX_SOFTWARE,
    EX_TOOL_ERROR,
    ArgumentsRejected,
    Cancelled,
    ConfigError,
    PrivsepError,
    ProtocolError,
    ServerError,
    TempFail,
    Unavailable,
    UsageError,
    decision_for,
)
from broker.core.names import Action
from broker.core.paths import Paths
from broker.core.servers import Secrets
from broker.daemon import audit, config, limits, logs, memory, policy
from broker.daemon.approvals import ApprovalDesk
from broker.daemon.callers import Callers
from broker.daemon.decision import OPERATOR_FREEZE, Offer, PinView, Query, Verdict, decide, when
from broker.daemon.pins import PinBook
from broker.daemon.proposals import ProposalDesk
from broker.daemon.records import AuditRecord, bounded
from broker.daemon.redact import Redactor
from broker.daemon.results import SANITIZED, catalog_entry, described, first_line, hints, render_result
from broker.daemon.servers import ServerSet
from broker.daemon.state import State
from broker.daemon.upstream.handle import ServerHandle
from broker.daemon.upstream.spawner import SpawnerClient

log = logging.getLogger("mcp-brokerd")

#: the longest a request waits for a (re)starting server
READY_WAIT = 10.0
#: what ``mcp list`` and ``tools/list`` wait for a server that is not up yet
LIST_WAIT = 2.0
#: a frame's body must arrive this long after its header
FRAME_SECONDS = 30.0


class WriteTimeout(ConnectionError):
    """The peer left a frame unread for longer than ``write_timeout``: it is dropped."""


class Conn:
    """One client connection: lets a handler send interim frames and notice a hang-up.

    A frame is written within ``write_timeout`` seconds or the connection is
    dropped (:class:`WriteTimeout`) with what it buffered: a gate that does
    not read cannot make the daemon hold its answers.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, write_timeout: float = 10.0) -> None:
        self.reader = reader
        self.writer = writer
        self.write_timeout = write_timeout
        #: run once the current request's answer has left the daemon (or the connection is gone)
        self.after_answer: list[Callable[[], None]] = []

    async def send(self, obj: dict[str, Any]) -> None:
        self.writer.write(wire.encode_frame(obj))
        if self.writer.transport.get_write_buffer_size():
            try:
                async with asyncio.timeout(self.write_timeout):
                    await self.writer.drain()
            except TimeoutError:
                raise WriteTimeout(f"the peer left an answer unread for {self.write_timeout:g} s") from None

    def answered(self) -> None:
        while self.after_answer:
            self.after_answer.pop()()

    async def closed(self) -> None:
        """Return when the peer hangs up (used only while nothing else reads)."""
        while await self.reader.read(4096):
            pass


@dataclass
class Outcome:
    """What a gate handler returns: a result, or the refusal; and the audit fields it settled."""

    record: AuditRecord = field(default_factory=lambda: AuditRecord())
    result: Any = None
    error: PrivsepError | None = None
    #: a refusal of a frozen caller is not counted against its denial budget again
    counts: bool = True
    #: the refusal is the gate's own, reported for the record: the report itself succeeded
    reported: bool = False
    #: the name of the known secret an argument held: the caller was frozen (audited and notified with the answer)
    guessed: str | None = None


@dataclass(frozen=True)
class Ctx:
    """Who sent a gate request, as the daemon established it, and the id its audit records carry."""

    id: str
    caller: str
    uid: int
    op: str
    tool: str | None

    def record(self) -> AuditRecord:
        """The fields every record of this request starts with."""
        base: AuditRecord = {"id": self.id, "caller": self.caller, "uid": self.uid, "op": self.op}
        if self.tool is not None:
            base["tool"] = self.tool
        return base


Peer = Literal["gate", "root"]


@dataclass(frozen=True)
class Route:
    """One op of a socket: its handler and who may send it (the schema is the protocol's)."""

    handler: Callable[..., Awaitable[Any]]
    peers: frozenset[Peer]


class Broker:
    """The daemon's state, its :class:`broker.daemon.decision.View`, and the op handlers."""

    def __init__(self, paths: Paths, cfg: config.Config, spawner: SpawnerClient | None = None) -> None:
        self.paths = paths
        self.cfg = cfg
        self.callers = Callers(paths.gate_users)
        self.allowlists = allowlist.Cache(paths.allowlist, paths.allowlist_d)
        self.audit = audit.AuditLog(paths.audit_log, **audit.options(cfg.settings))
        self.digest_key = audit.load_key(paths.audit_key)
        self.state = State(f"{paths.state}/state.db")
        self.pins = PinBook(self.state)
        self.approvals = ApprovalDesk(self.state, self.audit)
        self.proposals = ProposalDesk(self.state, self.audit, self.digest)
        self.redactor = Redactor(cfg.secrets())
        #: the environment of the operator's notify hook (run as mcp-broker)
        self.hook_env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": paths.state, "LANG": "C.UTF-8"}
        self.spawner = spawner
        errlog = open_errlog(paths, lambda: self.cfg.settings)  # the running settings, so a reload applies
        self.servers = ServerSet(cfg, spawner, errlog, self.redact, self.agent_names())
        #: the config files on disk: policy applies on the next call (see policy_now)
        self.on_disk = config.OnDisk(paths)
        #: their key when last read (None: read them on the first request, in case they moved since the start)
        self._disk_key: tuple[object, ...] | None = None
        #: why the files on disk cannot be read: every call is refused until they are fixed
        self.disk_problem: ConfigError | None = None
        #: what on disk differs from the running servers and waits for a reload (for status)
        self.disk_stale: list[dict[str, str]] = []
        self.started = time.time()
        #: what each caller holds of the daemon now, and the quota refusals to audit
        self.holdings = limits.Holdings()
        self.refusals = limits.Refusals()
        #: connections over a quota being answered with their refusal now
        self._refusing = 0
        self.stopping = asyncio.Event()
        self._listeners: list[asyncio.AbstractServer] = []
        #: fire-and-forget tasks, referenced so they are not garbage-collected mid-flight
        self.background: set[asyncio.Task[Any]] = set()

    def redact(self, text: str) -> str:
        """Every secret the broker knows, replaced (the redactor of the running config)."""
        return self.redactor.text(text)

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    # --- the View a decision reads ------------------------------------------------------

    def frozen_until(self, caller: str) -> float | None:
        return self.state.frozen_until(caller)

    def allowlist(self, caller: str) -> Allowlist:
        return self.allowlists.get(caller)

    def offer(self, action: Action, caller: str) -> Offer:
        return self.servers.offer(action, caller)

    def pin(self, action: str, spec: mcp.types.Tool) -> PinView:
        state = self.pins.check(action, spec)
        if state == "unreviewed" and self.unreviewed_policy(action) == "first-use":
            return "first-use"
        return state

    def pin_policy(self, action: str) -> str:
        """``pin`` of the action's server, else of ``[broker]``: how an unreviewed tool is treated."""
        server = self.cfg.servers.get(action.partition(".")[0])
        chosen = server.spec.pin if server is not None else None
        return chosen or self.cfg.settings.pin

    def unreviewed_policy(self, action: str) -> str:
        """What an unreviewed ``action`` meets: its server's or the broker's ``pin``, or first-use kept on upgrade."""
        return "first-use" if self.state.grandfathered(action) else self.pin_policy(action)

    def secret_in(self, args: dict[str, Any]) -> str | None:
        found = self.redactor.found(args)
        return min(found) if found else None

    def rules(self, action: str, caller: str) -> policy.Effective:
        return policy.effective(self.cfg.policy, action, caller)

    def rate_retry(self, rules: policy.Effective) -> float:
        assert rules.rate is not None
        return self.state.rate_check(rules.rate_key(), *rules.rate)

    def digest(self, args: dict[str, Any]) -> str:
        return audit.args_digest(args, self.digest_key)

    async def decided(self, query: Query, wait: float) -> Verdict:
        """:func:`decide`, waiting up to ``wait`` once for a server that is (re)starting."""
        verdict = decide(query, self)
        if verdict.waitable and query.action is not None:
            handle = self.servers.get(query.action.server, query.caller)
            if handle is not None:
                with contextlib.suppress(Unavailable):
                    await handle.ready(wait)
                verdict = decide(query, self)
        return verdict

    async def record_start(self) -> None:
        """Close the books of the last run, then say this one started (two-phase audit's recovery).

        A call whose intent was recorded but whose outcome never was reached
        its server before the daemon stopped: whether it took effect is
        unknown, and the trail says so now, under the call's own id.
        """
        try:
            for intent in audit.unfinished_calls(self.paths.audit_log):
                record: dict[str, Any] = {k: intent[k] for k in ("id", "caller", "uid", "op", "tool") if k in intent}
                record |= {
                    "phase": "outcome",
                    "decision": "allow",
                    "outcome": "unknown",
                    "reason": "the broker stopped while the server worked on this call: "
                    "whether it took effect is unknown",
                }
                await self.audit.record(**record)
            await self.audit.record(
                id=audit.new_request_id(), op="start", decision="start", version=__version__, pid=os.getpid()
            )
            if self.state.upgraded:
                await self._grandfather()
        except (Unavailable, OSError) as exc:
            log.error("could not record the start in the audit log: %s", exc)

    async def _grandfather(self) -> None:
        """First start on the first release's state: what was allowlisted then keeps being trusted on first use.

        That release pinned every allowed tool on its first call; this one
        wants a review for new entries only, so nothing trusted before the
        upgrade is blocked by it (version-1 pins are re-pinned as they match).
        """
        kept = self._allowed_anywhere() - set(self.state.pins())
        self.state.grandfather(kept)
        if kept:
            log.info("upgrade: %d allowlisted tool(s) not yet pinned keep first-use pinning", len(kept))
            await self.audit.record(
                id=audit.new_request_id(),
                op="pin_policy",
                decision="first-use",
                reason=bounded(f"upgraded state: allowlisted before, pinned on first use: {', '.join(sorted(kept))}"),
            )

    # --- servers and config -----------------------------------------------------------------

    def agent_names(self) -> list[str]:
        """The agents of the gate-users map (each gets its own instance of a per-caller server)."""
        try:
            return list(agents.load(self.paths.gate_users))
        except ConfigError as exc:
            log.error("no per-caller instances: %s", exc.message)
            return []

    async def learn_secrets(self, cfg: config.Config) -> None:
        """Have the spawner re-read root's definitions, then ask it what each server's env files hold for us."""
        if self.spawner is None:
            for server in cfg.servers.values():
                server.problem = "no spawner: mcp-brokerd was not started by root"
            return
        loaded = await self.spawner.load()
        for problem in loaded["problems"]:
            log.error("the spawner kept its last good definitions: %s", problem)
        for server in cfg.servers.values():
            try:
                found = await self.spawner.secrets(server.name)
            except Unavailable as exc:
                server.problem = exc.message
                log.error("server %s cannot be served: %s", server.name, exc.message)
                continue
            server.secrets = Secrets(found["redact"], found["url"], found["headers"], found["fingerprint"])

    def policy_now(self) -> ConfigError | None:
        """Read the config files again if they changed on disk (a few stats when not); the problem that refuses calls.

        Policy applies at once (:func:`broker.daemon.config.with_policy`); server definitions and process
        settings wait for a reload, listed meanwhile in :attr:`disk_stale`. A broken file is read once per
        change, not once per call, and refuses every call until it is fixed (fail closed, like the allowlist).
        """
        try:
            key = self.on_disk.key()
        except ConfigError as exc:  # servers.d cannot be listed: tried again on the next call
            self._disk_key, self.disk_problem = None, exc
            return exc
        if key == self._disk_key:
            return self.disk_problem
        self._disk_key = key  # taken before the read: a change racing the read moves it again
        try:
            fresh = config.load(self.paths)
        except ConfigError as exc:
            self.disk_problem = config.located(exc, self.on_disk.files)
            log.error("config on disk is invalid, every call is refused until it is fixed: %s", self.disk_problem)
            return self.disk_problem
        if self.disk_problem is not None:
            log.info("config on disk is valid again")
        self.disk_problem = None
        self.disk_stale = config.differences(self.cfg, fresh, self.paths.broker_toml)
        self.cfg = config.with_policy(self.cfg, fresh)
        for stale in self.disk_stale:
            log.info("config changed on disk, applied on reload: %s: %s", stale["file"], stale["what"])
        return None

    def _disk_report(self) -> dict[str, Any]:
        """For ``status``: a broken config on disk (calls are refused), and what waits for a reload."""
        problem = self.disk_problem
        return {
            "error": problem.message if problem is not None else None,
            "problems": list(problem.problems) if problem is not None else [],
            "stale": list(self.disk_stale),
        }

    async def reload(self) -> dict[str, Any]:
        """Re-read config: start added servers, stop removed, restart changed."""
        key = self.on_disk.key()  # before the read, as in policy_now
        cfg = config.load(self.paths)
        await self.learn_secrets(cfg)
        self.cfg = cfg
        self._disk_key, self.disk_problem, self.disk_stale = key, None, []
        self.redactor = Redactor(cfg.secrets())
        self.audit.configure(**audit.options(cfg.settings))
        return await self.servers.reload(cfg, self.agent_names())

    # --- sockets ----------------------------------------------------------------------------

    async def serve(self) -> None:
        # a socket left by a dead daemon (the pid lock is ours, so it is dead) would refuse the bind
        for path in (self.paths.gate_sock, self.paths.admin_sock):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        gate = await asyncio.start_unix_server(self._gate_conn, path=self.paths.gate_sock)
        os.chmod(self.paths.gate_sock, 0o660)
        admin = await asyncio.start_unix_server(self._admin_conn, path=self.paths.admin_sock)
        os.chmod(self.paths.admin_sock, 0o600)
        self._listeners = [gate, admin]

    async def close(self) -> None:
        for srv in self._listeners:
            srv.close()
        await self.servers.close()
        for path in (self.paths.gate_sock, self.paths.admin_sock):
            with contextlib.suppress(OSError):
                os.unlink(path)
        self.audit.close()
        self.state.close()

    def _gate_peer(self, uid: int) -> Peer | None:
        """On gate.sock only an agent's gate user is a peer (never root, the broker or the shared mcp-gate)."""
        return "gate" if self.callers.lookup(uid) is not None else None

    @staticmethod
    def _admin_peer(uid: int) -> Peer | None:
        return "root" if uid == 0 else None

    async def _gate_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._conn(
            reader, writer, self._gate_peer, wire.OPS, GATE_ROUTES, self._dispatch_gate, self._admit_gate
        )

    async def _admin_conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self._conn(reader, writer, self._admin_peer, wire.ADMIN_OPS, ADMIN_ROUTES, self._dispatch_admin)

    def _admit_gate(self, pid: int, uid: int) -> tuple[str, Callable[[], None]]:
        """Count a gate connection against its caller's quota; return the caller and what releases it.

        Raises TempFail over the quota.
        """
        known = self.callers.lookup(uid)
        if known is None:  # the gate-users map changed since _gate_peer
            raise ProtocolError(f"uid {uid} is no longer an agent's gate user")
        caller = known.name
        self.policy_now()  # the quotas of the files on disk (a broken file refuses the request, not this)
        self.holdings.take_connection(caller, pid, self.cfg.quota(caller))
        return caller, lambda: self.holdings.drop_connection(caller, pid)

    async def _conn(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        who: Callable[[int], Peer | None],
        schemas: dict[str, Any],
        routes: dict[str, Route],
        dispatch: Callable[[Route, dict[str, Any], int, Conn], Awaitable[wire.Answer]],
        admit: Callable[[int, int], tuple[str, Callable[[], None]]] | None = None,
    ) -> None:
        conn = Conn(reader, writer, self.cfg.settings.write_timeout)
        caller: str | None = None
        release: Callable[[], None] | None = None
        drop = False
        try:
            peer_pid, peer_uid = wire.peer_cred(writer.get_extra_info("socket"))
            peer = who(peer_uid)
            if peer is None or not any(peer in r.peers for r in routes.values()):
                log.warning("refused connection from uid %d", peer_uid)
                return
            if admit is not None:
                try:
                    caller, release = admit(peer_pid, peer_uid)
                except TempFail as over:  # over a quota: its first request is answered with the refusal
                    await self._refuse_connection(reader, conn, peer_uid, over)
                    return
            while True:
                try:
                    header = await reader.readexactly(4)
                except asyncio.IncompleteReadError:
                    return
                n = wire.frame_length(header, wire.MAX_REQUEST_BYTES)
                async with asyncio.timeout(FRAME_SECONDS):  # not wait_for: that costs a task per request
                    taken = await self.holdings.take_reading(caller, n) if caller is not None else 0
                    try:
                        req = wire.decode_payload(await reader.readexactly(n))
                    finally:
                        if caller is not None:
                            self.holdings.drop_reading(caller, taken)
                route = routes[wire.validate_request(req, schemas)]
                if peer not in route.peers:
                    raise ProtocolError(f"op {req['op']} is not for a {peer} peer")
                try:
                    answer = await dispatch(route, req, peer_uid, conn)
                    await conn.send(dict(answer))
                finally:
                    conn.answered()
        except WriteTimeout as exc:
            drop = True
            log.warning("dropping connection: %s", exc)
            self._note_refusal(peer_uid, "unread", str(exc))
        except (TimeoutError, ProtocolError, asyncio.IncompleteReadError) as exc:
            log.warning("closing connection: %s", exc)
        except (ConnectionError, BrokenPipeError):
            pass
        except Exception:
            log.exception("unexpected error on a connection")
        finally:
            conn.answered()
            if release is not None:
                release()
            if drop:  # what it left unread goes now, not when it might read it
                writer.transport.abort()
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _refuse_connection(self, reader: asyncio.StreamReader, conn: Conn, uid: int, over: TempFail) -> None:
        """Answer a connection over its caller's quota with the refusal at once, audited; then let it go.

        The refusal is written before the request is read (the gate reads it after sending its request), and
        the connection is held only until the peer hangs up, at most :data:`REFUSAL_LINGER` seconds: closing
        it under a gate still writing would turn the clear refusal into a broken pipe. At most
        :data:`MAX_REFUSING` linger at once, whatever the flood; beyond that they are closed at once.
        """
        self._note_refusal(uid, "connections", over.message)
        with contextlib.suppress(ProtocolError, ValueError, ConnectionError):
            conn.writer.write(wire.encode_frame({"ok": False, "exit": over.exit_code, "error": over.message}))
        if self._refusing >= MAX_REFUSING:
            return
        self._refusing += 1
        try:
            async with asyncio.timeout(REFUSAL_LINGER):
                await conn.closed()  # what it sends meanwhile is read and dropped
        except (TimeoutError, ConnectionError):
            pass
        finally:
            self._refusing -= 1

    def _note_refusal(self, uid: int, kind: str, reason: str) -> None:
        """Audit a quota refusal or a dropped peer: the first of a burst at once, the rest summed later."""
        known = self.callers.lookup(uid)
        caller = known.name if known is not None else f"uid {uid}"
        if self.refusals.note(caller, kind, reason):
            self.spawn(self._audit_refusal(caller, uid, kind, 1, reason))

    async def _audit_refusal(self, caller: str, uid: int | None, kind: str, count: int, reason: str) -> None:
        with contextlib.suppress(Unavailable):
            await self.audit.record(
                id=audit.new_request_id(),
                caller=caller,
                uid=uid,
                op="limit",
                decision="throttle" if kind != "unread" else "drop",
                limit=kind,
                refused=count,
                reason=bounded(self.redactor.text(reason)),
            )

    async def refusal_loop(self, stopping: asyncio.Event) -> None:
        """Every few seconds: the summed refusals of bursts that are over, one record each; free memory back."""
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), limits.SUMMARY_SECONDS / 2)
            await self.flush_refusals(everything=stopping.is_set())
            memory.trim()  # what a dropped caller left (cyclic garbage, large answers) goes back to the system

    async def flush_refusals(self, everything: bool = False) -> None:
        for caller, kind, count, reason in self.refusals.due(everything=everything):
            summary = f"{count} more within {limits.SUMMARY_SECONDS:g} s: {reason}"
            await self._audit_refusal(caller, None, kind, count, summary)

    # --- gate requests: who, then the one place that records and answers -----------------------

    async def _dispatch_gate(self, route: Route, req: dict[str, Any], peer_uid: int, conn: Conn) -> wire.Answer:
        known = self.callers.lookup(peer_uid)
        if known is None:  # the map changed while the connection was open
            raise ProtocolError(f"uid {peer_uid} is no longer an agent's gate user")
        caller = known.name
        broken = self.policy_now()  # the policy of the files on disk, for this request and its decision
        quota = self.cfg.quota(caller)
        try:
            self.holdings.check_audit(caller, quota)
        except TempFail as spent:  # throttled: summed into one record per burst, not one per request
            self._note_refusal(peer_uid, "audit", spent.message)
            return {"ok": False, "exit": spent.exit_code, "error": spent.message}
        started = time.monotonic()
        ctx = Ctx(audit.new_request_id(), caller, known.uid, req["op"], req.get("tool"))
        record = ctx.record()
        try:
            self.audit.check()
            if broken is not None and req["op"] not in _OPEN_WHEN_BROKEN:
                out = Outcome(error=_refusal(broken), counts=False)
            else:
                out = await route.handler(self, req, ctx, conn)
        except Unavailable as unwritable:
            out = Outcome(error=unwritable)
        except Exception as exc:  # the one place that answers: whatever broke, the request is recorded
            log.exception("internal error handling %s for %s", req["op"], caller)
            out = Outcome(error=PrivsepError(f"internal error in the broker ({type(exc).__name__}); see its log"))
        record.update(out.record)
        froze: str | None = None
        error = out.error
        if error is not None:
            decision = decision_for(error.exit_code)
            record["decision"] = record.get("decision") or decision
            record["exit"] = error.exit_code
            if not out.reported:
                record["outcome"] = record.get("outcome") or decision
            hits: set[str] = set()
            record["reason"] = bounded(self.redactor.text(error.message, hits))
            if hits:
                record["redacted"] = sorted(set(record.get("redacted") or []) | hits)
            if out.counts:
                froze = self._count_denial(caller, error)
        else:
            is_error = isinstance(out.result, dict) and out.result.get("isError") and req["op"] == "call"
            record["exit"] = EX_TOOL_ERROR if is_error else EX_OK
        if not out.reported:
            record["duration_ms"] = round((time.monotonic() - started) * 1000, 3)
        try:
            self.holdings.spend_audit(caller, await self.audit.record(**record), quota)
            if froze is not None:
                await self._audit_freeze(caller, ctx.uid, froze)
            if out.guessed is not None:
                await self._freeze_for_guess(ctx, out.guessed)
        except Unavailable as audit_exc:
            return {"ok": False, "exit": audit_exc.exit_code, "error": audit_exc.message}
        if error is not None and not out.reported:
            answer: wire.Answer = {"ok": False, "exit": error.exit_code, "error": self.redactor.text(error.message)}
            if isinstance(error, ServerError):  # for an MCP client, relayed as the JSON-RPC error it was
                answer["rpc_error"] = {"code": error.code, "message": answer["error"]}
            return answer
        return {"ok": True, "result": out.result}

    async def _freeze_for_guess(self, ctx: Ctx, secret: str) -> None:
        """A caller sent a known secret's value: the freeze (made at decision time) recorded, the operator told."""
        reason = f"an argument of {ctx.tool} held the value of the secret {secret}; frozen until an operator lifts it"
        log.warning("caller %s frozen: %s", ctx.caller, reason)
        await self.audit.record(
            id=audit.new_request_id(),
            caller=ctx.caller,
            uid=ctx.uid,
            op="freeze",
            decision="freeze",
            reason=reason,
            secret=secret,
            request=ctx.id,
        )
        command = self.cfg.settings.notify_command
        if command:
            summary = {
                "event": "secret_in_arguments",
                "id": ctx.id,
                "caller": ctx.caller,
                "tool": ctx.tool,
                "secret": secret,
                "frozen": True,
                "ts": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            }
            self.spawn(_run_hook(command, json.dumps(summary).encode(), self.hook_env))

    async def _audit_freeze(self, caller: str, uid: int | None, reason: str) -> None:
        await self.audit.record(
            id=audit.new_request_id(), caller=caller, uid=uid, op="freeze", decision="freeze", reason=reason
        )

    def _count_denial(self, caller: str, exc: PrivsepError) -> str | None:
        """Feed the denial budget; return a reason when this denial froze the caller."""
        s = self.cfg.settings
        if s.denial_budget <= 0 or exc.exit_code not in (EX_NOPERM, EX_DATAERR):
            return None
        if self.state.record_denial(caller, s.denial_budget, s.denial_window, s.freeze_seconds):
            until = self.state.frozen_until(caller)
            log.warning("caller %s frozen until %s", caller, when(until))
            return f"more than {s.denial_budget} denials within {s.denial_window:g} s; frozen until {when(until)}"
        return None

    # --- gate ops ---------------------------------------------------------------------------

    async def op_report(self, req: dict[str, Any], ctx: Ctx, conn: Conn) -> Outcome:
        """A refusal the gate made itself, for the record: it can only ever count against its caller."""
        code = req["exit"]
        rec: AuditRecord = {"verb": req["verb"], "decision": decision_for(code), "source": "gate"}
        error = PrivsepError(req["reason"], code)
        if code == EX_NOPERM:  # the rule that denied: the caller's allowlist
            with contextlib.suppress(PrivsepError, OSError):
                rec["rule"] = allowlist.locate(self.paths.allowlist, self.paths.allowlist_d, ctx.caller)[1]
        # only the gate's own denials feed the denial budget, and never a frozen caller's
        counts = code == EX_NOPERM and self.state.frozen_until(ctx.caller) is None
        return Outcome(rec, error=error, counts=counts, reported=True)

    async def op_status(self, req: dict[str, Any], ctx: Ctx, conn: Conn) -> Outcome:
        allowed = None
        try:
            allowed = self.allowlists.get(ctx.caller)
            mentioned = set(allowed.servers())
            problem = ""
        except ConfigError as exc:
            mentioned, problem = set(), exc.message
        servers = []
        for h in self.servers.all():
            if h.name not in mentioned:
                continue
            entry: dict[str, Any] = {"name": h.name, "state": h.state, "reason": h.reason, "tools": len(h.tools)}
            hidden = sorted(f"{h.name}.{t}" for t in h.hidden if allowed.allows(f"{h.name}.{t}")) if allowed else []
            if hidden:
                entry["hidden"] = {t: h.hidden[t.split(".", 1)[1]] for t in hidden}
            servers.append(entry)
        status: dict[str, Any] = {"broker": "up", "version": __version__, "servers": servers}
        if problem:
            status["allowlist"] = problem
        if self.disk_problem is not None:
            status["broker"] = f"degraded: {_refusal(self.disk_problem).message}"
        if not self.audit.healthy:
            status["broker"] = "degraded: audit log unwritable"
        return Outcome({"decision": "allow"}, status)

    async def _offered(
        self, allowed: Allowlist, caller: str
    ) -> AsyncIterator[tuple[str, ServerHandle, mcp.types.Tool | None]]:
        """Each allowed action of a configured server, with its live definition (for ``caller``) if offered."""
        for action in allowed.actions:
            server_name, _, tool_name = action.partition(".")
            handle = self.servers.get(server_name, caller)
            if handle is None:
                continue
            if handle.state != "up":
                with contextlib.suppress(PrivsepError):
                    await handle.ready(LIST_WAIT)
            yield action, handle, handle.tools.get(tool_name) if handle.state == "up" else None

    async def op_list(self, req: dict[str, Any], ctx: Ctx, conn: Conn) -> Outcome:
        verdict = decide(Query(ctx.caller, "list"), self)
        if verdict.allowlist is None:
            return Outcome(verdict.record(), error=verdict.refusal, counts=_counts(verdict))
        tools = []
        async for action, handle, spec in self._offered(verdict.allowlist, ctx.caller):
            if spec is not None:
                state = self.pin(action, spec)
                description = _BLOCKED.get(state) or first_line(spec.description)
                tools.append({"name": action, "description": self.redactor.text(description)})
            elif handle.state != "up":
                tools.append({"name": action, "description": "(server unavailable)"})
        return Outcome(verdict.record() | {"decision": "allow"}, {"tools": tools})

    async def op_catalog(self, req: dict[str, Any], ctx: Ctx, conn: Conn) -> Outcome:
        """Full MCP tool definitions for ``mcp stdio``: allowed, offered, and matching their pins."""
        verdict = decide(Query(ctx.caller, "list"), self)
        if verdict.allowlist is None:
            return Outcome(verdict.record(), error=verdict.refusal, counts=_counts(verdict))
        tools = [
            catalog_entry(action, spec, self.redactor)
            async for action, _handle, spec in self._offered(verdict.allowlist, ctx.caller)
            if spec is not None and self.pin(action, spec) not in _BLOCKED
        ]
        return Outcome(verdict.record() | {"decision": "allow"}, {"tools": tools})

    def catalog_key(self, allowed: Allowlist, caller: str) -> tuple[Any, ...]:
        """What an ``mcp stdio`` session's tools/list would show ``caller``, as a comparable key (no waiting)."""
        key: list[tuple[str, int, str]] = []
        for action in allowed.actions:
            server_name, _, tool_name = action.partition(".")
            handle = self.servers.get(server_name, caller)
            spec = handle.tools.get(tool_name) if handle is not None and handle.state == "up" else None
            if spec is not None:
                key.append((action, id(spec), self.pin(action, spec)))
        return tuple(key)

    async def op_watch(self, req: dict[str, Any], ctx: Ctx, conn: Conn) -> Outcome:
        """``mcp stdio``'s change feed: a ``{"changed": true}`` frame whenever the caller's tool list changes.

        Whatever changed it: a server up or down, a server's own list change
        (it is listed again), a pin accepted or a definition blocked, the
        allowlist. Held until the session hangs up; one record, at the end.
        """
        verdict = decide(Query(ctx.caller, "list"), self)
        if verdict.allowlist is None:
            return Outcome(verdict.record(), error=verdict.refusal, counts=_counts(verdict))
        last = self.catalog_key(verdict.allowlist, ctx.caller)
        hangup = asyncio.ensure_future(conn.closed())
        try:
            while not hangup.done():
                await asyncio.wait({hangup}, timeout=WATCH_SECONDS)
                try:
                    allowed = self.allowlists.get(ctx.caller)
                except ConfigError:
                    continue  # a broken allowlist: the session's own check says so on its next request
                key = self.catalog_key(allowed, ctx.caller)
                if key != last:
                    last = key
                    await conn.send({"changed": True})
        except (ConnectionError, BrokenPipeError):
            pass
        finally:
            hangup.cancel()
        return Outcome(verdict.record() | {"decision": "allow"}, {})

    async def op_describe(self, req: dict[str, Any], ctx: Ctx, conn: Conn) -> Outcome:
        verdict = await self.decided(Query(ctx.caller, "describe", _action(req["tool"])), READY_WAIT)
        if not verdict.admitted:
            return Outcome(verdict.record(), error=verdict.refusal, counts=_counts(verdict))
        assert verdict.spec is not None
        return Outcome(verdict.record() | {"decision": "allow"}, described(req["tool"], verdict.spec, self.redactor))

    def _timeout(self, req: dict[str, Any], verdict: Verdict) -> float:
        """The call's timeout: the caller's, else the action's policy, the server's, the default; capped."""
        settings = self.cfg.settings
        rules = verdict.rules
        query = verdict.query
        handle = self.servers.get(query.action.server, query.caller) if query.action else None
        chosen = (
            req["timeout"]
            or (rules.timeout if rules is not None else None)
            or (handle.server.spec.timeout if handle is not None else None)
            or settings.call_timeout
        )
        return min(float(chosen), settings.max_call_timeout)

    async def op_call(self, req: dict[str, Any], ctx: Ctx, conn: Conn) -> Outcome:
        quota = self.cfg.quota(ctx.caller)
        try:  # counted until its answer has left the daemon: unread answers count too
            self.holdings.take_call(ctx.caller, quota)
        except TempFail as busy:
            return Outcome({"limit": "calls"}, error=busy, counts=False)
        conn.after_answer.append(lambda: self.holdings.drop_call(ctx.caller))
        query = Query(ctx.caller, "call", _action(req["tool"]), req["kv"], req["args"])
        first = decide(query, self)
        timeout = self._timeout(req, first)
        verdict = first
        if first.waitable:
            verdict = await self.decided(query, min(timeout, READY_WAIT))
        rec = verdict.record()
        if verdict.secret is not None:
            # frozen now, before any other request of this caller is decided; recorded and notified with the answer
            guessed = verdict.secret
            self.state.freeze(ctx.caller, time.time() + OPERATOR_FREEZE, f"an argument held the secret {guessed}")
            rec["secret"] = guessed
            return Outcome(rec, error=verdict.refusal, counts=False, guessed=guessed)
        if not verdict.admitted:
            return Outcome(rec, error=verdict.refusal, counts=_counts(verdict))
        rules, args, action = verdict.rules, verdict.args, verdict.query.action
        assert rules is not None and args is not None and action is not None
        # the rate slot is taken at admission, before any wait (an approval, a restart), in the same step as
        # the check that admitted it; a call refused later gives it back
        slot = self.state.rate_take(rules.rate_key(), rules.rate[1]) if rules.rate is not None else None
        out = await self._admitted_call(req, ctx, conn, query, verdict, timeout, quota, rec)
        if slot is not None and out.record.get("phase") != "outcome":  # it never reached its server
            self.state.rate_release(slot)
        return out

    async def _admitted_call(
        self,
        req: dict[str, Any],
        ctx: Ctx,
        conn: Conn,
        query: Query,
        verdict: Verdict,
        timeout: float,
        quota: limits.Quota,
        rec: AuditRecord,
    ) -> Outcome:
        """An admitted call from its approval (if any) to its outcome; ``rec`` has phase "outcome" once it ran."""
        rules, args, action = verdict.rules, verdict.args, verdict.query.action
        assert rules is not None and args is not None and action is not None
        tool = str(action)
        if self.cfg.settings.log_argument_values:
            rec["args"] = self.redactor.deep(args)
            try:
                self.audit.ensure_room(audit.RESERVE_LOW + rec.get("args_size", 0))  # a larger record than most
            except Unavailable as exc:
                return Outcome(rec, error=exc)
        if rules.mode == "approve":
            try:
                rec["approval"] = await self.approvals.hold(
                    ctx.caller,
                    tool,
                    args,
                    rec["args_digest"],
                    conn,
                    self.cfg.settings.approval_ttl,
                    self.redactor,
                    quota.approvals,
                )
            except PrivsepError as exc:
                return Outcome(rec, error=exc)
        handle = self.servers.get(action.server, ctx.caller)
        assert handle is not None
        # the server may have restarted since the decision (say, during an approval), with other definitions:
        # a call runs only on the definition its decision checked against its pin
        try:
            await handle.ready(min(timeout, READY_WAIT))
        except Unavailable as exc:
            return Outcome(rec, error=exc)
        if handle.tools.get(action.tool) is not verdict.spec:
            again = decide(dataclasses.replace(query, slot_taken=True), self)  # its rate slot is its own
            if again.secret is not None or not again.admitted:
                return Outcome(rec | again.record(), error=again.refusal, counts=_counts(again))
            verdict = again
        if verdict.pin_state == "first-use" and verdict.spec is not None:
            # the operator chose to trust this tool's first definition: what this call runs on is what is pinned
            pinned = self.pins.first_use(tool, verdict.spec)
            await self.audit.record(
                id=audit.new_request_id(),
                caller=ctx.caller,
                op="pin",
                tool=tool,
                decision="pin",
                pin_hash=pinned,
                by="first-use",
            )
        rec["decision"] = "allow"
        if rules.mode == "notify":
            self._notify(ctx, tool, rec)
        # two-phase audit: the intent is durable before the server is asked; a crash leaves it without an outcome
        spent = await self.audit.record(**(ctx.record() | rec | {"phase": "intent"}))
        self.holdings.spend_audit(ctx.caller, spent, quota)
        rec["phase"] = "outcome"
        progress = _relay_progress(conn, self.redactor) if req.get("progress") is True else None
        call = asyncio.ensure_future(handle.call(action.tool, args, timeout, verdict.spec, progress, ctx.caller))
        # the caller hanging up (Ctrl-C on mcp call, notifications/cancelled on mcp stdio) cancels the call at
        # its server too: nothing it has not yet done happens for an answer no one waits for
        hangup = asyncio.ensure_future(conn.closed())
        try:
            await asyncio.wait((call, hangup), return_when=asyncio.FIRST_COMPLETED)
        except BaseException:
            call.cancel()
            raise
        finally:
            hangup.cancel()
        if not call.done():
            call.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await call
            rec["outcome"] = "cancelled"
            return Outcome(rec, error=Cancelled(f"{tool}: cancelled by the caller"), counts=False)
        try:
            result = call.result()
        except mcp.MCPError as exc:
            rec["outcome"] = "server_error"
            if exc.code == -32602:
                return Outcome(rec, error=ArgumentsRejected(f"{tool}: the server rejected the arguments: {exc}"))
            return Outcome(rec, error=ServerError(f"{tool}: the server answered with an error: {exc}", exc.code))
        except TempFail as exc:
            rec["outcome"] = "timeout"
            return Outcome(rec, error=exc)
        except PrivsepError as exc:
            rec["outcome"] = "server_failed"
            return Outcome(rec, error=exc)
        cap = rules.max_output_bytes or self.cfg.settings.max_output_bytes
        hits: set[str] = set()
        rendered, size = render_result(result, cap, self.redactor, hits)
        if hits:  # for the operator: which secrets the server's answer held (the agent's marker names none)
            rec["redacted"] = sorted(hits)
        rec["outcome"] = "tool_error" if result.is_error else "ok"
        rec["result_size"] = size
        fixed = rendered.get("_meta", {}).get(SANITIZED)
        if fixed:
            rec["sanitized"] = fixed
        return Outcome(rec, rendered)

    def _notify(self, ctx: Ctx, tool: str, rec: AuditRecord) -> None:
        """Yellow zone: run the operator's hook with a JSON summary, without waiting for it."""
        command = self.cfg.settings.notify_command
        if not command:
            return
        summary: dict[str, Any] = {"id": ctx.id, "caller": ctx.caller, "tool": tool}
        summary.update({k: rec.get(k) for k in ("arg_keys", "args_digest", "args_size", "rule")})
        summary["ts"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self.spawn(_run_hook(command, json.dumps(summary).encode(), self.hook_env))

    # --- admin requests ---------------------------------------------------------------------

    async def _dispatch_admin(self, route: Route, req: dict[str, Any], peer_uid: int, conn: Conn) -> wire.Answer:
        self.policy_now()  # status and explain show the files on disk as the next call will meet them
        try:
            result = await route.handler(self, req)
        except PrivsepError as exc:
            return {"ok": False, "exit": exc.exit_code, "error": exc.message}
        return {"ok": True, "result": result}

    async def admin_status(self, req: dict[str, Any]) -> dict[str, Any]:
        return {
            "broker": "up",
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": round(time.time() - self.started, 1),
            "audit": self.audit.error if not self.audit.healthy else (self.audit.room_problem or "ok"),
            "audit_trail": self.audit.trail_status(),
            "servers": [self._server_status(h) for h in self.servers.all()],
            "host": self.spawner.host if self.spawner is not None else {},
            "frozen": self.state.freezes(),
            "pending_approvals": len(self.state.approvals("pending")),
            "holdings": self._holdings(),
            "config": self._disk_report(),
        }

    def _holdings(self) -> dict[str, dict[str, Any]]:
        """What each caller holds now, beside its quota (for ``status``)."""
        out: dict[str, dict[str, Any]] = {}
        for caller, held in self.holdings.snapshot().items():
            q = self.cfg.quota(caller)
            out[caller] = held | {"max": {"sessions": q.sessions, "connections": q.connections, "calls": q.calls}}
        return out

    @staticmethod
    def _server_status(h: ServerHandle) -> dict[str, Any]:
        """One instance for ``status``: its state, and for a stdio server who runs it and what protects it."""
        out: dict[str, Any] = {
            "name": h.instance,
            "server": h.name,
            "state": h.state,
            "reason": h.reason,
            "tools": len(h.tools),
            "restarts": h.restarts,
            "transport": h.server.spec.transport,
        }
        if h.hidden:
            out["hidden"] = dict(h.hidden)
        if h.server.spec.transport == "stdio":
            started = h.started
            out["user"] = started.user if started is not None else None
            out["sandbox"] = started.protections if started is not None else {}
            out["sandbox_warnings"] = started.warnings if started is not None else []
            out["sandbox_mode"] = h.server.spec.sandbox
        return out

    async def admin_reload(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.reload()

    async def admin_tools(self, req: dict[str, Any]) -> dict[str, Any]:
        server = req.get("server")
        out = {}
        for h in self.servers.all():
            if server is not None and h.name != server:
                continue
            out[h.name] = [
                {
                    "name": t.name,
                    "description": first_line(t.description),
                    "annotations": hints(t),
                }
                for t in h.tools.values()
            ]
        if server is not None and server not in out:
            raise Unavailable(f"no server named {server}")
        return out

    async def admin_approvals(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        return [a.as_dict() for a in self.state.approvals(req.get("status"))]

    async def admin_approve(self, req: dict[str, Any]) -> dict[str, Any]:
        return (await self.approvals.decide(req["id"], "approved")).as_dict()

    async def admin_reject(self, req: dict[str, Any]) -> dict[str, Any]:
        return (await self.approvals.decide(req["id"], "rejected")).as_dict()

    async def admin_unfreeze(self, req: dict[str, Any]) -> dict[str, Any]:
        found = self.state.unfreeze(req["caller"])
        await self.audit.record(
            id=audit.new_request_id(), caller=req["caller"], op="unfreeze", decision="unfreeze", by="root"
        )
        return {"unfrozen": found}

    async def admin_freezes(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        return self.state.freezes()

    def _allowed_anywhere(self) -> set[str]:
        """Every action some agent's allowlist names now (a broken allowlist names none)."""
        found: set[str] = set()
        for agent in self.agent_names():
            with contextlib.suppress(ConfigError, OSError):
                found |= set(self.allowlists.get(agent).actions)
        return found

    async def admin_pins(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        await self._servers_ready()
        offered = dict(self.servers.offered())
        rows = self.pins.listing(offered, self._allowed_anywhere())
        for row in rows:  # a changed pin comes with its diff, an unreviewed one with what it would pin
            if row["state"] in ("changed", "unreviewed"):
                shown = self.pins.show(row["action"], offered.get(row["action"]))
                row |= {"diff": shown["diff"], "definition": shown["definition"], "offered": shown["hash"]}
            row["policy"] = self.unreviewed_policy(row["action"])
        return rows

    async def _servers_ready(self, server: str | None = None) -> None:
        """Wait (a little) for starting servers: a review right after a start would find nothing offered."""
        for h in self.servers.all():
            if (server is None or h.name == server) and h.state != "up":
                with contextlib.suppress(PrivsepError):
                    await h.ready(READY_WAIT)

    async def admin_pin_show(self, req: dict[str, Any]) -> dict[str, Any]:
        action = req["action"]
        problem = names.action_error(action)
        if problem is not None:
            raise UsageError(f"pins: bad tool name {action!r}: {problem}")
        await self._servers_ready(action.partition(".")[0])
        shown = self.pins.show(action, self.servers.offered().get(action))
        return shown | {"policy": self.unreviewed_policy(action)}

    async def admin_pin_accept(self, req: dict[str, Any]) -> dict[str, Any]:
        action = req["action"]
        await self._servers_ready(action.partition(".")[0])
        spec = self.servers.offered().get(action)
        if spec is None:
            raise PrivsepError(f"{action}: the server does not offer this tool now", EX_FAILED)
        accepted = self.pins.accept(action, spec, req.get("hash"))
        await self.audit.record(
            id=audit.new_request_id(),
            op="pin_accept",
            tool=action,
            decision="pin",
            pin_hash=accepted["hash"],
            by="root",
        )
        return accepted

    async def admin_explain(self, req: dict[str, Any]) -> dict[str, Any]:
        """What a call would meet, step by step, without calling anything (like doas -C)."""
        caller, tool = req["caller"], req["tool"]
        problem = names.action_error(tool)
        if problem is not None:
            raise UsageError(f"explain: bad tool name {tool!r}: {problem}")
        verdict = decide(Query(caller, "call", _action(tool), req["kv"]), self)
        steps = [{"check": s.check, "verdict": s.verdict, "why": s.why} for s in verdict.steps]
        result: dict[str, Any] = {"caller": caller, "tool": tool, "steps": steps, "verdict": verdict.verdict}
        if verdict.admitted and verdict.rules is not None:
            result["policy"] = verdict.rules.describe()
        return result

    # --- agents' server proposals (the work is in broker.daemon.proposals) -----------------

    async def op_propose(self, req: dict[str, Any], ctx: Ctx, conn: Conn) -> Outcome:
        """``mcp propose``: queue a server request for the operator; nothing is installed or run."""
        verdict = decide(Query(ctx.caller, "list"), self)
        if verdict.frozen:  # of the decision's steps only the freeze matters: a proposal names no tool
            return Outcome(verdict.record(), error=verdict.refusal, counts=False)
        reply = self.proposals.submit(ctx.caller, req)
        if reply.error is None and self.cfg.settings.notify_command:
            summary = {k: reply.record.get(k) for k in ("proposal", "server", "package", "tools")}
            summary |= {"event": "proposal", "id": ctx.id, "caller": ctx.caller}
            summary["ts"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            self.spawn(_run_hook(self.cfg.settings.notify_command, json.dumps(summary).encode(), self.hook_env))
        return Outcome(reply.record, reply.result, reply.error, counts=False)

    async def op_proposals(self, req: dict[str, Any], ctx: Ctx, conn: Conn) -> Outcome:
        """``mcp propose --status``: the caller's own proposals, never another agent's."""
        reply = self.proposals.own(ctx.caller)
        return Outcome(reply.record, reply.result, reply.error, counts=False)

    async def admin_proposals(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        return self.proposals.listing(req.get("status"))

    async def admin_proposal_decide(self, req: dict[str, Any]) -> dict[str, Any]:
        return await self.proposals.decide(req["id"], req["decision"], req.get("reason"))


#: what ``mcp list`` says of a tool that is offered but blocked by its pin
_BLOCKED: dict[str, str] = {
    "changed": "(blocked: definition changed)",
    "unreviewed": "(blocked: not reviewed by an operator)",
}


#: gate ops a broken config on disk does not refuse: status (it says so) and the gate's own refusals, for the record
_OPEN_WHEN_BROKEN = frozenset({"status", "report"})


def _refusal(problem: ConfigError) -> ConfigError:
    """What a caller meets while the config on disk is broken: which file, where, and why."""
    return ConfigError(
        f"the broker's configuration is invalid: {problem.message}; every call is refused until it is fixed"
    )


def _counts(verdict: Verdict) -> bool:
    """Whether a refusal feeds the denial budget: not a frozen caller's again, not a tool an operator must review."""
    return not verdict.frozen and verdict.failed_at != "pin"


def _action(tool: str) -> Action:
    """The request's tool as an Action, unchecked: a malformed name is in no allowlist, so decide() denies it."""
    server, _, name = tool.partition(".")
    return Action(server, name)


_GATE: frozenset[Peer] = frozenset({"gate"})
_ROOT: frozenset[Peer] = frozenset({"root"})

#: gate.sock: op -> handler and who may send it; the keys are exactly :data:`broker.core.wire.OPS`
GATE_ROUTES: dict[str, Route] = {
    "list": Route(Broker.op_list, _GATE),
    "describe": Route(Broker.op_describe, _GATE),
    "call": Route(Broker.op_call, _GATE),
    "status": Route(Broker.op_status, _GATE),
    "catalog": Route(Broker.op_catalog, _GATE),
    "watch": Route(Broker.op_watch, _GATE),
    "report": Route(Broker.op_report, _GATE),
    "propose": Route(Broker.op_propose, _GATE),
    "proposals": Route(Broker.op_proposals, _GATE),
}

#: admin.sock: op -> handler, root only; the keys are exactly :data:`broker.core.wire.ADMIN_OPS`
ADMIN_ROUTES: dict[str, Route] = {
    "status": Route(Broker.admin_status, _ROOT),
    "reload": Route(Broker.admin_reload, _ROOT),
    "tools": Route(Broker.admin_tools, _ROOT),
    "approvals": Route(Broker.admin_approvals, _ROOT),
    "approve": Route(Broker.admin_approve, _ROOT),
    "reject": Route(Broker.admin_reject, _ROOT),
    "unfreeze": Route(Broker.admin_unfreeze, _ROOT),
    "freezes": Route(Broker.admin_freezes, _ROOT),
    "pins": Route(Broker.admin_pins, _ROOT),
    "pin_show": Route(Broker.admin_pin_show, _ROOT),
    "pin_accept": Route(Broker.admin_pin_accept, _ROOT),
    "explain": Route(Broker.admin_explain, _ROOT),
    "proposals": Route(Broker.admin_proposals, _ROOT),
    "proposal_decide": Route(Broker.admin_proposal_decide, _ROOT),
}


#: connections over a quota held open at once after their refusal (until the peer hangs up); beyond it, closed
MAX_REFUSING = 256
#: the longest a refused connection is held open after its refusal
REFUSAL_LINGER = 2.0
#: how often a watching session's tool list is compared (in the daemon, without a request)
WATCH_SECONDS = 1.0
#: interim frames waiting in a connection's buffer beyond which progress reports are dropped (a slow reader)
PROGRESS_BUFFER = 64 * 1024


def _relay_progress(conn: Conn, redactor: Redactor) -> Callable[[dict[str, Any]], None]:
    """Progress reports of one call, redacted, to its own connection only, as interim frames; never waits."""

    def relay(report: dict[str, Any]) -> None:
        transport = conn.writer.transport
        if transport.is_closing() or transport.get_write_buffer_size() > PROGRESS_BUFFER:
            return
        with contextlib.suppress(ProtocolError, ValueError):
            conn.writer.write(wire.encode_frame({"progress": redactor.deep(report)}, wire.MAX_REQUEST_BYTES))

    return relay


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


def open_errlog(paths: Paths, settings: Callable[[], Any] | None = None) -> IO[str]:
    """Where stdio servers' stderr goes: a broker-private log file, rotating by size.

    ``settings`` returns the running ``[broker]`` settings (re-read at each
    rotation check, so a reload applies ``servers_log_max_bytes`` and
    ``servers_log_keep``); the daemon's own log follows the same limits.
    """
    bounds = logs.settings_limits(settings) if settings is not None else logs.default_limits
    logs.use_limits(bounds)
    try:
        return logs.open_server_log(f"{paths.log}/servers.log", bounds)
    except OSError:
        return sys.stderr


async def run_broker(
    paths: Paths, cfg: config.Config, ready: Callable[[object], None], channel: socket.socket | None = None
) -> int:
    """Serve until SIGTERM or SIGINT (or the spawner is lost); SIGHUP reloads. ``ready``: the sockets listen.

    ``channel`` is the daemon's end of the spawner's socketpair; without it
    no stdio server can start (HTTP servers without secrets still work).
    """
    spawner = SpawnerClient(channel) if channel is not None else None
    if spawner is not None:
        host = await spawner.hello()
        log.info("spawner ready: %s", ", ".join(f"{k} {v}" for k, v in sorted(host.items())))
    broker = Broker(paths, cfg, spawner)
    await broker.learn_secrets(cfg)
    broker.redactor = Redactor(cfg.secrets())
    logs.install(broker.redact)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, broker.stopping.set)

    def on_hup() -> None:
        async def do() -> None:
            try:
                await broker.reload()
            except ConfigError as exc:
                log.error("reload refused, keeping the running config: %s", exc)

        broker.spawn(do())

    loop.add_signal_handler(signal.SIGHUP, on_hup)
    await broker.record_start()
    await broker.serve()
    broker.servers.start()
    health = asyncio.create_task(broker.servers.health_loop(broker.stopping))
    summaries = asyncio.create_task(broker.refusal_loop(broker.stopping))
    log.info("mcp-brokerd %s ready (pid %d), %d servers", __version__, os.getpid(), len(cfg.servers))
    memory.settle()  # start-up's objects are never garbage: later collections skip them
    ready(None)
    lost = asyncio.create_task(spawner.lost.wait()) if spawner is not None else None
    stop = asyncio.create_task(broker.stopping.wait())
    await asyncio.wait([t for t in (lost, stop) if t is not None], return_when=asyncio.FIRST_COMPLETED)
    code = EX_OK
    if lost is not None and lost.done():
        log.error("the spawner is gone: stopping (a supervisor restarts the broker)")
        code = EX_SOFTWARE
    for task in (lost, stop):
        if task is not None:
            task.cancel()
    log.info("stopping")
    health.cancel()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(summaries, 5)  # the refusals summed so far are recorded before the log closes
    await broker.close()
    if spawner is not None:
        spawner.close()
    return code


__all__ = ["ADMIN_ROUTES", "GATE_ROUTES", "Broker", "run_broker"]
