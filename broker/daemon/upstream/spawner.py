"""The daemon's end of the spawner channel: typed stubs for each request (OpenSSH's ``monitor_wrap``).

Requests go one at a time (a lock) on a worker thread (the channel's
socket is blocking; descriptor passing has no asyncio API), and each answer
is checked against what was asked (:func:`broker.core.channel.check_answer`)
before anything in it is used. A channel that breaks (the spawner died,
or answered out of turn) is lost for good: :attr:`SpawnerClient.lost` is
set and every later request fails, and the daemon stops, since it can no
longer start or stop a server. A refusal (a server that cannot run) is an
:class:`broker.core.errors.Unavailable` with the spawner's reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from dataclasses import dataclass, field
from typing import Any

from broker.core import channel
from broker.core.errors import ProtocolError, Unavailable
from broker.daemon.upstream.stdio import pipe_streams

log = logging.getLogger("mcp-brokerd")

#: seconds a request may take (a start sets up the sandbox and forks; the spawner bounds that at 15 s)
REQUEST_SECONDS = 30.0


@dataclass
class Started:
    """What the spawner reported about a started instance."""

    pid: int
    user: str
    protections: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class SpawnedProcess:
    """A server the spawner started: its pipes as streams; :meth:`kill` has the spawner end its process tree."""

    def __init__(
        self,
        spawner: SpawnerClient,
        server: str,
        agent: str | None,
        started: Started,
        streams: tuple[asyncio.StreamWriter, asyncio.StreamReader, asyncio.StreamReader],
    ) -> None:
        self.spawner = spawner
        self.server = server
        self.agent = agent
        self.started = started
        self.stdin, self.stdout, self.stderr = streams

    async def kill(self) -> None:
        try:
            await self.spawner.stop(self.server, self.agent)
        except Unavailable as exc:
            log.warning("could not stop %s: %s", self.server, exc)


class SpawnerClient:
    """Typed requests to the spawner over its socketpair."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sock.settimeout(REQUEST_SECONDS)
        self._lock = asyncio.Lock()
        self.lost: asyncio.Event = asyncio.Event()
        self.host: dict[str, Any] = {}

    def _exchange(self, op: str, fields: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        channel.send(self.sock, channel.request(op, **fields), channel.MAX_REQUEST_BYTES)
        answer, fds = channel.recv(self.sock, channel.MAX_ANSWER_BYTES, channel.START_FDS)
        if answer is None:
            raise ProtocolError("the spawner closed the channel")
        try:
            return channel.check_answer(op, answer, fds), fds
        except BaseException:
            channel.close_all(fds)
            raise

    async def ask(self, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
        """One request and its checked answer; Unavailable for a refusal or a lost channel."""
        if self.lost.is_set():
            raise Unavailable("the spawner is gone: no server can be started (restart mcp-brokerd)")
        async with self._lock:
            try:
                answer, fds = await asyncio.to_thread(self._exchange, op, fields)
            except (OSError, ProtocolError) as exc:
                self.lost.set()
                log.error("the spawner channel broke (%s: %s); no server can be started or stopped", op, exc)
                raise Unavailable("the spawner is gone: no server can be started (restart mcp-brokerd)") from None
        if not answer["ok"]:
            raise Unavailable(str(answer["error"]))
        return answer, fds

    async def hello(self) -> dict[str, Any]:
        answer, _ = await self.ask("hello")
        self.host = answer["host"]
        return self.host

    async def load(self) -> dict[str, Any]:
        answer, _ = await self.ask("load")
        return answer

    async def secrets(self, server: str) -> dict[str, Any]:
        answer, _ = await self.ask("secrets", server=server)
        return answer

    async def start(self, server: str, agent: str | None) -> SpawnedProcess:
        answer, fds = await self.ask("start", server=server, agent=agent)
        started = Started(answer["pid"], answer["user"], answer["protections"], list(answer["warnings"]))
        try:
            streams = await pipe_streams(*fds)
        except BaseException:
            channel.close_all(fds)
            await self.stop(server, agent)
            raise
        return SpawnedProcess(self, server, agent, started, streams)

    async def stop(self, server: str, agent: str | None) -> bool:
        answer, _ = await self.ask("stop", server=server, agent=agent)
        return bool(answer["stopped"])

    def close(self) -> None:
        """Close the channel: the spawner stops every server and exits."""
        with contextlib.suppress(OSError):
            self.sock.close()
