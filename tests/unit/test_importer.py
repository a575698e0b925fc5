"""Unit tests for ``broker.importer``: mcporter and Claude Desktop / Cursor configs to broker servers.

The central promise is checked several ways, including a property test: no
secret value from the input ever lands in the TOML (env entries that are
secrets go to the env file, plain settings to ``env``: see
``test_plain_env.py`` for the table of :func:`classify`; credential headers,
URL passwords and tokens become ``${VAR}``; secrets in ``args`` are taken
out and flagged). Also: JSONC,
mcporter's field aliases and placeholders, command resolution on root's
secure path only, name clashes, ``--skip`` and ``--name-prefix``, OAuth
refusal, the env file round trip through the daemon's own reader, and that
the report never prints a secret.
"""

from __future__ import annotations

import json
import os
import re
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from broker.admin import importer
from broker.admin.importer import ImportProblem
from broker.core.paths import Paths
from broker.core.servers import read_env_file
from broker.daemon import config
from tests.unit.conftest import write

PY = "/usr/bin/python3"

CLAUDE = {
    "mcpServers": {
        "github": {
            "command": PY,
            "args": ["-m", "github_mcp"],
            "env": {"GITHUB_PERSONAL_ACCESS_TOKEN": "ghp_R4nd0mT0kenValue000111222333444", "LOG_LEVEL": "debug"},
        },
        "ha": {
            "url": "http://127.0.0.1:8123/api/mcp",
            "headers": {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"},
        },
        "notes": {
            "type": "http",
            "url": "https://notes.example/mcp",
            "headers": {"X-API-Key": "n0t3s-k3y-9f8e7d6c", "X-Client": "claude"},
        },
    },
    "globalShortcut": "Ctrl+Space",
}

MCPORTER = """\
// project config, JSONC
{
  "mcpServers": {
    "context7": {
      "description": "Context7 docs MCP", // comment after a value
      "baseUrl": "https://mcp.context7.com/mcp",
      "headers": { "Authorization": "$env:CONTEXT7_API_KEY", },
    },
    /* a block comment */
    "devtools": {
      "command": "/usr/bin/python3 -m devtools_mcp --port 9222",
      "env": { "npm_config_loglevel": "error", "KEY": "${MY_KEY:-fallback-s3cr3t-value}" },
    },
    "linear": {
      "url": "https://mcp.linear.app/mcp", "bearerTokenEnv": "LINEAR_TOKEN", "allowedTools": ["list_issues"]
    },
    "arr": { "command": ["/usr/bin/python3", "-m", "x"], "args": ["--flag"], "lifecycle": "keep-alive" },
  },
  "imports": ["cursor", "claude-desktop"],
}
"""


@pytest.fixture
def paths(tmp_root: str) -> Paths:
    p = Paths(tmp_root)
    os.makedirs(p.servers_d)
    os.makedirs(p.secrets)
    return p


def _file(tmp_root: str, doc: object, name: str = "client.json") -> str:
    text = doc if isinstance(doc, str) else json.dumps(doc)
    return write(f"{tmp_root}/in/{name}", text, 0o600)


def _by_name(plan: importer.ImportPlan) -> dict[str, importer.ImportedServer]:
    return {s.name: s for s in plan.servers}


def _env(server: importer.ImportedServer) -> dict[str, str]:
    return {e.key: e.value for e in server.env}


def _plain(server: importer.ImportedServer) -> dict[str, str]:
    return {e.key: e.value for e in server.plain}


# --- Claude Desktop / Cursor ------------------------------------------------------------


def test_claude_desktop_config(tmp_root: str, paths: Paths) -> None:
    plan = importer.plan(_file(tmp_root, CLAUDE), paths)
    assert plan.format.startswith("Claude Desktop")
    s = _by_name(plan)
    gh = s["github"]
    assert gh.table == {
        "command": PY,
        "args": ["-m", "github_mcp"],
        "env": {"LOG_LEVEL": "debug"},  # a plain setting: never redacted
        "env_file": f"{paths.secrets}/github.env",
    }
    assert _env(gh) == {"GITHUB_PERSONAL_ACCESS_TOKEN": "ghp_R4nd0mT0kenValue000111222333444"}
    assert _plain(gh) == {"LOG_LEVEL": "debug"}
    ha = s["ha"]
    assert ha.table["headers"] == {"Authorization": "Bearer ${BEARER_TOKEN}"}
    assert _env(ha) == {"BEARER_TOKEN": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.c2lnbmF0dXJl"}
    notes = s["notes"]
    assert notes.table["headers"] == {"X-API-Key": "${X_API_KEY}", "X-Client": "claude"}
    assert _env(notes) == {"X_API_KEY": "n0t3s-k3y-9f8e7d6c"}
    text = importer.toml_text(plan)
    doc = tomllib.loads(text)
    config.FileModel.model_validate(doc)
    for server in plan.servers:
        for value in server.secret_values():
            assert value not in text
    assert tomllib.loads(text)["servers"]["github"]["env"] == {"LOG_LEVEL": "debug"}


OPENCLAW = {
    "agents": {"defaults": {"model": "x"}},
    "mcp": {
        "servers": {
            "privsep": {"command": "/usr/local/bin/mcp", "args": ["stdio"]},
            "search": {
                "command": "/usr/bin/python3",
                "args": ["-m", "search_mcp"],
                "env": {"SEARCH_KEY": "sk-9a8b7c6d5e4f"},
            },
            "ha": {
                "url": "http://127.0.0.1:8123/api/mcp",
                "headers": {"Authorization": "Bearer eyJhbGciOiJIUzI1NiJ9.e30.c2ln"},
            },
        }
    },
}


def test_openclaw_config(tmp_root: str, paths: Paths) -> None:
    plan = importer.plan(_file(tmp_root, OPENCLAW, "openclaw.json"), paths)
    assert plan.format == "OpenClaw openclaw.json (mcp.servers)"
    s = _by_name(plan)
    assert set(s) == {"search", "ha"}  # the client's own mcp stdio entry is the broker itself: skipped
    assert _env(s["search"]) == {"SEARCH_KEY": "sk-9a8b7c6d5e4f"}
    assert s["ha"].table["headers"] == {"Authorization": "Bearer ${BEARER_TOKEN}"}
    assert any("privsep: skipped: it is mcp-privsep itself" in n for n in plan.notes), plan.notes
    text = importer.toml_text(plan)
    assert "sk-9a8b7c6d5e4f" not in text and "mcp" not in tomllib.loads(text).get("servers", {})


def test_the_report_says_where_things_went_and_never_prints_a_secret(tmp_root: str, paths: Paths) -> None:
    plan = importer.plan(_file(tmp_root, CLAUDE), paths)
    report = "\n".join(importer.report(plan))
    assert "env GITHUB_PERSONAL_ACCESS_TOKEN: secret (the value is shaped like a token) -> secrets/github.env" in report
    assert "env LOG_LEVEL: plain setting (a common word) -> env in imported.toml as LOG_LEVEL" in report
    # per server: which keys went where, key names only
    assert (
        "  env file secrets/github.env (secrets, redacted from what agents see): GITHUB_PERSONAL_ACCESS_TOKEN" in report
    )
    assert "  env in imported.toml (plain settings, never redacted): LOG_LEVEL" in report
    assert "  env file secrets/ha.env (secrets, redacted from what agents see): BEARER_TOKEN" in report
    assert "debug" not in report  # not even a plain value is printed
    assert "header Authorization: credential -> secrets/ha.env as BEARER_TOKEN" in report
    assert "header X-Client: not a credential" in report
    for server in plan.servers:
        for value in server.secret_values():
            assert value not in report


# --- mcporter ---------------------------------------------------------------------------


def test_mcporter_jsonc_aliases_and_placeholders(tmp_root: str, paths: Paths) -> None:
    plan = importer.plan(_file(tmp_root, MCPORTER, "mcporter.json"), paths)
    assert plan.format.startswith("mcporter")
    assert any("imports" in n and "not followed" in n for n in plan.notes)
    s = _by_name(plan)
    c7 = s["context7"]
    assert c7.table["url"] == "https://mcp.context7.com/mcp"
    assert c7.table["headers"] == {"Authorization": "${CONTEXT7_API_KEY}"}
    assert [(e.key, e.value, e.todo) for e in c7.env] == [("CONTEXT7_API_KEY", "", True)]
    assert any("CONTEXT7_API_KEY" in t for t in c7.todos)
    dev = s["devtools"]
    assert dev.table["command"] == "/usr/bin/python3"
    assert dev.table["args"] == ["-m", "devtools_mcp", "--port", "9222"]
    assert _env(dev) == {"KEY": "fallback-s3cr3t-value"}
    assert _plain(dev) == {"npm_config_loglevel": "error"} and dev.table["env"] == {"npm_config_loglevel": "error"}
    linear = s["linear"]
    assert linear.table["headers"] == {"Authorization": "Bearer ${LINEAR_TOKEN}"}
    assert linear.suggest_allow == ["linear.list_issues"]
    arr = s["arr"]
    assert arr.table["args"] == ["-m", "x", "--flag"]
    assert any(m.startswith("lifecycle: ignored") for m in arr.moves)
    assert "fallback-s3cr3t-value" not in importer.toml_text(plan)


def test_strip_jsonc_keeps_strings_intact() -> None:
    text = '{"a": "http://x//y", "b": "/* not a comment */", "c": "q\\"//", // gone\n "d": [1, 2,],}'
    out, found = importer.strip_jsonc(text)
    assert found
    assert json.loads(out) == {"a": "http://x//y", "b": "/* not a comment */", "c": 'q"//', "d": [1, 2]}


# --- secrets in places they must not stay ----------------------------------------------------


def test_secrets_in_args_are_taken_out_and_flagged(tmp_root: str, paths: Paths) -> None:
    doc = {
        "mcpServers": {
            "x": {
                "command": PY,
                "args": [
                    "-m",
                    "srv",
                    "--api-key",
                    "plainvalue",
                    "--token=abc",
                    "--verbose",
                    "@modelcontextprotocol/server-filesystem",
                    "PASSWORD=hunter2",
                    "sk-ant-api03-AbCdEf0123456789xyz",
                    "${FROM_SHELL}",
                    "2024-01-01",
                ],
            }
        }
    }
    plan = importer.plan(_file(tmp_root, doc), paths)
    x = plan.servers[0]
    assert x.table["args"] == ["-m", "srv", "--verbose", "@modelcontextprotocol/server-filesystem", "2024-01-01"]
    env = _env(x)
    assert env["API_KEY"] == "plainvalue" and env["TOKEN"] == "abc" and env["PASSWORD"] == "hunter2"
    assert "sk-ant-api03-AbCdEf0123456789xyz" in env.values()
    assert len([w for w in x.warnings if "NOT written into args" in w]) == 4
    assert any("placeholder" in w for w in x.warnings)
    text = importer.toml_text(plan)
    for secret in ("plainvalue", "abc", "hunter2", "sk-ant-api03"):
        assert secret not in text


def test_an_arg_holding_an_env_value_is_taken_out_too(tmp_root: str, paths: Paths) -> None:
    doc = {"mcpServers": {"x": {"command": PY, "args": ["--db", "s3cretdb"], "env": {"DB": "s3cretdb"}}}}
    x = importer.plan(_file(tmp_root, doc), paths).servers[0]
    assert x.table["args"] == ["--db"]


def test_url_password_query_token_and_path_token(tmp_root: str, paths: Paths) -> None:
    doc = {
        "mcpServers": {
            "z": {"url": "https://user:pw123@zap.example/mcp/a1B2c3D4e5F6g7H8i9J0k/sse?api_key=K3y&lang=en"},
        }
    }
    z = importer.plan(_file(tmp_root, doc), paths).servers[0]
    assert z.table["url"] == (
        "https://user:${URL_PASSWORD}@zap.example/mcp/${URL_PATH_TOKEN}/sse?api_key=${URL_API_KEY}&lang=en"
    )
    assert _env(z) == {"URL_PASSWORD": "pw123", "URL_PATH_TOKEN": "a1B2c3D4e5F6g7H8i9J0k", "URL_API_KEY": "K3y"}
    assert any("SSE" in w for w in z.warnings)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    secret=st.text(alphabet="abcdefghijkABCDEFGHIJK0123456789_-+/", min_size=6, max_size=40),
    env_name=st.sampled_from(["TOKEN", "HOME_DIR", "X", "API_KEY", "MODE"]),
)
def test_no_env_or_credential_value_ever_reaches_the_toml(tmp_root: str, secret: str, env_name: str) -> None:
    paths = Paths(f"{tmp_root}/r")
    os.makedirs(paths.servers_d, exist_ok=True)
    # a credential header's value never reaches the TOML, and neither does a plain-looking env value that
    # holds it (it would carry the secret there): it follows the secret into the env file
    doc = {
        "mcpServers": {
            "s": {"command": PY, "args": ["-m", "srv"], "env": {env_name: secret}},
            "h": {"url": "https://h.example/mcp", "headers": {"Authorization": f"Bearer {secret}"}},
            "k": {"url": "https://k.example/mcp", "headers": {"X-Auth-Token": secret}},
        }
    }
    path = _file(tmp_root, doc, "prop.json")
    text = importer.toml_text(importer.plan(path, paths))
    assert secret not in text
    # alone, an env entry goes where classify says: a secret never reaches the TOML, a plain one is in env
    alone = _file(tmp_root, {"mcpServers": {"s": {"command": PY, "env": {env_name: secret}}}}, "alone.json")
    plan = importer.plan(alone, paths)
    server = plan.servers[0]
    if importer.classify(env_name, secret).secret:
        assert _env(server) == {env_name: secret} and secret not in importer.toml_text(plan)
    else:
        assert _plain(server) == {env_name: secret} and server.table["env"] == {env_name: secret}
    if env_name in ("TOKEN", "API_KEY") and not re.fullmatch(r"(/[A-Za-z0-9_-]+)+/?", secret):
        assert _env(server) == {env_name: secret}  # a key naming a credential: only a file's path is plain


# --- what is refused ---------------------------------------------------------------------------


def test_an_existing_server_name_is_refused_and_nothing_planned(tmp_root: str, paths: Paths) -> None:
    write(paths.broker_toml, f'[servers.github]\ncommand = "{PY}"\n', 0o640)
    with pytest.raises(ImportProblem) as info:
        importer.plan(_file(tmp_root, CLAUDE), paths)
    assert any("github already exists" in p for p in info.value.problems)
    plan = importer.plan(_file(tmp_root, CLAUDE), paths, name_prefix="imp-")
    assert sorted(s.name for s in plan.servers) == ["imp-github", "imp-ha", "imp-notes"]
    plan = importer.plan(_file(tmp_root, CLAUDE), paths, skip=("github",))
    assert sorted(s.name for s in plan.servers) == ["ha", "notes"]


def test_an_existing_env_file_is_never_overwritten(tmp_root: str, paths: Paths) -> None:
    write(f"{paths.secrets}/ha.env", "HA_TOKEN=keep\n", 0o600)
    with pytest.raises(ImportProblem, match="problem"):
        importer.plan(_file(tmp_root, CLAUDE), paths)


def test_oauth_servers_sse_only_and_bad_shapes(tmp_root: str, paths: Paths) -> None:
    doc = {
        "mcpServers": {
            "o": {"url": "https://o.example/mcp", "auth": "oauth"},
            "both": {"url": "https://b.example/mcp", "command": PY},
            "none": {"description": "nothing"},
            "nocmd": {"command": "definitely-not-a-command-xyz"},
            "ftp": {"url": "ftp://x.example/"},
        }
    }
    with pytest.raises(ImportProblem) as info:
        importer.plan(_file(tmp_root, doc), paths)
    text = "\n".join(info.value.problems)
    assert "o: uses auth 'oauth'" in text
    assert "both: has both" in text
    assert "none: has neither" in text
    assert "nocmd: command 'definitely-not-a-command-xyz' is not in" in text
    assert "ftp: url ftp" in text


def test_relative_commands_resolve_on_roots_secure_path_only(
    tmp_root: str, paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.makedirs(f"{tmp_root}/evil")
    write(f"{tmp_root}/evil/python3", "#!/bin/sh\n", 0o755)
    monkeypatch.setenv("PATH", f"{tmp_root}/evil")
    plan = importer.plan(_file(tmp_root, {"mcpServers": {"p": {"command": "python3", "args": ["-V"]}}}), paths)
    assert plan.servers[0].table["command"] in ("/usr/bin/python3", "/usr/local/bin/python3", "/bin/python3")


def test_names_are_made_valid_and_inputs_that_are_not_configs_are_refused(tmp_root: str, paths: Paths) -> None:
    plan = importer.plan(_file(tmp_root, {"mcpServers": {"my server.v2": {"command": PY}}}), paths)
    assert plan.servers[0].name == "my-server-v2"
    for bad in ("[]", "{}", '{"mcpServers": []}', "not json at all", '{"mcpServers": {}}'):
        with pytest.raises(ImportProblem):
            importer.plan(_file(tmp_root, bad, "bad.json"), paths)
    with pytest.raises(ImportProblem) as info:
        importer.plan(f"{tmp_root}/does-not-exist.json", paths)
    assert info.value.exit_code == importer.EX_NOINPUT


# --- the env file ------------------------------------------------------------------------------


def test_env_file_round_trips_through_the_spawners_reader(tmp_root: str, paths: Paths) -> None:
    server = importer.ImportedServer("s", "s", "stdio")
    values = {"A": "plain", "B": " padded ", "C": '"quoted"', "D": "has # hash", "E": "", "F": "x'y\"z"}
    for k, v in values.items():
        server.env.append(importer.EnvEntry(k, v, f"env {k}"))
    path = write(f"{tmp_root}/s.env", importer.env_text(server, "client.json"), 0o600)
    assert read_env_file(path, frozenset({os.getuid()})) == values


def test_looks_like_token_heuristics() -> None:
    for token in (
        "ghp_abcdefghijklmnopqrstuvwxyz0123456789",
        "sk-ant-api03-AbCdEf0123456789",
        "a1B2c3D4e5F6g7H8i9J0kL",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxIn0.sig",
    ):
        assert importer.looks_like_token(token), token
    for name in (
        "@modelcontextprotocol/server-filesystem",
        "chrome-devtools-mcp-latest",
        "server-filesystem-2024",
        "/usr/local/bin/something-long-123",
        "mcp.context7.com",
        "--verbose",
        "short1",
    ):
        assert not importer.looks_like_token(name), name
