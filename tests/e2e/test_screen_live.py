"""The operator's screen, live: what an agent and a server send reaches ``mcp-brokerctl`` output defanged.

As the agent, through sudo: an approval-mode call whose arguments hold each
hostile string (CSI, OSC 52, bidi, zero-width, a Cyrillic homoglyph key, a
200 KB padding argument before the dangerous one), calls with hostile tool
names (refused by the gate; and, as a compromised gate would, sent raw to
the daemon), and a call a hostile server answers with an escape-laden
error. The server (``tests/e2e/servers/screen.py``) also names and
describes its tools with escapes, bidi and homoglyphs. Then ``approvals``,
``approve``, ``audit``, ``audit --json``, ``tools`` and ``status`` run as
subprocesses, and their stdout is checked byte for byte: no ESC, no C1, no
bidi or zero-width code point; JSON output pure ASCII; the dangerous
argument near the start of a line of its own; the homoglyph flagged.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from broker.core import wire
from tests.e2e.harness import (
    AGENT1,
    ALLOWLIST,
    CTL,
    PYTHON,
    Installation,
    gate_exchange,
    gate_user,
    server_account,
    servers,
    wait_for,
    write_servers_d,
)

SERVER = Path(__file__).parent / "servers" / "screen.py"
OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"
DANGER = "rm -rf /srv/backups"
HOMOGLYPH_KEY = "p\u0430th"  # a Cyrillic a
ARGS: dict[str, Any] = {
    "colour": "\x1b[31mred\x1b[0m",
    "clipboard": OSC52,
    "link": "\x1b]8;;https://evil.example/\x1b\\harmless\x1b]8;;\x1b\\",
    "bidi": "invoice \u202efdp.exe\u202c \u2066isolate\u2069",
    "zero_width": "pa\u200bss\ufeffword",
    HOMOGLYPH_KEY: "/etc/shadow",
    "padding": "x" * 200_000,
    "command": DANGER,
}
#: a tool name no gate would forward: a homoglyph, a bidi override and OSC 52
RAW_TOOL = f"scr\u0435en.take\u202e{OSC52}"
POLICY = '[policy."screen.take"]\nmode = "approve"\n'
#: what must never reach the screen raw: bidi controls, zero-width and other invisible characters
INVISIBLE = {0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0x200E, 0x200F, 0x061C}
INVISIBLE |= {0x200B, 0x200C, 0x200D, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF, 0x180E, 0x00AD}


@dataclass
class Scene:
    inst: Installation
    approval: str
    agent: subprocess.Popen[str]


def ctl_bytes(inst: Installation, *args: str) -> bytes:
    """``mcp-brokerctl ARGS``' stdout, as the bytes a terminal would get; it must succeed."""
    proc = subprocess.run([CTL, "--root", inst.root, *args], capture_output=True, check=False, timeout=120)
    assert proc.returncode == 0, (args, proc.stderr[-2000:])
    return proc.stdout


def screen_text(data: bytes) -> str:
    """``data`` as a terminal would read it; fails on anything a terminal acts on or shows as nothing."""
    assert b"\x1b" not in data, _around(data, b"\x1b")
    text = data.decode("utf-8")  # strict: no broken sequence either
    bad = [f"U+{ord(c):04X}" for c in text if 0x80 <= ord(c) <= 0x9F or ord(c) in INVISIBLE]
    assert not bad, bad
    controls = [f"U+{ord(c):04X}" for c in text if (ord(c) < 0x20 and c != "\n") or ord(c) == 0x7F]
    assert not controls, controls
    return text


def json_text(data: bytes) -> str:
    assert data.isascii(), _around(data, next(bytes([b]) for b in data if b >= 0x80))
    assert b"\x1b" not in data
    return data.decode("ascii")


def _around(data: bytes, needle: bytes) -> bytes:
    at = data.find(needle)
    return data[max(0, at - 120) : at + 120]


def line_with(text: str, needle: str) -> str:
    found = [line for line in text.splitlines() if needle in line]
    assert found, (needle, text[:3000])
    return found[0]


def _pending_id(proc: subprocess.Popen[str]) -> str:
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.fullmatch(r"mcp: pending approval ([0-9a-f]+), waiting\n", line)
    assert m, line
    return m.group(1)


@pytest.fixture(scope="module")
def scene(inst: Installation) -> Iterator[Scene]:
    server_account("screen")
    script = f"{inst.root}/screen_server.py"
    shutil.copyfile(SERVER, script)
    os.chmod(script, 0o644)
    conf = write_servers_d(
        inst, "screen.toml", f'[servers.screen]\ncommand = "{PYTHON}"\nargs = [{json.dumps(script)}]\n'
    )
    agent: subprocess.Popen[str] | None = None
    try:
        if inst.daemon is None or inst.daemon.poll() is not None:
            inst.start_daemon()
        inst.set_policy(POLICY, broker_extra="approval_ttl = 300")
        assert wait_for(lambda: servers(inst).get("screen", {}).get("state") == "up", 30), servers(inst)
        inst.set_allowlist(ALLOWLIST + "screen.take\nscreen.fail\n")
        for tool in ("screen.take", "screen.fail"):  # reviewed: whatever the pin policy, they may run
            accepted = inst.ctl("pins", "accept", tool)
            assert accepted.code == 0, accepted
        # a server's error, escapes and all, lands in the audit record's reason
        failed = inst.mcp("call", "screen.fail")
        assert failed.code != 0 and "failed" in failed.err, failed
        # hostile tool names: the gate refuses them (and reports it); a compromised gate sends one raw
        for bad in (f"screen.ev{OSC52}il", "scr\u0435en.take", "screen.take\u202e"):
            assert inst.mcp("call", bad).code == 64
        answer = gate_exchange(
            gate_user(AGENT1), inst.paths.gate_sock, wire.request("call", tool=RAW_TOOL, kv=[], args={}, timeout=None)
        )
        assert answer is not None and answer.get("exit") == 77, answer
        # the approval-mode call with every hostile argument
        agent = inst.spawn_mcp("call", "screen.take", "--args", "-", stdin=True)
        assert agent.stdin is not None
        agent.stdin.write(json.dumps(ARGS))
        agent.stdin.close()
        agent.stdin = None  # written and closed: communicate() must not flush it
        yield Scene(inst, _pending_id(agent), agent)
    finally:
        if agent is not None and agent.poll() is None:
            inst.kill_tree(agent)
        for a in json.loads(inst.ctl("approvals", "--json").out or "[]"):
            inst.ctl("reject", a["id"])
        os.unlink(conf)
        inst.write_broker_toml()
        inst.set_allowlist(ALLOWLIST)
        if inst.daemon is not None and inst.daemon.poll() is None:
            inst.ctl("reload")


def test_approvals_show_each_argument_defanged_on_its_own_line(scene: Scene) -> None:
    text = screen_text(ctl_bytes(scene.inst, "approvals"))
    assert scene.approval in text
    danger = line_with(text, DANGER)
    assert danger.lstrip().startswith("command ") and danger.index(DANGER) < 300, danger
    assert "p<U+0430>th [non-ASCII]" in line_with(text, "/etc/shadow")
    assert "\\x1b]52;c;cm0gLXJmIH4K\\x07" in line_with(text, "clipboard ")
    assert "\\x1b[31mred" in line_with(text, "colour ")
    assert "<U+202E>" in line_with(text, "bidi ") and "<U+200B>" in line_with(text, "zero_width ")
    assert "[cut: 200 of 200,000 characters; --full shows all]" in line_with(text, "padding ")
    assert max(len(line) for line in text.splitlines()) < 400
    full = screen_text(ctl_bytes(scene.inst, "approvals", "--full"))
    assert ARGS["padding"] in full and DANGER in full


def test_approvals_json_is_ascii_and_exact(scene: Scene) -> None:
    listing = json.loads(json_text(ctl_bytes(scene.inst, "approvals", "--json")))
    mine = next(a for a in listing if a["id"] == scene.approval)
    assert mine["args"] == ARGS


def test_audit_table_defangs_callers_tools_and_reasons(scene: Scene) -> None:
    text = screen_text(ctl_bytes(scene.inst, "audit", "--since", "30m"))
    raw = line_with(text, "scr<U+0435>en.take<U+202E>")
    assert "\\x1b]52;c;" in raw and "[non-ASCII]" in raw
    failed = line_with(text, "txt.exe")
    assert "screen.fail" in failed and "server_error" in failed, failed
    assert "\\x1b[2J\\x1b]52;c;cm0gLXJmIH4K\\x07 <U+202E>txt.exe<U+2066> failed<U+200B>" in failed, failed


def test_audit_json_is_ascii_and_holds_the_records(scene: Scene) -> None:
    text = json_text(ctl_bytes(scene.inst, "audit", "--since", "30m", "--json"))
    records = [json.loads(line) for line in text.splitlines()]
    assert any(r.get("tool") == RAW_TOOL for r in records)  # the same values, only escaped
    assert any("\u202etxt.exe" in str(r.get("reason")) for r in records if r.get("tool") == "screen.fail")


def test_tools_defangs_names_and_descriptions(scene: Scene) -> None:
    text = screen_text(ctl_bytes(scene.inst, "tools", "screen"))
    take = line_with(text, "screen.take ")
    assert "Takes anything. \\x1b[31mred" in take and "\\x1b]52;c;" in take and "[cut: " in take
    assert "screen.r<U+0435>ad [non-ASCII]" in text
    assert "screen.ev\\x1b]52;c;cm0gLXJmIH4K\\x07il" in text
    assert "not offered  screen.task<U+202E>\\x1b]52;c;" in text
    full = screen_text(ctl_bytes(scene.inst, "tools", "screen", "--full"))
    assert "\\x1b]8;;https://evil.example/" in full and "<U+202E>exe.txt <U+200B><U+FEFF>" in full
    json_text(ctl_bytes(scene.inst, "tools", "screen", "--json"))


def test_status_defangs_hidden_tools(scene: Scene) -> None:
    text = screen_text(ctl_bytes(scene.inst, "status"))
    assert "screen.task<U+202E>\\x1b]52;c;cm0gLXJmIH4K\\x07 [non-ASCII]: not offered" in text
    json_text(ctl_bytes(scene.inst, "status", "--json"))


def test_approve_echoes_the_arguments_defanged_and_the_call_runs(scene: Scene) -> None:
    text = screen_text(ctl_bytes(scene.inst, "approve", scene.approval))
    assert text.startswith(f"approved {scene.approval}: {AGENT1} -> screen.take\n")
    assert line_with(text, DANGER).index(DANGER) < 300
    assert "p<U+0430>th [non-ASCII]" in text
    out, err = scene.agent.communicate(timeout=60)
    assert (scene.agent.returncode, out) == (0, "taken\n"), err
