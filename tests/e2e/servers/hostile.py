"""A deliberately broken MCP stdio server, for the tests: standard library only, raw JSON-RPC lines.

Its tools answer the way buggy or hostile servers do, chosen by the tool's
name (``HOSTILE_MODE=endless_pages`` instead makes ``tools/list`` never end):

* ``nan``: structured content holding NaN and Infinity (as Python's json writes them);
* ``surrogate_text``: text holding a lone surrogate (``\\ud800`` escaped in JSON);
* ``surrogate_error``: a JSON-RPC error whose message holds a lone surrogate;
* ``rpc_error``: a plain JSON-RPC error (code -32000);
* ``huge``: one answer line of ``size`` bytes (over the broker's cap);
* ``wrong_id``: an answer to an id nobody asked about, then nothing;
* ``garbage``: non-JSON lines first, then the right answer;
* ``record``: appends its ``tag`` to the file ``HOSTILE_LOG``, sleeps ``seconds``, answers;
* ``fuzz``: a random malformed message chosen by ``seed``, sometimes followed by the right answer.

Every ``tools/call`` it receives is appended to ``HOSTILE_LOG`` (when set)
before it is answered, so a test can tell which calls reached the server.
"""

from __future__ import annotations

import json
import os
import random
import sys
import time

TOOLS = ["nan", "surrogate_text", "surrogate_error", "rpc_error", "huge", "wrong_id", "garbage", "record", "fuzz"]
LOG = os.environ.get("HOSTILE_LOG", "")
MODE = os.environ.get("HOSTILE_MODE", "")
out = sys.stdout.buffer


def send(obj: object) -> None:
    out.write(json.dumps(obj).encode("utf-8", "surrogatepass") + b"\n")
    out.flush()


def raw(data: bytes) -> None:
    out.write(data)
    out.flush()


def tool(name: str) -> dict[str, object]:
    schema = {
        "type": "object",
        "properties": {"size": {"type": "integer"}, "tag": {"type": "string"}, "seconds": {"type": "number"},
                       "seed": {"type": "integer"}},
    }  # fmt: skip
    return {"name": name, "description": f"hostile: {name}", "inputSchema": schema}


def result(msg_id: object, text: str, **extra: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": text}], **extra}}


def fuzz(msg_id: object, seed: int) -> None:
    rng = random.Random(seed)
    choice = rng.randrange(9)
    if choice == 0:
        raw(b"\xff\xfe not utf-8 \n")
    elif choice == 1:
        raw(b'{"jsonrpc": "2.0", "id": ' + str(msg_id).encode() + b', "result": {"content": [{"type": "text"\n')
    elif choice == 2:
        raw(b'{"jsonrpc":"2.0","id":' + str(msg_id).encode() + b',"result":{"structuredContent":{"x":NaN}}}\n')
        return
    elif choice == 3:
        send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": "not a number", "message": ["list"]}})
        return
    elif choice == 4:
        send({"jsonrpc": "2.0", "id": msg_id, "result": {"content": "not a list"}})
        return
    elif choice == 5:
        send({"jsonrpc": "2.0", "id": 10**30, "result": {}})
    elif choice == 6:
        send({"jsonrpc": "2.0", "id": msg_id, "result": {"content": [{"type": "text", "text": "\udcff" * 3}]}})
        return
    elif choice == 7:
        raw(b"[1e400, -1e400]\n")
    else:
        send({"jsonrpc": "2.0", "method": "sampling/createMessage", "id": "s", "params": {}})
    send(result(msg_id, f"fuzz {seed}"))


def call(msg_id: object, name: str, args: dict[str, object]) -> None:
    if LOG:
        with open(LOG, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"tool": name, "args": args}) + "\n")
    if name == "nan":
        body = (
            b'"content": [{"type": "text", "text": "numbers"}], "structuredContent": {"v": NaN, "w": Infinity, "ok": 1}'
        )
        raw(b'{"jsonrpc": "2.0", "id": ' + json.dumps(msg_id).encode() + b', "result": {' + body + b"}}\n")
    elif name == "surrogate_text":
        raw(b'{"jsonrpc": "2.0", "id": ' + json.dumps(msg_id).encode() + b', "result": {"content": '
            b'[{"type": "text", "text": "half \\ud800 a pair"}]}}\n')  # fmt: skip
    elif name == "surrogate_error":
        raw(b'{"jsonrpc": "2.0", "id": ' + json.dumps(msg_id).encode()
            + b', "error": {"code": -32000, "message": "broken \\udc80 message"}}\n')  # fmt: skip
    elif name == "rpc_error":
        send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32000, "message": "the tool broke"}})
    elif name == "huge":
        size = int(args.get("size", 1 << 21))  # type: ignore[call-overload]
        send(result(msg_id, "x" * size))
    elif name == "wrong_id":
        send(result(12345678, "for someone else"))
    elif name == "garbage":
        raw(b"this is not json\n{\n\x00\x01\n")
        send(result(msg_id, "after garbage"))
    elif name == "record":
        time.sleep(float(args.get("seconds", 0)))  # type: ignore[arg-type]
        send(result(msg_id, f"recorded {args.get('tag', '')}"))
    elif name == "fuzz":
        fuzz(msg_id, int(args.get("seed", 0)))  # type: ignore[call-overload]
    else:
        send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32602, "message": f"unknown tool {name}"}})


def main() -> None:
    for line in sys.stdin.buffer:
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if not isinstance(msg, dict) or "id" not in msg:
            continue
        method, msg_id, params = msg.get("method"), msg.get("id"), msg.get("params") or {}
        if method == "initialize":
            send({"jsonrpc": "2.0", "id": msg_id, "result": {
                "protocolVersion": params.get("protocolVersion", "2025-11-25"), "capabilities": {"tools": {}},
                "serverInfo": {"name": "hostile", "version": "1"}}})  # fmt: skip
        elif method == "tools/list":
            if MODE == "endless_pages":
                page = int(params.get("cursor") or 0)
                send(
                    {
                        "jsonrpc": "2.0",
                        "id": msg_id,
                        "result": {"tools": [tool(f"t{page}")], "nextCursor": str(page + 1)},
                    }
                )
            else:
                send({"jsonrpc": "2.0", "id": msg_id, "result": {"tools": [tool(n) for n in TOOLS]}})
        elif method == "tools/call":
            call(msg_id, str(params.get("name")), params.get("arguments") or {})
        elif method == "ping":
            send({"jsonrpc": "2.0", "id": msg_id, "result": {}})
        elif "method" in msg:
            send({"jsonrpc": "2.0", "id": msg_id, "error": {"code": -32601, "message": "no"}})


if __name__ == "__main__":
    main()
