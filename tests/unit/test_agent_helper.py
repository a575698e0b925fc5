"""Unit tests for ``agent/helper.py``: ``key=@path`` expansion and ``mcp skill``, run as the agent.

``expand()`` moves file contents (read as the agent) into one JSON object
for ``--args -`` (put right after the tool) and leaves everything else to
the gate, which judges every flag; what it produces goes the whole way the
gate sees it (:func:`agent.helper.gate_command`'s command line and its
length-framed stdin, read back by the gate's own ``read_frame`` on a pipe,
then the gate's parser) to check that the gate reads what the agent meant.
``skill()`` and ``main()`` run against a fake gate: a small executable
script that answers ``list`` and ``describe`` from a table and logs its
argv and stdin, with ``agent.helper._gate_argv`` patched so no sudo is ever
run (it records the gate user each command would run as).
"""

from __future__ import annotations

import io
import json
import os
import re
import stat
import sys
from pathlib import Path
from typing import Any

import pytest

from agent import helper
from agent.helper import DATA_EXIT, MAX_FILE_BYTES, USAGE_EXIT, AgentError, expand, skill
from broker.gate import verbs as gate
from tests.fakes import unframe

#: the agent's own gate user, as the shim passes it to the helper
GATE_USER = "mcp-gate-alice"


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "note.txt").write_text("hello\nworld\n", encoding="utf-8")
    (tmp_path / "other.txt").write_text("second", encoding="utf-8")
    return tmp_path


def gate_reads(argv: list[str], payload: str | None) -> gate.Request:
    """What the gate makes of the helper's output, the way ``mcp-gate``'s ``run()`` gets it.

    The sudo command line holds only the verb and the tool; the other
    arguments and the payload come in the frame on the gate's stdin.
    """
    command, data = helper.gate_command("/GATE", GATE_USER, argv, payload)
    assert command[:5] == ["sudo", "-n", "-u", GATE_USER, "/GATE"]
    gate_argv = command[5:]
    if data is None:
        return gate.parse_argv(gate_argv, io.StringIO(""))
    assert len(gate_argv) <= 2  # 'call' and at most the tool: never an argument value
    items, piped = unframe(data)
    return gate.parse_argv(gate_argv + items, io.StringIO(piped if piped is not None else ""))


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


def test_args_without_files_go_right_after_the_tool() -> None:
    out, payload = expand(["call", "demo.echo", "b=@@c", "--args", '{"a": 1}'], None)
    assert (out, payload) == (["call", "demo.echo", "--args", '{"a": 1}', "b=@c"], None)
    req = gate_reads(out, payload)
    assert req.args == {"a": 1} and req.kv == [["b", "@c"]]
    out, payload = expand(["call", "demo.echo", "--args=-"], None)
    # stdin is not read here: main() reads it and sends it in the frame
    assert (out, payload) == (["call", "demo.echo", "--args", "-"], None)
    assert gate_reads(out, '{"s": 1}').args == {"s": 1}


def test_flags_with_values_keep_their_values() -> None:
    out, _ = expand(["call", "demo.echo", "--timeout", "text=@@x", "--json"], None)
    # '--timeout' takes the next word whatever it is: the gate will judge 'text=@@x' as its value
    assert out == ["call", "demo.echo", "--timeout", "text=@@x", "--json"]


# --- expand: files ------------------------------------------------------------------------------------


def test_a_file_value_moves_into_the_json_payload(files: Path) -> None:
    out, payload = expand(["call", "demo.echo", f"text=@{files}/note.txt", "n=5", "--json"], None)
    assert out == ["call", "demo.echo", "--args", "-", "n=5", "--json"]
    assert payload is not None and json.loads(payload) == {"text": "hello\nworld\n"}
    assert not any(str(files) in a for a in out)  # the path is never sent: the gate cannot read the agent's files
    assert str(files) not in payload
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
    assert out == ["call", "demo.echo", "--args", "-", "--", "--json=1"]
    req = gate_reads(out, payload)
    assert req.args == {"-x": "second"} and req.kv == [["--json", "1"]] and not req.json


# fixed: '--args' used to be appended after a '--' the agent wrote, where the gate reads no flags
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
    assert out[2:4] == ["--args", "-" if payload is not None else '{"a": 1}']
    assert out.index("--args") < out.index("--")
    req = gate_reads(out, payload)
    assert (req.args, req.kv) == (args, kv)


def test_a_literal_at_value_after_a_double_dash_reaches_the_gate() -> None:
    out, payload = expand(["call", "demo.echo", "--", "k=@@v", "--json=1"], None)
    req = gate_reads(out, payload)
    assert req.kv == [["k", "@v"], ["--json", "1"]] and req.args is None and not req.json


# fixed: a second '--args' used to replace the first silently (the gate itself refuses 'given twice')
@pytest.mark.parametrize(
    "flags",
    [
        ["--args", '{"a": 1}', "--args", '{"b": 2}'],
        ['--args={"a": 1}', "--args", "-"],
        ["--args", "-", "--args=-"],
    ],
    ids=["two objects", "object and stdin", "stdin twice"],
)
@pytest.mark.parametrize("with_file", [True, False], ids=["with a file", "no file"])
def test_args_given_twice_is_refused(files: Path, flags: list[str], with_file: bool) -> None:
    tail = [f"t=@{files}/other.txt"] if with_file else []
    with pytest.raises(AgentError, match=r"^--args given twice$") as caught:
        expand(["call", "demo.echo", *flags, *tail], io.StringIO('{"c": 3}'))
    assert caught.value.code == USAGE_EXIT


# expand() puts '--args' right after the tool, wherever the tool stands; the gate accepts flags before the
# tool ('mcp call --timeout 5 T k=v' works without a file value), but with a key=@file the helper makes
# 'call --timeout --args - 5 T' and the gate refuses it (--timeout takes seconds, got '--args'); the same for
# a leading '--args JSON', whose value becomes the next '--args' flag's JSON.
@pytest.mark.parametrize(
    ("argv", "args", "timeout"),
    [
        (["call", "--timeout", "5", "demo.echo", "t=@{files}/other.txt"], {"t": "second"}, 5.0),
        (["call", "--args", '{"a": 1}', "demo.echo", "t=@{files}/other.txt"], {"a": 1, "t": "second"}, None),
    ],
    ids=["--timeout first", "--args first"],
)
def test_flags_before_the_tool_work_with_a_file_value(
    files: Path, argv: list[str], args: dict[str, Any], timeout: float | None
) -> None:
    plain = [a for a in argv if "@" not in a]
    assert gate.parse_argv(plain, io.StringIO("")).tool == "demo.echo"  # the gate takes this order
    out, payload = expand([a.replace("{files}", str(files)) for a in argv], None)
    req = gate_reads(out, payload)
    assert (req.tool, req.args, req.timeout) == ("demo.echo", args, timeout)


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
    log.write(json.dumps({{"argv": sys.argv[1:], "stdin": sys.stdin.buffer.read().hex()}}) + "\\n")
table = json.load(open(here + "/table.json"))
argv = sys.argv[1:]
key = argv[0] if argv[0] != "describe" else "describe " + argv[1]
answer = table.get(key, {{"code": 64, "stderr": "mcp: unexpected " + " ".join(argv)}})
sys.stdout.write(answer.get("stdout", ""))
sys.stderr.write(answer.get("stderr", ""))
sys.exit(answer.get("code", 0))
"""


class FakeGate:
    """An executable that answers from ``table.json`` and logs each run to ``calls.jsonl``.

    ``users`` is the gate user of every command the helper built (``_gate_argv`` is patched to run the
    fake directly instead of through sudo).
    """

    def __init__(self, where: Path) -> None:
        self.dir = where
        self.path = str(where / "fake-gate")
        with open(self.path, "w", encoding="utf-8") as fh:
            fh.write(FAKE_GATE.format(python=sys.executable, here=str(where)))
        os.chmod(self.path, stat.S_IRWXU)
        self.table: dict[str, dict[str, Any]] = {}
        self.users: list[str] = []

    def argv(self, gate_path: str, gate_user: str, argv: list[str]) -> list[str]:
        self.users.append(gate_user)
        return [gate_path, *argv]

    def answer(self, key: str, code: int = 0, stdout: Any = "", stderr: str = "") -> None:
        text = stdout if isinstance(stdout, str) else json.dumps(stdout)
        self.table[key] = {"code": code, "stdout": text, "stderr": stderr}
        (self.dir / "table.json").write_text(json.dumps(self.table), encoding="utf-8")

    def calls(self) -> list[dict[str, Any]]:
        log = self.dir / "calls.jsonl"
        if not log.exists():
            return []
        runs = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()]
        for run in runs:
            run["stdin"] = bytes.fromhex(run["stdin"])
        return runs


@pytest.fixture
def fake(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FakeGate:
    g = FakeGate(tmp_path)
    g.answer("list", stdout={"tools": []})
    monkeypatch.setattr(helper, "_gate_argv", g.argv)
    return g


ECHO_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}, "n": {"type": "integer"}, "raw": True},
    "required": ["text"],
}


def test_the_real_gate_argv_is_sudo_to_the_agent_s_own_gate_user() -> None:
    assert helper._gate_argv("/usr/local/sbin/mcp-gate", GATE_USER, ["list", "--json"]) == [
        "sudo",
        "-n",
        "-u",
        GATE_USER,
        "/usr/local/sbin/mcp-gate",
        "list",
        "--json",
    ]
    assert helper._gate_argv("/G", "mcp-gate-bob", [])[3] == "mcp-gate-bob"
    assert not hasattr(helper, "GATE_USER")  # no shared gate user any more: the shim names the agent's own


def test_skill_lists_each_tool_with_its_arguments(fake: FakeGate) -> None:
    fake.answer(
        "list",
        stdout={"tools": [{"name": "demo.echo", "description": "Echo text back"}, {"name": "demo.ping"}]},
    )
    fake.answer("describe demo.echo", stdout={"name": "demo.echo", "inputSchema": ECHO_SCHEMA})
    fake.answer("describe demo.ping", stdout={"name": "demo.ping", "inputSchema": {"type": "object"}})
    text = skill(fake.path, GATE_USER)
    head, body = text.split("\n---\n\n", 1)
    assert head.startswith("---\n") and body.startswith("# Tools through mcp-privsep\n")
    front = dict(line.split(": ", 1) for line in head.splitlines()[1:])  # the YAML front matter skills need
    assert front["name"] == "mcp-privsep" and re.fullmatch(r"[a-z0-9-]{1,64}", front["name"])
    assert json.loads(front["description"]).startswith("Use the operator's allowed tools")
    assert len(json.loads(front["description"])) < 160  # OpenClaw: one line, under 160 characters
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
    assert fake.users == [GATE_USER] * 3


def test_skill_tells_the_exit_codes_and_how_to_call(fake: FakeGate) -> None:
    text = skill(fake.path, GATE_USER)
    for needle in ("key=@path", "key=@@text", "--args -", "77", "65", "75", "misspelt names are never corrected"):
        assert needle in text, needle


def test_skill_with_no_tools_says_so(fake: FakeGate) -> None:
    text = skill(fake.path, GATE_USER)
    assert text.endswith("## Tools\n\nNo tools are allowed for you at the moment.\n")
    assert [c["argv"] for c in fake.calls()] == [["list", "--json"]]


def test_a_tool_that_cannot_be_described_is_listed_without_arguments(fake: FakeGate) -> None:
    fake.answer("list", stdout={"tools": [{"name": "demo.echo", "description": "Echo"}]})
    fake.answer("describe demo.echo", code=77, stderr="mcp: denied\n")
    text = skill(fake.path, GATE_USER)
    assert text.endswith("### demo.echo\n\nEcho\n")
    assert "Example" not in text


def test_a_failed_listing_is_an_error_with_the_gate_s_code_and_words(fake: FakeGate) -> None:
    fake.answer("list", code=69, stderr="mcp: broker unavailable: connection refused\n")
    with pytest.raises(AgentError) as caught:
        skill(fake.path, GATE_USER)
    assert (caught.value.code, str(caught.value)) == (69, "mcp: broker unavailable: connection refused")
    fake.answer("list", code=78)
    with pytest.raises(AgentError) as caught:
        skill(fake.path, GATE_USER)
    assert (caught.value.code, str(caught.value)) == (78, "mcp list failed")


# --- main ----------------------------------------------------------------------------------------------


def test_main_skill_prints_the_skill(fake: FakeGate, capsys: pytest.CaptureFixture[str]) -> None:
    assert helper.main(fake.path, GATE_USER, ["skill"]) == 0
    assert capsys.readouterr().out == skill(fake.path, GATE_USER)


def test_main_skill_takes_no_arguments(fake: FakeGate, capsys: pytest.CaptureFixture[str]) -> None:
    assert helper.main(fake.path, GATE_USER, ["skill", "--json"]) == 64
    assert capsys.readouterr().err == "mcp: 'skill' takes no arguments\n"
    assert fake.calls() == []


def test_main_reports_an_expansion_error_as_one_line(
    fake: FakeGate, files: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert helper.main(fake.path, GATE_USER, ["call", "demo.echo", f"t=@{files}/nope"]) == 65
    err = capsys.readouterr().err
    assert err == f"mcp: cannot read {files}/nope: No such file or directory\n"
    assert fake.calls() == []  # nothing reached the gate


def test_main_sends_the_payload_on_stdin_and_returns_the_gate_s_code(fake: FakeGate, files: Path) -> None:
    fake.answer("call", code=1, stdout="it broke\n")
    code = helper.main(fake.path, GATE_USER, ["call", "demo.echo", f"text=@{files}/other.txt", "n=2"])
    assert code == 1
    (run,) = fake.calls()
    assert run["argv"] == ["call", "demo.echo"]  # no argument on the command line
    assert fake.users == [GATE_USER]
    items, piped = unframe(run["stdin"])
    assert items == ["--args", "-", "n=2"]
    assert json.loads(piped or "") == {"text": "second"}
    assert run["stdin"] == helper.frame(items, piped)


def test_main_puts_the_agent_s_stdin_in_the_frame_for_args_dash(
    fake: FakeGate, monkeypatch: pytest.MonkeyPatch
) -> None:
    """'--args -' with no file value: main() reads what the agent piped in and sends it in the frame."""
    fake.answer("call", stdout="ok\n")
    monkeypatch.setattr(sys, "stdin", io.StringIO('{"text": "from stdin\n"}'))
    assert helper.main(fake.path, GATE_USER, ["call", "demo.echo", "k=@@v", "--args=-"]) == 0
    (run,) = fake.calls()
    assert run["argv"] == ["call", "demo.echo"]
    items, piped = unframe(run["stdin"])
    assert items == ["--args", "-", "k=@v"] and piped == '{"text": "from stdin\n"}'


def test_main_execs_sudo_for_a_verb_that_is_not_a_call(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[str, list[str]]] = []

    def fake_exec(file: str, args: list[str]) -> None:
        seen.append((file, args))
        raise SystemExit(0)

    monkeypatch.setattr(os, "execvp", fake_exec)
    with pytest.raises(SystemExit):
        helper.main("/usr/local/sbin/mcp-gate", GATE_USER, ["describe", "demo.echo", "--json"])
    assert seen == [
        ("sudo", ["sudo", "-n", "-u", GATE_USER, "/usr/local/sbin/mcp-gate", "describe", "demo.echo", "--json"])
    ]


def test_main_sends_a_call_s_arguments_in_the_frame_even_when_nothing_was_expanded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: list[tuple[list[str], bytes]] = []

    def fake_run(command: list[str], input: bytes, check: bool) -> Any:
        seen.append((command, input))
        return type("Done", (), {"returncode": 3})()

    def no_exec(file: str, args: list[str]) -> None:
        raise AssertionError(f"a call must not exec with its arguments on the command line: {args}")

    monkeypatch.setattr(os, "execvp", no_exec)
    monkeypatch.setattr(helper.subprocess, "run", fake_run)
    assert helper.main("/usr/local/sbin/mcp-gate", GATE_USER, ["call", "demo.echo", "text=@@secret"]) == 3
    ((command, data),) = seen
    assert command == ["sudo", "-n", "-u", GATE_USER, "/usr/local/sbin/mcp-gate", "call", "demo.echo"]
    assert not any("secret" in a for a in command)
    assert unframe(data) == (["text=@secret"], None)


# --- the frame, the gate command and what may stand on a command line ----------------------------------


def test_frame_layout_is_exact() -> None:
    assert helper.frame([], None) == b"mcp-args 1 0 0\n"
    assert helper.frame(["a=1", "b c", ""], None) == b"mcp-args 1 3 0\n3 a=1\n3 b c\n0 \n"
    assert helper.frame(["\u00e9"], None) == b"mcp-args 1 1 0\n2 \xc3\xa9\n"  # lengths count bytes
    assert helper.frame(["--args", "-"], '{"x": 1}') == b'mcp-args 1 2 8\n6 --args\n1 -\n{"x": 1}\n'
    assert helper.frame(["x\ny"], "") == b"mcp-args 1 1 0\n3 x\ny\n"  # empty stdin: none sent
    assert helper.frame(["\udcff"], None) == b"mcp-args 1 1 0\n1 \xff\n"  # undecodable argv bytes survive


@pytest.mark.parametrize(
    ("word", "ok"),
    [
        ("demo.echo", True),
        ("a", True),
        ("my-srv_2.tool-x", True),
        ("", False),
        ("-", False),
        ("--json", False),
        ("-demo.echo", False),
        ("text=secret", False),
        ("k:v", False),
        ("demo echo", False),
        ("demo.echo\n", False),
        ("a/b", False),
        ("$f", False),
        ("`id`", False),
        ("d\u00e9mo.echo", False),
        ("\u0663", False),  # an Arabic-Indic digit: isalnum(), but not ASCII
        ("demo.echo;", False),
    ],
)
def test_names_a_tool_is_the_shim_s_test(word: str, ok: bool) -> None:
    assert helper.names_a_tool(word) is ok


@pytest.mark.parametrize(
    ("argv", "head", "items"),
    [
        (["call", "demo.echo", "text=hi", "--json"], ["call", "demo.echo"], ["text=hi", "--json"]),
        (["call", "demo.echo"], ["call", "demo.echo"], []),
        (["call"], ["call"], []),
        (["call", "text=secret", "demo.echo"], ["call"], ["text=secret", "demo.echo"]),
        (["call", "--timeout", "5", "demo.echo"], ["call"], ["--timeout", "5", "demo.echo"]),
        (["call", "bad name", "x=1"], ["call"], ["bad name", "x=1"]),
    ],
)
def test_gate_command_keeps_every_call_argument_off_the_command_line(
    argv: list[str], head: list[str], items: list[str]
) -> None:
    command, data = helper.gate_command("/GATE", GATE_USER, argv, None)
    assert command == ["sudo", "-n", "-u", GATE_USER, "/GATE", *head]
    assert data == helper.frame(items, None)
    assert unframe(data) == (items, None)


@pytest.mark.parametrize("argv", [["list", "--json"], ["describe", "demo.echo"], ["status"], ["stdio"], ["help"]])
def test_gate_command_passes_other_verbs_as_they_are(argv: list[str]) -> None:
    assert helper.gate_command("/GATE", GATE_USER, argv, None) == (
        ["sudo", "-n", "-u", GATE_USER, "/GATE", *argv],
        None,
    )
