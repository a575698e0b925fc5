"""The confinement core of the files server: every path resolved from a root fd.

A request names a *root* (the name the operator gave it, never its host path)
and a path relative to it. The path is split into components; absolute paths,
``..`` components, NUL bytes and over-long names or paths are refused before
anything is opened. Then the root is opened (``O_PATH|O_DIRECTORY``) and every
component is opened in turn *relative to the descriptor of its parent* with
``O_NOFOLLOW``: one name looked up in one directory the server already holds.
There is no path string that the kernel re-resolves later, so there is no
window between a check and a use: a directory swapped for a symbolic link
between two calls makes the next ``openat`` fail, it cannot redirect it.

- Symbolic links are never followed, anywhere (inside the root or out).
- Only regular files and directories are served: a FIFO, socket or device is
  refused after ``fstat`` on an ``O_PATH`` descriptor, which opens nothing;
  the file is then re-opened through ``/proc/self/fd`` (the same inode, no
  second lookup) with ``O_NONBLOCK|O_NOCTTY``.
- Files are created with ``O_CREAT|O_EXCL|O_NOFOLLOW`` under a temporary name
  in the parent directory and renamed into place with directory-fd-relative
  calls (``renameat2(RENAME_NOREPLACE)`` unless overwriting is asked for);
  unlink, rmdir, mkdir and rename are all ``dir_fd``-relative.
- Read-only roots refuse every write before anything is touched.
- Every read-write root has a quota (bytes of its regular files and the
  number of its entries; by default 1 GiB and 100,000): ``write``, ``append``
  and ``mkdir`` measure the root first (a walk by descriptor that never
  follows a link) and refuse, before anything is created, what would take it
  over. See :class:`Usage`.
- Work is bounded: read sizes, write sizes, directory listings, recursive
  deletes, and search (files visited, bytes read, results, time).

Every :class:`FilesError` message is safe to show the agent: it names the root
and the relative path the agent gave, never a host path, and never carries an
``OSError``'s own text (which could hold one).
"""

from __future__ import annotations

import base64
import binascii
import codecs
import contextlib
import ctypes
import errno
import fnmatch
import os
import re
import secrets
import stat
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

ROOT_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")

MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255
MAX_DEPTH = 64

READ_DEFAULT = 64 * 1024
READ_MAX = 1024 * 1024
WRITE_MAX = 4 * 1024 * 1024
LIST_DEFAULT = 500
LIST_MAX = 5000
LIST_SCAN_MAX = 100_000  # names read from one directory before giving up on sorting the rest
DELETE_MAX = 10_000

#: the quota of a read-write root without ``--quota``: what it may hold, counted as the bytes of its
#: regular files and its entries of every kind (files, directories, links...; the root itself not)
QUOTA_BYTES_DEFAULT = 1 << 30
QUOTA_FILES_DEFAULT = 100_000
QUOTA_MAX = 1 << 62
#: directories nested deeper than this in a root cannot be measured: writes to it are refused
USAGE_DEPTH_MAX = 1000
_SIZE = re.compile(r"(\d+)([KMGT]?)(?:i?B)?", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}

SEARCH_RESULTS_DEFAULT = 100
SEARCH_RESULTS_MAX = 1000
SEARCH_FILES_DEFAULT = 10_000
SEARCH_FILES_MAX = 100_000
SEARCH_BYTES_DEFAULT = 32 * 1024 * 1024
SEARCH_BYTES_MAX = 256 * 1024 * 1024
SEARCH_FILE_BYTES_MAX = 8 * 1024 * 1024  # bytes scanned in one file
SEARCH_TIME_DEFAULT = 5.0
SEARCH_TIME_MAX = 30.0
SEARCH_PATTERN_MAX = 256
SEARCH_TEXT_MAX = 1024
SNIPPET_MAX = 200

_O_CLOEXEC = os.O_CLOEXEC
_PATH_ANY = os.O_PATH | os.O_NOFOLLOW | _O_CLOEXEC
_PATH_DIR = os.O_PATH | os.O_NOFOLLOW | os.O_DIRECTORY | _O_CLOEXEC
_READ_DIR = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_NONBLOCK | _O_CLOEXEC
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | _O_CLOEXEC
_REOPEN_EXTRA = os.O_NONBLOCK | os.O_NOCTTY | _O_CLOEXEC
_FILE_MODE = 0o644
_DIR_MODE = 0o755

_RENAME_NOREPLACE = 1


class FilesError(Exception):
    """A refusal or failure whose message is safe to show the agent (no host paths)."""

    def __init__(self, message: str, code: int = 0) -> None:
        super().__init__(message)
        self.message = message
        self.errno = code

    def __str__(self) -> str:
        return self.message


class ConfigError(Exception):
    """A bad ``--root`` specification (reported to the operator, never the agent)."""


@dataclass(frozen=True)
class Root:
    """One configured root: the name the agent sees, the host path it hides, its mode and (rw) its quota."""

    name: str
    path: str
    writable: bool
    quota_bytes: int = QUOTA_BYTES_DEFAULT
    quota_files: int = QUOTA_FILES_DEFAULT

    def open(self) -> int:
        """An ``O_PATH`` descriptor on the root directory itself (the operator's path is trusted)."""
        try:
            return os.open(self.path, os.O_PATH | os.O_DIRECTORY | _O_CLOEXEC)
        except OSError:
            raise FilesError(f"root '{self.name}' is not available right now") from None


def parse_root(spec: str) -> Root:
    """``NAME=PATH[:ro|:rw]`` (read-only unless ``:rw``) to a :class:`Root`."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ConfigError(f"--root {spec!r}: expected NAME=PATH[:ro|:rw]")
    if not ROOT_NAME.fullmatch(name):
        raise ConfigError(f"--root {spec!r}: the name must match [A-Za-z0-9_-]{{1,64}}")
    path, mode = rest, "ro"
    head, colon, tail = rest.rpartition(":")
    if colon and tail in ("ro", "rw"):
        path, mode = head, tail
    if not os.path.isabs(path):
        raise ConfigError(f"--root {spec!r}: the path must be absolute")
    return Root(name, os.path.normpath(path), mode == "rw")


def parse_quota(spec: str) -> tuple[str, int, int | None]:
    """``NAME=SIZE[,FILES]`` to ``(name, bytes, files or None)``; SIZE is bytes or ``512K``/``64M``/``2G``/``1T``."""
    name, sep, rest = spec.partition("=")
    if not sep or not ROOT_NAME.fullmatch(name):
        raise ConfigError(f"--quota {spec!r}: expected NAME=SIZE[,FILES], like inbox=512M,10000")
    size, comma, files = rest.partition(",")
    match = _SIZE.fullmatch(size.strip())
    if not match:
        raise ConfigError(f"--quota {spec!r}: the size must be bytes or a number with K, M, G or T (binary units)")
    nbytes = int(match.group(1)) * _UNITS[match.group(2).upper()]
    count: int | None = None
    if comma:
        if not files.strip().isdecimal():
            raise ConfigError(f"--quota {spec!r}: FILES must be a whole number of entries")
        count = int(files.strip())
    if nbytes > QUOTA_MAX or (count or 0) > QUOTA_MAX:
        raise ConfigError(f"--quota {spec!r}: too large")
    return name, nbytes, count


def apply_quotas(roots: Sequence[Root], specs: Sequence[str]) -> list[Root]:
    """The roots with each ``--quota`` applied; a quota for an unknown or read-only root, or given twice, is refused."""
    by_name = {r.name: r for r in roots}
    done: set[str] = set()
    for spec in specs:
        name, nbytes, count = parse_quota(spec)
        root = by_name.get(name)
        if root is None:
            raise ConfigError(f"--quota {spec!r}: there is no root {name!r}")
        if not root.writable:
            raise ConfigError(f"--quota {spec!r}: root {name!r} is read-only; quotas apply to :rw roots")
        if name in done:
            raise ConfigError(f"--quota: root {name!r} is given a quota twice")
        done.add(name)
        by_name[name] = replace(root, quota_bytes=nbytes, quota_files=root.quota_files if count is None else count)
    return [by_name[r.name] for r in roots]


def human_size(n: int) -> str:
    """``1 GiB``, ``512 MiB``, ``1.5 KiB``, ``100 bytes``."""
    for unit, factor in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= factor:
            return f"{n / factor:.4g} {unit}"
    return f"{n} bytes"


def check_roots(roots: Sequence[Root]) -> None:
    """Refuse duplicate names, missing directories, and a read-only root inside a writable one."""
    if not roots:
        raise ConfigError("no roots: give at least one --root NAME=PATH[:ro|:rw]")
    seen: set[str] = set()
    for root in roots:
        if root.name in seen:
            raise ConfigError(f"root name {root.name!r} is given twice")
        seen.add(root.name)
        if not os.path.isdir(root.path):
            raise ConfigError(f"root {root.name!r}: {root.path} is not a directory")
    real = {r.name: os.path.realpath(r.path) for r in roots}
    for ro in (r for r in roots if not r.writable):
        for rw in (r for r in roots if r.writable):
            if os.path.commonpath([real[ro.name], real[rw.name]]) == real[rw.name]:
                raise ConfigError(
                    f"read-only root {ro.name!r} lies inside read-write root {rw.name!r}: "
                    "writes through the one would land in the other"
                )


# --- paths ----------------------------------------------------------------------------------


def split_path(path: str) -> tuple[str, ...]:
    """The components of a root-relative path; refuse anything that could climb or escape."""
    if "\x00" in path:
        raise FilesError("the path contains a NUL character")
    try:
        encoded = os.fsencode(path)
    except UnicodeError:
        raise FilesError("the path is not valid Unicode") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise FilesError(f"the path is longer than {MAX_PATH_BYTES} bytes")
    if path.startswith("/"):
        raise FilesError("absolute paths are refused: paths are relative to the root (use '' for the root itself)")
    parts = tuple(p for p in path.split("/") if p not in ("", "."))
    if ".." in parts:
        raise FilesError("'..' is refused: a path may not climb out of or within the root")
    if any(len(os.fsencode(p)) > MAX_NAME_BYTES for p in parts):
        raise FilesError(f"a path component is longer than {MAX_NAME_BYTES} bytes")
    if len(parts) > MAX_DEPTH:
        raise FilesError(f"the path has more than {MAX_DEPTH} components")
    return parts


def show_name(name: str) -> str:
    """A name as the agent sees it: undecodable bytes shown as escapes, never lone surrogates."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def show(root: Root, parts: Sequence[str]) -> str:
    """``root:rel/path`` (``root:.`` for the root itself)."""
    return f"{root.name}:{'/'.join(show_name(p) for p in parts) or '.'}"


def _rel(parts: Sequence[str]) -> str:
    return "/".join(show_name(p) for p in parts)


_MESSAGES = {
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
    errno.ELOOP: "is a symbolic link (symbolic links are never followed)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EEXIST: "already exists",
    errno.ENOTEMPTY: "directory not empty",
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EXDEV: "crosses a file-system boundary",
    errno.EBUSY: "busy",
    errno.ENAMETOOLONG: "name too long",
    errno.ETXTBSY: "text file busy",
    errno.EFBIG: "file too large",
}


def _oserror(where: str, exc: OSError) -> FilesError:
    """A safe message for an OSError: the errno's meaning, never its filename."""
    code = exc.errno or 0
    text = _MESSAGES.get(code) or (os.strerror(code).lower() if code else "I/O error")
    return FilesError(f"{where}: {text}", code)


def _kind(mode: int) -> str:
    if stat.S_ISREG(mode):
        return "file"
    if stat.S_ISDIR(mode):
        return "directory"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISFIFO(mode):
        return "fifo"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISCHR(mode):
        return "character device"
    if stat.S_ISBLK(mode):
        return "block device"
    return "unknown"


def _refuse_kind(where: str, mode: int) -> FilesError:
    kind = _kind(mode)
    if kind == "symlink":
        return FilesError(f"{where}: is a symbolic link (symbolic links are never followed)", errno.ELOOP)
    if kind == "directory":
        return FilesError(f"{where}: is a directory", errno.EISDIR)
    return FilesError(f"{where}: is a {kind}; only regular files and directories are served", errno.EPERM)


def _mtime(st: os.stat_result) -> str:
    return datetime.fromtimestamp(st.st_mtime, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


_PROC_FD = os.path.isdir("/proc/self/fd")


def _reopen(pfd: int, dir_fd: int, name: str, flags: int, where: str) -> tuple[int, os.stat_result]:
    """Upgrade an ``O_PATH`` descriptor of a regular file to a real one on the same inode."""
    want = os.fstat(pfd)
    if _PROC_FD:
        fd = os.open(f"/proc/self/fd/{pfd}", flags | _REOPEN_EXTRA)
    else:  # no /proc: look the name up again, still without following, and compare inodes
        fd = os.open(name, flags | _REOPEN_EXTRA | os.O_NOFOLLOW, dir_fd=dir_fd)
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (want.st_dev, want.st_ino) or not stat.S_ISREG(st.st_mode):
        _close(fd)
        raise FilesError(f"{where}: changed while it was being opened; try again", errno.EAGAIN)
    return fd, st


_libc_renameat2: Any = None
with contextlib.suppress(OSError, AttributeError):
    _libc_renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    _libc_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    _libc_renameat2.restype = ctypes.c_int


def rename_noreplace(src_dir: int, src: str, dst_dir: int, dst: str) -> None:
    """Rename without replacing an existing destination (EEXIST), all relative to directory fds."""
    if _libc_renameat2 is not None:
        if _libc_renameat2(src_dir, os.fsencode(src), dst_dir, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code))
    # renameat2 missing or not supported by this file system
    st = os.stat(src, dir_fd=src_dir, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.link(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir, follow_symlinks=False)  # EEXIST if taken
        os.unlink(src, dir_fd=src_dir)
        return
    try:
        os.stat(dst, dir_fd=dst_dir, follow_symlinks=False)
    except FileNotFoundError:
        os.rename(src, dst, src_dir_fd=src_dir, dst_dir_fd=dst_dir)
        return
    raise OSError(errno.EEXIST, os.strerror(errno.EEXIST))


def decode_content(content: str, encoding: str) -> bytes:
    """The bytes to write: UTF-8 of ``content``, or its base64 decoding."""
    if encoding == "text":
        data = _utf8(content)
    elif encoding == "base64":
        try:
            data = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise FilesError("content is not valid base64") from None
    else:
        raise FilesError("encoding must be 'text' or 'base64'")
    if len(data) > WRITE_MAX:
        raise FilesError(f"content is larger than {WRITE_MAX} bytes")
    return data


def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8", "strict")
    except UnicodeError:
        raise FilesError("content is not valid Unicode text; send it with encoding='base64'") from None


def _bounded(value: int | float, low: int | float, high: int | float, what: str) -> Any:
    if value < low or value > high:
        raise FilesError(f"{what} must be between {low} and {high}")
    return value


@dataclass
class _Search:
    """The running state and budget of one search."""

    name: str | None
    needle: str | None
    ignore_case: bool
    max_results: int
    max_files: int
    max_bytes: int
    deadline: float
    results: list[dict[str, Any]] = field(default_factory=list)
    visited: int = 0
    bytes_read: int = 0
    skipped: int = 0
    stopped: str | None = None

    def over(self) -> bool:
        if self.stopped is None:
            if len(self.results) >= self.max_results:
                self.stopped = "max_results"
            elif self.visited >= self.max_files:
                self.stopped = "max_files"
            elif self.bytes_read >= self.max_bytes:
                self.stopped = "max_bytes"
            elif time.monotonic() >= self.deadline:
                self.stopped = "time_limit"
        return self.stopped is not None


@dataclass
class Usage:
    """What a root holds: bytes of its regular files (a hard-linked inode once) and its entries of every kind.

    Measured by :func:`measure`, walking the root by descriptor from a
    descriptor on it, never following a symbolic link (a link counts as one
    entry and no bytes, wherever it points). ``partial`` when the walk stopped
    early because it was already past a limit: the numbers are then at least
    what the root holds.
    """

    bytes: int = 0
    files: int = 0
    partial: bool = False
    #: past a stop limit of :func:`measure`
    over: bool = False


def _scan_usage(fd: int, usage: Usage, seen: set[tuple[int, int]], stop_bytes: int, stop_files: int) -> list[str]:
    """Count the entries of one directory into ``usage``; the names of its subdirectories.

    Past a limit it stops, sets ``usage.over`` and, when entries are left
    uncounted, ``usage.partial``.
    """
    dirs: list[str] = []
    with os.scandir(fd) as it:
        for entry in it:
            usage.files += 1
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue  # gone meanwhile: counted as an entry, no bytes
            if stat.S_ISREG(st.st_mode):
                if st.st_nlink > 1:
                    if (st.st_dev, st.st_ino) in seen:
                        continue
                    seen.add((st.st_dev, st.st_ino))
                usage.bytes += st.st_size
            elif stat.S_ISDIR(st.st_mode):
                dirs.append(entry.name)
            if usage.bytes > stop_bytes or usage.files > stop_files:
                usage.over = True
                usage.partial = next(it, None) is not None
                break
    return dirs


def measure(root: Root, stop_bytes: int = QUOTA_MAX, stop_files: int = QUOTA_MAX) -> Usage:
    """The :class:`Usage` of ``root``, stopping once it holds more than ``stop_bytes`` or ``stop_files``.

    One descriptor per level of the directory being walked (never one per
    pending directory); a directory that cannot be opened counts as one
    entry. Deeper than :data:`USAGE_DEPTH_MAX` levels: a :class:`FilesError`.
    """
    usage = Usage()
    seen: set[tuple[int, int]] = set()
    pfd = root.open()
    stack: list[tuple[int, list[str]]] = []
    try:
        try:
            top = os.open(".", _READ_DIR, dir_fd=pfd)
        except OSError as exc:
            raise _oserror(f"root '{root.name}': cannot measure its usage", exc) from None
        stack.append((top, []))
        try:
            stack[-1][1].extend(_scan_usage(top, usage, seen, stop_bytes, stop_files))
        except OSError as exc:
            raise _oserror(f"root '{root.name}': cannot measure its usage", exc) from None
        while stack and not usage.over:
            fd, dirs = stack[-1]
            if not dirs:
                _close(fd)
                stack.pop()
                continue
            try:
                child = os.open(dirs.pop(), _READ_DIR, dir_fd=fd)
            except OSError:
                continue  # unreadable, or swapped for a link: its entry is counted, its contents cannot be
            stack.append((child, []))
            if len(stack) > USAGE_DEPTH_MAX:
                raise FilesError(
                    f"root '{root.name}' is nested deeper than {USAGE_DEPTH_MAX} levels: its usage cannot be "
                    "measured, so writes to it are refused",
                    errno.EDQUOT,
                )
            try:
                stack[-1][1].extend(_scan_usage(child, usage, seen, stop_bytes, stop_files))
            except OSError:
                continue
        if usage.over and any(dirs for _fd, dirs in stack):
            usage.partial = True  # directories left unwalked
    finally:
        for fd, _dirs in stack:
            _close(fd)
        _close(pfd)
    return usage


def _quota_text(root: Root) -> str:
    size = human_size(root.quota_bytes)
    if root.quota_bytes >= 1024:
        size += f" = {root.quota_bytes} bytes"
    return f"{size}, {root.quota_files} entries"


class _Budget:
    """The room left in one root for one operation: measured once, then charged growth by growth."""

    def __init__(self, root: Root) -> None:
        self.root = root
        self.usage: Usage | None = None

    def charge(self, where: str, nbytes: int, entries: int) -> None:
        """Refuse (EDQUOT) unless ``nbytes`` more bytes and ``entries`` more entries fit in the quota."""
        root = self.root
        if nbytes <= 0 and entries <= 0:
            return  # shrinking, or no change, is always allowed (even in a root already over its quota)
        if self.usage is None:  # a limit is only watched for what is charged: a partial walk is then over it
            self.usage = measure(
                root,
                root.quota_bytes - nbytes if nbytes > 0 else QUOTA_MAX,
                root.quota_files - entries if entries > 0 else QUOTA_MAX,
            )
        used = self.usage
        if (nbytes > 0 and used.bytes + nbytes > root.quota_bytes) or (
            entries > 0 and used.files + entries > root.quota_files
        ):
            least = "at least " if used.partial else ""
            raise FilesError(
                f"{where}: over the quota of root '{root.name}' ({_quota_text(root)}): it holds {least}"
                f"{used.bytes} bytes in {used.files} entries and this needs {max(nbytes, 0)} bytes and "
                f"{max(entries, 0)} entries more; nothing was written",
                errno.EDQUOT,
            )
        used.bytes += nbytes
        used.files += entries


class Share:
    """The configured roots and every file operation on them."""

    def __init__(self, roots: Sequence[Root]) -> None:
        self.roots = {r.name: r for r in roots}
        #: held from measuring a root to the end of the write it allows, so two calls cannot both take the room
        self._quota_lock = threading.Lock()

    # --- resolution -----------------------------------------------------------------------

    def root(self, name: str) -> Root:
        root = self.roots.get(name)
        if root is None:
            known = ", ".join(sorted(self.roots)) or "none"
            raise FilesError(f"unknown root {name!r}; the roots are: {known}")
        return root

    def _writable(self, name: str, tool: str) -> Root:
        root = self.root(name)
        if not root.writable:
            raise FilesError(f"root '{root.name}' is read-only: {tool} is refused", errno.EROFS)
        return root

    @contextlib.contextmanager
    def _dir(self, root: Root, parts: Sequence[str]) -> Iterator[int]:
        """An ``O_PATH`` descriptor of the directory at ``parts``, walked one component at a time."""
        fd = root.open()
        try:
            for i, part in enumerate(parts):
                try:
                    nfd = os.open(part, _PATH_DIR, dir_fd=fd)
                except OSError as exc:
                    raise self._component_error(root, parts[: i + 1], fd, part, exc) from None
                os.close(fd)
                fd = nfd
            yield fd
        finally:
            _close(fd)

    @staticmethod
    def _component_error(root: Root, parts: Sequence[str], fd: int, part: str, exc: OSError) -> FilesError:
        where = show(root, parts)
        if exc.errno in (errno.ENOTDIR, errno.ELOOP):
            with contextlib.suppress(OSError):
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    kind = _kind(st.st_mode)
                    if kind == "symlink":
                        return FilesError(
                            f"{where}: is a symbolic link (symbolic links are never followed)", errno.ELOOP
                        )
                    return FilesError(f"{where}: is a {kind}, not a directory", errno.ENOTDIR)
        return _oserror(where, exc)

    @contextlib.contextmanager
    def _listable(self, root: Root, parts: Sequence[str]) -> Iterator[int]:
        """A readable descriptor of the directory at ``parts`` (for listing and scanning)."""
        with self._dir(root, parts) as dfd:
            try:
                lfd = os.open(".", _READ_DIR, dir_fd=dfd)
            except OSError as exc:
                raise _oserror(show(root, parts), exc) from None
        try:
            yield lfd
        finally:
            _close(lfd)

    def _open_file(self, dir_fd: int, name: str, flags: int, where: str) -> tuple[int, os.stat_result]:
        """Open a regular file in ``dir_fd`` without following links or opening anything else."""
        try:
            pfd = os.open(name, _PATH_ANY, dir_fd=dir_fd)
        except OSError as exc:
            raise _oserror(where, exc) from None
        try:
            mode = os.fstat(pfd).st_mode
            if not stat.S_ISREG(mode):
                raise _refuse_kind(where, mode)
            try:
                return _reopen(pfd, dir_fd, name, flags, where)
            except OSError as exc:
                raise _oserror(where, exc) from None
        finally:
            _close(pfd)

    # --- read tools -----------------------------------------------------------------------

    def list_roots(self) -> dict[str, Any]:
        """Each root's name and mode; a read-write root also its quota and what it holds now."""
        found: list[dict[str, Any]] = []
        for r in self.roots.values():
            item: dict[str, Any] = {"name": r.name, "mode": "rw" if r.writable else "ro"}
            if r.writable:
                item["quota"] = {"bytes": r.quota_bytes, "files": r.quota_files}
                try:
                    used = measure(r, r.quota_bytes, r.quota_files)  # bounded: it stops once over the quota
                except FilesError:
                    item["used"] = None
                else:
                    item["used"] = {"bytes": used.bytes, "files": used.files, "at_least": used.partial}
            found.append(item)
        return {"roots": found}

    def stat(self, root_name: str, path: str) -> dict[str, Any]:
        root = self.root(root_name)
        parts = split_path(path)
        where = show(root, parts)
        with self._dir(root, parts[:-1]) as dfd:
            try:
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False) if parts else os.fstat(dfd)
            except OSError as exc:
                raise _oserror(where, exc) from None
        info: dict[str, Any] = {
            "root": root.name,
            "path": _rel(parts),
            "type": _kind(st.st_mode),
            "mode": f"{stat.S_IMODE(st.st_mode):04o}",
            "mtime": _mtime(st),
            "writable_root": root.writable,
        }
        if stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode):
            info["size"] = st.st_size  # a link's size is its target's length: not shown
        return info

    def list_dir(self, root_name: str, path: str, offset: int = 0, limit: int = LIST_DEFAULT) -> dict[str, Any]:
        root = self.root(root_name)
        parts = split_path(path)
        _bounded(offset, 0, LIST_SCAN_MAX, "offset")
        _bounded(limit, 1, LIST_MAX, "limit")
        entries: list[dict[str, Any]] = []
        with self._listable(root, parts) as lfd:
            names: list[str] = []
            scan_truncated = False
            with os.scandir(lfd) as it:
                for entry in it:
                    if len(names) >= LIST_SCAN_MAX:
                        scan_truncated = True
                        break
                    names.append(entry.name)
            names.sort()
            for name in names[offset : offset + limit]:
                try:
                    st = os.stat(name, dir_fd=lfd, follow_symlinks=False)
                except OSError:
                    continue  # removed meanwhile
                item: dict[str, Any] = {"name": show_name(name), "type": _kind(st.st_mode), "mtime": _mtime(st)}
                if stat.S_ISREG(st.st_mode):
                    item["size"] = st.st_size
                entries.append(item)
        more = offset + limit < len(names)
        return {
            "root": root.name,
            "path": _rel(parts),
            "entries": entries,
            "total": len(names),
            "next_offset": offset + limit if more else None,
            "truncated": scan_truncated,
        }

    def read(
        self, root_name: str, path: str, offset: int = 0, max_bytes: int = READ_DEFAULT, binary: bool = False
    ) -> dict[str, Any]:
        root = self.root(root_name)
        parts = split_path(path)
        where = show(root, parts)
        _bounded(offset, 0, 2**62, "offset")
        _bounded(max_bytes, 1, READ_MAX, "max_bytes")
        if not parts:
            raise FilesError(f"{where}: is a directory", errno.EISDIR)
        with self._dir(root, parts[:-1]) as dfd:
            fd, st = self._open_file(dfd, parts[-1], os.O_RDONLY, where)
        try:
            data = _pread_all(fd, max_bytes, offset)
        except OSError as exc:
            raise _oserror(where, exc) from None
        finally:
            _close(fd)
        start = offset
        eof = start + len(data) >= st.st_size
        result: dict[str, Any] = {"root": root.name, "path": _rel(parts), "size": st.st_size}
        if binary:
            consumed = len(data)
            result.update(encoding="base64", content=base64.b64encode(data).decode("ascii"))
        else:
            skip = 0
            if start > 0:  # an offset inside a multi-byte character: start at the next character
                while skip < min(3, len(data)) and 0x80 <= data[skip] <= 0xBF:
                    skip += 1
            body = data[skip:]
            decoder = codecs.getincrementaldecoder("utf-8")("strict")
            try:
                text = decoder.decode(body, final=eof)
            except UnicodeDecodeError:
                text = "\x00"
            if "\x00" in text:
                raise FilesError(
                    f"{where}: is not UTF-8 text; call read again with binary=true to get it as base64",
                    errno.EILSEQ,
                )
            consumed = len(body) - len(decoder.getstate()[0])
            if body and not consumed:
                raise FilesError(f"{where}: max_bytes is too small to hold the next character; use at least 4")
            start += skip
            result.update(encoding="text", content=text)
        end = start + consumed
        result.update(
            offset=start,
            length=end - start,
            eof=end >= st.st_size,
            next_offset=None if end >= st.st_size else end,
        )
        return result

    def search(
        self,
        root_name: str,
        path: str = "",
        name: str | None = None,
        contains: str | None = None,
        ignore_case: bool = False,
        max_results: int = SEARCH_RESULTS_DEFAULT,
        max_files: int = SEARCH_FILES_DEFAULT,
        max_bytes: int = SEARCH_BYTES_DEFAULT,
        time_limit: float = SEARCH_TIME_DEFAULT,
    ) -> dict[str, Any]:
        root = self.root(root_name)
        parts = split_path(path)
        _bounded(max_results, 1, SEARCH_RESULTS_MAX, "max_results")
        _bounded(max_files, 1, SEARCH_FILES_MAX, "max_files")
        _bounded(max_bytes, 0, SEARCH_BYTES_MAX, "max_bytes")
        _bounded(time_limit, 0.1, SEARCH_TIME_MAX, "time_limit")
        if name is not None and not 1 <= len(name) <= SEARCH_PATTERN_MAX:
            raise FilesError(f"name must be a glob pattern of 1 to {SEARCH_PATTERN_MAX} characters")
        if contains is not None and not 1 <= len(contains) <= SEARCH_TEXT_MAX:
            raise FilesError(f"contains must be a text of 1 to {SEARCH_TEXT_MAX} characters")
        fold = ignore_case
        state = _Search(
            name=(name.casefold() if fold else name) if name is not None else None,
            needle=(contains.casefold() if fold else contains) if contains is not None else None,
            ignore_case=fold,
            max_results=max_results,
            max_files=max_files,
            max_bytes=max_bytes,
            deadline=time.monotonic() + time_limit,
        )
        with self._listable(root, parts) as lfd:
            self._search_dir(state, lfd, list(parts), len(parts))
        return {
            "root": root.name,
            "path": _rel(parts),
            "results": state.results,
            "complete": state.stopped is None,
            "stopped": state.stopped,
            "files_visited": state.visited,
            "bytes_read": state.bytes_read,
            "skipped": state.skipped,
        }

    def _search_dir(self, state: _Search, dfd: int, prefix: list[str], depth: int) -> None:
        try:
            with os.scandir(dfd) as it:
                names = []
                for entry in it:
                    names.append(entry.name)
                    if len(names) >= LIST_SCAN_MAX:
                        break
        except OSError:
            state.skipped += 1
            return
        names.sort()
        for entry_name in names:
            if state.over():
                return
            state.visited += 1
            try:
                st = os.stat(entry_name, dir_fd=dfd, follow_symlinks=False)
            except OSError:
                state.skipped += 1
                continue
            rel = [*prefix, entry_name]
            is_dir = stat.S_ISDIR(st.st_mode)
            if state.name is not None:
                shown = entry_name.casefold() if state.ignore_case else entry_name
                name_ok = fnmatch.fnmatchcase(shown, state.name)
            else:
                name_ok = True
            if name_ok and state.needle is None and (is_dir or stat.S_ISREG(st.st_mode)):
                state.results.append({"path": _rel(rel), "type": _kind(st.st_mode)})
            elif name_ok and state.needle is not None and stat.S_ISREG(st.st_mode):
                self._search_file(state, dfd, entry_name, rel)
            if is_dir:
                if depth + 1 > MAX_DEPTH:
                    state.skipped += 1
                    continue
                try:
                    cfd = os.open(entry_name, _READ_DIR, dir_fd=dfd)
                except OSError:
                    state.skipped += 1
                    continue
                try:
                    self._search_dir(state, cfd, rel, depth + 1)
                finally:
                    _close(cfd)

    def _search_file(self, state: _Search, dfd: int, name: str, rel: list[str]) -> None:
        budget = min(SEARCH_FILE_BYTES_MAX, state.max_bytes - state.bytes_read)
        if budget <= 0:
            return
        try:
            fd, _st = self._open_file(dfd, name, os.O_RDONLY, _rel(rel))
        except FilesError:
            state.skipped += 1
            return
        try:
            data = _pread_all(fd, budget, 0)
        except OSError:
            state.skipped += 1
            return
        finally:
            _close(fd)
        state.bytes_read += len(data)
        if b"\x00" in data[:8192]:
            return  # binary
        assert state.needle is not None
        text = data.decode("utf-8", "replace")
        for number, line in enumerate(text.split("\n"), 1):
            hay = line.casefold() if state.ignore_case else line
            if state.needle in hay:
                state.results.append({"path": _rel(rel), "line": number, "text": line.strip()[:SNIPPET_MAX]})
                if len(state.results) >= state.max_results:
                    return

    # --- write tools ----------------------------------------------------------------------

    def write(
        self, root_name: str, path: str, content: str, encoding: str = "text", overwrite: bool = False
    ) -> dict[str, Any]:
        root = self._writable(root_name, "write")
        parts = split_path(path)
        data = decode_content(content, encoding)
        where = show(root, parts)
        if not parts:
            raise FilesError(f"{where}: is a directory", errno.EISDIR)
        name = parts[-1]
        with self._quota_lock, self._dir(root, parts[:-1]) as dfd:
            replaced = self._charge_write(root, dfd, name, where, len(data), overwrite)
            tmp = f".files-{secrets.token_hex(8)}.tmp"
            try:
                fd = os.open(tmp, _CREATE, _FILE_MODE, dir_fd=dfd)
            except OSError as exc:
                raise _oserror(f"{where}: cannot create its temporary file", exc) from None
            try:
                try:
                    _write_all(fd, data)
                    os.fsync(fd)
                finally:
                    _close(fd)
                if overwrite:  # what is there was checked (a regular file, or nothing) by _charge_write
                    os.rename(tmp, name, src_dir_fd=dfd, dst_dir_fd=dfd)
                else:
                    try:
                        rename_noreplace(dfd, tmp, dfd, name)
                    except FileExistsError:
                        raise FilesError(
                            f"{where}: already exists; pass overwrite=true to replace it", errno.EEXIST
                        ) from None
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise _oserror(where, exc) from None
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)
                raise
        return {"root": root.name, "path": _rel(parts), "size": len(data), "replaced": replaced}

    @staticmethod
    def _charge_write(root: Root, dfd: int, name: str, where: str, size: int, overwrite: bool) -> bool:
        """Refuse a write of ``size`` bytes to ``name`` that would take the root over its quota; True: it replaces.

        A new file needs its bytes and one entry; replacing a regular file
        needs only the growth (its old bytes are freed, unless another hard
        link keeps them). Refusals that the write itself would make anyway
        (it exists and ``overwrite`` is false; it is not a regular file) are
        made here first, so a full root does not hide them.
        """
        try:
            old = os.stat(name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            _Budget(root).charge(where, size, 1)
            return False
        except OSError as exc:
            raise _oserror(where, exc) from None
        if not overwrite:
            raise FilesError(f"{where}: already exists; pass overwrite=true to replace it", errno.EEXIST)
        if not stat.S_ISREG(old.st_mode):
            raise _refuse_kind(where, old.st_mode)
        _Budget(root).charge(where, size - (old.st_size if old.st_nlink == 1 else 0), 0)
        return True

    def append(
        self, root_name: str, path: str, content: str, encoding: str = "text", create: bool = False
    ) -> dict[str, Any]:
        with self._quota_lock:
            return self._append(root_name, path, content, encoding, create)

    def _append(self, root_name: str, path: str, content: str, encoding: str, create: bool) -> dict[str, Any]:
        root = self._writable(root_name, "append")
        parts = split_path(path)
        data = decode_content(content, encoding)
        where = show(root, parts)
        if not parts:
            raise FilesError(f"{where}: is a directory", errno.EISDIR)
        name = parts[-1]
        created = False
        budget = _Budget(root)
        with self._dir(root, parts[:-1]) as dfd:
            try:
                fd, st = self._open_file(dfd, name, os.O_WRONLY | os.O_APPEND, where)
            except FilesError as exc:
                if exc.errno != errno.ENOENT or not create:
                    raise
                budget.charge(where, len(data), 1)  # before it is created: a refusal leaves nothing behind
                try:
                    fd = os.open(name, _CREATE | os.O_APPEND, _FILE_MODE, dir_fd=dfd)
                    st = os.fstat(fd)
                    created = True
                except OSError as exc2:
                    raise _oserror(where, exc2) from None
        try:
            if st.st_nlink > 1:
                raise FilesError(
                    f"{where}: has {st.st_nlink} hard links (it may be shared with a place outside the root); "
                    "appending is refused",
                    errno.EPERM,
                )
            if not created:
                budget.charge(where, len(data), 0)
            _write_all(fd, data)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        except OSError as exc:
            raise _oserror(where, exc) from None
        finally:
            _close(fd)
        return {"root": root.name, "path": _rel(parts), "appended": len(data), "size": size, "created": created}

    def mkdir(self, root_name: str, path: str, parents: bool = False) -> dict[str, Any]:
        with self._quota_lock:
            return self._mkdir(root_name, path, parents)

    def _mkdir(self, root_name: str, path: str, parents: bool) -> dict[str, Any]:
        root = self._writable(root_name, "mkdir")
        parts = split_path(path)
        if not parts:
            return {"root": root.name, "path": "", "created": False}
        budget = _Budget(root)  # each directory made is one entry
        if not parents:
            with self._dir(root, parts[:-1]) as dfd:
                created = self._mkdir_one(root, parts, dfd, budget)
            return {"root": root.name, "path": _rel(parts), "created": created}
        fd = root.open()
        created = False
        charged = False
        try:
            for i, part in enumerate(parts):
                if not charged and not _exists(fd, part):  # this one and every one below it: charged at once
                    budget.charge(show(root, parts), 0, len(parts) - i)
                    charged = True
                created = self._mkdir_one(root, parts[: i + 1], fd, None if charged else budget)
                try:
                    nfd = os.open(part, _PATH_DIR, dir_fd=fd)
                except OSError as exc:
                    raise self._component_error(root, parts[: i + 1], fd, part, exc) from None
                os.close(fd)
                fd = nfd
        finally:
            _close(fd)
        return {"root": root.name, "path": _rel(parts), "created": created}

    def _mkdir_one(self, root: Root, parts: Sequence[str], dfd: int, budget: _Budget | None) -> bool:
        """mkdir the last of ``parts`` in ``dfd`` (charged to ``budget`` unless None); False when one is there."""
        where = show(root, parts)
        try:
            if budget is not None and not _exists(dfd, parts[-1]):
                budget.charge(where, 0, 1)
            os.mkdir(parts[-1], _DIR_MODE, dir_fd=dfd)
            return True
        except FileExistsError:
            try:
                st = os.stat(parts[-1], dir_fd=dfd, follow_symlinks=False)
            except OSError as exc:
                raise _oserror(where, exc) from None
            if stat.S_ISDIR(st.st_mode):
                return False
            if stat.S_ISLNK(st.st_mode):
                raise _refuse_kind(where, st.st_mode) from None
            raise FilesError(f"{where}: already exists and is a {_kind(st.st_mode)}", errno.EEXIST) from None
        except OSError as exc:
            raise _oserror(where, exc) from None

    def move(self, root_name: str, src: str, dst: str, overwrite: bool = False) -> dict[str, Any]:
        # no quota to charge (a move within a root changes nothing it holds), but under the quota lock: a move
        # racing a write could otherwise take away the file whose bytes the write counted as freed
        with self._quota_lock:
            return self._move(root_name, src, dst, overwrite)

    def _move(self, root_name: str, src: str, dst: str, overwrite: bool) -> dict[str, Any]:
        root = self._writable(root_name, "move")
        sparts, dparts = split_path(src), split_path(dst)
        swhere, dwhere = show(root, sparts), show(root, dparts)
        if not sparts:
            raise FilesError(f"{swhere}: the root itself cannot be moved", errno.EBUSY)
        if not dparts:
            raise FilesError(f"{dwhere}: cannot replace the root", errno.EBUSY)
        with self._dir(root, sparts[:-1]) as sfd, self._dir(root, dparts[:-1]) as dfd:
            try:
                st = os.stat(sparts[-1], dir_fd=sfd, follow_symlinks=False)
            except OSError as exc:
                raise _oserror(swhere, exc) from None
            try:
                if overwrite:
                    with contextlib.suppress(FileNotFoundError):
                        dst_st = os.stat(dparts[-1], dir_fd=dfd, follow_symlinks=False)
                        if stat.S_ISDIR(dst_st.st_mode):
                            raise FilesError(f"{dwhere}: is a directory; it is never replaced", errno.EISDIR)
                    os.rename(sparts[-1], dparts[-1], src_dir_fd=sfd, dst_dir_fd=dfd)
                else:
                    rename_noreplace(sfd, sparts[-1], dfd, dparts[-1])
            except FileExistsError:
                raise FilesError(f"{dwhere}: already exists; pass overwrite=true to replace it", errno.EEXIST) from None
            except OSError as exc:
                if exc.errno == errno.EINVAL:
                    raise FilesError(f"{swhere}: cannot move a directory into itself", errno.EINVAL) from None
                raise _oserror(f"{swhere} -> {dwhere}", exc) from None
        return {"root": root.name, "from": _rel(sparts), "to": _rel(dparts), "type": _kind(st.st_mode)}

    def delete(self, root_name: str, path: str, recursive: bool = False) -> dict[str, Any]:
        root = self._writable(root_name, "delete")
        parts = split_path(path)
        where = show(root, parts)
        if not parts:
            raise FilesError(f"{where}: the root itself cannot be deleted", errno.EBUSY)
        name = parts[-1]
        with self._dir(root, parts[:-1]) as dfd:
            try:
                st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                if not stat.S_ISDIR(st.st_mode):
                    os.unlink(name, dir_fd=dfd)  # a link is removed, never its target
                    return {"root": root.name, "path": _rel(parts), "deleted": 1}
                if not recursive:
                    try:
                        os.rmdir(name, dir_fd=dfd)
                    except OSError as exc:
                        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                            raise FilesError(
                                f"{where}: directory not empty; pass recursive=true to delete it with its contents",
                                errno.ENOTEMPTY,
                            ) from None
                        raise
                    return {"root": root.name, "path": _rel(parts), "deleted": 1}
                count = self._count(dfd, name, 1, where)
                if count > DELETE_MAX:
                    raise FilesError(f"{where}: holds more than {DELETE_MAX} entries; delete it in parts", errno.E2BIG)
                deleted = self._rmtree(dfd, name, 1)
            except OSError as exc:
                raise _oserror(where, exc) from None
        return {"root": root.name, "path": _rel(parts), "deleted": deleted}

    def _count(self, parent: int, name: str, depth: int, where: str) -> int:
        """Entries in the tree at ``name`` (itself included), stopping once past the limit."""
        if depth > MAX_DEPTH:
            raise FilesError(f"{where}: is nested deeper than {MAX_DEPTH} levels; delete it in parts", errno.E2BIG)
        fd = os.open(name, _READ_DIR, dir_fd=parent)
        total = 1
        try:
            with os.scandir(fd) as it:
                names = [e.name for e in it]
            for child in names:
                total += 1
                if total > DELETE_MAX:
                    return total
                st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    total += self._count(fd, child, depth + 1, where) - 1
        finally:
            _close(fd)
        return total

    def _rmtree(self, parent: int, name: str, depth: int) -> int:
        """Delete the directory ``name`` in ``parent`` with everything under it, fd-relative."""
        fd = os.open(name, _READ_DIR, dir_fd=parent)
        deleted = 0
        try:
            with os.scandir(fd) as it:
                names = [e.name for e in it]
            for child in names:
                st = os.stat(child, dir_fd=fd, follow_symlinks=False)
                if stat.S_ISDIR(st.st_mode):
                    deleted += self._rmtree(fd, child, depth + 1)
                else:
                    os.unlink(child, dir_fd=fd)
                    deleted += 1
        finally:
            _close(fd)
        os.rmdir(name, dir_fd=parent)
        return deleted + 1


def _exists(dfd: int, name: str) -> bool:
    """Whether ``name`` is in ``dfd`` (as anything, a link too); an error other than ENOENT says yes."""
    try:
        os.stat(name, dir_fd=dfd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # the action itself will report it
    return True


def _pread_all(fd: int, size: int, offset: int) -> bytes:
    chunks: list[bytes] = []
    got = 0
    while got < size:
        chunk = os.pread(fd, min(size - got, 1024 * 1024), offset + got)
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
