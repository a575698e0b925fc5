"""The set of configured servers the daemon keeps warm: start, reload, health, and what each offers.

One :class:`broker.daemon.upstream.handle.ServerHandle` per server of the
config. A reload keeps the sessions of unchanged servers, stops removed
ones and restarts changed ones; the health loop pings idle sessions so a
dead process is noticed between calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import IO, Any

import mcp

from broker.core.names import Action
from broker.daemon import config
from broker.daemon.decision import Offer
from broker.daemon.logs import server_sink
from broker.daemon.upstream.handle import ServerHandle

log = logging.getLogger("mcp-brokerd")

HEALTH_INTERVAL = 10.0


class ServerSet:
    """Handles by server name."""

    def __init__(
        self, cfg: config.Config, base_env: dict[str, str], errlog: IO[str], redact: Callable[[str], str]
    ) -> None:
        self.cfg = cfg
        self.base_env = base_env
        self.errlog = errlog
        self.redact = redact
        self.handles: dict[str, ServerHandle] = {}

    def _settings(self) -> dict[str, Any]:
        s = self.cfg.settings
        return {
            "connect_timeout": s.connect_timeout,
            "backoff_max": s.restart_backoff_max,
            "max_message": s.max_server_message_bytes,
            "max_tools": s.max_listed_tools,
        }

    def _handle(self, server: config.Server) -> ServerHandle:
        return ServerHandle(
            server,
            base_env=self.base_env,
            errlog=server_sink(server.name, self.errlog, self.redact),
            **self._settings(),
        )

    def get(self, name: str) -> ServerHandle | None:
        return self.handles.get(name)

    def all(self) -> list[ServerHandle]:
        return list(self.handles.values())

    def start(self) -> None:
        for server in self.cfg.servers.values():
            handle = self._handle(server)
            self.handles[server.name] = handle
            handle.start()

    async def reload(self, cfg: config.Config) -> dict[str, list[str]]:
        """Apply a new config: start added servers, stop removed ones, restart changed ones."""
        old = self.handles
        added: list[str] = []
        changed: list[str] = []
        new: dict[str, ServerHandle] = {}
        self.cfg = cfg
        for name, server in cfg.servers.items():
            current = old.get(name)
            if current is not None and current.server.fingerprint() == server.fingerprint():
                current.server = server
                current.configure(**self._settings())  # [broker] changes reach running servers too
                new[name] = current
                continue
            (changed if current is not None else added).append(name)
            new[name] = self._handle(server)
        removed = [n for n in old if n not in cfg.servers]
        for name in removed + changed:
            await old[name].stop()
        self.handles = new
        for name in added + changed:
            new[name].start()
        log.info("reloaded: added %s, removed %s, restarted %s", added, removed, changed)
        return {"added": added, "removed": removed, "restarted": changed}

    async def health_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), HEALTH_INTERVAL)
            for handle in list(self.handles.values()):
                await handle.health()

    async def close(self) -> None:
        for handle in self.handles.values():
            await handle.stop()

    def offer(self, action: Action) -> Offer:
        """What the server behind ``action`` offers now (see :class:`broker.daemon.decision.Offer`)."""
        handle = self.handles.get(action.server)
        if handle is None:
            return Offer("unconfigured")
        spec = handle.tools.get(action.tool) if handle.state == "up" else None
        return Offer(handle.state, spec, handle.reason, handle.waitable)

    def offered(self) -> dict[str, mcp.types.Tool | None]:
        """Every tool every server offers now, by action name."""
        return {f"{h.name}.{name}": spec for h in self.handles.values() for name, spec in h.tools.items()}
