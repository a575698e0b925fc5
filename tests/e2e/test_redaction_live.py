"""Redaction against a server that leaks its own secret, and the guess-confirmation attack, for real.

A leaking stdio server (``tests/e2e/servers/leaky.py``, its own user and
sandbox, its secrets in its env file) returns its secret in each of 37
encodings, split across two blocks, as a JSON number, in errors, progress
and its own tool definitions. As the agent, through sudo: nothing of it
reaches ``mcp call``, ``mcp list``, ``mcp describe`` or ``mcp stdio``,
judged by decoders of this test's own (not the broker's), and the marker
names no secret; the audit record names it for the operator.

Then the agent guesses another server's secret through an allowlisted echo
tool: a wrong guess is answered like any call; the right one freezes the
caller at once, its answer names nothing, the operator's notify hook is
told, and the freeze lasts until ``unfreeze``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import html
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, unquote_plus

import pytest

from tests.e2e.harness import (
    AGENT1,
    AGENT2,
    ALLOWLIST,
    PYTHON,
    Installation,
    server_account,
    servers,
    wait_for,
    write,
    write_servers_d,
)
from tests.e2e.servers.leaky import ENCODINGS
from tests.e2e.test_cancel_progress_live import Session

LEAKY = Path(__file__).parent / "servers" / "leaky.py"
TOOLS = ["leak", "leak_all", "leak_split", "leak_number", "leak_error", "leak_tool_error", "leak_progress", "defined"]
MARKER = "[REDACTED]"


class Leaky:
    def __init__(self, inst: Installation, secret: str, pin: str) -> None:
        self.inst, self.secret, self.pin = inst, secret, pin


@pytest.fixture(scope="module")
def leaky(inst: Installation) -> Iterator[Leaky]:
    secret = "Lk9-" + secrets.token_urlsafe(18)
    pin = str(secrets.randbelow(9 * 10**10) + 10**10)  # eleven digits
    script = f"{inst.root}/leaky_server.py"
    shutil.copyfile(LEAKY, script)
    os.chmod(script, 0o644)
    env_file = f"{inst.paths.secrets}/leaky.env"
    write(env_file, f"LEAKY_SECRET={secret}\nLEAKY_PIN={pin}\n", 0, 0, 0o600)
    conf = write_servers_d(
        inst,
        "leaky.toml",
        f'[servers.leaky]\ncommand = "{PYTHON}"\nargs = [{json.dumps(script)}]\nenv_file = "{env_file}"\n',
    )
    server_account("leaky")
    if inst.daemon is None or inst.daemon.poll() is not None:
        inst.start_daemon()
    assert inst.ctl("reload").code == 0
    assert wait_for(lambda: servers(inst).get("leaky", {}).get("state") == "up", 20), servers(inst)
    inst.set_allowlist(ALLOWLIST + "".join(f"leaky.{t}\n" for t in TOOLS))
    try:
        yield Leaky(inst, secret, pin)
    finally:
        os.unlink(conf)
        os.unlink(env_file)
        inst.set_allowlist(ALLOWLIST)
        inst.write_broker_toml()
        inst.ctl("reload")
        inst.ctl("unfreeze", AGENT1)
        inst.ctl("unfreeze", AGENT2)


# --- an oracle of the test's own: could a reader get the secret back out of this text? -----------------


def _b64_decodings(text: str) -> list[bytes]:
    """Every base64/base64url run of ``text`` (whitespace and escaped newlines dropped) decoded at each offset."""
    squeezed = re.sub(r"\\[nr]|[\s\u200b]", "", text)
    out = []
    for run in re.findall(r"[A-Za-z0-9+/_-]{8,}", squeezed):
        std = run.replace("-", "+").replace("_", "/")
        for skip in range(4):
            part = std[skip:]
            part = part[:-1] if len(part) % 4 == 1 else part
            part += "=" * (-len(part) % 4)
            with contextlib.suppress(binascii.Error, ValueError):
                out.append(base64.b64decode(part, validate=False))
    return out


def _hex_decodings(text: str) -> list[bytes]:
    squeezed = re.sub(r"0[xX]|\\[xX]|[\s:,;.\-_|/\\]", "", text)
    out = []
    for run in re.findall(r"[0-9A-Fa-f]{8,}", squeezed):
        for skip in (0, 1):
            part = run[skip:]
            part = part[: len(part) - len(part) % 2]
            out.append(bytes.fromhex(part))
    return out


def readings(text: str) -> list[str]:
    """``text`` as a reader could decode it: percent, plus, HTML, JSON/C escapes, squeezed, hex, base64."""
    views = [text, unquote(text), unquote_plus(text), html.unescape(text)]
    with contextlib.suppress(ValueError):
        views.append(json.loads(f'"{text}"'))
    views.append(re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m.group(1), 16)), text))
    views += [re.sub(r"\\[nrt]|[\s\u200b]", "", v) for v in list(views)]
    for v in list(views):
        views += [b.decode("latin-1") for b in _hex_decodings(v) + _b64_decodings(v)]
    return views


def leaks(text: str, secret: str) -> list[str]:
    """The readings of ``text`` that hold ``secret`` (empty: it does not leak)."""
    return [v[:120] for v in readings(text) if secret in v]


def assert_clean(lk: Leaky, text: str, what: str, for_the_agent: bool = True) -> None:
    assert not leaks(text, lk.secret), (what, leaks(text, lk.secret), text[:400])
    assert lk.pin not in text, (what, text[:400])
    if for_the_agent:  # the marker names no secret: neither the server, nor the key (the audit record does)
        assert "LEAKY_" not in text and "REDACTED:" not in text, (what, text[:400])


# --- mcp call ----------------------------------------------------------------------------------------


def test_the_oracle_sees_every_encoding_the_server_sends(leaky: Leaky) -> None:
    # the judge must be able to fail: each raw encoding, unredacted, is read back to the secret
    missed = [name for name, spell in ENCODINGS.items() if not leaks(spell(leaky.secret), leaky.secret)]
    assert missed == [], missed
    assert len(ENCODINGS) >= 35


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
def test_mcp_call_never_returns_the_secret_in_any_encoding(leaky: Leaky, encoding: str) -> None:
    for extra in ((), ("--json",)):
        r = leaky.inst.mcp("call", "leaky.leak", f"encoding={encoding}", *extra)
        assert r.code == 0, r
        assert MARKER in r.out, (encoding, r.out)
        assert_clean(leaky, r.out, f"{encoding} {extra}")
    record = leaky.inst.records()[-1]
    assert record["tool"] == "leaky.leak" and record["redacted"] == ["leaky.LEAKY_SECRET"]


def test_every_encoding_at_once_text_and_structured(leaky: Leaky) -> None:
    r = leaky.inst.mcp("call", "leaky.leak_all", "--json")
    assert r.code == 0, r
    data = json.loads(r.out)
    assert_clean(leaky, r.out, "leak_all --json")
    for name, value in data["structuredContent"].items():
        assert_clean(leaky, value, f"structured {name}")
    for block in data["content"]:
        assert_clean(leaky, block["text"], "block")


def test_a_secret_split_across_two_blocks(leaky: Leaky) -> None:
    r = leaky.inst.mcp("call", "leaky.leak_split")
    assert r.code == 0 and r.out.count(MARKER) == 2, r
    assert_clean(leaky, r.out, "split")
    assert_clean(leaky, r.out.replace("\n", "").replace(MARKER, ""), "split, joined by the agent")


def test_a_numeric_secret_returned_as_a_json_number(leaky: Leaky) -> None:
    r = leaky.inst.mcp("call", "leaky.leak_number", "--json")
    assert r.code == 0, r
    assert json.loads(r.out)["structuredContent"] == {"pin": MARKER, "ok": 1}
    assert leaky.pin not in r.out


def test_errors_and_tool_errors(leaky: Leaky) -> None:
    for encoding in ("plain", "base64_wrapped", "json_u_escapes", "hex_0x_each"):
        r = leaky.inst.mcp("call", "leaky.leak_error", f"encoding={encoding}")
        assert r.code == 1 and MARKER in r.err, r
        assert_clean(leaky, r.err + r.out, f"error {encoding}")
    r = leaky.inst.mcp("call", "leaky.leak_tool_error")
    assert r.code == 1 and MARKER in r.out, r
    assert_clean(leaky, r.out + r.err, "tool error")
    with open(leaky.inst.paths.audit_log, encoding="utf-8") as fh:
        assert_clean(leaky, fh.read(), "the audit log", for_the_agent=False)


def test_definitions_in_list_and_describe(leaky: Leaky) -> None:
    listed = leaky.inst.mcp("list")
    assert listed.code == 0 and "leaky.defined" in listed.out, listed
    assert_clean(leaky, listed.out, "list")
    described = leaky.inst.mcp("describe", "leaky.defined")
    assert described.code == 0, described
    assert_clean(leaky, described.out, "describe")
    shown = json.loads(described.out)
    assert shown["inputSchema"]["properties"]["pin"]["default"] == MARKER
    assert MARKER in shown["title"] and MARKER in shown["description"]


def test_mcp_stdio_tools_list_calls_and_progress(leaky: Leaky) -> None:
    session = Session(leaky.inst)
    try:
        session.send({"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        listing = session.through(1, 20)
        session.send(
            {
                "jsonrpc": "2.0",
                "id": 2,
                "method": "tools/call",
                "params": {"name": "leaky.leak_all", "arguments": {}},
            }
        )
        called = session.through(2, 20)
        session.send(
            {
                "jsonrpc": "2.0",
                "id": 3,
                "method": "tools/call",
                "params": {"name": "leaky.leak_progress", "arguments": {}, "_meta": {"progressToken": "p1"}},
            }
        )
        progressed = session.through(3, 20)
        session.send(
            {"jsonrpc": "2.0", "id": 4, "method": "tools/call", "params": {"name": "leaky.leak_split", "arguments": {}}}
        )
        split = session.through(4, 20)
    finally:
        session.close()
    tools = next(m for m in listing if m.get("id") == 1)["result"]["tools"]
    assert "leaky.defined" in {t["name"] for t in tools}
    for m in listing + called + progressed + split:
        assert_clean(leaky, json.dumps(m, ensure_ascii=False), f"stdio {m.get('id') or m.get('method')}")
    result = next(m for m in called if m.get("id") == 2)["result"]
    assert all(MARKER in b["text"] for b in result["content"])
    assert [m for m in progressed if m.get("method") == "notifications/progress"], progressed
    texts = [b["text"] for b in next(m for m in split if m.get("id") == 4)["result"]["content"]]
    assert_clean(leaky, "".join(texts).replace(MARKER, ""), "split blocks joined")


# --- the guess-confirmation attack -------------------------------------------------------------------


def test_a_right_guess_freezes_at_once_names_nothing_and_tells_the_operator(leaky: Leaky) -> None:
    inst = leaky.inst
    told = f"{inst.paths.state}/notified.jsonl"
    hook = f"{inst.root}/notify-hook.sh"
    write(hook, f"#!/bin/sh\ncat >> {told}\necho >> {told}\n", 0, 0, 0o755)
    if os.path.exists(told):
        os.unlink(told)
    inst.write_broker_toml(f'notify_command = ["{hook}"]')
    assert inst.ctl("reload").code == 0
    try:
        wrong = inst.mcp("call", "demo.echo", "text=guess1 guess2")
        assert (wrong.code, wrong.out) == (0, "guess1 guess2\n"), wrong  # a wrong guess: an ordinary answer
        right = inst.mcp("call", "demo.echo", f"text=guess1 {leaky.secret}")
        assert right.code == 77, right
        assert right.err == (
            f"mcp: denied: {AGENT1} is frozen until an operator lifts it ('mcp-brokerctl unfreeze {AGENT1}')\n"
        ), right
        assert_clean(leaky, right.out + right.err, "the guess's answer")
        # frozen at once, for everything, until the operator lifts it
        again = inst.mcp("call", "demo.echo", "text=hi")
        assert again.code == 77 and "frozen until an operator lifts it" in again.err, again
        assert inst.mcp("list").code == 77
        # another agent is not touched
        other = inst.mcp("call", "demo.add", "a=2", "b=3", user=AGENT2)
        assert (other.code, other.out) == (0, "5\n"), other
        records = inst.records()
        guess = next(r for r in reversed(records) if r.get("op") == "call" and r.get("secret"))
        assert guess["caller"] == AGENT1 and guess["secret"] == "leaky.LEAKY_SECRET" and guess["exit"] == 77
        freeze = next(r for r in reversed(records) if r.get("op") == "freeze" and r.get("caller") == AGENT1)
        assert freeze["secret"] == "leaky.LEAKY_SECRET" and freeze["request"] == guess["id"]
        assert leaky.secret not in json.dumps(records)
        assert wait_for(lambda: os.path.exists(told) and "secret_in_arguments" in Path(told).read_text(), 10)
        note = json.loads(Path(told).read_text().splitlines()[0])
        assert note["caller"] == AGENT1 and note["secret"] == "leaky.LEAKY_SECRET" and note["frozen"] is True
        assert leaky.secret not in Path(told).read_text()
        status = json.loads(inst.ctl("status", "--json").out)
        assert AGENT1 in {f["caller"] for f in status["frozen"]}
        # the numeric secret, as a number argument, by the other agent: frozen too
        numeric = inst.mcp("call", "demo.add", f"a={leaky.pin}", "b=0", user=AGENT2)
        assert numeric.code == 77 and "frozen" in numeric.err and leaky.pin not in numeric.err + numeric.out
    finally:
        inst.ctl("unfreeze", AGENT1)
        inst.ctl("unfreeze", AGENT2)
        inst.write_broker_toml()
        inst.ctl("reload")
        os.unlink(hook)
    thawed = inst.mcp("call", "demo.echo", "text=thawed")
    assert (thawed.code, thawed.out) == (0, "thawed\n"), thawed
