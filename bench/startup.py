"""Server start-up, with and without the sandbox: the spawner itself, driven as the daemon drives it.

Two throw-away roots under ``/srv`` each get one stdio server (the bundled
demo server, under its own user) and their own spawner
(``python -I -m broker.spawner``, root, over a socketpair, exactly as
mcp-brokerd starts it). One root's ``[sandbox] disable`` names every
protection the host could lack (pid, mount and network namespaces,
Landlock), so that server runs with only what is left: its own user,
rlimits and ``no_new_privs``. A third column starts the same server as a
plain child process of its user (what the first version did, under
``mcp-broker``): the cost of the spawner and the sandbox is the difference.

Each sample is one ``start`` request, the server's ``initialize`` answer on
the pipes the spawner handed back, then ``stop``; the three are taken in
turn, so drift on the machine hits them alike. Nothing of the bench's
installation is touched; the roots (and their spawners) are removed after,
and the two server accounts with them.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

from benchlib import BenchError, summary

from broker.core import channel
from broker.core.paths import Paths
from broker.core.servers import PROTECTIONS, server_user_for

#: the first request of every MCP session (a newer client would say so; the server answers alike)
INITIALIZE = (
    json.dumps(
        {
            "jsonrpc": "2.0",
            "id": 1,
            "method": "initialize",
            "params": {
                "protocolVersion": "2025-11-25",
                "capabilities": {},
                "clientInfo": {"name": "mcp-privsep-bench", "version": "1"},
            },
        }
    )
    + "\n"
).encode()
#: where the roots go: not /tmp, which every sandboxed server sees as its own, empty one
PARENT = "/srv"
READ_SECONDS = 30.0


class Spawner:
    """One spawner on its own root, spoken to over its channel like the daemon's ``SpawnerClient``."""

    def __init__(self, root: str, server: str, disable: tuple[str, ...]) -> None:
        self.root, self.server = root, server
        paths = Paths(root)
        for d in (paths.etc, paths.servers_d, paths.state, paths.log, paths.secrets):
            os.makedirs(d, mode=0o755, exist_ok=True)
        os.chmod(paths.secrets, 0o700)
        text = (
            f"[servers.{server}]\ncommand = {json.dumps(sys.executable)}\n"
            'args = ["-m", "mcp_servers.demo"]\nenv = { DEMO_SECRET = "not-a-secret" }\n'
        )
        if disable:
            text += f"\n[sandbox]\ndisable = {json.dumps(list(disable))}\n"
        with open(paths.broker_toml, "w", encoding="utf-8") as fh:
            fh.write(text)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        argv = [sys.executable, "-I", "-m", "broker.spawner", "--root", root, "--fd", str(theirs.fileno())]
        argv += ["--log", paths.spawner_log]
        self.proc = subprocess.Popen(argv, pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL)
        theirs.close()
        self.sock = ours
        self.sock.settimeout(READ_SECONDS)
        self.ask("hello")
        loaded = self.ask("load")[0]
        if loaded["problems"]:
            raise BenchError(f"the bench's spawner config has problems: {loaded['problems']}")

    def ask(self, op: str, **fields: Any) -> tuple[dict[str, Any], list[int]]:
        channel.send(self.sock, channel.request(op, **fields), channel.MAX_REQUEST_BYTES)
        answer, fds = channel.recv(self.sock, channel.MAX_ANSWER_BYTES, channel.START_FDS)
        if answer is None:
            raise BenchError(f"the spawner closed its channel (see {self.root}/var/log/mcp-privsep/spawner.log)")
        checked = channel.check_answer(op, answer, fds)
        if not checked["ok"]:
            channel.close_all(fds)
            raise BenchError(f"spawner refused {op}: {checked['error']}")
        return checked, fds

    def sample(self, calls: int = 0) -> tuple[float, float, dict[str, Any], list[float]]:
        """ms until the spawner answered start and until the server answered initialize; its protections;
        then ``calls`` echo round trips on its pipes (ms each)."""
        t0 = time.perf_counter()
        answer, fds = self.ask("start", server=self.server, agent=None)
        t1 = time.perf_counter()
        stdin, stdout, _stderr = fds
        try:
            reader = _initialize(stdin, stdout)
            t2 = time.perf_counter()
            trips = round_trips(stdin, reader, calls)
        finally:
            channel.close_all(fds)
            self.ask("stop", server=self.server, agent=None)
        return (t1 - t0) * 1000, (t2 - t0) * 1000, answer["protections"], trips

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _initialize(stdin: int, stdout: int) -> Any:
    os.write(stdin, INITIALIZE)
    reader = os.fdopen(os.dup(stdout), "rb", buffering=0)
    line = reader.readline()
    if b'"result"' not in line:
        raise BenchError(f"initialize failed: {line[:200]!r}")
    os.write(stdin, b'{"jsonrpc":"2.0","method":"notifications/initialized"}\n')
    return reader


def round_trips(stdin: int, reader: Any, calls: int) -> list[float]:
    """ms of each tools/call of the demo's echo on the server's own pipes (no broker in between)."""
    out: list[float] = []
    try:
        for i in range(calls):
            msg = {
                "jsonrpc": "2.0",
                "id": 100 + i,
                "method": "tools/call",
                "params": {"name": "echo", "arguments": {"text": "hi"}},
            }
            t0 = time.perf_counter()
            os.write(stdin, (json.dumps(msg) + "\n").encode())
            line = reader.readline()
            out.append((time.perf_counter() - t0) * 1000)
            if b'"result"' not in line:
                raise BenchError(f"echo failed: {line[:200]!r}")
    finally:
        reader.close()
    return out


def plain_sample(user: str, calls: int = 0) -> tuple[float, list[float]]:
    """ms until the same server, a plain child process of its user, answered initialize; its round trips."""
    pw = pwd.getpwnam(user)
    env = {"PATH": "/usr/bin:/bin", "HOME": pw.pw_dir, "LANG": "C.UTF-8", "DEMO_SECRET": "not-a-secret"}
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mcp_servers.demo"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        user=pw.pw_uid,
        group=pw.pw_gid,
        extra_groups=[],
        env=env,
        cwd="/",
    )
    try:
        assert proc.stdin is not None and proc.stdout is not None
        reader = _initialize(proc.stdin.fileno(), proc.stdout.fileno())
        took = (time.perf_counter() - t0) * 1000
        return took, round_trips(proc.stdin.fileno(), reader, calls)
    finally:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def spawners() -> Iterator[tuple[Spawner, Spawner]]:
    base = tempfile.mkdtemp(prefix="mcp-privsep-bench-start-", dir=PARENT)
    os.chmod(base, 0o755)  # noqa: S103 - the servers' homes are under it: their users must pass
    made: list[Spawner] = []
    try:
        made.append(Spawner(f"{base}/sandboxed", "benchstart-sb", ()))
        made.append(Spawner(f"{base}/unsandboxed", "benchstart-nosb", PROTECTIONS))
        yield made[0], made[1]
    finally:
        for s in made:
            s.close()
        shutil.rmtree(base, ignore_errors=True)
        for name in ("benchstart-sb", "benchstart-nosb"):
            subprocess.run(["userdel", server_user_for(name)], capture_output=True, check=False)


def startup(n: int, calls: int = 300) -> dict[str, Any]:
    """Start-up of one stdio server (sandboxed, every optional protection disabled, plain), and a call's cost.

    The round trips (``calls`` echo calls on the server's own pipes, after
    the last start of each) show what the sandbox costs per call: nothing
    of it is on the path, so the three should be alike.
    """
    names = ("sandboxed", "unsandboxed", "plain_process")
    took: dict[str, list[float]] = {k: [] for k in names}
    answers: dict[str, list[float]] = {"sandboxed": [], "unsandboxed": []}
    trips: dict[str, list[float]] = {k: [] for k in names}
    protections: dict[str, dict[str, Any]] = {}
    with spawners() as (sb, nosb):
        for i in range(n + 2):
            last = i == n + 1
            a, b, prot_sb, t_sb = sb.sample(calls if last else 0)
            c, d, prot_nosb, t_nosb = nosb.sample(calls if last else 0)
            e, t_plain = plain_sample(server_user_for(nosb.server), calls if last else 0)
            trips["sandboxed"] += t_sb
            trips["unsandboxed"] += t_nosb
            trips["plain_process"] += t_plain
            if i < 2:  # warm the page cache and the accounts
                protections = {"sandboxed": prot_sb, "unsandboxed": prot_nosb}
                continue
            answers["sandboxed"].append(a)
            answers["unsandboxed"].append(c)
            for k, v in zip(names, (b, d, e), strict=True):
                took[k].append(v)
    out: dict[str, Any] = {k: summary(v) for k, v in took.items()}
    out.update({f"spawner_answer_{k}": summary(v) for k, v in answers.items()})
    out.update({f"round_trip_{k}": summary(v) for k, v in trips.items()})
    out["protections"] = protections
    return out
