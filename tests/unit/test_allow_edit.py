"""Unit tests for ``broker.admin_edit``: the allowlist edits behind ``allow`` and ``deny``.

Covers the pure text edits (comments, blank lines, trailing comments, CRLF and
a missing final newline are kept; new entries go after their server's last
entry; deny removes whole lines), idempotence (no rewrite, same inode), the
atomic write (a result that would not parse is refused and the old file
stays byte for byte; no temporary file is left behind; owner and mode are
set), a current file that is already invalid, symlinks, concurrent editors
under the directory lock, and the pattern expansion that keeps wildcards out
of the file. File tests run as any user: the owner uid and the mcp-gate
group are patched to the test's own.
"""

from __future__ import annotations

import os
import stat
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.admin import allowlist_edit as admin_edit
from broker.core import allowlist
from broker.core.errors import ConfigError, PrivsepError, UsageError
from tests.unit.conftest import write

SAMPLE = """\
# MCP A
mcp_a.read_list
#mcp_a.write_list - don't allow
mcp_a.other        # trailing comments allowed after whitespace

# MCP B
mcp_b.foo
"""

OFFERED = {
    "demo": [
        {"name": "echo", "annotations": {"readOnlyHint": True}},
        {"name": "add", "annotations": {"read_only_hint": True, "destructive_hint": False}},
        {"name": "delete", "annotations": {"destructiveHint": True}},
        {"name": "secret"},
    ],
    "files": [],
}


@pytest.fixture
def own_files(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let the file tests run unprivileged: the owner and group are the test's own."""
    monkeypatch.setattr(admin_edit, "ALLOWLIST_UID", os.getuid())
    monkeypatch.setattr(admin_edit, "gate_gid", os.getgid)


def _listing(directory: str) -> list[str]:
    return sorted(os.listdir(directory))


# --- pure text edits --------------------------------------------------------------


def test_allow_inserts_after_the_servers_last_entry_and_keeps_everything_else() -> None:
    new, added, already = admin_edit.plan_allow(SAMPLE, ["mcp_a.new"])
    assert added == ["mcp_a.new"] and already == []
    assert new == SAMPLE.replace(
        "mcp_a.other        # trailing comments allowed after whitespace\n",
        "mcp_a.other        # trailing comments allowed after whitespace\nmcp_a.new\n",
    )


def test_allow_appends_a_new_server_at_the_end() -> None:
    new, added, _ = admin_edit.plan_allow(SAMPLE, ["mcp_c.x", "mcp_c.y"])
    assert new == SAMPLE + "mcp_c.x\nmcp_c.y\n"
    assert added == ["mcp_c.x", "mcp_c.y"]


def test_allow_does_not_uncomment_a_commented_entry() -> None:
    new, added, _ = admin_edit.plan_allow(SAMPLE, ["mcp_a.write_list"])
    assert "#mcp_a.write_list - don't allow\n" in new
    assert added == ["mcp_a.write_list"]
    assert allowlist.parse(new, "f")[0].count("mcp_a.write_list") == 1


def test_allow_of_an_allowed_entry_changes_nothing() -> None:
    new, added, already = admin_edit.plan_allow(SAMPLE, ["mcp_a.other", "mcp_b.foo"])
    assert new == SAMPLE and added == [] and already == ["mcp_a.other", "mcp_b.foo"]


def test_allow_without_final_newline_and_with_crlf() -> None:
    new, _, _ = admin_edit.plan_allow("a.x", ["b.y"])
    assert new == "a.x\nb.y\n"
    crlf = "# c\r\na.x\r\n"
    new, _, _ = admin_edit.plan_allow(crlf, ["a.y"])
    assert new == "# c\r\na.x\r\na.y\r\n"
    assert allowlist.parse(new, "f") == (["a.x", "a.y"], [])


def test_deny_removes_whole_lines_and_keeps_comments_and_order() -> None:
    new, removed, absent, lines = admin_edit.plan_deny(SAMPLE, ["mcp_a.other", "mcp_z.none"])
    assert removed == ["mcp_a.other"] and absent == ["mcp_z.none"]
    assert lines == ["mcp_a.other        # trailing comments allowed after whitespace"]
    assert new == SAMPLE.replace("mcp_a.other        # trailing comments allowed after whitespace\n", "")


def test_deny_removes_every_duplicate_and_ignores_commented_lines() -> None:
    text = "a.x\n#a.x\n  a.x   # again\nb.y\n"
    new, removed, _absent, lines = admin_edit.plan_deny(text, ["a.x"])
    assert new == "#a.x\nb.y\n"
    assert removed == ["a.x"] and len(lines) == 2


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.sampled_from(["a.x", "a.y", "b.z", "# note", "", "  c.w  # t", "#a.x"]), max_size=12),
    st.lists(st.sampled_from(["a.x", "a.y", "b.z", "c.w", "d.v"]), min_size=1, max_size=4),
)
def test_allow_then_deny_is_exact_and_never_touches_comments(lines: list[str], actions: list[str]) -> None:
    text = "\n".join(lines) + ("\n" if lines else "")
    before = allowlist.parse(text, "f")[0]
    allowed_text, _, _ = admin_edit.plan_allow(text, actions)
    after_allow = allowlist.parse(allowed_text, "f")
    assert after_allow[1] == []
    assert set(after_allow[0]) == set(before) | set(actions)
    comments = [ln for ln in text.split("\n") if ln.strip().startswith("#")]
    assert [ln for ln in allowed_text.split("\n") if ln.strip().startswith("#")] == comments
    denied_text, *_ = admin_edit.plan_deny(allowed_text, actions)
    assert set(allowlist.parse(denied_text, "f")[0]) == set(before) - set(actions)
    assert [ln for ln in denied_text.split("\n") if ln.strip().startswith("#")] == comments


# --- patterns ------------------------------------------------------------------------


def test_expand_star_lists_todays_tools_and_never_a_wildcard() -> None:
    actions, lines = admin_edit.expand(["demo.*"], OFFERED)
    assert actions == ["demo.echo", "demo.add", "demo.delete", "demo.secret"]
    assert not any(admin_edit.is_pattern(a) for a in actions)
    assert lines == ["demo.* -> demo.echo, demo.add, demo.delete, demo.secret"]
    assert admin_edit.expand(["demo.e*"], OFFERED)[0] == ["demo.echo"]


def test_expand_refuses_unknown_servers_empty_matches_and_server_patterns() -> None:
    with pytest.raises(PrivsepError, match="no server named nope"):
        admin_edit.expand(["nope.*"], OFFERED)
    with pytest.raises(PrivsepError, match="matches none"):
        admin_edit.expand(["demo.zz*"], OFFERED)
    with pytest.raises(PrivsepError, match="is the server up"):
        admin_edit.expand(["files.*"], OFFERED)
    with pytest.raises(UsageError, match="server name must be written out"):
        admin_edit.expand(["de*.echo"], OFFERED)
    with pytest.raises(UsageError):
        admin_edit.expand(["demo"], OFFERED)


def test_read_only_takes_only_tools_annotated_read_only_in_either_spelling() -> None:
    assert admin_edit.read_only_tools("demo", OFFERED) == ["demo.echo", "demo.add"]
    assert admin_edit.read_only_tools("files", OFFERED) == []
    with pytest.raises(PrivsepError):
        admin_edit.read_only_tools("nope", OFFERED)


def test_deny_patterns_expand_against_the_file() -> None:
    assert admin_edit.deny_expand(["mcp_a.*"], ["mcp_a.read_list", "mcp_b.foo", "mcp_a.other"]) == [
        "mcp_a.read_list",
        "mcp_a.other",
    ]


def test_check_actions_refuses_wildcards_and_garbage() -> None:
    for bad in ("demo.*", "demo", "de mo.x", "demo.", ".x", "demo.x y"):
        with pytest.raises(UsageError):
            admin_edit.check_actions([bad])


# --- files -------------------------------------------------------------------------------


@pytest.mark.usefixtures("own_files")
def test_allow_writes_atomically_with_owner_mode_and_no_leftovers(tmp_root: str) -> None:
    path = write(f"{tmp_root}/etc/allowed-actions.txt", SAMPLE, 0o640)
    result = admin_edit.allow(path, ["mcp_b.bar"])
    assert result.changed and result.done == ["mcp_b.bar"]
    with open(path, encoding="utf-8") as fh:
        assert fh.read() == SAMPLE + "mcp_b.bar\n"
    st_ = os.stat(path)
    assert stat.S_IMODE(st_.st_mode) == 0o640
    assert (st_.st_uid, st_.st_gid) == (os.getuid(), os.getgid())
    assert _listing(f"{tmp_root}/etc") == ["allowed-actions.txt"]


@pytest.mark.usefixtures("own_files")
def test_idempotent_allow_and_deny_do_not_rewrite_the_file(tmp_root: str) -> None:
    path = write(f"{tmp_root}/etc/allowed-actions.txt", SAMPLE, 0o640)
    inode = os.stat(path).st_ino
    again = admin_edit.allow(path, ["mcp_a.read_list"])
    assert not again.changed and again.unchanged == ["mcp_a.read_list"]
    gone = admin_edit.deny(path, ["mcp_a.write_list"])  # only commented out: not an entry
    assert not gone.changed and gone.unchanged == ["mcp_a.write_list"]
    assert os.stat(path).st_ino == inode
    with open(path, encoding="utf-8") as fh:
        assert fh.read() == SAMPLE


@pytest.mark.usefixtures("own_files")
def test_deny_then_allow_round_trip(tmp_root: str) -> None:
    path = write(f"{tmp_root}/etc/allowed-actions.txt", SAMPLE, 0o640)
    result = admin_edit.deny(path, ["mcp_b.*"])
    assert result.done == ["mcp_b.foo"] and result.changed
    with open(path, encoding="utf-8") as fh:
        assert "mcp_b.foo" not in fh.read()
    admin_edit.allow(path, ["mcp_b.foo"])
    with open(path, encoding="utf-8") as fh:
        assert allowlist.parse(fh.read(), path)[0] == ["mcp_a.read_list", "mcp_a.other", "mcp_b.foo"]


@pytest.mark.usefixtures("own_files")
def test_a_result_that_would_not_parse_is_refused_and_the_old_file_stays(tmp_root: str) -> None:
    path = write(f"{tmp_root}/etc/allowed-actions.txt", SAMPLE, 0o640)
    inode = os.stat(path).st_ino

    def breaks_it(text: str, _result: admin_edit.EditResult) -> str:
        return text + "demo.* \n"

    with pytest.raises(ConfigError, match="wildcard"):
        admin_edit.edit(path, "", breaks_it)
    with open(path, encoding="utf-8") as fh:
        assert fh.read() == SAMPLE
    assert os.stat(path).st_ino == inode
    assert _listing(f"{tmp_root}/etc") == ["allowed-actions.txt"]


@pytest.mark.usefixtures("own_files")
def test_validation_of_what_landed_on_disk_runs_before_the_rename(tmp_root: str) -> None:
    path = write(f"{tmp_root}/x.txt", "a.x\n", 0o640)

    def refuse(_data: bytes) -> None:
        raise ConfigError("refused by the validator")

    with pytest.raises(ConfigError, match="refused"):
        admin_edit.atomic_replace(path, b"a.y\n", os.getuid(), os.getgid(), 0o640, refuse)
    with open(path, encoding="utf-8") as fh:
        assert fh.read() == "a.x\n"
    assert _listing(tmp_root) == ["x.txt"]


@pytest.mark.usefixtures("own_files")
def test_a_file_that_is_invalid_now_is_not_edited(tmp_root: str) -> None:
    path = write(f"{tmp_root}/etc/allowed-actions.txt", "a.x\nbad line here\n", 0o640)
    with pytest.raises(ConfigError, match="invalid now") as info:
        admin_edit.allow(path, ["b.y"])
    assert any(":2:" in p for p in info.value.problems)
    with open(path, encoding="utf-8") as fh:
        assert fh.read() == "a.x\nbad line here\n"


@pytest.mark.usefixtures("own_files")
def test_wildcards_never_reach_the_file(tmp_root: str) -> None:
    path = write(f"{tmp_root}/etc/allowed-actions.txt", SAMPLE, 0o640)
    with pytest.raises(UsageError, match="wildcard"):
        admin_edit.allow(path, ["demo.*"])
    with open(path, encoding="utf-8") as fh:
        assert fh.read() == SAMPLE


@pytest.mark.usefixtures("own_files")
def test_a_missing_file_is_created_with_its_header(tmp_root: str) -> None:
    os.makedirs(f"{tmp_root}/d")
    path = f"{tmp_root}/d/agent.txt"
    result = admin_edit.allow(path, ["demo.echo"], admin_edit.USER_FILE_HEADER.format(user="agent"))
    assert result.created and result.changed
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    assert text.startswith("# allowed-actions.d/agent.txt") and text.endswith("\ndemo.echo\n")
    with pytest.raises(PrivsepError, match="does not exist"):
        admin_edit.deny(f"{tmp_root}/d/other.txt", ["demo.echo"])


@pytest.mark.usefixtures("own_files")
def test_a_symlinked_allowlist_is_refused(tmp_root: str) -> None:
    target = write(f"{tmp_root}/elsewhere.txt", "a.x\n", 0o640)
    os.makedirs(f"{tmp_root}/etc")
    os.symlink(target, f"{tmp_root}/etc/allowed-actions.txt")
    with pytest.raises(ConfigError, match="symlink"):
        admin_edit.allow(f"{tmp_root}/etc/allowed-actions.txt", ["b.y"])
    with open(target, encoding="utf-8") as fh:
        assert fh.read() == "a.x\n"


@pytest.mark.usefixtures("own_files")
def test_wrong_mode_is_repaired_on_a_change_and_reported_otherwise(tmp_root: str) -> None:
    path = write(f"{tmp_root}/etc/allowed-actions.txt", "a.x\n", 0o664)
    unchanged = admin_edit.allow(path, ["a.x"])
    assert not unchanged.changed and "left as it is" in unchanged.notes[0]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o664
    changed = admin_edit.allow(path, ["a.y"])
    assert changed.changed and "repaired" in changed.notes[0]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640


@pytest.mark.usefixtures("own_files")
def test_concurrent_editors_lose_no_entry(tmp_root: str) -> None:
    path = write(f"{tmp_root}/etc/allowed-actions.txt", "# start\n", 0o640)
    errors: list[BaseException] = []

    def worker(i: int) -> None:
        try:
            admin_edit.allow(path, [f"s{i % 3}.t{i}"])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with open(path, encoding="utf-8") as fh:
        found = allowlist.parse(fh.read(), path)[0]
    assert sorted(found) == sorted(f"s{i % 3}.t{i}" for i in range(24))
    assert _listing(f"{tmp_root}/etc") == ["allowed-actions.txt"]
