"""The allowlist: ``allowed-actions.txt`` and ``allowed-actions.d/USER.txt``.

The format is the one sysadmins already write: one ``server.tool`` per line,
``#`` comments on their own line or after whitespace. Entries are compared
as whole strings: no globs, prefixes, case folding, normalisation or fuzzy
matching. Like doas, the loader fails closed: the file and its directory
must be root-owned and not writable by group or other, the whole file is
parsed, and any error denies every call, each error reported as
``file:line:col: message``.

This module is on the gate's per-call path: standard library only, and only
modules the interpreter has loaded anyway or that are C builtins.
"""

from __future__ import annotations

# posix, not os: os costs about a millisecond to import, and this runs per call
import posix as os

from broker.core.errors import ConfigError
from broker.core.names import action_problem, valid_user_name

#: An allowlist larger than this is refused rather than parsed.
MAX_ALLOWLIST_BYTES = 16 * 1024 * 1024

_WS = " \t"


class Allowlist:
    """A parsed, valid allowlist: the allowed actions in file order."""

    __slots__ = ("_set", "actions", "path")

    def __init__(self, path: str, actions: list[str]) -> None:
        self.path = path
        self.actions = tuple(dict.fromkeys(actions))
        self._set = frozenset(self.actions)

    def allows(self, action: str) -> bool:
        """Whole-string membership; nothing else."""
        return action in self._set

    def servers(self) -> list[str]:
        """Server names the allowlist mentions, in order."""
        return list(dict.fromkeys(a.partition(".")[0] for a in self.actions))


def parse(text: str, path: str) -> tuple[list[str], list[str]]:
    """Parse allowlist text; return (actions, errors as ``path:line:col: msg``)."""
    actions: list[str] = []
    errors: list[str] = []
    lineno = 0
    for raw in text.split("\n"):
        lineno += 1
        line = raw[:-1] if raw.endswith("\r") else raw
        stripped = line.lstrip(_WS)
        if not stripped or stripped[0] == "#":
            continue
        indent = len(line) - len(stripped)
        end = len(stripped)
        for i, ch in enumerate(stripped):
            if ch in _WS:
                end = i
                break
        entry = stripped[:end]
        rest = stripped[end:].lstrip(_WS)
        if rest and rest[0] != "#":
            col = indent + len(stripped) - len(rest) + 1
            errors.append(f"{path}:{lineno}:{col}: unexpected text after the entry (one server.tool per line)")
            continue
        problem = action_problem(entry)
        if problem is not None:
            errors.append(f"{path}:{lineno}:{indent + problem[0] + 1}: {problem[1]}")
            continue
        actions.append(entry)
    return actions, errors


def _check_owner(st: os.stat_result, path: str, what: str) -> None:
    if st.st_uid != 0:
        raise ConfigError(f"{path}: {what} must be owned by root (owner uid is {st.st_uid}); denying every call")
    if st.st_mode & 0o022:
        raise ConfigError(
            f"{path}: {what} is writable by group or other (mode {st.st_mode & 0o7777:04o}); denying every call"
        )


def _open_dir(path: str, missing_ok: bool) -> int | None:
    try:
        fd = os.open(path, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)  # O_PATH: traversal right suffices
    except FileNotFoundError:
        if missing_ok:
            return None
        raise ConfigError(f"{path}: directory missing; denying every call") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open directory: {exc.strerror}; denying every call") from None
    try:
        _check_owner(os.fstat(fd), path, "directory")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_checked(dir_fd: int, name: str, path: str) -> tuple[bytes, os.stat_result] | None:
    """Read ``name`` in ``dir_fd`` after fstat checks; None when it does not exist."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open: {exc.strerror}; denying every call") from None
    try:
        st = os.fstat(fd)
        if st.st_mode & 0o170000 != 0o100000:  # S_ISREG
            raise ConfigError(f"{path}: not a regular file; denying every call")
        _check_owner(st, path, "file")
        if st.st_size > MAX_ALLOWLIST_BYTES:
            raise ConfigError(f"{path}: larger than {MAX_ALLOWLIST_BYTES} bytes; denying every call")
        chunks = []
        total = 0
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > MAX_ALLOWLIST_BYTES:
                raise ConfigError(f"{path}: larger than {MAX_ALLOWLIST_BYTES} bytes; denying every call")
            chunks.append(chunk)
        return b"".join(chunks), st
    finally:
        os.close(fd)


def locate(allowlist: str, allowlist_d: str, user: str) -> tuple[bytes, str, os.stat_result]:
    """Find and read the caller's allowlist with every ownership check.

    ``allowed-actions.d/USER.txt`` replaces the global file for USER. Returns
    the raw bytes, the path they came from and their stat.
    """
    if not valid_user_name(user):
        raise ConfigError(f"caller name {user!r} cannot name an allowlist; denying every call")
    d_fd = _open_dir(allowlist_d, missing_ok=True)
    if d_fd is not None:
        try:
            found = _read_checked(d_fd, user + ".txt", f"{allowlist_d}/{user}.txt")
        finally:
            os.close(d_fd)
        if found is not None:
            return found[0], f"{allowlist_d}/{user}.txt", found[1]
    parent, _, name = allowlist.rpartition("/")
    p_fd = _open_dir(parent or "/", missing_ok=False)
    assert p_fd is not None
    try:
        found = _read_checked(p_fd, name, allowlist)
    finally:
        os.close(p_fd)
    if found is None:
        raise ConfigError(f"{allowlist}: missing; denying every call")
    return found[0], allowlist, found[1]


def _stat_part(path: str) -> tuple[int, ...] | None:
    try:
        st = os.stat(path, follow_symlinks=False)
    except (OSError, ValueError):  # ValueError: a NUL in the path
        return None
    return (st.st_dev, st.st_ino, st.st_mode, st.st_uid, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def stat_key(allowlist: str, allowlist_d: str, user: str) -> tuple[object, ...]:
    """What :func:`locate` would read, as (l)stat identities, without opening anything.

    Equal keys mean the same files with the same owner, mode and content
    (any write or chmod moves ctime), so a caller that ran the full
    :func:`locate` checks for a key may reuse that verdict while the key
    holds. A change anywhere (or a missing part) means: run :func:`locate`.
    """
    parent = allowlist.rpartition("/")[0] or "/"
    return (
        _stat_part(allowlist_d),
        _stat_part(f"{allowlist_d}/{user}.txt"),
        _stat_part(parent),
        _stat_part(allowlist),
    )


class Cache:
    """Parsed allowlists per caller, reused while :func:`stat_key` holds, otherwise read in full.

    A read that fails (any :func:`locate` or parse error) is never cached, so
    a broken file denies every call until it is fixed.
    """

    def __init__(self, allowlist: str, allowlist_d: str) -> None:
        self.allowlist = allowlist
        self.allowlist_d = allowlist_d
        self._entries: dict[str, tuple[tuple[object, ...], Allowlist]] = {}

    def get(self, user: str) -> Allowlist:
        # the identities are taken before the full read: a change racing the read moves them again
        key = stat_key(self.allowlist, self.allowlist_d, user)
        hit = self._entries.get(user)
        if hit is not None and hit[0] == key:
            return hit[1]
        data, path, _st = locate(self.allowlist, self.allowlist_d, user)
        parsed = from_bytes(data, path)
        if len(self._entries) > 4096:
            self._entries.clear()
        self._entries[user] = (key, parsed)
        return parsed


def decode(data: bytes, path: str) -> str:
    """Decode as strict UTF-8, reporting the line and column of a bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(f"{path}:{line}:{col}: not valid UTF-8; denying every call") from None


def from_bytes(data: bytes, path: str) -> Allowlist:
    """Parse raw allowlist bytes; any error raises ConfigError with all of them."""
    actions, errors = parse(decode(data, path), path)
    if errors:
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(f"{errors[0]}{more}; denying every call", errors)
    return Allowlist(path, actions)


def load(allowlist: str, allowlist_d: str, user: str) -> Allowlist:
    """Load and fully validate the allowlist that applies to ``user``."""
    data, path, _st = locate(allowlist, allowlist_d, user)
    return from_bytes(data, path)


def contains_line(data: bytes, action: str) -> bool:
    """Whether already-validated allowlist bytes hold ``action`` as an entry.

    Runs at C speed for large files: find each occurrence, then require that
    only blanks stand between it and the start of its line (so it is not in
    a comment) and that a blank, ``\\r`` or the line end follows it.
    """
    needle = action.encode()
    start = 0
    n = len(needle)
    while True:
        i = data.find(needle, start)
        if i < 0:
            return False
        start = i + 1
        after = data[i + n : i + n + 1]
        if after not in (b"", b"\n", b"\r", b" ", b"\t"):
            continue
        line_start = data.rfind(b"\n", 0, i) + 1
        if not data[line_start:i].strip(b" \t"):
            return True


def check_all(allowlist: str, allowlist_d: str) -> list[str]:
    """Every problem in the global allowlist, the per-user directory and its files."""
    problems: list[str] = []
    parent, _, name = allowlist.rpartition("/")
    checks: list[tuple[str, str, str]] = [(parent or "/", name, allowlist)]
    try:
        d_fd = _open_dir(allowlist_d, missing_ok=True)
    except ConfigError as exc:
        problems.extend(exc.problems)
        d_fd = None
    if d_fd is not None:
        os.close(d_fd)
        for entry in sorted(os.listdir(allowlist_d)):
            if entry.endswith(".txt"):
                if not valid_user_name(entry[:-4]):
                    problems.append(f"{allowlist_d}/{entry}: not a valid user name; this file is never used")
                checks.append((allowlist_d, entry, f"{allowlist_d}/{entry}"))
    for directory, entry, path in checks:
        try:
            dfd = _open_dir(directory, missing_ok=False)
            assert dfd is not None
            try:
                found = _read_checked(dfd, entry, path)
            finally:
                os.close(dfd)
            if found is None:
                raise ConfigError(f"{path}: missing; denying every call")
            from_bytes(found[0], path)
        except ConfigError as exc:
            problems.extend(exc.problems)
    return problems
