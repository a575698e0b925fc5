"""Unit tests for ``agent/helper.py``: ``key=@path`` expansion and ``mcp skill``, run as the agent.

``expand()`` moves file contents (read as the agent) into one JSON object
for ``--args -`` and leaves everything else to the gate, which judges
every flag; what it produces is fed to the gate's own parser to check
that the gate reads what the agent meant. ``skill()`` and ``main()`` run
against a fake gate: a small executable script that answers ``list`` and
``describe`` from a table and logs its argv and stdin, with
``agent.helper._gate_argv`` patched so no sudo is ever run.
"""

from __future__ import annotations

import io
import json
import os
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import helper
from agent.helper import DATA_EXIT, MAX_FILE_BYTES, USAGE_EXIT, AgentError, expand, skill
from broker.gate import verbs as gate


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "note.txt").write_text("hello\nworld\n", encoding="utf-8")
    (tmp_path / "other.txt").write_text("second", encoding="utf-8")
    return tmp_path


def gate_reads(argv: list[str], payload: str | None) -> gate.Request:
    """What the gate makes of the helper's output (the payload arrives on its stdin)."""
    return gate.parse_argv(argv, io.StringIO(payload if payload is not None else ""))


# --- expand: what is left alone ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["list"],
        ["call"],
        ["describe", "demo.echo"],
        ["list", "k=@/etc/shadow"],  # only 'call' takes arguments; the gate refuses this one
        ["call", "demo.echo"],
        ["call", "demo.echo", "text=hi", "n:5"],
        ["call", "demo.echo", "--json", "--timeout", "5", "--bogus"],
        ["call", "demo.echo", "-", ":@x", "=@x", "noseparator"],
        ["call", "demo.echo", "text=a@b", "mail=me@example.org"],
    ],
)
def test_arguments_without_a_file_value_pass_through(argv: list[str]) -> None:
    assert expand(argv, io.StringIO("")) == (argv, None)


def test_a_double_at_sends_the_literal_at() -> None:
    assert expand(["call", "demo.echo", "text=@@home", "h:@@x"], None) == (
        ["call", "demo.echo", "text=@home", "h:@x"],
        None,
    )
    out, _ = expand(["call", "demo.echo", "text=@@@triple"], None)
    assert out[2] == "text=@@triple"  # one '@' taken off, no more


def test_args_without_files_are_passed_on_after_the_arguments() -> None:
    out, payload = expand(["call", "demo.echo", "--args", '{"a": 1}', "b=@@c"], None)
    assert (out, payload) == (["call", "demo.echo", "b=@c", "--args", '{"a": 1}'], None)
    req = gate_reads(out, payload)
    assert req.args == {"a": 1} and req.kv == [["b", "@c"]]
    out, payload = expand(["call", "demo.echo", "--args=-"], None)
    assert (out, payload) == (["call", "demo.echo", "--args", "-"], None)  # stdin is left for the gate


def test_flags_with_values_keep_their_values() -> None:
    out, _ = expand(["call", "demo.echo", "--timeout", "text=@@x", "--json"], None)
    # '--timeout' takes the next word whatever it is: the gate will judge 'text=@@x' as its value
    assert out == ["call", "demo.echo", "--timeout", "text=@@x", "--json"]


# --- expand: files ------------------------------------------------------------------------------------


def test_a_file_value_moves_into_the_json_payload(files: Path) -> None:
    out, payload = expand(["call", "demo.echo", f"text=@{files}/note.txt", "n=5", "--json"], None)
    assert out == ["call", "demo.echo", "n=5", "--json", "--args", "-"]
    assert payload is not None and json.loads(payload) == {"text": "hello\nworld\n"}
    assert str(files) not in out[-1]  # the path is never sent: the gate cannot read the agent's files
    req = gate_reads(out, payload)
    assert req.args == {"text": "hello\nworld\n"} and req.kv == [["n", "5"]] and req.json


def test_colon_and_equals_both_work_and_split_at_the_first(files: Path) -> None:
    out, payload = expand(["call", "demo.echo", f"a:@{files}/note.txt", f"b=@{files}/other.txt"], None)
    assert out == ["call", "demo.echo", "--args", "-"]
    assert json.loads(payload or "") == {"a": "hello\nworld\n", "b": "second"}
    out, payload = expand(["call", "demo.echo", f"a=b:@{files}/note.txt"], None)
    assert (out, payload) == (["call", "demo.echo", f"a=b:@{files}/note.txt"], None)  # the value is 'b:@...'


def test_files_merge_with_inline_args(files: Path) -> None:
    for flag in (["--args", '{"x": [1, 2]}'], ['--args={"x": [1, 2]}']):
        out, payload = expand(["call", "demo.echo", *flag, f"text=@{files}/other.txt"], None)
        assert out == ["call", "demo.echo", "--args", "-"]
        assert json.loads(payload or "") == {"x": [1, 2], "text": "second"}


def test_files_merge_with_args_from_stdin(files: Path) -> None:
    out, payload = expand(["call", "demo.echo", "--args", "-", f"text=@{files}/other.txt"], io.StringIO('{"y": 1}'))
    assert out == ["call", "demo.echo", "--args", "-"]
    assert json.loads(payload or "") == {"y": 1, "text": "second"}
    assert gate_reads(out, payload).args == {"y": 1, "text": "second"}


def test_after_a_double_dash_dashed_words_are_arguments(files: Path) -> None:
    out, payload = expand(["call", "demo.echo", "--", f"-x=@{files}/other.txt", "--json=1"], None)
    assert json.loads(payload or "") == {"-x": "second"}
    assert out[:4] == ["call", "demo.echo", "--", "--json=1"]


# BUG: the helper appends '--args -' (or the agent's '--args JSON') at the end, after a '--' the agent wrote;
# the gate then takes '--args' and its value as two more key=value items and fails with a usage error, so
# 'mcp call T -- k=@file' and 'mcp call T --args JSON -- k=@@v' can never work.
@pytest.mark.xfail(strict=True, reason="BUG: '--args' is appended after '--', where the gate reads no flags")
@pytest.mark.parametrize(
    ("argv", "args", "kv"),
    [
        (["call", "demo.echo", "--", "text=@{files}/other.txt"], {"text": "second"}, []),
        (["call", "demo.echo", "--args", '{"a": 1}', "--", "k=@@v"], {"a": 1}, [["k", "@v"]]),
    ],
    ids=["file after --", "--args before --"],
)
def test_arguments_after_a_double_dash_reach_the_gate(
    files: Path, argv: list[str], args: dict[str, Any], kv: list[list[str]]
) -> None:
    out, payload = expand([a.replace("{files}", str(files)) for a in argv], None)
    req = gate_reads(out, payload)
    assert (req.args, req.kv) == (args, kv)


def test_a_literal_at_value_after_a_double_dash_reaches_the_gate() -> None:
    out, payload = expand(["call", "demo.echo", "--", "k=@@v", "--json=1"], None)
    req = gate_reads(out, payload)
    assert req.kv == [["k", "@v"], ["--json", "1"]] and req.args is None and not req.json


# BUG: a second '--args' silently replaces the first in the helper (the gate itself refuses 'given twice'),
# so the agent's first JSON object is dropped without a word.
@pytest.mark.xfail(strict=True, reason="BUG: a repeated --args is silently dropped instead of refused")
def test_args_given_twice_is_refused(files: Path) -> None:
    with pytest.raises(AgentError, match="given twice") as caught:
        expand(["call", "demo.echo", "--args", '{"a": 1}', "--args", '{"b": 2}', f"t=@{files}/other.txt"], None)
    assert caught.value.code == USAGE_EXIT


# --- expand: errors ------------------------------------------------------------------------------------


def test_a_key_given_twice_is_a_usage_error(files: Path) -> None:
    with pytest.raises(AgentError, match="argument 't' given twice") as caught:
        expand(["call", "demo.echo", f"t=@{files}/note.txt", f"t:@{files}/other.txt"], None)
    assert caught.value.code == USAGE_EXIT == 64
    with pytest.raises(AgentError, match="argument 't' given twice") as caught:
        expand(["call", "demo.echo", "--args", '{"t": 1}', f"t=@{files}/note.txt"], None)
    assert caught.value.code == 64


@pytest.mark.parametrize(("text", "message"), [("{", "not valid JSON"), ("[1]", "expected a JSON object")])
def test_bad_args_json_is_a_usage_error(files: Path, text: str, message: str) -> None:
    with pytest.raises(AgentError, match=f"--args: {message}") as caught:
        expand(["call", "demo.echo", "--args", text, f"t=@{files}/note.txt"], None)
    assert caught.value.code == 64
    with pytest.raises(AgentError, match=f"--args: {message}"):
        expand(["call", "demo.echo", "--args", "-", f"t=@{files}/note.txt"], io.StringIO(text))


def test_an_unreadable_file_is_rejected_data(files: Path) -> None:
    for name, why in (("missing.txt", "No such file or directory"), ("", "Is a directory")):
        path = f"{files}/{name}"
        with pytest.raises(AgentError) as caught:
            expand(["call", "demo.echo", f"t=@{path}"], None)
        assert caught.value.code == DATA_EXIT == 65
        assert str(caught.value) == f"cannot read {path}: {why}"


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_a_file_the_agent_cannot_read_is_rejected(files: Path) -> None:
    secret = files / "secret.txt"
    secret.write_text("x")
    secret.chmod(0)
    with pytest.raises(AgentError, match="Permission denied") as caught:
        expand(["call", "demo.echo", f"t=@{secret}"], None)
    assert caught.value.code == 65


def test_a_file_over_the_cap_is_rejected_and_one_at_the_cap_is_sent(files: Path) -> None:
    at = files / "at.txt"
    at.write_bytes(b"a" * MAX_FILE_BYTES)
    _, payload = expand(["call", "demo.echo", f"t=@{at}"], None)
    assert len(json.loads(payload or "")["t"]) == MAX_FILE_BYTES
    over = files / "over.txt"
    over.write_bytes(b"a" * (MAX_FILE_BYTES + 1))
    with pytest.raises(AgentError, match=f"larger than {MAX_FILE_BYTES} bytes") as caught:
        expand(["call", "demo.echo", f"t=@{over}"], None)
    assert caught.value.code == 65


def test_a_binary_file_is_rejected(files: Path) -> None:
    blob = files / "blob.bin"
    blob.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(AgentError, match="not UTF-8 text") as caught:
        expand(["call", "demo.echo", f"t=@{blob}"], None)
    assert caught.value.code == 65


def test_the_default_code_is_usage() -> None:
    assert AgentError("x").code == 64 and str(AgentError("x")) == "x"


# --- the fake gate -------------------------------------------------------------------------------------

FAKE_GATE = """#!{python}
import json, sys
here = {here!r}
with open(here + "/calls.jsonl", "a") as log:
    log.write(json.dumps({{"argv": sys.argv[1:], "stdin": sys.stdin.read()}}) + "\\n")
table = json.load(open(here + "/table.json"))
argv = sys.argv[1:]
key = argv[0] if argv[0] != "describe" else "describe " + argv[1]
answer = table.get(key, {{"code": 64, "stderr": "mcp: unexpected " + " ".join(argv)}})
sys.stdout.write(answer.get("stdout", ""))
sys.stderr.write(answer.get("stderr", ""))
sys.exit(answer.get("code", 0))
"""


class FakeGate:
    """An executable that answers from ``table.json`` and logs each run to ``calls.jsonl``."""

    def __init__(self, where: Path) -> None:
        self.dir = where
        self.path = str(where / "fake-gate")
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.write(FAKE_GATE.format(python=sys.executable, here=str(where)))
        os.chmod(self.path, stat.S_IRWXU)
        self.table: dict[str, dict[str, Any]] = {}

    def answer(self, key: str, code: int = 0, stdout: Any = "", stderr: str = "") -> None:
        text = stdout if isinstance(stdout, str) else json.dumps(stdout)
        self.table[key] = {"code": code, "stdout": text, "stderr": stderr}
        (self.dir / "table.json").write_text(json.dumps(self.table), encoding="utf-8")

    def calls(self) -> list[dict[str, Any]]:
        log = self.dir / "calls.jsonl"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeGate:
    g = FakeGate(tmp_path)
    g.answer("list", stdout={"tools": []})
    monkeypatch.setattr(helper, "_gate_argv", lambda gate_path, argv: [gate_path, *argv])
    return g


ECHO_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "n": {"type": "integer"}, "raw": True},
    "required": ["text"],
}


def test_the_real_gate_argv_is_sudo_to_the_gate_user() -> None:
    assert helper._gate_argv("/usr/local/sbin/mcp-gate", ["list", "--json"]) == [
        "sudo",
        "-n",
        "-u",
        "mcp-gate",
        "/usr/local/sbin/mcp-gate",
        "list",
        "--json",
    ]


def test_skill_lists_each_tool_with_its_arguments(fake: FakeGate) -> None:
    fake.answer(
        "list",
        stdout={"tools": [{"name": "demo.echo", "description": "Echo text back"}, {"name": "demo.ping"}]},
    )
    fake.answer("describe demo.echo", stdout={"name": "demo.echo", "input_schema": ECHO_SCHEMA})
    fake.answer("describe demo.ping", stdout={"name": "demo.ping", "input_schema": {"type": "object"}})
    text = skill(fake.path)
    assert text.startswith("# Tools through mcp-privsep\n")
    assert text.endswith("\n") and "No tools are allowed" not in text
    echo = text[text.index("### demo.echo") : text.index("### demo.ping")]
    assert echo.splitlines() == [
        "### demo.echo",
        "",
        "Echo text back",
        "",
        "- `text` (string, required)",
        "- `n` (integer, optional)",
        "- `raw` (any, optional)",
        "",
        "Example: `mcp call demo.echo text=...`",
        "",
    ]
    ping = text[text.index("### demo.ping") :]
    assert ping.splitlines() == ["### demo.ping", "", "(no description)", "", "Example: `mcp call demo.ping`"]
    assert [c["argv"] for c in fake.calls()] == [
        ["list", "--json"],
        ["describe", "demo.echo", "--json"],
        ["describe", "demo.ping", "--json"],
    ]


def test_skill_tells_the_exit_codes_and_how_to_call(fake: FakeGate) -> None:
    text = skill(fake.path)
    for needle in ("key=@path", "key=@@text", "--args -", "77", "65", "75", "misspelt names are never corrected"):
        assert needle in text, needle


def test_skill_with_no_tools_says_so(fake: FakeGate) -> None:
    text = skill(fake.path)
    assert text.endswith("## Tools\n\nNo tools are allowed for you at the moment.\n")
    assert [c["argv"] for c in fake.calls()] == [["list", "--json"]]


def test_a_tool_that_cannot_be_described_is_listed_without_arguments(fake: FakeGate) -> None:
    fake.answer("list", stdout={"tools": [{"name": "demo.echo", "description": "Echo"}]})
    fake.answer("describe demo.echo", code=77, stderr="mcp: denied\n")
    text = skill(fake.path)
    assert text.endswith("### demo.echo\n\nEcho\n")
    assert "Example" not in text


def test_a_failed_listing_is_an_error_with_the_gate_s_code_and_words(fake: FakeGate) -> None:
    fake.answer("list", code=69, stderr="mcp: broker unavailable: connection refused\n")
    with pytest.raises(AgentError) as caught:
        skill(fake.path)
    assert (caught.value.code, str(caught.value)) == (69, "mcp: broker unavailable: connection refused")
    fake.answer("list", code=78)
    with pytest.raises(AgentError) as caught:
        skill(fake.path)
    assert (caught.value.code, str(caught.value)) == (78, "mcp list failed")


# --- main ----------------------------------------------------------------------------------------------


def test_main_skill_prints_the_skill(fake: FakeGate, capsys: pytest.CaptureFixture[str]) -> None:
    assert helper.main(fake.path, ["skill"]) == 0
    assert capsys.readouterr().out == skill(fake.path)


def test_main_skill_takes_no_arguments(fake: FakeGate, capsys: pytest.CaptureFixture[str]) -> None:
    assert helper.main(fake.path, ["skill", "--json"]) == 64
    assert capsys.readouterr().err == "mcp: 'skill' takes no arguments\n"
    assert fake.calls() == []


def test_main_reports_an_expansion_error_as_one_line(
    fake: FakeGate, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert helper.main(fake.path, ["call", "demo.echo", f"t=@{files}/nope"]) == 65
    err = capsys.readouterr().err
    assert err == f"mcp: cannot read {files}/nope: No such file or directory\n"
    assert fake.calls() == []  # nothing reached the gate


def test_main_sends_the_payload_on_stdin_and_returns_the_gate_s_code(fake: FakeGate, files: Path) -> None:
    fake.answer("call", code=1, stdout="it broke\n")
    code = helper.main(fake.path, ["call", "demo.echo", f"text=@{files}/other.txt", "n=2"])
    assert code == 1
    (run,) = fake.calls()
    assert run["argv"] == ["call", "demo.echo", "n=2", "--args", "-"]
    assert json.loads(run["stdin"]) == {"text": "second"}


def test_main_execs_sudo_when_nothing_was_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, list[str]]] = []

    def fake_exec(file: str, args: list[str]) -> None:
        seen.append((file, args))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execvp", fake_exec)
    with pytest.raises(SystemExit):
        helper.main("/usr/local/sbin/mcp-gate", ["call", "demo.echo", "text=@@x"])
    assert seen == [
        ("sudo", ["sudo", "-n", "-u", "mcp-gate", "/usr/local/sbin/mcp-gate", "call", "demo.echo", "text=@x"])
    ]
