"""Tool-definition pins: a tool runs only on a definition a person reviewed, or chose to trust on first use.

A pin is the digest of a tool's whole definition (every field the server
sent: ``name``, ``title``, ``description``, ``inputSchema``,
``outputSchema``, ``annotations``, ``icons``, ``execution``, ``_meta``), as
canonical JSON, with the digest's version in front (``2:<sha256>``).

* An operator pins what they saw: ``mcp-brokerctl allow`` and ``pins
  accept`` show the definition (or the diff) and send back the digest they
  showed; if the live definition differs by then, nothing is pinned.
* An allowlisted tool with no pin is *unreviewed*: blocked, unless the
  operator chose ``pin = "first-use"`` (``[broker]`` or the server's table),
  where its first call pins it. An agent's call alone never makes a pin.
* A pin of version 1 (the first release: name, description, input schema
  and annotations only) still holds after an upgrade: where it matches the
  live definition it is re-pinned at version 2 silently, so nothing that
  was trusted is blocked; where it does not, the tool is blocked as changed.

The pins live in :class:`broker.daemon.state.State`; nothing here decides a
call (:mod:`broker.daemon.decision` does, with what :meth:`PinBook.check`
says).
"""

from __future__ import annotations

import difflib
import hashlib
import json
from typing import Any, Literal

import mcp

from broker.core.errors import EX_FAILED, PrivsepError
from broker.daemon.results import definition, wire_form
from broker.daemon.state import State

#: "pinned": matches its pin; "changed": differs, so it is blocked; "unreviewed": no pin yet
PinState = Literal["pinned", "changed", "unreviewed"]
#: what ``mcp-brokerctl pins`` shows for each tool
PinListing = Literal["ok", "changed", "unreviewed", "not offered now"]
#: the version of the digests made now
VERSION = 2


def canonical_v1(spec: mcp.types.Tool) -> str:
    """What a version-1 pin covered, exactly as the first release wrote it (frozen: old pins are read with it)."""
    return json.dumps(definition(spec), sort_keys=True, separators=(",", ":"))


def canonical_v2(spec: mcp.types.Tool) -> str:
    """The whole definition in MCP's wire form, canonical JSON."""
    return json.dumps(wire_form(spec), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def tool_digest(spec: mcp.types.Tool) -> tuple[str, str]:
    """(``2:<sha256>``, canonical JSON) of the definition: what a pin made now covers."""
    text = canonical_v2(spec)
    return f"{VERSION}:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}", text


def digest_v1(spec: mcp.types.Tool) -> str:
    return hashlib.sha256(canonical_v1(spec).encode()).hexdigest()


def version_of(digest: str) -> int:
    """A pin's digest version: ``2:...`` is 2; a bare hex digest is the first release's."""
    head, sep, _ = digest.partition(":")
    return int(head) if sep and head.isdigit() else 1


def pretty(canonical: str) -> str:
    return json.dumps(json.loads(canonical), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


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
        """Whether ``spec`` matches the pin of ``action``; makes no pin (but re-pins a matching v1 pin at v2)."""
        pinned = self.state.pin(action)
        if pinned is None:
            return "unreviewed"
        digest, text = self.digest(action, spec)
        if pinned[0] == digest:
            return "pinned"
        if version_of(pinned[0]) == 1 and pinned[0] == digest_v1(spec):
            self.state.set_pin(action, digest, text)  # the same trust, written the way this version reads it
            return "pinned"
        return "changed"

    def first_use(self, action: str, spec: mcp.types.Tool) -> str:
        """Pin ``spec`` because its first call came where the operator chose ``pin = "first-use"``."""
        digest, text = self.digest(action, spec)
        self.state.set_pin(action, digest, text)
        return digest

    def listing(self, offered: dict[str, mcp.types.Tool | None], allowed: set[str]) -> list[dict[str, str]]:
        """Every pin, and every allowlisted tool offered with none, with its state against what is offered now."""
        out = []
        pins = self.state.pins()
        for action in sorted(set(pins) | {a for a in allowed if offered.get(a) is not None}):
            spec = offered.get(action)
            found = "not offered now" if spec is None else self.check(action, spec)
            state: PinListing = "ok" if found == "pinned" else found
            held = self.state.pin(action)
            out.append({"action": action, "hash": held[0] if held else "", "state": state})
        return out

    def show(self, action: str, spec: mcp.types.Tool | None) -> dict[str, Any]:
        """What an operator reviews: the live definition, its digest, and the diff from the pin (if any)."""
        old = self.state.pin(action)
        out: dict[str, Any] = {"action": action, "pinned": old[0] if old else None}
        if spec is None:
            return out | {"state": "not offered now", "hash": None, "definition": None, "diff": ""}
        state = self.check(action, spec)
        old = self.state.pin(action)  # check may have re-pinned a v1 pin
        digest, text = self.digest(action, spec)
        diff = ""
        if old is not None and old[0] != digest:
            # a v1 pin is compared with the v1 view of the live definition: the diff shows what changed, not the format
            now = canonical_v1(spec) if version_of(old[0]) == 1 else text
            diff = "".join(
                difflib.unified_diff(
                    pretty(old[1]).splitlines(keepends=True),
                    pretty(now).splitlines(keepends=True),
                    fromfile=f"{action} (pinned)",
                    tofile=f"{action} (offered now)",
                )
            )
        return out | {"state": state, "hash": digest, "definition": pretty(text), "diff": diff}

    def accept(self, action: str, spec: mcp.types.Tool, expect: str | None = None) -> dict[str, object]:
        """Pin what is offered now, if it is what the operator was shown (``expect``: the digest shown).

        Returns the new digest, the diff from the old pin and whether it changed.
        """
        shown = self.show(action, spec)
        digest = shown["hash"]
        if expect is not None and expect != digest:
            raise PrivsepError(
                f"{action}: the definition changed since it was shown; nothing pinned "
                f"(look again: mcp-brokerctl pins show {action})",
                EX_FAILED,
            )
        old = self.state.pin(action)
        _, text = self.digest(action, spec)
        self.state.set_pin(action, digest, text)
        return {"action": action, "hash": digest, "diff": shown["diff"], "changed": old is None or old[0] != digest}
