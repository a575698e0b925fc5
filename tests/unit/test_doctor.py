"""Unit tests for the pure parts of ``mcp-brokerctl doctor`` (``broker.admin.doctor``).

``Finding.line()``; ``Doctor.rules()`` derived from the layout table
(``broker.core.layout``) for a staged root under a temporary directory,
with the files found inside its directories and env files kept elsewhere;
``check_path()`` on files with the wrong owner, group, mode or type, a
symlink and missing paths; ``_sudoers_why()``, ``expected_rule()`` (each
agent's own gate user, from the gate-users map) and ``check_sudoers()`` on a
drop-in kept in the staged tree (for agents that do not exist, so ``sudo -l``
is never asked). Nothing here runs sudo, runuser or a daemon.
"""

from __future__ import annotations

import os
import stat

import pytest

from broker.admin import doctor
from broker.admin.doctor import Doctor, Finding, Rule, _sudoers_why
from broker.core import layout
from broker.core.paths import GATE_USER, Paths, gate_user_for
from tests.unit.conftest import NOBODY_UID, needs_root, write

#: the layout entries doctor checks with a rule of their own (commands and sudoers have their own checks)
CHECKED = [e for e in layout.PATHS if e.kind != "link" and e.attr != "sudoers"]


@pytest.fixture
def paths(tmp_root: str) -> Paths:
    return Paths(tmp_root)


@pytest.fixture
def doc(paths: Paths) -> Doctor:
    return Doctor(paths)


def findings(d: Doctor) -> list[tuple[str, str, str, str]]:
    return [(f.level, f.section, f.message, f.fix) for f in d.findings]


# --- Finding.line ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("finding", "line"),
    [
        (Finding("ok", "files", "all good"), "ok      files: all good"),
        (Finding("ok", "files", "all good", "never shown"), "ok      files: all good"),
        (
            Finding("warning", "daemon", "frozen", "mcp-brokerctl unfreeze x"),
            "WARNING daemon: frozen  -> fix: mcp-brokerctl unfreeze x",
        ),
        (
            Finding("problem", "users", "no user", "mcp-brokerctl install"),
            "PROBLEM users: no user  -> fix: mcp-brokerctl install",
        ),
        (Finding("problem", "config", "broken"), "PROBLEM config: broken"),
    ],
)
def test_finding_line(finding: Finding, line: str) -> None:
    assert finding.line() == line


def test_finding_tags_line_up() -> None:
    tags = [Finding(level, "s", "m").line().split(" s: ")[0] for level in ("ok", "warning", "problem")]
    assert {len(t) for t in tags} == {7}


def test_an_unknown_level_is_a_bug() -> None:
    with pytest.raises(KeyError):
        Finding("fatal", "s", "m").line()


def test_problems_are_only_problems(doc: Doctor) -> None:
    doc.ok("a", "fine")
    doc.warning("b", "hmm", "fix b")
    doc.problem("c", "bad", "fix c")
    assert [f.level for f in doc.findings] == ["ok", "warning", "problem"]
    assert doc.problems == [Finding("problem", "c", "bad", "fix c")]


# --- rules() from the layout table -------------------------------------------------------------------


def test_rules_cover_every_layout_path_but_commands_and_sudoers(doc: Doctor, paths: Paths) -> None:
    rules = doc.rules()  # nothing exists yet: no children, no config, no env files
    assert [r.path for r in rules] == [e.path(paths) for e in CHECKED]
    for rule, e in zip(rules, CHECKED, strict=True):
        assert (rule.kind, rule.owner, rule.group, rule.forbid, rule.need, rule.why, rule.mode) == (
            e.kind,
            e.owner,
            e.group,
            e.forbid,
            e.need,
            e.why,
            e.mode,
        )
        assert rule.path.startswith(paths.root + "/")
    assert paths.brokerd not in [r.path for r in rules] and paths.sudoers not in [r.path for r in rules]


def test_rules_for_what_is_inside_the_directories(doc: Doctor, paths: Paths) -> None:
    write(f"{paths.servers_d}/mail.toml", "")
    write(f"{paths.servers_d}/notes.txt", "")  # not a .toml: not read by the daemon, not checked
    write(f"{paths.servers_d}/.hidden.toml", "")  # ignored by the daemon too
    write(f"{paths.allowlist_d}/bob.txt", "")
    write(f"{paths.secrets}/demo.env", "")
    write(f"{paths.secrets}/.hidden", "")  # every name in secrets/ counts
    os.makedirs(f"{paths.secrets}/sub")
    write(f"{paths.state}/state.db", "")
    children = {r.path: r for r in doc.rules()[len(CHECKED) :]}
    assert set(children) == {
        f"{paths.servers_d}/mail.toml",
        f"{paths.allowlist_d}/bob.txt",
        f"{paths.secrets}/.hidden",
        f"{paths.secrets}/demo.env",
        f"{paths.secrets}/sub",
        f"{paths.state}/state.db",
    }
    toml = children[f"{paths.servers_d}/mail.toml"]
    assert (toml.kind, toml.owner, toml.group, toml.mode, toml.need) == ("any", "root", "mcp-broker", 0o640, 0o040)
    assert toml.forbid == 0o7777 & ~0o640
    secret = children[f"{paths.secrets}/demo.env"]
    assert (secret.owner, secret.group, secret.mode, secret.forbid) == ("root", None, 0o600, 0o7777 & ~0o600)
    sub = children[f"{paths.secrets}/sub"]
    assert sub.mode == 0o700 and sub.forbid == 0o7077  # a directory gets the execute bits its mode implies


def test_env_files_outside_the_secrets_directory_get_a_rule(doc: Doctor, paths: Paths, tmp_root: str) -> None:
    outside = write(f"{tmp_root}/elsewhere/demo.env", "TOKEN=abcdefgh\n", 0o600)
    inside = write(f"{paths.secrets}/mail.env", "PASS=abcdefgh\n", 0o600)
    write(
        paths.broker_toml,
        f'[servers.demo]\ncommand = "/bin/true"\nenv_file = "{outside}"\n'
        f'[servers.mail]\ncommand = "/bin/true"\nenv_file = "{inside}"\n',
        0o640,
    )
    rules = {r.path: r for r in doc.rules()}
    env = rules[outside]
    secret = layout.child("secrets")
    assert (env.kind, env.owner, env.group, env.forbid, env.need, env.mode) == (
        "file",
        secret.owner,
        None,
        secret.forbid,
        secret.need,
        secret.mode,
    )
    assert env.why == "env file of a server"
    assert rules[inside].why == "secret"  # inside secrets/: the directory's own rule covers it
    assert [r.path for r in doc.rules()].count(inside) == 1


def test_a_broken_config_adds_no_env_file_rules(doc: Doctor, paths: Paths) -> None:
    write(paths.broker_toml, "[servers.demo\n", 0o640)
    assert doc._env_files() == []
    assert len(doc.rules()) == len(CHECKED)


# --- check_path ---------------------------------------------------------------------------------------


def rule(
    path: str,
    kind: str = "file",
    owner: str = "root",
    group: str | None = "root",
    mode: int = 0o640,
    need: int = 0,
    made_by: str = "install",
) -> Rule:
    return Rule(path, kind, owner, group, 0o7777 & ~mode, need, "the thing", mode, made_by)


@needs_root
def test_a_path_as_its_rule_says_is_fine(doc: Doctor, tmp_root: str) -> None:
    path = write(f"{tmp_root}/f", "x", 0o640)
    os.chown(path, 0, 0)
    assert doc.check_path(rule(path, need=0o040))
    assert doc.findings == []
    os.mkdir(f"{tmp_root}/d", 0o750)
    os.chmod(f"{tmp_root}/d", 0o750)
    assert doc.check_path(rule(f"{tmp_root}/d", kind="dir", mode=0o750))
    assert doc.check_path(rule(path, kind="any", group=None))
    assert doc.findings == []


def test_a_missing_path_is_a_problem_with_the_install_fix(doc: Doctor, tmp_root: str) -> None:
    assert not doc.check_path(rule(f"{tmp_root}/missing"))
    assert findings(doc) == [
        ("problem", "files", f"{tmp_root}/missing (the thing) is missing", "mcp-brokerctl install"),
    ]


def test_missing_sockets_pidfile_and_audit_log_are_not_problems(doc: Doctor, paths: Paths) -> None:
    """What the daemon makes (by the layout table) is missing while it never ran: no problem of the files."""
    assert doc.check_path(rule(paths.gate_sock, kind="sock", made_by="daemon"))
    assert doc.check_path(rule(paths.pidfile, made_by="daemon"))
    assert doc.check_path(rule(paths.audit_key, made_by="daemon"))
    assert doc.findings == []
    assert not doc.check_path(rule(f"{paths.etc}/missing-install-file"))  # what install makes is a problem
    doc.findings.clear()
    assert doc.check_path(rule(paths.audit_log, made_by="daemon"))
    assert findings(doc) == [
        ("warning", "files", f"{paths.audit_log} does not exist yet (written on the first decision)", ""),
    ]


def test_a_path_that_cannot_be_looked_at_is_a_problem(doc: Doctor, tmp_root: str) -> None:
    write(f"{tmp_root}/file", "x")
    assert not doc.check_path(rule(f"{tmp_root}/file/below"))
    assert findings(doc) == [("problem", "files", f"{tmp_root}/file/below: Not a directory", "")]


def test_a_symlink_is_a_problem_even_to_a_good_file(doc: Doctor, tmp_root: str) -> None:
    target = write(f"{tmp_root}/real", "x", 0o640)
    os.symlink(target, f"{tmp_root}/link")
    assert not doc.check_path(rule(f"{tmp_root}/link"))
    assert findings(doc) == [
        (
            "problem",
            "files",
            f"{tmp_root}/link (the thing) is a symlink",
            f"replace it with a real file: rm {tmp_root}/link",
        ),
    ]


@pytest.mark.parametrize(("kind", "make"), [("dir", "file"), ("file", "dir"), ("sock", "file")])
def test_the_wrong_type_is_a_problem(doc: Doctor, tmp_root: str, kind: str, make: str) -> None:
    path = f"{tmp_root}/thing"
    if make == "file":
        write(path, "x")
    else:
        os.mkdir(path)
    assert not doc.check_path(rule(path, kind=kind))
    ((level, _section, message, fix),) = findings(doc)
    assert level == "problem" and message == f"{path} (the thing) is not a {kind}"
    assert fix == f"remove it and re-run install: {path}"


@needs_root
def test_the_wrong_owner_is_a_problem_with_the_chown_fix(doc: Doctor, tmp_root: str) -> None:
    path = write(f"{tmp_root}/f", "x", 0o640)
    os.chown(path, NOBODY_UID, 0)
    assert not doc.check_path(rule(path))
    ((level, _section, message, fix),) = findings(doc)
    owner = doctor._name_of_uid(NOBODY_UID)
    assert level == "problem"
    assert message == f"{path} (the thing) is owned by {owner}:root, expected root:root"
    assert fix == f"chown root:root {path}"


@needs_root
def test_the_wrong_group_is_a_problem(doc: Doctor, tmp_root: str) -> None:
    if doctor._gid(GATE_USER) is None:
        pytest.skip(f"no group {GATE_USER} on this machine")
    path = write(f"{tmp_root}/f", "x", 0o640)
    os.chown(path, 0, 0)
    assert not doc.check_path(rule(path, group=GATE_USER))
    ((_level, _section, message, fix),) = findings(doc)
    assert message.endswith(f"is owned by root:root, expected root:{GATE_USER}")
    assert fix == f"chown root:{GATE_USER} {path}"


def test_an_owner_that_does_not_exist_is_a_problem(doc: Doctor, tmp_root: str) -> None:
    path = write(f"{tmp_root}/f", "x", 0o640)
    assert not doc.check_path(rule(path, owner="no-such-user-xyz", group=None))
    ((_level, _section, message, fix),) = findings(doc)
    assert message.endswith("expected no-such-user-xyz") and fix == f"chown no-such-user-xyz {path}"


@needs_root
@pytest.mark.parametrize(
    ("mode", "want", "need", "words"),
    [
        (0o666, 0o640, 0, "writable by group/other, readable by other"),
        (0o660, 0o640, 0, "writable by group"),
        (0o642, 0o640, 0, "writable by other"),
        (0o644, 0o640, 0, "readable by other"),
        (0o604, 0o600, 0, "readable by other"),
        (0o640, 0o600, 0, "readable by group"),
        (0o740, 0o640, 0, "has extra permission bits"),
        (0o641, 0o640, 0, "has extra permission bits"),
        (0o600, 0o640, 0o040, "lacks needed permission bits"),
        (0o604, 0o640, 0o040, "readable by other, lacks needed permission bits"),
    ],
)
def test_a_wrong_mode_is_explained_with_the_chmod_fix(
    doc: Doctor, tmp_root: str, mode: int, want: int, need: int, words: str
) -> None:
    path = write(f"{tmp_root}/f", "x", mode)
    os.chown(path, 0, 0)
    assert not doc.check_path(rule(path, mode=want, need=need))
    assert findings(doc) == [
        ("problem", "files", f"{path} (the thing) has mode {mode:04o}: {words}", f"chmod {want:04o} {path}"),
    ]


@needs_root
def test_without_a_mode_the_fix_clears_and_sets_only_what_is_wrong(doc: Doctor, tmp_root: str) -> None:
    path = write(f"{tmp_root}/f", "x", 0o606)
    os.chown(path, 0, 0)
    loose = Rule(path, "file", "root", "root", forbid=0o007, need=0o040, why="the thing", mode=None)
    assert not doc.check_path(loose)
    ((_level, _section, _message, fix),) = findings(doc)
    assert fix == f"chmod 0640 {path}"  # other bits cleared, group read added, the rest kept


@needs_root
def test_owner_and_mode_problems_are_both_reported(doc: Doctor, tmp_root: str) -> None:
    path = write(f"{tmp_root}/f", "x", 0o666)
    os.chown(path, NOBODY_UID, 0)
    assert not doc.check_path(rule(path))
    assert [f.fix.split()[0] for f in doc.findings] == ["chown", "chmod"]


# A forbidden setuid, setgid or sticky bit is named (the message used to read "... has mode 4755: " and end).
@needs_root
def test_a_setuid_bit_is_named(doc: Doctor, tmp_root: str) -> None:
    path = write(f"{tmp_root}/gate", "#!/bin/sh\n", 0o755)
    os.chown(path, 0, 0)
    os.chmod(path, 0o4755)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o4755
    assert not doc.check_path(rule(path, group=None, mode=0o755))
    ((_level, _section, message, _fix),) = findings(doc)
    assert not message.endswith(": "), message


# --- sudoers ---------------------------------------------------------------------------------------------


def test_expected_rule_names_the_gate_of_the_staged_root(paths: Paths, doc: Doctor) -> None:
    """Without a map line, each agent's rule runs the gate as its default gate user, mcp-gate-AGENT."""
    assert doc.expected_rule("moltbot") == (
        f"moltbot ALL=(mcp-gate-moltbot) NOPASSWD: {paths.root}/usr/local/sbin/mcp-gate"
    )
    assert doc.expected_rule("openclaw") == (
        f"openclaw ALL=(mcp-gate-openclaw) NOPASSWD: {paths.root}/usr/local/sbin/mcp-gate"
    )
    assert Doctor(Paths("/")).expected_rule("bot") == "bot ALL=(mcp-gate-bot) NOPASSWD: /usr/local/sbin/mcp-gate"
    assert f"({GATE_USER})" not in doc.expected_rule("moltbot")  # never the first version's shared user


def test_expected_rule_for_a_long_agent_name_uses_the_cut_gate_user(doc: Doctor) -> None:
    agent = "a-very-long-agent-name-over-the-limit"
    gate = gate_user_for(agent)
    assert len(gate) <= 32 and gate.startswith("mcp-gate-a-very") and gate != f"mcp-gate-{agent}"
    assert doc.expected_rule(agent).startswith(f"{agent} ALL=({gate}) NOPASSWD: ")


@needs_root
def test_expected_rule_follows_the_gate_users_map(paths: Paths, doc: Doctor) -> None:
    write(paths.gate_users, "# agents\nmoltbot mcp-gate-custom\nopenclaw mcp-gate-claw  # trailing\n", 0o640)
    gate = f"{paths.root}/usr/local/sbin/mcp-gate"
    assert doc.gate_user("moltbot") == "mcp-gate-custom"
    assert doc.expected_rule("moltbot") == f"moltbot ALL=(mcp-gate-custom) NOPASSWD: {gate}"
    assert doc.expected_rule("openclaw") == f"openclaw ALL=(mcp-gate-claw) NOPASSWD: {gate}"
    assert doc.expected_rule("other") == f"other ALL=(mcp-gate-other) NOPASSWD: {gate}"  # not in the map


@needs_root
@pytest.mark.parametrize(
    ("text", "mode"),
    [("moltbot mcp-gate-custom extra\n", 0o640), ("moltbot mcp-gate-custom\n", 0o666)],
    ids=["bad line", "writable by others"],
)
def test_expected_rule_with_an_unusable_map_falls_back_to_the_default(
    paths: Paths, doc: Doctor, text: str, mode: int
) -> None:
    write(paths.gate_users, text, mode)
    assert doc.gate_user("moltbot") == "mcp-gate-moltbot"
    assert "(mcp-gate-moltbot)" in doc.expected_rule("moltbot")


class StagedSudoers(Paths):
    """A staged root whose sudoers drop-in lies in the staged tree too (never under the real /etc/sudoers.d)."""

    @property
    def sudoers(self) -> str:
        return f"{self.root}/sudoers-drop-in"


#: agents that exist nowhere: check_sudoers reports them missing and never runs 'sudo -l -U' for them
GHOST, GHOST2 = "mcpunit-ghost1", "mcpunit-ghost2"


def _sudoers_findings(tmp_root: str, lines: list[str]) -> list[tuple[str, str, str, str]]:
    if doctor.shutil.which("visudo") is None and not os.path.exists("/usr/sbin/visudo"):
        pytest.skip("visudo is not installed")
    paths = StagedSudoers(tmp_root)
    text = "".join(line.replace("@GATE@", paths.gate) + "\n" for line in lines)
    path = write(paths.sudoers, text, 0o440)
    os.chown(path, 0, 0)
    d = Doctor(paths)
    assert d.check_sudoers() == []  # none of these agents exists
    return [f for f in findings(d) if "does not exist" not in f[2]]


@needs_root
def test_check_sudoers_accepts_each_agent_s_own_gate_user(tmp_root: str) -> None:
    found = _sudoers_findings(
        tmp_root,
        [
            f"# mcp-privsep agent: {GHOST}",
            f"{GHOST} ALL=(mcp-gate-{GHOST}) NOPASSWD: @GATE@",
            f"# mcp-privsep agent: {GHOST2}",
            f"{GHOST2}  ALL=(mcp-gate-{GHOST2})  NOPASSWD: @GATE@",
        ],
    )
    assert [f for f in found if f[0] == "problem"] == []


@needs_root
def test_check_sudoers_calls_the_shared_gate_user_half_migrated(tmp_root: str) -> None:
    found = _sudoers_findings(tmp_root, [f"# mcp-privsep agent: {GHOST}", f"{GHOST} ALL=(mcp-gate) NOPASSWD: @GATE@"])
    problems = [f for f in found if f[0] == "problem"]
    assert any(
        "half migrated" in f[2] and f"{GHOST} still runs the gate as the shared user mcp-gate" in f[2] for f in problems
    )
    assert any(f"agent {GHOST} has a marker but not the exact rule" in f[2] for f in problems)
    assert all("mcp-brokerctl install" in f[3] for f in problems)


@needs_root
def test_check_sudoers_refuses_another_agent_s_gate_user(tmp_root: str) -> None:
    """An agent running the gate as another agent's gate user would call as that agent: not the expected rule."""
    found = _sudoers_findings(
        tmp_root,
        [
            f"# mcp-privsep agent: {GHOST}",
            f"{GHOST} ALL=(mcp-gate-{GHOST2}) NOPASSWD: @GATE@",
        ],
    )
    problems = [f for f in found if f[0] == "problem"]
    assert any(f"not the one expected rule: {GHOST} ALL=(mcp-gate-{GHOST2})" in f[2] for f in problems), problems
    assert not any("half migrated" in f[2] for f in problems)
    assert any(f"agent {GHOST} has a marker but not the exact rule" in f[2] for f in problems)


@pytest.mark.parametrize(
    ("line", "why"),
    [
        ("bot ALL=(mcp-gate) NOPASSWD: /usr/local/sbin/mcp-gate *", "a wildcard"),
        ("bot ALL=(mcp-gate) NOPASSWD: /usr/local/sbin/mcp-gate list?", "a wildcard"),
        ("bot ALL=(mcp-gate) NOPASSWD: /usr/local/sbin/mcp-gate [a]", "a wildcard"),
        ("bot ALL=(mcp-gate) NOPASSWD:SETENV: /usr/local/sbin/mcp-gate", "changes the environment"),
        ('Defaults:bot env_keep += "PYTHONPATH"', "changes the environment"),
        ("Defaults:bot !env_reset", "changes the environment"),
        ("Defaults:bot !requiretty", "a Defaults line"),
        ("defaults lecture=never", "a Defaults line"),
        ("#include /etc/other", "an include"),
        ("@includedir /etc/sudoers.more", "an include"),
        ("bot ALL=(ALL) NOPASSWD: /usr/local/sbin/mcp-gate", "grants ALL"),
        ("bot ALL=(root) ALL", "grants ALL"),
        ("bot ALL=(mcp-gate) NOPASSWD: /usr/bin/python3", "not the one expected rule"),
        ("bot ALL=(mcp-gate) /usr/local/sbin/mcp-gate", "not the one expected rule"),
    ],
)
def test_sudoers_why(line: str, why: str) -> None:
    assert _sudoers_why(line).startswith(why)


def test_sudoers_why_explains_the_danger() -> None:
    assert "the gate must be the only judge" in _sudoers_why("bot ALL=(mcp-gate) /x/mcp-gate *")
    assert "SETENV/env_keep/env_reset" in _sudoers_why("bot ALL=(mcp-gate) SETENV: /x/mcp-gate")
