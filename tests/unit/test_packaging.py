"""Static checks of the files operators install by hand: ``packaging/`` and ``etc/``.

These are the security-relevant examples and units the README points at:

* the sudoers template (``packaging/sudoers.in``), the rendered example
  (``etc/sudoers.d/mcp-privsep``) and what ``mcp-brokerctl install`` writes
  (``broker.install.sudoers_text``) must pass ``visudo -cf`` and grant exactly
  ``AGENT ALL=(mcp-gate-AGENT) NOPASSWD: /usr/local/sbin/mcp-gate``, each
  agent as its own gate user (never the first version's shared ``mcp-gate``,
  never another agent's): no SETENV, no env_keep, no Defaults, no wildcard,
  no ALL as the command;
* the systemd unit carries the hardening the README promises, and
  ``systemd-analyze verify`` accepts it when that tool works on the machine;
* the OpenRC script is valid shell and does not share its pid file with the
  daemon;
* ``etc/broker.toml`` loads with the daemon's own pydantic model, and
  ``etc/allowed-actions.txt`` parses with the gate's own allowlist parser.

Nothing here needs root, real users or a running daemon.
"""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from broker.admin import install
from broker.core import allowlist
from broker.core.paths import GATE_USER, Paths, gate_user_for
from broker.core.servers import parse_server
from broker.daemon.config import BrokerSettings, FileModel

ROOT = Path(__file__).resolve().parents[2]
PACKAGING = ROOT / "packaging"
ETC = ROOT / "etc"
SUDOERS_TEMPLATE = PACKAGING / "sudoers.in"
SUDOERS_EXAMPLE = ETC / "sudoers.d" / "mcp-privsep"
UNIT = PACKAGING / "mcp-brokerd.service"
OPENRC = PACKAGING / "mcp-brokerd.openrc"
BROKER_TOML = ETC / "broker.toml"
ALLOWLIST = ETC / "allowed-actions.txt"

GATE = "/usr/local/sbin/mcp-gate"
BROKERD = "/usr/local/sbin/mcp-brokerd"
AGENT = "moltbot"

# --- sudoers ------------------------------------------------------------------

RULE_RE = re.compile(
    r"^(?P<user>[a-z_][a-z0-9_.-]*)\s+ALL\s*=\s*\((?P<runas>[^)]*)\)\s*(?P<tags>(?:[A-Z_]+:\s*)*)(?P<cmd>.*)$"
)


def visudo() -> str:
    found = shutil.which("visudo") or next(
        (p for p in ("/usr/sbin/visudo", "/sbin/visudo") if os.access(p, os.X_OK)), None
    )
    if found is None:
        pytest.skip("visudo is not installed (apt-get install -y sudo): cannot syntax-check sudoers files")
    return found


def visudo_check(text: str, tmp_path: Path, name: str = "mcp-privsep") -> None:
    """``visudo -cf`` on ``text``; it checks syntax only, the users need not exist."""
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    path.chmod(0o440)
    proc = subprocess.run([visudo(), "-cf", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"visudo rejected:\n{text}\n{proc.stdout}{proc.stderr}"


def sudoers_rules(text: str) -> list[re.Match[str]]:
    """Every non-comment line, each required to be one plain agent rule."""
    rules = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        match = RULE_RE.match(stripped)
        assert match is not None, f"not a plain 'USER ALL=(GATE_USER) NOPASSWD: CMD' rule: {line!r}"
        rules.append(match)
    return rules


def assert_minimal_grant(text: str, agents: dict[str, str]) -> None:
    """Exactly one rule per agent: one absolute command, as that agent's own gate user, nothing else."""
    rules = sudoers_rules(text)
    assert [m["user"] for m in rules] == list(agents)
    assert len(set(agents.values())) == len(agents), "two agents share a gate user"
    for m in rules:
        assert m["runas"].strip() == agents[m["user"]], m.group(0)
        assert m["runas"].strip() != GATE_USER, f"the first version's shared gate user: {m.group(0)}"
        assert m["tags"].replace(" ", "") == "NOPASSWD:", f"only the NOPASSWD tag is allowed: {m.group(0)}"
        assert m["cmd"].strip() == GATE, f"the command must be exactly {GATE}: {m.group(0)}"
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        for bad in ("SETENV", "env_keep", "env_reset", "Defaults", "*", "!", ",", "\\", "sudoedit"):
            assert bad not in line, f"{bad!r} in sudoers line {line!r}"
        # ALL only as the host, never as the command or the run-as user
        assert line.count("ALL") <= 1, f"ALL beyond the host position: {line!r}"


def render_template(agent: str, gate_user: str | None = None) -> str:
    text = SUDOERS_TEMPLATE.read_text(encoding="utf-8")
    return text.replace("@GATE_USER@", gate_user or gate_user_for(agent)).replace("@AGENT@", agent)


def test_sudoers_template_has_one_placeholder_rule() -> None:
    text = SUDOERS_TEMPLATE.read_text(encoding="utf-8")
    assert text.startswith("#"), "the template starts with a comment header"
    assert f"@AGENT@ ALL=(@GATE_USER@) NOPASSWD: {GATE}\n" in text
    assert_minimal_grant(
        text.replace("@GATE_USER@", "mcp-gate-agent").replace("@AGENT@", "agent"), {"agent": "mcp-gate-agent"}
    )
    assert "/etc/mcp-privsep/gate-users" in text  # the by-hand install must write the map too


LONG_AGENT = "a-very-long-agent-name-over-the-limit"


@pytest.mark.parametrize("agent", [AGENT, "openclaw", "svc_agent-2", LONG_AGENT])
def test_sudoers_template_rendered_passes_visudo(agent: str, tmp_path: Path) -> None:
    text = render_template(agent)
    assert "@AGENT@" not in text and "@GATE_USER@" not in text
    assert_minimal_grant(text, {agent: gate_user_for(agent)})
    visudo_check(text, tmp_path)


def test_sudoers_template_keeps_the_install_marker() -> None:
    """'mcp-brokerctl install --agent' re-reads its marker lines to keep earlier agents."""
    text = render_template(AGENT)
    assert f"{install.SUDOERS_MARK}{AGENT}\n" in text
    assert install.sudoers_agents(str(SUDOERS_TEMPLATE)) == ["@AGENT@"]


def test_sudoers_example_passes_visudo_and_matches_template(tmp_path: Path) -> None:
    text = SUDOERS_EXAMPLE.read_text(encoding="utf-8")
    assert_minimal_grant(text, {AGENT: "mcp-gate-moltbot"})
    visudo_check(text, tmp_path)
    rendered = [m.group(0) for m in sudoers_rules(render_template(AGENT))]
    assert [m.group(0) for m in sudoers_rules(text)] == rendered
    assert install.sudoers_agents(str(SUDOERS_EXAMPLE)) == [AGENT]


def test_sudoers_example_name_is_read_by_sudo() -> None:
    """sudo skips drop-ins whose names contain a dot or end in '~'."""
    assert "." not in SUDOERS_EXAMPLE.name and not SUDOERS_EXAMPLE.name.endswith("~")


@pytest.mark.parametrize(
    "agents",
    [
        {AGENT: "mcp-gate-moltbot"},
        {AGENT: "mcp-gate-moltbot", "openclaw": "mcp-gate-openclaw"},
        {LONG_AGENT: gate_user_for(LONG_AGENT), "svc_agent-2": "mcp-gate-svc_agent-2"},
    ],
)
def test_install_sudoers_text_passes_visudo(agents: dict[str, str], tmp_path: Path) -> None:
    text = install.sudoers_text(Paths("/"), agents)
    assert_minimal_grant(text, agents)
    visudo_check(text, tmp_path)
    assert install.sudoers_agents(str(tmp_path / "mcp-privsep")) == list(agents)  # install reads its markers back


def test_install_sudoers_text_keeps_a_marker_above_each_rule() -> None:
    agents = {AGENT: "mcp-gate-moltbot", "openclaw": "mcp-gate-openclaw"}
    lines = install.sudoers_text(Paths("/"), agents).splitlines()
    for agent, gate in agents.items():
        i = lines.index(f"{install.SUDOERS_MARK}{agent}")
        assert lines[i + 1] == f"{agent} ALL=({gate}) NOPASSWD: {GATE}"


def test_sudoers_rule_is_the_one_contract_rule() -> None:
    assert install.sudoers_rule(Paths("/"), AGENT, "mcp-gate-moltbot") == (
        f"moltbot ALL=(mcp-gate-moltbot) NOPASSWD: {GATE}"
    )
    staged = Paths("/srv/stage")
    assert install.sudoers_rule(staged, "bot", "mcp-gate-bot") == f"bot ALL=(mcp-gate-bot) NOPASSWD: {staged.gate}"


@pytest.mark.parametrize("agent", [AGENT, LONG_AGENT])
def test_install_and_template_grant_the_same(agent: str) -> None:
    generated = [m.group(0) for m in sudoers_rules(install.sudoers_text(Paths("/"), {agent: gate_user_for(agent)}))]
    assert generated == [m.group(0) for m in sudoers_rules(render_template(agent))]


def test_the_example_is_the_template_rendered_for_moltbot() -> None:
    example = [m.group(0) for m in sudoers_rules(SUDOERS_EXAMPLE.read_text(encoding="utf-8"))]
    assert example == [f"moltbot ALL=(mcp-gate-moltbot) NOPASSWD: {GATE}"]
    assert gate_user_for(AGENT) == "mcp-gate-moltbot"


def test_visudo_rejects_a_broken_rule(tmp_path: Path) -> None:
    """The visudo check above is real: a missing ':' after NOPASSWD is caught."""
    path = tmp_path / "broken"
    path.write_text(f"{AGENT} ALL=(mcp-gate-moltbot) NOPASSWD {GATE}\n", encoding="utf-8")
    proc = subprocess.run([visudo(), "-cf", str(path)], capture_output=True, text=True, check=False)
    assert proc.returncode != 0


# --- systemd ------------------------------------------------------------------


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are case-sensitive
    parser.read(UNIT, encoding="utf-8")
    return parser


def unit_values(key: str, section: str = "Service") -> list[str]:
    """Every value of a (possibly repeated) key, in file order."""
    values = []
    current = None
    for raw in UNIT.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
        elif current == section and line and not line.startswith(("#", ";")):
            k, _, v = line.partition("=")
            if k.strip() == key:
                values.append(v.strip())
    return values


HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectKernelLogs": "yes",
    "ProtectControlGroups": "yes",
    "ProtectClock": "yes",
    "ProtectHostname": "yes",
    "RestrictNamespaces": "mnt pid net ipc",
    "RestrictRealtime": "yes",
    "RestrictSUIDSGID": "yes",
    "LockPersonality": "yes",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
    "SystemCallArchitectures": "native",
    "SystemCallFilter": "@system-service @mount unshare "
    "landlock_create_ruleset landlock_add_rule landlock_restrict_self",
    "CapabilityBoundingSet": "CAP_SETUID CAP_SETGID CAP_SETPCAP CAP_SYS_ADMIN CAP_KILL CAP_CHOWN CAP_FOWNER",
    "UMask": "0077",
    "ReadOnlyPaths": "/etc/mcp-privsep",
}


def test_unit_starts_as_root_for_the_spawner_and_keeps_only_its_capabilities() -> None:
    svc = unit()["Service"]
    assert svc["Type"] == "simple"
    assert svc["ExecStart"] == f"{BROKERD} --foreground"
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert svc["Restart"] == "on-failure"
    # root: the spawner stays root; mcp-brokerd drops the daemon to mcp-broker itself
    assert "User" not in svc and "Group" not in svc
    caps = set(svc["CapabilityBoundingSet"].split())
    assert caps == {"CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_SYS_ADMIN", "CAP_KILL", "CAP_CHOWN", "CAP_FOWNER"}
    never = {"CAP_DAC_OVERRIDE", "CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE", "CAP_NET_ADMIN", "CAP_SYS_MODULE"}
    assert not caps & never
    assert "AmbientCapabilities" not in svc or svc["AmbientCapabilities"] == ""
    # the namespaces the spawner makes, never a user namespace
    assert "user" not in svc["RestrictNamespaces"].split()
    assert unit()["Install"]["WantedBy"] == "multi-user.target"


@pytest.mark.parametrize(("key", "value"), sorted(HARDENING.items()))
def test_unit_hardening(key: str, value: str) -> None:
    assert unit_values(key) == [value], f"{key}= should be set once, to {value!r}"


def test_unit_leaves_off_what_would_break_the_broker_or_its_servers() -> None:
    svc = unit()["Service"]
    # W+X for ctypes/cffi and JIT-ing servers; SO_PEERCRED must see the real gate uid
    assert "MemoryDenyWriteExecute" not in svc
    assert "PrivateUsers" not in svc
    assert "PIDFile" not in svc  # Type=simple: systemd knows the main pid


def test_unit_directories() -> None:
    svc = unit()["Service"]
    assert svc["RuntimeDirectory"] == "mcp-privsep"
    assert svc["RuntimeDirectoryMode"] == "2750"
    # systemd would give StateDirectory=/LogsDirectory= to the service's user (root) at every start
    assert "StateDirectory" not in svc and "LogsDirectory" not in svc
    paths = Paths("/")
    assert svc["ReadWritePaths"].split() == [paths.state, paths.log, paths.server_homes]
    # systemd makes the run dir root's (the service has no User=); the pre-start step hands it to
    # mcp-broker:mcp-gate so that each gate user can reach gate.sock
    assert unit_values("ExecStartPre") == ["/bin/chown mcp-broker:mcp-gate /run/mcp-privsep"]
    assert paths.run == "/run/mcp-privsep"


def systemd_analyze_reason(tmp_path: Path) -> str | None:
    """Why ``systemd-analyze verify`` cannot run here, or None when it works."""
    tool = shutil.which("systemd-analyze")
    if tool is None:
        return "systemd-analyze is not installed (it comes with the systemd package)"
    probe = tmp_path / "probe" / "mcp-privsep-probe.service"
    probe.parent.mkdir()
    probe.write_text("[Service]\nExecStart=/bin/true\n", encoding="utf-8")
    proc = subprocess.run(
        [tool, "verify", "--man=no", str(probe)], capture_output=True, text=True, check=False, timeout=60
    )
    if proc.returncode != 0 or proc.stderr.strip():
        return f"systemd-analyze verify does not work on this machine: {(proc.stderr or proc.stdout).strip()}"
    return None


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    reason = systemd_analyze_reason(tmp_path)
    if reason is not None:
        pytest.skip(reason)
    text = UNIT.read_text(encoding="utf-8")
    if not os.access(BROKERD, os.X_OK):
        # verify insists every Exec*= command exists; stand in for the daemon
        # when it is not installed on this machine, and check the rest as is.
        stub = tmp_path / "mcp-brokerd"
        stub.write_text("#!/bin/sh\nexit 0\n", encoding="utf-8")
        stub.chmod(0o755)
        text = text.replace(f"ExecStart={BROKERD} ", f"ExecStart={stub} ")
    copy = tmp_path / "unit" / UNIT.name
    copy.parent.mkdir()
    copy.write_text(text, encoding="utf-8")
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(copy)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    # verify exits 0 on unknown keys and bad values, with a warning: fail on any output
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0 and not output, output


# --- OpenRC -------------------------------------------------------------------


def openrc() -> str:
    return OPENRC.read_text(encoding="utf-8")


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_openrc_script_is_valid_shell(shell: str) -> None:
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} is not installed")
    proc = subprocess.run([path, "-n", str(OPENRC)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def shell_function(text: str, name: str) -> str:
    """The body of a top-level shell function (from ``name() {`` to a ``}`` line)."""
    match = re.search(rf"^{name}\(\)\s*\{{\n(.*?)^\}}$", text, re.M | re.S)
    assert match is not None, f"no {name}() in {OPENRC.name}"
    return match[1]


def test_openrc_script_settings() -> None:
    text = openrc()
    assert text.startswith("#!/sbin/openrc-run\n")
    assert f'command="{BROKERD}"' in text
    assert 'command_args="--foreground"' in text
    assert re.search(r"^command_background=(true|yes|\"yes\"|\"true\")$", text, re.M)
    assert 'extra_started_commands="reload"' in text
    assert "checkpath -d -m 2750 -o mcp-broker:mcp-gate /run/mcp-privsep" in text
    assert re.search(r"^\tneed localmount$", shell_function(text, "depend"), re.M)
    assert re.search(r"^\tafter net$", shell_function(text, "depend"), re.M)
    assert re.search(r"start-stop-daemon --signal HUP --pidfile \"\$\{pidfile\}\"", shell_function(text, "reload"))


def test_openrc_pidfile_is_not_the_daemons() -> None:
    """start-stop-daemon writes its pid file as root and trusts it for 'stop'.

    So it must be neither the daemon's own locked pid file nor anywhere
    mcp-broker can write (the run directory is mcp-broker's).
    """
    match = re.search(r"^pidfile=\"?([^\"\n]+)\"?$", openrc(), re.M)
    assert match is not None
    pidfile = match[1].replace("${RC_SVCNAME}", "mcp-brokerd")
    assert pidfile != Paths("/").pidfile
    assert not pidfile.startswith(Paths("/").run + "/")
    assert os.path.dirname(pidfile) == "/run"


# --- etc/broker.toml ----------------------------------------------------------


def broker_toml() -> dict[str, object]:
    with BROKER_TOML.open("rb") as fh:
        return tomllib.load(fh)


def test_broker_toml_validates() -> None:
    model = FileModel.model_validate(broker_toml())
    demo = parse_server("demo", model.servers["demo"], str(BROKER_TOML))
    assert demo.command == "/opt/mcp-privsep/venv/bin/python"
    assert demo.args == ("-m", "mcp_servers.demo")
    assert demo.env_file == "/etc/mcp-privsep/secrets/demo.env"
    assert demo.url is None


def test_broker_toml_documents_the_defaults() -> None:
    """The comment says the [broker] values shown are the defaults: keep that true."""
    raw = broker_toml()["broker"]
    assert isinstance(raw, dict)
    assert set(raw) >= {
        "call_timeout",
        "max_call_timeout",
        "max_output_bytes",
        "connect_timeout",
        "restart_backoff_max",
    }
    defaults = BrokerSettings()
    for key, value in raw.items():
        assert getattr(defaults, key) == value, (
            f"[broker] {key} = {value!r} but the default is {getattr(defaults, key)!r}"
        )


def test_broker_toml_http_example_validates_when_uncommented() -> None:
    lines = BROKER_TOML.read_text(encoding="utf-8").splitlines()
    start = lines.index("# [servers.ha]")
    block = []
    for line in lines[start:]:
        if not line.startswith("# "):
            break
        block.append(line[2:])
    data = tomllib.loads("\n".join(block))
    model = FileModel.model_validate(data)
    ha = parse_server("ha", model.servers["ha"], "example")
    assert ha.url == "http://127.0.0.1:8123/api/mcp"
    assert ha.env_file == "/etc/mcp-privsep/secrets/ha.env"
    assert ha.headers == {"Authorization": "Bearer ${HA_TOKEN}"}
    assert ha.command is None


def test_broker_toml_holds_no_secret() -> None:
    text = BROKER_TOML.read_text(encoding="utf-8")
    assert not re.search(r"(?i)bearer\s+(?!\$\{)[A-Za-z0-9._-]{8,}", text)
    assert not re.search(r"^\s*args\s*=.*\$\{", text, re.M)


# --- etc/allowed-actions.txt --------------------------------------------------


def test_allowlist_example_parses() -> None:
    parsed = allowlist.from_bytes(ALLOWLIST.read_bytes(), str(ALLOWLIST))
    assert parsed.actions == ("demo.echo", "demo.whoami", "demo.add")
    assert not parsed.allows("demo.secret")
    assert "#demo.secret" in ALLOWLIST.read_text(encoding="utf-8")
    _actions, errors = allowlist.parse(ALLOWLIST.read_text(encoding="utf-8"), str(ALLOWLIST))
    assert errors == []


# --- the packaging agrees with the layout table ----------------------------------------------


def test_openrc_checkpaths_match_the_layout_table() -> None:
    from broker.core import layout

    paths = Paths("/")
    found = re.findall(r"checkpath -d -m (\d+) -o ([\w-]+):([\w-]+) (\S+)", openrc())
    assert found, "the OpenRC script creates no directory"
    by_path = {e.path(paths): e for e in layout.PATHS}
    for mode, owner, group, path in found:
        e = by_path[path]
        assert (int(mode, 8), owner, group) == (e.mode, e.owner, e.group), path


def test_unit_directories_match_the_layout_table() -> None:
    from broker.core import layout

    svc = unit()["Service"]
    paths = Paths("/")
    run = layout.entry("run")
    assert "/run/" + svc["RuntimeDirectory"] == run.path(paths)
    assert int(svc["RuntimeDirectoryMode"], 8) == run.mode
    assert unit_values("ExecStartPre") == [f"/bin/chown {run.owner}:{run.group} {run.path(paths)}"]
    for path in svc["ReadWritePaths"].split():
        e = next(e for e in layout.PATHS if e.path(paths) == path)
        assert e.kind == "dir", path


# --- sysvinit ---------------------------------------------------------------------

INIT = PACKAGING / "mcp-brokerd.init"


def init_script() -> str:
    return INIT.read_text(encoding="utf-8")


@pytest.mark.parametrize("shell", ["sh", "dash", "bash"])
def test_init_script_is_valid_shell(shell: str) -> None:
    path = shutil.which(shell)
    if path is None:
        pytest.skip(f"{shell} is not installed")
    proc = subprocess.run([path, "-n", str(INIT)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_init_script_has_lsb_headers() -> None:
    """insserv/update-rc.d read the LSB block; these keys are the ones they need."""
    text = init_script()
    assert text.startswith("#!/bin/sh\n")
    block = re.search(r"^### BEGIN INIT INFO\n(.*?)^### END INIT INFO$", text, re.M | re.S)
    assert block is not None
    fields = dict(re.findall(r"^# ([A-Za-z-]+):\s+(.*)$", block[1], re.M))
    assert fields["Provides"] == "mcp-brokerd"
    assert set(fields["Required-Start"].split()) >= {"$local_fs", "$remote_fs", "$network"}
    assert fields["Default-Start"].split() == ["2", "3", "4", "5"]
    assert fields["Default-Stop"].split() == ["0", "1", "6"]
    assert fields["Short-Description"]


def test_init_script_runs_the_daemon_itself_and_stops_it_by_its_pid_file() -> None:
    text = init_script()
    assert f"DAEMON={BROKERD}\n" in text and "CTL=/usr/local/sbin/mcp-brokerctl\n" in text
    assert '"$DAEMON" --daemon' in text  # detaches once it listens, fails with the reason
    assert '"$CTL" stop --timeout 30' in text  # the daemon's own, locked pid file; checks it is mcp-brokerd
    assert '"$CTL" reload' in text  # makes new servers' users first
    code = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not [line for line in code if "start-stop-daemon" in line or "pidfile" in line.lower()]
    for action in ("start", "stop", "restart", "reload|force-reload", "status"):
        assert re.search(rf"^\t{re.escape(action)}\)$", text, re.M), action
    # the package was removed, not purged: the conffile stays and must do nothing
    assert '[ -x "$DAEMON" ] || exit 0' in text


def test_init_script_run_dir_matches_the_layout_table() -> None:
    from broker.core import layout

    run = layout.entry("run")
    paths = Paths("/", layout="source")
    assert f"RUNDIR={run.path(paths)}\n" in init_script()
    match = re.search(r'install -d -o ([\w-]+) -g ([\w-]+) -m (\d+) "\$RUNDIR"', init_script())
    assert match is not None
    assert (match[1], match[2], int(match[3], 8)) == (run.owner, run.group, run.mode)


# --- the Debian package's layout ------------------------------------------------------------------

DEB_GATE = "/usr/sbin/mcp-gate"


def test_paths_of_the_two_layouts() -> None:
    src = Paths("/", layout="source")
    assert (src.venv, src.mcp, src.gate, src.brokerd, src.brokerctl) == (
        "/opt/mcp-privsep/venv",
        "/usr/local/bin/mcp",
        "/usr/local/sbin/mcp-gate",
        "/usr/local/sbin/mcp-brokerd",
        "/usr/local/sbin/mcp-brokerctl",
    )
    assert src.mcp_shim == src.mcp and not src.package_commands
    deb = Paths("/", layout="deb")
    assert (deb.venv, deb.mcp, deb.gate, deb.brokerd, deb.brokerctl) == (
        "/usr/lib/mcp-privsep/venv",
        "/usr/bin/mcp",
        DEB_GATE,
        "/usr/sbin/mcp-brokerd",
        "/usr/sbin/mcp-brokerctl",
    )
    assert deb.package_commands and deb.mcp_shim == "/etc/mcp-privsep/mcp.sh"
    # config, state, logs and sockets are the same in both
    for attr in ("etc", "allowlist", "gate_users", "run", "gate_sock", "state", "log", "audit_log", "sudoers"):
        assert getattr(src, attr) == getattr(deb, attr), attr
    # a staged root of the package layout: install writes the commands there itself, with the root baked in
    staged = Paths("/srv/stage", layout="deb")
    assert staged.gate == "/srv/stage/usr/sbin/mcp-gate" and staged.venv == "/srv/stage/usr/lib/mcp-privsep/venv"
    assert not staged.package_commands and staged.mcp_shim == staged.mcp
    with pytest.raises(ValueError, match="layout"):
        Paths("/", layout="rpm")


def test_the_layout_is_where_the_code_runs_from(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.core import paths as paths_mod

    assert Paths("/").layout == "source"  # this checkout, or the source install's venv
    packaged = "/usr/lib/mcp-privsep/venv/lib/python3.11/site-packages/broker/core/paths.py"
    monkeypatch.setattr(paths_mod, "__file__", packaged)
    assert paths_mod.code_layout("/") == "deb" and Paths("/").gate == DEB_GATE
    assert paths_mod.code_layout("/srv/stage") == "source"
    monkeypatch.setattr(paths_mod, "__file__", "/srv/stage" + packaged)
    assert paths_mod.code_layout("/srv/stage") == "deb" and paths_mod.code_layout("/") == "source"
    monkeypatch.setattr(paths_mod, "__file__", packaged.replace("/usr/lib/mcp-privsep/", "/opt/mcp-privsep/"))
    assert paths_mod.code_layout("/") == "source"


@pytest.mark.parametrize("agent", [AGENT, LONG_AGENT])
def test_the_packages_sudoers_rule_names_its_gate(agent: str, tmp_path: Path) -> None:
    deb = Paths("/", layout="deb")
    text = install.sudoers_text(deb, {agent: gate_user_for(agent)})
    assert f"{agent} ALL=({gate_user_for(agent)}) NOPASSWD: {DEB_GATE}\n" in text
    visudo_check(text, tmp_path)
    # the template as the package ships it (build.sh turns /usr/local/sbin/ into /usr/sbin/)
    shipped = render_template(agent).replace("/usr/local/sbin/", "/usr/sbin/")
    assert [m.group(0) for m in sudoers_rules(shipped)] == [m.group(0) for m in sudoers_rules(text)]


def test_the_packaged_gate_script() -> None:
    import ast

    venv = "/usr/lib/mcp-privsep/venv"
    text = install.packaged_gate_script(venv)
    assert text.startswith("#!/usr/bin/python3 -IS\n")
    tree = ast.parse(text)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert imported == {"pwd", "sys"}  # standard library only before the gate's own code
    assert f"sys.path.append({install.site_packages(venv)!r})" in text
    assert 'run(root="/", broker_uid=broker_uid)' in text
    assert "pwd.getpwnam('mcp-broker').pw_uid" in text and "raise SystemExit(69)" in text
    assert "generated by 'mcp-brokerctl install'" not in text  # uninstall removes only what install wrote


def test_the_packaged_gate_script_runs(tmp_path: Path) -> None:
    """Run it with a stand-in for broker.gate.verbs: it must find the broker's uid and call run()."""
    site = tmp_path / "site"
    (site / "broker" / "gate").mkdir(parents=True)
    (site / "broker" / "__init__.py").write_text("")
    (site / "broker" / "gate" / "__init__.py").write_text("")
    (site / "broker" / "gate" / "verbs.py").write_text("def run(root, broker_uid):\n    print(root, broker_uid)\n")
    text = install.packaged_gate_script("/nonexistent").replace(
        repr(install.site_packages("/nonexistent")), repr(str(site))
    )
    script = tmp_path / "mcp-gate"
    script.write_text(text.replace("'mcp-broker'", "'root'"))  # a user every machine has: uid 0
    proc = subprocess.run(["/usr/bin/python3", "-IS", str(script)], capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stdout) == (0, "/ 0\n"), proc.stderr
    script.write_text(text.replace("'mcp-broker'", "'no-such-user-here'"))
    proc = subprocess.run(["/usr/bin/python3", "-IS", str(script)], capture_output=True, text=True, check=False)
    assert proc.returncode == 69 and "does not exist" in proc.stderr, proc


def test_the_packaged_mcp_command_reads_the_agents_table(tmp_path: Path) -> None:
    text = install.packaged_mcp_command(Paths("/", layout="deb"))
    assert text.startswith("#!/bin/sh\n") and "\n. /etc/mcp-privsep/mcp.sh\n" in text
    script = tmp_path / "mcp"
    script.write_text(text)
    assert subprocess.run(["sh", "-n", str(script)], check=False).returncode == 0
    # the table runs in the command's own shell, with its arguments
    table = tmp_path / "mcp.sh"
    table.write_text('echo "table: $# $1 $2"; exit 7\n')
    script.write_text(text.replace("/etc/mcp-privsep/mcp.sh", str(table)))
    proc = subprocess.run(["sh", str(script), "call", "demo.echo"], capture_output=True, text=True, check=False)
    assert (proc.returncode, proc.stdout) == (7, "table: 2 call demo.echo\n")
    table.unlink()
    proc = subprocess.run(["sh", str(script), "list"], capture_output=True, text=True, check=False)
    assert proc.returncode == 69 and "mcp-brokerctl install" in proc.stderr


def test_the_package_scripts_are_valid_shell_and_keep_out_of_usr_local() -> None:
    deb = PACKAGING / "deb"
    for name in ("postinst", "prerm", "postrm"):
        text = (deb / name).read_text(encoding="utf-8")
        assert subprocess.run(["sh", "-n", str(deb / name)], check=False).returncode == 0, name
        assert "MCP_PRIVSEP_ROOT" not in text, name
        if name == "postinst":
            retire = re.search(r"^retire_old_commands\(\) \{\n.*?^\}\n", text, re.M | re.S)
            assert retire is not None and all(
                re.match(r"\s*(rm -f|\[ -[fL]|for |case|done|fi|esac|if |/opt|echo|\"|\})", line) or not line.strip()
                for line in retire[0].splitlines()[1:]
            ), "postinst may only remove (never write) in /usr/local"
            text = text.replace(retire[0], "")
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
        assert "/usr/local" not in code, name
    postinst = (deb / "postinst").read_text(encoding="utf-8")
    assert "update-rc.d mcp-brokerd defaults" in postinst
    assert "invoke-rc.d --skip-systemd-native mcp-brokerd" in postinst
    assert "deb-systemd-invoke" in postinst and "py3compile -p mcp-privsep" in postinst
    postrm = (deb / "postrm").read_text(encoding="utf-8")
    assert "update-rc.d mcp-brokerd remove" in postrm and "MCP_PRIVSEP_PURGE_AUDIT" in postrm
    assert "/etc/mcp-privsep/purge-audit" in postrm
    purge = postrm.split("    purge)", 1)[1].split(";;", 1)[0]
    assert "rm -rf /var/log/mcp-privsep" in purge.split('if [ "$purge_audit" = yes ]', 1)[1]
    assert "/var/log/mcp-privsep" not in purge.split('if [ "$purge_audit" = yes ]', 1)[0].replace(
        "[ -d /var/log/mcp-privsep ]", ""
    )


def test_control_depends_on_what_the_package_runs() -> None:
    control = (PACKAGING / "deb" / "control.in").read_text(encoding="utf-8")
    depends = re.search(r"^Depends: (.*)$", control, re.M)
    assert depends is not None
    names = {d.strip().split()[0] for d in depends[1].replace("@SHLIBS@", "").split(",")}
    # python3 (the venv and the gate), sudo (the boundary), passwd (useradd), procps (the unit's /bin/kill)
    assert names >= {"python3", "sudo", "passwd", "procps"}
    assert "/bin/kill" in unit_values("ExecReload")[0]
    assert re.search(r"^Pre-Depends: init-system-helpers \(>= 1\.54~\)$", control, re.M)  # --skip-systemd-native


# --- doctor on the package --------------------------------------------------------


def test_doctor_reports_what_dpkg_verify_finds(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from broker.admin import doctor as doctor_mod

    venv = tmp_path / "venv"
    (venv / "lib" / "__pycache__").mkdir(parents=True)
    for name in ("lib/shipped.py", "lib/added.py", "lib/__pycache__/shipped.cpython-311.pyc"):
        (venv / name).write_text("")
    answers = {
        "dpkg-query -W": "installed",
        "dpkg --verify": "??5??????   /usr/sbin/mcp-gate\n??5?????? c /etc/init.d/mcp-brokerd\n"
        "missing     /usr/bin/mcp\n",
        "dpkg-query -L": f"/.\n{venv}\n{venv}/lib\n{venv}/lib/shipped.py\n",
    }
    monkeypatch.setattr(doctor_mod, "_output", lambda argv: answers[" ".join(argv[:2])])
    paths = Paths("/", layout="deb")
    paths.venv = str(venv)
    doc = doctor_mod.Doctor(paths)
    isdir = os.path.isdir
    monkeypatch.setattr(doctor_mod.os.path, "isdir", lambda p: p != "/opt/mcp-privsep/venv" and isdir(p))
    doc.check_package()
    messages = [(f.level, f.message) for f in doc.findings if f.section == "package"]
    assert ("warning", "2 file(s) of the package changed outside dpkg: /usr/sbin/mcp-gate, /usr/bin/mcp") in messages
    assert any(level == "warning" and m.startswith(f"1 file(s) in {venv} are not the package's") and
               m.endswith(f"{venv}/lib/added.py") for level, m in messages), messages  # fmt: skip
    assert not [m for _level, m in messages if "init.d" in m]  # a conffile is the operator's to edit


def test_doctor_warns_about_sudos_host_name_noise(monkeypatch: pytest.MonkeyPatch) -> None:
    from broker.admin import doctor as doctor_mod

    said = "sudo: unable to resolve host box: Name or service not known\n"
    fake = subprocess.CompletedProcess(["sudo"], 0, "", said)
    monkeypatch.setattr(doctor_mod.shutil, "which", lambda _name: "/usr/bin/sudo")
    monkeypatch.setattr(doctor_mod.subprocess, "run", lambda *_a, **_k: fake)
    monkeypatch.setattr(doctor_mod.socket, "gethostname", lambda: "box")
    doc = doctor_mod.Doctor(Paths("/"))
    doc.check_host()
    ((level, section, message, fix),) = [(f.level, f.section, f.message, f.fix) for f in doc.findings]
    assert (level, section) == ("warning", "host")
    assert "unable to resolve host box" in message and fix.endswith("echo '127.0.1.1 box' >> /etc/hosts")
    fake.stderr = ""
    doc.findings.clear()
    doc.check_host()
    assert doc.findings == []
