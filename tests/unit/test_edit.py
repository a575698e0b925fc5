"""Unit tests for ``mcp-brokerctl edit`` (:mod:`broker.admin.edit`) and the daemon's policy read on the next call.

The edit flow runs the real command (``broker.admin.cli.main``) with
``$EDITOR`` a small script that appends to the copy it is given: a good edit
is installed atomically with the layout's owner and mode; a broken
allowlist, a broken policy and a TOML syntax error are refused with
``file:line:col: message`` and never installed (off a terminal: exit 1); on
a terminal "edit again" keeps the copy and "abandon" installs nothing; an
unchanged copy installs nothing; a problem that was there before elsewhere
is noted, one the edit brings elsewhere refuses it. Applying: an allowlist
and a policy need nothing, a changed server definition reloads.

The daemon's part (:class:`broker.daemon.config.OnDisk`,
:func:`~broker.daemon.config.with_policy`, :func:`~broker.daemon.config.differences`,
``Broker.policy_now``): the files are re-read only when their stat key moves,
policy is taken at once, server definitions are listed as waiting for a
reload, and a broken file refuses calls with its place until it is fixed.

The file tests need root (they chown to the layout's owner, patched to
root and a group of the test's choosing).
"""

from __future__ import annotations

import os
import stat
import types
from collections.abc import Iterator
from typing import Any

import pytest

from broker.admin import cli, edit
from broker.core import layout, tomlpos
from broker.core.errors import ConfigError, PrivsepError, Unavailable
from broker.core.paths import Paths
from broker.daemon import config, service
from tests.unit.conftest import needs_root, write

#: a group other than root's, so the installed group shows it was set
GROUP = 65534

BROKER_TOML = """\
[broker]
call_timeout = 10

[servers.demo]
command = "/usr/bin/python3"
args = ["-m", "mcp_servers.demo"]
"""

ALLOWLIST = "# test\ndemo.echo\n"


@pytest.fixture
def tree(tmp_root: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """A config tree under a temporary root; files installed as root:GROUP with the layout's mode."""
    paths = Paths(tmp_root)
    for directory in (paths.servers_d, paths.allowlist_d, paths.secrets):
        os.makedirs(directory, mode=0o755)
    write(paths.broker_toml, BROKER_TOML, 0o640)
    write(paths.allowlist, ALLOWLIST, 0o640)
    monkeypatch.setattr(edit, "owner_ids", lambda entry: (0, GROUP, entry.mode))
    monkeypatch.setattr(edit, "_must_be_root", lambda: None)
    monkeypatch.setattr(edit, "_admin_for", lambda _paths: _no_broker)
    yield paths


def _no_broker(op: str, **_fields: Any) -> Any:
    raise Unavailable("broker unavailable: cannot connect to the broker")


@pytest.fixture
def editor(tmp_root: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """$EDITOR: a script that appends $EDIT_APPEND to the file it is given (printf escapes)."""
    script = write(f"{tmp_root}/editor.sh", '#!/bin/sh\nprintf "$EDIT_APPEND" >> "$1"\n', 0o755)
    monkeypatch.setenv("EDITOR", script)
    monkeypatch.delenv("VISUAL", raising=False)
    yield script


def run(*argv: str, root: str, append: str, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setenv("EDIT_APPEND", append)
    return cli.main(["--root", root, "edit", *argv])


def ident(path: str) -> tuple[int, int, bytes]:
    st = os.stat(path)
    with open(path, "rb") as fh:
        return st.st_ino, st.st_mtime_ns, fh.read()


# --- the flow -----------------------------------------------------------------------------------


@needs_root
def test_a_good_allowlist_edit_is_installed_atomically_with_owner_and_mode(
    tree: Paths, editor: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    os.chmod(tree.allowlist, 0o644)  # a wrong mode is repaired, and said so
    assert run(root=tree.root, append="demo.add\n", monkeypatch=monkeypatch) == 0
    with open(tree.allowlist) as fh:
        assert fh.read() == ALLOWLIST + "demo.add\n"
    st = os.stat(tree.allowlist)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, GROUP, 0o640)
    out = capsys.readouterr()
    assert f"edit: installed {tree.allowlist}" in out.out
    assert "read it on the next call" in out.out
    assert "repaired" in out.err
    assert [n for n in os.listdir(tree.etc) if n.endswith(".tmp")] == []  # no temporary file left


@needs_root
def test_a_broken_allowlist_is_refused_with_file_line_col_and_never_installed(
    tree: Paths, editor: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = ident(tree.allowlist)
    assert run(root=tree.root, append="bad line here\n", monkeypatch=monkeypatch) == 1
    err = capsys.readouterr().err
    assert f"{tree.allowlist}:3:5: unexpected text after the entry" in err
    assert "abandoned, nothing installed" in err
    assert ident(tree.allowlist) == before  # the same inode, the same bytes


@needs_root
def test_a_broken_policy_is_refused_at_its_line_and_never_installed(
    tree: Paths, editor: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = ident(tree.broker_toml)
    code = run("config", root=tree.root, append='\n[policy."demo.echo"]\nmode = "sometimes"\n', monkeypatch=monkeypatch)
    assert code == 1
    err = capsys.readouterr().err
    assert f"{tree.broker_toml}:9:1: policy.demo.echo.mode: Input should be 'allow', 'notify' or 'approve'" in err
    assert ident(tree.broker_toml) == before


@needs_root
def test_a_toml_syntax_error_is_refused_at_its_line_and_column(
    tree: Paths, editor: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = ident(tree.broker_toml)
    assert run("config", root=tree.root, append='\n[policy."demo.echo"\n', monkeypatch=monkeypatch) == 1
    assert f"{tree.broker_toml}:8:20: Expected ']'" in capsys.readouterr().err
    assert ident(tree.broker_toml) == before


@needs_root
def test_bad_utf8_is_refused_at_its_byte(
    tree: Paths, editor: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert run("config", root=tree.root, append="# caf\\351\n", monkeypatch=monkeypatch) == 1
    assert f"{tree.broker_toml}:7:6: not valid UTF-8" in capsys.readouterr().err


@needs_root
def test_a_good_policy_edit_is_installed_root_broker_0640(
    tree: Paths, editor: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    append = '\n[policy."demo.echo"]\nmode = "approve"\n'
    assert run("config", root=tree.root, append=append, monkeypatch=monkeypatch) == 0
    assert config.load(tree).policy["demo.echo"].mode == "approve"
    st = os.stat(tree.broker_toml)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, GROUP, 0o640)
    assert "it reads the new config when it starts" in capsys.readouterr().out


@needs_root
def test_an_unchanged_copy_installs_nothing(
    tree: Paths, editor: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    before = ident(tree.broker_toml)
    assert run("config", root=tree.root, append="", monkeypatch=monkeypatch) == 0
    assert "no changes; nothing installed" in capsys.readouterr().out
    assert ident(tree.broker_toml) == before


@needs_root
def test_on_a_terminal_edit_again_keeps_the_copy_and_abandon_installs_nothing(
    tree: Paths, tmp_root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # the first run breaks the policy; the second (after "e") fixes that very copy
    script = write(
        f"{tmp_root}/twice.sh",
        '#!/bin/sh\nif grep -q sometimes "$1"; then sed -i s/sometimes/approve/ "$1"; '
        'else printf \'[policy."demo.echo"]\\nmode = "sometimes"\\n\' >> "$1"; fi\n',
        0o755,
    )
    target = edit.target(tree, "config", None)
    asked: list[str] = []

    def again() -> str:
        asked.append("e")
        return "e"

    done = edit.session(tree, target, [script], again, lambda _line: None)
    assert done.installed and asked == ["e"]
    assert config.load(tree).policy["demo.echo"].mode == "approve"
    assert "policy.demo.echo.mode" in capsys.readouterr().err  # shown before it was asked

    before = ident(tree.broker_toml)
    breaks = write(f"{tmp_root}/breaks.sh", '#!/bin/sh\nprintf "[broker]\\nbogus = 1\\n" >> "$1"\n', 0o755)
    with pytest.raises(PrivsepError) as info:
        edit.session(tree, target, [breaks], lambda: "a", lambda _line: None)
    assert info.value.exit_code == 1 and "abandoned, nothing installed" in info.value.message
    assert ident(tree.broker_toml) == before


@needs_root
def test_a_file_changed_by_hand_during_the_edit_is_not_overwritten(tree: Paths, tmp_root: str) -> None:
    sneaky = write(
        f"{tmp_root}/sneaky.sh", f'#!/bin/sh\necho "demo.add" >> "$1"\necho x.y >> {tree.allowlist}\n', 0o755
    )
    with pytest.raises(PrivsepError) as info:
        edit.session(tree, edit.target(tree, "allowlist", None), [sneaky], None, lambda _line: None)
    assert info.value.exit_code == 75 and "changed on disk during the edit" in info.value.message
    with open(tree.allowlist) as fh:
        assert fh.read() == ALLOWLIST + "x.y\n"


@needs_root
def test_an_editor_that_fails_installs_nothing(tree: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDITOR", "/bin/false")
    before = ident(tree.allowlist)
    assert cli.main(["--root", tree.root, "edit"]) == 1
    assert ident(tree.allowlist) == before


@needs_root
def test_server_edit_finds_the_defining_file_or_creates_servers_d_name(
    tree: Paths, editor: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert edit.target(tree, "server", "demo").path == tree.broker_toml
    assert edit.target(tree, "server", "demo").entry == layout.entry("broker_toml")
    new = edit.target(tree, "server", "extra")
    assert new.path == f"{tree.servers_d}/extra.toml" and new.entry == layout.child("servers_d")
    assert run("server", "extra", root=tree.root, append='command = "/bin/true"\n', monkeypatch=monkeypatch) == 0
    assert config.load(tree).servers["extra"].spec.command == "/bin/true"
    st = os.stat(new.path)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, GROUP, 0o640)
    assert f"edit: created {new.path}" in capsys.readouterr().out
    # a file that does not parse still names its server
    write(f"{tree.servers_d}/broken.toml", '[servers.broken]\ncommand = "/bin/true"\nx = \n', 0o640)
    assert edit.target(tree, "server", "broken").path == f"{tree.servers_d}/broken.toml"


@needs_root
def test_a_problem_the_edit_brings_elsewhere_refuses_it_one_from_before_is_noted(
    tree: Paths, editor: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # a second definition of demo: the problem is reported against the later file, the one edited
    code = run(
        "server", "two", root=tree.root, append='[servers.demo]\ncommand = "/bin/true"\n', monkeypatch=monkeypatch
    )
    assert code == 1
    err = capsys.readouterr().err
    assert f"{tree.servers_d}/two.toml:8:1: servers.demo: already defined in {tree.broker_toml}" in err
    assert not os.path.exists(f"{tree.servers_d}/two.toml")
    # broken before, elsewhere: noted, and the edit of broker.toml goes in
    write(f"{tree.servers_d}/old.toml", '[servers.old]\ncommand = "relative"\n', 0o640)
    assert run("config", root=tree.root, append="\n[limits.agent]\nmax_sessions = 2\n", monkeypatch=monkeypatch) == 0
    err = capsys.readouterr().err
    assert f"note: already a problem before this edit: {tree.servers_d}/old.toml:2:1: servers.old.command" in err


def test_usage_errors() -> None:
    paths = Paths("/nonexistent-root")
    for what, name in (("server", None), ("server", "a.b"), ("config", "x"), ("allowlist", "bad name")):
        with pytest.raises(PrivsepError) as info:
            edit.target(paths, what, name)
        assert info.value.exit_code == 64, (what, name)
    with pytest.raises(PrivsepError) as info:
        edit.target(paths, "allowlist", "no-such-user-xyz")
    assert info.value.exit_code == 67


def test_the_editor_is_editor_then_visual_then_editor_or_vi(monkeypatch: pytest.MonkeyPatch) -> None:
    assert edit.editor_command({"EDITOR": "vim -u NONE", "VISUAL": "emacs"}) == ["vim", "-u", "NONE"]
    assert edit.editor_command({"EDITOR": " ", "VISUAL": "nano"}) == ["nano"]
    monkeypatch.setattr(edit.shutil, "which", lambda name: f"/usr/bin/{name}" if name == "vi" else None)
    assert edit.editor_command({}) == ["/usr/bin/vi"]


def test_help_says_what_it_does() -> None:
    text = edit.edit.help or ""
    for words in ("$EDITOR", "$VISUAL", "file:line:col", "edit again or abandon", "next call", "reloads"):
        assert words in text, words


# --- applying -----------------------------------------------------------------------------------


def _edited(kind: str) -> edit.Edited:
    entry = layout.entry("allowlist" if kind == "allowlist" else "broker_toml")
    return edit.Edited(edit.Target(kind, "/etc/x", entry, "", "/etc"), installed=True)  # type: ignore[arg-type]


def test_apply_needs_nothing_for_an_allowlist_or_policy_and_reloads_for_servers(
    monkeypatch: pytest.MonkeyPatch, tmp_root: str
) -> None:
    asked: list[str] = []
    said: list[str] = []

    def admin(answer: dict[str, Any]) -> Any:
        def call(op: str, **_fields: Any) -> Any:
            asked.append(op)
            return answer if op == "status" else {"added": [], "removed": [], "restarted": ["demo"]}

        return call

    monkeypatch.setattr("broker.admin.install.install_servers", lambda *_a: None)
    paths = Paths(tmp_root)
    edit.apply(paths, _edited("allowlist"), admin({}), said.append)
    assert asked == [] and "next call" in said[-1]
    edit.apply(paths, _edited("config"), admin({"config": {"error": None, "stale": []}}), said.append)
    assert asked == ["status"] and "policy applies from the next call" in said[-1]
    asked.clear()
    stale = {"config": {"error": None, "stale": [{"file": "/etc/s.toml", "what": "servers.demo changed"}]}}
    edit.apply(paths, _edited("server"), admin(stale), said.append)
    assert asked == ["status", "reload"] and "restarted ['demo']" in said[-1]
    asked.clear()
    edit.apply(paths, _edited("config"), admin({"broker": "up"}), said.append)  # a broker without live policy
    assert asked == ["status", "reload"]
    with pytest.raises(ConfigError):
        edit.apply(paths, _edited("config"), admin({"config": {"error": "x: broken", "stale": []}}), said.append)


# --- where a problem is ------------------------------------------------------------------------


def test_key_paths_are_found_at_their_line() -> None:
    text = (
        "# c\n[broker]\nnotify_command = [\n  \"/bin/x\", # c\n]\ns = '''\n[fake]\n'''\n"
        '[servers.demo]\nenv = { A = "b" }\n[policy."demo.echo".args.text]\nmax_length = 3\n'
    )
    assert tomlpos.find(text, "broker.notify_command.0") == (3, 1)
    assert tomlpos.find(text, "servers.demo.env.A") == (10, 9)
    assert tomlpos.find(text, "policy.demo.echo.args.text.max_length") == (12, 1)
    assert tomlpos.find(text, "policy") == (11, 1)  # no [policy] table: its first key
    assert tomlpos.find(text, "fake") is None  # inside a string
    read = {"/f": text.encode()}.get
    assert tomlpos.locate("/f: broker.bogus: unknown", ["/f"], read) == "/f:2:1: broker.bogus: unknown"
    assert tomlpos.locate("/f: Invalid (at line 3, column 5)", ["/f"], read) == "/f:3:5: Invalid"
    assert tomlpos.locate("/g: anything", ["/f"], read) == "/g: anything"


# --- the daemon: policy on the next call --------------------------------------------------------


def _broker(paths: Paths) -> Any:
    """What Broker.policy_now needs of a Broker: its paths, config and the on-disk state."""
    fake = types.SimpleNamespace(
        paths=paths, cfg=config.load(paths), on_disk=config.OnDisk(paths), _disk_key=None, disk_problem=None
    )
    fake.disk_stale = []
    return fake


def _now(fake: Any) -> ConfigError | None:
    return service.Broker.policy_now(fake)


def test_policy_is_read_again_only_when_the_files_change(tree: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = _broker(tree)
    loads: list[int] = []
    real = config.load
    monkeypatch.setattr(config, "load", lambda p: loads.append(1) or real(p))
    running = fake.cfg.servers["demo"]
    assert _now(fake) is None and len(loads) == 1  # the first request reads them once
    for _ in range(5):
        assert _now(fake) is None
    assert len(loads) == 1  # unchanged: stats only
    write(tree.broker_toml, BROKER_TOML + '[policy."demo.echo"]\nmode = "approve"\n[limits.a]\nmax_sessions = 3\n')
    assert _now(fake) is None and len(loads) == 2
    assert fake.cfg.policy["demo.echo"].mode == "approve" and fake.cfg.quota("a").sessions == 3
    assert fake.cfg.servers["demo"] is running and fake.disk_stale == []  # the same running server


def test_process_settings_and_servers_wait_for_a_reload_and_are_listed(tree: Paths) -> None:
    fake = _broker(tree)
    _now(fake)
    write(
        tree.broker_toml,
        BROKER_TOML.replace("call_timeout = 10", 'call_timeout = 5\nconnect_timeout = 3\npin = "first-use"')
        + 'pin = "review"\n',
    )
    write(f"{tree.servers_d}/extra.toml", '[servers.extra]\ncommand = "/bin/true"\n')
    assert _now(fake) is None
    assert fake.cfg.settings.call_timeout == 5 and fake.cfg.settings.pin == "first-use"  # policy: at once
    assert fake.cfg.settings.connect_timeout == 20  # a process setting: the running one
    assert fake.cfg.servers["demo"].spec.pin == "review"  # a server's pin is policy too
    assert "extra" not in fake.cfg.servers
    assert fake.disk_stale == [
        {"file": f"{tree.servers_d}/extra.toml", "what": "servers.extra added"},
        {"file": tree.broker_toml, "what": "[broker] connect_timeout changed"},
    ]


def test_a_broken_file_refuses_every_call_with_its_place_until_fixed(
    tree: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _broker(tree)
    _now(fake)
    bad = f"{tree.servers_d}/bad.toml"
    write(bad, '[policy."demo.echo"]\nmode = "sometimes"\n')
    problem = _now(fake)
    assert problem is not None and problem.exit_code == 78
    assert problem.message.startswith(f"{bad}:2:1: policy.demo.echo.mode: Input should be")
    refusal = service._refusal(problem)
    assert refusal.exit_code == 78 and bad in refusal.message and "every call is refused" in refusal.message
    monkeypatch.setattr(config, "load", lambda _p: pytest.fail("a broken file is read once per change"))
    assert _now(fake) is problem
    monkeypatch.undo()
    write(bad, '[policy."demo.echo"]\nmode = "notify"\n')
    assert _now(fake) is None and fake.disk_problem is None
    assert fake.cfg.policy["demo.echo"].mode == "notify"
    os.unlink(bad)
    assert _now(fake) is None and "demo.echo" not in fake.cfg.policy  # a removed file: its policy is gone


def test_the_gate_ops_a_broken_config_leaves_open() -> None:
    assert frozenset({"status", "report"}) == service._OPEN_WHEN_BROKEN
    assert {"list", "describe", "call", "catalog", "watch"}.isdisjoint(service._OPEN_WHEN_BROKEN)


def test_status_lines_say_what_is_broken_or_waits_for_a_reload() -> None:
    assert cli.config_lines(None) == []
    assert cli.config_lines({"error": None, "stale": []}) == []
    lines = cli.config_lines(
        {"error": "/e/broker.toml:3:1: x", "stale": [{"file": "/e/servers.d/x.toml", "what": "servers.x changed"}]}
    )
    assert "every call is refused (exit 78): /e/broker.toml:3:1: x" in lines[0]
    assert lines[1] == "config changed on disk: /e/servers.d/x.toml (servers.x changed); run mcp-brokerctl reload"


def test_doctor_warns_when_server_definitions_on_disk_wait_for_a_reload(tmp_root: str) -> None:
    from broker.admin.doctor import Doctor

    stale = [{"file": "/e/servers.d/x.toml", "what": "servers.x changed"}]

    def admin(op: str, **_fields: Any) -> Any:
        if op == "status":
            return {"broker": "up", "pid": 0, "audit": "ok", "servers": [], "host": {}, "config": {"stale": stale}}
        return []

    doctor = Doctor(Paths(tmp_root), admin=admin)
    doctor.check_daemon()
    found = [(f.level, f.message, f.fix) for f in doctor.findings if f.section == "config"]
    assert found == [
        (
            "warning",
            "config changed on disk: /e/servers.d/x.toml: servers.x changed; the broker runs the old one",
            "mcp-brokerctl reload",
        )
    ]
