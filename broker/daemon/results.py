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


def first_line(text: str | None) -> str:
    """The first non-blank line, stripped and cut at 200 characters (descriptions in listings)."""
    for line in (text or "").splitlines():
        if line.strip():
            return line.strip()[:200]
    return ""


def hints(spec: mcp.types.Tool) -> dict[str, Any]:
    return spec.annotations.model_dump(mode="json", exclude_none=True) if spec.annotations else {}


def definition(spec: mcp.types.Tool) -> dict[str, Any]:
    """The parts of a tool's definition the broker shows and pins: name, description, schema, annotations."""
    return {
        "name": spec.name,
        "description": spec.description or "",
        "input_schema": spec.input_schema,
        "annotations": hints(spec),
    }


def described(action: str, spec: mcp.types.Tool, redactor: Redactor) -> dict[str, Any]:
    """``mcp describe``: the definition under the action's name, redacted."""
    shown = definition(spec)
    shown["name"] = action
    return redactor.deep(shown)  # type: ignore[no-any-return]


def catalog_entry(action: str, spec: mcp.types.Tool, redactor: Redactor) -> dict[str, Any]:
    """One tool of ``mcp stdio``'s ``tools/list``, in MCP's wire names."""
    entry: dict[str, Any] = {
        "name": action,
        "description": redactor.text(spec.description or ""),
        "inputSchema": spec.input_schema or {"type": "object"},
    }
    shown = hints(spec)
    if shown:
        entry["annotations"] = shown
    return entry


def render_result(result: mcp.types.CallToolResult, cap: int, redactor: Redactor) -> tuple[dict[str, Any], int]:
    """(the answer the gate prints, the result's size before the cap): sanitized, redacted, then capped.

    The answer holds the joined text, the blocks (images, embedded blobs) and
    the structured content; all three count against the cap. What a server
    sent that no side can encode (lone surrogates, NaN and infinities) is
    replaced, and ``sanitized`` says how much of each.
    """
    raw_blocks = [block.model_dump(mode="json", exclude_none=True) for block in result.content]
    (raw_blocks, structured), fixed = wire.sanitize([raw_blocks, result.structured_content])
    texts: list[str] = []
    blocks: list[dict[str, Any]] = []
    for raw in raw_blocks:
        data = redactor.deep(raw)
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
    structured = redactor.deep(structured)
    if not text and structured is not None:
        text = wire.dumps(structured)
    out: dict[str, Any] = {"is_error": bool(result.is_error), "text": text, "content": blocks}
    if structured is not None:
        out["structured_content"] = structured
    if fixed:
        out["sanitized"] = fixed
    size = max(len(wire.to_utf8(text)), len(wire.dumps(blocks)), len(wire.dumps(structured)))
    if size > cap:
        cut = wire.to_utf8(text)[:cap].decode("utf-8", "ignore")
        out["text"] = cut + f"\n[output truncated: the result was {size} bytes, over the {cap}-byte cap]"
        out["truncated"] = True
        out["content"] = []
        out.pop("structured_content", None)
    return out, size
