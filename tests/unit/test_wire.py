"""Unit and property tests for ``broker.core.wire``: the JSON codec, the frames and the closed op sets.

The gate <-> daemon protocol is a closed set of size-capped JSON frames:
these tests pin the JSON codec (strict: no NaN/Infinity, no trailing data),
the frame caps, and ``validate_request`` for every op and key, and fuzz it
to show that anything malformed is a ``ProtocolError`` and nothing else.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import wire
from broker.core.wire import (
    ADMIN_OPS,
    MAX_KV,
    MAX_STRING,
    OPS,
    PROTOCOL_VERSION,
    ProtocolError,
    decode_payload,
    dumps,
    encode_frame,
    frame_length,
    loads,
    validate_request,
)

JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5),
    max_leaves=20,
)


# --- JSON codec ----------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(JSON_VALUES)
def test_dumps_loads_round_trip(value: object) -> None:
    text = dumps(value)
    assert "\n" not in text
    assert loads(text) == value
    assert json.loads(text) == value  # interoperable with the standard library
    assert loads(" \t\r\n" + text + "\n ") == value


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=20))
def test_strings_with_any_code_point_round_trip(s: str) -> None:
    assert loads(dumps(s)) == s
    assert loads(dumps({s: s})) == {s: s}


def test_dumps_is_compact() -> None:
    assert dumps({"a": [1, 2.5, None, True], "b": "é\n"}) == '{"a":[1,2.5,null,true],"b":"é\\n"}'


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, [math.nan], {"a": math.inf}])
def test_dumps_refuses_nan_and_infinity(value: object) -> None:
    with pytest.raises(ValueError):
        dumps(value)


@pytest.mark.parametrize("value", [object(), b"bytes", {1, 2}, {"a": object()}])
def test_dumps_refuses_non_json_types(value: object) -> None:
    with pytest.raises(TypeError):
        dumps(value)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "NaN",
        "-NaN",
        "Infinity",
        "-Infinity",
        "[NaN]",
        '{"a": Infinity}',
        "[1, -Infinity]",
        "1 2",
        "{} x",
        "{}{}",
        '{"a":1}}',
        "[1,]",
        "{'a': 1}",
        "'a'",
        "nul",
        "True",
        "None",
        "01",
        "0x10",
        "\u00a0{}",  # not JSON whitespace
        "{}\u00a0",
        "\ufeff{}",
        '"a\nb"',  # raw control character inside a string
        '"\\x41"',
        "1" * 5000,  # beyond the int conversion limit
        "[" * 100_000,  # nested too deeply
        "[" * 100_000 + "]" * 100_000,
        '{"a": 1,}',
        "/* c */ {}",
    ],
)
def test_loads_rejects_with_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        loads(text)


def test_loads_accepts_whitespace_around_one_value() -> None:
    assert loads(' \n\t{"a": [1, 2.0, "x", null, false]}\r\n') == {"a": [1, 2.0, "x", None, False]}
    assert loads("0") == 0
    assert loads('"\\ud800"') == "\ud800"  # lone surrogate escapes survive


# --- frames ------------------------------------------------------------------------


def test_encode_frame_layout() -> None:
    frame = encode_frame({"a": 1})
    assert frame == b"\x00\x00\x00\x07" + b'{"a":1}'


def test_encode_frame_cap_is_inclusive() -> None:
    payload_len = len(dumps({"a": "x" * 100}))
    assert len(encode_frame({"a": "x" * 100}, limit=payload_len)) == payload_len + 4
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame({"a": "x" * 100}, limit=payload_len - 1)


def test_encode_frame_counts_utf8_bytes_not_characters() -> None:
    # one astral character is 4 UTF-8 bytes on the wire: 30 of them exceed 100 bytes
    with pytest.raises(ProtocolError):
        encode_frame({"a": "\U0001f600" * 30}, limit=100)
    assert len(encode_frame({"a": "\U0001f600" * 20}, limit=100)) == 4 + 8 + 80


def test_encode_frame_replaces_lone_surrogates_and_non_finite_numbers() -> None:
    """A server's lone surrogate or NaN must never make a frame (and with it an answer) fail."""
    frame = encode_frame({"a": "x\udc80y", "n": float("nan"), "ok": "é"})
    assert decode_payload(frame[4:]) == {"a": "x\ufffdy", "n": None, "ok": "é"}


@pytest.mark.parametrize(
    ("header", "limit", "expected"),
    [
        (b"\x00\x00\x00\x01", 10, 1),
        (b"\x00\x00\x00\x0a", 10, 10),
        (b"\x00\x00\x01\x00", 256, 256),
    ],
)
def test_frame_length_accepts_1_to_limit(header: bytes, limit: int, expected: int) -> None:
    assert frame_length(header, limit) == expected


@pytest.mark.parametrize(
    ("header", "limit"),
    [
        (b"\x00\x00\x00\x00", 10),  # zero length
        (b"\x00\x00\x00\x0b", 10),  # one over
        (b"\xff\xff\xff\xff", wire.MAX_REQUEST_BYTES),
        ((wire.MAX_REQUEST_BYTES + 1).to_bytes(4, "big"), wire.MAX_REQUEST_BYTES),
        (b"\x00\x00\x01", 10),  # truncated
        (b"", 10),
        (b"\x00\x00\x00\x01\x00", 10),  # not exactly four bytes
    ],
)
def test_frame_length_rejects(header: bytes, limit: int) -> None:
    with pytest.raises(ProtocolError):
        frame_length(header, limit)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=5))
def test_frame_round_trip(obj: dict) -> None:
    frame = encode_frame(obj)
    n = frame_length(frame[:4], wire.MAX_RESPONSE_BYTES)
    assert n == len(frame) - 4
    assert decode_payload(frame[4:]) == obj


@pytest.mark.parametrize(
    "payload",
    [
        b"[]",
        b"1",
        b'"s"',
        b"null",
        b"\xff",
        b'{"a":"\xff"}',
        b"\xef\xbb\xbf{}",  # BOM
        b"{} x",
        b'{"a":NaN}',
        b"{",
        b"",
        b"{}\x00",
        b"[" * 100_000,
    ],
)
def test_decode_payload_rejects(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_payload(payload)


def test_decode_payload_accepts_utf8_object() -> None:
    assert decode_payload('{"a": "é"}'.encode()) == {"a": "é"}


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_decode_payload_random_bytes(payload: bytes) -> None:
    try:
        obj = decode_payload(payload)
    except ProtocolError:
        return
    assert isinstance(obj, dict)


# --- validate_request -------------------------------------------------------------

V = PROTOCOL_VERSION

#: protocol v2: no gate request names its caller (the daemon knows it from the peer's uid)
VALID: dict[str, dict] = {
    "list": {"v": V, "op": "list"},
    "describe": {"v": V, "op": "describe", "tool": "demo.echo"},
    "call": {
        "v": V,
        "op": "call",
        "tool": "demo.echo",
        "kv": [["text", "hi"], ["n", "1"]],
        "args": {"x": [1, 2]},
        "timeout": 5,
    },
    "status": {"v": V, "op": "status"},
    "catalog": {"v": V, "op": "catalog"},
    "watch": {"v": V, "op": "watch"},
    "report": {
        "v": V,
        "op": "report",
        "verb": "call",
        "tool": "demo.echo",
        "exit": 77,
        "reason": "denied",
    },
    "propose": {
        "v": V,
        "op": "propose",
        "name": "time",
        "manager": "pip",
        "package": "mcp-server-time",
        "version": "2025.9.25",
        "tools": ["get_current_time"],
        "why": "w" * 2000,
    },
    "proposals": {"v": V, "op": "proposals"},
}
ADMIN_VALID: dict[str, dict] = {
    "status": {"v": V, "op": "status"},
    "reload": {"v": V, "op": "reload"},
    "tools": {"v": V, "op": "tools", "server": None},
    "unfreeze": {"v": V, "op": "unfreeze", "caller": "alice"},
    "explain": {"v": V, "op": "explain", "caller": "alice", "tool": "demo.echo", "kv": [["a", "b"]]},
}

_SAMPLES: dict[type, object] = {str: "x", int: 1, float: 1.5, list: [], dict: {}, type(None): None, bool: True}


def _sample_request(ops: dict, op: str) -> dict:
    """A request built from the spec itself: the first allowed type of every key."""
    obj: dict = {"v": PROTOCOL_VERSION, "op": op}
    for key, (types, _required) in ops[op].items():
        obj[key] = copy.deepcopy(_SAMPLES[types[0]])
    return obj


ALL_OPS = [("gate", op) for op in sorted(OPS)] + [("admin", op) for op in sorted(ADMIN_OPS)]
TABLES = {"gate": OPS, "admin": ADMIN_OPS}


def _rejected(obj: dict, ops: dict = OPS) -> str:
    with pytest.raises(ProtocolError) as info:
        validate_request(obj, ops)
    return str(info.value)


def test_contract_ops_exist() -> None:
    assert set(VALID) <= set(OPS)
    assert set(ADMIN_VALID) <= set(ADMIN_OPS)
    assert not {"exec", "shell", "config", "load"} & (set(OPS) | set(ADMIN_OPS))


@pytest.mark.parametrize(("table", "op"), ALL_OPS)
def test_every_op_in_both_tables_is_closed(table: str, op: str) -> None:
    ops = TABLES[table]
    obj = _sample_request(ops, op)
    assert validate_request(copy.deepcopy(obj), ops) == op
    extra = copy.deepcopy(obj)
    extra["zz_unknown"] = 1
    assert "unexpected key" in _rejected(extra, ops)
    for key, (types, required) in ops[op].items():
        missing = copy.deepcopy(obj)
        del missing[key]
        if required:
            assert "missing key" in _rejected(missing, ops)
        wrong = copy.deepcopy(obj)
        wrong[key] = next(v for v in (True, 1.5, b"x", ("t",)) if type(v) not in types)
        assert "wrong type" in _rejected(wrong, ops)
        if str in types:
            long = copy.deepcopy(obj)
            long[key] = "x" * (wire.LONG_STRINGS.get(op if table == "gate" else "", {}).get(key, MAX_STRING) + 1)
            assert "too long" in _rejected(long, ops)
    bad_v = copy.deepcopy(obj)
    bad_v["v"] = True
    assert "version" in _rejected(bad_v, ops)


@pytest.mark.parametrize("op", sorted(VALID))
def test_each_op_accepts_its_exact_keys(op: str) -> None:
    obj = copy.deepcopy(VALID[op])
    assert validate_request(obj, OPS) == op
    assert obj == VALID[op]  # not modified


@pytest.mark.parametrize("op", sorted(ADMIN_VALID))
def test_each_admin_op_accepts_its_exact_keys(op: str) -> None:
    assert validate_request(copy.deepcopy(ADMIN_VALID[op]), ADMIN_OPS) == op


def test_request_builder_produces_valid_requests() -> None:
    assert PROTOCOL_VERSION == 2
    assert wire.request("list") == {"v": 2, "op": "list"}
    assert validate_request(wire.request("list"), OPS) == "list"
    msg = wire.request("call", tool="d.e", kv=[], args=None, timeout=None)
    assert msg["v"] == PROTOCOL_VERSION
    assert validate_request(msg, OPS) == "call"
    report = wire.request("report", verb="call", tool="", exit=77, reason="denied")
    assert validate_request(report, OPS) == "report"


def test_request_builder_with_caller_fields_makes_an_invalid_request() -> None:
    """What the first version's gate sent is refused now: the daemon takes no name from the gate."""
    assert "unexpected key 'caller'" in _rejected(wire.request("list", caller="a"))
    assert "unexpected key 'uid'" in _rejected(wire.request("status", uid=0))


#: the keys the first version's gate sent with every request (now the peer's uid says who calls)
CALLER_KEYS = ("caller", "uid")
CALLER_VALUES: list[object] = ["alice", "root", "", 0, 1000, None, True, [], {}]


@pytest.mark.parametrize(
    ("op", "key", "value"), [(op, key, v) for op in sorted(OPS) for key in CALLER_KEYS for v in CALLER_VALUES]
)
def test_caller_and_uid_are_unexpected_keys_on_every_gate_op(op: str, key: str, value: object) -> None:
    """A gate request naming a caller or a uid, of any type, is a protocol error: never a hint to the daemon."""
    obj = copy.deepcopy(VALID[op])
    obj[key] = value
    assert f"unexpected key {key!r}" in _rejected(obj)


@pytest.mark.parametrize("op", sorted(OPS))
def test_first_version_requests_are_refused(op: str) -> None:
    """A request as the v1 gate sent it (v 1, caller and uid) is refused for its version and for its keys."""
    v1 = {**copy.deepcopy(VALID[op]), "v": 1, "caller": "alice", "uid": 1000}
    assert "version" in _rejected(v1)
    assert "unexpected key" in _rejected({**v1, "v": PROTOCOL_VERSION})
    assert "version" in _rejected({**copy.deepcopy(VALID[op]), "v": 1})


def test_no_gate_op_has_a_caller_key() -> None:
    for op, spec in OPS.items():
        assert not set(spec) & {"caller", "uid", "user", "gid", "pid"}, op
    assert set(OPS["list"]) == set(OPS["status"]) == set(OPS["catalog"]) == set(OPS["watch"]) == set()
    assert set(OPS["describe"]) == {"tool"}
    assert set(OPS["call"]) == {"tool", "kv", "args", "timeout", "progress"}
    assert set(OPS["report"]) == {"verb", "tool", "exit", "reason"}


@pytest.mark.parametrize(
    ("field", "value"),
    [("args", None), ("timeout", None), ("timeout", 0.5), ("timeout", 10**6), ("kv", []), ("args", {})],
)
def test_call_optional_values(field: str, value: object) -> None:
    obj = copy.deepcopy(VALID["call"])
    obj[field] = value
    assert validate_request(obj, OPS) == "call"


@pytest.mark.parametrize("op", sorted(VALID))
def test_unknown_key_rejected(op: str) -> None:
    for extra in ("x", "V", "config", "args" if op != "call" else "server", ""):
        obj = copy.deepcopy(VALID[op])
        obj[extra] = "1"
        assert "unexpected key" in _rejected(obj)


@pytest.mark.parametrize(
    ("op", "key"), [(op, key) for op in sorted(VALID) for key in VALID[op] if key not in ("v", "op")]
)
def test_missing_key_rejected(op: str, key: str) -> None:
    obj = copy.deepcopy(VALID[op])
    del obj[key]
    assert f"missing key {key!r}" in _rejected(obj)


WRONG: dict[str, list[object]] = {
    "caller": [1, None, True, [], {}, b"x"],  # admin ops (unfreeze, explain)
    "tool": [1, None, False, ["demo.echo"]],
    "verb": [0, None, ["call"]],
    "reason": [None, 1, {}],
    "exit": [True, 77.0, "77", None],
    "kv": [{}, "a=b", None, (("a", "b"),), 1],
    "args": [[], "{}", 1, True],
    "timeout": [True, False, "5", [5], {}],
}


@pytest.mark.parametrize(
    ("table", "op", "key", "value"),
    [("gate", op, key, v) for op in sorted(VALID) for key in VALID[op] if key in WRONG for v in WRONG[key]]
    + [
        ("admin", op, key, v)
        for op in sorted(ADMIN_VALID)
        for key in ADMIN_VALID[op]
        if key in WRONG
        for v in WRONG[key]
    ],
)
def test_wrong_type_rejected(table: str, op: str, key: str, value: object) -> None:
    obj = copy.deepcopy((VALID if table == "gate" else ADMIN_VALID)[op])
    obj[key] = value
    assert "wrong type" in _rejected(obj, TABLES[table])


@pytest.mark.parametrize("v", [None, 0, 1, 3, -1, -2, True, 1.0, 2.0, "1", "2", [2]])
def test_wrong_version_rejected(v: object) -> None:
    for op in VALID:
        obj = copy.deepcopy(VALID[op])
        obj["v"] = v
        assert "version" in _rejected(obj)
    obj = copy.deepcopy(VALID["list"])
    del obj["v"]
    assert "version" in _rejected(obj)


@pytest.mark.parametrize("op", [None, 1, True, "", "LIST", "List", "list ", "exec", "reload", "tools", ["list"]])
def test_unknown_op_rejected(op: object) -> None:
    obj = copy.deepcopy(VALID["list"])
    obj["op"] = op
    assert "unknown op" in _rejected(obj)
    obj = copy.deepcopy(VALID["list"])
    del obj["op"]
    assert "unknown op" in _rejected(obj)


def test_gate_ops_are_not_admin_ops_and_vice_versa() -> None:
    for op in ("list", "describe", "call", "report"):
        assert "unknown op" in _rejected(copy.deepcopy(VALID[op]), ADMIN_OPS)
    for op in ("reload", "tools"):
        assert "unknown op" in _rejected(copy.deepcopy(ADMIN_VALID[op]), OPS)


def test_admin_ops_closed_keys_and_types() -> None:
    assert "unexpected key" in _rejected({"v": V, "op": "status", "caller": "root"}, ADMIN_OPS)
    assert "unexpected key" in _rejected({"v": V, "op": "status", "uid": 0}, ADMIN_OPS)
    assert "missing key" in _rejected({"v": V, "op": "tools"}, ADMIN_OPS)
    assert "wrong type" in _rejected({"v": V, "op": "tools", "server": 1}, ADMIN_OPS)
    assert validate_request({"v": V, "op": "tools", "server": "demo"}, ADMIN_OPS) == "tools"
    assert "too long" in _rejected({"v": V, "op": "tools", "server": "s" * (MAX_STRING + 1)}, ADMIN_OPS)
    assert "version" in _rejected({"v": 1, "op": "tools", "server": "demo"}, ADMIN_OPS)
    assert "missing key 'caller'" in _rejected({"v": V, "op": "unfreeze"}, ADMIN_OPS)
    assert "wrong type" in _rejected({"v": V, "op": "unfreeze", "caller": 1000}, ADMIN_OPS)


@pytest.mark.parametrize(
    ("table", "op", "key"),
    [("gate", op, k) for op in sorted(VALID) for k in ("tool", "verb", "reason") if k in VALID[op]]
    + [("admin", op, k) for op in sorted(ADMIN_VALID) for k in ("caller", "tool", "server") if k in ADMIN_VALID[op]],
)
def test_string_length_cap(table: str, op: str, key: str) -> None:
    ops = TABLES[table]
    valid = VALID if table == "gate" else ADMIN_VALID
    obj = copy.deepcopy(valid[op])
    obj[key] = "x" * MAX_STRING
    assert validate_request(obj, ops) == op
    obj[key] = "x" * (MAX_STRING + 1)
    assert "too long" in _rejected(obj, ops)


def test_kv_count_cap() -> None:
    obj = copy.deepcopy(VALID["call"])
    obj["kv"] = [[f"k{i}", "v"] for i in range(MAX_KV)]
    assert validate_request(obj, OPS) == "call"
    obj["kv"].append(["one", "more"])
    assert "too many" in _rejected(obj)


@pytest.mark.parametrize(
    "kv",
    [
        [["a"]],
        [["a", "b", "c"]],
        [[]],
        [[1, "b"]],
        [["a", 1]],
        [["a", None]],
        [["a", True]],
        [["a", ["b"]]],
        ["a=b"],
        [["a", "b"], "c=d"],
        [{"a": "b"}],
        [("a", "b")],
        [None],
    ],
)
def test_malformed_kv_rejected(kv: list) -> None:
    obj = copy.deepcopy(VALID["call"])
    obj["kv"] = kv
    assert "kv must be" in _rejected(obj)


# --- fuzz ------------------------------------------------------------------------------

ALL_KEYS = sorted({k for ops in (OPS, ADMIN_OPS) for spec in ops.values() for k in spec} | {"v", "op"})
FUZZ_VALUES = st.one_of(
    JSON_VALUES,
    st.sampled_from([1, 0, True, "list", "call", "describe", "status", "report", "alice", []]),
    st.lists(st.lists(st.text(max_size=3), max_size=3), max_size=3),
)


def _satisfies_spec(obj: dict, ops: dict, op: str) -> bool:
    spec = ops[op]
    if type(obj["v"]) is not int or obj["v"] != PROTOCOL_VERSION:
        return False
    if not set(obj) <= set(spec) | {"v", "op"}:
        return False
    for key, (types, required) in spec.items():
        if key not in obj:
            if required:
                return False
            continue
        if type(obj[key]) not in types:
            return False
        if isinstance(obj[key], str) and len(obj[key]) > max(MAX_STRING, wire.LONG_STRINGS.get(op, {}).get(key, 0)):
            return False
    if "kv" in spec:
        return len(obj["kv"]) <= MAX_KV and all(
            type(p) is list and len(p) == 2 and all(type(x) is str for x in p) for p in obj["kv"]
        )
    return True


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(st.one_of(st.sampled_from(ALL_KEYS), st.text(max_size=5), st.integers()), FUZZ_VALUES, max_size=9)
)
def test_random_dicts_validate_or_raise_protocol_error(obj: dict) -> None:
    for ops in (OPS, ADMIN_OPS):
        try:
            op = validate_request(obj, ops)
        except ProtocolError:
            continue
        assert op in ops
        assert _satisfies_spec(obj, ops, op)


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(sorted(VALID)),
    st.lists(st.tuples(st.sampled_from([*ALL_KEYS, "x"]), st.one_of(st.none(), FUZZ_VALUES)), max_size=4),
)
def test_mutated_valid_requests(op: str, mutations: list) -> None:
    """Start from a valid request, drop or replace keys; the verdict is exactly the spec's."""
    obj = copy.deepcopy(VALID[op])
    for key, value in mutations:
        if value is None and key in obj:
            del obj[key]
        else:
            obj[key] = value
    ok = type(obj.get("op")) is str and obj["op"] in OPS and "v" in obj and _satisfies_spec(obj, OPS, obj["op"])
    try:
        got = validate_request(obj, OPS)
    except ProtocolError:
        assert not ok, obj
    else:
        assert ok, obj
        assert got == obj["op"]


@pytest.mark.parametrize(("table", "op"), [(t, op) for t, op in ALL_OPS if "kv" in TABLES[t][op]])
def test_kv_rules_apply_to_every_op_with_kv(table: str, op: str) -> None:
    ops = TABLES[table]
    obj = _sample_request(ops, op)
    obj["kv"] = [["a", "b"]] * MAX_KV
    assert validate_request(obj, ops) == op
    obj["kv"] = [["a", "b"]] * (MAX_KV + 1)
    assert "too many" in _rejected(obj, ops)
    obj["kv"] = [["a", 1]]
    assert "kv must be" in _rejected(obj, ops)


# --- call_result: the CallToolResult the agent gets --------------------------------------------------


def test_call_result_keeps_the_wire_fields_and_drops_the_joined_text() -> None:
    blocks = [{"type": "audio", "data": "QUJD", "mimeType": "audio/wav"}]
    meta = {"mcp-privsep/truncated": {"size": 9, "cap": 1}}
    answer = {"content": blocks, "isError": False, "text": "x", "structuredContent": {"a": 1}, "_meta": meta}
    assert wire.call_result(answer) == {
        "content": blocks,
        "isError": False,
        "structuredContent": {"a": 1},
        "_meta": meta,
    }


@pytest.mark.parametrize("bad", [None, [], "text", 3])
def test_call_result_of_a_malformed_answer_is_none(bad: object) -> None:
    assert wire.call_result(bad) is None


def test_call_result_never_claims_an_error_it_was_not_told() -> None:
    assert wire.call_result({"isError": "yes", "text": "t"}) == {
        "content": [{"type": "text", "text": "t"}],
        "isError": False,
    }
