"""JSON in and out for every side of the broker: one codec that cannot fail on hostile data.

``import json`` compiles regular expressions at import time, which the gate
cannot afford on every agent call, so this module drives ``_json``'s encoder
and scanner directly, with their error path: the C scanner reports a syntax
error by constructing ``json.decoder.JSONDecodeError``, which it looks up in
``sys.modules`` only; in a process that never imported ``json`` that lookup
fails and the scanner returns NULL without an exception (a ``SystemError``).
:func:`loads` therefore provides the module for the length of the scan.

What it promises:

* :func:`loads` parses exactly one strict JSON value (no NaN or Infinity,
  nothing after it) or raises ``ValueError``; a number too large for a
  float raises :class:`broker.core.errors.NonFiniteNumber` (a ValueError),
  or, with ``out_of_range="mark"``, becomes :data:`OUT_OF_RANGE` so a
  caller can refuse just the request that holds it;
* :func:`dumps` writes compact JSON (non-ASCII kept as UTF-8) and refuses
  non-finite numbers; :func:`to_utf8` encodes its text with any lone
  surrogate replaced by U+FFFD, so encoding never fails;
* :func:`sanitize` makes a value from an untrusted peer encodable: lone
  surrogates replaced, non-finite numbers replaced by ``null``, and says
  how many of each it replaced.
"""

from __future__ import annotations

import _json
import sys

from broker.core.errors import NonFiniteNumber

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; the gate never needs it
    from collections.abc import Callable
    from typing import Any, ClassVar


class _OutOfRange:
    """The value of a JSON number too large for a float, when the caller asked to see it."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "OUT_OF_RANGE"


OUT_OF_RANGE = _OutOfRange()


def _no_default(obj: object) -> object:
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# non-ASCII stays as UTF-8 (at most 4 bytes a character, not 12 as \ud83d\ude00 escapes)
_encode = _json.make_encoder(None, _no_default, _json.encode_basestring, None, ":", ",", False, False, False)


def _finite(text: str) -> float:
    value = float(text)
    if value - value != 0.0:  # inf - inf is nan; only finite numbers give 0
        raise NonFiniteNumber(f"number {text[:40]} is out of range")
    return value


def _finite_or_mark(text: str) -> object:
    value = float(text)
    return value if value - value == 0.0 else OUT_OF_RANGE


def _constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


class _Strict:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float: Callable[[str], object] = staticmethod(_finite)
    parse_int = int
    parse_constant = staticmethod(_constant)
    memo: ClassVar[dict[str, Any]] = {}


class _Marking(_Strict):
    parse_float = staticmethod(_finite_or_mark)


# typeshed wants a JSONDecoder; any object with these attributes is what the C scanner reads
_scan_strict = _json.make_scanner(_Strict())  # type: ignore[arg-type]
_scan_marking = _json.make_scanner(_Marking())  # type: ignore[arg-type]
_WS = " \t\n\r"


class _DecodeError(ValueError):
    """What the C scanner raises for a syntax error (it calls it with msg, doc, pos)."""

    def __init__(self, msg: str, doc: str, pos: int) -> None:
        super().__init__(f"{msg} at character {pos}")


_decoder_stand_in = type(sys)("json.decoder")
_decoder_stand_in.JSONDecodeError = _DecodeError  # type: ignore[attr-defined]


def loads(text: str, out_of_range: str = "raise") -> Any:
    """Parse exactly one JSON value; raise ValueError otherwise (see the module docstring)."""
    scan = _scan_marking if out_of_range == "mark" else _scan_strict
    n = len(text)
    i = 0
    while i < n and text[i] in _WS:
        i += 1
    modules = sys.modules
    stand_in = "json.decoder" not in modules
    if stand_in:
        modules["json.decoder"] = _decoder_stand_in
    try:
        value, end = scan(text, i)
    except StopIteration as exc:
        raise ValueError(f"invalid JSON at character {exc.value}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    finally:
        if stand_in and modules.get("json.decoder") is _decoder_stand_in:
            del modules["json.decoder"]
    while end < n and text[end] in _WS:
        end += 1
    if end != n:
        raise ValueError(f"extra data after JSON value at character {end}")
    return value


def dumps(obj: object) -> str:
    """Compact JSON; NaN and infinities are refused (ValueError)."""
    return "".join(_encode(obj, 0))


def to_utf8(text: str) -> bytes:
    """UTF-8 of ``text``, any lone surrogate replaced by U+FFFD (never fails)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # a str holds surrogates only unpaired: UTF-16 with surrogatepass, decoded with replace, fixes exactly those
        return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace").encode("utf-8")


def contains(value: object, marker: object) -> bool:
    """Whether ``marker`` (e.g. :data:`OUT_OF_RANGE`) occurs anywhere inside a parsed JSON value."""
    if value is marker:
        return True
    if isinstance(value, list):
        return any(contains(v, marker) for v in value)
    if isinstance(value, dict):
        return any(contains(v, marker) for v in value.values())
    return False


def sanitize(value: Any) -> tuple[Any, dict[str, int]]:
    """(an encodable copy of ``value``, what was replaced: ``{"surrogates": n, "non_finite": m}``).

    The fast path is one encoding attempt: a clean value comes back as it is.
    """
    try:
        dumps(value).encode("utf-8")
        return value, {}
    except (ValueError, UnicodeEncodeError):
        pass
    counts = {"surrogates": 0, "non_finite": 0}
    return _clean(value, counts), {k: v for k, v in counts.items() if v}


def _clean(value: Any, counts: dict[str, int]) -> Any:
    if isinstance(value, str):
        fixed = to_utf8(value).decode("utf-8")
        if fixed != value:
            counts["surrogates"] += 1
        return fixed
    if isinstance(value, float) and value - value != 0.0:
        counts["non_finite"] += 1
        return None
    if isinstance(value, list):
        return [_clean(v, counts) for v in value]
    if isinstance(value, dict):
        return {_clean(str(k), counts): _clean(v, counts) for k, v in value.items()}
    if value is OUT_OF_RANGE:
        counts["non_finite"] += 1
        return None
    return value
