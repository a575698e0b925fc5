"""Tool-definition pins: a tool whose definition changed since it was pinned is blocked.

A definition (see :func:`broker.daemon.results.definition`) is pinned by the
SHA-256 of its canonical JSON the first time the broker sees it for an
allowed action; a later, different definition blocks that action until an
operator accepts it (``mcp-brokerctl pins accept``), which shows the diff.
The pins live in :class:`broker.daemon.state.State`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
from typing import Literal

import mcp

from broker.daemon.results import definition
from broker.daemon.state import State

#: "pinned": matches its pin (first sight records it); "changed": differs, so it is blocked
PinState = Literal["pinned", "changed"]
#: what ``mcp-brokerctl pins`` shows for each pin
PinListing = Literal["ok", "changed", "not offered now"]


def tool_digest(spec: mcp.types.Tool) -> tuple[str, str]:
    """(sha256, canonical JSON) of what pinning covers."""
    text = json.dumps(definition(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest(), text


def pretty(canonical: str) -> str:
    return json.dumps(json.loads(canonical), indent=2, sort_keys=True) + "\n"


class PinBook:
    """Pin checks with a digest cache: a listed definition never changes in place, so it is hashed once."""

    def __init__(self, state: State) -> None:
        self.state = state
        #: action -> (the definition object hashed, its digest, its canonical JSON); one entry per action
        self._digests: dict[str, tuple[mcp.types.Tool, str, str]] = {}

    def digest(self, action: str, spec: mcp.types.Tool) -> tuple[str, str]:
        hit = self._digests.get(action)
        if hit is not None and hit[0] is spec:
            return hit[1], hit[2]
        digest, text = tool_digest(spec)
        self._digests[action] = (spec, digest, text)
        return digest, text

    def check(self, action: str, spec: mcp.types.Tool) -> PinState:
        """'pinned' (first sight records the pin), or 'changed'."""
        digest, text = self.digest(action, spec)
        pinned = self.state.pin(action)
        if pinned is None:
            self.state.set_pin(action, digest, text)
            return "pinned"
        return "pinned" if pinned[0] == digest else "changed"

    def listing(self, offered: dict[str, mcp.types.Tool | None]) -> list[dict[str, str]]:
        """Every pin with its state against what is offered now (``offered``: action -> live definition)."""
        out = []
        for action, (digest, _text) in sorted(self.state.pins().items()):
            spec = offered.get(action)
            state: PinListing = (
                "not offered now" if spec is None else "ok" if self.digest(action, spec)[0] == digest else "changed"
            )
            out.append({"action": action, "hash": digest, "state": state})
        return out

    def accept(self, action: str, spec: mcp.types.Tool) -> dict[str, object]:
        """Pin what is offered now; return the new digest, the diff from the old pin and whether it changed."""
        digest, text = self.digest(action, spec)
        old = self.state.pin(action)
        diff = "".join(
            difflib.unified_diff(
                pretty(old[1]).splitlines(keepends=True) if old else [],
                pretty(text).splitlines(keepends=True),
                fromfile=f"{action} (pinned)",
                tofile=f"{action} (offered now)",
            )
        )
        self.state.set_pin(action, digest, text)
        return {"action": action, "hash": digest, "diff": diff, "changed": old is None or old[0] != digest}
