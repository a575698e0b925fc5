"""The agent-side helpers of ``mcp``: ``key=@path`` expansion and ``mcp skill``.

Runs as the agent, before sudo, with ``/usr/bin/python3 -IS``; the shell
shim calls it only when an argument needs it, so plain calls stay a single
``exec sudo``. ``key=@path`` reads the file *as the agent* (so it can only
send what the agent could read anyway) and passes the values to the gate as
a JSON object (``--args -``); the gate itself never expands ``@``.
``key=@@text`` sends the literal ``@text``. Like the shim, it hands a call's
arguments to the gate as one length-framed payload on stdin (:func:`frame`),
never on a command line.

Standard library only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

MAX_FILE_BYTES = 1024 * 1024
FLAGS_WITH_VALUE = ("--args", "--timeout")

USAGE_EXIT = 64
DATA_EXIT = 65


class AgentError(Exception):
    def __init__(self, message: str, code: int = USAGE_EXIT) -> None:
        super().__init__(message)
        self.code = code


def _gate_argv(gate: str, gate_user: str, argv: list[str]) -> list[str]:
    return ["sudo", "-n", "-u", gate_user, gate, *argv]


def frame(items: list[str], stdin: str | None) -> bytes:
    """The payload the gate reads for a call (``broker.gate.verbs.read_frame``): the same one the shim writes."""
    data = (stdin or "").encode("utf-8", "surrogateescape")
    parts = [b"mcp-args 1 %d %d" % (len(items), len(data))]
    for item in items:
        raw = item.encode("utf-8", "surrogateescape")
        parts.append(b"\n%d %s" % (len(raw), raw))
    if data:
        parts.append(b"\n" + data)
    return b"".join(parts) + b"\n"


def gate_command(gate: str, gate_user: str, argv: list[str], stdin: str | None) -> tuple[list[str], bytes | None]:
    """(the sudo command line, its stdin): a call's arguments in the frame, only the verb and tool outside.

    ``propose`` is framed the same way, with only the verb outside.
    """
    if argv[:1] == ["propose"]:
        return _gate_argv(gate, gate_user, ["propose"]), frame(argv[1:], stdin)
    if argv[:1] != ["call"]:
        return _gate_argv(gate, gate_user, argv), None
    rest = argv[1:]
    head = ["call"]
    if rest and names_a_tool(rest[0]):
        head.append(rest.pop(0))
    return _gate_argv(gate, gate_user, head), frame(rest, stdin)


def names_a_tool(word: str) -> bool:
    """What may stand on the gate's command line (the shim's test): a bare ``server.tool``-like word."""
    allowed = (ch.isascii() and (ch.isalnum() or ch in "_.-") for ch in word)
    return bool(word) and not word.startswith("-") and all(allowed)


def _read_value(path: str) -> str:
    try:
        with open(path, "rb") as fh:
            data = fh.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise AgentError(f"cannot read {path}: {exc.strerror}", DATA_EXIT) from None
    if len(data) > MAX_FILE_BYTES:
        raise AgentError(f"{path} is larger than {MAX_FILE_BYTES} bytes", DATA_EXIT)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise AgentError(f"{path} is not UTF-8 text; only text can be sent with key=@path", DATA_EXIT) from None


def _split(item: str) -> tuple[str, str, str] | None:
    """(key, separator, value) of a k=v / k:v item, split at the first separator."""
    cuts = [p for p in (item.find("="), item.find(":")) if p > 0]
    if not cuts:
        return None
    cut = min(cuts)
    return item[:cut], item[cut], item[cut + 1 :]


def expand(argv: list[str], stdin: Any) -> tuple[list[str], str | None]:
    """Rewrite ``call`` arguments: @file values move into a JSON object for ``--args -``."""
    if len(argv) < 2 or argv[0] != "call":
        return argv, None
    out = argv[:1]
    from_files: dict[str, str] = {}
    args_json: str | None = None
    rest = argv[1:]
    i = 0
    only_positional = False
    while i < len(rest):
        item = rest[i]
        i += 1
        if not only_positional and item.startswith("-") and item != "-":
            name, eq, value = item.partition("=")
            if item == "--":
                only_positional = True
                out.append(item)
            elif name == "--args":
                if args_json is not None:
                    raise AgentError("--args given twice")
                if not eq and i < len(rest):
                    value = rest[i]
                    i += 1
                args_json = value
            elif name in FLAGS_WITH_VALUE and not eq and i < len(rest):
                out += [item, rest[i]]
                i += 1
            else:
                out.append(item)  # the gate judges every flag
            continue
        parts = _split(item)
        if parts is None or not parts[2].startswith("@"):
            out.append(item)
            continue
        key, sep, value = parts
        if value.startswith("@@"):
            out.append(f"{key}{sep}{value[1:]}")
            continue
        if key in from_files:
            raise AgentError(f"argument {key!r} given twice")
        from_files[key] = _read_value(value[1:])
    # --args goes right after the tool: after a '--' the gate would read it as two more key=value items
    at = _after_tool(out)
    if not from_files:
        return (out if args_json is None else [*out[:at], "--args", args_json, *out[at:]]), None
    base: dict[str, Any] = {}
    if args_json is not None:
        text = stdin.read() if args_json == "-" else args_json
        try:
            base = json.loads(text)
        except ValueError as exc:
            raise AgentError(f"--args: not valid JSON ({exc})") from None
        if not isinstance(base, dict):
            raise AgentError("--args: expected a JSON object")
    for key, value in from_files.items():
        if key in base:
            raise AgentError(f"argument {key!r} given twice")
        base[key] = value
    return [*out[:at], "--args", "-", *out[at:]], json.dumps(base)


def _after_tool(argv: list[str]) -> int:
    """Where a flag may still go in a rewritten ``call`` argv: just after the tool (flags may come before it)."""
    i = 1
    while i < len(argv):
        item = argv[i]
        if item == "--":
            return i
        if item.startswith("-") and item != "-":
            name, eq, _value = item.partition("=")
            i += 2 if name in FLAGS_WITH_VALUE and not eq else 1
            continue
        return i + 1  # the tool
    return len(argv)


#: the skill's YAML front matter: OpenClaw and Claude skills need a name ([a-z0-9-], at most 64) and a description
SKILL_NAME = "mcp-privsep"
SKILL_DESCRIPTION = (  # one line, under 160 characters (OpenClaw shows it in its skill discovery)
    "Use the operator's allowed tools with the mcp command: mcp list, mcp describe SERVER.TOOL, "
    "mcp call SERVER.TOOL key=value. Credentials stay in the broker."
)


def skill(gate: str, gate_user: str) -> str:
    """A skill file (YAML front matter, then Markdown) describing the caller's allowed tools."""
    command = _gate_argv(gate, gate_user, ["list", "--json"])
    listing = subprocess.run(command, capture_output=True, text=True, check=False)
    if listing.returncode != 0:
        raise AgentError(listing.stderr.strip() or "mcp list failed", listing.returncode)
    tools = json.loads(listing.stdout).get("tools", [])
    lines = [
        "---",
        f"name: {SKILL_NAME}",
        f"description: {json.dumps(SKILL_DESCRIPTION)}",  # a JSON string is a YAML double-quoted scalar
        "---",
        "",
        "# Tools through mcp-privsep",
        "",
        "You can use the tools below with the `mcp` command. They run in a separate, privileged broker that",
        "holds their credentials: you cannot read those credentials, and you never need them. Every call is",
        "checked against an allowlist and policy and is audited. Only the tools listed here exist for you;",
        "anything else is denied (exit 77), and misspelt names are never corrected.",
        "",
        "## How to call",
        "",
        "- `mcp call SERVER.TOOL key=value ...` (or `key:value`); values are typed by the tool's schema",
        "  (numbers, true/false, null, JSON arrays and objects).",
        '- `mcp call SERVER.TOOL --args \'{"key": "value"}\'`, or `--args -` to read the JSON object from stdin.',
        "- `key=@path` sends the text of a file you can read; `key=@@text` sends a literal `@text`.",
        "- `--json` prints the full result as JSON; `--timeout SECONDS` bounds the call.",
        "- `mcp describe SERVER.TOOL` prints the input schema; `mcp list` lists the tools; `mcp status` checks health.",
        "",
        "## Asking for another server",
        "",
        "If you need an MCP server the operator has not set up, you may ask for it; you cannot install it.",
        "`mcp propose NAME --pip PACKAGE==VERSION` (or `--npm PACKAGE@VERSION`, an exact version), with",
        "`--tool TOOL` for each tool you want and `--why TEXT` (or `--why -` to read it from stdin), queues the",
        "request for the operator, who reviews it and may adopt or reject it; nothing is installed or run",
        "before that. At most 4 of yours can be pending (75 beyond that: wait for the operator).",
        "`mcp propose --status` shows your own proposals and what became of them.",
        "",
        "Exit codes: 0 ok; 1 the tool reported an error; 64 usage error; 65 arguments rejected by the schema",
        "or a policy rule; 69 broker unavailable; 75 try again later (timeout, rate limit, waiting for a human",
        "approval); 77 denied; 78 the broker is misconfigured (tell the operator).",
        "",
        "## Tools",
    ]
    for tool in tools:
        name = tool.get("name", "")
        lines += ["", f"### {name}", "", tool.get("description") or "(no description)"]
        described = subprocess.run(
            _gate_argv(gate, gate_user, ["describe", name, "--json"]), capture_output=True, text=True, check=False
        )
        if described.returncode == 0:
            schema = json.loads(described.stdout).get("inputSchema") or {}
            props = schema.get("properties") or {}
            required = set(schema.get("required") or [])
            if props:
                lines.append("")
                for key, prop in props.items():
                    kind = prop.get("type", "any") if isinstance(prop, dict) else "any"
                    need = "required" if key in required else "optional"
                    lines.append(f"- `{key}` ({kind}, {need})")
            example = " ".join(f"{k}=..." for k in props if k in required)
            lines += ["", f"Example: `mcp call {name}{' ' + example if example else ''}`"]
    if not tools:
        lines += ["", "No tools are allowed for you at the moment."]
    return "\n".join(lines) + "\n"


def main(gate: str, gate_user: str, argv: list[str]) -> int:
    try:
        if argv[:1] == ["skill"]:
            if len(argv) > 1:
                raise AgentError("'skill' takes no arguments")
            sys.stdout.write(skill(gate, gate_user))
            return 0
        new_argv, payload = expand(argv, sys.stdin)
    except AgentError as exc:
        sys.stderr.write(f"mcp: {exc}\n")
        return exc.code
    if payload is None and any(a in ("-", "--args=-") for a in new_argv):
        payload = sys.stdin.read()  # --args -, no file value: what the agent pipes in is the object
    command, data = gate_command(gate, gate_user, new_argv, payload)
    if data is None:
        os.execvp("sudo", command)  # noqa: S606 - argv list, no shell; replaces this helper
    return subprocess.run(command, input=data, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2], sys.argv[3:]))
