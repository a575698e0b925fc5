"""The real ``mcp`` shim (``agent.render``), run by ``/bin/sh`` (and bash) against a fake ``sudo``.

The shim is written to a temporary file from
``agent.render({os.getuid(): "gate-test"}, "/GATE", "/HELPER")`` and run with
a ``PATH`` whose first directory holds a fake ``sudo``: a small ``sh``
script that writes its argv (NUL-separated) and its stdin to files. For a
``call``:

- sudo's argv is exactly ``-n -u gate-test /GATE call [TOOL]``: no argument
  value on any command line (``/proc/*/cmdline`` is world-readable), and a
  first word that does not look like a tool (``text=secret``) stays off it
  too;
- the gate's own ``read_frame`` on what sudo got on stdin gives back exactly
  the arguments after the tool, and for ``--args -`` / ``--args=-`` what the
  agent piped into the shim, whatever they hold (newlines, ``$f``,
  backticks, the heredoc's word on a line of its own, non-ASCII, bytes that
  are not UTF-8);
- ``agent.helper.gate_command`` puts the same bytes on stdin for the same
  arguments (the helper and the shim are two writers of one format).

Other verbs reach sudo as they are; an uid that is not in the table exits 77
with one ``mcp:`` line and never runs sudo; ``skill`` and ``key=@path`` go to
the helper, with the gate and the agent's gate user in front.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import agent
from agent import helper
from broker.gate import verbs
from tests.fakes import unframe

GATE_USER = "gate-test"
GATE = "/GATE"
HELPER = "/HELPER"
#: the shells the shim must work under: its own '#!/bin/sh' (dash on Debian), and bash as sh
SHELLS = ["/bin/sh"] + (["/bin/bash"] if os.path.exists("/bin/bash") else [])

FAKE_SUDO = """#!/bin/sh
: > {dir}/argv
for a; do printf '%s\\0' "$a" >> {dir}/argv; done
cat > {dir}/stdin
exit 42
"""
FAKE_HELPER = """import json, sys
with open({log!r}, "w") as fh:
    json.dump(sys.argv[1:], fh)
sys.exit(43)
"""


@dataclass
class Ran:
    code: int
    stderr: str
    argv: list[str] | None  # what sudo was called with (None: sudo never ran)
    stdin: bytes | None  # what sudo read on its stdin


class Shim:
    """A rendered shim in a temporary directory, with the fake sudo first on PATH."""

    def __init__(self, where: Path, agents: dict[int, str] | None = None, helper_path: str = HELPER) -> None:
        self.dir = where
        self.bin = where / "bin"
        self.bin.mkdir(exist_ok=True)
        self.out = where / "sudo-saw"
        self.out.mkdir(exist_ok=True)
        sudo = self.bin / "sudo"
        sudo.write_text(FAKE_SUDO.format(dir=self.out), encoding="utf-8")
        sudo.chmod(0o755)
        self.path = where / "mcp"
        text = agent.render({os.getuid(): GATE_USER} if agents is None else agents, GATE, helper_path)
        self.path.write_text(text, encoding="utf-8")
        self.path.chmod(0o755)

    def run(self, argv: list[str | bytes], stdin: bytes = b"", shell: str = "/bin/sh") -> Ran:
        for name in ("argv", "stdin"):
            (self.out / name).unlink(missing_ok=True)
        command: list[str | bytes] = [str(self.path)] if shell == "/bin/sh" else [shell, str(self.path)]
        done = subprocess.run(
            [*command, *argv],
            input=stdin,
            capture_output=True,
            env={"PATH": f"{self.bin}:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"},
            timeout=60,
            check=False,
        )
        seen = self.out / "argv"
        argv_seen = None
        if seen.exists():
            argv_seen = [os.fsdecode(a) for a in seen.read_bytes().split(b"\0")[:-1]]
        data = self.out / "stdin"
        return Ran(
            done.returncode,
            done.stderr.decode(errors="replace"),
            argv_seen,
            data.read_bytes() if data.exists() else None,
        )


@pytest.fixture(scope="module")
def shim() -> Iterator[Shim]:
    where = Path(tempfile.mkdtemp(prefix="mcp-privsep-shim-"))
    try:
        yield Shim(where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def expected(args: list[str], piped: str | None) -> tuple[list[str], list[str], str | None]:
    """(sudo's argv after the gate path, the frame's items, the frame's stdin) for ``mcp call *args``."""
    if args and helper.names_a_tool(args[0]):
        head, items = ["call", args[0]], args[1:]
    else:
        head, items = ["call"], list(args)
    reads = any(a in ("-", "--args=-") for a in items)
    return head, items, (piped or None) if reads else None


def check_call(ran: Ran, args: list[str], piped: str | None) -> tuple[list[str], str | None]:
    head, items, stdin = expected(args, piped)
    assert ran.code == 42, ran.stderr  # the fake sudo's code: the shim exec'd it
    assert ran.argv == ["-n", "-u", GATE_USER, GATE, *head]
    assert ran.stdin is not None
    got = unframe(ran.stdin)
    assert got == (items, stdin)
    # the helper writes the very same bytes for the same call
    command, data = helper.gate_command(GATE, GATE_USER, ["call", *args], stdin)
    assert command == ["sudo", *ran.argv]
    assert data == ran.stdin
    return got


# --- call: the frame ------------------------------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
def test_a_plain_call(shim: Shim, shell: str) -> None:
    ran = shim.run(["call", "demo.echo", "text=hello world", "n:5", "--json"], shell=shell)
    assert ran.argv == ["-n", "-u", GATE_USER, GATE, "call", "demo.echo"]
    assert ran.stdin == b"mcp-args 1 3 0\n16 text=hello world\n3 n:5\n6 --json\n"
    check_call(ran, ["demo.echo", "text=hello world", "n:5", "--json"], None)
    req = verbs.parse_argv(ran.argv[4:] + unframe(ran.stdin or b"")[0], None)
    assert (req.tool, req.kv, req.json) == ("demo.echo", [["text", "hello world"], ["n", "5"]], True)


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "args",
    [
        ["text=secret", "demo.echo"],
        ["--timeout", "5", "demo.echo", "k=v"],
        ["-", "demo.echo"],
        ["bad name", "x=1"],
        ["d\u00e9mo.echo", "x=1"],
        ["demo.echo;id", "x=1"],
        ["$f"],
        [],
    ],
    ids=["kv first", "flag first", "dash first", "space", "non-ASCII", "semicolon", "dollar", "nothing"],
)
def test_a_first_word_that_is_not_a_tool_stays_off_the_command_line(shim: Shim, shell: str, args: list[str]) -> None:
    ran = shim.run(["call", *args], stdin=b"{}", shell=shell)
    assert ran.argv == ["-n", "-u", GATE_USER, GATE, "call"]
    check_call(ran, args, "{}")


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "flags", [["--args", "-"], ["--args=-"], ["k=v", "--args", "-", "--json"]], ids=["--args -", "--args=-", "mixed"]
)
def test_args_dash_sends_the_agent_s_stdin_in_the_frame(shim: Shim, shell: str, flags: list[str]) -> None:
    payload = {"text": "line one\nMCP_PRIVSEP_ARGUMENTS\n$f `id` \u00e9\U0001f600", "n": [1, 2]}
    piped = json.dumps(payload, ensure_ascii=False) + "\n\n"  # trailing newlines are kept too
    ran = shim.run(["call", "demo.echo", *flags], stdin=piped.encode(), shell=shell)
    items, stdin = check_call(ran, ["demo.echo", *flags], piped)
    assert stdin == piped
    req = verbs.parse_argv(["call", "demo.echo", *items], io.StringIO(stdin or ""))
    assert req.args == payload


@pytest.mark.parametrize("shell", SHELLS)
def test_without_args_dash_the_agent_s_stdin_is_not_read(shim: Shim, shell: str) -> None:
    ran = shim.run(["call", "demo.echo", "text=-", "k=--args=-"], stdin=b'{"never": "sent"}', shell=shell)
    assert b"never" not in (ran.stdin or b"")
    check_call(ran, ["demo.echo", "text=-", "k=--args=-"], None)


@pytest.mark.parametrize("shell", SHELLS)
def test_a_large_call_goes_through_whole(shim: Shim, shell: str) -> None:
    """Beyond a pipe's buffer: the heredoc of the shell still carries every byte."""
    big = [f"k{i}=" + "x\n\u00e9" * 15_000 for i in range(3)]  # 60 KB each: one argv string may hold 128 KB
    piped = json.dumps({"blob": "y" * 300_000})
    ran = shim.run(["call", "demo.echo", *big, "--args", "-"], stdin=piped.encode(), shell=shell)
    assert ran.stdin is not None and len(ran.stdin) > 480_000
    check_call(ran, ["demo.echo", *big, "--args", "-"], piped)


@pytest.mark.parametrize("shell", SHELLS)
def test_argument_bytes_that_are_not_utf8_go_through_as_they_are(shim: Shim, shell: str) -> None:
    ran = shim.run([b"call", b"demo.echo", b"text=\xff\xfe", b"k=\xc3"], shell=shell)
    assert ran.stdin == b"mcp-args 1 2 0\n7 text=\xff\xfe\n3 k=\xc3\n"
    check_call(ran, ["demo.echo", "text=\udcff\udcfe", "k=\udcc3"], None)


#: values the shim must carry untouched: no NUL (argv cannot hold one), nothing that sends it to the helper
SAFE = st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00")
HOSTILE = st.sampled_from(
    [
        "",
        "-",
        "--",
        "--args",
        "--args=-",
        "--json",
        "--timeout",
        "5",
        "MCP_PRIVSEP_ARGUMENTS",
        "MCP_PRIVSEP_ARGUMENTS\n",
        "\nMCP_PRIVSEP_ARGUMENTS",
        "a\nMCP_PRIVSEP_ARGUMENTS\nb",
        "$f",
        "${f}",
        "$s",
        "$t",
        "$g",
        "$1",
        "$@",
        "$(id)",
        "`id`",
        "\\",
        "\\n",
        "\\\n",
        "'",
        '"',
        "*",
        "?",
        "[a]",
        "~",
        "!",
        "#",
        ";",
        "&",
        "|",
        "<",
        ">",
        "\n",
        "\n\n",
        " ",
        "\t",
        "\r",
        "text=secret",
        "k=v w",
        "k:\u00e9",
        "\u65e5\u672c",
        "\U0001f600",
        "\u2028",
        "\x7f",
        "\x01",
        "\udcff",  # a byte that is not UTF-8, as Python spells it in argv
        "mcp-args 1 1 0",
        "3 abc",
    ]
)
VALUE = st.one_of(HOSTILE, st.text(SAFE, max_size=20), st.text(SAFE, max_size=12).map(lambda s: "text=" + s))
TOOL = st.one_of(st.sampled_from(["demo.echo", "files.read_list", "a", "x-y_z.0"]), VALUE)
PIPED = st.one_of(
    st.none(),
    st.just(""),
    st.text(SAFE, max_size=40),
    st.dictionaries(st.text(SAFE, max_size=5), st.text(SAFE, max_size=10), max_size=3).map(
        lambda d: json.dumps(d, ensure_ascii=False)
    ),
)


def _to_helper(value: str) -> bool:
    """Whether the shim hands the whole call to the helper for this argument (a key=@path)."""
    return not value.startswith("-") and ("=@" in value or ":@" in value)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tool=TOOL,
    rest=st.lists(VALUE, max_size=6),
    dash=st.sampled_from([[], [], ["--args", "-"], ["--args=-"]]),
    piped=PIPED,
    shell=st.sampled_from(SHELLS),
)
@example(
    tool="demo.echo",
    rest=["MCP_PRIVSEP_ARGUMENTS"],
    dash=["--args", "-"],
    piped="MCP_PRIVSEP_ARGUMENTS\n",
    shell="/bin/sh",
)
@example(tool="text=secret", rest=["$f", "`id`"], dash=[], piped=None, shell="/bin/sh")
@example(tool="demo.echo", rest=["\n", ""], dash=["--args=-"], piped="\n", shell="/bin/sh")
def test_any_call_s_arguments_reach_the_gate_exactly_and_only_in_the_frame(
    shim: Shim, tool: str, rest: list[str], dash: list[str], piped: str | None, shell: str
) -> None:
    args = [tool, *rest, *dash]
    if any(_to_helper(a) for a in args):
        return  # the helper's path (tested below)
    ran = shim.run(["call", *args], stdin=(piped or "").encode(), shell=shell)
    check_call(ran, args, piped)
    assert ran.argv is not None and len(ran.argv) <= 6  # '-n -u USER GATE call [TOOL]', nothing else
    assert ran.argv[5:] == ([tool] if helper.names_a_tool(tool) else [])


# --- propose: framed like a call, with only the verb on the command line -----------------------------------


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "args",
    [
        ["time", "--pip", "mcp-server-time==2025.9.25", "--tool", "get_current_time", "--why", "the user's zone"],
        ["demo.echo", "--npm", "pkg@1.0.0"],  # a first word that looks like a tool stays off the line too
        ["--status", "--json"],
        ["x", "--pip", "a==1", "--why", "$f `id` \x1b[31m \u202e\nMCP_PRIVSEP_ARGUMENTS\n"],
    ],
)
def test_a_proposal_reaches_the_gate_only_in_the_frame(shim: Shim, shell: str, args: list[str]) -> None:
    ran = shim.run(["propose", *args], stdin=b"not read\n", shell=shell)
    assert ran.code == 42, ran.stderr
    assert ran.argv == ["-n", "-u", GATE_USER, GATE, "propose"]
    assert ran.stdin is not None and unframe(ran.stdin) == (args, None)
    command, data = helper.gate_command(GATE, GATE_USER, ["propose", *args], None)
    assert command == ["sudo", *ran.argv] and data == ran.stdin  # the helper writes the very same bytes
    if "." in args[0]:  # not a server name: the gate says so (64), from the frame
        with pytest.raises(verbs.UsageError):
            verbs.parse_argv(ran.argv[4:] + unframe(ran.stdin)[0], None)
    else:
        assert verbs.parse_argv(ran.argv[4:] + unframe(ran.stdin)[0], None).verb == "propose"


@pytest.mark.parametrize("shell", SHELLS)
def test_a_proposal_s_why_dash_sends_the_agent_s_stdin_in_the_frame(shim: Shim, shell: str) -> None:
    why = "line one\n\x1b]52;c;eA==\x07 \u202eright-to-left\n"
    args = ["time", "--pip", "a==1", "--why", "-"]
    ran = shim.run(["propose", *args], stdin=why.encode(), shell=shell)
    assert ran.argv == ["-n", "-u", GATE_USER, GATE, "propose"]
    assert ran.stdin is not None and unframe(ran.stdin) == (args, why)
    items, piped = unframe(ran.stdin)
    req = verbs.parse_argv(["propose", *items], io.StringIO(piped or ""))
    assert req.args is not None and req.args["why"] == why[:-1]


# --- other verbs, the table, the helper -----------------------------------------------------------------


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--json"],
        ["describe", "demo.echo"],
        ["describe", "demo.echo", "--json"],
        ["status"],
        ["stdio"],
        ["help"],
        [],
    ],
)
def test_other_verbs_reach_sudo_as_they_are(shim: Shim, shell: str, argv: list[str]) -> None:
    ran = shim.run(argv, stdin=b"the agent's own stdin\n", shell=shell)
    assert ran.code == 42, ran.stderr
    assert ran.argv == ["-n", "-u", GATE_USER, GATE, *argv]
    assert ran.stdin == b"the agent's own stdin\n"  # untouched: only a call is framed


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize("argv", [["call", "demo.echo", "k=v"], ["list"], ["skill"], []])
def test_an_uid_not_in_the_table_exits_77_with_one_line(tmp_path: Path, shell: str, argv: list[str]) -> None:
    me = os.getuid()
    others = {me + 1: "gate-a", me + 1000: "gate-b", int(f"{me}1"): "gate-c"}  # never me, nor a prefix match
    for table in (others, {}):
        ran = Shim(tmp_path, table).run(argv, shell=shell)
        assert ran.code == 77
        assert ran.stderr == f"mcp: uid {me} is not an agent of mcp-privsep (mcp-brokerctl install --agent USER)\n"
        assert ran.argv is None and ran.stdin is None  # sudo never ran


@pytest.mark.parametrize("shell", SHELLS)
def test_each_agent_gets_its_own_gate_user(tmp_path: Path, shell: str) -> None:
    me = os.getuid()
    ran = Shim(tmp_path, {me + 1: "gate-other", me: "gate-mine", me + 2: "gate-third"}).run(["status"], shell=shell)
    assert ran.argv == ["-n", "-u", "gate-mine", GATE, "status"]


@pytest.mark.skipif(not os.access("/usr/bin/python3", os.X_OK), reason="the shim runs its helper with /usr/bin/python3")
@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    "argv",
    [["skill"], ["call", "demo.echo", "k=@/etc/hostname"], ["call", "demo.echo", "--json", "k:@note.txt", "a=1"]],
    ids=["skill", "k=@path", "k:@path"],
)
def test_skill_and_file_values_go_to_the_helper(tmp_path: Path, shell: str, argv: list[str]) -> None:
    log = tmp_path / "helper.json"
    script = tmp_path / "helper.py"
    script.write_text(FAKE_HELPER.format(log=str(log)), encoding="utf-8")
    ran = Shim(tmp_path, helper_path=str(script)).run(argv, shell=shell)
    assert ran.code == 43, ran.stderr
    assert json.loads(log.read_text(encoding="utf-8")) == [GATE, GATE_USER, *argv]
    assert ran.argv is None  # the helper, not the shim, calls sudo


@pytest.mark.parametrize("shell", SHELLS)
def test_a_dashed_word_with_an_at_is_not_a_file_value(shim: Shim, shell: str) -> None:
    ran = shim.run(["call", "demo.echo", "--x=@y", "-k:@z"], shell=shell)
    check_call(ran, ["demo.echo", "--x=@y", "-k:@z"], None)


# BUG: the shim keeps what '--args -' reads in a shell variable, and sh drops NUL bytes from a command
# substitution, so the agent's stdin reaches the gate altered: '{"a": "x<NUL>y"}' (not JSON: a raw control
# character; refused with 64 when the gate reads the bytes itself) arrives as '{"a": "xy"}' and is accepted.
@pytest.mark.xfail(strict=True, reason="BUG: NUL bytes of the agent's stdin are dropped by the shim, not refused")
@pytest.mark.parametrize("shell", SHELLS)
def test_stdin_with_a_nul_byte_is_not_silently_changed(shim: Shim, shell: str) -> None:
    piped = b'{"a": "x\x00y"}'
    with pytest.raises(verbs.UsageError):
        verbs.parse_argv(["call", "demo.echo", "--args", "-"], io.StringIO(piped.decode()))  # the gate's verdict
    ran = shim.run(["call", "demo.echo", "--args", "-"], stdin=piped, shell=shell)
    _items, stdin = unframe(ran.stdin or b"")
    assert stdin is not None and stdin.encode("utf-8", "surrogateescape") == piped


def test_the_shim_is_plain_sh_with_no_second_interpreter_on_the_call_path() -> None:
    text = agent.render({os.getuid(): GATE_USER}, GATE, HELPER)
    assert text.startswith("#!/bin/sh\n")
    call_path = text[text.index("case $1 in\ncall)") :]
    assert "python" not in call_path  # past the helper's definition: sh built-ins, cat and sudo only
    assert call_path.count('exec sudo -n -u "$g" /GATE') == 2
    assert "<<MCP_PRIVSEP_ARGUMENTS\n$f\nMCP_PRIVSEP_ARGUMENTS\n" in call_path  # the frame is the heredoc's only line
    for shell in SHELLS:
        subprocess.run([shell, "-n"], input=text.encode(), check=True)
