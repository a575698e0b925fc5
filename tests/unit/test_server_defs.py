"""Unit and property tests for ``broker.core.servers``: server definitions, their users and secrets.

The one parser the daemon, the spawner and ``check`` share: ``parse_server``
for every key of ``[servers.NAME]`` (each problem is ``FILE:
servers.NAME.KEY: message``, and every problem of a table is reported),
``collect``/``load``/``read_toml``/``config_files`` over the config files,
``host_settings`` (``[sandbox]``), ``parse_size``; the accounts
(``server_user_for``, ``account_of``, ``instances``, ``account_problems``
against the real accounts of this machine); and the secrets only the root
spawner reads: ``read_env_file`` (owner, mode, symlinks, parsing),
``instance_env_file``, ``substitute`` and ``resolve`` (``${VAR}`` from the
server's own env file only, no secret on a command line, per-caller
overlays, what the daemon may learn in ``Secrets``).

Env files are written by whoever runs the tests, so the tests pass that uid
as ``owners`` (the spawner passes root's); a file owned by anyone else is
refused either way.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pwd
import re
import tomllib
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.core import servers
from broker.core.errors import ConfigError
from broker.core.names import valid_user_name
from broker.core.paths import BROKER_USER, GATE_USER, GATE_USER_PREFIX, MAX_USER_NAME, Paths
from broker.core.servers import (
    MAX_CONFIG_BYTES,
    MAX_ENV_FILE_BYTES,
    NO_LOGIN_SHELLS,
    Limits,
    Secrets,
    ServerDef,
    account_of,
    account_problems,
    collect,
    config_files,
    host_settings,
    instance_env_file,
    instance_name,
    instances,
    parse_server,
    parse_size,
    read_env_file,
    read_toml,
    resolve,
    server_user_for,
    substitute,
)
from broker.daemon.config import Server
from tests.unit.conftest import NOBODY_UID, needs_root, write

SRC = "/etc/mcp-privsep/servers.d/x.toml"
#: what every problem of ``[servers.x]`` in SRC starts with
AT = f"{SRC}: servers.x"
#: the env files the tests write are owned by whoever runs them
OWN = frozenset({os.getuid()})
STDIO: dict[str, Any] = {"command": "/bin/tool"}
HTTP: dict[str, Any] = {"url": "https://example.test/mcp"}
SHA = "0123456789abcdef" * 4


def parse(table: dict[str, Any], name: str = "x", source: str = SRC) -> ServerDef:
    return parse_server(name, table, source)


def problems(table: object, name: str = "x") -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_server(name, table, SRC)
    assert str(info.value) == info.value.problems[0]  # the message is the first problem
    return info.value.problems


def problem(table: object) -> str:
    found = problems(table)
    assert len(found) == 1, found
    return found[0]


# --- parse_server: a valid definition ----------------------------------------------------------


def test_minimal_stdio_server_gets_the_defaults() -> None:
    d = parse(dict(STDIO))
    assert d == ServerDef(name="x", source=SRC, command="/bin/tool")
    assert d.transport == "stdio"
    assert d.args == () and d.env == {} and d.headers == {} and d.url is None and d.env_file is None
    assert d.user is None and d.per_caller is False and d.timeout is None and d.cwd is None
    assert d.sandbox == "auto" and d.network == "host" and d.connect_ports is None
    assert d.read_paths == () and d.write_paths == () and d.command_sha256 is None
    assert d.limits == Limits() == Limits(memory=4 << 30, processes=512, open_files=4096, file_size=4 << 30)


def test_minimal_http_server() -> None:
    d = parse(dict(HTTP))
    assert d.transport == "http" and d.command is None and d.url == "https://example.test/mcp"


def test_every_stdio_key() -> None:
    d = parse(
        {
            "command": "/opt/venv/bin/python",
            "args": ["-m", "srv", "--home={home}"],
            "cwd": "{home}/work",
            "env_file": "/etc/mcp-privsep/secrets/x.env",
            "env": {"LOG_LEVEL": "info", "_X1": ""},
            "timeout": 7,
            "user": "svc-x",
            "sandbox": "strict",
            "network": "host",
            "connect_ports": [443, 80, 443],
            "read_paths": ["/srv/data", "{home}/cache"],
            "write_paths": ["/srv/out/"],
            "memory": "512M",
            "processes": 64,
            "open_files": "unlimited",
            "file_size": "4 GiB",
            "command_sha256": SHA,
        }
    )
    assert d.command == "/opt/venv/bin/python"
    assert d.args == ("-m", "srv", "--home={home}")
    assert d.cwd == "{home}/work"
    assert d.env_file == "/etc/mcp-privsep/secrets/x.env"
    assert d.env == {"LOG_LEVEL": "info", "_X1": ""}
    assert d.timeout == 7.0 and isinstance(d.timeout, float)
    assert d.user == "svc-x" and d.sandbox == "strict" and d.network == "host"
    assert d.connect_ports == (80, 443)  # sorted, without repeats
    assert d.read_paths == ("/srv/data", "{home}/cache") and d.write_paths == ("/srv/out/",)
    assert d.limits == Limits(memory=512 << 20, processes=64, open_files=None, file_size=4 << 30)
    assert d.command_sha256 == SHA


def test_every_http_key() -> None:
    d = parse({**HTTP, "headers": {"Authorization": "Bearer ${T}"}, "env_file": "/e/x.env", "timeout": 0.5})
    assert d.headers == {"Authorization": "Bearer ${T}"} and d.env_file == "/e/x.env" and d.timeout == 0.5


def test_per_caller_server() -> None:
    d = parse({**STDIO, "per_caller": True, "args": ["--as", "{agent}"], "env": {"WHO": "{agent}"}})
    assert d.per_caller is True and d.args == ("--as", "{agent}") and d.env == {"WHO": "{agent}"}


def test_parsed_from_toml() -> None:
    # what collect() sees: tomllib's types (lists, dicts, ints) straight from a file
    doc = tomllib.loads('[servers.x]\ncommand = "/bin/tool"\nargs = ["a"]\nconnect_ports = [22]\nmemory = 1024\n')
    d = parse(doc["servers"]["x"])
    assert d.args == ("a",) and d.connect_ports == (22,) and d.limits.memory == 1024


# --- parse_server: command and url ---------------------------------------------------------------


@pytest.mark.parametrize(
    "table", [{"command": "/bin/true", "url": "http://x/"}, {}, {"args": ["a"]}, {"env_file": "/e"}]
)
def test_exactly_one_of_command_or_url(table: dict[str, Any]) -> None:
    assert f"{AT}: set exactly one of 'command' (stdio) or 'url' (streamable HTTP)" in problems(table)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("bin/true", "must be an absolute path"),
        ("./true", "must be an absolute path"),
        ("~/bin/tool", "must be an absolute path"),
        ("{home}/bin/tool", "must be an absolute path"),  # {home} is for cwd and paths, not the command
        ("", "must be an absolute path"),
        ("/bin/\0tool", "must not contain a NUL character"),
        (5, "must be a string"),
        (["/bin/tool"], "must be a string"),
    ],
)
def test_command_must_be_an_absolute_path(value: object, message: str) -> None:
    assert problem({"command": value}) == f"{AT}.command: {message}"


@pytest.mark.parametrize("url", ["ftp://x/", "/local", "HTTP://x/", "example.test/mcp", "", "file:///etc/passwd"])
def test_url_must_be_http(url: str) -> None:
    assert problem({"url": url}) == f"{AT}.url: must be an http:// or https:// URL"


def test_url_type() -> None:
    assert problem({"url": 1}) == f"{AT}.url: must be a string"


STDIO_ONLY_VALUES: dict[str, object] = {
    "args": ["a"],
    "cwd": "/tmp",
    "env": {"A": "b"},
    "user": "nobody",
    "per_caller": True,
    "sandbox": "strict",
    "network": "host",
    "connect_ports": [443],
    "bind_ports": [0, 8080],
    "read_paths": ["/srv"],
    "write_paths": ["/srv"],
    "memory": "1G",
    "processes": 10,
    "open_files": 10,
    "file_size": 10,
    "command_sha256": SHA,
}


def test_bind_ports() -> None:
    assert parse({**STDIO, "bind_ports": [8080, 0, 8080]}).bind_ports == (0, 8080)
    assert parse(STDIO).bind_ports == ()  # no listening unless declared
    for bad in ([65536], [-1], ["80"], [True], 80):
        assert problem({**STDIO, "bind_ports": bad}).startswith(f"{AT}.bind_ports: must be a list of TCP ports")


def files_args(*roots: str) -> list[str]:
    return ["-m", "mcp_servers.files", *(x for r in roots for x in ("--root", r))]


def test_the_files_servers_read_write_roots_are_write_paths() -> None:
    """The first version had no write_paths: its files server must keep writing after an upgrade, unedited."""
    table = {
        **STDIO,
        "args": files_args("nas=/srv/nas:ro", "inbox=/srv/inbox/:rw", "plain=/srv/plain", "mine={home}/x:rw"),
    }
    assert parse(table).write_paths == ("/srv/inbox", "{home}/x")  # read-only roots are not granted writing
    table["write_paths"] = ["/srv/inbox", "/var/cache/x"]
    assert parse(table).write_paths == ("/srv/inbox", "/var/cache/x", "{home}/x")  # no path twice
    assert parse({**STDIO, "args": ["-mmcp_servers.files", "--root=a=/srv/a:rw"]}).write_paths == ("/srv/a",)


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "mcp_servers.demo", "--root", "a=/srv/a:rw"],  # another server: its --root means something else
        ["mcp_servers.files", "--root", "a=/srv/a:rw"],  # not run as a module
        files_args("a=relative/x:rw", "b=/:rw", "c=/srv/../etc:rw", "d=/srv/d:RW", "e:rw", "=/srv/f:rw"),
        ["-m", "mcp_servers.files", "--root"],
    ],
)
def test_no_write_path_is_implied_by_anything_else(args: list[str]) -> None:
    assert parse({**STDIO, "args": args}).write_paths == ()


def test_stdio_only_values_cover_every_stdio_key() -> None:
    assert set(STDIO_ONLY_VALUES) == set(servers._STDIO_ONLY)
    assert parse({**STDIO, **{k: v for k, v in STDIO_ONLY_VALUES.items() if k != "user"}}).per_caller


@pytest.mark.parametrize("key", sorted(STDIO_ONLY_VALUES))
def test_stdio_only_keys_are_refused_for_http_servers(key: str) -> None:
    # each value is valid for a stdio server: the one problem is that an HTTP server has no process
    assert problem({**HTTP, key: STDIO_ONLY_VALUES[key]}) == f"{AT}.{key}: applies to stdio servers only"


def test_headers_only_for_http_servers() -> None:
    assert problem({**STDIO, "headers": {"A": "b"}}) == f"{AT}.headers: applies to HTTP servers only"


@pytest.mark.parametrize("headers", [{"A": 1}, ["A: b"], "A: b", {"A": "b\0"}])
def test_headers_must_be_a_table_of_strings(headers: object) -> None:
    assert problem({**HTTP, "headers": headers}) == f"{AT}.headers: must be a table of strings"


# --- parse_server: args and env ----------------------------------------------------------------


@pytest.mark.parametrize("args", [["${TOKEN}"], ["-c", "curl -H ${TOKEN}"], ["--t=${A}", "--u=${B}"], ["x${_a1}y"]])
def test_args_cannot_take_vars(args: list[str]) -> None:
    # once, however many: a command line is readable by every user through /proc
    assert problem({**STDIO, "args": args}) == (
        f"{AT}.args: cannot take ${{VAR}}: command lines are readable by every user"
    )


@pytest.mark.parametrize("arg", ["$TOKEN", "${ TOKEN }", "${1X}", "$${}", "{home}", "${"])
def test_args_that_are_not_vars_are_fine(arg: str) -> None:
    assert parse({**STDIO, "args": [arg]}).args == (arg,)


@pytest.mark.parametrize("args", ["not a list", ["a", 1], [["a"]], ["a\0b"], {"a": "b"}])
def test_args_must_be_a_list_of_strings(args: object) -> None:
    assert problem({**STDIO, "args": args}) == f"{AT}.args: must be a list of strings"


@pytest.mark.parametrize("key", ["1A", "A-B", "A B", "", "A=B", "Ä"])
def test_env_keys_must_be_variable_names(key: str) -> None:
    assert problem({**STDIO, "env": {key: "v"}}) == f"{AT}.env: {key!r} is not a variable name"


def test_every_bad_env_key_is_reported() -> None:
    assert problems({**STDIO, "env": {"1A": "v", "OK": "v", "B-C": "v"}}) == [
        f"{AT}.env: '1A' is not a variable name",
        f"{AT}.env: 'B-C' is not a variable name",
    ]


@pytest.mark.parametrize("env", [{"A": 1}, {"A": True}, ["A=b"], "A=b", {"A": "b\0"}])
def test_env_must_be_a_table_of_strings(env: object) -> None:
    assert problem({**STDIO, "env": env}) == f"{AT}.env: must be a table of strings"


# --- parse_server: timeout, user, per_caller, sandbox, network ------------------------------------


@pytest.mark.parametrize("timeout", [0.001, 1, 30.5, 3600, 3600.0])
def test_timeout_within_bounds(timeout: float) -> None:
    assert parse({**STDIO, "timeout": timeout}).timeout == float(timeout)


@pytest.mark.parametrize("timeout", [0, -1, 0.0, 3600.001, 3601, float("nan"), float("inf"), True, False, "5", [5]])
def test_timeout_out_of_bounds_or_not_a_number(timeout: object) -> None:
    # a bool is an int to Python, but "timeout = true" is a mistake, not one second
    assert problem({**STDIO, "timeout": timeout}) == (
        f"{AT}.timeout: must be a number of seconds, more than 0 and at most 3600"
    )


@pytest.mark.parametrize("user", ["nobody", "svc-x", "svc_x", "svc.x", "a$", "_svc", "Svc1", "x" * 64])
def test_valid_user_names(user: str) -> None:
    assert parse({**STDIO, "user": user}).user == user


@pytest.mark.parametrize("user", ["-x", ".x", "a b", "", "x" * 65, "a/b", "a:b", "ü"])
def test_invalid_user_names(user: str) -> None:
    assert problem({**STDIO, "user": user}) == f"{AT}.user: is not a user name"


def test_user_must_be_a_string() -> None:
    assert problem({**STDIO, "user": 0}) == f"{AT}.user: must be a string"


@pytest.mark.parametrize("value", [1, 0, "true", "yes", "false"])
def test_per_caller_is_a_bool(value: object) -> None:
    assert problem({**STDIO, "per_caller": value}) == f"{AT}.per_caller: must be true or false"


def test_per_caller_with_user_is_refused() -> None:
    assert problem({**STDIO, "per_caller": True, "user": "svc"}) == (
        f"{AT}.user: cannot be set with per_caller = true: each instance has its own user"
    )
    assert parse({**STDIO, "per_caller": False, "user": "svc"}).user == "svc"


@pytest.mark.parametrize("value", ["auto", "strict"])
def test_sandbox_values(value: str) -> None:
    assert parse({**STDIO, "sandbox": value}).sandbox == value


@pytest.mark.parametrize("value", ["off", "none", "Strict", "", True, ["strict"]])
def test_bad_sandbox_values(value: object) -> None:
    assert problem({**STDIO, "sandbox": value}) == (
        f'{AT}.sandbox: must be "auto" (start with what the host provides, with a warning) or "strict"'
    )


@pytest.mark.parametrize("value", ["host", "none"])
def test_network_values(value: str) -> None:
    assert parse({**STDIO, "network": value}).network == value


@pytest.mark.parametrize("value", ["private", "None", "", False, 0])
def test_bad_network_values(value: object) -> None:
    assert problem({**STDIO, "network": value}) == f'{AT}.network: must be "host" or "none"'


# --- parse_server: connect_ports ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ports", "expected"), [([443], (443,)), ([1, 65535], (1, 65535)), ([8080, 22, 8080], (22, 8080)), ([], ())]
)
def test_connect_ports(ports: list[int], expected: tuple[int, ...]) -> None:
    # an empty list is "no port at all", not "any": only an absent key means any
    assert parse({**STDIO, "connect_ports": ports}).connect_ports == expected


@pytest.mark.parametrize("ports", [[0], [65536], [-1], [True], ["80"], [80.0], 80, "80", {"a": 80}])
def test_bad_connect_ports(ports: object) -> None:
    assert problem({**STDIO, "connect_ports": ports}) == f"{AT}.connect_ports: must be a list of TCP ports (1-65535)"


def test_connect_ports_with_network_none_is_refused() -> None:
    # no network at all and "only these ports" cannot both hold
    assert problem({**STDIO, "network": "none", "connect_ports": [443]}) == (
        f'{AT}.connect_ports: applies to network = "host" only'
    )
    assert parse({**STDIO, "network": "host", "connect_ports": [443]}).connect_ports == (443,)


# --- parse_server: cwd, env_file, read_paths and write_paths --------------------------------------


@pytest.mark.parametrize("cwd", ["/srv/x", "{home}", "{home}/work", "/"])
def test_cwd_absolute_or_under_home(cwd: str) -> None:
    assert parse({**STDIO, "cwd": cwd}).cwd == cwd


@pytest.mark.parametrize("cwd", ["work", "./work", "~/work", "home}/x"])
def test_cwd_relative_is_refused(cwd: str) -> None:
    assert problem({**STDIO, "cwd": cwd}) == f"{AT}.cwd: must be an absolute path"


@pytest.mark.parametrize("env_file", ["secrets/x.env", "{home}/x.env", "x.env"])
def test_env_file_must_be_absolute(env_file: str) -> None:
    # an env file is root's, never in the server's home
    assert problem({**STDIO, "env_file": env_file}) == f"{AT}.env_file: must be an absolute path"


@pytest.mark.parametrize("key", ["read_paths", "write_paths"])
@pytest.mark.parametrize("path", ["/srv/data", "/srv/data/", "{home}", "{home}/cache", "/a/..b/c", "/a/b.."])
def test_paths_accepted(key: str, path: str) -> None:
    d = parse({**STDIO, key: ["/first", path]})
    assert getattr(d, key) == ("/first", path)


@pytest.mark.parametrize("key", ["read_paths", "write_paths"])
@pytest.mark.parametrize(
    "path",
    ["/", "//", "///", "relative", "./x", "~/x", "", "/srv/../etc", "/..", "/srv/..", "{home}/..", "{home}/../x"],
)
def test_paths_refused(key: str, path: str) -> None:
    assert problem({**STDIO, key: ["/fine", path]}) == (
        f"{AT}.{key}: {path!r}: must be an absolute path, not / and without .."
    )


@pytest.mark.parametrize("path", ["/.", "/./", "//."])
def test_paths_refuse_root_however_spelled(path: str) -> None:
    assert problem({**STDIO, "read_paths": [path]}).startswith(f"{AT}.read_paths: ")


@pytest.mark.parametrize("key", ["read_paths", "write_paths"])
@pytest.mark.parametrize("value", ["/srv", ["/srv", 1], [["/srv"]], ["/s\0rv"]])
def test_paths_must_be_a_list_of_strings(key: str, value: object) -> None:
    assert problem({**STDIO, key: value}) == f"{AT}.{key}: must be a list of strings"


def test_only_the_first_bad_path_is_reported() -> None:
    # one problem per key: the list is refused as a whole
    assert problem({**STDIO, "write_paths": ["/", "rel"]}) == (
        f"{AT}.write_paths: '/': must be an absolute path, not / and without .."
    )


# --- parse_server: limits -------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["memory", "file_size"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (123, 123),
        ("512M", 512 << 20),
        ("512m", 512 << 20),
        ("4 GiB", 4 << 30),
        ("4GB", 4 << 30),
        ("1k", 1 << 10),
        ("2T", 2 << 40),
        ("100", 100),
        (" 8 MiB ", 8 << 20),
        ("unlimited", None),
    ],
)
def test_size_limits(key: str, value: object, expected: int | None) -> None:
    assert getattr(parse({**STDIO, key: value}).limits, key) == expected


@pytest.mark.parametrize("key", ["memory", "file_size"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, "must be positive"),
        (-1, "must be positive"),
        (True, 'must be a number of bytes, a size like "512M", or "unlimited"'),
        ("lots", 'must be a number of bytes, a size like "512M", or "unlimited"'),
        ("1.5G", 'must be a number of bytes, a size like "512M", or "unlimited"'),
        ("0M", 'must be a number of bytes, a size like "512M", or "unlimited"'),
        ("4 PB", 'must be a number of bytes, a size like "512M", or "unlimited"'),
        ("Unlimited", 'must be a number of bytes, a size like "512M", or "unlimited"'),
        (1.5, 'must be a number of bytes, a size like "512M", or "unlimited"'),
        (["1G"], 'must be a number of bytes, a size like "512M", or "unlimited"'),
    ],
)
def test_bad_size_limits(key: str, value: object, message: str) -> None:
    assert problem({**STDIO, key: value}) == f"{AT}.{key}: {message}"


@pytest.mark.parametrize("key", ["processes", "open_files"])
@pytest.mark.parametrize(("value", "expected"), [(1, 1), (64, 64), ("unlimited", None)])
def test_count_limits(key: str, value: object, expected: int | None) -> None:
    assert getattr(parse({**STDIO, key: value}).limits, key) == expected


@pytest.mark.parametrize("key", ["processes", "open_files"])
@pytest.mark.parametrize("value", [0, -5, True, "10", 1.5, "1K"])
def test_bad_count_limits(key: str, value: object) -> None:
    assert problem({**STDIO, key: value}) == f'{AT}.{key}: must be a positive integer or "unlimited"'


def test_a_bad_limit_keeps_the_others() -> None:
    assert problems({**STDIO, "memory": 0, "processes": 0, "open_files": 0, "file_size": 0}) == [
        f"{AT}.memory: must be positive",
        f'{AT}.processes: must be a positive integer or "unlimited"',
        f'{AT}.open_files: must be a positive integer or "unlimited"',
        f"{AT}.file_size: must be positive",
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(1, 1), ("1", 1), ("3K", 3072), ("3KiB", 3072), ("3 kb", 3072), ("1G", 1 << 30), ("unlimited", None)],
)
def test_parse_size(value: object, expected: int | None) -> None:
    assert parse_size(value) == expected


@pytest.mark.parametrize("value", [0, -1, False, True, None, "", "G", "-1G", "1 X", "1.0", 2.0, b"1G"])
def test_parse_size_refuses(value: object) -> None:
    with pytest.raises(ValueError):
        parse_size(value)


# --- parse_server: command_sha256, {agent}, unknown keys, names -------------------------------------


def test_command_sha256() -> None:
    assert parse({**STDIO, "command_sha256": SHA}).command_sha256 == SHA


@pytest.mark.parametrize("digest", [SHA.upper(), SHA[:-1], SHA + "0", "g" * 64, "sha256:" + SHA, ""])
def test_bad_command_sha256(digest: str) -> None:
    assert (
        problem({**STDIO, "command_sha256": digest}) == f"{AT}.command_sha256: must be 64 lowercase hexadecimal digits"
    )


def test_command_sha256_must_be_a_string() -> None:
    assert problem({**STDIO, "command_sha256": 1}) == f"{AT}.command_sha256: must be a string"


@pytest.mark.parametrize(("key", "value"), [("args", ["--as", "{agent}"]), ("env", {"WHO": "x-{agent}"})])
def test_agent_placeholder_only_for_per_caller_servers(key: str, value: object) -> None:
    # one instance for every agent has no single agent to fill in
    assert problem({**STDIO, key: value}) == f"{AT}.{key}: {{agent}} applies to per_caller = true servers only"
    assert getattr(parse({**STDIO, "per_caller": True, key: value}), key)


@pytest.mark.parametrize(
    ("key", "value"), [("cwd", "/srv/{agent}"), ("read_paths", ["/srv/{agent}"]), ("write_paths", ["/srv/{agent}"])]
)
def test_agent_placeholder_in_paths_only_for_per_caller_servers(key: str, value: object) -> None:
    assert problem({**STDIO, key: value}).startswith(f"{AT}.{key}: ")


def test_unknown_keys_each_reported_in_order() -> None:
    assert problems({**STDIO, "comand": "/bin/x", "Args": [], "environment": {}}) == [
        f"{AT}.Args: unknown key",
        f"{AT}.comand: unknown key",
        f"{AT}.environment: unknown key",
    ]


@pytest.mark.parametrize("name", ["a.b", "x y", "", "ä", "a/b", "a@b"])
def test_bad_server_names(name: str) -> None:
    # nothing else is looked at: the name is what every other message would start with
    with pytest.raises(ConfigError) as info:
        parse_server(name, {"bogus": 1}, SRC)
    assert info.value.problems == [f"{SRC}: servers.{name}: server names are [A-Za-z0-9_-]+"]


@pytest.mark.parametrize("name", ["a", "A-b_9", "x" * 100])
def test_good_server_names(name: str) -> None:
    assert parse(dict(STDIO), name=name).name == name


@pytest.mark.parametrize("table", ["command = /bin/x", ["command"], 1, None])
def test_a_definition_must_be_a_table(table: object) -> None:
    assert problems(table) == [f"{AT}: must be a table"]


def test_every_problem_is_reported() -> None:
    found = problems(
        {
            "url": "ftp://x",
            "bogus": 1,
            "args": ["${A}"],
            "timeout": 0,
            "headers": {"A": 1},
            "env_file": "rel",
        }
    )
    assert found == [
        f"{AT}.bogus: unknown key",
        f"{AT}.url: must be an http:// or https:// URL",
        f"{AT}.args: applies to stdio servers only",
        f"{AT}.args: cannot take ${{VAR}}: command lines are readable by every user",
        f"{AT}.timeout: must be a number of seconds, more than 0 and at most 3600",
        f"{AT}.headers: must be a table of strings",
        f"{AT}.env_file: must be an absolute path",
    ]
    assert all(p.startswith(f"{SRC}: servers.x.") for p in found)


def test_every_problem_of_a_stdio_table_is_reported() -> None:
    found = problems(
        {
            "command": "rel",
            "user": "-bad",
            "per_caller": "yes",
            "sandbox": "off",
            "network": "lan",
            "connect_ports": [0],
            "command_sha256": "abc",
            "cwd": "rel",
            "read_paths": ["/"],
            "write_paths": ["rel"],
            "memory": "huge",
        }
    )
    keys = [p.removeprefix(f"{AT}.").split(":")[0] for p in found]
    assert keys == [
        "command",
        "user",
        "per_caller",
        "sandbox",
        "network",
        "connect_ports",
        "command_sha256",
        "cwd",
        "read_paths",
        "write_paths",
        "memory",
    ]


# --- ServerDef.fingerprint --------------------------------------------------------------------------


def test_fingerprint_ignores_the_source_file() -> None:
    table = {**STDIO, "args": ["a"], "env": {"A": "1"}}
    assert parse(dict(table), source="/a.toml").fingerprint() == parse(dict(table), source="/b.toml").fingerprint()


@pytest.mark.parametrize(
    "change",
    [
        {"command": "/bin/other"},
        {"args": ("b",)},
        {"cwd": "/srv"},
        {"env": {"A": "2"}},
        {"env_file": "/e/x.env"},
        {"timeout": 9.0},
        {"user": "svc"},
        {"per_caller": True},
        {"sandbox": "strict"},
        {"network": "none"},
        {"connect_ports": (443,)},
        {"connect_ports": ()},
        {"read_paths": ("/srv",)},
        {"write_paths": ("/srv",)},
        {"limits": Limits(memory=None)},
        {"command_sha256": SHA},
    ],
)
def test_fingerprint_changes_with_every_field(change: dict[str, Any]) -> None:
    base = parse({**STDIO, "args": ["a"], "env": {"A": "1"}})
    assert dataclasses.replace(base, **change).fingerprint() != base.fingerprint()


def test_fingerprint_of_http_fields() -> None:
    base = parse({**HTTP, "headers": {"A": "1"}})
    assert dataclasses.replace(base, url="https://other.test/").fingerprint() != base.fingerprint()
    assert dataclasses.replace(base, headers={"A": "2"}).fingerprint() != base.fingerprint()


# --- config_files, read_toml, collect, load ---------------------------------------------------------


@pytest.fixture
def paths(tmp_root: str) -> Paths:
    p = Paths(tmp_root)
    os.makedirs(p.servers_d)
    os.makedirs(p.secrets, mode=0o700)
    return p


def test_config_files_order_and_skips(paths: Paths) -> None:
    for name in ("b.toml", "a.toml", ".hidden.toml", "notes.txt", "c.toml.disabled", "a.toml~"):
        write(f"{paths.servers_d}/{name}", "")
    assert config_files(paths) == [paths.broker_toml, f"{paths.servers_d}/a.toml", f"{paths.servers_d}/b.toml"]


def test_config_files_without_servers_d(paths: Paths) -> None:
    os.rmdir(paths.servers_d)
    assert config_files(paths) == [paths.broker_toml]


def test_config_files_servers_d_not_a_directory(paths: Paths) -> None:
    os.rmdir(paths.servers_d)
    write(paths.servers_d, "")
    with pytest.raises(ConfigError) as info:
        config_files(paths)
    assert info.value.problems == [f"{paths.servers_d}: Not a directory"]


def test_read_toml(paths: Paths) -> None:
    path = write(paths.broker_toml, '[servers.x]\ncommand = "/bin/tool"\n')
    assert read_toml(path) == {"servers": {"x": {"command": "/bin/tool"}}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff", "not valid UTF-8"),
        (b"[servers.x\n", "Expected ']'"),
        (b" " * (MAX_CONFIG_BYTES + 1), f"larger than {MAX_CONFIG_BYTES} bytes"),
    ],
)
def test_read_toml_problems_name_the_file(paths: Paths, data: bytes, message: str) -> None:
    path = write(paths.broker_toml, data)
    with pytest.raises(ConfigError) as info:
        read_toml(path)
    assert str(info.value).startswith(f"{path}: ") and message in str(info.value)


def test_read_toml_missing_and_unreadable(paths: Paths) -> None:
    with pytest.raises(ConfigError, match=r"broker\.toml: missing$"):
        read_toml(paths.broker_toml)
    with pytest.raises(ConfigError) as info:
        read_toml(paths.servers_d)  # a directory: open() fails with its own reason
    assert str(info.value) == f"{paths.servers_d}: Is a directory"


def test_collect_in_order_and_duplicates_name_both() -> None:
    docs: list[tuple[str, dict[str, Any]]] = [
        ("/a.toml", {"servers": {"one": dict(STDIO), "two": dict(HTTP)}}),
        ("/b.toml", {"servers": {"three": dict(STDIO), "one": dict(HTTP)}}),
        ("/c.toml", {"other": 1}),
    ]
    found, probs = collect(docs)
    assert list(found) == ["one", "two", "three"]
    assert found["one"].source == "/a.toml" and found["one"].transport == "stdio"  # the first one stays
    assert probs == ["/b.toml: servers.one: already defined in /a.toml"]


def test_collect_gathers_every_problem() -> None:
    docs: list[tuple[str, dict[str, Any]]] = [
        ("/a.toml", {"servers": {"bad": {"command": "rel"}, "ok": dict(STDIO)}}),
        ("/b.toml", {"servers": "not a table"}),
        ("/c.toml", {"servers": {"worse": {"url": "x", "bogus": 1}}}),
    ]
    found, probs = collect(docs)
    assert list(found) == ["ok"]
    assert probs == [
        "/a.toml: servers.bad.command: must be an absolute path",
        "/b.toml: servers: must be a table",
        "/c.toml: servers.worse.bogus: unknown key",
        "/c.toml: servers.worse.url: must be an http:// or https:// URL",
    ]


def test_collect_duplicate_of_a_broken_definition() -> None:
    found, probs = collect(
        [("/a.toml", {"servers": {"one": {"command": "rel"}}}), ("/b.toml", {"servers": {"one": dict(STDIO)}})]
    )
    assert "/b.toml: servers.one: already defined in /a.toml" in probs, probs
    assert "one" not in found


def test_load_servers_sandbox_and_problems(paths: Paths) -> None:
    write(paths.broker_toml, '[sandbox]\ndisable = ["landlock"]\n[servers.a]\ncommand = "/bin/tool"\n')
    b = write(f"{paths.servers_d}/b.toml", '[servers.b]\nurl = "http://b/"\n')
    found, sandbox, probs = servers.load(paths)
    assert list(found) == ["a", "b"] and found["b"].source == b
    assert sandbox == {"disable": ["landlock"]}
    assert probs == []


def test_load_refuses_sandbox_in_servers_d(paths: Paths) -> None:
    write(paths.broker_toml, '[servers.a]\ncommand = "/bin/tool"\n')
    f = write(f"{paths.servers_d}/x.toml", '[sandbox]\ndisable = ["landlock"]\n')
    found, sandbox, probs = servers.load(paths)
    assert probs == [f"{f}: [sandbox] belongs in {paths.broker_toml}"]
    assert sandbox == {}  # not taken from the wrong file
    assert list(found) == ["a"]


def test_load_reports_every_problem(paths: Paths) -> None:
    write(paths.broker_toml, '[sandbox]\nbogus = 1\n[servers.a]\ncommand = "rel"\n')
    broken = write(f"{paths.servers_d}/a.toml", "[servers.x\n")
    ok = write(f"{paths.servers_d}/b.toml", '[servers.b]\ncommand = "/bin/tool"\n')
    found, _sandbox, probs = servers.load(paths)
    assert list(found) == ["b"] and found["b"].source == ok
    assert len(probs) == 3
    assert probs[0].startswith(f"{broken}: ")
    assert probs[1:] == [
        f"{paths.broker_toml}: servers.a.command: must be an absolute path",
        f"{paths.broker_toml}: sandbox.bogus: unknown key",
    ]


def test_load_without_broker_toml(paths: Paths) -> None:
    found, sandbox, probs = servers.load(paths)
    assert (found, sandbox, probs) == ({}, {}, [f"{paths.broker_toml}: missing"])


# --- host_settings ([sandbox]) ----------------------------------------------------------------------


def test_host_settings() -> None:
    assert host_settings({}, SRC) == frozenset()
    assert host_settings({"disable": []}, SRC) == frozenset()
    every = list(servers.PROTECTIONS)
    assert host_settings({"disable": every}, SRC) == frozenset(every)
    assert host_settings({"disable": ["landlock", "landlock"]}, SRC) == frozenset({"landlock"})


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        (1, [f"{SRC}: sandbox: must be a table"]),
        ({"disable": "landlock"}, [f"{SRC}: sandbox.disable: must be a list of names"]),
        ({"disable": ["landlock", 1]}, [f"{SRC}: sandbox.disable: must be a list of names"]),
        (
            {"disable": ["seccomp", "Landlock"]},
            [
                f"{SRC}: sandbox.disable: 'seccomp' is none of pid_namespace, mount_namespace, network_namespace,"
                " landlock",
                f"{SRC}: sandbox.disable: 'Landlock' is none of pid_namespace, mount_namespace, network_namespace,"
                " landlock",
            ],
        ),
        (
            {"strict": True, "disable": 1},
            [f"{SRC}: sandbox.strict: unknown key", f"{SRC}: sandbox.disable: must be a list of names"],
        ),
    ],
)
def test_bad_host_settings(table: object, expected: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        host_settings(table, SRC)
    assert info.value.problems == expected


# --- instance names and accounts --------------------------------------------------------------------


def test_instance_name() -> None:
    assert instance_name("demo", None) == "demo"
    assert instance_name("demo", "moltbot") == "demo@moltbot"


def test_server_user_for_plain_and_per_caller() -> None:
    assert server_user_for("demo") == "mcp-srv-demo"
    assert server_user_for("demo", None) == "mcp-srv-demo"
    assert server_user_for("demo", "moltbot") == "mcp-srv-demo.moltbot"
    assert server_user_for("a-b") != server_user_for("a", "b")  # a server name holds no dot
    assert len(server_user_for("x" * 24)) == MAX_USER_NAME and server_user_for("x" * 24) == "mcp-srv-" + "x" * 24


@pytest.mark.parametrize(
    ("server", "agent"), [("x" * 25, None), ("Demo", None), ("demo", "Moltbot"), ("demo", "a$"), ("d", "a" * 30)]
)
def test_server_user_for_cuts_and_digests(server: str, agent: str | None) -> None:
    user = server_user_for(server, agent)
    assert len(user) <= MAX_USER_NAME
    assert re.fullmatch(r"mcp-srv-[a-z0-9_.-]*-[0-9a-f]{8}", user), user
    whole = server if agent is None else f"{server}.{agent}"
    assert user.endswith("-" + hashlib.sha256(whole.encode()).hexdigest()[:8])


def test_server_user_for_case_is_not_folded_into_a_collision() -> None:
    # "Demo" must not become "demo"'s account: the digest keeps them apart
    assert server_user_for("Demo") != server_user_for("demo")
    assert server_user_for("demo", "Bob") != server_user_for("demo", "bob")


SERVER_NAMES = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", min_size=1, max_size=40
)
AGENT_NAMES = st.none() | st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.$-]{0,40}", fullmatch=True)


@given(server=SERVER_NAMES, agent=AGENT_NAMES)
def test_server_user_for_is_a_safe_user_name(server: str, agent: str | None) -> None:
    user = server_user_for(server, agent)
    assert user.startswith(servers.SERVER_USER_PREFIX)
    assert len(user) <= MAX_USER_NAME  # useradd's limit
    assert valid_user_name(user) and re.fullmatch(r"[a-z0-9_.-]+", user)  # lowercase, no "$"
    assert not user.startswith(GATE_USER_PREFIX) and user not in (BROKER_USER, GATE_USER)
    assert server_user_for(server, agent) == user  # the same every time: reload finds the account again


@given(pairs=st.lists(st.tuples(SERVER_NAMES, AGENT_NAMES), min_size=2, max_size=20, unique=True))
def test_server_user_for_distinct_inputs_get_distinct_accounts(pairs: list[tuple[str, str | None]]) -> None:
    users = [server_user_for(s, a) for s, a in pairs]
    assert len(set(users)) == len(users), list(zip(pairs, users, strict=True))


def test_account_of() -> None:
    default = parse(dict(STDIO), name="demo")
    explicit = parse({**STDIO, "user": "svc"}, name="demo")
    per_caller = parse({**STDIO, "per_caller": True}, name="demo")
    assert account_of(default) == "mcp-srv-demo"
    assert account_of(explicit) == "svc"
    assert account_of(per_caller, "alice") == "mcp-srv-demo.alice"
    assert account_of(default, "alice") == "mcp-srv-demo.alice"


def test_instances() -> None:
    defs = {
        "a": parse(dict(STDIO), name="a"),
        "web": parse(dict(HTTP), name="web"),  # nothing to run: the daemon connects to it
        "p": parse({**STDIO, "per_caller": True}, name="p"),
    }
    assert [(d.name, agent) for d, agent in instances(defs, ["alice", "bob"])] == [
        ("a", None),
        ("p", "alice"),
        ("p", "bob"),
    ]
    assert [(d.name, agent) for d, agent in instances(defs, [])] == [("a", None)]


# account_problems runs against the real accounts of this machine


def _find(predicate: Callable[[pwd.struct_passwd], bool]) -> pwd.struct_passwd | None:
    return next((pw for pw in sorted(pwd.getpwall(), key=lambda p: p.pw_uid) if predicate(pw)), None)


def _exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def _ours(pw: pwd.struct_passwd) -> bool:
    return pw.pw_name in (BROKER_USER, GATE_USER) or pw.pw_name.startswith(GATE_USER_PREFIX)


def _unique_uid(pw: pwd.struct_passwd) -> bool:
    return sum(1 for other in pwd.getpwall() if other.pw_uid == pw.pw_uid) == 1


def _nologin() -> str:
    pw = _find(
        lambda p: p.pw_name == "nobody" and p.pw_uid != 0 and p.pw_shell in NO_LOGIN_SHELLS and _unique_uid(p)
    ) or _find(lambda p: p.pw_uid != 0 and p.pw_shell in NO_LOGIN_SHELLS and not _ours(p) and _unique_uid(p))
    if pw is None:
        pytest.skip("no account without a login shell on this machine")
    return pw.pw_name


def _user(name: str, user: str) -> dict[str, ServerDef]:
    return {name: parse({**STDIO, "user": user}, name=name)}


def test_root_is_refused() -> None:
    assert account_problems(_user("x", "root"), {}) == {"x": "its user root is root: a server never runs as that"}


def test_an_account_with_a_login_shell_is_refused() -> None:
    pw = _find(lambda p: p.pw_uid != 0 and p.pw_shell.endswith("sh") and not _ours(p) and _unique_uid(p)) or _find(
        lambda p: p.pw_uid != 0 and p.pw_shell not in NO_LOGIN_SHELLS and not _ours(p) and _unique_uid(p)
    )
    if pw is None:
        pytest.skip("no account with a login shell besides root on this machine")
    assert account_problems(_user("x", pw.pw_name), {}) == {
        "x": f"its user {pw.pw_name} has a login shell ({pw.pw_shell}); a server's account must not"
    }


def test_a_locked_account_is_accepted() -> None:
    user = _nologin()
    assert account_problems(_user("x", user), {}) == {}
    assert account_problems(_user("x", user), {}, missing_ok=True) == {}


def test_a_uid_shared_by_two_servers_is_refused() -> None:
    user = _nologin()
    defs = {**_user("a", user), **_user("b", user)}
    uid = pwd.getpwnam(user).pw_uid
    # the first keeps it: each server needs its own uid, or it could signal and ptrace the other
    assert account_problems(defs, {}) == {"b": f"its user {user} (uid {uid}) already runs a; each needs its own"}


def test_the_broker_and_gate_accounts_are_refused() -> None:
    present = [name for name in (BROKER_USER, GATE_USER) if _exists(name)]
    if not present:
        pytest.skip(f"neither {BROKER_USER} nor {GATE_USER} exists on this machine")
    for name in present:
        assert account_problems(_user("x", name), {}) == {
            "x": f"its user {name} is the account {name}: a server never runs as that"
        }


def test_a_gate_user_is_refused() -> None:
    # as the agent's gate user (from the map) and, for one not in the map, by its name
    gate = _nologin()
    assert account_problems(_user("x", gate), {"some-agent": gate}) == {
        "x": f"its user {gate} is the account {gate}: a server never runs as that"
    }
    pw = _find(lambda p: p.pw_name.startswith(GATE_USER_PREFIX) and p.pw_uid != 0 and _unique_uid(p))
    if pw is None:
        pytest.skip(f"no {GATE_USER_PREFIX}* account on this machine")
    assert account_problems(_user("x", pw.pw_name), {}) == {
        "x": f"its user {pw.pw_name} is a gate user: a server never runs as that"
    }


def test_an_agents_own_account_is_refused() -> None:
    agent = _nologin()  # a locked agent account is still an agent: it must not become a server
    assert account_problems(_user("x", agent), {agent: "no-such-gate-user-zz"}) == {
        "x": f"its user {agent} is the agent {agent}: a server never runs as that"
    }


def test_a_missing_default_account() -> None:
    defs = {"zz-unit-nosuch": parse(dict(STDIO), name="zz-unit-nosuch")}
    account = "mcp-srv-zz-unit-nosuch"
    assert not _exists(account)
    assert account_problems(defs, {}) == {
        "zz-unit-nosuch": f"its user {account} does not exist (run 'mcp-brokerctl reload' or 'install')"
    }
    assert account_problems(defs, {}, missing_ok=True) == {}  # install and reload create it


def test_a_missing_explicit_account_is_reported_even_when_missing_is_ok() -> None:
    assert not _exists("zz-unit-nosuch-user")
    # nothing creates an explicit user = "...": it must exist
    for missing_ok in (False, True):
        assert account_problems(_user("x", "zz-unit-nosuch-user"), {}, missing_ok=missing_ok) == {
            "x": "its user zz-unit-nosuch-user does not exist"
        }


def test_per_caller_instances_and_http_servers() -> None:
    defs = {
        "p": parse({**STDIO, "per_caller": True}, name="p"),
        "web": parse(dict(HTTP), name="web"),
    }
    agents = {"zz-unit-agent-a": "zz-unit-gate-a", "zz-unit-agent-b": "zz-unit-gate-b"}
    found = account_problems(defs, agents)
    hint = "(run 'mcp-brokerctl reload' or 'install')"
    assert found == {
        "p@zz-unit-agent-a": f"its user mcp-srv-p.zz-unit-agent-a does not exist {hint}",
        "p@zz-unit-agent-b": f"its user mcp-srv-p.zz-unit-agent-b does not exist {hint}",
    }
    assert account_problems(defs, agents, missing_ok=True) == {}


# --- read_env_file ------------------------------------------------------------------------------------


def env_file(paths: Paths, text: str | bytes, name: str = "x.env", mode: int = 0o600) -> str:
    return write(f"{paths.secrets}/{name}", text, mode)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("A=1\nB = two words \n", {"A": "1", "B": "two words"}),
        ("# c\n\n   \nexport A=1\n  # indented comment\n", {"A": "1"}),
        ("export   A = 1\n", {"A": "1"}),
        (
            "A='x y'\nB=\"z\"\nC='unbalanced\nD='mixed\"\nE='\n",
            {"A": "x y", "B": "z", "C": "'unbalanced", "D": "'mixed\"", "E": "'"},
        ),
        ("A=''\nB=\"\"\n", {"A": "", "B": ""}),
        ("A=a=b=c\n", {"A": "a=b=c"}),
        ("A=#not a comment\n", {"A": "#not a comment"}),
        ("A=\n", {"A": ""}),
        ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
        ("A=1\nA=2\n", {"A": "2"}),
        ("A=1", {"A": "1"}),
        ("", {}),
        ("A=ünïcødé\n", {"A": "ünïcødé"}),
    ],
)
def test_env_file_parsing(paths: Paths, text: str, expected: dict[str, str]) -> None:
    assert read_env_file(env_file(paths, text), OWN) == expected


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("A=1\nnot a pair\n", 2),
        ("1A=x\n", 1),
        ("=x\n", 1),
        ("A-B=x\n", 1),
        ("\n\nexport\n", 3),
        ("# ok\nexport =x\n", 2),
        ("A B=x\n", 1),
    ],
)
def test_env_file_bad_lines(paths: Paths, text: str, line: int) -> None:
    path = env_file(paths, text)
    with pytest.raises(ConfigError) as info:
        read_env_file(path, OWN)
    assert str(info.value) == f"{path}:{line}: expected KEY=VALUE"


def test_env_file_nul_refused(paths: Paths) -> None:
    path = env_file(paths, "A=ok\nB=x\0y\n")
    with pytest.raises(ConfigError) as info:
        read_env_file(path, OWN)
    assert str(info.value) == f"{path}:2: a value must not contain a NUL character"


def test_env_file_bad_utf8(paths: Paths) -> None:
    path = env_file(paths, b"A=\xff\n")
    with pytest.raises(ConfigError) as info:
        read_env_file(path, OWN)
    assert str(info.value) == f"{path}: env file is not valid UTF-8"


def test_env_file_size_limit(paths: Paths) -> None:
    at_limit = "A=" + "x" * (MAX_ENV_FILE_BYTES - 3) + "\n"
    assert len(at_limit) == MAX_ENV_FILE_BYTES
    assert read_env_file(env_file(paths, at_limit), OWN)["A"] == "x" * (MAX_ENV_FILE_BYTES - 3)
    path = env_file(paths, at_limit + "B", name="big.env")
    with pytest.raises(ConfigError) as info:
        read_env_file(path, OWN)
    assert str(info.value) == f"{path}: env file too large"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o606, 0o610, 0o601, 0o620, 0o602, 0o700 | 0o070])
def test_env_file_accessible_by_group_or_other_is_refused(paths: Paths, mode: int) -> None:
    path = env_file(paths, "TOKEN=abcd\n", mode=mode)
    with pytest.raises(ConfigError) as info:
        read_env_file(path, OWN)
    assert str(info.value) == (
        f"{path}: env file is accessible by group or other (mode {mode:04o}); secrets must be 0600"
    )


@pytest.mark.parametrize("mode", [0o600, 0o400, 0o200, 0o000])
def test_private_env_file_modes(paths: Paths, mode: int) -> None:
    # the owner's own bits do not matter (the spawner reads as root, 0400 is fine)
    path = env_file(paths, "TOKEN=abcd\n", mode=mode)
    if mode & 0o400 == 0 and os.geteuid() != 0:
        pytest.skip("only root reads a file its owner cannot read")
    assert read_env_file(path, OWN) == {"TOKEN": "abcd"}


def test_env_file_owned_by_someone_else_is_refused(paths: Paths) -> None:
    path = env_file(paths, "TOKEN=abcd\n")
    others = frozenset({os.getuid() + 1})
    with pytest.raises(ConfigError) as info:
        read_env_file(path, others)
    assert str(info.value) == (
        f"{path}: env file must be owned by root (owner uid {os.getuid()}); "
        "'mcp-brokerctl install' fixes the files it knows"
    )


@needs_root
def test_env_file_not_owned_by_root_is_refused_by_default(paths: Paths) -> None:
    path = env_file(paths, "TOKEN=abcd\n")
    assert read_env_file(path) == {"TOKEN": "abcd"}  # root's: the spawner's default
    os.chown(path, NOBODY_UID, NOBODY_UID)
    with pytest.raises(ConfigError, match=rf"owner uid {NOBODY_UID}\)"):
        read_env_file(path)


def test_env_file_symlink_is_refused(paths: Paths) -> None:
    # O_NOFOLLOW: a link in secrets/ could point the spawner at any root-owned file
    real = env_file(paths, "A=b\n", name="real.env")
    link = f"{paths.secrets}/link.env"
    os.symlink(real, link)
    with pytest.raises(ConfigError) as info:
        read_env_file(link, OWN)
    assert str(info.value).startswith(f"{link}: cannot open env file: ")
    assert read_env_file(real, OWN) == {"A": "b"}


def test_env_file_missing(paths: Paths) -> None:
    path = f"{paths.secrets}/absent.env"
    with pytest.raises(ConfigError) as info:
        read_env_file(path, OWN)
    assert str(info.value) == f"{path}: env file missing"


def test_env_file_directory_and_fifo_are_refused(paths: Paths) -> None:
    d = f"{paths.secrets}/dir.env"
    os.mkdir(d, 0o700)
    fifo = f"{paths.secrets}/fifo.env"
    os.mkfifo(fifo, 0o600)  # O_NONBLOCK: opening it must not hang
    for path in (d, fifo):
        with pytest.raises(ConfigError) as info:
            read_env_file(path, OWN)
        assert str(info.value) == f"{path}: env file is not a regular file"


# --- instance_env_file and substitute -------------------------------------------------------------------


def test_instance_env_file(paths: Paths) -> None:
    defn = parse({**STDIO, "per_caller": True}, name="p")
    assert instance_env_file(paths, defn, None) is None
    assert instance_env_file(paths, defn, "alice") is None  # none yet: the server's own file serves alone
    own = env_file(paths, "A=1\n", name="p@alice.env")
    assert instance_env_file(paths, defn, "alice") == own
    os.symlink("/nonexistent", f"{paths.secrets}/p@bob.env")
    # a dangling link is still named, so that reading it fails instead of being skipped
    assert instance_env_file(paths, defn, "bob") == f"{paths.secrets}/p@bob.env"


def test_substitute() -> None:
    env = {"A": "alpha", "B": "${A}", "EMPTY": ""}
    assert substitute("x${A}y${A}", env, "w") == "xalphayalpha"
    assert substitute("${B}", env, "w") == "${A}"  # one pass: a value is never expanded again
    assert substitute("[${EMPTY}]", env, "w") == "[]"
    assert substitute("$A ${ A } ${1A} plain", env, "w") == "$A ${ A } ${1A} plain"
    with pytest.raises(ConfigError) as info:
        substitute("${A}${NOPE}", env, "/f.toml: servers.x.url")
    assert str(info.value) == "/f.toml: servers.x.url: ${NOPE} is not defined in the server's env_file"


# --- resolve ------------------------------------------------------------------------------------------


def _resolve(defn: ServerDef, paths: Paths, agents: list[str] | None = None) -> Secrets:
    return resolve(defn, paths, agents or [], OWN)


def _refusal(defn: ServerDef, paths: Paths, agents: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        _resolve(defn, paths, agents)
    return str(info.value)


def test_resolve_http_server(paths: Paths) -> None:
    env = env_file(paths, 'HA_TOKEN="tok-abc-123"\nHOST=127.0.0.1\nEMPTY=\n', name="ha.env")
    defn = parse(
        {
            "url": "http://${HOST}:8123/api/mcp",
            "env_file": env,
            "headers": {
                "Authorization": "Bearer ${HA_TOKEN}",
                "X-Raw": "${HA_TOKEN}",
                "X-Lit": "literal-key",
                "X-Empty": "${EMPTY}",
            },
        },
        name="ha",
    )
    s = _resolve(defn, paths)
    assert s.url == "http://127.0.0.1:8123/api/mcp"
    assert s.headers == {
        "Authorization": "Bearer tok-abc-123",
        "X-Raw": "tok-abc-123",
        "X-Lit": "literal-key",
        "X-Empty": "",
    }
    # every env value is a secret; header values too (a literal key in broker.toml is one), each once,
    # and no empty value (it would match everywhere)
    assert s.redact == {
        "ha.HA_TOKEN": "tok-abc-123",
        "ha.HOST": "127.0.0.1",
        "ha.header.Authorization": "Bearer tok-abc-123",
        "ha.header.X-Lit": "literal-key",
    }
    assert defn.url == "http://${HOST}:8123/api/mcp"  # the definition keeps its template
    # what the daemon does with it: Server.url, headers and secret_values() come from these Secrets
    server = Server(name="ha", source=SRC, spec=defn, secrets=s)
    assert server.url == s.url and server.headers == s.headers and server.secret_values() == s.redact


def test_resolve_without_env_file(paths: Paths) -> None:
    s = _resolve(parse(dict(STDIO)), paths)
    assert (s.redact, s.url, s.headers) == ({}, None, {})
    assert s.fingerprint == _resolve(parse({**STDIO, "args": ["other"]}), paths).fingerprint


def test_daemon_environment_is_never_substituted(paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_DAEMON_ENV", "leak")
    defn = parse({"url": "http://x/${FROM_DAEMON_ENV}"}, name="ha")
    assert (
        _refusal(defn, paths) == f"{SRC}: servers.ha.url: ${{FROM_DAEMON_ENV}} is not defined in the server's env_file"
    )


def test_undefined_var_in_headers_names_the_header(paths: Paths) -> None:
    env = env_file(paths, "HA_TOKEN=tok-1234\n")
    defn = parse({"url": "http://x/", "env_file": env, "headers": {"Authorization": "Bearer ${NOPE}"}}, name="ha")
    assert _refusal(defn, paths) == (
        f"{SRC}: servers.ha.headers.Authorization: ${{NOPE}} is not defined in the server's env_file"
    )


def test_var_from_another_servers_env_file_is_undefined(paths: Paths) -> None:
    a_env = env_file(paths, "SECRET_A=only-for-a\n", name="a.env")
    a = parse({"url": "http://a/${SECRET_A}", "env_file": a_env}, name="a")
    b = parse({"url": "http://b/", "headers": {"H": "${SECRET_A}"}}, name="b")
    assert _resolve(a, paths).url == "http://a/only-for-a"
    assert _refusal(b, paths) == f"{SRC}: servers.b.headers.H: ${{SECRET_A}} is not defined in the server's env_file"


@pytest.mark.parametrize(
    ("args", "command"),
    [
        (["--token", "s3cr3t-value"], "/bin/tool"),
        (["--token=s3cr3t-value"], "/bin/tool"),
        (["prefix-s3cr3t-value-suffix"], "/bin/tool"),
        ([], "/opt/s3cr3t-value/bin/tool"),
        (["a", "abcd"], "/bin/tool"),  # four characters are enough to count
    ],
)
def test_secret_from_env_file_in_args_is_refused(paths: Paths, args: list[str], command: str) -> None:
    env = env_file(paths, "TOKEN=s3cr3t-value\nSHORT=abcd\n")
    defn = parse({"command": command, "args": args, "env_file": env})
    assert _refusal(defn, paths) == (f"{AT}.args: holds a secret from its env file; command lines are world-readable")


def test_short_values_and_other_args_are_fine(paths: Paths) -> None:
    # a value under four characters ("1", "on") would match far too much to mean anything
    env = env_file(paths, "TOKEN=s3cr3t-value\nDEBUG=on\nLEVEL=1\n")
    defn = parse({"command": "/bin/tool", "args": ["--token-file", env, "-v", "1", "on"], "env_file": env})
    assert _resolve(defn, paths).redact == {"x.TOKEN": "s3cr3t-value", "x.DEBUG": "on", "x.LEVEL": "1"}


def test_key_in_env_and_env_file_is_refused(paths: Paths) -> None:
    # the secret one would silently win or lose; there must be one place for it
    env = env_file(paths, "TOKEN=s3cr3t-value\nB=x\n")
    defn = parse({**STDIO, "env": {"B": "plain", "A": "plain"}, "env_file": env})
    assert _refusal(defn, paths) == f"{AT}.env: B is set both here and in its env file; keep it in one place"


@pytest.mark.parametrize(
    ("text", "suffix"),
    [("oops\n", ":1: expected KEY=VALUE"), (None, ": env file missing")],
)
def test_env_file_problems_name_the_server(paths: Paths, text: str | None, suffix: str) -> None:
    path = env_file(paths, text) if text is not None else f"{paths.secrets}/absent.env"
    defn = parse({**STDIO, "env_file": path})
    assert _refusal(defn, paths) == f"{path}{suffix} (env_file of servers.x in {SRC})"


def test_env_file_of_someone_else_is_refused_by_resolve(paths: Paths) -> None:
    path = env_file(paths, "A=bcde\n")
    defn = parse({**STDIO, "env_file": path})
    with pytest.raises(ConfigError, match=r"must be owned by root .* \(env_file of servers\.x in "):
        resolve(defn, paths, [], frozenset({os.getuid() + 1}))


def test_env_file_that_is_a_directory(paths: Paths) -> None:
    d = f"{paths.secrets}/dir.env"
    os.mkdir(d, 0o700)
    assert _refusal(parse({**STDIO, "env_file": d}), paths) == (
        f"{d}: env file is not a regular file (env_file of servers.x in {SRC})"
    )


def _per_caller(paths: Paths, **table: Any) -> ServerDef:
    return parse({**STDIO, "per_caller": True, **table}, name="p")


def test_per_caller_env_file_overlays_the_servers(paths: Paths) -> None:
    base = env_file(paths, "SHARED=shared-1\nTOKEN=base-token\n", name="p.env")
    env_file(paths, "TOKEN=alice-token\nOWN=alice-own\n", name="p@alice.env")
    s = _resolve(_per_caller(paths, env_file=base), paths, ["alice", "bob"])
    assert s.redact == {
        "p.SHARED": "shared-1",
        "p.TOKEN": "base-token",
        "p@alice.SHARED": "shared-1",
        "p@alice.TOKEN": "alice-token",
        "p@alice.OWN": "alice-own",
        "p@bob.SHARED": "shared-1",  # bob has no file of his own: the server's serves him
        "p@bob.TOKEN": "base-token",
    }
    assert s.url is None and s.headers == {}


def test_per_caller_env_file_without_a_server_env_file(paths: Paths) -> None:
    env_file(paths, "OWN=alice-own\n", name="p@alice.env")
    s = _resolve(_per_caller(paths), paths, ["alice"])
    assert s.redact == {"p@alice.OWN": "alice-own"}


def test_instance_env_files_count_only_for_per_caller_servers(paths: Paths) -> None:
    env_file(paths, "OWN=alice-own\n", name="x@alice.env")
    assert _resolve(parse(dict(STDIO)), paths, ["alice"]).redact == {}


def test_per_caller_secret_in_args_is_refused(paths: Paths) -> None:
    env_file(paths, "OWN=alice-own\n", name="p@alice.env")
    defn = _per_caller(paths, args=["--x", "alice-own"])
    assert _refusal(defn, paths, ["alice"]) == (
        f"{SRC}: servers.p.args: holds a secret from its env file; command lines are world-readable"
    )


def test_per_caller_key_in_env_is_refused(paths: Paths) -> None:
    env_file(paths, "LEVEL=secret-level\n", name="p@alice.env")
    defn = _per_caller(paths, env={"LEVEL": "info"})
    assert _refusal(defn, paths, ["alice"]) == (
        f"{SRC}: servers.p.env: LEVEL is set both here and in its env file; keep it in one place"
    )


def test_per_caller_env_file_problems(paths: Paths) -> None:
    real = env_file(paths, "A=bcde\n", name="elsewhere.env")
    link = f"{paths.secrets}/p@alice.env"
    os.symlink(real, link)
    message = _refusal(_per_caller(paths), paths, ["alice"])
    assert message.startswith(f"{link}: cannot open env file: ")
    assert message.endswith(f" (env_file of servers.p in {SRC})")
    os.unlink(link)
    env_file(paths, "A=bcde\n", name="p@alice.env", mode=0o644)
    assert "accessible by group or other" in _refusal(_per_caller(paths), paths, ["alice"])


def test_fingerprint_follows_the_env_files(paths: Paths) -> None:
    env = env_file(paths, "TOKEN=one-1234\n")
    defn = parse({"url": "http://x/${TOKEN}", "env_file": env})
    first = _resolve(defn, paths).fingerprint
    assert _resolve(defn, paths).fingerprint == first  # unchanged file: the session is kept
    env_file(paths, "TOKEN=two-1234\n")
    assert _resolve(defn, paths).fingerprint != first
    env_file(paths, "TOKEN=one-1234\n")
    assert _resolve(defn, paths).fingerprint == first


def test_fingerprint_follows_a_per_caller_env_file(paths: Paths) -> None:
    defn = _per_caller(paths)
    none = _resolve(defn, paths, ["alice"]).fingerprint
    env_file(paths, "OWN=alice-1\n", name="p@alice.env")
    one = _resolve(defn, paths, ["alice"]).fingerprint
    env_file(paths, "OWN=alice-2\n", name="p@alice.env")
    two = _resolve(defn, paths, ["alice"]).fingerprint
    assert len({none, one, two}) == 3
