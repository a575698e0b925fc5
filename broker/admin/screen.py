"""What ``mcp-brokerctl`` shows of text an agent or an MCP server sent: defanged, visible and bounded.

An approval's arguments, a tool's name and description, a server's error,
an audit record's caller and reason all come from parties the operator must
not trust, and they reach a terminal. Raw, they can colour or hide text and
move the cursor (CSI), write the clipboard (OSC 52), plant links (OSC 8),
overwrite a line (a bare CR, backspaces), reorder what is read (bidi
overrides), hide characters (zero-width and other format characters), pass
a homoglyph off as a name (a Cyrillic ``\u0430`` in ``p\u0430th``) or push the one
argument that matters 200,000 columns to the right. Every admin command
prints such text through this module, and only through it:

* :func:`text` for a value: control characters become ``\\x1b``-style
  escapes (``\\n``, ``\\t``, ``\\r`` by name), invisible and direction-changing
  characters ``<U+202E>``; past ``limit`` columns it is cut, saying so;
* :func:`name` for an identifier (a caller, a tool, an argument key): the
  same, and every non-ASCII character spelt ``<U+0430>`` with a
  ``[non-ASCII]`` flag, so no two different names can look alike;
* :func:`kv_lines` for arguments: one aligned ``key = value`` line each.

It changes how a value is shown, never what is stored, compared or sent,
and it is not an encoder to parse back: a value that holds the four
characters ``\\x1b`` looks like one that held an ESC (a name cannot: its
backslashes and ``<`` are escaped too). JSON output is not its job either:
``json.dumps(..., ensure_ascii=True)`` escapes everything there.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Callable

#: the flag after a name that holds any non-ASCII character
NON_ASCII = " [non-ASCII]"
#: what a cut note tells the reader, unless the command says otherwise
MORE = "--full shows all"

_NAMED = {"\n": "\\n", "\t": "\\t", "\r": "\\r"}
#: format, surrogate, private-use, unassigned, line and paragraph separators, spaces other than U+0020
_HIDDEN_CATEGORIES = frozenset({"Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
#: characters of other categories that show as nothing (or blank): fillers, braille blank, joiners, selectors
_BLANK = frozenset(
    [
        *(0x034F, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180B, 0x180C, 0x180D, 0x180E, 0x180F, 0x2800, 0x3164, 0xFFA0),
        *range(0xFE00, 0xFE10),
        *range(0xE0100, 0xE01F0),
    ]
)
#: every character that is not printable ASCII: the only ones that may need an escape
_SPECIAL = re.compile(r"[^\x20-\x7e]")
#: in a name, also the space (``path `` and ``path``), and the two characters an escape starts with
_NAME_SPECIAL = re.compile(r"[^\x21-\x3b\x3d-\x5b\x5d-\x7e]")


def _control(ch: str) -> str | None:
    """``\\x1b`` for a C0 or C1 control character or DEL, ``\\n`` for a newline; None for anything else."""
    code = ord(ch)
    if code < 0x20 or 0x7F <= code <= 0x9F:
        return _NAMED.get(ch) or f"\\x{code:02x}"
    return None


def _codepoint(ch: str) -> str:
    return f"<U+{ord(ch):04X}>"


def hidden(ch: str) -> bool:
    """Whether ``ch`` would not show as itself: invisible, blank, direction-changing, or no character at all."""
    code = ord(ch)
    return code in _BLANK or (code >= 0x80 and unicodedata.category(ch) in _HIDDEN_CATEGORIES)


def _text_escape(ch: str) -> str:
    control = _control(ch)
    if control is not None:
        return control
    return _codepoint(ch) if hidden(ch) else ch


def _name_escape(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    control = _control(ch)
    return control if control is not None else _codepoint(ch)


def _render(value: str, pattern: re.Pattern[str], escape: Callable[[str], str], limit: int | None) -> tuple[str, int]:
    """``value`` with what ``pattern`` matches escaped, at most ``limit`` columns; and how many characters it shows."""
    out: list[str] = []
    used = 0
    pos = 0
    for m in pattern.finditer(value):
        plain = value[pos : m.start()]
        if limit is not None and used + len(plain) > limit:
            out.append(plain[: limit - used])
            return "".join(out), pos + limit - used
        out.append(plain)
        used += len(plain)
        shown = escape(m.group())
        if limit is not None and used + len(shown) > limit:
            return "".join(out), m.start()
        out.append(shown)
        used += len(shown)
        pos = m.end()
    rest = value[pos:]
    if limit is not None and used + len(rest) > limit:
        out.append(rest[: limit - used])
        return "".join(out), pos + limit - used
    out.append(rest)
    return "".join(out), len(value)


def _cut_note(shown: int, total: int, more: str) -> str:
    return f"... [cut: {shown:,} of {total:,} characters; {more}]"


def text(value: object, limit: int = 200, full: bool = False, more: str = MORE) -> str:
    """A value as one line that shows what it holds: escaped where it would hide or act, cut after ``limit`` columns.

    A value that is not a string is shown as ``str(value)``. The cut, unless
    ``full``, is at ``limit`` columns of the shown text (escapes count at
    their length), and is followed by a note saying how much of the value is
    shown and ``more`` (how to see it all).
    """
    value = value if isinstance(value, str) else str(value)
    shown, consumed = _render(value, _SPECIAL, _text_escape, None if full else max(limit, 0))
    if consumed < len(value):
        return shown + _cut_note(consumed, len(value), more)
    return shown


def line(value: object, limit: int = 500, full: bool = False, more: str = MORE) -> str:
    """A whole line someone else wrote (a server's reason, an error, a rule's explanation): :func:`text`, longer."""
    return text(value, limit, full, more)


def lines(value: object, limit: int = 500, full: bool = False, more: str = MORE) -> list[str]:
    """Multi-line text someone else wrote (a diff, a message), one :func:`line` per line of it."""
    value = value if isinstance(value, str) else str(value)
    return [line(part, limit, full, more) for part in value.split("\n")]


def name(value: object, limit: int = 200, full: bool = False, more: str = MORE) -> str:
    """An identifier that cannot pass for another: escaped like :func:`text`, every non-ASCII character too.

    ``p\u0430th`` (a Cyrillic ``\u0430``) reads ``p<U+0430>th [non-ASCII]``. Spaces,
    ``<`` and backslashes are escaped as well, so the shown form of a name is
    never the shown form of another.
    """
    value = value if isinstance(value, str) else str(value)
    shown, consumed = _render(value, _NAME_SPECIAL, _name_escape, None if full else max(limit, 0))
    if consumed < len(value):
        shown += _cut_note(consumed, len(value), more)
    return shown if value.isascii() else shown + NON_ASCII


def value_text(value: object, limit: int = 200, full: bool = False, more: str = MORE) -> str:
    """An argument's value: a string as :func:`text`, anything else as its JSON, through :func:`text`."""
    if not isinstance(value, str):
        value = json.dumps(value, ensure_ascii=False, default=str)
    return text(value, limit, full, more)


#: the widest key column :func:`kv_lines` aligns to (a longer key pushes only its own value)
KEY_WIDTH = 32


def kv_lines(args: object, full: bool = False, limit: int = 200, max_items: int = 100, more: str = MORE) -> list[str]:
    """Arguments as ``key = value`` lines, one each, keys (:func:`name`) aligned, values (:func:`value_text`) cut.

    So nothing hides behind padding: a 200 KB value is cut at ``limit``
    columns and the next argument starts a line of its own. Unless ``full``,
    at most ``max_items`` lines and a note saying how many more there are.
    Arguments that are not an object are shown as one value.
    """
    if not isinstance(args, dict):
        return [f"(not an object) {value_text(args, limit, full, more)}"]
    items = list(args.items())
    shown = items if full else items[:max_items]
    keys = [name(k, 64, full, more) for k, _ in shown]
    width = min(max((len(k) for k in keys), default=0), KEY_WIDTH)
    out = [f"{k:<{width}} = {value_text(v, limit, full, more)}" for k, (_, v) in zip(keys, shown, strict=True)]
    if len(shown) < len(items):
        out.append(f"... [{len(items) - len(shown):,} more arguments; {more}]")
    return out
