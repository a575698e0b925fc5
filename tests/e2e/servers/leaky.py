"""An MCP stdio server that leaks its own secrets, for the redaction tests: standard library only, raw JSON-RPC.

Its secret ``LEAKY_SECRET`` and numeric ``LEAKY_PIN`` come from its env
file, as a real server's token would. It hands them back in every encoding
of :data:`ENCODINGS` (``leak encoding=NAME``; ``leak_all`` returns them all
in one result, text and structured), split across two content blocks
(``leak_split``), as a JSON number (``leak_number``), in a JSON-RPC error
(``leak_error``), in a progress message (``leak_progress``), in a tool
error (``leak_tool_error``), and in its own tool definitions (``defined``:
title, description, schema default, outputSchema, ``_meta``).

The test imports :data:`ENCODINGS` from here, so server and test agree on
what was sent.
"""

from __future__ import annotations

import base64
import json
import os
import sys
from collections.abc import Callable
from urllib.parse import quote, quote_plus

SECRET = os.environ.get("LEAKY_SECRET", "")
PIN = os.environ.get("LEAKY_PIN", "0")


def _wrap(text: str, width: int = 16, sep: str = "\n") -> str:
    return sep.join(text[i : i + width] for i in range(0, len(text), width))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


#: name -> how the server spells its secret
ENCODINGS: dict[str, Callable[[str], str]] = {
    "plain": lambda s: f"token={s};",
    "percent_upper": lambda s: quote(s, safe=""),
    "percent_lower": lambda s: "".join(f"%{b:02x}" for b in s.encode()),
    "percent_plus": lambda s: quote_plus(s),
    "percent_partial": lambda s: s[:5] + "".join(f"%{b:02x}" for b in s[5:].encode()),
    "percent_partial_upper": lambda s: s[:3] + "".join(f"%{b:02X}" for b in s[3:9].encode()) + s[9:],
    "percent_every_byte_mixed": lambda s: "".join(
        f"%{b:02X}" if i % 2 else f"%{b:02x}" for i, b in enumerate(s.encode())
    ),
    "hex": lambda s: s.encode().hex(),
    "hex_upper": lambda s: s.encode().hex().upper(),
    "hex_colons": lambda s: ":".join(f"{b:02x}" for b in s.encode()),
    "hex_spaces": lambda s: " ".join(f"{b:02X}" for b in s.encode()),
    "hex_dashes": lambda s: "-".join(f"{b:02x}" for b in s.encode()),
    "hex_0x_each": lambda s: " ".join(f"0x{b:02x}" for b in s.encode()),
    "hex_0x_commas": lambda s: ", ".join(f"0x{b:02X}" for b in s.encode()),
    "hex_0x_number": lambda s: "0x" + s.encode().hex(),
    "hex_backslash_x": lambda s: "".join(f"\\x{b:02x}" for b in s.encode()),
    "hex_in_a_dump": lambda s: "00ff" + s.encode().hex() + "00ff",
    "base64": lambda s: _b64(s.encode()),
    "base64url": lambda s: base64.urlsafe_b64encode(s.encode()).decode(),
    "base64_unpadded": lambda s: _b64(s.encode()).rstrip("="),
    "base64_offset_1": lambda s: _b64(b"x" + s.encode()),
    "base64_offset_2": lambda s: _b64(b"xy" + s.encode()),
    "base64url_offset_1": lambda s: base64.urlsafe_b64encode(b"\xfb" + s.encode()).decode(),
    "base64url_offset_2": lambda s: base64.urlsafe_b64encode(b"\xfb\xff" + s.encode()).decode(),
    "base64_wrapped": lambda s: _wrap(_b64(b"header:" + s.encode() + b":trailer")),
    "base64_crlf_wrapped": lambda s: _wrap(_b64(b"q" * 50 + s.encode()), 76, "\r\n"),
    "base64_in_json": lambda s: json.dumps({"blob": _wrap(_b64(s.encode()), 8)}),
    "json_u_escapes": lambda s: "".join(f"\\u{ord(c):04x}" for c in s),
    "json_u_escapes_upper": lambda s: "".join(f"\\u{ord(c):04X}" for c in s),
    "json_u_escapes_partial": lambda s: s[:4] + "".join(f"\\u{ord(c):04x}" for c in s[4:10]) + s[10:],
    "json_escaped_slash": lambda s: json.dumps(s)[1:-1].replace("/", "\\/"),
    "html_decimal": lambda s: "".join(f"&#{ord(c)};" for c in s),
    "html_hex": lambda s: "".join(f"&#x{ord(c):X};" for c in s),
    "spaced_out": lambda s: " ".join(s),
    "zero_width_joined": lambda s: "\u200b".join(s),
    "escaped_newline_inside": lambda s: s[:7] + "\\n" + s[7:],
    "newline_inside": lambda s: s[:9] + "\n" + s[9:],
}

SCHEMA = {"type": "object", "properties": {"encoding": {"type": "string"}}}


def tools() -> list[dict[str, object]]:
    plain = [
        {"name": name, "description": f"leaky: {name}", "inputSchema": SCHEMA}
        for name in ("leak", "leak_all", "leak_split", "leak_number", "leak_error", "leak_tool_error", "leak_progress")
    ]
    defined = {
        "name": "defined",
        "title": f"Defined {SECRET.encode().hex()}",
        "description": f"Uses the key {_b64(SECRET.encode())} (base64) and {quote(SECRET, safe='')}",
        "inputSchema": {
            "type": "object",
            "properties": {"pin": {"type": "integer", "default": int(PIN)}, "k": {"type": "string", "default": SECRET}},
        },
        "outputSchema": {"type": "object", "description": "".join(f"\\u{ord(c):04x}" for c in SECRET)},
        "_meta": {"leaky/key": SECRET[:9] + "\n" + SECRET[9:]},
    }
    return [*plain, defined]


out = sys.stdout


def send(obj: object) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def text_result(msg_id: object, *texts: str, **extra: object) -> None:
    blocks = [{"type": "text", "text": t} for t in texts]
    send({"jsonrpc": "2.0", "id": msg_id, "result": {"content": blocks, **extra}})


def call(msg_id: object, name: str, args: dict[str, object], meta: dict[str, object]) -> None:
    if name == "leak":
        text_result(msg_id, ENCODINGS[str(args.get("encoding"))](SECRET))
    elif name == "leak_all":
        every = {k: f(SECRET) for k, f in ENCODINGS.items()}
        text_result(msg_id, *every.values(), structuredContent=every)
    elif name == "leak_split":
        text_result(msg_id, f"the first half: {SECRET[:8]}", f"{SECRET[8:]} is the second half")
    elif name == "leak_number":
        text_result(msg_id, "see the structured content", structuredContent={"pin": int(PIN), "ok": 1})
    elif name == "leak_error":
        encoding = str(args.get("encoding", "plain"))
        message = f"cannot log in with {ENCODINGS[encoding](SECRET)}"
        send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32000, "message": message}})
    elif name == "leak_tool_error":
        text_result(msg_id, f"401 for Authorization: Bearer {_b64(SECRET.encode())}", isError=True)
    elif name == "leak_progress":
        token = meta.get("progressToken")
        if token is not None:
            send(
                {
                    "jsonrpc": "2.0",
                    "method": "notifications/progress",
                    "params": {"progressToken": token, "progress": 1, "total": 2, "message": f"using {SECRET}"},
                }
            )
        text_result(msg_id, "done")
    elif name == "defined":
        text_result(msg_id, "defined")
    else:
        send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32602, "message": f"unknown tool {name}"}})


def main() -> None:
    for line in sys.stdin:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        method, msg_id = msg.get("method"), msg.get("id")
        params = msg.get("params") or {}
        if method == "initialize":
            version = params.get("protocolVersion", "2025-11-25")
            info = {"name": "leaky", "version": "1"}
            send(
                {
                    "jsonrpc": "2.0",
                    "id": msg_id,
                    "result": {"protocolVersion": version, "capabilities": {"tools": {}}, "serverInfo": info},
                }
            )
        elif method == "tools/list":
            send({"jsonrpc": "2.0", "id": msg_id, "result": {"tools": tools()}})
        elif method == "tools/call":
            call(msg_id, str(params.get("name")), params.get("arguments") or {}, params.get("_meta") or {})
        elif method == "ping":
            send({"jsonrpc": "2.0", "id": msg_id, "result": {}})
        elif msg_id is not None and method is not None:
            send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32601, "message": "method not found"}})


if __name__ == "__main__":
    main()
