"""Property tests of ``mcp-gate`` in-process: random argv, stdin and callers against a fake daemon.

The install root is a temporary tree with a valid, root-owned allowlist (two
global entries, and a per-user file for ``bob``) and a fake ``gate.sock``
served by a thread that records every frame it receives, decodable or not,
and answers like the daemon would (or refuses, with a contract code). For
every input:

- the exit code is one of ``broker.errors.CONTRACT_EXIT_CODES``;
- nothing on stderr or stdout is a traceback, and a failure is exactly one
  ``mcp: `` line on stderr;
- no ``call`` or ``describe`` request ever reaches the daemon for a tool that
  is not in the caller's allowlist (whole-string match, nothing fuzzy);
- no request names a caller or a uid (protocol v2: the daemon knows the
  caller by the peer's uid), whatever ``SUDO_UID`` says: only ``SUDO_USER``
  picks the allowlist.

A second property feeds the gate random daemon answers.
"""

from __future__ import annotations

import functools
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from broker.core import wire
from broker.core.errors import CONTRACT_EXIT_CODES, EX_SOFTWARE
from broker.core.paths import Paths
from broker.gate import verbs as gate
from tests.fakes import FakeDaemon, by_op
from tests.unit.conftest import needs_root

GLOBAL_ALLOWLIST = "# fuzz allowlist\ndemo.echo\ndemo.add   # trailing comment\n#demo.secret\n  web.echo\n"
GLOBAL = frozenset({"demo.echo", "demo.add", "web.echo"})
BOB = frozenset({"bob.only"})
CALLERS = {"alice": GLOBAL, "bob": BOB, "root": GLOBAL}


@pytest.fixture(scope="module")
def root() -> Iterator[str]:
    if os.geteuid() != 0:
        pytest.skip("needs root: the allowlist loader only accepts root-owned files")
    base = tempfile.mkdtemp(prefix="mcp-privsep-fuzz-gate-")
    os.chmod(base, 0o755)
    paths = Paths(base)
    for d in (paths.etc, paths.allowlist_d, paths.run, paths.gate_cache):
        os.makedirs(d, mode=0o755, exist_ok=True)
        os.chmod(d, 0o755)
    for path, text in ((paths.allowlist, GLOBAL_ALLOWLIST), (paths.user_allowlist("bob"), "bob.only\n")):
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(path, 0o644)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def fake(root: str) -> Iterator[FakeDaemon]:
    d = FakeDaemon(Paths(root).gate_sock, validate=False)  # record what the gate sent, well-formed or not
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gate, "DEFAULT_WAIT", 20.0)  # a fake that never answers fails the example, not the run
        try:
            yield d
        finally:
            d.close()


# --- inputs ------------------------------------------------------------------------------------

NEAR_MISSES = [
    "demo.echo",
    "demo.add",
    "web.echo",
    "bob.only",
    "demo.secret",
    "demo.ech",
    "demo.echoo",
    "Demo.echo",
    "DEMO.ECHO",
    "demo.echo.x",
    "demo.echo ",
    " demo.echo",
    "demo.echo\x00",
    "demo.echo\n",
    "demo.e\u0441ho",  # Cyrillic es
    "demo.echo\u200b",
    "\uff44emo.echo",  # fullwidth d
    "demo..echo",
    "demo.*",
    "demo.ech?",
    "#demo.secret",
    "demo.echo#",
    "demo.echo=1",
    "demo.echo:1",
    "-demo.echo",
    "demo.add   # trailing comment",
    "demo",
    ".echo",
    "demo.",
]
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
            "k=v",
            "text=hi",
            "a:1",
            "=x",
            ":",
            "{}",
            '{"text": "x"}',
            "[]",
            "5",
            "0",
            "-1",
            "1e309",
            "nan",
            "inf",
            "--config",
            "--root",
            "--args=-",
            "--args={}",
            "--timeout=1",
            "--timeout=0.001",
            "--json=1",
            "text=@/etc/shadow",
            "@file",
            "k=\udcff",
            "\udcff",
            "\x00",
            "a\nb",
        ]
    ),
    st.sampled_from(NEAR_MISSES),
    st.text(max_size=12),
    st.text(max_size=10).map(lambda s: "-" + s),
    st.text(max_size=10).map(lambda s: "--" + s),
    st.tuples(st.text(max_size=6), st.text(max_size=10)).map(lambda t: f"{t[0]}={t[1]}"),
)
#: syntactically valid server.tool names, most of them not allowlisted: the gate must stop these itself
TOOL_NAMES = st.one_of(
    st.sampled_from(NEAR_MISSES),
    st.from_regex(r"[A-Za-z0-9_-]{1,8}\.[A-Za-z0-9_.-]{1,12}", fullmatch=True),
    st.tuples(
        st.sampled_from(sorted(GLOBAL | BOB)), st.integers(0, 12), st.text("aZ._-09", min_size=0, max_size=2)
    ).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] :]  # an allowed name with a character or two slipped in
    ),
    st.sampled_from(sorted(GLOBAL | BOB)).map(str.swapcase),
)
PAIRS = st.tuples(st.sampled_from(["text", "a", "b"]), st.sampled_from(["=", ":"]), st.text(max_size=8)).map("".join)
FLAGS = st.sampled_from([[], [], ["--json"], ["--timeout", "2"], ["--timeout", "0"], ["--args", "{}"], ["--args", "-"]])
ARGVS = st.one_of(
    st.tuples(TOOL_NAMES, st.lists(PAIRS, max_size=2, unique_by=lambda p: p[:1]), FLAGS).map(
        lambda t: ["call", t[0], *t[1], *t[2]]
    ),
    st.tuples(TOOL_NAMES, st.sampled_from([[], ["--json"], ["--bogus"]])).map(lambda t: ["describe", t[0], *t[1]]),
    st.tuples(st.sampled_from(["list", "status", "help", "--version", "stdio"]), st.lists(TOKENS, max_size=2)).map(
        lambda t: [t[0], *t[1]]
    ),
    st.lists(TOKENS, max_size=7),
)
STDINS = st.one_of(
    st.binary(max_size=64),
    st.sampled_from(
        [b'{"text": "hi"}', b"[]", b"{", b'{"a": NaN}', b"\xff\xfe", b'{"a": ' * 50_000, b"[" * 100_000, b"null"]
    ),
)
USERS = st.sampled_from([*CALLERS, "", "../bob", "bob/../alice", "a b", "-x", "carol"])
UIDS = st.sampled_from(["1000", "0", "", "abc", "-1", "99999999999999999999999", "1000\n"])
REFUSALS = st.none() | st.sampled_from(sorted(CONTRACT_EXIT_CODES - {0, 1}))


def allowed_for(user: str) -> frozenset[str]:
    """What the caller may reach; a name that cannot name an allowlist may reach nothing."""
    if user in CALLERS:
        return CALLERS[user]
    if user == "carol":
        return GLOBAL
    return frozenset()


def run(root: str, argv: list[str], stdin: bytes, env: dict[str, str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = gate.main(
        argv,
        root=root,
        broker_uid=os.getuid(),
        environ=env,
        stdin=io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8", errors="strict"),
        stdout=out,
        stderr=err,
    )
    return code, out.getvalue(), err.getvalue()


# --- properties --------------------------------------------------------------------------------


@needs_root
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=ARGVS, stdin=STDINS, user=USERS, uid=UIDS, refuse=REFUSALS)
@example(argv=["call", "demo.secret"], stdin=b"", user="alice", uid="1000", refuse=None)
@example(argv=["call", "demo.echo"], stdin=b"", user="bob", uid="1001", refuse=None)
@example(argv=["describe", "demo.e\u0441ho"], stdin=b"", user="alice", uid="1000", refuse=None)
@example(argv=["call", "--", "demo.echo"], stdin=b"", user="alice", uid="1000", refuse=None)
@example(argv=["call", "demo.echo", "--args", "-"], stdin=b'{"a": ' * 50_000, user="alice", uid="1", refuse=None)
@example(argv=["call", "demo.add   # trailing comment"], stdin=b"", user="alice", uid="1000", refuse=None)
def test_gate_never_escapes_the_contract(
    root: str, fake: FakeDaemon, argv: list[str], stdin: bytes, user: str, uid: str, refuse: int | None
) -> None:
    fake.reset()
    fake.answer = functools.partial(by_op, refuse=refuse)
    code, out, err = run(root, argv, stdin, {"SUDO_USER": user, "SUDO_UID": uid})
    assert code in CONTRACT_EXIT_CODES, (argv, code, err)
    assert "Traceback" not in err and "Traceback" not in out, err
    if code not in (0, 1):
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("mcp: ") and err.endswith("\n"), (argv, err)
    with fake.lock:
        requests = list(fake.requests)
    forwarded = [r for r in requests if r.get("op") in ("call", "describe")]
    event(f"exit {code}")
    event("forwarded a call/describe" if forwarded else "nothing forwarded")
    # SUDO_UID means nothing any more; without a SUDO_USER the gate names the real user (root here)
    caller = user or "root"
    for req in forwarded:
        assert req["tool"] in allowed_for(caller), (argv, user, uid, req)
    for req in requests:
        assert not {"caller", "uid"} & set(req), req
        wire.validate_request(req, wire.OPS)  # the gate only ever sends well-formed requests
    with fake.lock:
        assert set(fake.peer_uids) <= {os.getuid()}  # who calls is the socket's word
    if code == 0 and argv and argv[0] in ("call", "describe"):
        assert len(forwarded) == 1  # success for a tool means the daemon, not the gate, answered


SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-5, 300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
ITEMS = st.dictionaries(st.sampled_from(["name", "description", "state", "reason"]), SCALARS, max_size=3)
RESULTS = (
    SCALARS
    | st.lists(SCALARS | ITEMS, max_size=3)
    | st.dictionaries(
        st.sampled_from(["text", "tools", "isError", "servers", "broker", "name", "inputSchema", "allowlist"]),
        SCALARS | st.lists(SCALARS | ITEMS, max_size=3) | ITEMS,
        max_size=4,
    )
)
#: anything the gate might read back; never "pending" (the gate would then wait for a second frame)
ANSWERS = st.fixed_dictionaries({}, optional={"ok": SCALARS, "result": RESULTS, "exit": SCALARS, "error": SCALARS})


@needs_root
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    argv=st.sampled_from(
        [
            ["call", "demo.echo", "text=x"],
            ["list"],
            ["status"],
            ["describe", "demo.add"],
            ["call", "demo.echo", "--json"],
        ]
    ),
    answer=ANSWERS,
)
@example(argv=["call", "demo.echo", "text=x"], answer={"ok": False, "exit": "77", "error": "string exit"})
@example(argv=["list"], answer={"ok": True, "result": {"tools": [1, "x", None]}})
def test_any_daemon_answer_gives_a_contract_code_or_70(
    root: str, fake: FakeDaemon, argv: list[str], answer: dict[str, Any]
) -> None:
    """The daemon is trusted, but a garbled answer must still end as one line and a known code.

    ``exit`` values are drawn from the contract here (see the next test for
    any integer); 70 (EX_SOFTWARE, "a bug in mcp-privsep") is how the gate
    reports an answer it cannot use.
    """
    if isinstance(answer.get("exit"), int) and not isinstance(answer.get("exit"), bool):
        answer = {**answer, "exit": 78 if answer["exit"] not in CONTRACT_EXIT_CODES else answer["exit"]}
    answer = {k: v for k, v in answer.items() if k != "pending"}
    fake.reset()
    fake.answer = answer
    code, out, err = run(root, argv, b"", {"SUDO_USER": "alice", "SUDO_UID": "1000"})
    assert code in CONTRACT_EXIT_CODES | {EX_SOFTWARE}, (answer, code, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code not in (0, 1):
        assert len(err.splitlines()) == 1 and err.startswith("mcp: "), (answer, err)


@needs_root
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exit_code=st.integers(min_value=-(2**31), max_value=2**40))
@example(exit_code=256)
def test_daemon_exit_codes_outside_the_contract_are_not_passed_through(
    root: str, fake: FakeDaemon, exit_code: int
) -> None:
    fake.reset()
    fake.answer = {"ok": False, "exit": exit_code, "error": "refused"}
    code, _out, err = run(root, ["call", "demo.echo", "text=x"], b"", {"SUDO_USER": "alice", "SUDO_UID": "1000"})
    assert code in CONTRACT_EXIT_CODES | {EX_SOFTWARE}, (exit_code, code, err)
    assert code & 0xFF != 0  # a refusal must never look like success to the shell
