"""Privileged tests of ``broker.spawner.service``: the real spawner, in a child process, over a real socketpair.

The test plays the daemon: it sends frames with ``channel.send`` and reads
answers with ``channel.recv`` / ``check_answer``, against a spawner that
reads root's configuration from a staging root (``broker.toml``, a root
0600 env file, ``gate-users``) and starts real servers under real locked
users in real sandboxes. No mocks.

- hello, load, secrets, start (three descriptors: the server's stdin,
  stdout, stderr) and stop round trips, with what the server sees (its
  user, its home, its environment: PATH, HOME, LANG, its plain ``env``
  and its env file, nothing of the spawner's);
- refusals (unknown server, HTTP server, wrong or missing agent, root or
  a login account as the server's user, an env file others can read):
  ``ok: false``, no descriptor, and nothing changes;
- the end of the channel stops every server, detached grandchildren too,
  and the spawner returns 0; a request outside the protocol is fatal: it
  stops everything and returns 1; descriptors sent with a request are
  never kept;
- a hostile daemon (hypothesis): whatever it sends, the spawner answers
  as the protocol says, or returns 0 or 1, never raises, never keeps a
  descriptor, and never starts anything but a configured server, as its
  configured user, with its configured command.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pwd
import shutil
import socket
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from broker.core import channel, wire
from broker.core.errors import ProtocolError
from broker.core.paths import Paths
from broker.core.servers import server_user_for
from broker.spawner import kernel, service
from tests.unit import spawner_helpers as h

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: real users, namespaces and Landlock")

SECRET = "s3cr3t-token-for-ut1"
WEB_TOKEN = "web-bearer-token-value"
AGENT = "utagent"
WAIT = 20.0

#: what a script started in a sandbox prints (see :data:`PLANT`): the test's stand-in for a hostile server
PLANT = r"""
import os, sys
home = os.environ["HOME"]
if not os.path.lexists(home + "/work-old"):
    # first run: the bound {home}/work/data is a mount point, but its parent can move; plant a symlink
    os.rename(home + "/work", home + "/work-old")
    os.mkdir(home + "/work")
    os.symlink(sys.argv[1], home + "/work/data")
    print("planted", flush=True)
else:
    with open(home + "/work/data/escaped", "w") as fh:
        fh.write("written from inside the sandbox")
    print("wrote", flush=True)
"""


def broker_toml(base: str) -> str:
    etc = Paths(base).etc
    echo = f"{base}/bin/echo.py"
    return f"""
[servers.ut1]
command = "{h.PYTHON}"
args = ["-I", "{echo}", "--detach"]
env_file = "{etc}/secrets/ut1.env"
env = {{ LOG_LEVEL = "info" }}

[servers.utpc]
command = "{h.PYTHON}"
args = ["-I", "{echo}", "--detach"]
per_caller = true

[servers.web]
url = "http://127.0.0.1:9/mcp"
env_file = "{etc}/secrets/web.env"
headers = {{ Authorization = "Bearer ${{WEB_TOKEN}}" }}

[servers.asroot]
command = "{h.PYTHON}"
args = ["-I", "{echo}"]
user = "root"

[servers.login]
command = "{h.PYTHON}"
args = ["-I", "{echo}"]
user = "{h.USER_LOGIN}"

[servers.ut2]
command = "{h.PYTHON}"
args = ["-I", "{base}/bin/plant.py", "{base}/outside"]
write_paths = ["{{home}}/work/data"]
"""


ECHO_DETACH = (
    r"""
import os, sys
if "--detach" in sys.argv:
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            fd = os.open("/dev/null", os.O_RDWR)
            for std in (0, 1, 2):
                os.dup2(fd, std)
            import time
            time.sleep(300)
        os._exit(0)
    os.wait()
"""
    + h.ECHO
)


@dataclass
class Setup:
    base: str
    paths: Paths
    echo: str
    env_file: str
    uids: dict[str, int]
    #: uids a configured, startable instance runs as
    server_uids: frozenset[int]
    #: the command line every such server (and what it forks) has
    server_cmdline: list[str]


@pytest.fixture(scope="module")
def setup() -> Iterator[Setup]:
    assert server_user_for("ut1") == h.USER1 and server_user_for("ut2") == h.USER2
    assert server_user_for("utpc", AGENT) == h.USER_PC
    users = {name: h.ensure_user(name) for name in (h.USER1, h.USER2, h.USER_PC)}
    users[h.USER_LOGIN] = h.ensure_user(h.USER_LOGIN, shell="/bin/bash")
    with h.staging("mcp-privsep-ut-service-") as base:
        paths = Paths(base)
        echo = h.write(f"{base}/bin/echo.py", ECHO_DETACH)
        h.write(f"{base}/bin/plant.py", PLANT)
        os.makedirs(f"{base}/outside")
        os.chmod(f"{base}/outside", 0o1777)
        h.write(paths.broker_toml, broker_toml(base), mode=0o640)
        env_file = h.write(f"{paths.secrets}/ut1.env", f"# ut1's secrets\nTOKEN={SECRET}\n", mode=0o600)
        h.write(f"{paths.secrets}/web.env", f"WEB_TOKEN={WEB_TOKEN}\n", mode=0o600)
        os.chmod(paths.secrets, 0o700)
        h.write(paths.gate_users, f"{AGENT} mcp-gate-{AGENT}\n", mode=0o644)
        uids = {name: pw.pw_uid for name, pw in users.items()}
        yield Setup(
            base,
            paths,
            echo,
            env_file,
            uids,
            frozenset({uids[h.USER1], uids[h.USER_PC]}),
            [h.PYTHON, "-I", echo, "--detach"],
        )
    for uid in uids.values():
        kill_uid_quietly(uid)


def kill_uid_quietly(uid: int) -> None:
    for pid in h.live_pids_of_uid(uid):
        h.kill_quietly(pid)


# --- the spawner in a child process -----------------------------------------------------------------


@dataclass
class Spawned:
    pid: int
    sock: socket.socket
    errors: Any
    code: int | None = None

    def log(self) -> str:
        self.errors.seek(0)
        return str(self.errors.read().decode(errors="replace"))

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))


def spawn(paths: Paths) -> Spawned:
    """Fork the spawner (``service.run``) with the other end of a socketpair, its log in a temporary file."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    errors = tempfile.TemporaryFile(dir=h.STAGING_PARENT)  # noqa: SIM115 - closed with the Spawned
    pid = os.fork()
    if pid == 0:  # the spawner; never back into pytest
        code = 70
        try:
            ours.close()
            os.dup2(errors.fileno(), 2)
            sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - pytest's capture is not fd 2
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
            logging.getLogger().handlers[:] = [handler]
            logging.getLogger().setLevel(logging.INFO)
            code = service.run(paths, theirs.detach())
        except BaseException:
            traceback.print_exc()
            sys.stderr.flush()
            code = 70
        finally:
            os._exit(code)
    theirs.close()
    ours.settimeout(WAIT)
    deadline = time.monotonic() + WAIT
    while os.path.lexists(f"/proc/{pid}/fd/{ours.fileno()}") and time.monotonic() < deadline:
        time.sleep(0.001)  # until it has closed our end: its descriptors are counted from then on
    return Spawned(pid, ours, errors)


def ask(sp: Spawned, obj: dict[str, Any], fds: tuple[int, ...] = ()) -> tuple[dict[str, Any] | None, list[int]]:
    channel.send(sp.sock, obj, channel.MAX_REQUEST_BYTES, fds)
    return channel.recv(sp.sock, channel.MAX_ANSWER_BYTES, channel.START_FDS)


def request(sp: Spawned, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
    """One well-formed request and its checked answer."""
    answer, fds = ask(sp, channel.request(op, **fields))
    assert answer is not None, f"the spawner ended instead of answering {op}: {sp.log()}"
    return channel.check_answer(op, answer, fds), fds


def finish(sp: Spawned, timeout: float = WAIT) -> int:
    """Close the daemon's end; the spawner's exit code."""
    with contextlib.suppress(OSError):
        sp.sock.close()
    return wait_exit(sp, timeout)


def wait_exit(sp: Spawned, timeout: float = WAIT) -> int:
    if sp.code is not None:
        return sp.code
    deadline = time.monotonic() + timeout
    while True:
        pid, status = os.waitpid(sp.pid, os.WNOHANG)
        if pid:
            sp.code = os.waitstatus_to_exitcode(status)
            return sp.code
        if time.monotonic() > deadline:
            h.kill_quietly(sp.pid)
            sp.code = -9
            raise AssertionError(f"the spawner did not end within {timeout} s: {sp.log()}")
        time.sleep(0.01)


@pytest.fixture
def spawner(setup: Setup) -> Iterator[Spawned]:
    sp = spawn(setup.paths)
    try:
        yield sp
    finally:
        with contextlib.suppress(AssertionError):
            finish(sp)  # kills it (by its pid, still unreaped) if it does not end
        for uid in setup.uids.values():
            left = h.wait_no_uid(uid, timeout=3.0)
            for pid in left:
                h.kill_quietly(pid)
            assert not left, f"processes of uid {uid} outlived the spawner"
        log = sp.log()
        sp.errors.close()
        assert "Traceback" not in log, log


def loaded(sp: Spawned) -> dict[str, Any]:
    answer, _ = request(sp, "load")
    assert answer["problems"] == [], answer["problems"]
    return answer


def close_all(fds: list[int]) -> None:
    channel.close_all(fds)


def server_line(fds: list[int]) -> dict[str, Any]:
    line = h.read_line(fds[1])
    assert line, f"the server said nothing; stderr: {h.read_all(fds[2], 2)!r}"
    report = json.loads(line)
    assert isinstance(report, dict)
    return report


# --- round trips ---------------------------------------------------------------------------------------


def test_hello_load_secrets_start_stop(setup: Setup, spawner: Spawned) -> None:
    hello, _ = request(spawner, "hello")
    assert hello["version"] == channel.VERSION
    host = hello["host"]
    assert host["landlock_abi"] == kernel.landlock_abi()
    assert host["pid_namespace"] is True and host["mount_namespace"] is True and host["network_namespace"] is True
    assert host["disabled"] == []

    load = loaded(spawner)
    inst = load["instances"]
    assert set(inst) == {"ut1", f"utpc@{AGENT}", "asroot", "login", "ut2"}  # web is HTTP: nothing to start
    assert inst["ut1"]["user"] == h.USER1 and inst["ut1"]["agent"] is None and inst["ut1"]["problem"] is None
    assert inst[f"utpc@{AGENT}"]["user"] == h.USER_PC and inst[f"utpc@{AGENT}"]["problem"] is None
    assert "root" in inst["asroot"]["problem"]
    assert "login shell" in inst["login"]["problem"]
    assert len(inst["ut1"]["fingerprint"]) == 64

    secrets, _ = request(spawner, "secrets", server="ut1")
    assert secrets["redact"] == {"ut1.TOKEN": SECRET} and secrets["url"] is None and secrets["headers"] == {}
    web, _ = request(spawner, "secrets", server="web")
    assert web["url"] == "http://127.0.0.1:9/mcp"
    assert web["headers"] == {"Authorization": f"Bearer {WEB_TOKEN}"}
    assert WEB_TOKEN in web["redact"].values()

    started, fds = request(spawner, "start", server="ut1", agent=None)
    try:
        assert len(fds) == channel.START_FDS
        assert started["user"] == h.USER1 and started["warnings"] == []
        assert started["protections"]["uid"] == setup.uids[h.USER1]
        assert started["protections"]["pid_namespace"] is True and started["protections"]["landlock"] >= 6
        assert started["pid"] in h.descendants(spawner.pid)
        home = setup.paths.server_home("ut1")
        seen = server_line(fds)
        assert seen["uid"] == setup.uids[h.USER1]
        assert seen["cwd"] == home
        assert seen["env"] == {
            "PATH": service.BASE_PATH,
            "HOME": home,
            "LANG": "C.UTF-8",
            "LOG_LEVEL": "info",
            "TOKEN": SECRET,
        }
        # the broker's files are gone (gate-users is world-readable: only the sandbox hides it), and so are
        # other servers' homes
        assert seen["gate_users"] in ("ENOENT", "EACCES") and seen["etc"] in ({"ok": []}, "EACCES"), seen
        assert seen["homes"] in ({"ok": ["ut1"]}, "EACCES"), seen["homes"]
        st_home = os.lstat(home)
        assert (st_home.st_uid, stat.S_IMODE(st_home.st_mode)) == (setup.uids[h.USER1], 0o700)
        st_parent = os.lstat(setup.paths.server_homes)
        assert (st_parent.st_uid, stat.S_IMODE(st_parent.st_mode)) == (0, 0o755)
        # its pipes are the daemon's: what goes in comes back
        os.write(fds[0], b"ping\n")
        assert h.read_line(fds[1]) == b"ping\n"
        assert len(h.live_pids_of_uid(setup.uids[h.USER1])) == 2  # the server and its detached grandchild
        stopped, none = request(spawner, "stop", server="ut1", agent=None)
        assert stopped["stopped"] is True and none == []
        assert h.wait_no_uid(setup.uids[h.USER1]) == []
        assert h.read_all(fds[1]) == b""
        again, _ = request(spawner, "stop", server="ut1", agent=None)
        assert again["stopped"] is False
    finally:
        close_all(fds)
    assert finish(spawner) == 0


def test_a_per_caller_instance_starts_under_its_own_user(setup: Setup, spawner: Spawned) -> None:
    loaded(spawner)
    started, fds = request(spawner, "start", server="utpc", agent=AGENT)
    try:
        assert started["user"] == h.USER_PC
        seen = server_line(fds)
        assert seen["uid"] == setup.uids[h.USER_PC]
        assert seen["env"]["HOME"] == setup.paths.server_home(f"utpc@{AGENT}")
        assert "TOKEN" not in seen["env"]  # ut1's env file is ut1's only
        assert seen["homes"] in ({"ok": [f"utpc@{AGENT}"]}, "EACCES"), seen["homes"]
    finally:
        close_all(fds)
    stopped, _ = request(spawner, "stop", server="utpc", agent=AGENT)
    assert stopped["stopped"] is True
    assert h.wait_no_uid(setup.uids[h.USER_PC]) == []


# --- refusals -------------------------------------------------------------------------------------------

REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("start", {"server": "nope", "agent": None}, "no server named"),
    ("start", {"server": "web", "agent": None}, "HTTP server"),
    ("start", {"server": "ut1", "agent": AGENT}, "not per caller"),
    ("start", {"server": "utpc", "agent": None}, "per caller"),
    ("start", {"server": "utpc", "agent": "stranger"}, "not an agent"),
    ("start", {"server": "asroot", "agent": None}, "root"),
    ("start", {"server": "login", "agent": None}, "login shell"),
    ("start", {"server": "../ut1", "agent": None}, "no server named"),
    ("stop", {"server": "nope", "agent": None}, "no server named"),
    ("stop", {"server": "utpc", "agent": "stranger"}, "not an agent"),
    ("secrets", {"server": "nope"}, "no server named"),
]


def test_refusals_change_nothing(setup: Setup, spawner: Spawned) -> None:
    loaded(spawner)
    started, fds = request(spawner, "start", server="ut1", agent=None)
    try:
        server_line(fds)
        before = sorted(h.descendants(spawner.pid))
        for op, fields, why in REFUSED:
            answer, got = request(spawner, op, **fields)
            assert answer["ok"] is False and got == [], (op, fields, answer)
            assert why in answer["error"], (op, fields, answer["error"])
            assert sorted(h.descendants(spawner.pid)) == before, (op, fields)
        for name in (h.USER_LOGIN,):
            assert h.live_pids_of_uid(setup.uids[name]) == []
        # ut1 still runs, on the same pipes
        os.write(fds[0], b"still there\n")
        assert h.read_line(fds[1]) == b"still there\n"
    finally:
        close_all(fds)
    assert started["pid"] in h.descendants(spawner.pid)


def test_an_env_file_others_can_read_is_refused(setup: Setup, spawner: Spawned) -> None:
    loaded(spawner)
    os.chmod(setup.env_file, 0o640)
    try:
        answer, fds = request(spawner, "start", server="ut1", agent=None)
        assert answer["ok"] is False and fds == [] and "0600" in answer["error"]
        secrets, _ = request(spawner, "secrets", server="ut1")
        assert secrets["ok"] is False and SECRET not in json.dumps(secrets)
    finally:
        os.chmod(setup.env_file, 0o600)
    assert h.live_pids_of_uid(setup.uids[h.USER1]) == []


def test_a_refused_restart_leaves_the_running_instance_alone(setup: Setup, spawner: Spawned) -> None:
    loaded(spawner)
    _started, fds = request(spawner, "start", server="ut1", agent=None)
    try:
        server_line(fds)
        os.chmod(setup.env_file, 0o640)
        try:
            answer, _ = request(spawner, "start", server="ut1", agent=None)
        finally:
            os.chmod(setup.env_file, 0o600)
        assert answer["ok"] is False
        try:
            os.write(fds[0], b"still there\n")
            alive = h.read_line(fds[1], timeout=3) == b"still there\n"
        except BrokenPipeError:
            alive = False
        assert alive, "the refused start stopped the running instance"
    finally:
        close_all(fds)


# --- the end of the channel ---------------------------------------------------------------------------


def test_when_the_daemon_goes_away_every_server_stops_and_the_spawner_returns_0(setup: Setup, spawner: Spawned) -> None:
    loaded(spawner)
    _, fds1 = request(spawner, "start", server="ut1", agent=None)
    _, fds2 = request(spawner, "start", server="utpc", agent=AGENT)
    try:
        server_line(fds1)
        server_line(fds2)
        assert len(h.live_pids_of_uid(setup.uids[h.USER1])) == 2
        assert finish(spawner) == 0
        assert h.wait_no_uid(setup.uids[h.USER1]) == []
        assert h.wait_no_uid(setup.uids[h.USER_PC]) == []
        assert not [p for p in h.all_pids() if setup.echo in " ".join(h.cmdline(p))]
    finally:
        close_all(fds1 + fds2)


@pytest.mark.parametrize(
    "frame",
    [
        channel.request("exec", command="/bin/sh"),
        channel.request("start", server="ut1", agent=None, command="/bin/sh"),
        channel.request("start", server="ut1"),
        channel.request("start", server=["ut1"], agent=None),
        {"v": 2, "op": "hello"},
        {"v": True, "op": "hello"},
        {"op": "hello"},
    ],
)
def test_a_request_outside_the_protocol_stops_everything_and_returns_1(
    setup: Setup, spawner: Spawned, frame: dict[str, Any]
) -> None:
    loaded(spawner)
    _, fds = request(spawner, "start", server="ut1", agent=None)
    try:
        server_line(fds)
        answer, got = ask(spawner, frame)
        assert (answer, got) == (None, []), "the spawner answered a request outside the protocol"
        assert wait_exit(spawner) == 1
        assert h.wait_no_uid(setup.uids[h.USER1]) == []
    finally:
        close_all(fds)
    assert "stopping every server" in spawner.log()


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00\x00\x00\x00",  # an empty frame
        (channel.MAX_REQUEST_BYTES + 1).to_bytes(4, "big"),  # oversized, announced
        b"\x00\x00\x00\x05{}}}}",  # malformed JSON
        b"\x00\x00\x00\x02[]",  # not an object
        b"\x00\x00\x00\x04\xff\xfe\xfd\xfc",  # not UTF-8
    ],
)
def test_a_malformed_frame_is_fatal(setup: Setup, spawner: Spawned, raw: bytes) -> None:
    loaded(spawner)
    spawner.sock.sendall(raw)
    assert channel.recv(spawner.sock, channel.MAX_ANSWER_BYTES, channel.START_FDS) == (None, [])
    assert wait_exit(spawner) == 1


def test_a_frame_cut_short_by_the_end_of_the_channel_is_fatal(spawner: Spawned) -> None:
    spawner.sock.sendall(b'\x00\x00\x00\x40{"v": 1')
    spawner.sock.shutdown(socket.SHUT_WR)
    assert wait_exit(spawner) == 1


def test_descriptors_sent_with_a_request_are_never_kept(setup: Setup, spawner: Spawned) -> None:
    loaded(spawner)
    before = spawner.fd_count()
    secret = os.open(setup.env_file, os.O_RDONLY)
    r, w = os.pipe()
    try:
        for _ in range(3):
            answer, fds = ask(spawner, channel.request("hello"), (secret, r, w))
            assert answer is not None and answer["ok"] is True and fds == []
        assert spawner.fd_count() == before
    finally:
        for fd in (secret, r, w):
            os.close(fd)
    assert finish(spawner) == 0


def test_a_server_cannot_redirect_a_home_write_path_outside_its_sandbox(setup: Setup, spawner: Spawned) -> None:
    home = setup.paths.server_home("ut2")
    uid = setup.uids[h.USER2]
    gid = pwd.getpwuid(uid).pw_gid
    os.makedirs(setup.paths.server_homes, mode=0o755, exist_ok=True)
    os.makedirs(f"{home}/work/data", exist_ok=True)
    for d in (home, f"{home}/work", f"{home}/work/data"):
        os.chown(d, uid, gid)
    os.chmod(home, 0o700)
    escaped = f"{setup.base}/outside/escaped"
    loaded(spawner)
    try:
        for expected in (b"planted\n", b"wrote\n"):
            answer, fds = request(spawner, "start", server="ut2", agent=None)
            try:
                if answer["ok"] is False:
                    break  # refused: what a fix may do
                assert h.read_line(fds[1]) == expected, h.read_all(fds[2], 2)
            finally:
                close_all(fds)
            request(spawner, "stop", server="ut2", agent=None)
        assert not os.path.exists(escaped), "the server wrote outside its sandbox through its own symlink"
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(escaped)
        shutil.rmtree(home, ignore_errors=True)


# --- a hostile daemon -------------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=12),
)
_JSON = st.recursive(
    _SCALARS, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6
)
_SERVERS = st.sampled_from(
    ["ut1", "ut1", "ut1", "utpc", "utpc", "web", "asroot", "login", "nope", "", "UT1", "../ut1", "ut1@utagent",
     "ut1\x00x", "/usr/bin/python3", "/bin/sh", "x" * 1025]
) | st.text(max_size=8)  # fmt: skip
_AGENTS = st.sampled_from([None, None, None, AGENT, AGENT, "stranger", "root", "", "../utagent", f"{AGENT}\n"])
_OPS = st.sampled_from(["start", "start", "start", "stop", "stop", "hello", "load", "secrets"])
_EXTRA_KEYS = st.sampled_from(["command", "args", "env", "user", "path", "cwd", "uid", "home", "write_paths", "fd"])
_EXTRA_VALUES = st.sampled_from(["/bin/sh", ["-c", "id"], {"LD_PRELOAD": "/x.so"}, "root", "/", 0]) | _JSON


@st.composite
def requests(draw: st.DrawFn) -> dict[str, Any]:
    """Well-formed requests of every op, naming configured and unconfigured servers and agents."""
    op = draw(_OPS)
    obj: dict[str, Any] = {"v": channel.VERSION, "op": op}
    if draw(st.booleans()):  # a configured instance, as it is named
        server, agent = draw(st.sampled_from([("ut1", None), ("utpc", AGENT)]))
    else:
        server, agent = draw(_SERVERS), draw(_AGENTS)
    if op in ("start", "stop", "secrets"):
        obj["server"] = server
    if op in ("start", "stop"):
        obj["agent"] = agent
    return obj


@st.composite
def near_misses(draw: st.DrawFn) -> dict[str, Any]:
    """A request one step outside the protocol: another version or op, an extra or missing key, a wrong type."""
    obj = draw(requests())
    how = draw(st.sampled_from(["version", "op", "extra", "missing", "type"]))
    if how == "version":
        obj["v"] = draw(st.sampled_from([2, 0, True, "1", 1.0, None]))
    elif how == "op":
        obj["op"] = draw(st.sampled_from(["exec", "Start", "", "spawn", "run", "kill", None, 1]))
    elif how == "extra":
        obj.update(draw(st.dictionaries(_EXTRA_KEYS, _EXTRA_VALUES, min_size=1, max_size=2)))
    elif how == "missing":
        obj.pop(draw(st.sampled_from(sorted(obj))))
    else:
        keys: list[str] = [k for k in ("server", "agent") if k in obj] or ["v"]
        obj[draw(st.sampled_from(keys))] = draw(st.sampled_from([0, 1, True, False, 1.5, ["ut1"], {"ut1": None}]))
    return obj


@dataclass(frozen=True)
class Frame:
    kind: str  # "json": an object, "payload": raw bytes as a frame, "length": a bare header
    obj: Any = None
    raw: bytes = b""
    fds: int = 0

    def encode(self) -> bytes:
        if self.kind == "json":
            payload = json.dumps(self.obj).encode()
            return len(payload).to_bytes(4, "big") + payload
        if self.kind == "payload":
            return len(self.raw).to_bytes(4, "big") + self.raw
        return self.raw

    def expected_op(self) -> str | None:
        """The op the spawner must answer, as the protocol says; None: it must treat the frame as fatal."""
        data = self.encode()
        try:
            n = wire.frame_length(data[:4], channel.MAX_REQUEST_BYTES)
            if len(data) != 4 + n:
                return None
            return channel.check_request(wire.decode_payload(data[4:]))
        except ProtocolError:
            return None


_FDS = st.sampled_from([0, 0, 0, 1, 3, 8])
#: mostly well-formed requests (the spawner must answer those), then what ends the channel
FRAMES = st.one_of(
    st.builds(Frame, st.just("json"), requests(), fds=_FDS),
    st.builds(Frame, st.just("json"), requests(), fds=_FDS),
    st.builds(Frame, st.just("json"), requests(), fds=_FDS),
    st.builds(Frame, st.just("json"), near_misses(), fds=_FDS),
    st.builds(Frame, st.just("json"), st.dictionaries(st.text(max_size=6), _JSON, max_size=4), fds=_FDS),
    st.builds(Frame, st.just("payload"), raw=st.binary(min_size=1, max_size=48), fds=_FDS),
    st.builds(
        Frame,
        st.just("length"),
        raw=st.sampled_from([0, channel.MAX_REQUEST_BYTES + 1, 2**32 - 1]).map(lambda n: n.to_bytes(4, "big")),
    ),
)


def check_processes(setup: Setup, sp: Spawned, me: list[str]) -> None:
    """Below the spawner: root processes are its own forks (keepers), the rest the configured servers."""
    for pid in h.descendants(sp.pid):
        uids = h.uids_of(pid)
        cmd = h.cmdline(pid)
        if not uids or not cmd:
            continue  # gone meanwhile, or in its last moments
        if uids[0] == 0:
            assert cmd == me, f"a root process below the spawner runs {cmd}"
        else:
            assert set(uids) <= setup.server_uids, f"pid {pid} runs as {uids}: {cmd}"
            assert cmd == setup.server_cmdline, f"pid {pid} runs {cmd}"


def hostile_run(setup: Setup, frames: list[Frame], tail: bytes | None, load_first: bool) -> None:
    me = h.cmdline(os.getpid())
    sp = spawn(setup.paths)
    filler = os.open("/dev/null", os.O_RDONLY)
    try:
        if load_first:
            loaded(sp)
        baseline = sp.fd_count()
        fatal = False
        for frame in frames:
            expected = frame.expected_op()
            try:
                data = frame.encode()
                if frame.fds:
                    socket.send_fds(sp.sock, [data[:1]], [filler] * frame.fds)
                    data = data[1:]
                sp.sock.sendall(data)
                answer, fds = channel.recv(sp.sock, channel.MAX_ANSWER_BYTES, channel.START_FDS)
            except (BrokenPipeError, ConnectionResetError):
                answer, fds = None, []
            try:
                if answer is None:
                    assert expected is None, f"the spawner ended on a valid {expected} request: {sp.log()}"
                    fatal = True
                    event("fatal")
                    break
                assert expected is not None, f"the spawner answered a frame outside the protocol: {answer}"
                checked = channel.check_answer(expected, answer, fds)
                event(f"{expected}: {'ok' if checked['ok'] else 'refused'}")
                req = wire.decode_payload(frame.encode()[4:])
                if expected == "start" and checked["ok"]:
                    assert (req["server"], req["agent"]) in (("ut1", None), ("utpc", AGENT)), req
                    assert checked["user"] in (h.USER1, h.USER_PC)
                if req.get("server") not in ("ut1", "utpc", "web", "ut2", "asroot", "login") and expected in (
                    "start",
                    "stop",
                    "secrets",
                ):
                    assert checked["ok"] is False, req
                check_processes(setup, sp, me)
                # it closes its copies of a start's pipes just after sending them: give it that moment
                assert h.wait_until(lambda: sp.fd_count() == baseline, 2.0), "the spawner kept a descriptor"
            finally:
                channel.close_all(fds)
        if not fatal and tail is not None:
            with contextlib.suppress(OSError):
                sp.sock.sendall(tail)
        code = finish(sp)
        # fatal, or a tail that cannot be a whole valid request (too short): 1; a clean end: 0
        assert code == (1 if fatal or tail else 0), f"the spawner exited {code}: {sp.log()}"
        log = sp.log()
        assert "Traceback" not in log, log
        for uid in setup.server_uids:
            assert h.wait_no_uid(uid) == [], "a server outlived the spawner"
    finally:
        os.close(filler)
        with contextlib.suppress(OSError):
            sp.sock.close()
        if sp.code is None:
            h.kill_quietly(sp.pid)
        sp.errors.close()
        for uid in setup.uids.values():
            kill_uid_quietly(uid)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    frames=st.lists(FRAMES, min_size=1, max_size=5),
    tail=st.none() | st.binary(max_size=12),
    load_first=st.booleans(),
)
def test_a_hostile_daemon_gets_answers_or_an_end_and_starts_nothing_unconfigured(
    setup: Setup, frames: list[Frame], tail: bytes | None, load_first: bool
) -> None:
    hostile_run(setup, frames, tail, load_first)
