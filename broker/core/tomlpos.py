"""Where a config problem is written: ``FILE: KEY.PATH: message`` turned into ``FILE:LINE:COL: KEY.PATH: message``.

The parsers report a TOML problem by its file and key path (pydantic's
``loc``, :mod:`broker.core.servers`' ``servers.NAME.KEY``) or, for a syntax
error, by tomllib's ``(at line L, column C)``. An editor wants a line: this
module finds the line and column where a key path is written, with a small
scanner of (already valid) TOML that notes each table header, each key of a
key/value pair and each key of an inline table. It is not a TOML parser:
what it cannot follow, it leaves unlocated (the problem keeps its key path).

Standard library only (the admin CLI and the daemon use it).
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Callable

_BARE = re.compile(r"[A-Za-z0-9_-]+")
_AT = re.compile(r"^(?P<msg>.*) \(at line (?P<line>\d+), column (?P<col>\d+)\)$", re.DOTALL)
_AT_END = re.compile(r"^(?P<msg>.*) \(at end of document\)$", re.DOTALL)
_KEY_PATH = re.compile(r"[A-Za-z0-9_.\"'-]+")
_BELONGS = re.compile(r"^\[(?P<table>[A-Za-z0-9_-]+)\] belongs in ")

#: a key path as the problems spell it (dotted, each part as written), with the line and column of its key
Found = tuple[str, int, int]


class _Stop(Exception):
    """The scanner met what it does not follow: what was found so far stands."""


class _Scanner:
    def __init__(self, text: str) -> None:
        self.t = text
        self.i = 0
        self.n = len(text)
        self.starts = [0] + [m.end() for m in re.finditer("\n", text)]
        self.found: list[tuple[tuple[str, ...], int]] = []

    def at(self, offset: int) -> tuple[int, int]:
        line = bisect.bisect_right(self.starts, offset)
        return line, offset - self.starts[line - 1] + 1

    def peek(self, k: int = 1) -> str:
        return self.t[self.i : self.i + k]

    def blanks(self, newlines: bool = False) -> None:
        while self.i < self.n:
            ch = self.t[self.i]
            if ch in " \t\r" or (newlines and ch == "\n"):
                self.i += 1
            elif ch == "#" and newlines:
                end = self.t.find("\n", self.i)
                self.i = self.n if end < 0 else end
            else:
                return

    def key(self) -> tuple[str, ...]:
        parts: list[str] = []
        while True:
            self.blanks()
            ch = self.peek()
            if ch == '"':
                parts.append(self.basic())
            elif ch == "'":
                end = self.t.find("'", self.i + 1)
                if end < 0:
                    raise _Stop
                parts.append(self.t[self.i + 1 : end])
                self.i = end + 1
            else:
                m = _BARE.match(self.t, self.i)
                if m is None:
                    raise _Stop
                parts.append(m.group())
                self.i = m.end()
            self.blanks()
            if self.peek() != ".":
                return tuple(parts)
            self.i += 1

    def basic(self) -> str:
        """A one-line basic string (escapes kept undecoded but skipped)."""
        j = self.i + 1
        out = []
        while j < self.n and self.t[j] != '"':
            if self.t[j] == "\n":
                raise _Stop
            if self.t[j] == "\\":
                out.append(self.t[j : j + 2])
                j += 2
                continue
            out.append(self.t[j])
            j += 1
        if j >= self.n:
            raise _Stop
        self.i = j + 1
        return "".join(out)

    def value(self, prefix: tuple[str, ...]) -> None:
        for quote in ('"""', "'''"):
            if self.peek(3) == quote:
                end = self.t.find(quote, self.i + 3)
                while end >= 0 and quote == '"""' and _escaped(self.t, end):
                    end = self.t.find(quote, end + 1)
                if end < 0:
                    raise _Stop
                self.i = end + 3
                while self.peek() == quote[0]:  # up to two quotes may close the content
                    self.i += 1
                return
        ch = self.peek()
        if ch == '"':
            self.basic()
        elif ch == "'":
            end = self.t.find("'", self.i + 1)
            if end < 0:
                raise _Stop
            self.i = end + 1
        elif ch == "[":
            self.i += 1
            while True:
                self.blanks(newlines=True)
                if self.peek() == "]":
                    self.i += 1
                    return
                self.value(prefix)
                self.blanks(newlines=True)
                if self.peek() == ",":
                    self.i += 1
        elif ch == "{":
            self.i += 1
            while True:
                self.blanks()
                if self.peek() == "}":
                    self.i += 1
                    return
                start = self.i
                key = self.key()
                self.found.append((prefix + key, start))
                if self.peek() != "=":
                    raise _Stop
                self.i += 1
                self.blanks()
                self.value(prefix + key)
                self.blanks()
                if self.peek() == ",":
                    self.i += 1
        else:
            m = re.compile(r"[^,\]}#\n]*").match(self.t, self.i)
            assert m is not None
            if not m.group().strip():
                raise _Stop
            self.i = m.end()

    def document(self) -> None:
        table: tuple[str, ...] = ()
        while True:
            self.blanks(newlines=True)
            if self.i >= self.n:
                return
            start = self.i
            if self.peek() == "[":
                double = self.peek(2) == "[["
                self.i += 2 if double else 1
                table = self.key()
                if self.peek(2 if double else 1) != ("]]" if double else "]"):
                    raise _Stop
                self.i += 2 if double else 1
                self.found.append((table, start))
                continue
            key = self.key()
            self.found.append((table + key, start))
            if self.peek() != "=":
                raise _Stop
            self.i += 1
            self.blanks()
            self.value(table + key)


def _escaped(text: str, at: int) -> bool:
    backslashes = 0
    while at - backslashes - 1 >= 0 and text[at - backslashes - 1] == "\\":
        backslashes += 1
    return backslashes % 2 == 1


def keys(text: str) -> list[Found]:
    """Every key path ``text`` writes (as the problems spell them, dotted), with its line and column, in order."""
    scanner = _Scanner(text)
    try:
        scanner.document()
    except (_Stop, IndexError):
        pass
    out: list[Found] = []
    for path, offset in scanner.found:
        line, col = scanner.at(offset)
        out.append((".".join(path), line, col))
    return out


def find(text: str, key_path: str) -> tuple[int, int] | None:
    """Line and column of ``key_path`` in ``text``: the key itself, else its deepest table, else its first key."""
    found = keys(text)
    best: tuple[int, int, int] | None = None  # (depth, line, col)
    for path, line, col in found:
        if path == key_path:
            return line, col
        if key_path.startswith(path + ".") and (best is None or len(path) > best[0]):
            best = (len(path), line, col)
    if best is not None:
        return best[1], best[2]
    for path, line, col in found:
        if path.startswith(key_path + "."):
            return line, col
    return None


def _utf8_position(data: bytes) -> tuple[int, int] | None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        return line, exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
    return None


def locate(problem: str, files: list[str], read: Callable[[str], bytes | None]) -> str:
    """``problem`` (``FILE: ...``, one of ``files``) with the line and column it is at, when they can be found.

    ``read(FILE)`` gives the file's bytes (None: unknown). A problem whose
    place cannot be found is returned as it is.
    """
    for path in sorted(files, key=len, reverse=True):  # the longest first: no file name is cut short
        if problem.startswith(path + ": "):
            break
    else:
        return problem
    rest = problem[len(path) + 2 :]
    m = _AT.match(rest)
    if m is not None:
        return f"{path}:{m['line']}:{m['col']}: {m['msg']}"
    data = read(path)
    if data is None:
        return problem
    m = _AT_END.match(rest)
    if m is not None:
        lines = data.count(b"\n") + 1
        return f"{path}:{lines}:1: {m['msg']}"
    if rest.startswith("not valid UTF-8"):
        where = _utf8_position(data)
        return f"{path}:{where[0]}:{where[1]}: {rest}" if where else problem
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return problem
    belongs = _BELONGS.match(rest)
    key_path = belongs["table"] if belongs is not None else rest.partition(": ")[0]
    if not _KEY_PATH.fullmatch(key_path):
        return problem
    where = find(text, key_path)
    if where is None:
        return problem
    return f"{path}:{where[0]}:{where[1]}: {rest}"
