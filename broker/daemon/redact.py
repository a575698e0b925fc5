"""Replace every secret the broker knows, in its common encodings, before it leaves.

Known secrets are the values of each server's env file and of its injected
headers (never its plain ``env`` settings). This is a net for accidents: an
error message that echoes a token, a debug dump of a request. It cannot stop
a malicious server from leaking its own secret (it can encrypt it, spell it
out, or spread it over many calls); compartments are the defence for that.

How it works, in two steps, so that the common case (no secret anywhere)
costs a few substring searches:

* **Detect.** A text is looked at through a few *views*, each made at C
  speed: as is; percent-decoded (any case, partial); with JSON/C escapes
  (``\\u0041``, ``\\x41``, ``\\/``) and HTML character references decoded;
  each of those with whitespace, escaped newlines and zero-width characters
  removed (wrapped base64, a secret split over two blocks joined by a
  newline) and with hex separators and ``0x``/``\\x`` prefixes removed
  (``de:ad:be:ef``, ``0xde 0xad``). Each view is searched for the secret's
  forms: as is, hex, and base64/base64url at all three byte alignments
  (the part of the encoding that depends on the secret alone).
* **Locate.** Only for a secret detected, one pattern per secret finds its
  spans in the original text: each character as is or in any of those
  escapes, separators and whitespace allowed between characters, hex with
  separators, base64 with line breaks. A detected secret the pattern cannot
  place (encodings nested in ways it does not model) blanks the whole value:
  fail closed.

The marker is :data:`MARKER`, the same for every secret, so a result never
says *which* secret matched (that would confirm an agent's guess); the names
found are collected for the audit record instead. Numbers are looked at as
their decimal text. :meth:`Redactor.joint` looks across the values of one
result too, so a secret split between two content blocks is caught.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote, unquote_plus

#: shorter values would redact ordinary words; `check` warns about short ones above this too
MIN_SECRET_LENGTH = 6
#: what replaces a secret: it names no secret (the audit record does, for the operator)
MARKER = "[REDACTED]"

#: characters that may sit between a secret's characters and still read as the secret
_SOFT = "\\s\u200b\u200c\u200d\u2060\ufeff\u00ad"
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\x([0-9a-fA-F]{2})|\\U([0-9a-fA-F]{8})|\\([/\"'\\])")
_SEP = f"(?:[{_SOFT}]|\\\\[nrt])*"
_HEX_SEP = r"(?:[\s:,;.\-_|/\\]{0,3}(?:0[xX]|\\[xX])?)"


def _unescape(text: str) -> str:
    def one(m: re.Match[str]) -> str:
        if m.group(4) is not None:
            return m.group(4)
        return chr(int(m.group(1) or m.group(2) or m.group(3), 16))

    out = _ESCAPE.sub(one, text)
    try:  # \ud83d\ude00: a surrogate pair written as two escapes is one character
        return out.encode("utf-16", "surrogatepass").decode("utf-16")
    except UnicodeError:
        return out


#: what the "soft" views drop: whitespace and invisible characters (one C-speed translate)
_SOFT_TABLE = str.maketrans(dict.fromkeys(" \t\n\r\f\v\u200b\u200c\u200d\u2060\ufeff\u00ad\u00a0\u2028\u2029"))
#: what the hex views drop besides 0x and \\x prefixes
_HEX_TABLE = str.maketrans(dict.fromkeys(" \t\n\r\f\v:,;.-_|/\\"))


def _soft(text: str) -> str:
    if "\\" in text:
        text = text.replace("\\n", "").replace("\\r", "").replace("\\t", "")
    return text.translate(_SOFT_TABLE)


def _hexview(text: str) -> str:
    if "x" in text or "X" in text:
        text = text.replace("0x", "").replace("0X", "").replace("\\x", "").replace("\\X", "")
    return text.translate(_HEX_TABLE).lower()


def views(text: str) -> tuple[list[str], list[str]]:
    """(the text as a reader of each common encoding reads it, whitespace and invisible characters dropped;
    the same with hex separators dropped instead).

    Dropping whitespace loses nothing for detection: a text holding a value
    holds the value without its whitespace once both are squeezed alike.
    """
    base = [text]
    if "%" in text or "+" in text:
        base.append(unquote(text, errors="replace"))
        if "+" in text:
            base.append(unquote_plus(text, errors="replace"))
    if "\\" in text:
        base.append(_unescape(text))
    if "&" in text:
        base.append(html.unescape(text))
    return [_soft(b) for b in base], [_hexview(b) for b in base]


def trie_pattern(words: Iterable[str]) -> re.Pattern[str] | None:
    """One pattern matching any of ``words``, factored by prefix: the engine tries one branch per character.

    A plain alternation of a hundred forms costs a hundred comparisons at
    every position of a megabyte; this costs about one. A word that is a
    prefix of another ends the branch (finding it is enough).
    """
    root: dict[str, Any] = {}
    for word in words:
        node = root
        for ch in word:
            node = node.setdefault(ch, {})
        node[""] = {}

    def pattern(node: dict[str, Any]) -> str:
        if "" in node:
            return ""
        alts = [re.escape(ch) + pattern(child) for ch, child in sorted(node.items())]
        return alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"

    return re.compile(pattern(root)) if root else None


def _base64_cores(value: bytes) -> set[str]:
    """Substrings that appear in any base64 stream that contains ``value``, at each byte alignment."""
    cores: set[str] = set()
    for shift in range(3):
        padded = b"\0" * shift + value
        text = base64.b64encode(padded).decode().rstrip("=")
        # drop characters that also depend on bytes before or after the value
        start = (shift * 8 + 5) // 6 if shift else 0
        end = (len(padded) * 8) // 6
        core = text[start:end]
        if len(core) >= MIN_SECRET_LENGTH:
            cores.add(core)
    return cores


def _hex_class(nibble: int) -> str:
    digit = f"{nibble:x}"
    return f"[{digit}{digit.upper()}]" if digit.isalpha() else digit


def _char_pattern(ch: str) -> str:
    """One character of a secret as is, percent-encoded, JSON/C-escaped or as an HTML reference."""
    alts = [re.escape(ch)]
    alts.append("".join(f"%{_hex_class(b >> 4)}{_hex_class(b & 15)}" for b in ch.encode()))
    code = ord(ch)
    if code < 0x10000:
        alts.append("\\\\u" + "".join(_hex_class((code >> s) & 15) for s in (12, 8, 4, 0)))
    else:
        units = ch.encode("utf-16-be")
        hi, lo = int.from_bytes(units[:2], "big"), int.from_bytes(units[2:], "big")
        alts.append("".join("\\\\u" + "".join(_hex_class((u >> s) & 15) for s in (12, 8, 4, 0)) for u in (hi, lo)))
    if code < 0x100:
        alts.append(f"\\\\[xX]{_hex_class(code >> 4)}{_hex_class(code & 15)}")
    alts.append(f"&#0*{code};")
    alts.append("&#[xX]0*" + "".join(_hex_class(int(d, 16)) for d in f"{code:x}") + ";")
    if ch == " ":
        alts.append(r"\+")
    if ch in "/\"'\\":
        alts.append(re.escape("\\" + ch))
    return "(?:" + "|".join(alts) + ")"


def _b64_char(ch: str) -> str:
    return {"+": "[+-]", "/": "[/_]"}.get(ch, ch)


def locator(value: str) -> re.Pattern[str]:
    """The pattern that finds ``value``'s spans in a text, in every encoding :func:`views` detects."""
    raw = value.encode()
    alts = [_SEP.join(_char_pattern(c) for c in value)]
    pairs = [f"{_hex_class(b >> 4)}{_hex_class(b & 15)}" for b in raw]
    alts.append(r"(?:0[xX]|\\[xX])?" + _HEX_SEP.join(pairs))
    for core in sorted(_base64_cores(raw)):
        alts.append(_SEP.join(_b64_char(c) for c in core))
    return re.compile("|".join(alts))


class _Secret:
    """One named secret: its detection forms and (made on first need) its locating pattern."""

    __slots__ = ("_locator", "b64", "hex", "name", "plain", "value")

    def __init__(self, name: str, value: str) -> None:
        self.name = name
        self.value = value
        raw = value.encode()
        self.plain = {_soft(value)}  # detection reads squeezed views (see views())
        self.hex = raw.hex()
        cores = _base64_cores(raw)
        self.b64 = cores | {c.replace("+", "-").replace("/", "_") for c in cores}
        self._locator: re.Pattern[str] | None = None

    @property
    def locate(self) -> re.Pattern[str]:
        if self._locator is None:
            self._locator = locator(self.value)
        return self._locator

    def seen_in(self, readable: list[str], hexes: list[str]) -> bool:
        forms = (*self.plain, *self.b64)
        return any(f in v for v in readable for f in forms) or any(self.hex in v for v in hexes)


class Redactor:
    """Redacts a fixed set of named secrets; cheap when there are none, or none in the text.

    Every method takes ``hits``, a set the names of the secrets found are
    added to (for the audit record); the output only ever says :data:`MARKER`.
    """

    def __init__(self, secrets: dict[str, str]) -> None:
        by_value: dict[str, str] = {}
        for name, value in secrets.items():
            if len(value) >= MIN_SECRET_LENGTH and len(_soft(value)) >= MIN_SECRET_LENGTH:
                by_value.setdefault(value, name)  # one value under two names: the first name is recorded
        self._secrets = [_Secret(name, value) for value, name in by_value.items()]
        # one search per view finds whether any secret is there at all (the common answer is no)
        self._any_readable = trie_pattern(f for x in self._secrets for f in (*x.plain, *x.b64))
        self._any_hex = trie_pattern(x.hex for x in self._secrets)

    def __bool__(self) -> bool:
        return bool(self._secrets)

    def detect(self, text: str) -> list[_Secret]:
        """The secrets that some view of ``text`` holds."""
        if self._any_readable is None or self._any_hex is None or len(text) < MIN_SECRET_LENGTH:
            return []
        readable, hexes = views(text)
        if not any(self._any_readable.search(v) for v in readable) and not any(self._any_hex.search(v) for v in hexes):
            return []
        return [s for s in self._secrets if s.seen_in(readable, hexes)]

    def holds(self, value: Any) -> bool:
        """Whether a JSON-like value holds any known secret anywhere (one detection pass over all of it)."""
        return bool(self._secrets) and bool(self.detect(_joined(value)))

    def found(self, value: Any) -> set[str]:
        """The names of the secrets anywhere in a JSON-like value (keys, strings, numbers; across values)."""
        if not self._secrets:
            return set()
        return {s.name for s in self.detect(_joined(value))}

    def text(self, value: str, hits: set[str] | None = None) -> str:
        found = self.detect(value)
        if not found:
            return value
        return self._locate_all(value, found, hits)

    def _locate_all(self, value: str, found: list[_Secret], hits: set[str] | None) -> str:
        spans: list[tuple[int, int]] = []
        for secret in found:
            if hits is not None:
                hits.add(secret.name)
            spans.extend(m.span() for m in secret.locate.finditer(value) if m.end() > m.start())
        out = _replace(value, spans)
        if self.detect(out):  # an encoding the locator cannot place: fail closed
            return MARKER
        return out

    def deep(self, value: Any, hits: set[str] | None = None) -> Any:
        """Every string (keys included) and number inside a JSON-like value, redacted value by value."""
        if not self._secrets or not self.detect(_joined(value)):
            return value
        return self._deep(value, hits)

    def _deep(self, value: Any, hits: set[str] | None) -> Any:
        if isinstance(value, str):
            return self.text(value, hits)
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int | float):
            shown = self.text(str(value), hits)
            return value if shown == str(value) else shown
        if isinstance(value, list):
            return [self._deep(v, hits) for v in value]
        if isinstance(value, dict):
            return {(self.text(k, hits) if isinstance(k, str) else k): self._deep(v, hits) for k, v in value.items()}
        return value

    def joint(self, strings: list[str], hits: set[str] | None = None) -> list[str]:
        """``strings`` (already redacted one by one) redacted as one text too: a secret split across them goes.

        They are read joined by a newline, the way ``mcp call`` prints a
        result's blocks; the spans found are cut out of each piece they cover.
        """
        if len(strings) < 2 or not self._secrets:
            return strings
        joined = "\n".join(strings)
        found = self.detect(joined)
        if not found:
            return strings
        spans: list[tuple[int, int]] = []
        for secret in found:
            if hits is not None:
                hits.add(secret.name)
            spans.extend(m.span() for m in secret.locate.finditer(joined) if m.end() > m.start())
        out: list[str] = []
        start = 0
        for piece in strings:
            end = start + len(piece)
            inside = [(max(a, start) - start, min(b, end) - start) for a, b in spans if a < end and b > start]
            out.append(_replace(piece, inside))
            start = end + 1
        if self.detect("\n".join(out)):  # not placeable: every piece goes
            return [MARKER for _ in strings]
        return out


def _replace(value: str, spans: Iterable[tuple[int, int]]) -> str:
    """``value`` with each span (merged where they touch) replaced by one marker."""
    merged: list[list[int]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    if not merged:
        return value
    parts: list[str] = []
    last = 0
    for a, b in merged:
        parts.append(value[last:a])
        parts.append(MARKER)
        last = b
    parts.append(value[last:])
    return "".join(parts)


def _joined(value: Any) -> str:
    """Every key, string and number of a JSON-like value, one per line (what detection reads)."""
    parts: list[str] = []
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            parts.append(item)
        elif isinstance(item, bool) or item is None:
            continue
        elif isinstance(item, int | float):
            parts.append(str(item))
        elif isinstance(item, list):
            stack.extend(reversed(item))
        elif isinstance(item, dict):
            for k, v in reversed(list(item.items())):
                stack.append(v)
                stack.append(k)
    return "\n".join(parts)
