"""The operator's screen: :mod:`broker.admin.screen`, and the admin commands that print through it.

Each hostile string class an agent or a server can send (CSI colour, OSC 52
clipboard writes, OSC 8 links, a bare CR, backspaces, bidi overrides,
zero-width characters, homoglyphs, 200 KB of padding before the argument
that matters) must reach the terminal visibly and harmlessly. The commands
are run in-process (``main(argv)``) against a fake daemon (``_admin``
replaced) and, for ``audit``, a real log file under ``--root``.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from typing import Any

import pytest

from broker.admin import cli, screen
from broker.admin.audit_reader import json_line, table_row
from broker.core.paths import Paths
from broker.daemon import audit
from tests.unit.conftest import needs_root

ESC = "\x1b"
CSI_RED = "\x1b[31mred\x1b[0m"
OSC52 = "\x1b]52;c;cm0gLXJmIH4K\x07"  # writes "rm -rf ~" to the operator's clipboard
OSC8 = "\x1b]8;;https://evil.example/\x1b\\harmless link\x1b]8;;\x1b\\"
C1_OSC52 = "\x9d52;c;cm0gLXJmIH4K\x9c"  # the same, with the 8-bit OSC and ST
CR_OVERWRITE = "rm -rf /\rharmless"  # a terminal shows "harmless" over the command
BACKSPACES = "rm -rf /" + "\x08" * 8 + "harmless"
BIDI = "safe \u202eexe.txt\u202c and \u2066isolated\u2069"
ZERO_WIDTH = "pa\u200bss\ufeffword\u200d"
HOMOGLYPH_KEY = "p\u0430th"  # a Cyrillic a
PADDING = "x" * 200_000
DANGER = "rm -rf /srv/backups"

#: the code points that must never reach the screen raw (what a terminal acts on, or shows as nothing)
BIDI_AND_INVISIBLE = [0x202A, 0x202B, 0x202C, 0x202D, 0x202E, 0x2066, 0x2067, 0x2068, 0x2069, 0x200E, 0x200F]
BIDI_AND_INVISIBLE += [0x061C, 0x200B, 0x200C, 0x200D, 0x2060, 0x2061, 0x2062, 0x2063, 0x2064, 0xFEFF, 0x180E, 0x00AD]


def unsafe_chars(out: str) -> list[str]:
    """Every character of ``out`` a terminal would act on or not show: C0 (but newline), DEL, C1, Cf, Zl, Zp ..."""
    bad = []
    for ch in out:
        code = ord(ch)
        if ch == "\n" or 0x20 <= code < 0x7F:
            continue
        if code < 0x20 or 0x7F <= code <= 0x9F or screen.hidden(ch) or unicodedata.category(ch) == "Cf":
            bad.append(f"U+{code:04X}")
    return bad


def assert_clean(out: str) -> None:
    assert ESC not in out
    assert not unsafe_chars(out), unsafe_chars(out)


# --- text -------------------------------------------------------------------------------------------------


def test_csi_colour_is_shown_not_obeyed() -> None:
    shown = screen.text(CSI_RED)
    assert shown == "\\x1b[31mred\\x1b[0m"
    assert_clean(shown)


def test_osc52_clipboard_write_is_shown_not_obeyed() -> None:
    assert screen.text(OSC52) == "\\x1b]52;c;cm0gLXJmIH4K\\x07"
    assert screen.text(C1_OSC52) == "\\x9d52;c;cm0gLXJmIH4K\\x9c"  # C1 controls too
    assert_clean(screen.text(OSC52 + C1_OSC52))


def test_osc8_hyperlink_is_shown_not_obeyed() -> None:
    shown = screen.text(OSC8)
    assert shown == "\\x1b]8;;https://evil.example/\\x1b\\harmless link\\x1b]8;;\\x1b\\"
    assert_clean(shown)


def test_a_bare_cr_or_backspaces_cannot_overwrite_what_is_shown() -> None:
    assert screen.text(CR_OVERWRITE) == "rm -rf /\\rharmless"
    assert screen.text(BACKSPACES) == "rm -rf /" + "\\x08" * 8 + "harmless"
    assert screen.text("one\ntwo\tthree") == "one\\ntwo\\tthree"  # one value, one line
    assert screen.text("del\x7f nel\x85") == "del\\x7f nel\\x85"
    assert_clean(screen.text(CR_OVERWRITE + BACKSPACES + "\x00\x07\x1f"))


def test_bidi_controls_are_named() -> None:
    assert screen.text(BIDI) == "safe <U+202E>exe.txt<U+202C> and <U+2066>isolated<U+2069>"
    for code in BIDI_AND_INVISIBLE:
        assert screen.text(f"a{chr(code)}b") == f"a<U+{code:04X}>b"


def test_zero_width_and_invisible_characters_are_named() -> None:
    assert screen.text(ZERO_WIDTH) == "pa<U+200B>ss<U+FEFF>word<U+200D>"
    # other format characters (tags), blank fillers, odd spaces, separators, surrogates, private use, unassigned
    for ch in ("\U000e0041", "\u3164", "\u2800", "\u00a0", "\u3000", "\u2028", "\u2029", "\udc80", "\ue000", "\u0378"):
        assert screen.text(ch) == f"<U+{ord(ch):04X}>"
    assert screen.text("\ufe0f") == "<U+FE0F>"  # a variation selector


def test_ordinary_text_is_left_alone() -> None:
    for plain in ("hello, world", "caf\u00e9 na\u00efve", "\u65e5\u672c\u8a9e", "C:\\path\\x1b literally", "a < b"):
        assert screen.text(plain) == plain


def test_no_code_point_reaches_the_screen_raw_if_it_acts_or_hides() -> None:
    codes = [*range(0x30000), *range(0x30000, 0x110000, 97), *range(0xE0000, 0xE1000), 0x10FFFF]
    every = "".join(chr(c) for c in codes)
    assert_clean(screen.text(every, full=True))
    shown = screen.name(every, full=True)
    assert shown.isascii() and all(0x20 <= ord(c) < 0x7F for c in shown)


def test_a_long_value_is_cut_with_a_note_unless_full() -> None:
    shown = screen.text(PADDING)
    assert shown == "x" * 200 + "... [cut: 200 of 200,000 characters; --full shows all]"
    assert screen.text(PADDING, full=True) == PADDING
    assert screen.text(PADDING, limit=10, more="--json shows all").endswith(
        "[cut: 10 of 200,000 characters; --json shows all]"
    )
    assert screen.text("x" * 200) == "x" * 200  # exactly the limit: no note


def test_the_limit_counts_shown_columns_so_escapes_cannot_stretch_a_line() -> None:
    shown = screen.text("\u202e" * 10_000, limit=40)
    visible, note = shown.split("...", 1)
    assert visible == "<U+202E>" * 5 and "cut: 5 of 10,000 characters" in note
    assert len(screen.text(ESC * 100_000)) < 300


def test_lines_shows_each_line_of_a_multi_line_text() -> None:
    assert screen.lines("- old\n+ new\x1b]52;c;x\x07") == ["- old", "+ new\\x1b]52;c;x\\x07"]


# --- name -------------------------------------------------------------------------------------------------


def test_a_homoglyph_name_is_flagged_and_spelt_out() -> None:
    assert screen.name(HOMOGLYPH_KEY) == "p<U+0430>th [non-ASCII]"
    assert screen.name("path") == "path"
    assert screen.name("d\u0435mo.echo") == "d<U+0435>mo.echo [non-ASCII]"  # a Cyrillic e in a tool name
    assert screen.name("caf\u00e9") == "caf<U+00E9> [non-ASCII]"  # any non-ASCII, not only look-alikes


def test_a_name_is_defanged_like_text() -> None:
    assert screen.name("ev\x1b]52;c;x\x07il") == "ev\\x1b]52;c;x\\x07il"
    assert screen.name("ev\u202eil") == "ev<U+202E>il [non-ASCII]"
    assert screen.name("a\u200bb") == "a<U+200B>b [non-ASCII]"


def test_two_different_names_never_look_the_same() -> None:
    pairs = [("path ", "path"), ("a b", "a<U+0020>b"), ("a\x1b", "a\\x1b"), ("p\u0430th", "p<U+0430>th")]
    for one, other in pairs:
        assert screen.name(one) != screen.name(other), (one, other)


def test_a_long_name_is_cut() -> None:
    shown = screen.name("t" * 5000)
    assert shown.startswith("t" * 200 + "... [cut: 200 of 5,000") and len(shown) < 300


# --- kv_lines ---------------------------------------------------------------------------------------------


def test_padding_cannot_push_the_dangerous_argument_out_of_sight() -> None:
    out = screen.kv_lines({"padding": PADDING, "command": DANGER})
    assert len(out) == 2
    assert out[0].startswith("padding = xxx") and "[cut: 200 of 200,000 characters; --full shows all]" in out[0]
    assert out[1] == f"command = {DANGER}"
    assert all(len(line) < 300 for line in out)
    full = screen.kv_lines({"padding": PADDING, "command": DANGER}, full=True)
    assert full == [f"padding = {PADDING}", f"command = {DANGER}"]


def test_keys_are_names_and_aligned_values_are_text_or_json() -> None:
    out = screen.kv_lines({HOMOGLYPH_KEY: "/etc/shadow", "path": "/tmp/x", "n": 5, "o": {"k": "\u202e"}, "s": "5"})
    assert out == [
        "p<U+0430>th [non-ASCII] = /etc/shadow",
        "path                    = /tmp/x",
        "n                       = 5",
        'o                       = {"k": "<U+202E>"}',
        "s                       = 5",
    ]


def test_every_hostile_value_stays_on_its_own_line() -> None:
    args = {"csi": CSI_RED, "osc52": OSC52, "osc8": OSC8, "cr": CR_OVERWRITE, "bs": BACKSPACES, "bidi": BIDI}
    args |= {"zw": ZERO_WIDTH, "nl": "one\ntwo = 3", "c1": C1_OSC52}
    out = screen.kv_lines(args)
    assert len(out) == len(args)
    for line, key in zip(out, args, strict=True):
        assert line.startswith(f"{key} ")
    assert_clean("\n".join(out))


def test_many_arguments_are_counted_not_hidden() -> None:
    args = {f"k{i}": i for i in range(150)}
    out = screen.kv_lines(args)
    assert len(out) == 101 and out[-1] == "... [50 more arguments; --full shows all]"
    assert len(screen.kv_lines(args, full=True)) == 150
    assert screen.kv_lines({}) == []
    assert screen.kv_lines(["not", "an", "object"]) == ['(not an object) ["not", "an", "object"]']


# --- the commands -----------------------------------------------------------------------------------------

HOSTILE_ARGS: dict[str, Any] = {
    "csi": CSI_RED,
    "osc52": OSC52,
    "bidi": BIDI,
    "zw": ZERO_WIDTH,
    HOMOGLYPH_KEY: "/etc/shadow",
    "padding": PADDING,
    "command": DANGER,
}


class FakeDaemon:
    """What ``_admin`` answers, by op; every request is kept."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, paths: Paths, op: str, timeout: float = 30.0, **fields: Any) -> Any:
        self.requests.append((op, fields))
        return self.answers[op]


@pytest.fixture
def daemon(monkeypatch: pytest.MonkeyPatch) -> FakeDaemon:
    fake = FakeDaemon({})
    monkeypatch.setattr(cli, "_admin", fake)
    return fake


def run(capsys: pytest.CaptureFixture[str], root: str, *argv: str) -> tuple[int, str, str]:
    code = cli.main(["--root", root, *argv])
    out, err = capsys.readouterr()
    return code, out, err


def approval(**extra: Any) -> dict[str, Any]:
    return {
        "id": "a1b2c3",
        "caller": "agent\u202e1",
        "action": "demo.ech\u043e",
        "args_hash": "0" * 64,
        "args": HOSTILE_ARGS,
        "status": "pending",
        "created": time.time(),
        "expires": time.time() + 60,
    } | extra


def line_with(out: str, needle: str) -> str:
    found = [line for line in out.splitlines() if needle in line]
    assert len(found) == 1, (needle, out[:2000])
    return found[0]


def test_approvals_shows_each_argument_defanged_on_its_own_line(
    daemon: FakeDaemon, tmp_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.answers["approvals"] = [approval()]
    code, out, _ = run(capsys, tmp_root, "approvals")
    assert code == 0
    assert_clean(out)
    head = line_with(out, "a1b2c3")
    assert "agent<U+202E>1 [non-ASCII] -> demo.ech<U+043E> [non-ASCII]" in head
    danger = line_with(out, DANGER)
    assert danger.lstrip().startswith("command") and danger.index(DANGER) < 300
    assert "p<U+0430>th [non-ASCII]" in line_with(out, "/etc/shadow")
    assert "\\x1b[31mred" in line_with(out, "csi ") and "\\x1b]52;c;" in line_with(out, "osc52 ")
    assert "[cut: 200 of 200,000 characters; --full shows all]" in line_with(out, "padding ")
    assert max(len(line) for line in out.splitlines()) < 400
    code, out, _ = run(capsys, tmp_root, "approvals", "--full")
    assert code == 0 and PADDING in out and "cut:" not in out
    assert_clean(out)


def test_approvals_json_is_ascii_and_holds_the_exact_arguments(
    daemon: FakeDaemon, tmp_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.answers["approvals"] = [approval()]
    code, out, _ = run(capsys, tmp_root, "approvals", "--json")
    assert code == 0 and out.isascii() and ESC not in out
    assert json.loads(out)[0]["args"] == HOSTILE_ARGS


def test_approvals_without_arguments_says_so(
    daemon: FakeDaemon, tmp_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.answers["approvals"] = [approval(args={})]
    assert "          (no arguments)" in run(capsys, tmp_root, "approvals")[1].splitlines()


def test_approve_and_reject_echo_defanged(
    daemon: FakeDaemon, tmp_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.answers["approve"] = approval(status="approved")
    daemon.answers["reject"] = approval(status="rejected", action="ev\x1b]52;c;x\x07il")
    code, out, _ = run(capsys, tmp_root, "approve", "a1b2c3")
    assert code == 0
    assert_clean(out)
    assert out.splitlines()[0] == "approved a1b2c3: agent<U+202E>1 [non-ASCII] -> demo.ech<U+043E> [non-ASCII]"
    assert line_with(out, DANGER).index(DANGER) < 300
    assert "'approvals --all --full' shows all" in line_with(out, "padding ")
    code, out, _ = run(capsys, tmp_root, "reject", "a1b2c3")
    assert code == 0 and out == "rejected a1b2c3: agent<U+202E>1 [non-ASCII] -> ev\\x1b]52;c;x\\x07il\n"


HOSTILE_TOOL = "r\u0435ad\u202e"  # a Cyrillic e and a bidi override
HOSTILE_DESCRIPTION = f"Reads a file. {OSC52}{OSC8}{BIDI}{ZERO_WIDTH} " + "pad " * 100


def tools_answers() -> dict[str, Any]:
    server = {
        "name": "evil",
        "server": "evil",
        "transport": "stdio",
        "state": "down",
        "reason": f"protocol error: {OSC52} \u202egnp.exe",
        "tools": 1,
        "restarts": 3,
        "hidden": {f"task{ZERO_WIDTH}": f"task-only {OSC8}"},
        "user": "mcp-srv-evil",
        "sandbox": {"uid": 999, "writable": [f"/srv/evil{ESC}[2J"], "pid_namespace": True},
        "sandbox_warnings": [f"landlock {OSC52}"],
    }
    return {
        "tools": {"evil": [{"name": HOSTILE_TOOL, "description": HOSTILE_DESCRIPTION, "annotations": {}}]},
        "status": {
            "broker": "up",
            "pid": 1,
            "version": "0",
            "uptime_s": 1.0,
            "audit": "ok",
            "servers": [server],
            "holdings": {f"agent{ESC}]52;c;x{ESC}\\": {"sessions": 1, "connections": 1, "calls": 0, "max": {}}},
        },
        "pins": [{"action": f"evil.{HOSTILE_TOOL}", "state": "changed", "hash": "0" * 64}],
    }


def test_tools_shows_servers_words_defanged_and_cut(
    daemon: FakeDaemon, tmp_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.answers.update(tools_answers())
    code, out, _ = run(capsys, tmp_root, "tools")
    assert code == 0
    assert_clean(out)
    row = line_with(out, "Reads a file.")
    assert "evil.r<U+0435>ad<U+202E> [non-ASCII]" in row and "\\x1b]52;c;" in row
    assert "[cut: " in row and len(row) < 300
    assert "protocol error: \\x1b]52;c;" in line_with(out, "evil [stdio, down")
    assert "not offered  evil.taskpa<U+200B>ss<U+FEFF>word<U+200D> [non-ASCII]" in out and "task-only \\x1b]8;;" in out
    assert "\\x1b[2J" in line_with(out, "runs as mcp-srv-evil")
    assert "WITHOUT landlock \\x1b]52;c;" in out
    assert "pins accept evil.r<U+0435>ad<U+202E> [non-ASCII]" in out
    code, out, _ = run(capsys, tmp_root, "tools", "--full")
    assert code == 0 and "cut:" not in out and "pad pad pad" in out
    assert_clean(out)


def test_tools_json_is_ascii(daemon: FakeDaemon, tmp_root: str, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.answers.update(tools_answers())
    code, out, _ = run(capsys, tmp_root, "tools", "--json")
    assert code == 0 and out.isascii() and ESC not in out
    assert json.loads(out)["tools"][0]["tool"] == HOSTILE_TOOL


def test_status_shows_reasons_warnings_hidden_tools_and_callers_defanged(
    daemon: FakeDaemon, tmp_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    daemon.answers.update(tools_answers())
    code, out, _ = run(capsys, tmp_root, "status")
    assert code == 0
    assert_clean(out)
    assert "caller agent\\x1b]52;c;x\\x1b\\\\: 1/None sessions" in out  # a name's backslash doubled
    assert "(protocol error: \\x1b]52;c;cm0gLXJmIH4K\\x07 <U+202E>gnp.exe)" in line_with(out, "server evil [stdio]")
    assert "evil.taskpa<U+200B>ss<U+FEFF>" in line_with(out, "not offered (task-only \\x1b]8;;")
    assert "WITHOUT landlock \\x1b]52;c;" in out
    code, out, _ = run(capsys, tmp_root, "status", "--json")
    assert code == 0 and out.isascii() and ESC not in out


def test_explain_shows_why_defanged(daemon: FakeDaemon, tmp_root: str, capsys: pytest.CaptureFixture[str]) -> None:
    daemon.answers["explain"] = {
        "steps": [{"check": "policy", "verdict": "rejected (65)", "why": f"'to' {OSC52} does not match {BIDI}"}],
        "verdict": "rejected (65)",
    }
    code, out, _ = run(capsys, tmp_root, "explain", "agent1", "demo.show", "to=x")
    assert code == 0
    assert_clean(out)
    assert "'to' \\x1b]52;c;cm0gLXJmIH4K\\x07 does not match safe <U+202E>" in out


# --- audit ------------------------------------------------------------------------------------------------

HOSTILE_RECORDS: list[dict[str, Any]] = [
    {"id": "h1", "caller": "agent1", "op": "call", "tool": "d\u0435mo.echo", "decision": "deny", "exit": 77},
    {"id": "h2", "caller": f"agent{ESC}]52;c;x\x07", "op": "call", "tool": "demo.echo", "decision": "allow"},
    {"id": "h3", "caller": "agent1", "op": "call", "tool": "demo.fail", "decision": "allow", "exit": 1,
     "reason": f"the tool broke: {OSC52}{OSC8}{CR_OVERWRITE}{BIDI}{ZERO_WIDTH}{C1_OSC52}", "rule": "demo\u200b.fail"},
    {"id": "h4", "caller": "agent1", "op": "report", "tool": "", "decision": "usage", "exit": 64,
     "reason": "bad tool name " + PADDING + " " + DANGER},
    {"id": "h5", "caller": "agent1", "op": "call", "tool": "demo.echo", "decision": "allow", "exit": 0},
]  # fmt: skip


@pytest.fixture
def hostile_log(tmp_root: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    paths = Paths(tmp_root)
    os.makedirs(paths.log, 0o700)
    log = audit.AuditLog(paths.audit_log)
    for rec in HOSTILE_RECORDS:
        log.write(dict(rec))
    log.close()
    monkeypatch.setattr(os, "geteuid", lambda: 0)  # the command is root-only; the file is ours
    yield paths


def test_audit_table_rows_are_defanged(hostile_log: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, hostile_log.root, "audit")
    assert code == 0
    assert_clean(out)
    rows = out.splitlines()
    assert len(rows) == 1 + len(HOSTILE_RECORDS)
    assert "d<U+0435>mo.echo [non-ASCII]" in rows[1]
    assert "agent\\x1b]52;c;x\\x07" in rows[2]
    assert "demo<U+200B>.fail: the tool broke: \\x1b]52;c;" in rows[3]
    assert "rm -rf / harmless" in rows[3]  # whitespace, the CR too, is one space in a table cell
    assert "[cut: " in rows[4] and len(rows[4]) < 500
    code, out, _ = run(capsys, hostile_log.root, "audit", "--full")
    assert code == 0 and DANGER in out.splitlines()[4] and "cut:" not in out
    assert_clean(out)


def test_table_row_defangs_every_field() -> None:
    row = table_row({k: f"{k}{OSC52}\u202e" for k in ("ts", "caller", "op", "tool", "decision", "outcome", "reason")})
    assert_clean(row)
    assert row.count("\\x1b]52;c;") == 7


def test_audit_json_escapes_what_a_terminal_acts_on_and_keeps_the_records(
    hostile_log: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, hostile_log.root, "audit", "--json")
    assert code == 0 and out.isascii() and ESC not in out
    shown = out.splitlines()
    with open(hostile_log.audit_log, encoding="utf-8") as fh:
        stored = fh.read().splitlines()
    assert [json.loads(line) for line in shown] == [json.loads(line) for line in stored]  # the same records
    assert shown[4] == stored[4]  # a clean line is printed as stored, byte for byte
    assert shown[0] != stored[0] and "\\u0435" in shown[0]


def test_json_line_of_a_broken_line_is_a_json_string() -> None:
    assert json_line(b"not json \x1b]52;c;x\x07", None) == '"not json \\u001b]52;c;x\\u0007"'
    assert json_line(b"plain broken line", None) == "plain broken line"


def read_until(proc: subprocess.Popen[bytes], got: bytearray, marker: bytes, timeout: float = 20) -> None:
    """Read ``proc``'s stdout into ``got`` until it holds ``marker`` (or the time is up)."""
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    while marker not in got and time.monotonic() < deadline:
        if sel.select(0.5):
            chunk = os.read(proc.stdout.fileno(), 65536)
            assert chunk, proc.stderr.read() if proc.stderr else ""
            got += chunk
    sel.close()


@needs_root
def test_audit_follow_defangs_what_it_prints(tmp_root: str) -> None:
    paths = Paths(tmp_root)
    os.makedirs(paths.log, 0o700)
    log = audit.AuditLog(paths.audit_log)
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    command = [sys.executable, "-c", "from broker.admin.cli import entry; entry()", "--root", tmp_root]
    for i, extra in enumerate(((), ("--json",))):
        log.write({"id": f"m{i}", "caller": "agent1", "op": "call", "tool": f"demo.mark{i}", "decision": "allow"})
        proc = subprocess.Popen(
            [*command, "audit", "--follow", "-n", "1", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=repo,
        )
        try:
            got = bytearray()
            read_until(proc, got, f"demo.mark{i}".encode())  # the tail is printed: what is written now is followed
            log.write(dict(HOSTILE_RECORDS[2], reason=f"broke {i}: {HOSTILE_RECORDS[2]['reason']}"))
            read_until(proc, got, f"broke {i}".encode())
            out = got.decode("utf-8")
            assert f"broke {i}: the tool broke" in out
            assert_clean(out)
            assert out.isascii() if extra else "\\x1b]52;c;" in out
        finally:
            proc.terminate()
            proc.wait(10)
    log.close()
