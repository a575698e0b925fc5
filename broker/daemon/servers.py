"""The set of configured server instances the daemon keeps warm: start, reload, health, what each offers.

One :class:`broker.daemon.upstream.handle.ServerHandle` per instance: per
server, or, for a ``per_caller`` server, per agent of the gate-users map
(``NAME@AGENT``), so a call reaches only its own caller's instance. A
reload keeps the sessions of unchanged instances, stops removed ones and
restarts changed ones; the health loop pings idle sessions so a dead
process is noticed between calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import IO, Any

import mcp

from broker.core.names import Action
from broker.core.servers import instance_name
from broker.daemon import config
from broker.daemon.decision import Offer
from broker.daemon.logs import server_sink
from broker.daemon.upstream.handle import ServerHandle
from broker.daemon.upstream.spawner import SpawnerClient

log = logging.getLogger("mcp-brokerd")

HEALTH_INTERVAL = 10.0


def instances(cfg: config.Config, agents: list[str]) -> list[tuple[config.Server, str | None]]:
    """(server, agent) of every instance the config asks for (agent None: one shared instance)."""
    out: list[tuple[config.Server, str | None]] = []
    for server in cfg.servers.values():
        if server.spec.per_caller:
            out.extend((server, agent) for agent in agents)
        else:
            out.append((server, None))
    return out


class ServerSet:
    """Handles by instance (``NAME`` or ``NAME@AGENT``)."""

    def __init__(
        self,
        cfg: config.Config,
        spawner: SpawnerClient | None,
        errlog: IO[str],
        redact: Callable[[str], str],
        agents: list[str] | None = None,
    ) -> None:
        self.cfg = cfg
        self.spawner = spawner
        self.errlog = errlog
        self.redact = redact
        self.agents = list(agents or [])
        self.handles: dict[str, ServerHandle] = {}

    def _settings(self) -> dict[str, Any]:
        s = self.cfg.settings
        return {
            "connect_timeout": s.connect_timeout,
            "backoff_max": s.restart_backoff_max,
            "max_message": s.max_server_message_bytes,
            "max_tools": s.max_listed_tools,
            "cancel_grace": s.cancel_grace,
        }

    def _handle(self, server: config.Server, agent: str | None) -> ServerHandle:
        key = instance_name(server.name, agent)
        return ServerHandle(
            server,
            spawner=self.spawner,
            agent=agent,
            errlog=server_sink(key, self.errlog, self.redact),
            **self._settings(),
        )

    def get(self, name: str, caller: str | None = None) -> ServerHandle | None:
        """The instance that serves ``caller`` for server ``name`` (its own one, for a per-caller server)."""
        server = self.cfg.servers.get(name)
        if server is not None and server.spec.per_caller:
            return self.handles.get(instance_name(name, caller)) if caller is not None else None
        return self.handles.get(name)

    def all(self) -> list[ServerHandle]:
        return list(self.handles.values())

    def start(self) -> None:
        for server, agent in instances(self.cfg, self.agents):
            handle = self._handle(server, agent)
            self.handles[handle.instance] = handle
            handle.start()

    async def reload(self, cfg: config.Config, agents: list[str]) -> dict[str, list[str]]:
        """Apply a new config (and agents): start added instances, stop removed ones, restart changed ones."""
        old = self.handles
        added: list[str] = []
        changed: list[str] = []
        new: dict[str, ServerHandle] = {}
        self.cfg = cfg
        self.agents = list(agents)
        for server, agent in instances(cfg, self.agents):
            key = instance_name(server.name, agent)
            current = old.get(key)
            if current is not None and current.server.fingerprint() == server.fingerprint():
                current.server = server
                current.configure(**self._settings())  # [broker] changes reach running servers too
                new[key] = current
                continue
            (changed if current is not None else added).append(key)
            new[key] = self._handle(server, agent)
        removed = [key for key in old if key not in new]
        for key in removed + changed:
            await old[key].stop()
        self.handles = new
        for key in added + changed:
            new[key].start()
        log.info("reloaded: added %s, removed %s, restarted %s", added, removed, changed)
        return {"added": added, "removed": removed, "restarted": changed}

    async def health_loop(self, stopping: asyncio.Event) -> None:
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), HEALTH_INTERVAL)
            for handle in list(self.handles.values()):
                await handle.health()

    async def close(self) -> None:
        await asyncio.gather(*(handle.stop() for handle in self.handles.values()))

    def offer(self, action: Action, caller: str | None = None) -> Offer:
        """What the instance behind ``action`` for ``caller`` offers now (see :class:`broker.daemon.decision.Offer`)."""
        if action.server not in self.cfg.servers:
            return Offer("unconfigured")
        handle = self.get(action.server, caller)
        if handle is None:
            return Offer("down", None, f"no instance for {caller} (is it in the gate-users map?)", False)
        spec = handle.tools.get(action.tool) if handle.state == "up" else None
        return Offer(handle.state, spec, handle.reason, handle.waitable)

    def offered(self) -> dict[str, mcp.types.Tool | None]:
        """Every tool every instance offers now, by action name (one definition per action)."""
        return {f"{h.name}.{name}": spec for h in self.handles.values() for name, spec in h.tools.items()}
