"""JSON in and out for every side of the broker, through the C accelerator.

``import json`` compiles regular expressions at import time, which the gate
cannot afford on every agent call, so this module drives ``_json``'s encoder
and scanner directly. ``loads`` parses exactly one strict JSON value (no
NaN or Infinity) and raises ``ValueError`` for anything else; ``dumps``
writes compact JSON with non-ASCII kept as UTF-8.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False
if TYPE_CHECKING:  # typing costs milliseconds to import; the gate never needs it
    from typing import Any, ClassVar


def _no_default(obj: object) -> object:
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# non-ASCII stays as UTF-8 (at most 4 bytes a character, not 12 as \ud83d\ude00 escapes)
_encode = _json.make_encoder(None, _no_default, _json.encode_basestring, None, ":", ",", False, False, False)


class _ScanContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: ClassVar[dict[str, Any]] = {}

    @staticmethod
    def parse_constant(name: str) -> object:
        raise ValueError(f"{name} is not valid JSON")


# typeshed wants a JSONDecoder; any object with these attributes is what the C scanner reads
_scan = _json.make_scanner(_ScanContext())  # type: ignore[arg-type]
_WS = " \t\n\r"


def dumps(obj: object) -> str:
    """Compact JSON; NaN and infinities are refused."""
    return "".join(_encode(obj, 0))


def loads(text: str) -> Any:
    """Parse exactly one JSON value; raise ValueError otherwise."""
    n = len(text)
    i = 0
    while i < n and text[i] in _WS:
        i += 1
    try:
        value, end = _scan(text, i)
    except StopIteration as exc:
        raise ValueError(f"invalid JSON at character {exc.value}") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    while end < n and text[end] in _WS:
        end += 1
    if end != n:
        raise ValueError(f"extra data after JSON value at character {end}")
    return value
