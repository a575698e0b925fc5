"""Install's upgrade of the files server's read-write roots: what changes hands, and what never does.

The first version ran every server as ``mcp-broker``; a files server's
``:rw`` root is that user's. ``adopt_files_roots`` gives what the broker's
user owns there to the server's own user, walking by descriptor: a link in
the root (a server could have planted one) is changed itself, never what
it points to, and nothing outside the root is touched.
"""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from broker.admin.install import Report, adopt_files_roots
from broker.core.paths import BROKER_USER
from broker.core.servers import parse_server
from tests.unit.conftest import IS_ROOT

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: it chowns files between system users")


@pytest.fixture
def users() -> tuple[pwd.struct_passwd, pwd.struct_passwd]:
    try:
        broker = pwd.getpwnam(BROKER_USER)
    except KeyError:
        pytest.skip(f"no {BROKER_USER} user on this machine (make demo makes it)")
    return broker, pwd.getpwnam("nobody")


def files_server(*roots: str) -> object:
    args = ["-m", "mcp_servers.files", *(x for r in roots for x in ("--root", r))]
    return parse_server("files", {"command": "/usr/bin/python3", "args": args}, "test")


def test_the_broker_users_files_in_a_rw_root_change_hands(tmp_path: Path, users: tuple) -> None:
    broker, owner = users
    inbox, outside, ro = tmp_path / "inbox", tmp_path / "outside", tmp_path / "nas"
    for d in (inbox / "notes", outside, ro):
        d.mkdir(parents=True)
    for f in (inbox / "notes" / "a.txt", outside / "audit.jsonl", ro / "doc.txt"):
        f.write_text("x")
    (inbox / "theirs.txt").write_text("root's own")
    (inbox / "link").symlink_to(outside / "audit.jsonl")  # planted: must not reach its target
    (inbox / "dirlink").symlink_to(outside)
    for p in (inbox, inbox / "notes", inbox / "notes" / "a.txt", outside, outside / "audit.jsonl", ro, ro / "doc.txt"):
        os.chown(p, broker.pw_uid, broker.pw_gid)
    for p in (inbox / "link", inbox / "dirlink"):
        os.lchown(p, broker.pw_uid, broker.pw_gid)

    report = Report()
    adopt_files_roots(files_server(f"inbox={inbox}:rw", f"nas={ro}:ro"), owner, report)

    def uid(p: Path) -> int:
        return os.lstat(p).st_uid

    assert {uid(p) for p in (inbox, inbox / "notes", inbox / "notes" / "a.txt")} == {owner.pw_uid}
    assert uid(inbox / "link") == owner.pw_uid and uid(inbox / "dirlink") == owner.pw_uid  # the links themselves
    assert uid(inbox / "theirs.txt") == 0  # not the broker's: untouched
    assert {uid(p) for p in (outside, outside / "audit.jsonl")} == {broker.pw_uid}  # nothing beyond the root
    assert {uid(p) for p in (ro, ro / "doc.txt")} == {broker.pw_uid}  # read-only roots are not written
    assert report.lines == [f"server files: {inbox} now belongs to nobody (5 entries were {BROKER_USER}'s)"]

    again = Report()
    adopt_files_roots(files_server(f"inbox={inbox}:rw"), owner, again)
    assert again.lines == []  # idempotent: a root that is not the broker's is left alone


def test_a_root_that_is_a_link_is_not_followed(tmp_path: Path, users: tuple) -> None:
    broker, owner = users
    real = tmp_path / "real"
    real.mkdir()
    os.chown(real, broker.pw_uid, broker.pw_gid)
    (tmp_path / "inbox").symlink_to(real)
    report = Report()
    adopt_files_roots(files_server(f"inbox={tmp_path}/inbox:rw"), owner, report)
    assert os.lstat(real).st_uid == broker.pw_uid and report.lines == []


def test_the_brokers_own_directories_never_change_hands(tmp_path: Path, users: tuple) -> None:
    """A files server rooted at (or above) the broker's state: its audit trail must stay the broker's."""
    broker, owner = users
    state = tmp_path / "var" / "lib" / "mcp-privsep"
    state.mkdir(parents=True)
    (state / "state.db").write_text("x")
    for p in (tmp_path / "var", tmp_path / "var" / "lib", state, state / "state.db"):
        os.chown(p, broker.pw_uid, broker.pw_gid)
    for root in (state, tmp_path / "var"):  # the directory itself, and one that holds it
        report = Report()
        adopt_files_roots(files_server(f"x={root}:rw"), owner, report, (str(state),))
        assert os.lstat(state / "state.db").st_uid == broker.pw_uid and os.lstat(state).st_uid == broker.pw_uid
        assert report.lines == [f"server files: {root} is (or holds) the broker's {state}: left as it is"]
