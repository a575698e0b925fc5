"""What leaves the daemon for the gate: tool results and tool definitions, redacted and capped.

A result is rendered once here for every client: joined text for ``mcp
call``, the content blocks and structured content for ``mcp stdio`` and
``--json``. Definitions are what pinning covers (:mod:`broker.daemon.pins`),
shown under the action's full ``server.tool`` name. Nothing here talks to a
server or decides a call.
"""

from __future__ import annotations

from typing import Any

import mcp

from broker.core import wire
from broker.daemon.redact import Redactor

#: ``_meta`` keys the broker adds to a result (MCP reserves no prefix for them: a reverse-DNS-like one of its own)
SANITIZED = "mcp-privsep/sanitized"
TRUNCATED = "mcp-privsep/truncated"
#: ``_meta`` keys MCP reserves for the protocol itself: a server's say of its own hop, never passed on
PROTOCOL_KEYS = "io.modelcontextprotocol/"


def first_line(text: str | None) -> str:
    """The first non-blank line, stripped and cut at 200 characters (descriptions in listings)."""
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


def wire_form(model: Any) -> Any:
    """A model of the SDK as MCP puts it on the wire: camelCase aliases (``mimeType``, ``_meta``), no nulls."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def hints(spec: mcp.types.Tool) -> dict[str, Any]:
    """The tool's annotations under their MCP names (``readOnlyHint``)."""
    return wire_form(spec.annotations) if spec.annotations else {}


def definition(spec: mcp.types.Tool) -> dict[str, Any]:
    """The view pins hash (:mod:`broker.daemon.pins`): name, description, schema, annotations.

    Its shape is frozen: a change would make every pin of an installation
    mismatch after an upgrade and block every pinned tool. Its annotation
    keys are the SDK's field names, as they were when pins were first made.
    """
    return {
        "name": spec.name,
        "description": spec.description or "",
        "input_schema": spec.input_schema,
        "annotations": spec.annotations.model_dump(mode="json", exclude_none=True) if spec.annotations else {},
    }


def tool_definition(
    action: str, spec: mcp.types.Tool, redactor: Redactor, hits: set[str] | None = None
) -> dict[str, Any]:
    """The whole definition in MCP's wire form, under the action's ``server.tool`` name, redacted.

    Every field the server sent is kept (``title``, ``inputSchema``,
    ``outputSchema``, ``annotations``, ``icons``, ``execution``, ``_meta``):
    a client that sees no ``readOnlyHint`` asks approval for everything.
    """
    shown = wire_form(spec)
    shown["name"] = action
    if not shown.get("inputSchema"):
        shown["inputSchema"] = {"type": "object"}  # MCP requires one; {} says nothing
    if not shown.get("annotations"):
        shown.pop("annotations", None)
    return _joint_strings(redactor.deep(shown, hits), redactor, hits)  # type: ignore[no-any-return]


def described(action: str, spec: mcp.types.Tool, redactor: Redactor) -> dict[str, Any]:
    """``mcp describe``: the definition in wire form (``inputSchema``, ``annotations`` ...)."""
    return tool_definition(action, spec, redactor)


def catalog_entry(action: str, spec: mcp.types.Tool, redactor: Redactor) -> dict[str, Any]:
    """One tool of ``mcp stdio``'s ``tools/list``, in MCP's wire form."""
    return tool_definition(action, spec, redactor)


def _strings(value: Any) -> list[str]:
    """The string values (not keys) inside a JSON-like value, in order."""
    out: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            stack.extend(reversed(list(item.values())))
    return out


def _joint_strings(value: Any, redactor: Redactor, hits: set[str] | None) -> Any:
    """``value`` with its string values (in order) redacted as one text too (:meth:`Redactor.joint`)."""
    if not redactor:
        return value
    slots: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        item = stack.pop()
        pairs = enumerate(item) if isinstance(item, list) else item.items() if isinstance(item, dict) else ()
        children = []
        for key, child in pairs:
            if isinstance(child, str):
                slots.append((item, key))
            elif isinstance(child, list | dict):
                children.append(child)
        stack.extend(reversed(children))
    if len(slots) < 2:
        return value
    strings = [container[key] for container, key in slots]
    redacted = redactor.joint(strings, hits)
    for (container, key), old, new in zip(slots, strings, redacted, strict=True):
        if new is not old:
            container[key] = new
    return value


def render_result(
    result: mcp.types.CallToolResult, cap: int, redactor: Redactor, hits: set[str] | None = None
) -> tuple[dict[str, Any], int]:
    """(the answer the gate prints, the result's size before the cap): sanitized, redacted, then capped.

    The answer is the result in MCP's wire form (``content``,
    ``structuredContent``, ``isError``, ``_meta``, every block as the server
    sent it: ``mimeType``, ``annotations``, ``_meta``), with ``text``, the
    blocks joined for ``mcp call``. The text, the blocks and the structured
    content all count against the cap; over it, the one text block left
    says so. What a server sent that no side can encode (lone surrogates,
    NaN and infinities) is replaced, and ``_meta`` says how much of each.
    Redaction (``hits`` collects the names of the secrets found) reads every
    field, each block, the blocks' texts joined, and the structured content.
    """
    raw_blocks = [wire_form(block) for block in result.content]  # block by block, as each one's own type
    (raw_blocks, structured, meta), fixed = wire.sanitize([raw_blocks, result.structured_content, result.meta])
    texts: list[str] = []
    blocks: list[dict[str, Any]] = raw_blocks
    # one detection pass over the whole result first (and over the texts as mcp call joins them, and the
    # structured content's strings in order): the common answer, no secret, costs only that
    block_texts = [
        h["text"]
        for b in raw_blocks
        if isinstance(h := (b.get("resource") if b.get("type") == "resource" else b), dict)
        and isinstance(h.get("text"), str)
    ]
    secret_in_it = bool(redactor) and redactor.holds(
        [raw_blocks, structured, meta, "\n".join(block_texts), "\n".join(_strings(structured))]
    )
    if secret_in_it:
        blocks = [redactor.deep(block, hits) for block in raw_blocks]
        # a secret split over two blocks reads whole when they are joined (mcp call prints them joined)
        readable: list[tuple[dict[str, Any], str]] = []
        for b in blocks:
            holder = b.get("resource") if b.get("type") == "resource" else b if b.get("type") == "text" else None
            if isinstance(holder, dict) and isinstance(holder.get("text"), str):
                readable.append((holder, "text"))
        for (holder, key), new in zip(readable, redactor.joint([h[k] for h, k in readable], hits), strict=True):
            holder[key] = new
    for data in blocks:
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
    if secret_in_it:
        structured = _joint_strings(redactor.deep(structured, hits), redactor, hits)
    if not text and structured is not None:
        text = wire.dumps(structured)
    out: dict[str, Any] = {"content": blocks, "isError": bool(result.is_error), "text": text}
    if structured is not None:
        out["structuredContent"] = structured
    # the protocol's own keys (io.modelcontextprotocol/...) are of the hop between the broker and its server
    notes: dict[str, Any] = {
        k: v
        for k, v in ((redactor.deep(meta, hits) if secret_in_it else meta) if isinstance(meta, dict) else {}).items()
        if not k.startswith(PROTOCOL_KEYS)
    }
    if fixed:
        notes[SANITIZED] = fixed
    size = max(len(wire.to_utf8(text)), len(wire.dumps(blocks)), len(wire.dumps(structured)))
    if size > cap:
        cut = wire.to_utf8(text)[:cap].decode("utf-8", "ignore")
        out["text"] = cut + f"\n[output truncated: the result was {size} bytes, over the {cap}-byte cap]"
        out["content"] = [{"type": "text", "text": out["text"]}]
        out.pop("structuredContent", None)
        notes[TRUNCATED] = {"size": size, "cap": cap}
    if notes:
        out["_meta"] = notes
    return out, size
