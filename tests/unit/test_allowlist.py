"""Unit and property tests for ``broker.allowlist``.

Covers the parser (comments, blank lines, CRLF, one ``server.tool`` per line,
``file:line:col: message`` errors with the right line and column), strict
UTF-8 decoding, whole-string membership (no prefixes, case folding or
Unicode normalisation), the fast ``contains_line`` scan agreeing with the
parser, and the fail-closed loader (ownership, modes, symlinks, missing
files, per-user files replacing the global one) plus ``check_all``.
"""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import allowlist, names
from broker.core.allowlist import Allowlist, contains_line, from_bytes, parse
from broker.core.errors import EX_CONFIG, ConfigError
from tests.unit.conftest import NOBODY_UID, needs_root, write

P = "/etc/mcp-privsep/allowed-actions.txt"

# --- parse: what is accepted -------------------------------------------------


def test_design_example_parses_to_the_two_entries() -> None:
    text = (
        "# MCP A\n"
        "mcp_a.read_list\n"
        "#mcp_a.write_list - don't allow\n"
        "mcp_b.foo        # trailing comments allowed after whitespace\n"
    )
    assert parse(text, P) == (["mcp_a.read_list", "mcp_b.foo"], [])


def test_comments_blank_lines_indentation_and_crlf() -> None:
    text = (
        "\r\n"
        "   \r\n"
        "\t\r\n"
        "# comment a.b\r\n"
        "   # indented comment c.d\r\n"
        "\t#tab comment\r\n"
        "  x.y\r\n"
        "\tz.w\t# after a tab\r\n"
        "p.q #\r\n"
        "last.one"  # no final newline
    )
    assert parse(text, P) == (["x.y", "z.w", "p.q", "last.one"], [])


def test_empty_and_comment_only_files_have_no_entries() -> None:
    assert parse("", P) == ([], [])
    assert parse("\n\n# only a comment\n", P) == ([], [])


def test_dots_dashes_underscores_and_max_length_tool() -> None:
    tool = "t" * names.MAX_TOOL_NAME
    text = f"srv-1_X.a.b-c_d\nsrv.{tool}\nA-_9.0\n"
    assert parse(text, P) == (["srv-1_X.a.b-c_d", f"srv.{tool}", "A-_9.0"], [])


def test_duplicates_are_kept_by_parse_and_collapsed_by_allowlist() -> None:
    actions, errors = parse("a.b\nc.d\na.b\n", P)
    assert errors == []
    assert actions == ["a.b", "c.d", "a.b"]
    al = Allowlist(P, actions)
    assert al.actions == ("a.b", "c.d")
    assert al.servers() == ["a", "c"]


# --- parse: errors with line and column --------------------------------------

BAD_LINES = [
    # (line, column, message fragment)
    ("files.*", 7, "wildcard '*'"),
    ("  files.*", 9, "wildcard '*'"),
    ("files.re?d", 9, "wildcard '?'"),
    ("fi*les.read", 3, "wildcard '*'"),
    ("files.[ab]", 7, "wildcard '['"),
    ("*.read", 1, "wildcard '*'"),
    ("a/b.c", 2, "character '/'"),
    ("a.b/c", 4, "character '/'"),
    ("a.b;rm", 4, "character ';'"),
    ("a.b#c", 4, "character '#'"),
    ("\ta.b#c", 5, "character '#'"),
    ("café.x", 4, "character 'é'"),
    ("cafe\u0301.x", 5, "not allowed"),
    ("\ufeffa.b", 1, "not allowed"),
    ("a.b\u00a0", 4, "not allowed"),
    ("a.b\x0b", 4, "not allowed"),
    ("ab", 1, "expected server.tool"),
    ("   ab", 4, "expected server.tool"),
    (".tool", 1, "empty server name"),
    ("srv.", 5, "empty tool name"),
    ("  srv.", 7, "empty tool name"),
    ("s." + "t" * (names.MAX_TOOL_NAME + 1), 3, "longer than 128"),
    ("a.b c", 5, "unexpected text after the entry"),
    ("a.b\tc.d", 5, "unexpected text after the entry"),
    ("a.b   x # comment", 7, "unexpected text after the entry"),
    ("  a b.c", 5, "unexpected text after the entry"),
]


@pytest.mark.parametrize(("line", "col", "fragment"), BAD_LINES)
def test_error_reports_line_and_column(line: str, col: int, fragment: str) -> None:
    text = "# header\r\n\r\nok.entry\r\n" + line + "\r\nother.entry\n"
    actions, errors = parse(text, P)
    assert actions == ["ok.entry", "other.entry"]
    assert len(errors) == 1
    prefix = f"{P}:4:{col}: "
    assert errors[0].startswith(prefix), errors[0]
    assert fragment in errors[0]


def test_every_error_is_reported_in_file_order() -> None:
    text = "files.*\nok.one\nab\n\n.x\nok.two # fine\na.b c\n"
    actions, errors = parse(text, P)
    assert actions == ["ok.one", "ok.two"]
    assert [e.split(": ", 1)[0] for e in errors] == [f"{P}:1:7", f"{P}:3:1", f"{P}:5:1", f"{P}:7:5"]


def test_carriage_return_inside_a_line_is_an_error_not_a_line_break() -> None:
    actions, errors = parse("a.b\rc.d\n", P)
    assert actions == []
    assert errors == [f"{P}:1:4: character '\\r' not allowed in a server.tool name"]


@given(st.sampled_from("*?[]{}"), st.integers(0, 3))
def test_wildcards_are_never_entries(ch: str, where: int) -> None:
    entry = ["files." + ch, ch + ".read", "files.re" + ch + "d", "fi" + ch + "les.x"][where]
    actions, errors = parse(entry + "\n", P)
    assert actions == []
    assert len(errors) == 1 and "wildcard" in errors[0]


# --- from_bytes / decode -------------------------------------------------------


def test_from_bytes_raises_config_error_listing_every_problem() -> None:
    data = b"files.*\nok.one\nab\nx.y z\n"
    with pytest.raises(ConfigError) as info:
        from_bytes(data, P)
    exc = info.value
    assert exc.exit_code == EX_CONFIG
    assert len(exc.problems) == 3
    assert exc.problems[0].startswith(f"{P}:1:7: wildcard")
    assert exc.problems[1].startswith(f"{P}:3:1: expected server.tool")
    assert exc.problems[2].startswith(f"{P}:4:5: unexpected text")
    assert "(and 2 more)" in str(exc)
    assert "denying every call" in str(exc)


def test_from_bytes_valid_returns_allowlist() -> None:
    al = from_bytes(b"# c\r\nmcp_a.read_list\r\nmcp_b.foo # x\r\n", P)
    assert al.path == P
    assert al.actions == ("mcp_a.read_list", "mcp_b.foo")


@pytest.mark.parametrize(
    ("data", "line", "col"),
    [
        (b"\xff", 1, 1),
        (b"a.b\xff\n", 1, 4),
        (b"a.b\n# ok\nx.y\xfe\n", 3, 4),
        (b"a.b\n# caf\xe9 in a comment\n", 2, 6),  # latin-1, even inside a comment
        (b"a.b\r\n\r\n\xed\xa0\x80.x\n", 3, 1),  # an encoded surrogate is not UTF-8
        (b"a.b\n\xc0\xaf.x\n", 2, 1),  # overlong '/'
        (b"ok.x\nab\xc3", 2, 3),  # truncated sequence at the end
    ],
)
def test_invalid_utf8_is_reported_with_line_and_column(data: bytes, line: int, col: int) -> None:
    with pytest.raises(ConfigError) as info:
        from_bytes(data, P)
    assert str(info.value) == f"{P}:{line}:{col}: not valid UTF-8; denying every call"
    assert info.value.problems == [str(info.value)]


# --- Allowlist.allows: whole string only -------------------------------------


@pytest.fixture
def files_allowlist() -> Allowlist:
    return from_bytes(b"files.read\nfiles.list_dir\nmail.send # x\n", P)


@pytest.mark.parametrize(
    "query",
    [
        "files.rea",  # prefix
        "files.read_all",  # entry is a prefix of the query
        "files.read.x",
        "files",
        "files.",
        "iles.read",
        "Files.read",  # case
        "FILES.READ",
        "files.Read",
        "\uff46\uff49\uff4c\uff45\uff53.read",  # fullwidth letters
        "files\uff0eread",  # fullwidth full stop
        "files.rea\u0064\u0301",  # decomposed accent appended
        "files.read ",  # trailing space
        " files.read",
        "files.read\n",
        "files.read\r",
        "files.read\x00",
        "files.read\t",
        "files.read#",
        "files.*",
        "files.re?d",
        "*",
        "",
        "mail.send # x",
        "x",
    ],
)
def test_allows_is_exact_whole_string_membership(files_allowlist: Allowlist, query: str) -> None:
    assert files_allowlist.allows("files.read")
    assert files_allowlist.allows("files.list_dir")
    assert files_allowlist.allows("mail.send")
    assert not files_allowlist.allows(query)


def test_composed_and_decomposed_forms_are_distinct_and_non_ascii_never_parses() -> None:
    composed, decomposed = "caf\u00e9.x", "cafe\u0301.x"
    al = Allowlist(P, [composed])  # constructed directly: parse would refuse it
    assert al.allows(composed)
    assert not al.allows(decomposed)
    for text in (composed, decomposed):
        actions, errors = parse(text, P)
        assert actions == [] and len(errors) == 1


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=20))
def test_allows_equals_set_membership(query: str) -> None:
    entries = ["a.b", "files.read", "x-y_z.t.u"]
    al = Allowlist(P, entries)
    assert al.allows(query) == (query in entries)


# --- action_error / valid_user_name -------------------------------------------


def test_action_error_matches_parser_rules() -> None:
    assert names.action_error("demo.echo") is None
    assert names.action_error("a.b.c") is None
    assert "wildcard" in (names.action_error("files.*") or "")
    assert names.action_error("demo") == "expected server.tool"
    assert names.action_error(".echo") == "empty server name"
    assert names.action_error("demo.") == "empty tool name"
    assert names.action_error("demo.echo ") is not None
    assert names.action_error("demo." + "e" * 129) is not None
    assert names.action_error("demo." + "e" * 128) is None


@pytest.mark.parametrize("user", ["alice", "moltbot", "a.b", "svc$", "A_1-x", "u" * 64])
def test_valid_user_names(user: str) -> None:
    assert names.valid_user_name(user)


@pytest.mark.parametrize(
    "user", ["", ".", "..", ".hidden", "-x", "a/b", "../etc/passwd", "a b", "u" * 65, "é", "a\x00"]
)
def test_invalid_user_names(user: str) -> None:
    assert not names.valid_user_name(user)


# --- contains_line agrees with parse (property) --------------------------------

_SMALL_SERVER = st.text(alphabet="ab_-", min_size=1, max_size=4)
_SMALL_TOOL = st.text(alphabet="ab.-", min_size=1, max_size=5)
_FULL_SERVER = st.text(alphabet=sorted(names.SERVER_CHARS), min_size=1, max_size=10)
_FULL_TOOL = st.text(alphabet=sorted(names.TOOL_CHARS), min_size=1, max_size=12)
NAMES = st.one_of(
    st.builds(lambda s, t: f"{s}.{t}", _SMALL_SERVER, _SMALL_TOOL),
    st.builds(lambda s, t: f"{s}.{t}", _FULL_SERVER, _FULL_TOOL),
)
BLANK = st.text(alphabet=" \t", max_size=3)
# comment text may hold anything but a line feed, including names and '\r'
COMMENT_TEXT = st.lists(
    st.one_of(
        NAMES,
        st.text(alphabet=st.characters(blacklist_characters="\n", blacklist_categories=("Cs",)), max_size=6),
        st.sampled_from([" ", "\t", "#", "\r", "é"]),
    ),
    max_size=4,
).map("".join)


@st.composite
def allowlist_files(draw: st.DrawFn) -> tuple[bytes, list[str], list[str]]:
    """(file bytes, entries in order, names mentioned only in comments)."""
    lines: list[str] = []
    entries: list[str] = []
    mentioned: list[str] = []
    for _ in range(draw(st.integers(0, 12))):
        kind = draw(st.sampled_from(["entry", "entry", "comment", "blank"]))
        indent = draw(BLANK)
        if kind == "entry":
            name = draw(NAMES)
            entries.append(name)
            trail = draw(
                st.one_of(st.just(""), BLANK, st.builds(lambda ws, c: ws + "#" + c, BLANK.filter(bool), COMMENT_TEXT))
            )
            lines.append(indent + name + trail)
            if "#" in trail:
                mentioned.extend(re.findall(r"[A-Za-z0-9_.-]+", trail))
        elif kind == "comment":
            body = draw(COMMENT_TEXT)
            lines.append(indent + "#" + body)
            mentioned.extend(re.findall(r"[A-Za-z0-9_.-]+", body))
        else:
            lines.append(indent)
    eol = draw(st.sampled_from(["\n", "\r\n"]))
    text = eol.join(lines) + draw(st.sampled_from(["", eol]))
    return text.encode(), entries, mentioned


def _near(name: str) -> list[str]:
    """Names that differ slightly from ``name``: prefixes, suffixes, extensions."""
    out = [name[:k] for k in range(1, len(name))] + [name[k:] for k in range(1, len(name))]
    out += [name + "x", name + ".x", name + "-", "x" + name, name.upper(), name.lower()]
    return out


@settings(max_examples=200, deadline=None)
@given(allowlist_files(), st.lists(NAMES, max_size=5))
def test_contains_line_agrees_with_parse(file: tuple[bytes, list[str], list[str]], extra: list[str]) -> None:
    data, entries, mentioned = file
    actions, errors = parse(data.decode(), P)
    assert errors == []
    assert actions == entries
    allowed = set(actions)
    queries = set(entries) | set(mentioned) | set(extra)
    for name in list(queries):
        queries.update(_near(name))
    for query in queries:
        if names.action_error(query) is not None:
            continue  # contains_line is only defined for valid names
        assert contains_line(data, query) == (query in allowed), (query, data)
        assert from_bytes(data, P).allows(query) == (query in allowed)


@pytest.mark.parametrize(
    ("data", "query", "expected"),
    [
        (b"a.b\n", "a.b", True),
        (b"a.bc\n", "a.b", False),
        (b"a.b.c\n", "a.b", False),
        (b"xa.b\n", "a.b", False),
        (b"# a.b\n", "a.b", False),
        (b"#a.b\n", "a.b", False),
        (b"  # a.b\n", "a.b", False),
        (b"c.d # a.b\n", "a.b", False),
        (b"c.d\t#a.b\r\n", "a.b", False),
        (b"  a.b\t# x\r\n", "a.b", True),
        (b"# a.b\r\na.b\r\n", "a.b", True),
        (b"# a.b\ra.b\n", "a.b", False),  # '\r' inside a comment is not a line break
        (b"a.b", "a.b", True),
        (b"a.b\r", "a.b", True),
        (b"", "a.b", False),
    ],
)
def test_contains_line_examples(data: bytes, query: str, expected: bool) -> None:
    assert parse(data.decode(), P)[1] == []
    assert contains_line(data, query) is expected


WILDCARD_STAR = "wildcard '*' not allowed (entries are exact names; 'mcp-brokerctl allow' expands patterns)"

# --- locate / load: fail closed -------------------------------------------------


class Tree:
    """etc/ (0755) with allowed-actions.txt (0644) and allowed-actions.d/ (0755)."""

    def __init__(self, root: str) -> None:
        self.etc = os.path.join(root, "etc")
        os.mkdir(self.etc)
        os.chmod(self.etc, 0o755)
        self.allowlist = os.path.join(self.etc, "allowed-actions.txt")
        self.allowlist_d = os.path.join(self.etc, "allowed-actions.d")
        write(self.allowlist, "global.tool\nshared.tool\n")

    def make_d(self) -> str:
        os.mkdir(self.allowlist_d)
        os.chmod(self.allowlist_d, 0o755)
        return self.allowlist_d

    def user_file(self, user: str, text: str, mode: int = 0o644) -> str:
        if not os.path.isdir(self.allowlist_d):
            self.make_d()
        return write(os.path.join(self.allowlist_d, user + ".txt"), text, mode)

    def load(self, user: str = "alice") -> Allowlist:
        return allowlist.load(self.allowlist, self.allowlist_d, user)


@pytest.fixture
def tree(tmp_root: str) -> Tree:
    return Tree(tmp_root)


def _denied(tree: Tree, user: str = "alice") -> str:
    with pytest.raises(ConfigError) as info:
        tree.load(user)
    assert info.value.exit_code == EX_CONFIG
    assert "denying every call" in str(info.value)
    return str(info.value)


@needs_root
def test_load_reads_global_file(tree: Tree) -> None:
    al = tree.load()
    assert al.actions == ("global.tool", "shared.tool")
    assert al.path == tree.allowlist
    data, path, st_ = allowlist.locate(tree.allowlist, tree.allowlist_d, "alice")
    assert data == b"global.tool\nshared.tool\n"
    assert path == tree.allowlist
    assert st_.st_uid == 0


@needs_root
def test_user_file_replaces_global_file(tree: Tree) -> None:
    tree.user_file("alice", "alice.only\nshared.tool\n")
    al = tree.load("alice")
    assert al.path == f"{tree.allowlist_d}/alice.txt"
    assert al.allows("alice.only")
    assert al.allows("shared.tool")
    assert not al.allows("global.tool")  # replaced, not merged
    bob = tree.load("bob")
    assert bob.path == tree.allowlist
    assert bob.allows("global.tool") and not bob.allows("alice.only")


@needs_root
def test_empty_user_file_allows_nothing(tree: Tree) -> None:
    tree.user_file("alice", "# nothing for alice\n")
    assert tree.load("alice").actions == ()


@needs_root
def test_edits_take_effect_on_the_next_load(tree: Tree) -> None:
    assert not tree.load().allows("new.tool")
    write(tree.allowlist, "new.tool\n")
    al = tree.load()
    assert al.allows("new.tool") and not al.allows("global.tool")


@needs_root
def test_invalid_content_denies_with_every_problem(tree: Tree) -> None:
    write(tree.allowlist, "ok.one\nfiles.*\nab\n")
    with pytest.raises(ConfigError) as info:
        tree.load()
    assert info.value.problems == [
        f"{tree.allowlist}:2:7: {WILDCARD_STAR}",
        f"{tree.allowlist}:3:1: expected server.tool",
    ]


@needs_root
def test_file_not_owned_by_root(tree: Tree) -> None:
    os.chown(tree.allowlist, NOBODY_UID, -1)
    msg = _denied(tree)
    assert "must be owned by root" in msg and str(NOBODY_UID) in msg


@needs_root
@pytest.mark.parametrize("mode", [0o664, 0o646, 0o666, 0o620, 0o602])
def test_group_or_world_writable_file(tree: Tree, mode: int) -> None:
    os.chmod(tree.allowlist, mode)
    assert "writable by group or other" in _denied(tree)


@needs_root
@pytest.mark.parametrize("mode", [0o600, 0o640, 0o444, 0o400])
def test_private_or_readonly_file_modes_are_fine(tree: Tree, mode: int) -> None:
    os.chmod(tree.allowlist, mode)
    assert tree.load().allows("global.tool")


@needs_root
@pytest.mark.parametrize("mode", [0o775, 0o757, 0o1777])
def test_group_or_world_writable_directory(tree: Tree, mode: int) -> None:
    os.chmod(tree.etc, mode)
    msg = _denied(tree)
    assert "directory is writable by group or other" in msg and tree.etc in msg


@needs_root
def test_directory_not_owned_by_root(tree: Tree) -> None:
    os.chown(tree.etc, NOBODY_UID, -1)
    assert "directory must be owned by root" in _denied(tree)


@needs_root
def test_symlink_as_the_file_is_refused(tree: Tree) -> None:
    real = write(os.path.join(tree.etc, "real.txt"), "global.tool\n")
    os.unlink(tree.allowlist)
    os.symlink(real, tree.allowlist)
    msg = _denied(tree)
    assert tree.allowlist in msg and "cannot open" in msg


@needs_root
def test_symlink_as_the_user_file_is_refused_not_skipped(tree: Tree) -> None:
    tree.make_d()
    os.symlink(tree.allowlist, os.path.join(tree.allowlist_d, "alice.txt"))
    assert "alice.txt" in _denied(tree, "alice")
    assert tree.load("bob").allows("global.tool")


@needs_root
def test_missing_file(tree: Tree) -> None:
    os.unlink(tree.allowlist)
    assert _denied(tree) == f"{tree.allowlist}: missing; denying every call"


@needs_root
def test_missing_directory(tmp_root: str) -> None:
    etc = os.path.join(tmp_root, "nope")
    with pytest.raises(ConfigError, match="directory missing"):
        allowlist.load(etc + "/allowed-actions.txt", etc + "/allowed-actions.d", "alice")


@needs_root
def test_not_a_regular_file(tree: Tree) -> None:
    os.unlink(tree.allowlist)
    os.mkfifo(tree.allowlist, 0o644)  # O_NONBLOCK: must not hang
    assert "not a regular file" in _denied(tree)
    os.unlink(tree.allowlist)
    os.mkdir(tree.allowlist, 0o755)
    assert "not a regular file" in _denied(tree)


@needs_root
def test_user_file_not_owned_by_root_denies_instead_of_falling_back(tree: Tree) -> None:
    path = tree.user_file("alice", "alice.only\n")
    os.chown(path, NOBODY_UID, -1)
    msg = _denied(tree, "alice")
    assert path in msg and "owned by root" in msg


@needs_root
def test_group_writable_user_file(tree: Tree) -> None:
    tree.user_file("alice", "alice.only\n", mode=0o664)
    assert "writable by group or other" in _denied(tree, "alice")


@needs_root
@pytest.mark.parametrize("attr", ["mode", "owner"])
def test_bad_allowed_actions_d_denies_every_user(tree: Tree, attr: str) -> None:
    d = tree.make_d()
    if attr == "mode":
        os.chmod(d, 0o775)
    else:
        os.chown(d, NOBODY_UID, -1)
    for user in ("alice", "bob"):  # even a user without a file of their own
        assert d in _denied(tree, user)


@needs_root
def test_invalid_user_file_does_not_fall_back(tree: Tree) -> None:
    tree.user_file("alice", "files.*\n")
    with pytest.raises(ConfigError) as info:
        tree.load("alice")
    assert info.value.problems[0].startswith(f"{tree.allowlist_d}/alice.txt:1:7: wildcard")


@needs_root
@pytest.mark.parametrize("user", ["", "../etc/allowed-actions", ".hidden", "a/b", "-x"])
def test_invalid_caller_name_is_refused(tree: Tree, user: str) -> None:
    with pytest.raises(ConfigError, match="cannot name an allowlist"):
        tree.load(user)


@needs_root
def test_oversized_file_is_refused(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allowlist, "MAX_ALLOWLIST_BYTES", 16)
    write(tree.allowlist, "a.b\n" * 5)
    assert "larger than 16 bytes" in _denied(tree)


# --- check_all -------------------------------------------------------------------


@needs_root
def test_check_all_clean(tree: Tree) -> None:
    tree.user_file("alice", "a.b\n")
    assert allowlist.check_all(tree.allowlist, tree.allowlist_d) == []


@needs_root
def test_check_all_without_user_directory(tree: Tree) -> None:
    assert allowlist.check_all(tree.allowlist, tree.allowlist_d) == []


@needs_root
def test_check_all_reports_every_file(tree: Tree) -> None:
    write(tree.allowlist, "ok.x\nfiles.*\n")
    tree.user_file("alice", "ab\n.x\n")
    tree.user_file("bob", "ok.y\n", mode=0o666)
    tree.user_file("bad name", "ok.z\n")
    tree.user_file("carol", "ok.z\n")
    write(os.path.join(tree.allowlist_d, "README"), "not an allowlist *\n")
    problems = allowlist.check_all(tree.allowlist, tree.allowlist_d)
    d = tree.allowlist_d
    assert f"{tree.allowlist}:2:7: {WILDCARD_STAR}" in problems
    assert f"{d}/alice.txt:1:1: expected server.tool" in problems
    assert f"{d}/alice.txt:2:1: empty server name" in problems
    assert any(p.startswith(f"{d}/bob.txt: file is writable by group or other") for p in problems)
    assert f"{d}/bad name.txt: not a valid user name; this file is never used" in problems
    assert not any("carol" in p or "README" in p for p in problems)
    assert len(problems) == 5


@needs_root
def test_check_all_missing_global_and_bad_directory(tree: Tree) -> None:
    os.unlink(tree.allowlist)
    d = tree.make_d()
    os.chmod(d, 0o777)
    problems = allowlist.check_all(tree.allowlist, tree.allowlist_d)
    assert f"{tree.allowlist}: missing; denying every call" in problems
    assert any(p.startswith(f"{d}: directory is writable by group or other") for p in problems)


def test_allowlist_path_constants_match_design() -> None:
    from broker.core.paths import Paths

    p = Paths("/srv/x")
    assert p.allowlist == "/srv/x/etc/mcp-privsep/allowed-actions.txt"
    assert p.allowlist_d == "/srv/x/etc/mcp-privsep/allowed-actions.d"
    assert p.user_allowlist("alice") == "/srv/x/etc/mcp-privsep/allowed-actions.d/alice.txt"
