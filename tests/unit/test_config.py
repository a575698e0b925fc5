"""Unit tests for ``broker.daemon.config``: ``broker.toml`` plus ``servers.d/*.toml``.

Each test writes a configuration tree under a temporary root (``Paths(root)``
derives ``etc/mcp-privsep/...`` from it) and checks what the daemon's loader
owns: ``[broker]`` settings, ``[policy.*]``, ``servers.d`` merging, every
problem reported with its file and key path, ``[broker]`` and ``[sandbox]``
only in ``broker.toml``, duplicates naming both files, and the
``Server``/``Config`` objects it hands the rest of the daemon.

Server definitions themselves are parsed by ``broker.core.servers`` (tested
in ``test_server_defs.py``, with the env files, ``${VAR}`` and secrets): the
daemon runs as ``mcp-broker`` and cannot read root's 0600 env files, so
``load`` never opens one, and a server's ``secrets`` stay empty until the
spawner sends them.
"""

from __future__ import annotations

import os

import pytest

from broker.core.errors import ConfigError
from broker.core.paths import Paths
from broker.core.servers import Secrets, ServerDef
from broker.daemon import config
from broker.daemon.config import Server, load
from tests.unit.conftest import write

STDIO = """
[servers.demo]
command = "/opt/mcp-privsep/venv/bin/python"
args = ["-m", "mcp_servers.demo"]
"""


class Tree:
    def __init__(self, root: str) -> None:
        self.paths = Paths(root)
        os.makedirs(self.paths.servers_d)
        os.makedirs(self.paths.secrets)

    def broker(self, text: str) -> str:
        return write(self.paths.broker_toml, text)

    def server_file(self, name: str, text: str) -> str:
        return write(f"{self.paths.servers_d}/{name}", text)

    def env(self, name: str, text: str, mode: int = 0o600) -> str:
        return write(f"{self.paths.secrets}/{name}", text, mode)

    def load(self) -> config.Config:
        return load(self.paths)

    def problems(self) -> list[str]:
        with pytest.raises(ConfigError) as info:
            load(self.paths)
        assert info.value.exit_code == 78
        assert str(info.value).startswith(info.value.problems[0])
        return info.value.problems


@pytest.fixture
def tree(tmp_root: str) -> Tree:
    return Tree(tmp_root)


# --- valid configurations ------------------------------------------------------------


def test_valid_stdio_and_http_servers(tree: Tree) -> None:
    tree.broker(
        f"""
[broker]
call_timeout = 10
max_call_timeout = 60
notify_command = ["/usr/local/bin/notify", "--urgent"]
audit_syslog_socket = "/run/systemd/journal/dev-log"

[servers.demo]
command = "/opt/mcp-privsep/venv/bin/python"
args = ["-m", "mcp_servers.demo"]
env_file = "{tree.paths.secrets}/demo.env"
env = {{ LOG_LEVEL = "info" }}
timeout = 5

[servers.ha]
url = "http://${{HA_HOST}}:8123/api/mcp"
env_file = "{tree.paths.secrets}/ha.env"
headers = {{ Authorization = "Bearer ${{HA_TOKEN}}", X-Static = "plain" }}
"""
    )
    cfg = tree.load()
    assert cfg.settings.call_timeout == 10 and cfg.settings.max_call_timeout == 60
    assert cfg.settings.notify_command == ["/usr/local/bin/notify", "--urgent"]
    assert cfg.settings.audit_syslog_socket == "/run/systemd/journal/dev-log"
    assert cfg.files == [tree.paths.broker_toml]
    assert set(cfg.servers) == {"demo", "ha"}
    demo = cfg.servers["demo"]
    assert demo.name == "demo" and demo.source == tree.paths.broker_toml
    assert isinstance(demo.spec, ServerDef) and demo.spec.transport == "stdio"
    assert demo.spec.command == "/opt/mcp-privsep/venv/bin/python"
    assert demo.spec.args == ("-m", "mcp_servers.demo")  # a tuple: the definition is frozen
    assert demo.spec.env == {"LOG_LEVEL": "info"}  # plain settings, not secrets
    assert demo.spec.env_file == f"{tree.paths.secrets}/demo.env"
    assert demo.spec.timeout == 5.0
    assert demo.url is None and demo.headers == {}
    ha = cfg.servers["ha"]
    assert ha.spec.transport == "http"
    # the templates as written: filling ${VAR} in is the spawner's (it alone reads ha.env)
    assert ha.spec.url == "http://${HA_HOST}:8123/api/mcp"
    assert ha.spec.headers == {"Authorization": "Bearer ${HA_TOKEN}", "X-Static": "plain"}
    assert ha.url is None and ha.headers == {}


def test_load_never_reads_env_files(tree: Tree) -> None:
    # Deliberate change: the daemon (mcp-broker) cannot read root's 0600 secrets, so a missing,
    # world-readable, malformed or non-regular env file is no load error; the spawner reports it.
    missing = f"{tree.paths.secrets}/absent.env"
    public = tree.env("public.env", "not a KEY=VALUE line at all\n", mode=0o644)
    directory = f"{tree.paths.secrets}/dir.env"
    os.mkdir(directory, 0o700)
    tree.broker(
        f'[servers.a]\ncommand = "/bin/tool"\nenv_file = "{missing}"\n'
        f'[servers.b]\ncommand = "/bin/tool"\nenv_file = "{public}"\n'
        f'[servers.c]\nurl = "http://x/${{TOKEN}}"\nenv_file = "{directory}"\n'
        '[servers.d]\nurl = "http://x/"\nheaders = { H = "${UNDEFINED}" }\n'
    )
    cfg = tree.load()
    assert [s.spec.env_file for s in cfg.servers.values()] == [missing, public, directory, None]
    for server in cfg.servers.values():
        assert server.secrets is None and server.problem is None
        assert server.secret_values() == {}
    assert cfg.secrets() == {}


def test_defaults_without_broker_table(tree: Tree) -> None:
    tree.broker(STDIO)
    cfg = tree.load()
    assert cfg.settings == config.BrokerSettings()
    assert cfg.policy == {}
    assert cfg.servers["demo"].spec.env == {} and cfg.servers["demo"].spec.env_file is None


def test_servers_d_adds_servers_and_ignores_other_files(tree: Tree) -> None:
    tree.broker(STDIO)
    b = tree.server_file("b.toml", '[servers.beta]\nurl = "https://example.test/mcp"\n')
    a = tree.server_file("a.toml", '[servers.alpha]\ncommand = "/bin/true"\n')
    tree.server_file(".hidden.toml", "this is not toml [")
    tree.server_file("notes.txt", "this is not toml [")
    tree.server_file("c.toml.disabled", "this is not toml [")
    cfg = tree.load()
    assert cfg.files == [tree.paths.broker_toml, a, b]  # broker.toml first, then name order
    assert set(cfg.servers) == {"demo", "alpha", "beta"}
    assert cfg.servers["alpha"].source == a and cfg.servers["alpha"].spec.source == a
    assert cfg.servers["beta"].spec.url == "https://example.test/mcp"


def test_missing_servers_d_is_fine(tree: Tree) -> None:
    os.rmdir(tree.paths.servers_d)
    tree.broker(STDIO)
    assert set(tree.load().servers) == {"demo"}


def test_servers_d_that_is_not_a_directory(tree: Tree) -> None:
    # an unreadable servers.d must not silently drop the servers it holds
    os.rmdir(tree.paths.servers_d)
    write(tree.paths.servers_d, "")
    tree.broker(STDIO)
    with pytest.raises(ConfigError) as info:
        tree.load()
    assert info.value.problems == [f"{tree.paths.servers_d}: Not a directory"]


def test_missing_broker_toml(tree: Tree) -> None:
    assert tree.problems() == [f"{tree.paths.broker_toml}: missing"]


def test_policy_tables_are_loaded(tree: Tree) -> None:
    tree.broker(STDIO + '[policy."demo.echo"]\nmode = "approve"\n')
    f = tree.server_file("p.toml", '[policy."demo.other"]\nmode = "notify"\n')
    cfg = tree.load()
    assert set(cfg.policy) == {"demo.echo", "demo.other"}
    assert cfg.policy["demo.echo"].mode == "approve"
    assert f in cfg.files


# --- Server and Config objects ---------------------------------------------------------


def _spec(**kw: object) -> ServerDef:
    return ServerDef(name="demo", source="/x.toml", **kw)  # type: ignore[arg-type]


def test_server_without_secrets() -> None:
    s = Server(name="demo", source="/x.toml", spec=_spec(url="http://x/${T}"))
    assert s.url is None and s.headers == {} and s.secret_values() == {}


def test_server_with_secrets_from_the_spawner() -> None:
    secrets = Secrets(
        redact={"ha.T": "tok-1234", "ha.header.Authorization": "Bearer tok-1234"},
        url="http://x/tok-1234",
        headers={"Authorization": "Bearer tok-1234"},
        fingerprint="f1",
    )
    s = Server(name="ha", source="/x.toml", spec=_spec(url="http://x/${T}"), secrets=secrets)
    assert s.url == "http://x/tok-1234"
    assert s.headers == {"Authorization": "Bearer tok-1234"}
    values = s.secret_values()
    assert values == secrets.redact
    values.clear()  # a copy: a caller cannot empty what the broker redacts
    assert s.secret_values() == secrets.redact
    other = Server(name="o", source="/y.toml", spec=_spec(command="/bin/true"))
    other.secrets = Secrets(redact={"o.K": "other-1"}, url=None, headers={}, fingerprint="f2")
    cfg = config.Config(config.BrokerSettings(), {"ha": s, "o": other}, ["/x.toml"])
    assert cfg.secrets() == {**secrets.redact, "o.K": "other-1"}


# --- errors with file and key path ------------------------------------------------------


def _one(problems: list[str], *fragments: str) -> str:
    hits = [p for p in problems if all(f in p for f in fragments)]
    assert len(hits) == 1, (fragments, problems)
    return hits[0]


def test_unknown_keys(tree: Tree) -> None:
    bt = tree.broker(
        """
bogus_top = 1
[broker]
bogus_setting = 2
[servers.demo]
command = "/bin/true"
comand = "/bin/false"
"""
    )
    problems = tree.problems()
    assert _one(problems, "bogus_top").startswith(f"{bt}: bogus_top: ")
    assert _one(problems, "broker.bogus_setting").startswith(f"{bt}: broker.bogus_setting: ")
    assert _one(problems, "servers.demo.comand") == f"{bt}: servers.demo.comand: unknown key"
    assert len(problems) == 3


def test_unknown_keys_each_reported(tree: Tree) -> None:
    # the same three mistakes as above, one file each, so each is reported whatever the bug above
    bt = tree.broker("bogus_top = 1\n[broker]\nbogus_setting = 2\n")
    f = tree.server_file("demo.toml", '[servers.demo]\ncommand = "/bin/true"\ncomand = "/bin/false"\n')
    problems = tree.problems()
    assert _one(problems, "bogus_top").startswith(f"{bt}: bogus_top: ")
    assert _one(problems, "broker.bogus_setting").startswith(f"{bt}: broker.bogus_setting: ")
    assert _one(problems, "servers.demo.comand") == f"{f}: servers.demo.comand: unknown key"
    assert len(problems) == 3


@pytest.mark.parametrize(
    ("body", "key", "message"),
    [
        ('command = "/bin/true"\nurl = "http://x/"', "servers.x", "set exactly one of 'command' (stdio) or 'url'"),
        ('args = ["a"]', "servers.x", "set exactly one of 'command' (stdio) or 'url'"),
        ("", "servers.x", "set exactly one of 'command' (stdio) or 'url'"),
        ('command = "bin/true"', "servers.x.command", "must be an absolute path"),
        ('command = "./true"', "servers.x.command", "must be an absolute path"),
        ('command = "/bin/true"\ncwd = "tmp"', "servers.x.cwd", "must be an absolute path"),
        ('command = "/bin/true"\nenv_file = "secrets/x.env"', "servers.x.env_file", "must be an absolute path"),
        ('url = "ftp://x/"', "servers.x.url", "must be an http:// or https:// URL"),
        ('url = "/local"', "servers.x.url", "must be an http:// or https:// URL"),
        ('command = "/bin/sh"\nargs = ["-c", "curl -H ${TOKEN}"]', "servers.x.args", "cannot take ${VAR}"),
        ('command = "/bin/true"\nargs = ["${A}"]', "servers.x.args", "cannot take ${VAR}"),
        ('command = "/bin/true"\nheaders = { A = "b" }', "servers.x.headers", "applies to HTTP servers only"),
        ('url = "http://x/"\nargs = ["a"]', "servers.x.args", "applies to stdio servers only"),
        ('url = "http://x/"\ncwd = "/tmp"', "servers.x.cwd", "applies to stdio servers only"),
        ('command = "/bin/true"\nargs = "not a list"', "servers.x.args", "must be a list of strings"),
        ('command = "/bin/true"\ntimeout = 0', "servers.x.timeout", "must be a number of seconds"),
        ('command = "/bin/true"\ntimeout = 3601', "servers.x.timeout", "must be a number of seconds"),
    ],
)
def test_server_errors_name_file_and_key(tree: Tree, body: str, key: str, message: str) -> None:
    bt = tree.broker(f"[servers.x]\n{body}\n")
    problems = tree.problems()
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{bt}: {key}: {message}"), problems


def test_errors_in_servers_d_name_that_file(tree: Tree) -> None:
    tree.broker(STDIO)
    f = tree.server_file("zz.toml", '[servers.bad]\ncommand = "relative"\n')
    assert tree.problems() == [f"{f}: servers.bad.command: must be an absolute path"]


def test_bad_server_name(tree: Tree) -> None:
    bt = tree.broker('[servers."a.b"]\ncommand = "/bin/true"\n[servers."x y"]\ncommand = "/bin/true"\n')
    assert tree.problems() == [
        f"{bt}: servers.a.b: server names are [A-Za-z0-9_-]+",
        f"{bt}: servers.x y: server names are [A-Za-z0-9_-]+",
    ]


def test_servers_must_be_a_table(tree: Tree) -> None:
    bt = tree.broker("servers = 1\n")
    problems = tree.problems()
    assert len(problems) == 1 and problems[0].startswith(f"{bt}: servers: ")


def test_broker_table_only_in_broker_toml(tree: Tree) -> None:
    tree.broker(STDIO)
    f = tree.server_file("x.toml", "[broker]\ncall_timeout = 1\n")
    assert tree.problems() == [f"{f}: [broker] belongs in {tree.paths.broker_toml}"]


def test_call_timeout_above_max(tree: Tree) -> None:
    bt = tree.broker("[broker]\ncall_timeout = 100\nmax_call_timeout = 50\n")
    problems = tree.problems()
    assert len(problems) == 1
    assert problems[0].startswith(f"{bt}: broker: ")
    assert "call_timeout exceeds max_call_timeout" in problems[0]


@pytest.mark.parametrize(
    ("line", "key", "fragment"),
    [
        ('notify_command = ["notify-send"]', "broker.notify_command", "must start with an absolute path"),
        ("notify_command = []", "broker.notify_command", "must start with an absolute path"),
        ('audit_syslog_socket = "dev/log"', "broker.audit_syslog_socket", "must be an absolute path"),
        ('audit_syslog_facility = "kern"', "broker.audit_syslog_facility", ""),
        ("max_output_bytes = 10", "broker.max_output_bytes", ""),
        ('call_timeout = "fast"', "broker.call_timeout", ""),
    ],
)
def test_bad_broker_settings_name_their_key(tree: Tree, line: str, key: str, fragment: str) -> None:
    bt = tree.broker(f"[broker]\n{line}\n")
    problems = tree.problems()
    assert len(problems) == 1
    assert problems[0].startswith(f"{bt}: {key}: "), problems
    assert fragment in problems[0]


def test_bad_policy_action_and_duplicate_policy(tree: Tree) -> None:
    bt = tree.broker('[policy."demo*"]\nmode = "allow"\n[policy."demo.a"]\nmode = "allow"\n')
    f = tree.server_file("p.toml", '[policy."demo.a"]\nmode = "notify"\n')
    problems = tree.problems()
    assert _one(problems, "demo*").startswith(f"{bt}: policy: ")
    # the file with the bad action is skipped as a whole, so demo.a is not a duplicate here
    assert len(problems) == 1
    tree.broker('[policy."demo.a"]\nmode = "allow"\n')
    assert tree.problems() == [f"{f}: policy.demo.a: already defined in {bt}"]


@pytest.mark.parametrize(
    "text", ["[servers.demo\n", "a = = 1\n", "x = [\n", '[servers.a]\ncommand = "/bin/true"\n[servers.a]\n', "\xff"]
)
def test_bad_toml(tree: Tree, text: str) -> None:
    bt = write(tree.paths.broker_toml, text.encode("latin-1") if text == "\xff" else text.encode())
    problems = tree.problems()
    assert len(problems) == 1
    assert problems[0].startswith(f"{bt}: ")
    if text == "\xff":
        assert problems == [f"{bt}: not valid UTF-8"]


def test_bad_toml_in_servers_d_is_one_problem_among_others(tree: Tree) -> None:
    tree.broker('[servers.demo]\ncommand = "rel"\n')
    f = tree.server_file("broken.toml", "[servers.x\n")
    problems = tree.problems()
    assert len(problems) == 2
    # files are read first and server tables parsed after, so the TOML problem comes first
    assert _one(problems, f"{f}: ")
    assert _one(problems, f"{tree.paths.broker_toml}: servers.demo.command: must be an absolute path")
    with pytest.raises(ConfigError, match=r"\(and 1 more\)"):
        tree.load()


def test_server_defined_in_two_files_names_both(tree: Tree) -> None:
    tree.broker(STDIO)
    a = tree.server_file("a.toml", '[servers.ha]\nurl = "http://x/"\n')
    b = tree.server_file("b.toml", '[servers.ha]\nurl = "http://y/"\n[servers.demo]\ncommand = "/bin/true"\n')
    problems = tree.problems()
    assert f"{b}: servers.ha: already defined in {a}" in problems
    assert f"{b}: servers.demo: already defined in {tree.paths.broker_toml}" in problems
    assert len(problems) == 2


def test_duplicate_with_a_missing_env_file_is_only_a_duplicate(tree: Tree) -> None:
    # the env file is the spawner's business: a missing one adds no problem, the duplicate is still one
    tree.broker(f'[servers.demo]\ncommand = "/bin/true"\nenv_file = "{tree.paths.secrets}/absent.env"\n')
    b = tree.server_file("b.toml", '[servers.demo]\ncommand = "/bin/true"\n')
    assert tree.problems() == [f"{b}: servers.demo: already defined in {tree.paths.broker_toml}"]


def test_duplicate_reported_even_when_first_definition_is_broken(tree: Tree) -> None:
    tree.broker('[servers.demo]\ncommand = "relative"\n')
    b = tree.server_file("b.toml", '[servers.demo]\ncommand = "/bin/true"\n')
    problems = tree.problems()
    assert f"{b}: servers.demo: already defined in {tree.paths.broker_toml}" in problems, problems


def test_every_problem_is_reported(tree: Tree) -> None:
    bt = tree.broker('[servers.a]\ncommand = "rel"\n[servers.b]\nurl = "http://x/"\ncommand = "/bin/true"\n')
    c = tree.server_file("c.toml", '[servers.c]\nbogus = 1\ncommand = "/bin/true"\ntimeout = -1\n')
    problems = tree.problems()
    assert problems == [
        f"{bt}: servers.a.command: must be an absolute path",
        f"{bt}: servers.b: set exactly one of 'command' (stdio) or 'url' (streamable HTTP)",
        f"{c}: servers.c.bogus: unknown key",
        f"{c}: servers.c.timeout: must be a number of seconds, more than 0 and at most 3600",
    ]
    with pytest.raises(ConfigError, match=r"\(and 3 more\)"):
        tree.load()


# --- [sandbox] ---------------------------------------------------------------------------


def test_sandbox_table_in_broker_toml_is_accepted(tree: Tree) -> None:
    tree.broker(STDIO + '[sandbox]\ndisable = ["landlock", "pid_namespace"]\n')
    assert set(tree.load().servers) == {"demo"}


def test_sandbox_table_only_in_broker_toml(tree: Tree) -> None:
    tree.broker(STDIO)
    f = tree.server_file("x.toml", '[sandbox]\ndisable = ["landlock"]\n')
    assert tree.problems() == [f"{f}: [sandbox] belongs in {tree.paths.broker_toml}"]


def test_sandbox_table_is_validated(tree: Tree) -> None:
    bt = tree.broker(STDIO + '[sandbox]\ndisable = ["landlock", "seccomp"]\nstrict = true\n')
    assert tree.problems() == [
        f"{bt}: sandbox.strict: unknown key",
        f"{bt}: sandbox.disable: 'seccomp' is none of pid_namespace, mount_namespace, network_namespace, landlock",
    ]


def test_sandbox_must_be_a_table(tree: Tree) -> None:
    bt = tree.broker("sandbox = 1\n" + STDIO)  # a top-level key: before any table
    problems = tree.problems()
    assert len(problems) == 1 and problems[0].startswith(f"{bt}: sandbox: ")


# --- fingerprints ------------------------------------------------------------------------


def test_fingerprint_tracks_the_spec(tree: Tree) -> None:
    tree.broker(STDIO)
    first = tree.load().servers["demo"].fingerprint()
    assert tree.load().servers["demo"].fingerprint() == first  # a reload of the same file keeps the session
    tree.broker(STDIO.replace('"mcp_servers.demo"]', '"mcp_servers.demo", "--verbose"]'))
    assert tree.load().servers["demo"].fingerprint() != first
    tree.broker(STDIO + 'env = { LOG_LEVEL = "debug" }\n')
    assert tree.load().servers["demo"].fingerprint() != first


def test_fingerprint_ignores_which_file_holds_the_server(tree: Tree) -> None:
    # moving a definition into servers.d changes nothing it runs with: no restart
    tree.broker(STDIO)
    first = tree.load().servers["demo"].fingerprint()
    tree.broker("")
    tree.server_file("demo.toml", STDIO)
    assert tree.load().servers["demo"].fingerprint() == first


def test_fingerprint_tracks_secrets_and_problem(tree: Tree) -> None:
    tree.broker('[servers.x]\nurl = "http://x/${TOKEN}"\nenv_file = "/etc/x.env"\n')
    server = tree.load().servers["x"]
    bare = server.fingerprint()
    server.secrets = Secrets(redact={"x.TOKEN": "one-1234"}, url="http://x/one-1234", headers={}, fingerprint="a")
    one = server.fingerprint()
    server.secrets = Secrets(redact={"x.TOKEN": "two-1234"}, url="http://x/two-1234", headers={}, fingerprint="b")
    two = server.fingerprint()
    server.problem = "its env file is missing"
    broken = server.fingerprint()
    assert len({bare, one, two, broken}) == 4


def test_a_stdio_servers_fingerprint_follows_the_hosts_sandbox_settings() -> None:
    """reload must restart a stdio server when [sandbox] disable changes: it runs under other protections."""
    from broker.core.servers import parse_server
    from broker.daemon.config import Server

    stdio = parse_server("x", {"command": "/bin/tool"}, "t")
    http = parse_server("h", {"url": "http://127.0.0.1:1/mcp"}, "t")
    assert Server("x", "t", stdio).fingerprint() != Server("x", "t", stdio, host=frozenset({"landlock"})).fingerprint()
    assert Server("h", "t", http).fingerprint() == Server("h", "t", http, host=frozenset({"landlock"})).fingerprint()
