"""Unit tests for the daemon's per-call caches: they may only skip work, never a decision.

The allowlist cache (``allowlist.Cache``, used by the daemon and by the
``mcp stdio`` session) is keyed by the (l)stat identities of every file and
directory the full read would touch, so an edit, a chmod, a replacement by
a symlink or a new per-user file takes effect on the very next call, and a
broken file is never served from memory. The passwd cache answers what
``pwd`` answers. The state caches (pins, freezes) follow every write.
"""

from __future__ import annotations

import os
import time

import pytest

from broker.core import allowlist
from broker.core.errors import ConfigError
from broker.core.paths import Paths
from broker.daemon.callers import Callers
from broker.daemon.state import State
from tests.unit.conftest import needs_root, write


@pytest.fixture
def paths(tmp_root: str) -> Paths:
    p = Paths(tmp_root)
    write(p.allowlist, "demo.echo\n")
    os.makedirs(p.allowlist_d, 0o755, exist_ok=True)
    os.chmod(p.etc, 0o755)
    return p


@needs_root
def test_allowlist_cache_sees_every_change_on_the_next_call(paths: Paths) -> None:
    cache = allowlist.Cache(paths.allowlist, paths.allowlist_d)
    assert cache.get("alice").allows("demo.echo")
    write(paths.allowlist, "demo.add\n")  # same size, new content
    assert not cache.get("alice").allows("demo.echo") and cache.get("alice").allows("demo.add")
    write(paths.user_allowlist("alice"), "demo.whoami\n")  # a per-user file replaces the global one
    assert cache.get("alice").allows("demo.whoami") and not cache.get("alice").allows("demo.add")
    assert cache.get("bob").allows("demo.add")
    os.unlink(paths.user_allowlist("alice"))
    assert cache.get("alice").allows("demo.add")


@needs_root
def test_allowlist_cache_fails_closed_at_once_and_never_serves_a_broken_file(paths: Paths) -> None:
    cache = allowlist.Cache(paths.allowlist, paths.allowlist_d)
    assert cache.get("alice").allows("demo.echo")
    os.chmod(paths.allowlist, 0o666)
    for _ in range(2):
        with pytest.raises(ConfigError, match="writable by group or other"):
            cache.get("alice")
    os.chmod(paths.allowlist, 0o644)
    assert cache.get("alice").allows("demo.echo")
    os.chmod(paths.etc, 0o777)  # the directory, not the file
    with pytest.raises(ConfigError, match="directory is writable"):
        cache.get("alice")
    os.chmod(paths.etc, 0o755)
    target = write(f"{paths.root}/elsewhere.txt", "demo.secret\n")
    os.unlink(paths.allowlist)
    os.symlink(target, paths.allowlist)
    with pytest.raises(ConfigError):
        cache.get("alice")
    os.unlink(paths.allowlist)
    write(paths.allowlist, "demo.echo\nnot a tool\n")
    with pytest.raises(ConfigError, match=":2:"):
        cache.get("alice")


@needs_root
def test_stat_key_moves_with_content_owner_and_mode(paths: Paths) -> None:
    key = allowlist.stat_key(paths.allowlist, paths.allowlist_d, "alice")
    assert allowlist.stat_key(paths.allowlist, paths.allowlist_d, "alice") == key
    time.sleep(0.01)
    os.chmod(paths.allowlist, 0o600)
    assert allowlist.stat_key(paths.allowlist, paths.allowlist_d, "alice") != key
    assert allowlist.stat_key(paths.allowlist, paths.allowlist_d, "a\0b")[1] is None  # no crash on a NUL


@needs_root
def test_callers_come_from_the_map_and_follow_its_changes(tmp_path: os.PathLike[str]) -> None:
    """The caller is the agent the map names for the peer's uid; an edit of the map counts on the next lookup."""
    import pwd

    path = os.path.join(str(tmp_path), "gate-users")
    write(path, "daemon nobody\n", 0o640)
    callers = Callers(path)
    nobody, daemon = pwd.getpwnam("nobody"), pwd.getpwnam("daemon")
    assert callers.lookup(nobody.pw_uid) == ("daemon", daemon.pw_uid)
    assert callers.lookup(daemon.pw_uid) is None  # the agent's own uid is no gate user
    assert callers.lookup(0) is None
    write(path, "# nobody serves no agent now\n", 0o640)
    assert callers.lookup(nobody.pw_uid) is None


@needs_root
def test_callers_refuse_root_and_system_accounts_and_a_broken_map(tmp_path: os.PathLike[str]) -> None:
    path = os.path.join(str(tmp_path), "gate-users")
    write(path, "daemon root\nroot nobody\n", 0o640)  # root as a gate user; root as an agent
    callers = Callers(path)
    assert callers.lookup(0) is None
    import pwd

    assert callers.lookup(pwd.getpwnam("nobody").pw_uid) is None
    write(path, "daemon nobody extra\n", 0o640)
    assert callers.lookup(pwd.getpwnam("nobody").pw_uid) is None
    assert callers.problem.endswith("expected AGENT GATE_USER")
    write(path, "daemon nobody\n", 0o666)  # writable by others: fail closed
    assert callers.lookup(pwd.getpwnam("nobody").pw_uid) is None and "not writable" in callers.problem


def test_state_caches_follow_every_write(tmp_path: os.PathLike[str]) -> None:
    state = State(os.path.join(str(tmp_path), "state.db"))
    assert state.pin("demo.echo") is None
    state.set_pin("demo.echo", "h1", "{}")
    assert state.pin("demo.echo") == ("h1", "{}")
    state.set_pin("demo.echo", "h2", "{}")
    assert state.pin("demo.echo") == ("h2", "{}")
    assert state.frozen_until("alice") is None
    froze = [state.record_denial("alice", budget=1, window=60, freeze=30) for _ in range(2)]
    assert froze == [False, True]
    until = state.frozen_until("alice")
    assert until is not None and until > time.time()
    assert state.unfreeze("alice")
    assert state.frozen_until("alice") is None
    state.close()
    again = State(os.path.join(str(tmp_path), "state.db"))  # and what memory said is what the file says
    assert again.pin("demo.echo") == ("h2", "{}")
    assert again.frozen_until("alice") is None
