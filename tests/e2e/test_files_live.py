"""The files server behind the real broker, attacked by the agent through sudo.

A read-only root (owned by root) and a read-write root (owned by
mcp-broker) are configured through ``servers.d/files.toml``. Next to them
lies ``outside``: owned by mcp-broker and readable and writable by it, so any
confinement bug would really leak or write there. As the agent: reading the
read-only root and writing the read-write one work (the file on disk belongs
to mcp-broker); every escape (``..``, an absolute path, a link planted by
root, a write to the read-only root, a FIFO, a device) fails with one clear
line, exit 1, no host path, and leaves an audit record naming the tool.
The read-write root has a small quota (``--quota inbox=16K,50``): a write
beyond it fails the same way and leaves nothing on disk. ``check`` refuses
a root that overlaps the broker's own directories.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import stat
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.core.servers import instance_name, server_user_for
from tests.e2e.harness import AGENT1, AGENT2, ALLOWLIST, PYTHON, Installation, server_account, write, write_servers_d

MARK = "FILES-E2E-OUTSIDE-SECRET"
FILES_TOOLS = ["roots", "list", "stat", "read", "search", "write", "append", "mkdir", "move", "delete"]
FILES_ALLOWLIST = ALLOWLIST + "".join(f"files.{t}\n" for t in FILES_TOOLS)


class Share:
    """Host paths of the three trees (the agent must never see any of them)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.ro = f"{base}/ro"
        self.rw = f"{base}/rw"
        self.outside = f"{base}/outside"
        self.device = False


def _tree(top: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dirpath, dirnames, filenames in os.walk(top):
        for name in [".", *dirnames, *filenames]:
            path = os.path.normpath(os.path.join(dirpath, name))
            st = os.lstat(path)
            if stat.S_ISREG(st.st_mode):
                with open(path, "rb") as fh:
                    out[path] = ("file", fh.read(), st.st_mtime_ns)
            elif stat.S_ISLNK(st.st_mode):
                out[path] = ("link", os.readlink(path))
            else:
                out[path] = ("other", st.st_mode, st.st_mtime_ns)
    return out


def _wait_up(inst: Installation, name: str, up: bool = True) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        r = inst.ctl("status", "--json")
        if r.code == 0:
            states = {s["name"]: s["state"] for s in json.loads(r.out)["servers"]}
            if (states.get(name) == "up") == up:
                return
        time.sleep(0.2)
    raise RuntimeError(f"files server not {'up' if up else 'gone'}: {inst.log_tail()}")


@pytest.fixture(scope="module")
def share(inst: Installation) -> Iterator[Share]:
    account = server_account("files")  # the files server's own user: what an escape would act as
    s = Share(f"{inst.root}/files-share")
    toml = f"{inst.paths.servers_d}/files.toml"
    try:
        os.makedirs(s.base, mode=0o755)
        os.chmod(s.base, 0o755)
        # the read-only root: root's files, readable by the server, with a FIFO, a device and links out
        os.makedirs(f"{s.ro}/docs", mode=0o755)
        write(f"{s.ro}/docs/hello.txt", "hello from the NAS\n")
        os.mkfifo(f"{s.ro}/fifo", 0o644)
        with contextlib.suppress(OSError):
            os.mknod(f"{s.ro}/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
            s.device = True
        os.symlink("/etc", f"{s.ro}/etc")
        os.symlink("../outside", f"{s.ro}/up")
        # outside: the server's own, so Unix permissions would let an escape read it (its sandbox lets it read
        # the system; only the files server's confinement stands between the agent and this file)
        os.makedirs(s.outside, mode=0o755)
        write(f"{s.outside}/secret.txt", f"{MARK}\n", account.pw_uid, account.pw_gid, 0o644)
        os.chown(s.outside, account.pw_uid, account.pw_gid)
        # the read-write root, the server's own (and in its write_paths), with links planted by root pointing out
        os.makedirs(s.rw, mode=0o755)
        os.chown(s.rw, account.pw_uid, account.pw_gid)
        os.symlink(s.outside, f"{s.rw}/escape")
        os.symlink(f"{s.outside}/secret.txt", f"{s.rw}/secret-link")
        for p in (s.ro, f"{s.ro}/docs"):
            os.chmod(p, 0o755)
        write(
            toml,
            f"""
[servers.files]
command = "{PYTHON}"
args = ["-m", "mcp_servers.files", "--root", "nas={s.ro}:ro", "--root", "inbox={s.rw}:rw", "--quota", "inbox=16K,50"]
""",
            0,
            pwd.getpwnam("mcp-broker").pw_gid,
            0o640,
        )
        inst.ctl("reload", check=True)
        _wait_up(inst, "files")
        yield s
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(toml)
        with contextlib.suppress(Exception):
            inst.ctl("reload", check=True)
            _wait_up(inst, "files", up=False)
        shutil.rmtree(s.base, ignore_errors=True)


@pytest.fixture
def files(live: Installation, share: Share) -> Iterator[Installation]:
    live.set_allowlist(FILES_ALLOWLIST)
    yield live


def _audit(inst: Installation) -> list[dict[str, Any]]:
    with open(inst.paths.audit_log, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _clean(inst: Installation, share: Share, text: str) -> None:
    assert share.base not in text and inst.root not in text, text
    assert MARK not in text, text


def test_agent_reads_the_ro_root_and_writes_the_rw_root(files: Installation, share: Share) -> None:
    roots = files.mcp("call", "files.roots", "--json")
    assert roots.code == 0, roots
    shown = json.loads(roots.out)["structuredContent"]["roots"]
    assert [(r["name"], r["mode"]) for r in shown] == [("nas", "ro"), ("inbox", "rw")]
    assert "quota" not in shown[0] and shown[1]["quota"] == {"bytes": 16384, "files": 50}, shown
    r = files.mcp("call", "files.read", "root=nas", "path=docs/hello.txt", "--json")
    assert r.code == 0, r
    assert json.loads(r.out)["structuredContent"]["content"] == "hello from the NAS\n"
    assert files.mcp("call", "files.mkdir", "root=inbox", "path=notes").code == 0
    r = files.mcp("call", "files.write", "root=inbox", "path=notes/todo.txt", "content=buy milk")
    assert r.code == 0, r
    r = files.mcp("call", "files.append", "root=inbox", "path=notes/todo.txt", "content=\nand bread")
    assert r.code == 0, r
    on_disk = f"{share.rw}/notes/todo.txt"
    st = os.lstat(on_disk)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == pwd.getpwnam("mcp-srv-files").pw_uid
    with open(on_disk, encoding="utf-8") as fh:
        assert fh.read() == "buy milk\nand bread"
    listing = files.mcp("call", "files.list", "root=inbox", "--json")
    names = {e["name"]: e["type"] for e in json.loads(listing.out)["structuredContent"]["entries"]}
    assert names == {"escape": "symlink", "secret-link": "symlink", "notes": "directory"}
    found = files.mcp("call", "files.search", "root=inbox", "contains=bread", "--json")
    assert json.loads(found.out)["structuredContent"]["results"] == [
        {"path": "notes/todo.txt", "line": 2, "text": "and bread"}
    ]
    for r in (roots, listing, found):
        _clean(files, share, r.out + r.err)
    # the read tools are marked read-only for 'allow --read-only' and policy (either spelling of the key)
    for tool, key, want in (("read", "readOnlyHint", True), ("delete", "destructiveHint", True)):
        ann = json.loads(files.mcp("describe", f"files.{tool}", "--json").out)["annotations"]
        snake = "".join("_" + c.lower() if c.isupper() else c for c in key)
        assert ann.get(key, ann.get(snake)) is want, ann


def test_every_escape_fails_clearly_and_is_audited(files: Installation, share: Share) -> None:
    attempts: list[tuple[str, list[str], str]] = [
        ("read", ["root=nas", "path=../outside/secret.txt"], "'..' is refused"),
        ("read", ["root=nas", "path=docs/../../outside/secret.txt"], "'..' is refused"),
        ("read", ["root=nas", f"path={share.outside}/secret.txt"], "absolute paths are refused"),
        ("read", ["root=nas", "path=etc/passwd"], "nas:etc: is a symbolic link"),
        ("read", ["root=nas", "path=up/secret.txt"], "nas:up: is a symbolic link"),
        ("list", ["root=nas", "path=up"], "nas:up: is a symbolic link"),
        ("search", ["root=nas", "path=etc", "name=passwd"], "nas:etc: is a symbolic link"),
        ("read", ["root=inbox", "path=escape/secret.txt"], "inbox:escape: is a symbolic link"),
        ("read", ["root=inbox", "path=secret-link"], "inbox:secret-link: is a symbolic link"),
        ("write", ["root=inbox", "path=escape/pwned.txt", "content=x"], "inbox:escape: is a symbolic link"),
        ("write", ["root=inbox", "path=secret-link", "content=x", "overwrite=true"], "is a symbolic link"),
        ("append", ["root=inbox", "path=secret-link", "content=x"], "inbox:secret-link: is a symbolic link"),
        ("mkdir", ["root=inbox", "path=escape/newdir", "parents=true"], "inbox:escape: is a symbolic link"),
        ("move", ["root=inbox", "src=escape/secret.txt", "dst=stolen.txt"], "inbox:escape: is a symbolic link"),
        ("move", ["root=inbox", "src=secret-link", "dst=../stolen"], "'..' is refused"),
        ("delete", ["root=inbox", "path=escape/secret.txt"], "inbox:escape: is a symbolic link"),
        ("write", ["root=nas", "path=new.txt", "content=x"], "root 'nas' is read-only: write is refused"),
        ("delete", ["root=nas", "path=docs/hello.txt"], "root 'nas' is read-only: delete is refused"),
        ("mkdir", ["root=nas", "path=newdir"], "root 'nas' is read-only: mkdir is refused"),
        ("read", ["root=nas", "path=fifo"], "nas:fifo: is a fifo; only regular files and directories are served"),
        ("read", ["root=etc", "path=passwd"], "unknown root 'etc'"),
    ]
    if share.device:
        attempts.append(("read", ["root=nas", "path=null"], "nas:null: is a character device; only regular"))
    outside, ro = _tree(share.outside), _tree(share.ro)
    before = len(_audit(files))
    for tool, argv, message in attempts:
        started = time.monotonic()
        r = files.mcp("call", f"files.{tool}", *argv, timeout=30)
        assert r.code == 1, (tool, argv, r)
        said = r.out + r.err
        assert message in said, (tool, argv, said)
        assert said.strip().count("\n") == 0 and "Traceback" not in said, said
        _clean(files, share, said)
        assert time.monotonic() - started < 15  # a FIFO never blocks the server
    assert _tree(share.outside) == outside
    assert _tree(share.ro) == ro
    assert os.path.islink(f"{share.rw}/secret-link") and not os.path.exists(f"{share.rw}/stolen.txt")
    # the calls' records (a first call's pin record, op "pin", names the tool too)
    records = [r for r in _audit(files)[before:] if r.get("op") == "call" and str(r.get("tool")).startswith("files.")]
    intents = [rec for rec in records if rec.get("phase") == "intent"]
    records = [rec for rec in records if rec.get("phase") != "intent"]
    assert sorted(r["id"] for r in intents) == sorted(r["id"] for r in records)  # every one reached the server
    assert len(records) == len(attempts), records
    for (tool, argv, _), rec in zip(attempts, records, strict=True):
        assert rec["tool"] == f"files.{tool}" and rec["decision"] == "allow", rec
        assert rec["outcome"] == "tool_error" and rec["exit"] == 1, rec
        assert rec["arg_keys"] == sorted(a.split("=", 1)[0] for a in argv), rec
        assert rec["caller"] == "mcpt-agent1"
    # and the server is still healthy afterwards
    assert files.mcp("call", "files.read", "root=nas", "path=docs/hello.txt").code == 0


def test_a_write_beyond_the_quota_fails_as_the_agent(files: Installation, share: Share) -> None:
    first = files.mcp("call", "files.write", "root=inbox", "path=quota-a.bin", "content=" + "a" * 10_000)
    assert first.code == 0, first
    before = _tree(share.rw)
    r = files.mcp("call", "files.write", "root=inbox", "path=quota-b.bin", "content=" + "b" * 10_000, timeout=30)
    said = r.out + r.err
    assert r.code == 1, r
    assert "inbox:quota-b.bin: over the quota of root 'inbox' (16 KiB = 16384 bytes, 50 entries)" in said, said
    assert "nothing was written" in said and said.strip().count("\n") == 0, said
    _clean(files, share, said)
    assert _tree(share.rw) == before and not os.path.exists(f"{share.rw}/quota-b.bin")  # no file, no temporary
    grow = files.mcp("call", "files.append", "root=inbox", "path=quota-a.bin", "content=" + "c" * 7000)
    assert grow.code == 1 and "over the quota of root 'inbox'" in grow.out + grow.err, grow
    with open(f"{share.rw}/quota-a.bin", encoding="utf-8") as fh:
        assert fh.read() == "a" * 10_000
    rec = [x for x in _audit(files) if x.get("tool") == "files.append" and x.get("phase") != "intent"][-1]
    assert rec["outcome"] == "tool_error" and rec["caller"] == "mcpt-agent1", rec
    # deleting frees the room
    assert files.mcp("call", "files.delete", "root=inbox", "path=quota-a.bin").code == 0
    r = files.mcp("call", "files.write", "root=inbox", "path=quota-b.bin", "content=" + "b" * 10_000)
    assert r.code == 0, r
    assert files.mcp("call", "files.delete", "root=inbox", "path=quota-b.bin").code == 0


def test_check_refuses_a_root_over_the_brokers_own_directories(inst: Installation) -> None:
    conf = write_servers_d(
        inst,
        "badfiles.toml",
        f"""
[servers.badfiles]
command = "{PYTHON}"
args = ["-m", "mcp_servers.files", "--root", "logs={inst.paths.log}:ro", "--root", "all={inst.root}/var:rw"]
""",
    )
    try:
        r = inst.ctl("check")
        said = r.out + r.err
        assert r.code == 1, r
        assert f"servers.badfiles: --root logs={inst.paths.log}:ro: is the broker's own directory" in said, said
        assert f"servers.badfiles: --root all={inst.root}/var:rw: holds the broker's own directory" in said, said
    finally:
        os.unlink(conf)
    after = inst.ctl("check")
    assert "badfiles" not in after.out + after.err and "--root" not in after.out + after.err, after


# --- per caller: each agent its own writable root, which no other agent's instance can see ---------


@pytest.fixture
def myfiles(inst: Installation) -> Iterator[Installation]:
    conf = write_servers_d(
        inst,
        "myfiles.toml",
        f"""
[servers.myfiles]
command = "{PYTHON}"
args = ["-m", "mcp_servers.files", "--root", "mine={{home}}/files:rw"]
per_caller = true
""",
    )
    tools = "".join(f"myfiles.{t}\n" for t in ("list", "read", "write", "mkdir"))
    gate_gid = pwd.getpwnam("mcp-gate").pw_gid
    for agent in (AGENT1, AGENT2):
        home = inst.paths.server_home(instance_name("myfiles", agent))
        os.makedirs(f"{home}/files", exist_ok=True)  # in its home: made by root here, given to its user below
    inst.set_allowlist(ALLOWLIST + tools)
    write(inst.paths.user_allowlist(AGENT2), "demo.add\n" + tools, 0, gate_gid, 0o640)
    try:
        assert inst.ctl("reload").code == 0
        for agent in (AGENT1, AGENT2):
            pw = pwd.getpwnam(server_user_for("myfiles", agent))
            os.chown(f"{inst.paths.server_home(instance_name('myfiles', agent))}/files", pw.pw_uid, pw.pw_gid)
        for agent in (AGENT1, AGENT2):
            _wait_up(inst, instance_name("myfiles", agent))
        yield inst
    finally:
        os.unlink(conf)
        write(inst.paths.user_allowlist(AGENT2), "demo.add\n", 0, gate_gid, 0o640)
        inst.set_allowlist(ALLOWLIST)
        with contextlib.suppress(Exception):
            inst.ctl("reload", check=True)


def test_each_agent_has_a_writable_root_no_other_agent_sees(myfiles: Installation) -> None:
    r = myfiles.mcp("call", "myfiles.write", "root=mine", "path=diary.txt", "content=agent one's diary", user=AGENT1)
    assert r.code == 0, r
    one = pwd.getpwnam(server_user_for("myfiles", AGENT1))
    on_disk = f"{myfiles.paths.server_home(instance_name('myfiles', AGENT1))}/files/diary.txt"
    st = os.lstat(on_disk)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (one.pw_uid, 0o600)
    r = myfiles.mcp("call", "myfiles.read", "root=mine", "path=diary.txt", user=AGENT1)
    assert r.code == 0 and json.loads(r.out)["content"] == "agent one's diary", r

    # agent two's root of the same name is its own, empty one: the diary is nowhere in it
    listing = myfiles.mcp("call", "myfiles.list", "root=mine", "--json", user=AGENT2)
    assert listing.code == 0 and json.loads(listing.out)["structuredContent"]["entries"] == [], listing
    r = myfiles.mcp("call", "myfiles.read", "root=mine", "path=diary.txt", user=AGENT2)
    assert r.code == 1 and "agent one's diary" not in r.out + r.err, r
    r = myfiles.mcp("call", "myfiles.write", "root=mine", "path=diary.txt", "content=mine now", user=AGENT2)
    assert r.code == 0, r
    with open(on_disk, encoding="utf-8") as fh:
        assert fh.read() == "agent one's diary"  # agent two wrote its own diary.txt, not agent one's
    two_home = myfiles.paths.server_home(instance_name("myfiles", AGENT2))
    assert os.lstat(f"{two_home}/files/diary.txt").st_uid == pwd.getpwnam(server_user_for("myfiles", AGENT2)).pw_uid
