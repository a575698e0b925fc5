"""The files server's quota per read-write root, attacked: bytes, entries, growth, races and links.

Each read-write root holds at most ``quota_bytes`` bytes of regular files
and ``quota_files`` entries (``--quota NAME=SIZE[,FILES]``; 1 GiB and
100,000 by default). A write, append or mkdir that would take it over is a
clear refusal (EDQUOT, naming the root and the quota) with nothing left
behind: no file, no temporary file, no directory, the old content intact.
Accounting walks the root without following a link, so a link to a big
tree outside neither counts against the root nor can be used to hide what
it holds; a hard-linked inode counts once.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from mcp_servers.files import cli, confine
from mcp_servers.files.confine import FilesError, Root, Share


@pytest.fixture
def base() -> Iterator[str]:
    top = tempfile.mkdtemp(prefix="files-quota-")
    os.makedirs(f"{top}/rw")
    os.makedirs(f"{top}/outside")
    try:
        yield top
    finally:
        shutil.rmtree(top, ignore_errors=True)


def _share(base: str, nbytes: int, files: int = 1000) -> Share:
    return Share([Root("inbox", f"{base}/rw", True, quota_bytes=nbytes, quota_files=files)])


def _put(path: str, size: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(b"x" * size)


def _names(top: str) -> set[str]:
    found = set()
    for dirpath, dirnames, filenames in os.walk(top):
        for name in dirnames + filenames:
            found.add(os.path.relpath(os.path.join(dirpath, name), top))
    return found


def _refused(exc: pytest.ExceptionInfo[FilesError]) -> str:
    assert exc.value.errno == errno.EDQUOT
    message = exc.value.message
    assert "quota of root 'inbox'" in message and "nothing was written" in message, message
    return message


# --- the command line --------------------------------------------------------------------------------


def test_quota_syntax_and_defaults() -> None:
    assert confine.parse_quota("inbox=512M,10000") == ("inbox", 512 << 20, 10000)
    assert confine.parse_quota("inbox=2G") == ("inbox", 2 << 30, None)
    assert confine.parse_quota("inbox=4096") == ("inbox", 4096, None)
    assert confine.parse_quota("inbox=1KiB,0") == ("inbox", 1024, 0)
    for bad in ("inbox", "=5M", "in box=5M", "inbox=5X", "inbox=-1", "inbox=5M,many", "inbox=5M,-3", "inbox=", "x=1T0"):
        with pytest.raises(confine.ConfigError):
            confine.parse_quota(bad)
    roots = [confine.parse_root(spec) for spec in ("nas=/srv/nas:ro", "inbox=/srv/in:rw", "b=/b:rw")]
    out = confine.apply_quotas(roots, ["inbox=1M,7"])
    assert (out[1].quota_bytes, out[1].quota_files) == (1 << 20, 7)
    # a rw root without --quota is still bounded
    assert (out[2].quota_bytes, out[2].quota_files) == (1 << 30, 100_000)
    assert (out[2].quota_bytes, out[2].quota_files) == (confine.QUOTA_BYTES_DEFAULT, confine.QUOTA_FILES_DEFAULT)
    assert confine.apply_quotas(roots, ["b=3M"])[2].quota_files == 100_000  # FILES left out: the default
    for specs, message in (
        (["nope=1M"], "there is no root 'nope'"),
        (["nas=1M"], "read-only"),
        (["inbox=1M", "inbox=2M"], "twice"),
    ):
        with pytest.raises(confine.ConfigError, match=message):
            confine.apply_quotas(roots, specs)


def test_a_bad_quota_is_a_configuration_error(base: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--root", f"inbox={base}/rw:rw", "--quota", "inbox=lots"]) == cli.EX_CONFIG
    assert cli.main(["--root", f"nas={base}/rw", "--quota", "nas=1M"]) == cli.EX_CONFIG
    err = capsys.readouterr().err
    assert "--quota 'inbox=lots'" in err and "read-only" in err


# --- bytes ---------------------------------------------------------------------------------------------


def test_bytes_quota_refuses_the_write_that_crosses_it_and_leaves_nothing(base: str) -> None:
    share = _share(base, 100)
    share.write("inbox", "a.bin", "x" * 60)
    share.write("inbox", "b.bin", "x" * 40)  # exactly at the quota: allowed
    before = _names(f"{base}/rw")
    with pytest.raises(FilesError) as exc:
        share.write("inbox", "c.bin", "x")
    message = _refused(exc)
    assert "100 bytes" in message and "it holds 100 bytes in 2 entries" in message, message
    assert base not in message  # no host path
    assert _names(f"{base}/rw") == before  # no c.bin, no temporary file
    with pytest.raises(FilesError) as exc:
        share.append("inbox", "c.bin", "x", create=True)
    _refused(exc)
    assert _names(f"{base}/rw") == before
    share.delete("inbox", "a.bin")  # deleting frees the room
    share.write("inbox", "c.bin", "x" * 60)


def test_one_write_larger_than_the_quota_is_refused_in_an_empty_root(base: str) -> None:
    share = _share(base, 10)
    with pytest.raises(FilesError) as exc:
        share.write("inbox", "big.bin", "x" * 11)
    _refused(exc)
    assert _names(f"{base}/rw") == set()


def test_overwrite_counts_only_the_growth(base: str) -> None:
    share = _share(base, 100)
    share.write("inbox", "f.txt", "x" * 80)
    share.write("inbox", "f.txt", "y" * 100, overwrite=True)  # 80 -> 100: grows by 20, fits
    with pytest.raises(FilesError) as exc:
        share.write("inbox", "f.txt", "z" * 101, overwrite=True)
    assert "needs 1 bytes and 0 entries more" in _refused(exc)
    with open(f"{base}/rw/f.txt", "rb") as fh:
        assert fh.read() == b"y" * 100  # the old content is intact
    assert _names(f"{base}/rw") == {"f.txt"}
    # shrinking is always allowed, even in a root that is already over (the operator lowered the quota)
    tight = _share(base, 10)
    tight.write("inbox", "f.txt", "s" * 50, overwrite=True)
    with pytest.raises(FilesError):
        tight.write("inbox", "f.txt", "s" * 51, overwrite=True)


def test_overwrite_of_a_hard_linked_file_frees_nothing(base: str) -> None:
    share = _share(base, 100)
    share.write("inbox", "f.txt", "x" * 60)
    os.link(f"{base}/rw/f.txt", f"{base}/rw/g.txt")  # one inode, 60 bytes, counted once
    assert confine.measure(share.roots["inbox"]).bytes == 60
    with pytest.raises(FilesError):  # the old bytes stay behind g.txt: 60 + 60 > 100
        share.write("inbox", "f.txt", "y" * 60, overwrite=True)
    share.write("inbox", "f.txt", "y" * 40, overwrite=True)


def test_append_counts_its_bytes(base: str) -> None:
    share = _share(base, 10)
    share.append("inbox", "log.txt", "12345", create=True)
    share.append("inbox", "log.txt", "12345")
    with pytest.raises(FilesError) as exc:
        share.append("inbox", "log.txt", "6")
    _refused(exc)
    with open(f"{base}/rw/log.txt", "rb") as fh:
        assert fh.read() == b"1234512345"


# --- entries -------------------------------------------------------------------------------------------


def test_files_quota_counts_every_entry(base: str) -> None:
    share = _share(base, 1 << 20, files=4)
    share.mkdir("inbox", "d")
    share.write("inbox", "d/a.txt", "a")
    share.write("inbox", "empty.txt", "")
    os.symlink("/etc/passwd", f"{base}/rw/link")  # a link is an entry too (4 now)
    before = _names(f"{base}/rw")
    calls: list[Callable[[], object]] = [
        lambda: share.write("inbox", "b.txt", ""),
        lambda: share.mkdir("inbox", "e"),
        lambda: share.append("inbox", "c.txt", "", create=True),
    ]
    for call in calls:
        with pytest.raises(FilesError) as exc:
            call()
        assert "4 entries" in _refused(exc)
    assert _names(f"{base}/rw") == before
    # what does not add an entry still works at the limit
    share.write("inbox", "d/a.txt", "b", overwrite=True)
    share.move("inbox", "d/a.txt", "d/renamed.txt")
    share.mkdir("inbox", "d")  # already there
    share.delete("inbox", "link")
    share.mkdir("inbox", "e")


def test_mkdir_parents_is_refused_whole(base: str) -> None:
    share = _share(base, 1 << 20, files=3)
    share.mkdir("inbox", "a")
    with pytest.raises(FilesError) as exc:  # a exists; b, c, d would make 4 entries
        share.mkdir("inbox", "a/b/c/d", parents=True)
    _refused(exc)
    assert _names(f"{base}/rw") == {"a"}  # not a/b, not a/b/c: nothing
    share.mkdir("inbox", "a/b/c", parents=True)
    assert _names(f"{base}/rw") == {"a", "a/b", "a/b/c"}


# --- accounting never follows a link, and is bounded --------------------------------------------------


def test_links_are_not_followed_for_accounting(base: str) -> None:
    out = f"{base}/outside"
    _put(f"{out}/big.bin", 5000)
    for i in range(50):
        _put(f"{out}/tree/{i}.bin", 100)
    os.symlink(f"{out}/big.bin", f"{base}/rw/big-link")
    os.symlink(f"{out}/tree", f"{base}/rw/tree-link")
    os.symlink(out, f"{base}/rw/up")
    _put(f"{base}/rw/own.bin", 30)
    root = Root("inbox", f"{base}/rw", True, quota_bytes=100, quota_files=10)
    usage = confine.measure(root)
    assert (usage.bytes, usage.files, usage.partial) == (30, 4, False)  # three links and one file
    share = Share([root])
    share.write("inbox", "new.bin", "x" * 70)  # the 5000 bytes and 50 files outside are not the root's
    with pytest.raises(FilesError):
        share.write("inbox", "more.bin", "x")
    # a directory swapped for a link while it is measured is not entered either (O_NOFOLLOW)
    os.makedirs(f"{base}/rw/d")
    real_open = os.open
    swaps: list[str] = []

    def swapping_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if path == "d" and kwargs.get("dir_fd") is not None and not swaps:  # listed as a directory, now a link
            swaps.append(path)
            os.rename(f"{base}/rw/d", f"{base}/rw/d-moved")
            os.symlink(f"{out}/tree", f"{base}/rw/d")
        return real_open(path, flags, *args, **kwargs)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(os, "open", swapping_open)
        usage = confine.measure(root)
    assert swaps == ["d"]
    assert (usage.bytes, usage.files) == (100, 6)  # nothing of the 50 outside files was counted


def test_usage_walk_stops_once_past_the_limit(base: str) -> None:
    for i in range(200):
        _put(f"{base}/rw/many/{i:03}", 1)
    root = Root("inbox", f"{base}/rw", True, quota_bytes=1 << 20, quota_files=20)
    usage = confine.measure(root, root.quota_bytes, root.quota_files)
    assert usage.partial and usage.files == 21  # bounded work: it never counted the other 180
    assert confine.measure(root).files == 201
    with pytest.raises(FilesError) as exc:
        Share([root]).write("inbox", "x", "")
    assert "at least" in exc.value.message


def test_concurrent_writes_cannot_share_the_same_room(base: str) -> None:
    share = _share(base, 100, files=1000)
    results: list[bool] = []
    lock = threading.Lock()
    start = threading.Barrier(20)

    def writer(i: int) -> None:
        start.wait()
        try:
            share.write("inbox", f"w{i}.bin", "x" * 10)
            ok = True
        except FilesError:
            ok = False
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 10
    assert confine.measure(share.roots["inbox"]).bytes == 100


# --- through MCP: a tool error, and the quota shown by 'roots' -----------------------------------------


def test_quota_is_a_tool_error_and_roots_shows_it(base: str) -> None:
    from mcp import Client

    from mcp_servers.files import server as files_server

    files_server.configure([Root("inbox", f"{base}/rw", True, quota_bytes=1024, quota_files=5)])

    async def go() -> tuple[Any, Any, Any, dict[str, Any]]:
        async with Client(files_server.server) as client:
            ok = await client.call_tool("write", {"root": "inbox", "path": "a.txt", "content": "x" * 1000})
            over = await client.call_tool("write", {"root": "inbox", "path": "b.txt", "content": "x" * 100})
            roots = await client.call_tool("roots", {})
            tools = {t.name: t.description or "" for t in (await client.list_tools()).tools}
            return ok, over, roots, tools

    ok, over, roots, tools = asyncio.run(go())
    assert not ok.is_error
    assert over.is_error
    text = over.content[0].text
    assert "inbox:b.txt: over the quota of root 'inbox' (1 KiB = 1024 bytes, 5 entries)" in text, text
    assert not os.path.exists(f"{base}/rw/b.txt")
    assert roots.structured_content["roots"] == [
        {
            "name": "inbox",
            "mode": "rw",
            "quota": {"bytes": 1024, "files": 5},
            "used": {"bytes": 1000, "files": 1, "at_least": False},
        }
    ]
    for name in ("roots", "write", "append", "mkdir"):
        assert "quota" in tools[name], (name, tools[name])
