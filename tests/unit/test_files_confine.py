"""The files server's confinement, attacked: generated paths, symlink layouts and a swap race.

Property tests (hypothesis) build a fresh tree per example: an ``outside``
directory full of marked secrets, a read-only root and a read-write root,
both seeded with symbolic links of every nasty kind (out of the root,
absolute, chains, to the parent, loops, dangling). Then every tool runs on
generated paths ('..', '.', '//', long names, NFC/NFD twins, '...'). After
each operation: nothing outside a root changed, the read-only root did not
change, no answer carries an outside secret or a host path, and ``read`` /
``list`` agree exactly with a lexical model that refuses every symlink.

The race test swaps a directory (and a file) for a symbolic link to the
outside with ``renameat2(RENAME_EXCHANGE)`` while other threads read and
write through the path as fast as they can.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mcp_servers.files import confine
from mcp_servers.files.confine import FilesError, Root, Share

MARK = "OUTSIDE-SECRET-7f3a"
NFC = unicodedata.normalize("NFC", "caf\u00e9")
NFD = unicodedata.normalize("NFD", "caf\u00e9")
assert NFC != NFD
#: tmpfs when there is one: the property tests build a fresh tree per example
TMP = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None

# --- the tree ----------------------------------------------------------------------------------


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as fh:
        return fh.read()


def _seed_root(top: str, label: str) -> None:
    _write(f"{top}/a.txt", f"inside {label} a\n")
    _write(f"{top}/sub/b.txt", f"inside {label} b\n")
    _write(f"{top}/sub/deeper/c.txt", f"inside {label} c\n")
    _write(f"{top}/.../dots.txt", f"inside {label} dots\n")
    _write(f"{top}/{NFC}", f"inside {label} nfc\n")
    _write(f"{top}/{'x' * 255}", f"inside {label} long\n")
    os.makedirs(f"{top}/empty", exist_ok=True)


def _seed_outside(top: str) -> None:
    _write(f"{top}/secret.txt", f"{MARK} secret\n")
    for name in ("a.txt", "b.txt", "c.txt", NFC):
        _write(f"{top}/{name}", f"{MARK} {name}\n")
    _write(f"{top}/sub/b.txt", f"{MARK} sub b\n")
    _write(f"{top}/sub/deeper/c.txt", f"{MARK} deeper\n")


class Tree:
    """base/{outside, ro, rw}: two roots and the world around them."""

    def __init__(self) -> None:
        # top/s/{outside,ro,rw}: even '../../x' from a root stays inside top, which is thrown away
        self.top = tempfile.mkdtemp(prefix="files-confine-", dir=TMP)
        self.base = f"{self.top}/s"
        self.outside = f"{self.base}/outside"
        self.ro = f"{self.base}/ro"
        self.rw = f"{self.base}/rw"
        _seed_outside(self.outside)
        _seed_root(self.ro, "ro")
        _seed_root(self.rw, "rw")
        self.share = Share([Root("nas", self.ro, False), Root("inbox", self.rw, True)])

    def close(self) -> None:
        shutil.rmtree(self.top, ignore_errors=True)

    def assert_nothing_new_around(self) -> None:
        assert os.listdir(self.top) == ["s"]
        assert sorted(os.listdir(self.base)) == ["outside", "ro", "rw"]

    def host(self, root: str) -> str:
        return self.ro if root == "nas" else self.rw


def snapshot(top: str) -> dict[str, tuple[Any, ...]]:
    """Everything observable about a tree, without following a link."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False):
        for name in [".", *dirnames, *filenames]:
            path = os.path.normpath(os.path.join(dirpath, name))
            st_ = os.lstat(path)
            rel = os.path.relpath(path, top)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("link", os.readlink(path))
            elif stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as fh:
                    out[rel] = ("file", fh.read(), st_.st_mode, st_.st_mtime_ns, st_.st_ino)
            else:
                out[rel] = ("other", st_.st_mode, st_.st_mtime_ns, st_.st_ino)
    return out


# --- strategies --------------------------------------------------------------------------------

LINK_NAMES = ["l1", "l2", "esc", "sub/l3", "sub/deeper/l4", "newdir"]


def _link_targets(tree_base: str) -> list[str]:
    """Nasty link targets; every one lands inside the sandbox (``base``), never on the real system.

    The tests run as root: were confinement broken, a link to '/' or '/etc' would let a generated
    'delete' or 'write' damage the machine. An absolute link to the sandbox proves the same point.
    """
    return [
        "../outside",
        "../outside/secret.txt",
        "../../outside",  # from sub/: the same place; from the root: the sandbox's parent, refused anyway
        "sub/../../outside",
        f"{tree_base}/outside",
        f"{tree_base}/outside/secret.txt",
        f"{tree_base}",
        f"{tree_base}/outside/sub/b.txt",
        f"{tree_base}/outside/sub",
        "..",
        ".",
        "sub",
        "a.txt",
        "l1",  # chains (through l1, which may itself point out)
        "l2",
        "esc",  # possibly a loop
        "missing",
        "../outside/sub/deeper",
    ]


links = st.lists(
    st.tuples(st.sampled_from(LINK_NAMES), st.integers(min_value=0, max_value=17)),
    min_size=1,
    max_size=5,
    unique_by=lambda t: t[0],
)

COMPONENTS = [
    "..",
    ".",
    "",
    "a.txt",
    "sub",
    "deeper",
    "b.txt",
    "c.txt",
    "...",
    "dots.txt",
    "l1",
    "l2",
    "esc",
    "l3",
    "l4",
    "outside",
    "secret.txt",
    NFC,
    NFD,
    "x" * 255,
    "x" * 256,
    "new.txt",
    "newdir",
    "empty",
    "etc",
    "passwd",
]

general_paths = st.builds(
    lambda lead, parts, seps: lead + "".join(p + s for p, s in zip(parts, seps, strict=False)).rstrip("/"),
    st.sampled_from(["", "", "", "/", "./", "//"]),
    st.lists(st.sampled_from(COMPONENTS), min_size=0, max_size=6),
    st.lists(st.sampled_from(["/", "/", "//", "/./"]), min_size=6, max_size=6),
)
# paths that go through a planted link, where an escape would show
through_links = st.builds(
    lambda link, rest: f"{link}/{rest}" if rest else link,
    st.sampled_from(LINK_NAMES),
    st.sampled_from(["", "secret.txt", "a.txt", "b.txt", "sub/b.txt", "deeper/c.txt", "etc/passwd", "new.txt", NFC]),
)
odd_paths = st.lists(st.sampled_from(["/", ".", "a", "l", "1", "\u00e9", "e\u0301", "\\", "\n"]), max_size=12).map(
    "".join
)
climbing_paths = st.sampled_from(
    ["..", "../outside", "../outside/secret.txt", "./../outside/a.txt", "sub/../../outside/secret.txt", "../rw/a.txt"]
)
paths = st.one_of(through_links, climbing_paths, general_paths, odd_paths)

roots = st.sampled_from(["nas", "inbox"])

ops = st.one_of(
    st.tuples(st.just("read"), roots, paths, st.booleans()),
    st.tuples(st.just("list"), roots, paths),
    st.tuples(st.just("stat"), roots, paths),
    st.tuples(st.just("search"), roots, paths, st.sampled_from([None, "inside", "SECRET", "secret"])),
    st.tuples(st.just("write"), roots, paths, st.booleans()),
    st.tuples(st.just("append"), roots, paths, st.booleans()),
    st.tuples(st.just("mkdir"), roots, paths, st.booleans()),
    st.tuples(st.just("move"), roots, paths, paths, st.booleans()),
    st.tuples(st.just("delete"), roots, paths, st.booleans()),
)


def run_op(share: Share, op: tuple[Any, ...]) -> dict[str, Any]:
    kind, root, *rest = op
    if kind == "read":
        return share.read(root, rest[0], binary=rest[1])
    if kind == "list":
        return share.list_dir(root, rest[0])
    if kind == "stat":
        return share.stat(root, rest[0])
    if kind == "search":
        return share.search(root, rest[0], name="*" if rest[1] is None else None, contains=rest[1], time_limit=2)
    if kind == "write":
        return share.write(root, rest[0], "written\n", overwrite=rest[1])
    if kind == "append":
        return share.append(root, rest[0], "appended\n", create=rest[1])
    if kind == "mkdir":
        return share.mkdir(root, rest[0], parents=rest[1])
    if kind == "move":
        return share.move(root, rest[0], rest[1], overwrite=rest[2])
    if kind == "delete":
        return share.delete(root, rest[0], recursive=rest[1])
    raise AssertionError(kind)


def model(top: str, path: str) -> str | None:
    """Where a path lands by the rules (lexical, no '..', no absolute, no symlink anywhere), or None."""
    if path.startswith("/") or "\x00" in path or len(path.encode()) > confine.MAX_PATH_BYTES:
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts or any(len(p.encode()) > 255 for p in parts):
        return None
    here = top
    for part in parts:
        here = f"{here}/{part}"
        try:
            mode = os.lstat(here).st_mode
        except OSError:
            return None
        if stat.S_ISLNK(mode):
            return None
    return here


def _plant(tree: Tree, layout: list[tuple[str, int]]) -> None:
    targets = _link_targets(tree.base)
    for name, target in layout:
        for top in (tree.ro, tree.rw):
            with contextlib.suppress(FileExistsError, FileNotFoundError):
                os.symlink(targets[target], f"{top}/{name}")


@pytest.fixture
def tree() -> Iterator[Tree]:
    t = Tree()
    try:
        yield t
    finally:
        t.close()


def assert_clean(tree: Tree, answer: object) -> None:
    text = json.dumps(answer, ensure_ascii=False)
    assert MARK not in text, answer
    assert tree.top not in text, answer
    if isinstance(answer, dict) and answer.get("encoding") == "base64":
        import base64

        assert MARK.encode() not in base64.b64decode(answer["content"])


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(layout=links, program=st.lists(ops, min_size=1, max_size=6))
def test_no_operation_touches_anything_outside_its_root(layout: list[tuple[str, int]], program: list[Any]) -> None:
    tree = Tree()
    try:
        _plant(tree, layout)
        outside, ro = snapshot(tree.outside), snapshot(tree.ro)
        for op in program:
            try:
                answer: object = run_op(tree.share, op)
            except FilesError as exc:
                answer = exc.message
                if op[1] == "nas" and op[0] in ("write", "append", "mkdir", "move", "delete"):
                    assert "read-only" in exc.message
            assert_clean(tree, answer)
            assert snapshot(tree.outside) == outside, op
            assert snapshot(tree.ro) == ro, op
            tree.assert_nothing_new_around()
    finally:
        tree.close()


@settings(max_examples=300, deadline=None)
@given(layout=links, root=roots, path=paths, binary=st.booleans())
def test_read_and_list_agree_with_the_lexical_model(
    layout: list[tuple[str, int]], root: str, path: str, binary: bool
) -> None:
    tree = Tree()
    try:
        _plant(tree, layout)
        expected = model(tree.host(root), path)
        is_file = expected is not None and stat.S_ISREG(os.lstat(expected).st_mode)
        is_dir = expected is not None and stat.S_ISDIR(os.lstat(expected).st_mode)
        try:
            got = tree.share.read(root, path, binary=binary)
        except FilesError as exc:
            assert not is_file, (path, exc.message)
            assert tree.top not in exc.message
        else:
            assert is_file and expected is not None, (path, got)
            with open(expected, "rb") as fh:
                data = fh.read()
            if binary:
                import base64

                assert base64.b64decode(got["content"]) == data
            else:
                assert got["content"] == data.decode()
            assert_clean(tree, got)
        try:
            listing = tree.share.list_dir(root, path)
        except FilesError as exc:
            assert not is_dir, (path, exc.message)
        else:
            assert is_dir and expected is not None, (path, listing)
            assert sorted(e["name"] for e in listing["entries"]) == sorted(os.listdir(expected))
            assert_clean(tree, listing)
    finally:
        tree.close()


@settings(max_examples=150, deadline=None)
@given(layout=links, path=paths, op=st.sampled_from(["write", "append", "mkdir", "move", "delete"]))
def test_read_only_root_refuses_every_write_before_touching_anything(
    layout: list[tuple[str, int]], path: str, op: str
) -> None:
    tree = Tree()
    try:
        _plant(tree, layout)
        before = snapshot(tree.ro)
        with pytest.raises(FilesError, match=r"^root 'nas' is read-only: \w+ is refused$"):
            run_op(tree.share, (op, "nas", path, *(["a.txt"] if op == "move" else []), True))
        assert snapshot(tree.ro) == before
    finally:
        tree.close()


@given(path=paths)
def test_split_path_never_yields_a_climbing_or_absolute_component(path: str) -> None:
    try:
        parts = confine.split_path(path)
    except FilesError as exc:
        assert path.startswith("/") or ".." in path.split("/") or "256" in exc.message or "255" in exc.message
        return
    assert all(p not in ("", ".", "..") and "/" not in p for p in parts)
    assert not path.startswith("/")


# --- the swap race -----------------------------------------------------------------------------

_RENAME_EXCHANGE = 2
_libc = ctypes.CDLL(None, use_errno=True)


def _exchange(dfd: int, a: str, b: str) -> None:
    if _libc.renameat2(dfd, a.encode(), dfd, b.encode(), _RENAME_EXCHANGE) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _exchange_supported(top: str) -> bool:
    os.mkdir(f"{top}/x1")
    os.symlink("/", f"{top}/x2")
    fd = os.open(top, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _exchange(fd, "x1", "x2")
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
        shutil.rmtree(f"{top}/x1", ignore_errors=True)
        with contextlib.suppress(OSError):
            os.unlink(f"{top}/x1")
        with contextlib.suppress(OSError):
            os.unlink(f"{top}/x2")
        with contextlib.suppress(OSError):
            os.rmdir(f"{top}/x2")


def test_symlink_swapped_in_between_check_and_use_never_redirects(tree: Tree) -> None:
    if not _exchange_supported(tree.rw):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here")
    rw, out = tree.rw, tree.outside
    # the real directory d, and a link d-swap pointing at a look-alike outside the root
    _write(f"{rw}/d/f.txt", "inside f\n")
    _write(f"{rw}/d/inner/g.txt", "inside g\n")
    _write(f"{out}/d/f.txt", f"{MARK} f\n")
    _write(f"{out}/d/inner/g.txt", f"{MARK} g\n")
    os.symlink(f"{out}/d", f"{rw}/d-swap")
    os.symlink(f"{out}/d/f.txt", f"{rw}/d/f-swap")
    os.symlink("../../outside/d/inner", f"{rw}/d/inner-swap")
    before = snapshot(out)

    stop = threading.Event()
    swaps = [0]

    def attacker() -> None:
        rootfd = os.open(rw, os.O_RDONLY | os.O_DIRECTORY)
        dfd = os.open(f"{rw}/d", os.O_RDONLY | os.O_DIRECTORY)  # follows the real d wherever it is named
        try:
            while not stop.is_set():
                _exchange(rootfd, "d", "d-swap")
                _exchange(dfd, "f.txt", "f-swap")
                _exchange(dfd, "inner", "inner-swap")
                swaps[0] += 1
        finally:
            os.close(rootfd)
            os.close(dfd)

    outcomes: dict[str, list[int]] = {}
    leaks: list[str] = []

    def victim(tag: str) -> None:
        i = 0
        calls: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("read_f", lambda: tree.share.read("inbox", "d/f.txt")),
            ("read_g", lambda: tree.share.read("inbox", "d/inner/g.txt")),
            ("list_d", lambda: tree.share.list_dir("inbox", "d/inner")),
            ("stat_g", lambda: tree.share.stat("inbox", "d/inner/g.txt")),
            ("search", lambda: tree.share.search("inbox", "d", contains="f", time_limit=1)),
            ("write", lambda: tree.share.write("inbox", f"d/inner/w-{tag}-{i}.txt", "w\n")),
            ("append", lambda: tree.share.append("inbox", "d/f.txt", "x\n")),
            ("mkdir", lambda: tree.share.mkdir("inbox", f"d/inner/m-{tag}-{i}/n", parents=True)),
            ("move", lambda: tree.share.move("inbox", f"d/inner/w-{tag}-{i}.txt", f"d/mv-{tag}-{i}.txt")),
            ("delete", lambda: tree.share.delete("inbox", f"d/mv-{tag}-{i}.txt")),
            ("rmtree", lambda: tree.share.delete("inbox", f"d/inner/m-{tag}-{i}", recursive=True)),
        ]
        while not stop.is_set():
            i += 1
            for name, call in calls:
                ok = 0
                try:
                    answer = call()
                    ok = 1
                    text = json.dumps(answer)
                    if MARK in text or tree.top in text:
                        leaks.append(f"{name}: {text[:200]}")
                except FilesError as exc:
                    if tree.top in exc.message:
                        leaks.append(f"{name}: {exc.message}")
                outcomes.setdefault(name, [0, 0])[ok] += 1

    threads = [threading.Thread(target=attacker)] + [threading.Thread(target=victim, args=(t,)) for t in "ab"]
    for t in threads:
        t.start()
    time.sleep(2.5)
    stop.set()
    for t in threads:
        t.join(30)
    assert not leaks, leaks[:5]
    assert snapshot(out) == before, "something outside the root was written"
    tree.assert_nothing_new_around()
    assert swaps[0] > 100
    # both states really happened: calls went through the real directory and were refused at the link
    assert outcomes["read_g"][1] > 0 and outcomes["read_g"][0] > 0, outcomes
    assert outcomes["write"][1] > 0 and outcomes["write"][0] > 0, outcomes
    # nothing the victims wrote landed anywhere but inside the root
    written = [n for _, _, names in os.walk(out) for n in names if n.startswith(("w-", "mv-", "m-"))]
    assert written == []


class _SwapAfterCheck:
    """Wrap ``os.stat``/``os.fstat``: right after the check on a chosen name, the attacker wins the race."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, dfd: int, name: str, other: str, func: str = "stat") -> None:
        self.real = getattr(os, func)
        self.dfd, self.name, self.other, self.hits = dfd, name, other, 0
        monkeypatch.setattr(os, func, self)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        result = self.real(*args, **kwargs)
        if self.hits:
            return result  # the attacker swaps once
        if (args and args[0] == self.name) or (self.name == "*fd*" and not kwargs and isinstance(args[0], int)):
            self.hits += 1
            _exchange(self.dfd, self.name if self.name != "*fd*" else "f.txt", self.other)
        return result


def test_swap_exactly_between_check_and_use(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deterministic TOCTOU: every lstat-then-act in the core, with the swap landing in between."""
    if not _exchange_supported(tree.rw):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not supported here")
    rw, out = tree.rw, tree.outside
    _write(f"{rw}/d/inner/g.txt", "inside g\n")
    _write(f"{rw}/d/f.txt", "inside f\n")
    _write(f"{out}/inner/g.txt", f"{MARK} g\n")
    os.symlink(f"{out}/inner", f"{rw}/d/inner-swap")
    os.symlink(f"{out}/secret.txt", f"{rw}/d/f-swap")
    before = snapshot(out)
    dfd = os.open(f"{rw}/d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        with monkeypatch.context() as m:  # search: lstat says 'inner' is a directory, then it is a link
            hook = _SwapAfterCheck(m, dfd, "inner", "inner-swap")
            found = tree.share.search("inbox", "d", contains="g")
            assert hook.hits == 1 and MARK not in json.dumps(found) and found["skipped"] == 1
        _exchange(dfd, "inner", "inner-swap")  # back to the real directory
        with monkeypatch.context() as m:  # recursive delete: counted as a directory, then a link
            hook = _SwapAfterCheck(m, dfd, "inner", "inner-swap")
            with pytest.raises(FilesError, match=r"symbolic link|not a directory"):
                tree.share.delete("inbox", "d", recursive=True)
            assert hook.hits == 1
        _exchange(dfd, "inner", "inner-swap")
        with monkeypatch.context() as m:  # overwrite: checked as a regular file, then a link to a secret
            hook = _SwapAfterCheck(m, dfd, "f.txt", "f-swap")
            tree.share.write("inbox", "d/f.txt", "replaced\n", overwrite=True)
            assert hook.hits == 1 and os.path.isfile(f"{rw}/d/f.txt") and not os.path.islink(f"{rw}/d/f.txt")
        os.symlink(f"{out}/secret.txt", f"{rw}/d/f-swap2")
        with monkeypatch.context() as m:  # read without /proc: the O_PATH fstat, then the name is a link
            m.setattr(confine, "_PROC_FD", False)
            hook = _SwapAfterCheck(m, dfd, "*fd*", "f-swap2", func="fstat")
            with pytest.raises(FilesError, match="symbolic link"):
                tree.share.read("inbox", "d/f.txt")
            assert hook.hits == 1
        _exchange(dfd, "f.txt", "f-swap2")
        _write(f"{rw}/d/f-other", "another inside file\n")
        with monkeypatch.context() as m:  # ... or another regular file: the inode check refuses it
            m.setattr(confine, "_PROC_FD", False)
            hook = _SwapAfterCheck(m, dfd, "*fd*", "f-other", func="fstat")
            with pytest.raises(FilesError, match="changed while it was being opened"):
                tree.share.read("inbox", "d/f.txt")
        assert snapshot(out) == before
    finally:
        os.close(dfd)


def test_creation_never_follows_a_link_planted_at_the_new_name(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    """The name is free when checked and a link to a secret when created: O_EXCL|O_NOFOLLOW refuses it."""
    before = snapshot(tree.outside)
    real_open = os.open

    def open_then_plant(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        try:
            return real_open(path, flags, *args, **kwargs)
        except FileNotFoundError:
            if path == "fresh.txt" and flags & os.O_PATH:
                os.symlink(f"{tree.outside}/secret.txt", f"{tree.rw}/fresh.txt")
            raise

    with monkeypatch.context() as m:
        m.setattr(os, "open", open_then_plant)
        with pytest.raises(FilesError, match="already exists"):
            tree.share.append("inbox", "fresh.txt", "pwned\n", create=True)
    # the temporary name of an atomic write, guessed and planted in advance
    monkeypatch.setattr(confine.secrets, "token_hex", lambda n: "guessed")
    os.symlink(f"{tree.outside}/secret.txt", f"{tree.rw}/.files-guessed.tmp")
    with pytest.raises(FilesError, match="already exists"):
        tree.share.write("inbox", "other.txt", "pwned\n")
    assert snapshot(tree.outside) == before
    assert not os.path.exists(f"{tree.rw}/other.txt")


# --- refusals and bounds, by example -----------------------------------------------------------


def test_fifo_socket_and_device_are_refused_without_blocking(tree: Tree) -> None:
    os.mkfifo(f"{tree.ro}/fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(f"{tree.ro}/sock")
    device = False
    with contextlib.suppress(OSError):
        os.mknod(f"{tree.ro}/null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        device = True
    names = ["fifo", "sock"] + (["null"] if device else [])
    started = time.monotonic()
    try:
        for name in names:
            with pytest.raises(FilesError, match="only regular files and directories are served"):
                tree.share.read("nas", name)
            res = tree.share.search("nas", "", contains="x", time_limit=2)
            assert res["complete"]
        os.mkfifo(f"{tree.rw}/fifo")
        with pytest.raises(FilesError, match="only regular files"):
            tree.share.append("inbox", "fifo", "x")
        with pytest.raises(FilesError, match="is a fifo"):
            tree.share.write("inbox", "fifo", "x", overwrite=True)
    finally:
        sock.close()
    assert time.monotonic() - started < 5


def test_read_text_offsets_and_binary(tree: Tree) -> None:
    _write(f"{tree.rw}/u.txt", "a\u00e9b\u20acc")  # 1 + 2 + 1 + 3 + 1 bytes
    whole = tree.share.read("inbox", "u.txt")
    assert whole["content"] == "a\u00e9b\u20acc" and whole["eof"] and whole["next_offset"] is None
    part = tree.share.read("inbox", "u.txt", max_bytes=2)  # cuts the é in half: only 'a'
    assert part["content"] == "a" and part["next_offset"] == 1 and not part["eof"]
    mid = tree.share.read("inbox", "u.txt", offset=2)  # starts inside the é: skips to 'b'
    assert mid["content"] == "b\u20acc" and mid["offset"] == 3
    pieces, offset = [], 0
    while offset is not None:
        got = tree.share.read("inbox", "u.txt", offset=offset, max_bytes=4)
        pieces.append(got["content"])
        offset = got["next_offset"]
    assert "".join(pieces) == "a\u00e9b\u20acc"
    with open(f"{tree.rw}/bin", "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n\x00\x00")
    with pytest.raises(FilesError, match="not UTF-8 text; call read again with binary=true"):
        tree.share.read("inbox", "bin")
    assert tree.share.read("inbox", "bin", binary=True)["content"] == "iVBORw0KGgoAAA=="
    with pytest.raises(FilesError, match="max_bytes must be between"):
        tree.share.read("inbox", "u.txt", max_bytes=confine.READ_MAX + 1)
    assert tree.share.read("inbox", "u.txt", offset=10_000)["content"] == ""


def test_write_never_replaces_without_overwrite_and_never_through_links(tree: Tree) -> None:
    with pytest.raises(FilesError, match="already exists; pass overwrite=true"):
        tree.share.write("inbox", "a.txt", "new")
    assert _read(f"{tree.rw}/a.txt") == "inside rw a\n"
    assert tree.share.write("inbox", "a.txt", "new", overwrite=True)["replaced"] is True
    assert _read(f"{tree.rw}/a.txt") == "new"
    os.symlink(f"{tree.outside}/secret.txt", f"{tree.rw}/link")
    for overwrite in (False, True):
        with pytest.raises(FilesError):
            tree.share.write("inbox", "link", "pwned", overwrite=overwrite)
    with pytest.raises(FilesError, match="symbolic link"):
        tree.share.append("inbox", "link", "pwned")
    assert _read(f"{tree.outside}/secret.txt") == f"{MARK} secret\n"
    assert not [n for n in os.listdir(tree.rw) if n.startswith(".files-")]  # no temporary left behind


def test_append_refuses_a_hard_linked_file(tree: Tree) -> None:
    os.link(f"{tree.outside}/secret.txt", f"{tree.rw}/hard")
    with pytest.raises(FilesError, match="hard links"):
        tree.share.append("inbox", "hard", "pwned")
    assert _read(f"{tree.outside}/secret.txt") == f"{MARK} secret\n"


def test_move_stays_in_the_root_and_does_not_clobber(tree: Tree) -> None:
    with pytest.raises(FilesError, match="already exists"):
        tree.share.move("inbox", "a.txt", "sub/b.txt")
    tree.share.move("inbox", "a.txt", "sub/b.txt", overwrite=True)
    assert _read(f"{tree.rw}/sub/b.txt") == "inside rw a\n"
    with pytest.raises(FilesError, match="into itself"):
        tree.share.move("inbox", "sub", "sub/deeper/sub")
    with pytest.raises(FilesError, match=r"^'\.\.' is refused"):
        tree.share.move("inbox", "sub/b.txt", "../outside/x")
    with pytest.raises(FilesError, match="never replaced"):
        tree.share.move("inbox", "sub/b.txt", "empty", overwrite=True)


def test_delete_removes_links_not_targets_and_is_bounded(tree: Tree, monkeypatch: pytest.MonkeyPatch) -> None:
    os.symlink(f"{tree.outside}", f"{tree.rw}/sub/out")
    assert tree.share.delete("inbox", "sub", recursive=True)["deleted"] == 5
    assert os.path.exists(f"{tree.outside}/secret.txt")
    with pytest.raises(FilesError, match="root itself"):
        tree.share.delete("inbox", "")
    for i in range(20):
        _write(f"{tree.rw}/many/{i}", "x")
    monkeypatch.setattr(confine, "DELETE_MAX", 10)
    with pytest.raises(FilesError, match="more than 10 entries"):
        tree.share.delete("inbox", "many", recursive=True)
    assert len(os.listdir(f"{tree.rw}/many")) == 20  # counted first: nothing deleted


def test_search_is_bounded(tree: Tree) -> None:
    for i in range(50):
        _write(f"{tree.rw}/s/{i:02}.txt", "needle\n" * 10)
    hit = tree.share.search("inbox", "s", contains="needle", max_results=7)
    assert len(hit["results"]) == 7 and hit["stopped"] == "max_results" and not hit["complete"]
    files = tree.share.search("inbox", "s", name="*.txt", max_files=5)
    assert files["files_visited"] == 5 and files["stopped"] == "max_files"
    data = tree.share.search("inbox", "s", contains="nothing", max_bytes=200)
    assert data["stopped"] == "max_bytes" and data["bytes_read"] < 200 + 70
    everything = tree.share.search("inbox", "", name="*.TXT", ignore_case=True, max_results=1000)
    assert everything["complete"] and len(everything["results"]) == 50 + 4
    assert all(not r["path"].startswith("/") for r in everything["results"])
    started = time.monotonic()
    slow = tree.share.search("inbox", "", contains="needle", time_limit=0.1, max_results=1000)
    assert time.monotonic() - started < 2 and slow["stopped"] in (None, "time_limit")


def test_list_pages_and_hides_link_targets(tree: Tree) -> None:
    os.symlink(f"{tree.outside}/secret.txt", f"{tree.rw}/link")
    first = tree.share.list_dir("inbox", "", limit=3)
    assert len(first["entries"]) == 3 and first["next_offset"] == 3
    rest = tree.share.list_dir("inbox", "", offset=3)
    names = [e["name"] for e in first["entries"] + rest["entries"]]
    assert names == sorted(os.listdir(tree.rw))
    link = tree.share.stat("inbox", "link")
    assert link["type"] == "symlink" and "size" not in link
    assert_clean(tree, tree.share.list_dir("inbox", ""))


def test_errors_name_the_root_never_the_host_path(tree: Tree) -> None:
    for call in (
        lambda: tree.share.read("inbox", "missing/x"),
        lambda: tree.share.read("inbox", "sub"),
        lambda: tree.share.list_dir("inbox", "a.txt"),
        lambda: tree.share.read("nope", "a.txt"),
        lambda: tree.share.mkdir("inbox", "a.txt/x"),
    ):
        with pytest.raises(FilesError) as info:
            call()
        assert tree.top not in info.value.message and "\n" not in info.value.message
    with pytest.raises(FilesError, match=r"^inbox:missing: no such file or directory$"):
        tree.share.read("inbox", "missing/x")
    with pytest.raises(FilesError, match=r"^unknown root 'nope'; the roots are: inbox, nas$"):
        tree.share.read("nope", "a.txt")
    shutil.rmtree(tree.rw)
    with pytest.raises(FilesError, match=r"^root 'inbox' is not available right now$"):
        tree.share.list_dir("inbox", "")


def test_mkdir_parents_is_idempotent_and_refuses_links(tree: Tree) -> None:
    assert tree.share.mkdir("inbox", "p/q/r", parents=True)["created"] is True
    assert tree.share.mkdir("inbox", "p/q/r", parents=True)["created"] is False
    assert tree.share.mkdir("inbox", "p/q/r")["created"] is False
    os.symlink(tree.outside, f"{tree.rw}/p/out")
    with pytest.raises(FilesError, match="symbolic link"):
        tree.share.mkdir("inbox", "p/out/new", parents=True)
    assert not os.path.exists(f"{tree.outside}/new")
    with pytest.raises(FilesError, match="already exists and is a file"):
        tree.share.mkdir("inbox", "a.txt")


def test_root_specs_and_overlaps() -> None:
    assert confine.parse_root("nas=/srv/nas") == Root("nas", "/srv/nas", False)
    assert confine.parse_root("in=/srv/a:b:rw") == Root("in", "/srv/a:b", True)
    assert confine.parse_root("x=/srv/x:ro") == Root("x", "/srv/x", False)
    for bad in ("nas", "=/x", "n a=/x", "nas=relative", "nas="):
        with pytest.raises(confine.ConfigError):
            confine.parse_root(bad)
    base = tempfile.mkdtemp(dir=TMP)
    try:
        os.makedirs(f"{base}/rw/ro")
        with pytest.raises(confine.ConfigError, match="lies inside read-write root"):
            confine.check_roots([Root("a", f"{base}/rw/ro", False), Root("b", f"{base}/rw", True)])
        with pytest.raises(confine.ConfigError, match="twice"):
            confine.check_roots([Root("a", f"{base}/rw", False), Root("a", f"{base}/rw/ro", False)])
        with pytest.raises(confine.ConfigError, match="not a directory"):
            confine.check_roots([Root("a", f"{base}/none", False)])
        confine.check_roots([Root("a", f"{base}/rw", False), Root("b", f"{base}/rw/ro", True)])
    finally:
        shutil.rmtree(base)


def test_errno_messages_carry_no_filename() -> None:
    exc = OSError(errno.ENOENT, "No such file", "/very/secret/host/path")
    assert confine._oserror("nas:x", exc).message == "nas:x: no such file or directory"
