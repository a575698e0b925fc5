"""Secret and plain settings kept apart (issue 17): ``env_file`` values are secrets, ``env = {...}`` values are not.

* ``import``'s one rule, :func:`broker.admin.importer.classify`, as a table of
  examples both ways (and :func:`secret_key`, the key half of it); an import
  of the issue's own config puts NODE_ENV and the repository path in ``env``
  and only the token in the env file, and its report names keys only;
* :func:`broker.core.servers.plain_setting`, the value half ``check`` warns with;
* ``resolve`` never counts a plain ``env`` value as a secret: it is not in
  ``Secrets.redact``, the daemon's redactor leaves it in results, and an
  argument holding it is fine; an env-file value in ``args`` is still
  refused, with the way out when it looks like a plain setting;
* ``check_warnings``: an env-file value that is short, a common word, a
  number, a path, a URL without credentials or a host is one warning naming
  the server, the file and the key (never the value); ``check_all`` finds no
  problem in it (``check`` exits 0); ``doctor`` shows the same warnings.
"""

from __future__ import annotations

import json
import os
import tomllib

import pytest

from broker.admin import check, importer
from broker.admin.doctor import Doctor
from broker.admin.importer import classify, secret_key
from broker.core.errors import ConfigError
from broker.core.paths import Paths
from broker.core.servers import parse_server, plain_setting, resolve
from broker.daemon.redact import Redactor
from tests.unit.conftest import write

OWN = frozenset({os.getuid()})
PY = "/usr/bin/python3"
TOKEN = "ghp_R4nd0mT0kenValue000111222333444"


@pytest.fixture
def paths(tmp_root: str) -> Paths:
    p = Paths(tmp_root)
    os.makedirs(p.servers_d)
    os.makedirs(p.secrets, mode=0o700)
    return p


# --- the rule of import: a table both ways ---------------------------------------------------------

SECRETS = [
    # by the value's shape, whatever the key
    ("X", TOKEN),
    ("GH", "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz"),
    ("GH", "gho_16C7e42F292c6912E7710c838347Ae178B4a"),
    ("OPENAI", "sk-proj-abcdefghijklmnop0123"),
    ("STRIPE", "sk_live_4eC39HqLyjWDarjtT1zdp7dc"),
    ("SLACK", "xoxb-123456789012-1234567890123-AbCdEfGhIjKlMnOpQrStUvWx"),
    ("SLACK", "xoxp-123456789012-123456789012-abcdef"),
    ("AWS", "AKIAIOSFODNN7EXAMPLE"),
    ("AUTHZ", "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"),
    ("HEADER", "Bearer abc.def"),
    ("DATABASE_URL", "postgres://app:hunter2@db.internal:5432/app"),
    ("REPO_URL", "https://ghp_R4nd0mT0kenValue000111222333444@github.com/o/r.git"),
    ("HOOK", "https://api.example.com/hook?access_token=abcdef"),
    ("CONN", "host=db user=app password=hunter2 dbname=app"),
    ("ID", "a1B2c3D4e5F6g7H8i9J0kLmN"),  # long, high entropy
    ("DB", "s3cretdb"),  # unsure (random-looking): fail closed
    ("X", "P@ssw0rd!"),
    ("PEM", "-----BEGIN PRIVATE KEY----- MIIE"),
    # by the key's name
    ("API_KEY", "plainvalue"),
    ("apiKey", "abc"),
    ("GITHUB_TOKEN", "short"),
    ("DB_PASSWORD", "hunter2"),
    ("MYSQL_PWD", "x"),
    ("SMTP_PASS", "mail"),
    ("CLIENT_SECRET", "abc"),
    ("SESSION_COOKIE", "abc"),
    ("AUTHTOKEN", "abc"),
    ("PRIVATE_KEY", "abc"),
    ("HA_CREDENTIALS", "user:pw"),
    ("SESSION_SECRET", "production"),  # a common word, but the name says secret: check warns about it
    ("PIN", "1234"),
    ("API_KEY", ""),  # to fill in: its place is the env file
]

PLAIN = [
    ("NODE_ENV", "production"),
    ("LOG_LEVEL", "debug"),
    ("npm_config_loglevel", "error"),
    ("DEBUG", "true"),
    ("ENABLED", "off"),
    ("PORT", "8080"),
    ("TIMEOUT", "2.5"),
    ("REPO", "/srv/repo"),
    ("DATA", "~/data"),
    ("BASE_URL", "https://api.example.com/v1"),
    ("DB_URL", "postgres://app@db.internal/app"),  # a user but no password
    ("HOST", "db.example.com"),
    ("BIND", "0.0.0.0"),
    ("UPSTREAM", "192.168.1.10:8080"),
    ("MODEL", "gpt-4o-mini"),
    ("REGION", "us-east-1"),
    ("TZ", "Europe/Berlin"),
    ("LANG", "en_US.UTF-8"),
    ("GREETING", "hello world"),
    ("EMPTY", ""),
    ("PWD", "/home/user"),  # the shell's working directory, not a password
    ("OLDPWD", "/tmp"),
    ("TOKENIZERS_PARALLELISM", "false"),  # TOKEN is not a word of it
    ("KEYBOARD", "us"),
    # settings about a credential, named by their last word
    ("TOKEN_TTL", "3600"),
    ("SESSION_TIMEOUT", "30m"),
    ("AUTH_MODE", "oauth"),
    ("AUTH_URL", "https://auth.example.com/login"),
    ("COOKIE_NAME", "sid"),
    ("KEY_FILE", "/etc/ssl/private/server.key"),
    # a name naming a credential, but a value that cannot be one
    ("GOOGLE_APPLICATION_CREDENTIALS", "/etc/gcloud/creds.json"),
    ("REQUIRE_AUTH", "true"),
    ("PRIVATE", "no"),
]


@pytest.mark.parametrize(("key", "value"), SECRETS)
def test_a_secret_goes_to_the_env_file(key: str, value: str) -> None:
    verdict = classify(key, value)
    assert verdict.secret, verdict
    assert value not in verdict.why or not value  # the reason never holds the value


@pytest.mark.parametrize(("key", "value"), PLAIN)
def test_a_plain_setting_goes_to_env(key: str, value: str) -> None:
    verdict = classify(key, value)
    assert not verdict.secret, verdict


@pytest.mark.parametrize(
    ("key", "named"),
    [
        ("GITHUB_PERSONAL_ACCESS_TOKEN", True),
        ("apiKey", True),
        ("authToken", True),
        ("DB_PWD", True),
        ("PWD", False),
        ("BYPASS", False),
        ("PASSTHROUGH", False),
        ("KEYCLOAK_REALM", False),
        ("AUTHOR", False),
        ("TOKEN_TTL", False),
        ("KEY_PATH", False),
        ("AWS_ACCESS_KEY_ID", True),
        ("LOG_LEVEL", False),
    ],
)
def test_secret_key_names(key: str, named: bool) -> None:
    assert secret_key(key) is named


def test_classify_is_a_pure_function_of_its_arguments() -> None:
    assert classify("NODE_ENV", "production") == classify("NODE_ENV", "production")
    assert classify("A", "/definitely/not/here/x") == classify("A", "/definitely/not/here/x")  # no file is looked at


# --- what check warns with -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "why"),
    [
        ("production", "a common word"),
        ("Staging", "a common word"),
        ("localhost", "a common word"),
        ("127.0.0.1", "a common word"),
        ("8080", "a number"),
        ("abc12", "shorter than 8 characters"),
        ("/srv/repo", "an absolute path"),
        ("https://example.com/mcp?lang=en", "a URL without credentials"),
        ("db.example.com", "a host name or address"),
        ("10.0.0.7:5432", "a host name or address"),
    ],
)
def test_plain_setting_says_why(value: str, why: str) -> None:
    assert plain_setting(value) == why


@pytest.mark.parametrize(
    "value",
    [
        "",
        "demo-0123456789abcdef0123456789abcdef",
        TOKEN,
        "s3cr3t-value",
        "https://u:pw@example.com/",
        "https://hooks.example.com/T0123ABCD/abcdefGHIJKL0123456789mn",
        "/aB3dE5fG7hI9jK1lM3nO5pQ7rS9tU1vW3xY5zA7bC9=",  # base64 that starts with a slash
    ],
)
def test_plain_setting_is_none_for_what_may_be_a_secret(value: str) -> None:
    assert plain_setting(value) is None


# --- resolve: plain env values are no secrets ------------------------------------------------------


def test_plain_env_values_are_never_redacted_nor_counted_as_secrets(paths: Paths) -> None:
    env = write(f"{paths.secrets}/x.env", f"GITHUB_TOKEN={TOKEN}\n", 0o600)
    defn = parse_server(
        "x",
        {
            "command": PY,
            "args": ["-m", "srv", "--repo", "/srv/repo", "--mode", "production"],  # plain values on the command line
            "env": {"NODE_ENV": "production", "REPO": "/srv/repo", "LONG": "a plain setting of some length"},
            "env_file": env,
        },
        "/etc/x.toml",
    )
    secrets = resolve(defn, paths, [], OWN)
    assert secrets.redact == {"x.GITHUB_TOKEN": TOKEN}
    assert not set(defn.env.values()) & set(secrets.redact.values())
    redactor = Redactor(secrets.redact)
    text = f"NODE_ENV=production in /srv/repo: a plain setting of some length; token {TOKEN}"
    out = redactor.text(text)
    assert "production" in out and "/srv/repo" in out and "a plain setting of some length" in out
    assert TOKEN not in out


def test_a_server_with_only_plain_settings_has_no_secret(paths: Paths) -> None:
    defn = parse_server("x", {"command": PY, "env": {"NODE_ENV": "production"}}, "/etc/x.toml")
    assert resolve(defn, paths, [], OWN).redact == {}


@pytest.mark.parametrize(
    ("value", "hint"),
    [
        ("/srv/repo", "the value of REPO is an absolute path"),
        ("https://example.com/api", "the value of REPO is a URL without credentials"),
        ("production", "the value of REPO is a common word"),
    ],
)
def test_an_env_file_value_in_args_is_refused_with_the_way_out(paths: Paths, value: str, hint: str) -> None:
    env = write(f"{paths.secrets}/x.env", f"REPO={value}\n", 0o600)
    defn = parse_server("x", {"command": PY, "args": ["--repo", value], "env_file": env}, "/etc/x.toml")
    with pytest.raises(ConfigError) as info:
        resolve(defn, paths, [], OWN)
    message = str(info.value)
    assert message.startswith("/etc/x.toml: servers.x.args: holds a secret from its env file; command lines are")
    assert f'({hint}: if it is a plain setting, move it from the env file to env = {{ REPO = "..." }}' in message
    assert message.count(value) == 0 or value == "production"  # the value is never printed ("production" is a word)


def test_a_real_secret_in_args_gets_no_plain_hint(paths: Paths) -> None:
    env = write(f"{paths.secrets}/x.env", "TOKEN=s3cr3t-value\n", 0o600)
    defn = parse_server("x", {"command": PY, "args": ["--token", "s3cr3t-value"], "env_file": env}, "/etc/x.toml")
    with pytest.raises(ConfigError) as info:
        resolve(defn, paths, [], OWN)
    assert (
        str(info.value)
        == "/etc/x.toml: servers.x.args: holds a secret from its env file; command lines are world-readable"
    )


# --- check warns, and stays valid ------------------------------------------------------------------


def _config(paths: Paths, table: str) -> None:
    write(paths.broker_toml, table, 0o640)
    write(paths.allowlist, "", 0o640)


def test_check_warns_about_plain_looking_env_file_values(paths: Paths) -> None:
    env = write(
        f"{paths.secrets}/x.env",
        f"NODE_ENV=production\nREPO=/srv/repo\nPORT=8080\nSHORT=ab12\nBASE=https://example.com/api\nGH={TOKEN}\nE=\n",
        0o600,
    )
    _config(paths, f'[servers.x]\ncommand = "{PY}"\nenv_file = "{env}"\n')
    warnings = check.check_warnings(paths, OWN)
    keys = {w.split(": ")[3].split()[3] for w in warnings}
    assert keys == {"NODE_ENV", "REPO", "PORT", "SHORT", "BASE"}  # not the token, not the empty value
    for w in warnings:
        assert w.startswith(f"{paths.broker_toml}: servers.x: env_file {env}: the value of ")
        assert "move it to env = {" in w and f"in {paths.broker_toml}" in w
        for value in ("production", "/srv/repo", "8080", "ab12", "https://example.com/api", TOKEN):
            assert f" {value}" not in w.replace("a common word", "")  # never a value
    by_key = {w.split("the value of ")[1].split()[0]: w for w in warnings}
    assert "is a common word (every env-file value is a secret" in by_key["NODE_ENV"]
    assert "too short to be redacted at all" in by_key["SHORT"]
    assert 'move it to env = { REPO = "..." }' in by_key["REPO"]


def test_warnings_are_no_problems(paths: Paths) -> None:
    env = write(f"{paths.secrets}/x.env", "NODE_ENV=production\n", 0o600)
    _config(paths, f'[servers.x]\ncommand = "{PY}"\nenv_file = "{env}"\n')
    assert check.check_warnings(paths, OWN)
    assert [p for p in check.check_all(paths) if "servers.x" in p and "NODE_ENV" in p] == []


def test_no_warning_for_real_secrets_or_plain_env(paths: Paths) -> None:
    env = write(f"{paths.secrets}/x.env", f"GH={TOKEN}\nDEMO_SECRET=demo-0123456789abcdef\n", 0o600)
    _config(paths, f'[servers.x]\ncommand = "{PY}"\nenv_file = "{env}"\nenv = {{ NODE_ENV = "production" }}\n')
    assert check.check_warnings(paths, OWN) == []


def test_an_http_servers_warning_says_to_write_it_into_the_url(paths: Paths) -> None:
    env = write(f"{paths.secrets}/ha.env", f"HOST=127.0.0.1\nHA_TOKEN={TOKEN}\n", 0o600)
    _config(paths, f'[servers.ha]\nurl = "http://${{HOST}}:8123/mcp"\nenv_file = "{env}"\n')
    (warning,) = check.check_warnings(paths, OWN)
    assert "the value of HOST is a common word" in warning
    assert "write it into url or headers" in warning and "${HOST}" in warning


def test_a_per_caller_instances_env_file_is_checked_too(paths: Paths) -> None:
    write(paths.gate_users, "alice mcp-gate-alice\n", 0o644)
    own = write(f"{paths.secrets}/p@alice.env", "MODE=development\n", 0o600)
    _config(paths, f'[servers.p]\ncommand = "{PY}"\nper_caller = true\n')
    warnings = check.check_warnings(paths, OWN)
    assert [w for w in warnings if f"env_file {own}: the value of MODE is a common word" in w], warnings


def test_an_unreadable_env_file_is_a_problem_not_a_warning(paths: Paths) -> None:
    env = write(f"{paths.secrets}/x.env", "NODE_ENV=production\n", 0o644)  # group/other may read it
    _config(paths, f'[servers.x]\ncommand = "{PY}"\nenv_file = "{env}"\n')
    assert check.check_warnings(paths, OWN) == []


def test_doctor_shows_checks_warnings(paths: Paths) -> None:
    env = write(f"{paths.secrets}/x.env", "NODE_ENV=production\n", 0o600)
    _config(paths, f'[servers.x]\ncommand = "{PY}"\nenv_file = "{env}"\n')
    doctor = Doctor(paths)
    doctor.check_config()
    found = [f for f in doctor.findings if f.level == "warning" and "NODE_ENV" in f.message]
    if os.getuid() == 0:  # doctor reads env files as root owns them
        assert found and found[0].section == "config", doctor.findings
        assert "production" not in found[0].message.replace("a common word", "")


# --- import of the issue's own config --------------------------------------------------------------


def test_import_puts_plain_settings_in_env_and_secrets_in_the_env_file(tmp_root: str, paths: Paths) -> None:
    doc = {
        "mcpServers": {
            "git": {
                "command": PY,
                "args": ["-m", "git_mcp", "--repository", "/srv/repo"],
                "env": {"NODE_ENV": "production", "REPO": "/srv/repo", "GITHUB_TOKEN": TOKEN, "LOG_LEVEL": "info"},
            }
        }
    }
    source = write(f"{tmp_root}/in/claude.json", json.dumps(doc), 0o600)
    plan = importer.plan(source, paths)
    (server,) = plan.servers
    assert server.table["args"] == ["-m", "git_mcp", "--repository", "/srv/repo"]  # a plain value may stay in args
    assert server.table["env"] == {"NODE_ENV": "production", "REPO": "/srv/repo", "LOG_LEVEL": "info"}
    assert [(e.key, e.value) for e in server.env] == [("GITHUB_TOKEN", TOKEN)]
    text = importer.toml_text(plan)
    assert TOKEN not in text
    assert tomllib.loads(text)["servers"]["git"]["env"]["NODE_ENV"] == "production"
    report = importer.report(plan)
    assert "  env file secrets/git.env (secrets, redacted from what agents see): GITHUB_TOKEN" in report
    assert "  env in imported.toml (plain settings, never redacted): NODE_ENV, REPO, LOG_LEVEL" in report
    joined = "\n".join(report)
    for value in (TOKEN, "production", "/srv/repo"):
        assert value not in joined  # key names only, for both sides
    # what import wrote passes check with no problem and no warning
    write(paths.broker_toml, "", 0o640)
    write(f"{paths.servers_d}/imported.toml", text, 0o640)
    write(server.table["env_file"], importer.env_text(server, source), 0o600)
    defn = parse_server("git", tomllib.loads(text)["servers"]["git"], "imported.toml")
    assert resolve(defn, paths, [], OWN).redact == {"git.GITHUB_TOKEN": TOKEN}
    assert check.check_warnings(paths, OWN) == []


def test_a_plain_looking_value_holding_a_secret_follows_it_into_the_env_file(tmp_root: str, paths: Paths) -> None:
    doc = {
        "mcpServers": {
            "a": {"url": "https://a.example/mcp", "headers": {"X-Api-Key": "abcd1234efgh"}},
            "b": {"command": PY, "env": {"GREETING": "key abcd1234efgh here", "NODE_ENV": "production"}},
        }
    }
    plan = importer.plan(write(f"{tmp_root}/in/c.json", json.dumps(doc), 0o600), paths)
    b = next(s for s in plan.servers if s.name == "b")
    assert [e.key for e in b.env] == ["GREETING"] and b.table["env"] == {"NODE_ENV": "production"}
    assert "abcd1234efgh" not in importer.toml_text(plan)


def test_an_unknown_value_is_a_secret_until_the_operator_says_otherwise(tmp_root: str, paths: Paths) -> None:
    doc = {"mcpServers": {"s": {"command": PY, "env": {"LEVEL": "${LEVEL}", "MODE": "${MODE:-production}"}}}}
    (server,) = importer.plan(write(f"{tmp_root}/in/c.json", json.dumps(doc), 0o600), paths).servers
    assert [(e.key, e.todo) for e in server.env] == [("LEVEL", True)]
    assert server.table["env"] == {"MODE": "production"}  # a known default, plain
    assert any('env = { LEVEL = "..." }' in t for t in server.todos)
