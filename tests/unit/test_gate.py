"""Unit and property tests for ``broker.gate`` (``mcp-gate``), run in-process.

``main()`` is called with explicit argv, environ and string streams and an
install root where nothing exists, so no daemon is ever reached unless a
test starts a fake one. The tests pin the agent-facing contract: the closed
set of verbs and flags, ``k=v``/``k:v`` splitting, ``--args`` (inline or
``-`` on stdin as bytes), ``--timeout`` bounds, argv caps, sysexits codes,
one ``mcp: `` line on stderr and never a traceback, JSON errors with
``--json``, and the allowlist check made before the daemon is contacted.
Protocol v2: what the gate sends names no caller (the daemon knows it by the
peer's uid); ``SUDO_USER`` only picks the allowlist and words the messages,
and ``SUDO_UID`` means nothing any more. The entry point ``run()`` is run in
a subprocess: a call's arguments come in the shim's frame on stdin, never on
its command line.
"""

from __future__ import annotations

import io
import json
import os
import pwd
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Callable, Iterator
from typing import TextIO

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.helper import frame
from broker import __version__
from broker.core import wire
from broker.core.errors import CONTRACT_EXIT_CODES, ConfigError, UsageError
from broker.core.paths import Paths
from broker.gate import verbs as gate
from tests.conftest import ROOT as REPO
from tests.fakes import FakeDaemon
from tests.unit.conftest import needs_root, write

ENV = {"SUDO_USER": "alice"}
#: an install root where nothing exists (never created): no allowlist, no gate.sock
ABSENT_ROOT = os.path.join(tempfile.gettempdir(), f"mcp-privsep-unit-absent-{os.getpid()}-{uuid.uuid4().hex}")


class Result:
    def __init__(self, code: int, out: str, err: str) -> None:
        self.code, self.out, self.err = code, out, err

    def one_error_line(self) -> str:
        """The single ``mcp: `` line on stderr (asserting there is exactly one)."""
        assert "Traceback" not in self.err and "Traceback" not in self.out
        assert self.err.endswith("\n"), repr(self.err)
        lines = self.err.splitlines()
        assert len(lines) == 1, repr(self.err)
        assert lines[0].startswith("mcp: "), repr(self.err)
        return lines[0]


def run(
    argv: list[str], stdin: TextIO | None = None, root: str = ABSENT_ROOT, environ: dict[str, str] | None = None
) -> Result:
    out, err = io.StringIO(), io.StringIO()
    if stdin is None:
        stdin = io.StringIO("")
    code = gate.main(
        argv, root=root, environ=dict(ENV if environ is None else environ), stdin=stdin, stdout=out, stderr=err
    )
    return Result(code, out.getvalue(), err.getvalue())


def bytes_stdin(data: bytes, encoding: str = "utf-8") -> io.TextIOWrapper:
    return io.TextIOWrapper(io.BytesIO(data), encoding=encoding)


# --- help and version ----------------------------------------------------------------


@pytest.mark.parametrize("argv", [["help"], ["--help"], ["-h"]])
def test_help(argv: list[str]) -> None:
    r = run(argv)
    assert r.code == 0
    assert r.out == gate.HELP
    assert r.err == ""
    for verb in ("mcp list", "mcp describe", "mcp call", "mcp status"):
        assert verb in r.out


def test_version() -> None:
    r = run(["--version"])
    assert (r.code, r.out, r.err) == (0, f"mcp-privsep {__version__}\n", "")


def test_help_and_version_need_no_allowlist_or_identity() -> None:
    for argv in (["help"], ["--version"]):
        assert run(argv, environ={}).code == 0


# --- usage errors ------------------------------------------------------------------------

USAGE_ERRORS = [
    [],
    ["LIST"],
    ["lists"],
    ["exec"],
    ["sh"],
    ["--config", "x", "list"],
    ["-c", "list"],
    ["--json", "list"],
    ["help", "list"],
    ["--help", "--json"],
    ["-h", "x"],
    ["--version", "x"],
    ["list", "extra"],
    ["list", "-"],
    ["list", "--"],
    ["list", "--args", "{}"],
    ["list", "--timeout", "5"],
    ["list", "--json=1"],
    ["list", "--jso"],
    ["status", "--args", "{}"],
    ["status", "x"],
    ["describe"],
    ["describe", "demo.echo", "extra"],
    ["describe", "demo.echo", "--timeout", "1"],
    ["describe", "demo.echo", "--args", "{}"],
    ["stdio", "--json"],
    ["stdio", "--config", "x"],
    ["call"],
    ["call", "--json"],
    ["call", "demo"],
    ["call", "demo."],
    ["call", ".echo"],
    ["call", "demo.*"],
    ["call", "files.re?d"],
    ["call", "demo.echo "],
    ["call", "Demo.echo/../x"],
    ["call", "demo.echo", "--config", "x"],
    ["call", "demo.echo", "--config=/etc/shadow"],
    ["call", "--config=/tmp/x", "demo.echo"],
    ["call", "demo.echo", "--stdio"],
    ["call", "demo.echo", "-c", "x"],
    ["call", "demo.echo", "-j"],
    ["call", "demo.echo", "--Json"],
    ["call", "demo.echo", "---json"],
    ["call", "demo.echo", "--cwd", "/"],
    ["call", "demo.echo", "--env", "A=B"],
    ["call", "demo.echo", "--url", "http://x"],
    ["call", "demo.echo", "--server", "x"],
    ["call", "demo.echo", "-"],
    ["call", "demo.echo", "k"],
    ["call", "demo.echo", "=v"],
    ["call", "demo.echo", ":v"],
    ["call", "demo.echo", "a=1", "a=2"],
    ["call", "demo.echo", "a=1", "a:2"],
    ["call", "demo.echo", "--args", '{"a":1}', "a=2"],
    ["call", "demo.echo", "a=2", "--args", '{"a":1}'],
    ["call", "demo.echo", "--args", "{}", "--args", "{}"],
    ["call", "demo.echo", "--args"],
    ["call", "demo.echo", "--timeout"],
    ["call", "demo.echo", "--json=yes"],
    ["propose"],
    ["propose", "--json"],
    ["propose", "time"],
    ["propose", "time", "--pip", "pkg>=1"],
    ["propose", "time", "--pip", "pkg==*"],
    ["propose", "time", "--npm", "pkg@^1.0.0"],
    ["propose", "time", "--npm", "pkg@latest"],
    ["propose", "time", "--pip", "pkg==1", "--index-url", "http://x"],
    ["propose", "time", "--pip", "pkg==1", "--config", "x"],
    ["propose", "../etc", "--pip", "pkg==1"],
    ["propose", "time", "--pip", "pkg==1", "--tool", "files.*"],
    ["propose", "time", "--pip", "pkg==1", "--why"],
    ["propose", "--status", "time"],
]


@pytest.mark.parametrize("argv", USAGE_ERRORS, ids=lambda a: " ".join(a) or "(empty)")
def test_usage_errors_exit_64_with_one_line(argv: list[str]) -> None:
    r = run(argv)
    assert r.code == 64
    r.one_error_line()
    if "--json" in argv:  # asked for JSON: the error is also a JSON object on stdout
        assert json.loads(r.out)["exit"] == 64
    else:
        assert r.out == ""


@pytest.mark.parametrize(
    "value",
    [
        "0",
        "-1",
        "-0.5",
        "0.0",
        "nan",
        "NaN",
        "inf",
        "-inf",
        "Infinity",
        "1e400",
        "text",
        "",
        "3600.001",
        "3601",
        "1e9",
        "5s",
        "0x10",
    ],
)
def test_bad_timeout(value: str) -> None:
    for argv in (["call", "demo.echo", "--timeout", value], ["call", "demo.echo", f"--timeout={value}"]):
        r = run(argv)
        assert r.code == 64
        assert "--timeout" in r.one_error_line()


@pytest.mark.parametrize(
    ("value", "expected"), [("3600", 3600.0), ("0.5", 0.5), ("1", 1.0), (" 2 ", 2.0), ("1e1", 10.0)]
)
def test_good_timeout(value: str, expected: float) -> None:
    assert gate.parse_argv(["call", "demo.echo", "--timeout", value], None).timeout == expected
    assert gate.parse_argv(["call", "demo.echo", f"--timeout={value}"], None).timeout == expected


@pytest.mark.parametrize(
    "value",
    [
        "[]",
        "[1]",
        "1",
        '"s"',
        "null",
        "true",
        "{",
        "{} x",
        "{}{}",
        "NaN",
        '{"a": NaN}',
        '{"a": Infinity}',
        "",
        "{'a':1}",
        "[" * 50_000,
    ],
)
def test_bad_args_json(value: str) -> None:
    for argv in (["call", "demo.echo", "--args", value], ["call", "demo.echo", "--args=" + value]):
        r = run(argv)
        assert r.code == 64
        assert "--args" in r.one_error_line()


def test_oversized_argv_is_a_usage_error() -> None:
    many = ["call", "demo.echo"] + [f"k{i}=v" for i in range(gate.MAX_ARGC - 1)]
    r = run(many)
    assert r.code == 64 and "too many arguments" in r.one_error_line()
    long = ["call", "demo.echo", "k=" + "x" * gate.MAX_ARGV_BYTES]
    r = run(long)
    assert r.code == 64 and f"exceed {gate.MAX_ARGV_BYTES} bytes" in r.one_error_line()


def test_argv_caps_are_inclusive() -> None:
    argv = ["call", "demo.echo"] + [f"k{i}=v" for i in range(gate.MAX_ARGC - 2)]
    assert len(gate.parse_argv(argv, None).kv) == gate.MAX_ARGC - 2
    with pytest.raises(UsageError):
        gate.parse_argv([*argv, "x=y"], None)
    fixed = len("call") + len("demo.echo") + len("k=")
    argv = ["call", "demo.echo", "k=" + "x" * (gate.MAX_ARGV_BYTES - fixed)]
    assert gate.parse_argv(argv, None).kv[0][1] == "x" * (gate.MAX_ARGV_BYTES - fixed)
    with pytest.raises(UsageError):
        gate.parse_argv([*argv[:2], argv[2] + "x"], None)


# --- parse_argv details ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "pair"),
    [
        ("k=v", ["k", "v"]),
        ("k:v", ["k", "v"]),
        ("url=http://x:1", ["url", "http://x:1"]),
        ("url:http://x:1/a=b", ["url", "http://x:1/a=b"]),
        ("a:b=c", ["a", "b=c"]),
        ("a=b:c", ["a", "b:c"]),
        ("k=", ["k", ""]),
        ("k:", ["k", ""]),
        ("k==", ["k", "="]),
        ("k=v=w", ["k", "v=w"]),
        ("path=@/etc/shadow", ["path", "@/etc/shadow"]),  # '@' is literal to the gate
        ("@k=v", ["@k", "v"]),
        ("text=-x", ["text", "-x"]),
        ("text=--json", ["text", "--json"]),
        ("a b=c d", ["a b", "c d"]),
        ("k=line\nbreak", ["k", "line\nbreak"]),
        ("é=ü", ["é", "ü"]),
    ],
)
def test_kv_split_at_first_equals_or_colon(item: str, pair: list[str]) -> None:
    req = gate.parse_argv(["call", "demo.echo", item], None)
    assert req.kv == [pair]
    assert req.tool == "demo.echo"
    assert req.args is None and req.timeout is None and req.json is False


def test_call_request_fields() -> None:
    req = gate.parse_argv(
        ["call", "--json", "demo.echo", "a=1", "--timeout", "2.5", "b:x", "--args", '{"c": [1]}'], None
    )
    assert (req.verb, req.tool, req.json, req.timeout) == ("call", "demo.echo", True, 2.5)
    assert req.kv == [["a", "1"], ["b", "x"]]
    assert req.args == {"c": [1]}


def test_double_dash_makes_the_rest_arguments() -> None:
    req = gate.parse_argv(["call", "demo.echo", "--", "--config=x", "-c:y", "--json=1"], None)
    assert req.kv == [["--config", "x"], ["-c", "y"], ["--json", "1"]]
    assert req.json is False


@pytest.mark.parametrize("verb", ["list", "status"])
def test_plain_verbs_take_json_only(verb: str) -> None:
    assert gate.parse_argv([verb], None).json is False
    assert gate.parse_argv([verb, "--json"], None).json is True
    assert gate.parse_argv(["describe", "demo.echo", "--json"], None).json is True


def test_args_from_stdin_reads_bytes_through_buffer() -> None:
    # the text layer is latin-1: only reading .buffer as UTF-8 gets 'é' right
    stdin = bytes_stdin('{"a": "é", "n": [1, 2]}'.encode(), encoding="latin-1")
    req = gate.parse_argv(["call", "demo.echo", "--args", "-"], stdin)
    assert req.args == {"a": "é", "n": [1, 2]}


def test_args_from_stdin_plain_text_stream() -> None:
    req = gate.parse_argv(["call", "demo.echo", "--args=-"], io.StringIO('{"a": 1}'))
    assert req.args == {"a": 1}


def test_args_from_stdin_duplicates_kv() -> None:
    with pytest.raises(UsageError, match="given twice"):
        gate.parse_argv(["call", "demo.echo", "a=1", "--args", "-"], bytes_stdin(b'{"a": 2}'))


@pytest.mark.parametrize(
    "data",
    [b"", b"\xff{}", b'{"a": "\xc3"}', b"[]", b"{} {}", b'{"a": NaN}', b"\xef\xbb\xbf{}"],
)
def test_args_from_stdin_rejected(data: bytes) -> None:
    r = run(["call", "demo.echo", "--args", "-"], stdin=bytes_stdin(data))
    assert r.code == 64
    assert "--args" in r.one_error_line()


def test_args_from_stdin_size_cap() -> None:
    cap = gate.MAX_STDIN_BYTES
    ok = b'{"a": "' + b"x" * (cap - 9) + b'"}'
    assert len(ok) == cap
    req = gate.parse_argv(["call", "demo.echo", "--args", "-"], bytes_stdin(ok))
    assert req.args is not None and len(req.args["a"]) == cap - 9
    big = b'{"a": "' + b"x" * cap + b'"}'
    r = run(["call", "demo.echo", "--args", "-"], stdin=bytes_stdin(big))
    assert r.code == 64 and "exceeds" in r.one_error_line()


def test_args_from_stdin_without_stdin() -> None:
    with pytest.raises(UsageError, match="no standard input"):
        gate.parse_argv(["call", "demo.echo", "--args", "-"], None)


# --- failures past parsing, without a daemon or an allowlist ------------------------------


@pytest.mark.parametrize(
    "argv",
    [["list"], ["describe", "demo.echo"], ["call", "demo.echo"], ["call", "demo.echo", "a=1", "--timeout", "5"]],
)
def test_missing_allowlist_is_a_config_error(argv: list[str]) -> None:
    r = run(argv)
    assert r.code == 78
    line = r.one_error_line()
    assert "denying every call" in line
    assert r.out == ""


@pytest.mark.parametrize(
    "argv", [["list", "--json"], ["describe", "demo.echo", "--json"], ["call", "demo.echo", "--json"]]
)
def test_missing_allowlist_with_json(argv: list[str]) -> None:
    r = run(argv)
    assert r.code == 78
    line = r.one_error_line()
    obj = wire.loads(r.out)
    assert obj["exit"] == 78
    assert obj["error"] == line[len("mcp: ") :]
    assert r.out.count("\n") == 1


def test_status_without_daemon_is_unavailable() -> None:
    r = run(["status"])
    assert r.code == 69
    assert "broker unavailable" in r.one_error_line()
    r = run(["status", "--json"])
    assert r.code == 69
    assert wire.loads(r.out)["exit"] == 69


def test_invalid_caller_name_is_a_config_error() -> None:
    r = run(["list"], environ={"SUDO_USER": "../../etc/x"})
    assert r.code == 78
    assert "cannot name an allowlist" in r.one_error_line()


def test_caller_name() -> None:
    """SUDO_USER names the caller (it picks the allowlist); SUDO_UID means nothing any more."""
    assert not hasattr(gate, "caller_identity")
    me = pwd.getpwuid(os.getuid()).pw_name
    assert gate.caller_name({"SUDO_USER": "alice"}) == "alice"
    for uid in ("1001", "0", "-1", "x", ""):
        assert gate.caller_name({"SUDO_USER": "alice", "SUDO_UID": uid}) == "alice"
        assert gate.caller_name({"SUDO_UID": uid}) == me
    assert gate.caller_name({}) == me
    assert gate.caller_name({"SUDO_USER": ""}) == me


def test_a_real_uid_without_a_name_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    unnamed = next(u for u in range(2**31 - 100, 2**31 - 1) if not _has_name(u))
    monkeypatch.setattr(gate.os, "getuid", lambda: unnamed)
    with pytest.raises(ConfigError, match=f"uid {unnamed} has no user name"):
        gate.caller_name({})
    r = run(["list"], environ={})
    assert r.code == 78 and f"uid {unnamed} has no user name" in r.one_error_line()


def _has_name(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


@pytest.mark.parametrize("extra", [["--json"], ["x"], ["--config", "/tmp/x"]])
def test_stdio_takes_no_arguments(extra: list[str]) -> None:
    r = run(["stdio", *extra])
    assert r.code == 64
    r.one_error_line()


# --- fuzz --------------------------------------------------------------------------------

TOKENS = st.one_of(
    st.sampled_from(
        [
            "list",
            "describe",
            "call",
            "status",
            "stdio",
            "help",
            "--help",
            "-h",
            "--version",
            "--json",
            "--args",
            "--timeout",
            "--",
            "-",
            "propose",
            "--pip",
            "--why",
            "--status",
            "pkg==1.0",
            "demo.echo",
            "files.*",
            "a.b",
            "k=v",
            "a:b",
            "=x",
            ":",
            "{}",
            '{"a":1}',
            "[]",
            "5",
            "0",
            "nan",
            "inf",
            "--config",
            "-c",
            "--args=-",
            "--args={}",
            "--timeout=1",
            "--json=1",
            "k=\udcff",
            "\udcff",
            "\x00",
            "a\nb",
            "\u2028",
        ]
    ),
    st.text(max_size=12),
    st.text(max_size=10).map(lambda s: "-" + s),
    st.text(max_size=10).map(lambda s: "--" + s),
)
USERS = st.sampled_from(["alice", "bob", "", "../x", "a b", "root"])


@settings(max_examples=300, deadline=None)
@given(st.lists(TOKENS, max_size=7), st.binary(max_size=24), USERS)
def test_fuzz_argv_never_escapes_the_contract(argv: list[str], stdin: bytes, user: str) -> None:
    r = run(argv, stdin=bytes_stdin(stdin), environ={"SUDO_USER": user})
    assert r.code in CONTRACT_EXIT_CODES, (argv, r.code, r.err)
    assert "Traceback" not in r.err and "Traceback" not in r.out
    if r.code == 0:
        # stdio with an empty stdin is a session that ends at once, cleanly
        assert argv in (["help"], ["--help"], ["-h"], ["--version"], ["stdio"])
        assert r.err == ""
    else:
        r.one_error_line()
        assert r.code in (64, 69, 78), (argv, r.code, r.err)  # nothing else is reachable without a daemon


# --- with a root-owned allowlist --------------------------------------------------------------


@pytest.fixture
def root(tmp_root: str) -> str:
    paths = Paths(tmp_root)
    write(paths.allowlist, "# tools for everyone\ndemo.echo\ndemo.add  # trailing\n#demo.secret\n")
    os.chmod(paths.etc, 0o755)
    return tmp_root


@needs_root
def test_listed_tool_passes_the_gate_and_then_finds_no_daemon(root: str) -> None:
    for argv in (["call", "demo.echo", "text=hi"], ["describe", "demo.add"], ["list"]):
        r = run(argv, root=root)
        assert r.code == 69, (argv, r.err)
        assert "broker unavailable" in r.one_error_line()


@needs_root
@pytest.mark.parametrize("tool", ["demo.secret", "demo.ech", "demo.echo.x", "Demo.echo", "other.tool", "demo.adda"])
def test_unlisted_tool_is_denied_before_the_daemon(root: str, tool: str) -> None:
    r = run(["call", tool], root=root)
    assert r.code == 77
    assert r.one_error_line() == f"mcp: denied: {tool} is not in the allowlist for alice"
    r = run(["describe", tool, "--json"], root=root)
    assert r.code == 77
    assert wire.loads(r.out) == {"error": f"denied: {tool} is not in the allowlist for alice", "exit": 77}


@needs_root
def test_user_file_replaces_global_for_that_caller(root: str) -> None:
    paths = Paths(root)
    os.makedirs(paths.allowlist_d)
    os.chmod(paths.allowlist_d, 0o755)
    write(paths.user_allowlist("bob"), "bob.only\n")
    assert run(["call", "demo.echo"], root=root, environ={"SUDO_USER": "bob"}).code == 77
    assert run(["call", "bob.only"], root=root, environ={"SUDO_USER": "bob"}).code == 69
    assert run(["call", "bob.only"], root=root).code == 77  # alice still uses the global file
    # SUDO_UID names nobody: not bob's uid, not root's
    assert run(["call", "bob.only"], root=root, environ={"SUDO_USER": "alice", "SUDO_UID": "0"}).code == 77
    assert run(["call", "demo.echo"], root=root, environ={"SUDO_USER": "bob", "SUDO_UID": "1000"}).code == 77


@needs_root
def test_invalid_allowlist_denies_every_call(root: str) -> None:
    paths = Paths(root)
    write(paths.allowlist, "demo.echo\nfiles.*\n")
    for argv in (["call", "demo.echo"], ["list"], ["describe", "demo.echo"]):
        r = run(argv, root=root)
        assert r.code == 78
        assert f"{paths.allowlist}:2:7: wildcard" in r.one_error_line()


@needs_root
def test_group_writable_allowlist_denies_every_call(root: str) -> None:
    os.chmod(Paths(root).allowlist, 0o664)
    r = run(["call", "demo.echo"], root=root)
    assert r.code == 78
    assert "writable by group or other" in r.one_error_line()


def _big_allowlist(extra: str) -> str:
    padding = "".join(f"# padding line {i} mentioning demo.secret and demo.echo_all\n" for i in range(2000))
    text = padding + "demo.echo\n" + extra
    assert len(text) >= gate.CACHE_THRESHOLD
    return text


@needs_root
def test_large_allowlist_uses_the_line_scan_and_agrees(root: str) -> None:
    paths = Paths(root)
    write(paths.allowlist, _big_allowlist("other.tool  # c\n"))
    assert run(["call", "demo.echo"], root=root).code == 69
    assert run(["call", "other.tool"], root=root).code == 69
    for tool in ("demo.secret", "demo.echo_all", "demo.ech", "other.too"):
        assert run(["call", tool], root=root).code == 77, tool


def _marker(directory: str, text: str) -> str:
    import hashlib

    return f"{directory}/valid-{hashlib.sha256(text.encode()).hexdigest()}"


@needs_root
def test_large_allowlist_validation_is_cached_only_when_valid(root: str) -> None:
    paths = Paths(root)
    mine = paths.gate_cache_of("alice")
    assert mine == f"{paths.gate_cache}/alice"
    os.makedirs(mine)
    good = _big_allowlist("")
    write(paths.allowlist, good)
    assert run(["call", "demo.echo"], root=root).code == 69
    assert os.path.exists(_marker(mine, good))
    assert os.listdir(paths.gate_cache) == ["alice"]  # nothing in the shared directory
    bad = _big_allowlist("files.*\n")
    write(paths.allowlist, bad)
    r = run(["call", "demo.echo"], root=root)
    assert r.code == 78 and "wildcard" in r.one_error_line()
    assert not os.path.exists(_marker(mine, bad))
    assert run(["call", "demo.echo"], root=root).code == 78  # still invalid on the next call


@needs_root
def test_large_allowlist_markers_are_per_agent(root: str) -> None:
    """One agent's gate user can write only its own cache: its markers never vouch for another agent's calls."""
    paths = Paths(root)
    for agent in ("alice", "bob"):
        os.makedirs(paths.gate_cache_of(agent))
    bad = _big_allowlist("files.*\n")
    write(paths.allowlist, bad)
    # a marker for the invalid content, planted in bob's directory and in the first version's shared one
    for planted in (_marker(paths.gate_cache_of("bob"), bad), _marker(paths.gate_cache, bad)):
        write(planted, b"", 0o600)
    r = run(["call", "demo.echo"], root=root)  # alice
    assert r.code == 78 and "wildcard" in r.one_error_line()
    assert not os.path.exists(_marker(paths.gate_cache_of("alice"), bad))
    assert run(["call", "demo.echo"], root=root, environ={"SUDO_USER": "bob"}).code == 69  # bob's own marker
    good = _big_allowlist("")
    write(paths.allowlist, good)
    assert run(["call", "demo.echo"], root=root, environ={"SUDO_USER": "bob"}).code == 69
    assert os.path.exists(_marker(paths.gate_cache_of("bob"), good))
    assert not os.path.exists(_marker(paths.gate_cache_of("alice"), good))


@needs_root
def test_large_allowlist_without_a_cache_directory_is_validated_every_time(root: str) -> None:
    paths = Paths(root)
    good = _big_allowlist("")
    write(paths.allowlist, good)
    assert run(["call", "demo.echo"], root=root).code == 69
    assert not os.path.exists(paths.gate_cache_of("alice"))
    write(paths.allowlist, _big_allowlist("files.*\n"))
    assert run(["call", "demo.echo"], root=root).code == 78


# --- with a fake daemon on gate.sock ----------------------------------------------------------


StartDaemon = Callable[[dict], FakeDaemon]


@pytest.fixture
def daemon(root: str) -> Iterator[StartDaemon]:
    made: list[FakeDaemon] = []

    def start(answer: dict) -> FakeDaemon:
        d = FakeDaemon(Paths(root).gate_sock, answer)
        made.append(d)
        return d

    yield start
    for d in made:
        d.close()


@needs_root
def test_call_is_forwarded_with_exact_fields(root: str, daemon: StartDaemon) -> None:
    d = daemon({"ok": True, "result": {"text": "hello", "isError": False}})
    r = run(["call", "demo.echo", "url=http://x:1", "n:5", "--args", '{"o": {"p": 1}}', "--timeout", "2.5"], root=root)
    assert (r.code, r.out, r.err) == (0, "hello\n", "")
    assert d.requests == [
        {
            "v": wire.PROTOCOL_VERSION,
            "op": "call",
            "tool": "demo.echo",
            "kv": [["url", "http://x:1"], ["n", "5"]],
            "args": {"o": {"p": 1}},
            "timeout": 2.5,
        }
    ]
    assert d.peer_uids == [os.getuid()]  # who calls is the socket's word, not the request's


@needs_root
@pytest.mark.parametrize(
    ("argv", "sent"),
    [
        (["list", "--json"], {"op": "list"}),
        (["status"], {"op": "status"}),
        (["describe", "demo.add"], {"op": "describe", "tool": "demo.add"}),
        (["call", "demo.echo"], {"op": "call", "tool": "demo.echo", "kv": [], "args": None, "timeout": None}),
    ],
)
@pytest.mark.parametrize("environ", [ENV, {"SUDO_USER": "alice", "SUDO_UID": "0"}, {}], ids=["sudo", "uid 0", "none"])
def test_no_request_names_a_caller(
    root: str, daemon: StartDaemon, argv: list[str], sent: dict, environ: dict[str, str]
) -> None:
    d = daemon({"ok": True, "result": {}})
    assert run(argv, root=root, environ=environ).code == 0
    assert d.requests == [{"v": wire.PROTOCOL_VERSION, **sent}]


@needs_root
def test_tool_error_exits_1(root: str, daemon: StartDaemon) -> None:
    daemon({"ok": True, "result": {"text": "it broke", "isError": True}})
    r = run(["call", "demo.echo"], root=root)
    assert (r.code, r.out) == (1, "it broke\n")


@needs_root
def test_call_json_prints_the_mcp_result_in_wire_form(root: str, daemon: StartDaemon) -> None:
    image = {"type": "image", "data": "QUJD", "mimeType": "image/png", "_meta": {"a/b": 1}}
    result = {"content": [image], "isError": False, "text": "[image image/png, 4 bytes base64]"}
    daemon({"ok": True, "result": {**result, "structuredContent": {"n": 1}, "_meta": {"example.org/trace": "t"}}})
    r = run(["call", "demo.echo", "--json"], root=root)
    assert r.code == 0, r
    # exactly a CallToolResult: the joined text is the daemon's help for plain output, not part of it
    assert wire.loads(r.out) == {
        "content": [image],
        "isError": False,
        "structuredContent": {"n": 1},
        "_meta": {"example.org/trace": "t"},
    }


@needs_root
def test_call_json_of_a_result_without_blocks_gets_its_text_as_one(root: str, daemon: StartDaemon) -> None:
    daemon({"ok": True, "result": {"content": [], "isError": True, "text": '{"n": 1}', "structuredContent": {"n": 1}}})
    r = run(["call", "demo.echo", "--json"], root=root)
    assert r.code == 1
    assert wire.loads(r.out) == {
        "content": [{"type": "text", "text": '{"n": 1}'}],
        "isError": True,
        "structuredContent": {"n": 1},
    }


@needs_root
def test_daemon_refusal_is_one_line_and_json(root: str, daemon: StartDaemon) -> None:
    daemon({"ok": False, "exit": 75, "error": "rate limited:\nwait\ta bit"})
    r = run(["call", "demo.echo", "--json"], root=root)
    assert r.code == 75
    assert r.one_error_line() == "mcp: rate limited: wait a bit"
    assert wire.loads(r.out) == {"error": "rate limited: wait a bit", "exit": 75}


@needs_root
def test_list_is_forwarded_and_printed(root: str, daemon: StartDaemon) -> None:
    d = daemon({"ok": True, "result": {"tools": [{"name": "demo.echo", "description": "Echo"}, {"name": "demo.add"}]}})
    r = run(["list"], root=root)
    assert (r.code, r.out) == (0, "demo.echo  Echo\ndemo.add\n")
    assert d.requests == [{"v": wire.PROTOCOL_VERSION, "op": "list"}]


@needs_root
def test_denial_is_reported_to_the_daemon_for_audit(root: str, daemon: StartDaemon) -> None:
    d = daemon({"ok": True, "result": None})
    assert run(["call", "demo.secret"], root=root).code == 77
    assert len(d.requests) == 1
    rep = d.requests[0]
    assert rep == {
        "v": wire.PROTOCOL_VERSION,
        "op": "report",
        "verb": "call",
        "tool": "demo.secret",
        "exit": 77,
        "reason": "denied: demo.secret is not in the allowlist for alice",
    }
    assert d.peer_uids == [os.getuid()]


@needs_root
def test_a_usage_error_is_reported_without_a_caller(root: str, daemon: StartDaemon) -> None:
    d = daemon({"ok": True, "result": None})
    assert run(["call", "demo.echo", "--bogus"], root=root).code == 64
    assert d.requests == [
        {
            "v": wire.PROTOCOL_VERSION,
            "op": "report",
            "verb": "call",
            "tool": "",
            "exit": 64,
            "reason": "unknown option '--bogus' for 'call' (try 'mcp help')",
        }
    ]


@needs_root
@pytest.mark.parametrize("how", ["argv", "stdin"])
def test_input_within_the_caps_never_becomes_broker_unavailable(root: str, daemon: StartDaemon, how: str) -> None:
    daemon({"ok": True, "result": {"text": "ok"}})
    if how == "argv":  # 200k astral characters: ~800 KB of argv, a ~2.4 MB frame
        r = run(["call", "demo.echo", "text=" + "\U0001f600" * 200_000], root=root)
    else:  # ~1 MB of stdin (under MAX_STDIN_BYTES), a ~3 MB frame
        data = ('{"a": "' + "\u00e9" * 500_000 + '"}').encode()
        assert len(data) <= gate.MAX_STDIN_BYTES
        r = run(["call", "demo.echo", "--args", "-"], stdin=bytes_stdin(data), root=root)
    assert r.code != 69, r.err  # over a cap: 64; within: forwarded (here: answered ok)
    if r.code != 0:
        r.one_error_line()
        assert r.code == 64, r.err


# --- once a bug: --json is honoured for usage errors too --------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["list", "--json", "--bogus"],
        ["call", "demo.echo", "--json", "--timeout", "0"],
        ["call", "demo.echo", "--json", "k"],
        ["status", "--json", "extra"],
    ],
)
def test_usage_error_with_json_is_also_json_on_stdout(argv: list[str]) -> None:
    r = run(argv)
    assert r.code == 64
    r.one_error_line()
    assert wire.loads(r.out)["exit"] == 64


# --- the entry point run(): a call's arguments come in the frame on stdin -----------------------------

#: runs ``broker.gate.verbs.run`` as ``mcp-gate`` does, with the frame wait cut to WAIT seconds
ENTRY = """
import sys
from broker.gate import verbs
verbs.read_frame.__defaults__ = (float(sys.argv[2]),)
root = sys.argv[1]
sys.argv = ["mcp-gate", *sys.argv[3:]]
verbs.run(root=root)
"""
WAIT = 0.3


def entry(
    argv: list[str],
    stdin: bytes | None = b"",
    root: str = ABSENT_ROOT,
    env: dict[str, str] | None = None,
    wait: float = WAIT,
) -> subprocess.CompletedProcess[bytes]:
    """The gate's entry point in a fresh interpreter; ``stdin=None``: a pipe that stays open and silent."""
    environ = {"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin", **(ENV if env is None else env)}
    command = [sys.executable, "-c", ENTRY, root, str(wait), *argv]
    if stdin is not None:
        return subprocess.run(command, input=stdin, capture_output=True, env=environ, timeout=30, check=False)
    r, w = os.pipe()
    try:
        return subprocess.run(command, stdin=r, capture_output=True, env=environ, timeout=30, check=False)
    finally:
        os.close(r)
        os.close(w)


def one_line(done: subprocess.CompletedProcess[bytes]) -> str:
    err = done.stderr.decode()
    assert "Traceback" not in err and err.endswith("\n") and len(err.splitlines()) == 1, err
    assert err.startswith("mcp: "), err
    return err[:-1]


@pytest.mark.parametrize(
    "argv",
    [
        ["call", "demo.echo", "text=hi"],
        ["call", "demo.echo", "--json"],
        ["call", "demo.echo", "--args", "-"],
        ["call", "text=secret", "demo.echo"],
        ["propose", "time", "--pip", "a==1", "--why", "secret plans"],
        ["propose", "--status"],
    ],
)
def test_run_refuses_a_call_s_arguments_on_its_command_line(argv: list[str]) -> None:
    done = entry(argv, frame([], None))
    assert done.returncode == 64
    assert "arguments on standard input only" in one_line(done)
    assert done.stdout == b""


@pytest.mark.parametrize(
    ("stdin", "words"),
    [
        (b"", "cut short"),
        (b"text=hi there\n", "no argument frame"),
        (b"mcp-args 2 0 0\n", "another version"),
        (b"mcp-args 1 1 0\n5 ab", "cut short"),
        (b"mcp-args 1 x 0\n", "malformed"),
        (None, "no argument frame"),
    ],
    ids=["empty", "not a frame", "version 2", "short item", "bad count", "silent open pipe"],
)
def test_run_refuses_a_call_without_a_good_frame(stdin: bytes | None, words: str) -> None:
    done = entry(["call", "demo.echo"], stdin)
    assert done.returncode == 64
    assert words in one_line(done)
    assert done.stdout == b""


def test_run_waits_for_a_silent_frame_only_as_long_as_it_may() -> None:
    import time

    start = time.monotonic()
    done = entry(["call", "demo.echo"], None, wait=0.5)
    took = time.monotonic() - start
    assert done.returncode == 64 and "no argument frame" in one_line(done)
    assert 0.5 <= took < 10


def test_run_reads_no_frame_for_other_verbs() -> None:
    done = entry(["status"], None)  # stdin open and silent: status never waits for it
    assert done.returncode == 69 and "broker unavailable" in one_line(done)
    done = entry(["list", "extra"], None)
    assert done.returncode == 64 and "unexpected argument 'extra'" in one_line(done)


def test_run_parses_the_frame_s_items_like_command_line_arguments() -> None:
    done = entry(["call", "demo.echo"], frame(["--bogus"], None))
    assert done.returncode == 64 and "unknown option '--bogus'" in one_line(done)
    done = entry(["call"], frame(["demo.echo", "text=hi"], None))  # the tool in the frame too
    assert done.returncode == 78 and "denying every call" in one_line(done)  # no allowlist in the absent root


@needs_root
@pytest.mark.parametrize(
    ("argv", "items", "piped", "kv", "args"),
    [
        (["call", "demo.echo"], ["text=hi", "n:5"], None, [["text", "hi"], ["n", "5"]], None),
        (["call"], ["demo.echo", "text=a\nb c"], None, [["text", "a\nb c"]], None),
        (["call", "demo.echo"], ["--args", "-", "k=v"], '{"o": "p\\u00e9"}', [["k", "v"]], {"o": "p\u00e9"}),
        (["call", "demo.echo"], ["--args=-"], '{"o": 1}', [], {"o": 1}),
        (["call", "demo.echo"], ["--", "--json=1", "$f=`id`"], None, [["--json", "1"], ["$f", "`id`"]], None),
    ],
    ids=["kv", "tool in the frame", "--args - with stdin", "--args=-", "after --"],
)
def test_run_forwards_what_the_frame_holds(
    root: str,
    daemon: StartDaemon,
    argv: list[str],
    items: list[str],
    piped: str | None,
    kv: list[list[str]],
    args: dict | None,
) -> None:
    d = daemon({"ok": True, "result": {"text": "done", "isError": False}})
    done = entry(argv, frame(items, piped), root=root, env={"SUDO_USER": "alice", "SUDO_UID": "0", "HOME": "/x"})
    assert (done.returncode, done.stdout, done.stderr) == (0, b"done\n", b"")
    assert d.requests == [
        {"v": wire.PROTOCOL_VERSION, "op": "call", "tool": "demo.echo", "kv": kv, "args": args, "timeout": None}
    ]


@needs_root
def test_run_with_args_dash_and_nothing_piped_is_a_usage_error(root: str, daemon: StartDaemon) -> None:
    d = daemon({"ok": True, "result": {}})
    done = entry(["call", "demo.echo"], frame(["--args", "-"], None), root=root)
    assert done.returncode == 64 and "--args" in one_line(done)
    assert d.ops("call") == []


def test_run_refuses_an_argument_that_is_not_utf8() -> None:
    done = entry(["call", "demo.echo"], b"mcp-args 1 1 0\n6 text=\xff")
    assert done.returncode == 64 and "not valid UTF-8" in one_line(done)


# Fixed: the --args - text in the frame used to be decoded with surrogateescape and handed on as text, so
# stdin that is not UTF-8 is no longer refused (64, as main() with a byte stream does: see
# test_args_from_stdin_rejected): a lone surrogate gets into the arguments and reaches the daemon, which then
# sees U+FFFD in place of the agent's bytes (the frame encoder replaces it), silently changing the value.
@needs_root
@pytest.mark.parametrize("data", [b'{"a": "\xc3"}', b'{"a": "\xff\xfe"}'], ids=["cut sequence", "invalid bytes"])
def test_run_refuses_args_stdin_that_is_not_utf8(root: str, daemon: StartDaemon, data: bytes) -> None:
    d = daemon({"ok": True, "result": {"text": "done"}})
    payload = b"mcp-args 1 2 %d\n6 --args\n1 -\n" % len(data) + data
    done = entry(["call", "demo.echo"], payload, root=root)
    assert d.ops("call") == [], d.ops("call")
    assert done.returncode == 64 and "--args" in one_line(done)


# Fixed: a call whose stdin is closed ('mcp-gate call T <&-') is refused with 64; the one line used to read
# "cannot write the answer: Bad file descriptor": read_frame's OSError is taken for a broken stdout.
def test_run_with_a_closed_stdin_says_so() -> None:
    environ = {"PYTHONPATH": REPO, "PATH": "/usr/bin:/bin", **ENV}
    done = subprocess.run(
        ["/bin/sh", "-c", 'exec "$0" -c "$1" "$2" "$3" call demo.echo <&-', sys.executable, ENTRY, ABSENT_ROOT, "0.3"],
        capture_output=True,
        env=environ,
        timeout=30,
        check=False,
    )
    assert done.returncode == 64
    line = one_line(done)
    assert "standard input" in line and "cannot write the answer" not in line


# --- progress on a terminal -----------------------------------------------------------------------


def test_the_progress_line_updates_in_place_and_lets_no_control_character_through() -> None:
    from broker.gate.verbs import ProgressLine

    err = io.StringIO()
    line = ProgressLine(err)
    line({"progress": 1, "total": 4, "message": "step \x1b[2Jone\x07"})
    line({"progress": 2.5})
    line({"progress": "x"})  # not a number: nothing
    line.clear()
    out = err.getvalue()
    assert out == "\rmcp: progress 1/4: step  [2Jone \x1b[K\rmcp: progress 2.5\x1b[K\r\x1b[K"
    assert "\x1b[2J" not in out and "\x07" not in out
    quiet = io.StringIO()
    ProgressLine(quiet).clear()
    assert quiet.getvalue() == ""  # nothing shown, nothing to clear
