"""Unit tests for ``broker.config``: ``broker.toml`` plus ``servers.d/*.toml``.

Each test writes a configuration tree under a temporary root (``Paths(root)``
derives ``etc/mcp-privsep/...`` from it) and checks that valid stdio and
HTTP servers load, that every problem is reported with its file and key
path, that secret env files must be private, that ``${VAR}`` is filled in
``url``/``headers`` from the server's own env file only and refused in
``args``, and what ``Server.secrets()`` returns.
"""

from __future__ import annotations

import os

import pytest

from broker.core.paths import Paths
from broker.daemon import config
from broker.daemon.config import ConfigError, Server, load, read_env_file
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
    env_demo = tree.env("demo.env", "# demo secrets\nDEMO_KEY=demo-secret-1\n\nexport OTHER = 'quoted value'\n")
    env_ha = tree.env("ha.env", 'HA_TOKEN="tok-abc-123"\nHA_HOST=127.0.0.1\n')
    tree.broker(
        f"""
[broker]
call_timeout = 10
max_call_timeout = 60

[servers.demo]
command = "/opt/mcp-privsep/venv/bin/python"
args = ["-m", "mcp_servers.demo"]
env_file = "{env_demo}"
timeout = 5

[servers.ha]
url = "http://${{HA_HOST}}:8123/api/mcp"
env_file = "{env_ha}"
headers = {{ Authorization = "Bearer ${{HA_TOKEN}}", X-Static = "plain" }}
"""
    )
    cfg = tree.load()
    assert cfg.settings.call_timeout == 10 and cfg.settings.max_call_timeout == 60
    assert cfg.files == [tree.paths.broker_toml]
    assert set(cfg.servers) == {"demo", "ha"}
    demo = cfg.servers["demo"]
    assert demo.source == tree.paths.broker_toml
    assert demo.spec.command == "/opt/mcp-privsep/venv/bin/python"
    assert demo.spec.args == ["-m", "mcp_servers.demo"]
    assert demo.env == {"DEMO_KEY": "demo-secret-1", "OTHER": "quoted value"}
    assert demo.url is None and demo.headers == {}
    ha = cfg.servers["ha"]
    assert ha.url == "http://127.0.0.1:8123/api/mcp"
    assert ha.headers == {"Authorization": "Bearer tok-abc-123", "X-Static": "plain"}
    assert ha.spec.url == "http://${HA_HOST}:8123/api/mcp"  # the template itself is untouched
    assert ha.spec.headers["Authorization"] == "Bearer ${HA_TOKEN}"


def test_defaults_without_broker_table(tree: Tree) -> None:
    tree.broker(STDIO)
    cfg = tree.load()
    assert cfg.settings == config.BrokerSettings()
    assert cfg.servers["demo"].env == {}


def test_servers_d_adds_servers_and_ignores_other_files(tree: Tree) -> None:
    tree.broker(STDIO)
    b = tree.server_file("b.toml", '[servers.beta]\nurl = "https://example.test/mcp"\n')
    a = tree.server_file("a.toml", '[servers.alpha]\ncommand = "/bin/true"\n')
    tree.server_file(".hidden.toml", "this is not toml [")
    tree.server_file("notes.txt", "this is not toml [")
    tree.server_file("c.toml.disabled", "this is not toml [")
    cfg = tree.load()
    assert cfg.files == [tree.paths.broker_toml, a, b]
    assert set(cfg.servers) == {"demo", "alpha", "beta"}
    assert cfg.servers["alpha"].source == a
    assert cfg.servers["beta"].url == "https://example.test/mcp"


def test_missing_servers_d_is_fine(tree: Tree) -> None:
    os.rmdir(tree.paths.servers_d)
    tree.broker(STDIO)
    assert set(tree.load().servers) == {"demo"}


def test_missing_broker_toml(tree: Tree) -> None:
    assert tree.problems() == [f"{tree.paths.broker_toml}: missing"]


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
    assert _one(problems, "servers.demo.comand").startswith(f"{bt}: servers.demo.comand: ")
    assert len(problems) == 3


@pytest.mark.parametrize(
    ("body", "key", "fragment"),
    [
        ('command = "/bin/true"\nurl = "http://x/"', "servers.x", "exactly one of 'command'"),
        ('args = ["a"]', "servers.x", "exactly one of 'command'"),
        ("", "servers.x", "exactly one of 'command'"),
        ('command = "bin/true"', "servers.x.command", "absolute path"),
        ('command = "./true"', "servers.x.command", "absolute path"),
        ('command = "/bin/true"\ncwd = "tmp"', "servers.x.cwd", "absolute path"),
        ('command = "/bin/true"\nenv_file = "secrets/x.env"', "servers.x.env_file", "absolute path"),
        ('url = "ftp://x/"', "servers.x.url", "http"),
        ('url = "/local"', "servers.x.url", "http"),
        ('command = "/bin/sh"\nargs = ["-c", "curl -H ${TOKEN}"]', "servers.x", "'args' cannot take ${VAR}"),
        ('command = "/bin/true"\nargs = ["${A}"]', "servers.x", "'args' cannot take ${VAR}"),
        ('command = "/bin/true"\nheaders = { A = "b" }', "servers.x", "'headers' apply to HTTP servers only"),
        ('url = "http://x/"\nargs = ["a"]', "servers.x", "stdio servers only"),
        ('url = "http://x/"\ncwd = "/tmp"', "servers.x", "stdio servers only"),
        ('command = "/bin/true"\nargs = "not a list"', "servers.x.args", ""),
        ('command = "/bin/true"\ntimeout = 0', "servers.x.timeout", ""),
        ('command = "/bin/true"\ntimeout = 3601', "servers.x.timeout", ""),
    ],
)
def test_server_errors_name_file_and_key(tree: Tree, body: str, key: str, fragment: str) -> None:
    bt = tree.broker(f"[servers.x]\n{body}\n")
    problems = tree.problems()
    assert len(problems) == 1
    assert problems[0].startswith(f"{bt}: {key}: "), problems
    assert fragment in problems[0]


def test_errors_in_servers_d_name_that_file(tree: Tree) -> None:
    tree.broker(STDIO)
    f = tree.server_file("zz.toml", '[servers.bad]\ncommand = "relative"\n')
    assert tree.problems() == [f"{f}: servers.bad.command: Value error, must be an absolute path"]


def test_bad_server_name(tree: Tree) -> None:
    bt = tree.broker('[servers."a.b"]\ncommand = "/bin/true"\n[servers."x y"]\ncommand = "/bin/true"\n')
    problems = tree.problems()
    assert f"{bt}: servers.a.b: server names are [A-Za-z0-9_-]+" in problems
    assert f"{bt}: servers.x y: server names are [A-Za-z0-9_-]+" in problems


def test_broker_table_only_in_broker_toml(tree: Tree) -> None:
    tree.broker(STDIO)
    f = tree.server_file("x.toml", "[broker]\ncall_timeout = 1\n")
    assert tree.problems() == [f"{f}: [broker] belongs in {tree.paths.broker_toml}"]


def test_call_timeout_above_max(tree: Tree) -> None:
    bt = tree.broker("[broker]\ncall_timeout = 100\nmax_call_timeout = 50\n")
    assert tree.problems()[0].startswith(f"{bt}: broker: ")
    assert "call_timeout exceeds max_call_timeout" in tree.problems()[0]


@pytest.mark.parametrize(
    "text", ["[servers.demo\n", "a = = 1\n", "x = [\n", '[servers.a]\ncommand = "/bin/true"\n[servers.a]\n', "\xff"]
)
def test_bad_toml(tree: Tree, text: str) -> None:
    bt = write(tree.paths.broker_toml, text.encode("latin-1") if text == "\xff" else text.encode())
    problems = tree.problems()
    assert len(problems) == 1
    assert problems[0].startswith(f"{bt}: ")


def test_bad_toml_in_servers_d_is_one_problem_among_others(tree: Tree) -> None:
    tree.broker('[servers.demo]\ncommand = "rel"\n')
    f = tree.server_file("broken.toml", "[servers.x\n")
    problems = tree.problems()
    assert len(problems) == 2
    assert problems[0].startswith(f"{tree.paths.broker_toml}: servers.demo.command")
    assert problems[1].startswith(f"{f}: ")
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


def test_duplicate_reported_even_when_first_definition_is_broken(tree: Tree) -> None:
    tree.broker(f'[servers.demo]\ncommand = "/bin/true"\nenv_file = "{tree.paths.secrets}/absent.env"\n')
    b = tree.server_file("b.toml", '[servers.demo]\ncommand = "/bin/true"\n')
    problems = tree.problems()
    assert any(p.startswith(f"{b}: servers.demo: already defined in {tree.paths.broker_toml}") for p in problems), (
        problems
    )


def test_every_problem_is_reported(tree: Tree) -> None:
    tree.broker('[servers.a]\ncommand = "rel"\n[servers.b]\nurl = "http://x/"\ncommand = "/bin/true"\n')
    tree.server_file("c.toml", '[servers.c]\nbogus = 1\ncommand = "/bin/true"\n')
    problems = tree.problems()
    assert len(problems) == 3
    assert any("servers.a.command" in p for p in problems)
    assert any(": servers.b: " in p for p in problems)
    assert any("c.toml: servers.c.bogus" in p for p in problems)


# --- env files and ${VAR} ------------------------------------------------------------------


def test_var_substitution_in_url_and_headers_only_from_own_env_file(tree: Tree) -> None:
    a = tree.env("a.env", "TOKEN=alpha-token\n")
    b = tree.env("b.env", "TOKEN=beta-token\nPATHPART=api\n")
    tree.broker(
        f"""
[servers.a]
url = "https://a.test/mcp?t=${{TOKEN}}"
env_file = "{a}"
[servers.b]
url = "https://b.test/${{PATHPART}}/${{TOKEN}}"
env_file = "{b}"
headers = {{ X = "${{TOKEN}}${{TOKEN}}", Y = "$TOKEN stays", Z = "${{ TOKEN }}" }}
"""
    )
    cfg = tree.load()
    assert cfg.servers["a"].url == "https://a.test/mcp?t=alpha-token"
    assert cfg.servers["b"].url == "https://b.test/api/beta-token"
    assert cfg.servers["b"].headers == {"X": "beta-tokenbeta-token", "Y": "$TOKEN stays", "Z": "${ TOKEN }"}


def test_daemon_environment_is_never_substituted(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_DAEMON_ENV", "leak")
    bt = tree.broker('[servers.ha]\nurl = "http://x/${FROM_DAEMON_ENV}"\n')
    assert tree.problems() == [f"{bt}: servers.ha.url: ${{FROM_DAEMON_ENV}} is not defined in the server's env_file"]


def test_undefined_var_in_headers(tree: Tree) -> None:
    env = tree.env("ha.env", "HA_TOKEN=tok-1234\n")
    bt = tree.broker(
        f'[servers.ha]\nurl = "http://x/"\nenv_file = "{env}"\nheaders = {{ Authorization = "Bearer ${{NOPE}}" }}\n'
    )
    assert tree.problems() == [
        f"{bt}: servers.ha.headers.Authorization: ${{NOPE}} is not defined in the server's env_file"
    ]


def test_var_from_another_servers_env_file_is_undefined(tree: Tree) -> None:
    a = tree.env("a.env", "SECRET_A=only-for-a\n")
    bt = tree.broker(
        f'[servers.a]\nurl = "http://a/"\nenv_file = "{a}"\n'
        '[servers.b]\nurl = "http://b/"\nheaders = { H = "${SECRET_A}" }\n'
    )
    assert tree.problems() == [f"{bt}: servers.b.headers.H: ${{SECRET_A}} is not defined in the server's env_file"]


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["--token", "s3cr3t-value"], "/bin/tool"),
        (["--token=s3cr3t-value"], "/bin/tool"),
        (["prefix-s3cr3t-value-suffix"], "/bin/tool"),
        ([], "/opt/s3cr3t-value/bin/tool"),
    ],
)
def test_secret_from_env_file_in_args_is_rejected(tree: Tree, args: list[str], command: str) -> None:
    env = tree.env("x.env", "TOKEN=s3cr3t-value\n")
    args_toml = "[" + ", ".join(f'"{a}"' for a in args) + "]"
    bt = tree.broker(f'[servers.x]\ncommand = "{command}"\nargs = {args_toml}\nenv_file = "{env}"\n')
    problems = tree.problems()
    assert problems == [f"{bt}: servers.x.args: holds a secret from its env_file; command lines are world-readable"]


def test_args_without_secrets_are_fine(tree: Tree) -> None:
    env = tree.env("x.env", "TOKEN=s3cr3t-value\n")
    tree.broker(f'[servers.x]\ncommand = "/bin/tool"\nargs = ["--token-file", "{env}"]\nenv_file = "{env}"\n')
    assert tree.load().servers["x"].env == {"TOKEN": "s3cr3t-value"}


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601])
def test_env_file_readable_by_others_is_rejected(tree: Tree, mode: int) -> None:
    env = tree.env("x.env", "TOKEN=abcd\n", mode=mode)
    tree.broker(f'[servers.x]\ncommand = "/bin/tool"\nenv_file = "{env}"\n')
    problems = tree.problems()
    assert len(problems) == 1
    assert problems[0].startswith(f"{env}: env file is accessible by group or other (mode {mode:04o})")
    assert "0600" in problems[0]


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_private_env_file_modes(tree: Tree, mode: int) -> None:
    env = tree.env("x.env", "TOKEN=abcd\n", mode=mode)
    tree.broker(f'[servers.x]\ncommand = "/bin/tool"\nenv_file = "{env}"\n')
    assert tree.load().servers["x"].env == {"TOKEN": "abcd"}


def test_env_file_symlink_and_missing(tree: Tree) -> None:
    real = tree.env("real.env", "A=b\n")
    link = f"{tree.paths.secrets}/link.env"
    os.symlink(real, link)
    with pytest.raises(ConfigError, match="cannot open env file"):
        read_env_file(link)
    with pytest.raises(ConfigError, match="env file missing"):
        read_env_file(f"{tree.paths.secrets}/absent.env")
    os.mkfifo(f"{tree.paths.secrets}/fifo.env", 0o600)  # O_NONBLOCK: must not hang
    with pytest.raises(ConfigError, match="not a regular file"):
        read_env_file(f"{tree.paths.secrets}/fifo.env")


def test_env_file_that_is_a_directory_is_a_config_error(tree: Tree) -> None:
    d = f"{tree.paths.secrets}/dir.env"
    os.mkdir(d, 0o700)
    tree.broker(f'[servers.x]\ncommand = "/bin/tool"\nenv_file = "{d}"\n')
    problems = tree.problems()
    assert problems == [f"{d}: env file is not a regular file (env_file of servers.x in {tree.paths.broker_toml})"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1\nB = two words \n", {"A": "1", "B": "two words"}),
        ("# c\n\n   \nexport A=1\n", {"A": "1"}),
        ("A='x y'\nB=\"z\"\nC='unbalanced\n", {"A": "x y", "B": "z", "C": "'unbalanced"}),
        ("A=a=b=c\n", {"A": "a=b=c"}),
        ("A=\n", {"A": ""}),
        ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
        ("A=1\nA=2\n", {"A": "2"}),
    ],
)
def test_env_file_parsing(tree: Tree, text: str, expected: dict[str, str]) -> None:
    assert read_env_file(tree.env("x.env", text)) == expected


@pytest.mark.parametrize(
    ("text", "line"), [("A=1\nnot a pair\n", 2), ("1A=x\n", 1), ("=x\n", 1), ("A-B=x\n", 1), ("\n\nexport\n", 3)]
)
def test_env_file_bad_lines(tree: Tree, text: str, line: int) -> None:
    path = tree.env("x.env", text)
    with pytest.raises(ConfigError) as info:
        read_env_file(path)
    assert str(info.value) == f"{path}:{line}: expected KEY=VALUE"


def test_env_file_bad_utf8_and_size(tree: Tree) -> None:
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        read_env_file(tree.env("u.env", b"A=\xff\n"))  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="too large"):
        read_env_file(tree.env("big.env", "A=" + "x" * config.MAX_ENV_FILE_BYTES + "\n"))


def test_env_file_error_is_reported_by_load(tree: Tree) -> None:
    env = tree.env("x.env", "oops\n")
    tree.broker(f'[servers.x]\ncommand = "/bin/tool"\nenv_file = "{env}"\n')
    assert tree.problems() == [f"{env}:1: expected KEY=VALUE (env_file of servers.x in {tree.paths.broker_toml})"]


# --- Server.secrets ----------------------------------------------------------------------


def test_server_secrets_from_load(tree: Tree) -> None:
    env = tree.env("ha.env", "HA_TOKEN=tok-abc-123\nEMPTY=\nHOST=127.0.0.1\n")
    tree.broker(
        f"""
[servers.ha]
url = "http://${{HOST}}/mcp"
env_file = "{env}"
headers = {{ Authorization = "Bearer ${{HA_TOKEN}}", X-Raw = "${{HA_TOKEN}}", X-Lit = "literal-key" }}
"""
    )
    secrets = tree.load().servers["ha"].secrets()
    assert secrets == {
        "ha.HA_TOKEN": "tok-abc-123",
        "ha.HOST": "127.0.0.1",
        "ha.header.Authorization": "Bearer tok-abc-123",
        "ha.header.X-Lit": "literal-key",
    }  # no empty value; X-Raw equals an env value and is not listed twice


def test_server_secrets_direct() -> None:
    spec = config.ServerSpec(command="/bin/true")
    s = Server(name="demo", source="/x.toml", spec=spec, env={"A": "1", "B": ""})
    assert s.secrets() == {"demo.A": "1"}
    assert Server(name="n", source="/x", spec=spec).secrets() == {}


def test_fingerprint_tracks_secrets_and_spec(tree: Tree) -> None:
    env = tree.env("x.env", "TOKEN=one-1234\n")
    tree.broker(f'[servers.x]\nurl = "http://x/${{TOKEN}}"\nenv_file = "{env}"\n')
    first = tree.load().servers["x"].fingerprint()
    assert tree.load().servers["x"].fingerprint() == first
    tree.env("x.env", "TOKEN=two-1234\n")
    assert tree.load().servers["x"].fingerprint() != first
