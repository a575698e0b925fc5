"""Unit and property tests for ``broker.coerce``.

``k=v`` strings become typed tool arguments guided by the tool's input
schema: integer, number, boolean, null, array/object as JSON, else string.
A value that fits none of the allowed types is rejected (exit 65), never
guessed; NaN and infinities are never numbers; ``--args`` merges with
``k=v`` and a key given twice, an unknown key of a closed schema or a
missing required key is rejected.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core.errors import EX_DATAERR, ArgumentsRejected
from broker.daemon.coerce import build_arguments, coerce_value

INT = {"type": "integer"}
NUM = {"type": "number"}
BOOL = {"type": "boolean"}
NULL = {"type": "null"}
ARR = {"type": "array"}
OBJ = {"type": "object"}
STR = {"type": "string"}


def _same(a: object, b: object) -> bool:
    """Equal values of the same JSON type (True is not 1, 1 is not 1.0)."""
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(
    ("prop", "raw", "expected"),
    [
        (INT, "0", 0),
        (INT, "42", 42),
        (INT, "-7", -7),
        (INT, "+7", 7),
        (INT, "007", 7),
        (INT, " 5 ", 5),
        (INT, "9" * 100, int("9" * 100)),
        (NUM, "1.5", 1.5),
        (NUM, "-0.25", -0.25),
        (NUM, "3", 3),
        (NUM, "1e3", 1000.0),
        (NUM, "-2", -2),
        (BOOL, "true", True),
        (BOOL, "false", False),
        (NULL, "null", None),
        (ARR, "[1, 2]", [1, 2]),
        (ARR, "[]", []),
        (ARR, '["a", {"b": null}]', ["a", {"b": None}]),
        (OBJ, '{"a": 1}', {"a": 1}),
        (OBJ, "{}", {}),
        (STR, "hello", "hello"),
        (STR, "5", "5"),
        (STR, "true", "true"),
        (STR, "null", "null"),
        (STR, "", ""),
        (STR, "@/etc/shadow", "@/etc/shadow"),
        (STR, "[1]", "[1]"),
    ],
)
def test_single_type(prop: dict, raw: str, expected: object) -> None:
    assert _same(coerce_value("k", raw, prop), expected)


@pytest.mark.parametrize(
    ("prop", "raw"),
    [
        (INT, ""),
        (INT, "-"),
        (INT, "+"),
        (INT, "1.0"),
        (INT, "1e3"),
        (INT, "0x10"),
        (INT, "1_000"),
        (INT, "٣"),  # non-ASCII digit
        (INT, "²"),
        (INT, "ten"),
        (INT, "true"),
        (INT, "--1"),
        (INT, "+-1"),
        (INT, "9" * 4301),
        (NUM, ""),
        (NUM, "nan"),
        (NUM, "NaN"),
        (NUM, "-nan"),
        (NUM, "inf"),
        (NUM, "-inf"),
        (NUM, "Infinity"),
        (NUM, "-Infinity"),
        (NUM, "1e999"),
        (NUM, "-1e999"),
        (NUM, "abc"),
        (NUM, "0x10"),
        (NUM, "1.2.3"),
        (NUM, "--1"),
        (BOOL, "True"),
        (BOOL, "TRUE"),
        (BOOL, "1"),
        (BOOL, "yes"),
        (BOOL, ""),
        (BOOL, " true"),
        (NULL, "None"),
        (NULL, ""),
        (NULL, "Null"),
        (ARR, "{}"),
        (ARR, "1"),
        (ARR, "["),
        (ARR, "a,b"),
        (ARR, '"[1]"'),
        (OBJ, "[]"),
        (OBJ, "null"),
        (OBJ, "{'a': 1}"),
        (OBJ, "{"),
        ({"type": "no-such-type"}, "x"),
    ],
)
def test_single_type_rejects(prop: dict, raw: str) -> None:
    with pytest.raises(ArgumentsRejected) as info:
        coerce_value("k", raw, prop)
    assert info.value.exit_code == EX_DATAERR
    assert "'k'" in str(info.value)


@pytest.mark.parametrize(
    ("prop", "raw", "expected"),
    [
        ({"type": ["integer", "null"]}, "null", None),
        ({"type": ["integer", "null"]}, "5", 5),
        ({"type": ["string", "integer"]}, "5", 5),
        ({"type": ["string", "integer"]}, "five", "five"),
        ({"type": ["boolean", "string"]}, "true", True),
        ({"type": ["boolean", "string"]}, "yes", "yes"),
        ({"type": ["number", "integer"]}, "5", 5),
        ({"type": ["number", "integer"]}, "5.5", 5.5),
        ({"type": ["array", "string"]}, "[1]", [1]),
        ({"type": ["array", "string"]}, "{}", "{}"),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "null", None),
        ({"anyOf": [{"type": "string"}, {"type": "null"}]}, "x", "x"),
        ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, "false", False),
        ({"anyOf": [{"anyOf": [{"type": "integer"}]}, {"type": "object"}]}, '{"a":1}', {"a": 1}),
        ({"anyOf": [{"type": "integer"}, {"type": "object"}]}, "3", 3),
        ({"enum": ["a", "b"]}, "a", "a"),
        ({"enum": ["a", "b"]}, "1", "1"),
        ({"enum": [1, 2, 3]}, "2", 2),
        ({"enum": [True, False]}, "true", True),
        ({"enum": [None, "x"]}, "null", None),
        ({"enum": [0.5, 1.5]}, "1.5", 1.5),
        ({"enum": [[1], [2]]}, "[2]", [2]),
        ({"type": "string", "enum": ["1", "2"]}, "1", "1"),  # an explicit type wins over enum values
        ({}, "42", "42"),  # no type: the string as typed
        ({"description": "anything"}, "true", "true"),
        ({"type": 5}, "x", "x"),  # a nonsensical type is ignored, not guessed from
    ],
)
def test_type_unions_and_enums(prop: dict, raw: str, expected: object) -> None:
    assert _same(coerce_value("k", raw, prop), expected)


@pytest.mark.parametrize(
    ("prop", "raw"),
    [
        ({"type": ["integer", "null"]}, "x"),
        ({"type": ["integer", "boolean"]}, "1.5"),
        ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, "nil"),
        ({"enum": [1, 2]}, "one"),
        ({"enum": [True]}, "yes"),
    ],
)
def test_type_unions_reject(prop: dict, raw: str) -> None:
    with pytest.raises(ArgumentsRejected):
        coerce_value("k", raw, prop)


def test_no_schema_means_string() -> None:
    assert coerce_value("k", "5", None) == "5"


def test_rejection_message_names_the_types_and_truncates_the_value() -> None:
    with pytest.raises(ArgumentsRejected) as info:
        coerce_value("count", "x" * 500, {"type": ["integer", "null"]})
    msg = str(info.value)
    assert "'count'" in msg and "integer or null" in msg
    assert len(msg) < 200


# --- properties --------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=-(10**50), max_value=10**50))
def test_integers_round_trip(n: int) -> None:
    assert _same(coerce_value("k", str(n), INT), n)
    assert coerce_value("k", str(n), NUM) == n


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_finite_floats_round_trip(x: float) -> None:
    got = coerce_value("k", repr(x), NUM)
    assert got == x and math.isfinite(got)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_number_result_is_always_finite(raw: str) -> None:
    try:
        got = coerce_value("k", raw, NUM)
    except ArgumentsRejected:
        return
    assert type(got) in (int, float)
    assert math.isfinite(got)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_string_schema_is_identity(raw: str) -> None:
    assert coerce_value("k", raw, STR) is raw


SCHEMAS = [INT, NUM, BOOL, NULL, ARR, OBJ, STR, {"type": ["integer", "null"]}, {"enum": [1, "a"]}, {}]


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(SCHEMAS), st.text(max_size=30))
def test_coerce_returns_a_value_of_an_allowed_type_or_rejects(prop: dict, raw: str) -> None:
    try:
        got = coerce_value("k", raw, prop)
    except ArgumentsRejected:
        return
    allowed = {
        "integer": (int,),
        "number": (int, float),
        "boolean": (bool,),
        "null": (type(None),),
        "array": (list,),
        "object": (dict,),
        "string": (str,),
    }
    kinds = prop.get("type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if "enum" in prop:
        kinds = ["integer", "string"]
    if not kinds:
        assert got is raw
        return
    assert any(type(got) in allowed[k] for k in kinds)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=5),
        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=3), c, max_size=3),
        max_leaves=10,
    )
)
def test_json_containers_round_trip(value: object) -> None:
    raw = json.dumps(value)
    if isinstance(value, list):
        assert coerce_value("k", raw, ARR) == value
    elif isinstance(value, dict):
        assert coerce_value("k", raw, OBJ) == value
    else:
        with pytest.raises(ArgumentsRejected):
            coerce_value("k", raw, {"type": ["array", "object"]})


# --- build_arguments -----------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "text": {"type": "string"},
        "n": {"type": "integer"},
        "ratio": {"type": "number"},
        "flag": {"type": "boolean"},
        "tags": {"type": "array"},
        "opts": {"type": "object"},
        "maybe": {"type": ["integer", "null"]},
    },
    "required": ["text"],
}


def test_build_types_every_value() -> None:
    kv = [
        ["text", "hi"],
        ["n", "3"],
        ["ratio", "0.5"],
        ["flag", "true"],
        ["tags", '["a","b"]'],
        ["opts", '{"x":1}'],
        ["maybe", "null"],
    ]
    assert build_arguments(kv, None, SCHEMA) == {
        "text": "hi",
        "n": 3,
        "ratio": 0.5,
        "flag": True,
        "tags": ["a", "b"],
        "opts": {"x": 1},
        "maybe": None,
    }


def test_args_base_is_merged_with_kv_and_not_coerced_or_mutated() -> None:
    base = {"text": "from-json", "n": "7"}  # --args values are JSON already: kept as given
    got = build_arguments([["ratio", "2"]], base, SCHEMA)
    assert got == {"text": "from-json", "n": "7", "ratio": 2}
    assert base == {"text": "from-json", "n": "7"}


def test_open_schema_keeps_unknown_keys_as_strings() -> None:
    assert build_arguments([["text", "a"], ["extra", "5"]], None, SCHEMA) == {"text": "a", "extra": "5"}


def test_closed_schema_rejects_unknown_kv_key() -> None:
    closed = {**SCHEMA, "additionalProperties": False}
    with pytest.raises(ArgumentsRejected, match="unknown argument 'extra'"):
        build_arguments([["text", "a"], ["extra", "5"]], None, closed)


def test_closed_schema_rejects_unknown_args_key() -> None:
    closed = {**SCHEMA, "additionalProperties": False}
    with pytest.raises(ArgumentsRejected, match="unknown argument 'extra'"):
        build_arguments([], {"text": "a", "extra": 1}, closed)
    assert build_arguments([], {"text": "a"}, closed) == {"text": "a"}


def test_additional_properties_schema_is_not_closed() -> None:
    schema = {**SCHEMA, "additionalProperties": {"type": "string"}}
    assert build_arguments([["text", "a"], ["extra", "5"]], None, schema)["extra"] == "5"


def test_missing_required_key() -> None:
    with pytest.raises(ArgumentsRejected, match="missing required argument 'text'"):
        build_arguments([["n", "1"]], None, SCHEMA)
    assert build_arguments([], {"text": "x"}, SCHEMA) == {"text": "x"}  # satisfied by --args


@pytest.mark.parametrize(
    ("kv", "base"),
    [
        ([["n", "1"], ["n", "2"]], None),
        ([["text", "a"], ["text", "a"]], None),
        ([["text", "b"]], {"text": "a"}),
    ],
)
def test_duplicate_keys_rejected(kv: list, base: dict | None) -> None:
    with pytest.raises(ArgumentsRejected, match="given twice"):
        build_arguments(kv, base, SCHEMA)


def test_bad_value_in_build_is_rejected() -> None:
    with pytest.raises(ArgumentsRejected, match="'n'"):
        build_arguments([["text", "a"], ["n", "three"]], None, SCHEMA)


@pytest.mark.parametrize("schema", [{}, {"properties": None}, {"properties": []}, {"type": "object"}])
def test_schemas_without_properties(schema: dict) -> None:
    assert build_arguments([["a", "1"]], {"b": 2}, schema) == {"a": "1", "b": 2}


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([*sorted(SCHEMA["properties"]), "extra", "x"]), st.text(max_size=12)), max_size=6
    ),
    st.booleans(),
)
def test_build_arguments_never_raises_anything_else(pairs: list, closed: bool) -> None:
    schema = {**SCHEMA, "additionalProperties": False} if closed else SCHEMA
    kv = [[k, v] for k, v in pairs]
    try:
        got = build_arguments(kv, None, schema)
    except ArgumentsRejected:
        return
    keys = [k for k, _ in pairs]
    assert len(set(keys)) == len(keys)
    assert set(got) == set(keys)
    assert "text" in got


# --- once bugs, now regression tests --------------------------------------------------------------------------


@pytest.mark.parametrize(("prop", "raw"), [(ARR, "[NaN]"), (ARR, "[1, Infinity]"), (OBJ, '{"a": -Infinity}')])
def test_nan_inside_json_containers_is_rejected(prop: dict, raw: str) -> None:
    with pytest.raises(ArgumentsRejected):
        coerce_value("k", raw, prop)


@pytest.mark.parametrize("prop", [ARR, OBJ, {"type": ["array", "string"]}])
def test_deeply_nested_json_is_rejected_not_crashing(prop: dict) -> None:
    raw = "[" * 100_000
    try:
        got = coerce_value("k", raw, prop)
    except ArgumentsRejected:
        return
    assert got == raw  # only acceptable as the literal string of an array-or-string property


@pytest.mark.parametrize("raw", ["\u0663", "\u0661\u0662", "1_000", "\uff11\uff12"])
def test_number_and_integer_agree_on_digit_strings(raw: str) -> None:
    with pytest.raises(ArgumentsRejected):
        coerce_value("k", raw, INT)
    with pytest.raises(ArgumentsRejected):
        coerce_value("k", raw, NUM)
