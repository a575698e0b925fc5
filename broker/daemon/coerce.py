"""Turn ``k=v`` strings into typed tool arguments, guided by the input schema.

The gate sends the strings as the agent typed them; the daemon, which holds
the tool's schema, decides their types here: integer, number, boolean,
null, array or object (as JSON), else string. A value that fits none of the
types the schema allows is rejected (exit 65), never guessed.
"""

from __future__ import annotations

import math
from typing import Any

from broker.core.errors import ArgumentsRejected
from broker.core.wire import loads

_NUMBER_CHARS = frozenset("0123456789+-.eE")

_ORDER = ("null", "boolean", "integer", "number", "array", "object", "string")


def _types(prop: dict[str, Any]) -> list[str]:
    """JSON types a property schema allows (empty: anything)."""
    found: list[str] = []
    t = prop.get("type")
    if isinstance(t, str):
        found.append(t)
    elif isinstance(t, list):
        found.extend(x for x in t if isinstance(x, str))
    for key in ("anyOf", "oneOf"):
        for sub in prop.get(key) or []:
            if isinstance(sub, dict):
                found.extend(_types(sub))
    if "enum" in prop and not found:
        for v in prop["enum"]:
            found.append(_json_type(v))
    return list(dict.fromkeys(found))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return "string"


def _convert(kind: str, raw: str) -> tuple[bool, Any]:
    if kind == "string":
        return True, raw
    if kind == "null":
        return raw == "null", None
    if kind == "boolean":
        if raw in ("true", "false"):
            return True, raw == "true"
        return False, None
    if kind == "integer":
        text = raw.strip()
        body = text[1:] if text[:1] in "+-" else text
        if body.isascii() and body.isdigit() and len(body) <= 4300:
            return True, int(text)
        return False, None
    if kind == "number":
        # Python's float() also takes Unicode digits, '_' and 'inf'; JSON numbers do not
        if not raw.strip() or not set(raw.strip()) <= _NUMBER_CHARS:
            return False, None
        try:
            if raw.strip().lstrip("+-").isdigit():
                return True, int(raw)
            number = float(raw)
        except ValueError:
            return False, None
        return (math.isfinite(number), number)
    if kind in ("array", "object"):
        try:
            value = loads(raw)  # strict: no NaN/Infinity, depth errors become ValueError
        except ValueError:
            return False, None
        return (_json_type(value) == kind, value)
    return False, None


def coerce_value(key: str, raw: str, prop: dict[str, Any] | None) -> Any:
    """One ``k=v`` value typed by its property schema."""
    kinds = _types(prop or {})
    if not kinds:
        return raw
    for kind in sorted(kinds, key=lambda k: _ORDER.index(k) if k in _ORDER else len(_ORDER)):
        ok, value = _convert(kind, raw)
        if ok:
            return value
    want = " or ".join(kinds)
    raise ArgumentsRejected(f"argument {key!r}: {raw[:80]!r} is not a valid {want}")


def build_arguments(kv: list[list[str]], base: dict[str, Any] | None, schema: dict[str, Any]) -> dict[str, Any]:
    """Merge ``--args`` JSON and ``k=v`` pairs into the tool's arguments."""
    props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    assert isinstance(props, dict)
    closed = schema.get("additionalProperties") is False
    args: dict[str, Any] = dict(base or {})
    for key, raw in kv:
        if key in args:
            raise ArgumentsRejected(f"argument {key!r} given twice")
        prop = props.get(key)
        if prop is None and closed:
            raise ArgumentsRejected(f"unknown argument {key!r} (see 'mcp describe')")
        args[key] = coerce_value(key, raw, prop if isinstance(prop, dict) else None)
    if closed:
        for key in args:
            if key not in props:
                raise ArgumentsRejected(f"unknown argument {key!r} (see 'mcp describe')")
    required = schema.get("required")
    if isinstance(required, list):
        missing = [k for k in required if isinstance(k, str) and k not in args]
        if missing:
            raise ArgumentsRejected(f"missing required argument {missing[0]!r} (see 'mcp describe')")
    return args
