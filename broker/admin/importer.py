"""``mcp-brokerctl import``: bring existing MCP client configs under the broker.

Reads exactly the one file the operator names (never an editor's config by
discovery, never anything from the working directory) in one of these shapes:

* an **mcporter** config (``config/mcporter.json`` / ``~/.mcporter/mcporter.json``):
  JSONC (``//`` and ``/* */`` comments, trailing commas) with ``mcpServers``
  entries that may use ``baseUrl``/``url``/``serverUrl``, ``command`` as a
  string or an array, ``executable``, ``args``, ``cwd``, ``env``,
  ``headers``, ``bearerToken``/``bearerTokenEnv`` and ``${VAR}``,
  ``${VAR:-fallback}`` or ``$env:VAR`` placeholders;
* a **Claude Desktop / Cursor** ``mcpServers`` JSON (``command``/``args``/``env``
  or ``url``/``headers``, optionally ``type``), or VS Code's ``servers``;
* **OpenClaw**'s ``openclaw.json``, whose servers are under ``mcp.servers``
  (the same entry shapes). An entry that launches ``mcp stdio`` is the broker
  itself, wired into the client: it is skipped, with a note.

Every server becomes a ``[servers.NAME]`` table in
``servers.d/imported.toml`` (written with tomli-w; an existing server name is
refused, never overwritten) and one secret env file ``secrets/NAME.env``
(root 0600: only the spawner reads it):

* each ``env`` entry is classified (:func:`classify`): a secret goes to the
  env file (redacted from everything agents see), a plain setting
  (NODE_ENV=production, LOG_LEVEL=debug, a path, a URL without
  credentials) to ``env = { ... }`` in the TOML (never redacted); when
  unsure, an entry is a secret, but an obvious setting never is;
* header values that are credentials (the header's name matches
  TOKEN|KEY|SECRET|PASSWORD|AUTH|CREDENTIAL|COOKIE, or the value is a
  ``Bearer``/``Basic``/``Token`` credential or looks like a token) go to the
  env file and the header says ``${VAR}`` instead (``Bearer ${VAR}`` keeps
  the scheme readable);
* a URL's password, credential-named query parameters and token-like path
  segments go the same way;
* placeholders that referred to the shell environment of whoever ran the
  client cannot be resolved here (this command does not read its own
  environment): their keys land in the env file empty, with a TODO;
* a secret in ``args`` (``--token X``, ``--api-key=X``, ``KEY=X``, a bare
  token, an env value) is *not* written into args (a command line is
  readable by every user through /proc): it is moved to the env file and
  flagged, because the server must then read it from its environment.

The report says what moved where, per server which keys went to the env
file and which to ``env`` (key names only, never a value).
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shlex
import shutil
import stat
import tomllib
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

import tomli_w

from broker.admin import allowlist_edit as admin_edit
from broker.core import servers as core_servers
from broker.core.errors import EX_CONFIG, EX_NOINPUT, EX_SOFTWARE, ConfigError, ImportProblem
from broker.core.names import valid_server_name
from broker.core.paths import BROKER_USER, Paths
from broker.core.servers import looks_like_token
from broker.daemon import config

MAX_INPUT_BYTES = 1024 * 1024
IMPORTED_NAME = "imported.toml"
#: where a relative command is looked up: root's secure path, never the caller's PATH
SAFE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

SECRET_NAME_RE = re.compile(r"TOKEN|KEY|SECRET|PASSWORD|PASSWD|AUTH|CREDENTIAL|COOKIE|SESSION", re.IGNORECASE)
_SCHEME_RE = re.compile(r"^(Bearer|Basic|Token|Bot)\s+(\S.*)$", re.IGNORECASE)
_PLACEHOLDER_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$env:([A-Za-z_][A-Za-z0-9_]*)")
_KNOWN_KEYS = {
    "command",
    "executable",
    "args",
    "cwd",
    "env",
    "url",
    "baseUrl",
    "base_url",
    "serverUrl",
    "server_url",
    "headers",
    "bearerToken",
    "bearer_token",
    "bearerTokenEnv",
    "bearer_token_env",
    "type",
    "transport",
    "description",
    "auth",
    "allowedTools",
    "allowed_tools",
    "blockedTools",
    "blocked_tools",
    "disabled",
}


# --- recognising secrets --------------------------------------------------------------


def secret_name(name: str) -> bool:
    """Whether a header, flag or query key names a credential (any substring: headers and flags fail closed)."""
    return bool(SECRET_NAME_RE.search(name))


# --- a secret or a plain setting ----------------------------------------------------------

#: words of an env key that name a credential (the key is cut at "_", "-" and camelCase humps)
_SECRET_WORDS = frozenset(
    (
        *("TOKEN", "TOKENS", "SECRET", "SECRETS", "PASSWORD", "PASSWORDS", "PASSWD", "PASS", "PWD", "PASSPHRASE"),
        *("KEY", "KEYS", "APIKEY", "AUTH", "CREDENTIAL", "CREDENTIALS", "CREDS", "COOKIE", "COOKIES"),
        *("SESSION", "PRIVATE", "BEARER", "PAT", "JWT", "SALT", "OTP", "TOTP", "PIN", "SIGNATURE"),
    )
)
#: a word ending in one of these names one too (AUTHTOKEN, CLIENTSECRET, DBPASSWORD; TOKENIZERS does not)
_SECRET_ENDINGS = ("TOKEN", "TOKENS", "SECRET", "PASSWORD", "PASSWD", "APIKEY", "CREDENTIALS", "PASSPHRASE")
#: a key whose last word is one of these is a setting *about* a credential (TOKEN_TTL, KEY_FILE, AUTH_URL)
_SETTING_WORDS = frozenset(
    (
        *("TTL", "TIMEOUT", "EXPIRY", "EXPIRES", "EXPIRATION", "LIFETIME", "AGE", "INTERVAL", "LIMIT", "COUNT"),
        *("ENABLED", "DISABLED", "ENABLE", "DISABLE", "REQUIRED", "MODE", "TYPE", "METHOD", "STRATEGY", "FORMAT"),
        *("PORT", "HOST", "URL", "URI", "ENDPOINT", "DOMAIN", "ISSUER", "AUDIENCE", "SCOPE", "SCOPES", "REGION"),
        *("FILE", "PATH", "DIR", "LOCATION", "LENGTH", "SIZE", "NAME", "HEADER", "PROVIDER", "LEVEL", "VERSION"),
        *("ALGORITHM", "USER", "USERNAME"),
    )
)
#: values no credential is spelled like (a secret-named key with one of these is a switch)
_BOOLEANS = frozenset({"true", "false", "yes", "no", "on", "off", "enabled", "disabled", "0", "1"})
_KEY_WORD_RE = re.compile(r"[_\-]+|(?<=[a-z0-9])(?=[A-Z])")
#: a libpq/ODBC-style connection string with a password in it
_DSN_PASSWORD_RE = re.compile(r"(?:^|[\s;,&?])(?:password|passwd|pwd|secret|token|api[_-]?key)\s*[=:]\s*[^\s;,&]", re.I)
#: an absolute path spelled as file names are (no "+" or "=": base64 may start with a slash)
_FILE_PATH_RE = re.compile(r"(?:~|\{home\})?(?:/[A-Za-z0-9._@-]+)+/?")
#: separators of the words of a value (a segment mixing letters and digits is what random strings look like)
_VALUE_SEP_RE = re.compile(r"[-_.:/+@,=~]")


class Classified(NamedTuple):
    """What :func:`classify` says of one env entry: a secret or not, and why (no value in it)."""

    secret: bool
    why: str


def secret_key(key: str) -> bool:
    """Whether an env key names a credential (whole words: TOKENIZERS_PARALLELISM does not, DB_PWD does)."""
    if key.upper() in ("PWD", "OLDPWD"):
        return False  # the shell's working directory
    words = [w.upper() for w in _KEY_WORD_RE.split(key) if w]
    if not words or words[-1] in _SETTING_WORDS:
        return False
    return any(w in _SECRET_WORDS or w.endswith(_SECRET_ENDINGS) for w in words)


def _credential_shape(value: str) -> str | None:
    """Why a value is a credential by its shape alone, whatever its key; None when it is not one."""
    v = value.strip()
    if v.startswith("-----BEGIN"):
        return "a PEM block"
    if _SCHEME_RE.match(v):
        return "an authorization value (scheme and credential)"
    for word in v.split():
        if "://" in word and core_servers.url_has_credentials(word):
            return "a URL with credentials"
        if looks_like_token(word):
            return "shaped like a token"
    if _DSN_PASSWORD_RE.search(v):
        return "a connection string with a password"
    return None


def _random_looking(value: str) -> bool:
    """8 or more characters, no space: letters and digits mixed within one word, or two of lower case, upper
    case and digits with a symbol (a password's shape)."""
    if len(value) < core_servers.MIN_SECRET_CHARS or any(c.isspace() for c in value):
        return False
    for segment in _VALUE_SEP_RE.split(value):
        if len(segment) >= 8 and any(c.isalpha() for c in segment) and any(c.isdigit() for c in segment):
            return True
    classes = (
        any(c.islower() for c in value),
        any(c.isupper() for c in value),
        any(c.isdigit() for c in value),
    )
    symbol = any(not c.isalnum() and c not in "-_./:" for c in value)
    return symbol and sum(classes) >= 2


def classify(key: str, value: str) -> Classified:
    """Whether one ``env`` entry of a client config is a secret (the env file) or a plain setting (``env``).

    The rule, first match wins (``why`` says which; it never holds the value):

    1. a value shaped like a credential is a secret, whatever its key: a known
       token prefix (ghp_, github_pat_, sk-, xoxb-, AKIA, a JWT's eyJ...), a
       long high-entropy word, ``Bearer ...``/``Basic ...``, a PEM block, a URL
       with a password, a token-like user or a credential query parameter, a
       connection string with ``password=``;
    2. a key naming a credential (a word of it is TOKEN, SECRET, PASSWORD,
       PASSWD, PASS, PWD, KEY, APIKEY, AUTH, CREDENTIAL(S), COOKIE, SESSION,
       PRIVATE, BEARER, PAT, JWT, ... or ends in TOKEN, SECRET, PASSWORD, ...;
       not the shell's own PWD, and not when its last word makes it a setting
       about one: TOKEN_TTL, KEY_FILE, AUTH_URL) makes a secret, unless the
       value is a boolean or an absolute path spelled as file names are, with
       a letter in it (the file a path names is the secret, not the path:
       GOOGLE_APPLICATION_CREDENTIALS=/etc/creds.json);
    3. an empty value is a plain setting: there is nothing to hide;
    4. a value that looks like a plain setting (:func:`broker.core.servers.plain_setting`:
       a common word such as production or debug, a number, fewer than 8
       characters, an absolute path, a URL without credentials, a host) is one;
    5. what is left and looks random (8 or more characters without a space,
       mixing letters and digits within one word, or two of lower case, upper
       case and digits with a symbol) is a secret: when unsure, fail closed;
    6. the rest (words, names, versions, sentences) is a plain setting.

    ``mcp-brokerctl check`` warns about an env-file value that rule 4 would
    call plain, so what this puts in the env file under rule 2 (PASSWORD=test)
    is flagged there too.
    """
    shape = _credential_shape(value)
    if shape:
        return Classified(True, f"the value is {shape}")
    v = value.strip()
    if secret_key(key):
        if v.lower() in _BOOLEANS:
            return Classified(False, "a switch (its name names a credential, its value cannot be one)")
        if _FILE_PATH_RE.fullmatch(v) and any(c.isalpha() for c in v):
            return Classified(False, "an absolute path (its name names a credential: the file is the secret)")
        return Classified(True, "its name names a credential")
    if not v:
        return Classified(False, "empty")
    why = core_servers.plain_setting(v)
    if why:
        return Classified(False, why)
    if _random_looking(v):
        return Classified(True, "the value looks random (when unsure, a secret)")
    return Classified(False, "a word or name, not shaped like a credential")


def env_key(name: str) -> str:
    """An env-file key from any name: upper case, [A-Z0-9_], not starting with a digit."""
    key = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_").upper() or "SECRET"
    return "_" + key if key[0].isdigit() else key


# --- reading --------------------------------------------------------------------------


def strip_jsonc(text: str) -> tuple[str, bool]:
    """Remove // and /* */ comments and trailing commas outside strings; (json, whether any was found)."""
    out: list[str] = []
    i, n = 0, len(text)
    found = False
    in_str = False
    while i < n:
        ch = text[i]
        if in_str:
            out.append(ch)
            if ch == "\\" and i + 1 < n:
                out.append(text[i + 1])
                i += 2
                continue
            if ch == '"':
                in_str = False
            i += 1
            continue
        if ch == '"':
            in_str = True
            out.append(ch)
            i += 1
        elif text.startswith("//", i):
            found = True
            while i < n and text[i] != "\n":
                i += 1
        elif text.startswith("/*", i):
            found = True
            end = text.find("*/", i + 2)
            if end < 0:
                raise ImportProblem("unterminated /* comment")
            out.append(" ")
            i = end + 2
        elif ch == ",":
            j = i + 1
            while j < n and text[j] in " \t\r\n":
                j += 1
            if j < n and text[j] in "}]":
                found = True
                i += 1
            elif text.startswith(("//", "/*"), j):
                # a comment between the comma and a closing bracket: look past it
                rest, _f = strip_jsonc(text[j:])
                stripped = rest.lstrip()
                if stripped[:1] in ("}", "]"):
                    found = True
                    i += 1
                else:
                    out.append(ch)
                    i += 1
            else:
                out.append(ch)
                i += 1
        else:
            out.append(ch)
            i += 1
    return "".join(out), found


def read_config(path: str) -> tuple[dict[str, Any], str]:
    """Parse the named file; return (the server entries by name, a description of the format)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImportProblem(f"{path}: cannot open: {exc.strerror}", exit_code=EX_NOINPUT) from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise ImportProblem(f"{path}: not a regular file", exit_code=EX_NOINPUT)
        data = fh.read(MAX_INPUT_BYTES + 1)
    if len(data) > MAX_INPUT_BYTES:
        raise ImportProblem(f"{path}: larger than {MAX_INPUT_BYTES} bytes; not an MCP client config")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ImportProblem(f"{path}: not valid UTF-8") from None
    try:
        doc = json.loads(text)
        jsonc = False
    except json.JSONDecodeError:
        try:
            doc = json.loads(strip_jsonc(text)[0])
        except (json.JSONDecodeError, ImportProblem) as exc:
            raise ImportProblem(f"{path}: not JSON or JSONC: {exc}") from None
        jsonc = True
    if not isinstance(doc, dict):
        raise ImportProblem(f"{path}: expected a JSON object with 'mcpServers'")
    openclaw = doc.get("mcp")
    if "mcpServers" not in doc and isinstance(openclaw, dict) and isinstance(openclaw.get("servers"), dict):
        # OpenClaw's openclaw.json: its MCP servers are under mcp.servers
        return _entries(openclaw["servers"], []), "OpenClaw openclaw.json (mcp.servers)"
    key = "mcpServers" if "mcpServers" in doc else "servers" if "servers" in doc else None
    if key is None or not isinstance(doc[key], dict):
        raise ImportProblem(
            f"{path}: no 'mcpServers' object (expected an mcporter, Claude Desktop, Cursor or OpenClaw config)"
        )
    mcporter_keys = {"imports", "daemonIdleTimeoutMs", "daemon_idle_timeout_ms"}
    entry_keys = {k for e in doc[key].values() if isinstance(e, dict) for k in e}
    mcporter = (
        jsonc
        or bool(mcporter_keys & set(doc))
        or bool(entry_keys & {"baseUrl", "base_url", "bearerToken", "bearerTokenEnv", "executable", "lifecycle"})
    )
    fmt = (
        "mcporter config (JSONC)"
        if mcporter
        else "VS Code 'servers' JSON"
        if key == "servers"
        else ("Claude Desktop / Cursor 'mcpServers' JSON")
    )
    notes = []
    if "imports" in doc:
        notes.append(
            "top-level 'imports' "
            f"({', '.join(map(str, doc['imports'])) if isinstance(doc['imports'], list) else doc['imports']}): "
            "not followed; mcp-privsep never reads editor configs by itself: import each file explicitly"
        )
    return _entries(doc[key], notes), fmt


def _entries(servers: dict[str, Any], notes: list[str]) -> dict[str, Any]:
    """The servers to import: a client's own entry for ``mcp stdio`` (the broker itself) is left out."""
    kept: dict[str, Any] = {}
    for name, entry in servers.items():
        if isinstance(entry, dict) and _is_the_broker(entry):
            notes.append(f"{name}: skipped: it is mcp-privsep itself ('mcp stdio'), not a server to broker")
            continue
        kept[name] = entry
    return {"servers": kept, "notes": notes}


def _is_the_broker(entry: dict[str, Any]) -> bool:
    command, args = entry.get("command"), entry.get("args")
    if isinstance(command, list) and command:
        command, args = command[0], command[1:]
    return isinstance(command, str) and os.path.basename(command) == "mcp" and args == ["stdio"]


# --- converting -------------------------------------------------------------------------


@dataclass
class EnvEntry:
    key: str
    value: str
    origin: str
    todo: bool = False
    #: for an entry of the client's ``env``: why it is a secret or a plain setting (:func:`classify`)
    why: str = ""


@dataclass
class ImportedServer:
    """One server as it will be written, and what happened to its parts."""

    name: str
    original: str
    transport: str
    table: dict[str, Any] = field(default_factory=dict)
    #: what goes to its env file (secrets)
    env: list[EnvEntry] = field(default_factory=list)
    #: what goes to ``env = { ... }`` in the TOML (plain settings, never redacted)
    plain: list[EnvEntry] = field(default_factory=list)
    moves: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    todos: list[str] = field(default_factory=list)
    suggest_allow: list[str] = field(default_factory=list)

    def _unique_key(self, key: str) -> str:
        taken = {e.key for e in (*self.env, *self.plain)}  # one key in both places is a config error
        if key not in taken:
            return key
        n = 2
        while f"{key}_{n}" in taken:
            n += 1
        return f"{key}_{n}"

    def add_env(self, key: str, value: str, origin: str, todo: bool = False, reuse: bool = False) -> str:
        for e in self.env:
            if reuse and e.key == key:
                return key
            if e.value == value and value and not todo and not e.todo:
                return e.key  # the same secret twice: one entry
        key = self._unique_key(key)
        self.env.append(EnvEntry(key, value, origin, todo))
        return key

    def secret_values(self) -> list[str]:
        return [e.value for e in self.env if e.value]

    def settle(self, secrets: list[str]) -> None:
        """Put a plain setting holding one of ``secrets`` in the env file too, then ``env`` into the table.

        A plain value is written into the TOML; one that contains a secret's
        value (a URL built around a token) would carry the secret there.
        """
        for e in list(self.plain):
            if any(len(x) >= 4 and x in e.value for x in secrets):
                self.plain.remove(e)
                self.env.append(EnvEntry(e.key, e.value, e.origin, why="it holds the value of a secret"))
        env_file = self.table.pop("env_file", None)
        self.table.pop("env", None)
        if self.plain:
            self.table["env"] = {e.key: e.value for e in self.plain}
        if env_file is not None:
            self.table["env_file"] = env_file  # after env, as an operator would write it


@dataclass
class ImportPlan:
    """Everything ``import`` would write, with its report."""

    source: str
    format: str
    toml_path: str
    servers: list[ImportedServer] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def document(self, existing: dict[str, Any] | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = dict(existing or {})
        servers = dict(doc.get("servers", {}))
        for s in self.servers:
            servers[s.name] = s.table
        doc["servers"] = servers
        return doc


def _placeholders(value: str, server: ImportedServer, where: str) -> str:
    """Turn mcporter/shell placeholders into ``${KEY}`` backed by the env file."""

    def repl(m: re.Match[str]) -> str:
        var = m.group(1) or m.group(3)
        fallback = m.group(2)
        key = env_key(var)
        if fallback is not None and fallback != "":
            key = server.add_env(key, fallback, f"{where} (${{{var}:-...}} default)", reuse=True)
        else:
            existing = next((e for e in server.env if e.key == key), None)
            if existing is None:
                server.add_env(key, "", where, todo=True)
                server.todos.append(
                    f"{where}: ${{{var}}} came from the environment of whoever ran the client; "
                    f"put its value in the env file as {key}=..."
                )
        return "${" + key + "}"

    return _PLACEHOLDER_RE.sub(repl, value)


def _header(server: ImportedServer, name: str, value: str, env_file: str) -> str:
    where = f"header {name}"
    if _PLACEHOLDER_RE.search(value):
        converted = _placeholders(value, server, where)
        server.moves.append(f"{where}: placeholder(s) -> ${{...}} from {env_file}")
        return converted
    credential = (
        secret_name(name)
        or name.lower() in ("authorization", "proxy-authorization", "cookie")
        or bool(_SCHEME_RE.match(value))
        or looks_like_token(value)
    )
    if not credential:
        server.moves.append(f"{where}: not a credential; kept in the TOML as is")
        return value
    scheme = _SCHEME_RE.match(value)
    if scheme:
        base = "BEARER_TOKEN" if scheme.group(1).lower() == "bearer" else env_key(f"{name}_{scheme.group(1)}")
        key = server.add_env(base, scheme.group(2).strip(), where)
        server.moves.append(f"{where}: credential -> {env_file} as {key}; TOML says '{scheme.group(1)} ${{{key}}}'")
        return f"{scheme.group(1)} ${{{key}}}"
    key = server.add_env(env_key(name), value, where)
    server.moves.append(f"{where}: credential -> {env_file} as {key}; TOML says '${{{key}}}'")
    return "${" + key + "}"


def _url(server: ImportedServer, url: str, env_file: str) -> str:
    if _PLACEHOLDER_RE.search(url):
        url = _placeholders(url, server, "url")
        server.moves.append(f"url: placeholder(s) -> ${{...}} from {env_file}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ImportProblem(f"url {parts.scheme or '(none)'}:// is not http:// or https://")
    netloc = parts.netloc
    if parts.password and not _PLACEHOLDER_RE.fullmatch(parts.password):
        key = server.add_env("URL_PASSWORD", parts.password, "url password")
        host = netloc.rpartition("@")[2]
        netloc = f"{parts.username}:${{{key}}}@{host}"
        server.moves.append(f"url: password -> {env_file} as {key}")
    path_segments = parts.path.split("/")
    for i, seg in enumerate(path_segments):
        if seg and not seg.startswith("${") and looks_like_token(seg):
            key = server.add_env("URL_PATH_TOKEN", seg, "url path")
            path_segments[i] = "${" + key + "}"
            server.moves.append(f"url: token-like path segment -> {env_file} as {key}")
    query = []
    moved = False
    for k, v in parse_qsl(parts.query, keep_blank_values=True):
        if v and not v.startswith("${") and (secret_name(k) or looks_like_token(v)):
            key = server.add_env(env_key(f"URL_{k}"), v, f"url query {k}")
            query.append(f"{quote(k, safe='')}=${{{key}}}")
            server.moves.append(f"url: query parameter {k} -> {env_file} as {key}")
            moved = True
        else:
            query.append(f"{quote(k, safe='')}={quote(v, safe='${}')}" if v else quote(k, safe=""))
    new_query = "&".join(query) if moved else parts.query
    return urlunsplit((parts.scheme, netloc, "/".join(path_segments), new_query, parts.fragment))


def _command(raw: dict[str, Any], base_dir: str) -> tuple[str, list[str]]:
    value = raw.get("command", raw.get("executable"))
    args = raw.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise ImportProblem("'args' must be a list of strings")
    if isinstance(value, list):
        if not value or not all(isinstance(v, str) for v in value):
            raise ImportProblem("'command' as a list must hold strings")
        return value[0], [*value[1:], *args]
    if not isinstance(value, str) or not value.strip():
        raise ImportProblem("'command' must be a non-empty string")
    if not args and " " in value.strip() and not os.path.isfile(os.path.join(base_dir, os.path.expanduser(value))):
        try:
            tokens = shlex.split(value)
        except ValueError as exc:
            raise ImportProblem(f"'command' does not parse as a command line: {exc}") from None
        return tokens[0], tokens[1:]
    return value, list(args)


_FLAG_RE = re.compile(r"^(--?[A-Za-z0-9][A-Za-z0-9_.-]*)(?:=(.*))?$", re.DOTALL)
_KV_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.+)$", re.DOTALL)


def _args(server: ImportedServer, args: list[str], env_file: str, env_values: list[str]) -> list[str]:
    """Args with every secret taken out (moved to the env file and flagged)."""
    out: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        where = f"args[{i}]"
        flag = _FLAG_RE.match(arg)
        kv = _KV_RE.match(arg)
        if _PLACEHOLDER_RE.search(arg):
            _placeholders(arg, server, where)
            server.warnings.append(
                f"{where} used a placeholder ({arg}): the broker never puts values into args (command lines "
                f"are readable by every user); removed from args; its key is in {env_file} -- make the server "
                "read it from its environment"
            )
            i += 1
            continue
        value = flag.group(2) if flag else None
        if flag and value and (secret_name(flag.group(1)) or looks_like_token(value)):
            key = server.add_env(env_key(flag.group(1)), value, where)
            server.warnings.append(_arg_warning(where, f"{flag.group(1)}=...", key, env_file))
            i += 1
            continue
        if (
            flag
            and flag.group(2) is None
            and secret_name(flag.group(1))
            and i + 1 < len(args)
            and not args[i + 1].startswith("-")
        ):
            key = server.add_env(env_key(flag.group(1)), args[i + 1], f"args[{i + 1}]")
            server.warnings.append(_arg_warning(f"args[{i}..{i + 1}]", f"{flag.group(1)} ...", key, env_file))
            i += 2
            continue
        if kv and (secret_name(kv.group(1)) or looks_like_token(kv.group(2))):
            key = server.add_env(env_key(kv.group(1)), kv.group(2), where)
            server.warnings.append(_arg_warning(where, f"{kv.group(1)}=...", key, env_file))
            i += 1
            continue
        if looks_like_token(arg) or any(len(v) >= 4 and v in arg for v in env_values):
            key = server.add_env(f"ARG_{i}", arg, where)
            server.warnings.append(_arg_warning(where, "a token-like value", key, env_file))
            i += 1
            continue
        out.append(arg)
        i += 1
    return out


def _arg_warning(where: str, what: str, key: str, env_file: str) -> str:
    return (
        f"{where} held a secret ({what}): NOT written into args (command lines are readable by every user); "
        f"moved to {env_file} as {key} -- the server must read it from its environment, check its docs"
    )


def convert(name: str, original: str, raw: Any, paths: Paths, base_dir: str) -> ImportedServer:
    """One client-config entry as a broker server table plus its env file entries."""
    if not isinstance(raw, dict):
        raise ImportProblem("expected an object")
    env_file = f"{paths.secrets}/{name}.env"
    short_env = f"secrets/{name}.env"
    kind = str(raw.get("type") or raw.get("transport") or "").lower()
    url = next((raw[k] for k in ("url", "baseUrl", "base_url", "serverUrl", "server_url") if k in raw), None)
    has_cmd = "command" in raw or "executable" in raw
    if url is not None and has_cmd:
        raise ImportProblem("has both a URL and a command")
    server = ImportedServer(name, original, "http" if url is not None else "stdio")
    auth = raw.get("auth")
    if isinstance(auth, str) and auth.lower() in ("oauth", "refreshable_bearer"):
        raise ImportProblem(
            f"uses auth '{auth}': the broker has no interactive OAuth; get a long-lived token and use a "
            "bearer header, or leave this server out with --skip"
        )
    if raw.get("disabled") is True:
        server.warnings.append(
            "was disabled in the client config; imported anyway (allow none of its tools to keep it idle)"
        )
    for key in sorted(set(raw) - _KNOWN_KEYS):
        server.moves.append(f"{key}: ignored (no broker equivalent)")
    if url is not None:
        if not isinstance(url, str):
            raise ImportProblem("'url' must be a string")
        if kind == "sse" or urlsplit(url).path.rstrip("/").endswith("/sse"):
            server.warnings.append(
                "looks like an SSE endpoint; the broker speaks streamable HTTP only (often the same server at /mcp)"
            )
        headers_raw = dict(raw.get("headers") or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers_raw.items()):
            raise ImportProblem("'headers' must map strings to strings")
        token = raw.get("bearerToken", raw.get("bearer_token"))
        token_env = raw.get("bearerTokenEnv", raw.get("bearer_token_env"))
        if isinstance(token, str) and token:
            headers_raw["Authorization"] = f"Bearer {token}"
        if isinstance(token_env, str) and token_env:
            headers_raw["Authorization"] = f"Bearer ${{{token_env}}}"
        server.table["url"] = _url(server, url, short_env)
        headers = {k: _header(server, k, v, short_env) for k, v in headers_raw.items() if k.lower() != "accept"}
        if headers:
            server.table["headers"] = headers
        if raw.get("env"):
            server.moves.append("env: ignored for an HTTP server (it has no process of its own)")
    else:
        if not has_cmd:
            raise ImportProblem("has neither a URL nor a command")
        command, args = _command(raw, base_dir)
        env = raw.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ImportProblem("'env' must map strings to strings")
        for k, v in env.items():
            if not core_servers.ENV_KEY_RE.fullmatch(k):
                raise ImportProblem(f"env key {k!r} is not a valid variable name")
            if _PLACEHOLDER_RE.search(v):
                if _PLACEHOLDER_RE.fullmatch(v):
                    m = _PLACEHOLDER_RE.fullmatch(v)
                    assert m is not None
                    var, fallback = m.group(1) or m.group(3), m.group(2)
                    if fallback:
                        _add_classified(server, k, fallback, f"env {k} (default of ${{{var}}})")
                    else:
                        # its value is unknown here: a secret until the operator says otherwise (fail closed)
                        server.env.append(EnvEntry(k, "", f"env {k}", todo=True, why="its value is not known here"))
                        server.todos.append(
                            f"env {k} was ${{{var}}} from the environment of whoever ran the client: "
                            f'put its value in {short_env} (or, if it is a plain setting, in env = {{ {k} = "..." }} '
                            f"of {IMPORTED_NAME})"
                        )
                else:
                    server.env.append(EnvEntry(k, "", f"env {k}", todo=True, why="its value is not known here"))
                    server.todos.append(
                        f"env {k} mixes text and placeholders: write its value in {short_env} (or, if it is a "
                        f'plain setting, in env = {{ {k} = "..." }} of {IMPORTED_NAME})'
                    )
                continue
            _add_classified(server, k, v, f"env {k}")
        resolved = command
        if not command.startswith("/"):
            expanded = os.path.expanduser(command) if command.startswith("~") else command
            if "/" in expanded and not expanded.startswith("/"):
                expanded = os.path.normpath(os.path.join(base_dir, expanded))
            found = expanded if expanded.startswith("/") else shutil.which(expanded, path=SAFE_PATH)
            if found is None:
                raise ImportProblem(
                    f"command {command!r} is not in {SAFE_PATH}: install it there, or write an absolute path"
                )
            resolved = found
            server.moves.append(f"command {command!r} -> {resolved} (the broker runs absolute paths only)")
        if os.path.basename(resolved) in ("npx", "uvx", "bunx", "pnpx", "pipx"):
            server.warnings.append(
                f"{os.path.basename(resolved)} fetches code at every start, as mcp-broker: pin a version, "
                "or better install the server and point 'command' at it"
            )
        server.table["command"] = resolved
        server.table["args"] = _args(server, args, short_env, server.secret_values())
        cwd = raw.get("cwd")
        if isinstance(cwd, str) and cwd:
            path = os.path.expanduser(cwd)
            path = os.path.normpath(os.path.join(base_dir, path))
            server.table["cwd"] = path
            server.warnings.append(f"cwd {path}: mcp-broker must be able to enter it")
    server.table["env_file"] = env_file
    server.settle(server.secret_values())
    for key in ("allowedTools", "allowed_tools"):
        tools = raw.get(key)
        if isinstance(tools, list):
            server.suggest_allow = [f"{name}.{t}" for t in tools if isinstance(t, str)]
    if raw.get("blockedTools") or raw.get("blocked_tools"):
        server.moves.append("blockedTools: nothing to do: every tool is denied until you allow it")
    for e in server.env:
        if "\n" in e.value or "\r" in e.value or "\0" in e.value:
            raise ImportProblem(f"{e.origin}: a value with a line break cannot go into an env file")
    return server


def _add_classified(server: ImportedServer, key: str, value: str, origin: str) -> None:
    """One entry of the client's ``env``: to the env file or to ``env``, as :func:`classify` says."""
    verdict = classify(key, value)
    if not verdict.secret and ("{home}" in value or "{agent}" in value):
        # in env these would be placeholders the spawner fills in; the client meant the text
        verdict = Classified(True, "it holds {home} or {agent}, which env would fill in")
    entry = EnvEntry(key, value, origin, why=verdict.why)
    (server.env if verdict.secret else server.plain).append(entry)


def existing_servers(paths: Paths) -> dict[str, str]:
    """Server names already defined, with their file (read leniently, TOML only)."""
    files = [paths.broker_toml]
    with contextlib.suppress(FileNotFoundError):
        files += [
            f"{paths.servers_d}/{n}"
            for n in sorted(os.listdir(paths.servers_d))
            if n.endswith(".toml") and not n.startswith(".")
        ]
    found: dict[str, str] = {}
    for path in files:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except FileNotFoundError:
            continue
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ImportProblem(f"{path}: cannot read it to check server names: {exc}", exit_code=EX_CONFIG) from None
        servers = doc.get("servers")
        if isinstance(servers, dict):
            for name in servers:
                found.setdefault(name, path)
    return found


def plan(path: str, paths: Paths, name_prefix: str = "", skip: tuple[str, ...] = ()) -> ImportPlan:
    """Read ``path`` and work out everything to write; raise with every problem found."""
    doc, fmt = read_config(path)
    base_dir = os.path.dirname(os.path.abspath(path))
    result = ImportPlan(source=path, format=fmt, toml_path=f"{paths.servers_d}/{IMPORTED_NAME}")
    result.notes.extend(doc["notes"])
    existing = existing_servers(paths)
    problems: list[str] = []
    taken: dict[str, str] = {}
    if not doc["servers"]:
        raise ImportProblem(f"{path}: no servers in it")
    unknown_skips = set(skip) - set(doc["servers"])
    if unknown_skips:
        problems.append(f"--skip {', '.join(sorted(unknown_skips))}: no such server in {path}")
    for original, raw in doc["servers"].items():
        if original in skip:
            result.notes.append(f"{original}: skipped (--skip)")
            continue
        name = name_prefix + original
        if not valid_server_name(name):
            clean = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "server"
            result.notes.append(f"{original}: renamed to {clean} (server names are [A-Za-z0-9_-]+)")
            name = clean
        if name in existing:
            problems.append(
                f"{original}: a server named {name} already exists in {existing[name]}; not overwriting it "
                "(use --name-prefix, or --skip it)"
            )
            continue
        if name in taken:
            problems.append(f"{original}: becomes {name}, like {taken[name]}")
            continue
        taken[name] = original
        env_path = f"{paths.secrets}/{name}.env"
        if os.path.lexists(env_path):
            problems.append(f"{original}: {env_path} already exists; not overwriting a secret file")
            continue
        try:
            server = convert(name, original, raw, paths, base_dir)
            core_servers.parse_server(name, server.table, "imported")
        except ImportProblem as exc:
            problems.append(f"{original}: {exc.message}")
            continue
        except ConfigError as exc:
            problems.extend(f"{original}: {p.split(': servers.', 1)[-1]}" for p in exc.problems)
            continue
        result.servers.append(server)
    if problems:
        raise ImportProblem(f"{path}: {len(problems)} problem(s); nothing written", problems)
    every_secret = [v for server in result.servers for v in server.secret_values()]
    for server in result.servers:
        server.settle(every_secret)  # another server's secret in a plain value would land in the TOML too
    rendered = toml_text(result)
    for server in result.servers:
        for value in server.secret_values():
            if len(value) >= 4 and value in rendered:
                raise ImportProblem(
                    f"{server.original}: a secret value would end up in the TOML; refusing", exit_code=EX_SOFTWARE
                )
    return result


def env_text(server: ImportedServer, source: str) -> str:
    lines = [
        f"# secrets of server {server.name}, imported by 'mcp-brokerctl import' from {source}",
        "# KEY=VALUE lines; mcp-broker 0600. Every value here is redacted from what agents see.",
    ]
    for e in server.env:
        lines.append(f"# from {e.origin}" + (": TODO fill in" if e.todo else ""))
        lines.append(f"{e.key}={_env_value(e.value)}")
    return "\n".join(lines) + "\n"


def _env_value(value: str) -> str:
    if value == "" or (
        value == value.strip() and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"")
    ):
        return value
    return f'"{value}"'  # the reader strips exactly one pair of matching quotes, nothing else


def toml_text(result: ImportPlan, existing: dict[str, Any] | None = None) -> str:
    header = (
        "# Servers imported by 'mcp-brokerctl import'; owner root:mcp-broker 0640.\n"
        "# Secrets are not here: each server's env_file holds them, and ${VAR} refers to it.\n"
        "# env = { ... } holds plain settings: never redacted, never secrets.\n\n"
    )
    return header + tomli_w.dumps(result.document(existing))


def write(result: ImportPlan, paths: Paths) -> list[str]:
    """Write the env files (new only) and merge the servers into ``servers.d/imported.toml``."""
    try:
        broker = pwd.getpwnam(BROKER_USER)
    except KeyError:
        raise ImportProblem(
            f"user {BROKER_USER} does not exist; run 'mcp-brokerctl install' first", exit_code=EX_CONFIG
        ) from None
    for d in (paths.servers_d, paths.secrets):
        if not os.path.isdir(d):
            raise ImportProblem(f"{d}: missing; run 'mcp-brokerctl install' first", exit_code=EX_CONFIG)
    written: list[str] = []
    created: list[str] = []
    try:
        with admin_edit.locked_dir(paths.servers_d):
            existing: dict[str, Any] = {}
            if os.path.exists(result.toml_path):
                with open(result.toml_path, "rb") as fh:
                    existing = tomllib.load(fh)
                clash = set(existing.get("servers", {})) & {s.name for s in result.servers}
                if clash:
                    raise ImportProblem(f"{result.toml_path}: already defines {', '.join(sorted(clash))}")
            for server in result.servers:
                env_path = str(server.table["env_file"])
                fd = os.open(env_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                created.append(env_path)
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    out.write(env_text(server, result.source))
                    out.flush()
                    os.fchown(out.fileno(), 0, 0)  # root's: only the spawner reads secrets
                    os.fchmod(out.fileno(), 0o600)
                    os.fsync(out.fileno())
                written.append(f"{env_path} (root 0600)")
            text = toml_text(result, existing)

            def validate(back: bytes) -> None:
                doc = tomllib.loads(back.decode())
                config.FileModel.model_validate(doc)
                _defs, problems = core_servers.collect([(result.toml_path, doc)])
                if problems:
                    raise ValueError(problems[0])

            admin_edit.atomic_replace(result.toml_path, text.encode(), 0, broker.pw_gid, 0o640, validate)
            written.append(f"{result.toml_path} (root:{BROKER_USER} 0640)")
    except BaseException:
        for p in created:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)
        raise
    return written


def report(result: ImportPlan) -> list[str]:
    """What goes where, one line each; never a secret value."""
    lines = [f"import: {result.source} ({result.format}), {len(result.servers)} server(s)"]
    lines.extend(f"note: {n}" for n in result.notes)
    for s in result.servers:
        renamed = f" (was {s.original})" if s.original != s.name else ""
        lines.append(f"server {s.name}{renamed} [{s.transport}] -> {IMPORTED_NAME}, secrets/{s.name}.env")
        for e in s.env:
            if e.why:
                lines.append(f"  {e.origin}: secret ({e.why}) -> secrets/{s.name}.env as {e.key}")
        for e in s.plain:
            lines.append(f"  {e.origin}: plain setting ({e.why}) -> env in {IMPORTED_NAME} as {e.key}")
        lines.extend(f"  {m}" for m in s.moves)
        secret_keys = ", ".join(e.key for e in s.env) or "none"
        lines.append(f"  env file secrets/{s.name}.env (secrets, redacted from what agents see): {secret_keys}")
        if s.transport == "stdio":
            plain_keys = ", ".join(e.key for e in s.plain) or "none"
            lines.append(f"  env in {IMPORTED_NAME} (plain settings, never redacted): {plain_keys}")
        lines.extend(f"  WARNING: {w}" for w in s.warnings)
        lines.extend(f"  TODO: {t}" for t in s.todos)
        if s.suggest_allow:
            lines.append(
                "  the client allowed only some tools; to allow them here: mcp-brokerctl allow "
                + " ".join(s.suggest_allow)
            )
    return lines
