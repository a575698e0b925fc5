"""Unit and property tests of ``broker.core.channel``: the daemon <-> spawner frames, requests and answers.

No privileges needed: everything runs over ``socket.socketpair``.

- ``send``/``recv`` round trips, with descriptors passed on a frame's first
  byte (SCM_RIGHTS) that really are the sender's files;
- the limits: an oversized frame (refused when sent, and when announced),
  an empty one, one cut short by the end of the channel, malformed JSON,
  a frame that is not an object; descriptors beyond ``max_fds`` (the kernel
  truncates the control data: MSG_CTRUNC) and descriptors that came with a
  frame that turned out bad are closed, never leaked (``/proc/self/fd`` is
  counted before and after), and a receiver that takes none drops them;
- ``check_request`` against :data:`channel.REQUESTS` (unknown op, extra or
  missing key, wrong type, bool where an int is meant, version), and a
  fuzz: any object is an op or a ``ProtocolError``, nothing else;
- ``check_answer``: the op must be the one asked, ``ok`` a bool, a refusal
  an ``error`` string and no descriptor, a success every key of its type,
  exactly three descriptors for ``start`` and none for anything else.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.core import channel, wire
from broker.core.errors import ProtocolError

LIMIT = channel.MAX_REQUEST_BYTES


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(10)
    b.settimeout(10)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def open_fds() -> set[int]:
    """This process's open descriptors (probed one by one: listing /proc/self/fd would open one itself)."""
    found = set()
    for fd in range(1024):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.add(fd)
    return found


def fd_count() -> int:
    return len(open_fds())


# --- round trips -------------------------------------------------------------------------------


def test_a_frame_round_trips(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    obj = {"op": "hello", "ok": True, "version": 1, "host": {"landlock_abi": 7, "név": "ünïcödé", "n": [1, 2.5, None]}}
    channel.send(a, obj, channel.MAX_ANSWER_BYTES)
    assert channel.recv(b, channel.MAX_ANSWER_BYTES) == (obj, [])
    a.close()
    assert channel.recv(b, channel.MAX_ANSWER_BYTES, 3) == (None, [])


def test_descriptors_round_trip_and_are_the_senders_files(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        channel.send(a, {"op": "start", "ok": True}, LIMIT, [w, r, null])
        obj, fds = channel.recv(b, LIMIT, channel.START_FDS)
        try:
            assert obj == {"op": "start", "ok": True} and len(fds) == 3
            assert not set(fds) & {r, w, null}  # new descriptors, of the same files
            for got, sent in zip(fds, (w, r, null), strict=True):
                assert (os.fstat(got).st_ino, os.fstat(got).st_dev) == (os.fstat(sent).st_ino, os.fstat(sent).st_dev)
            os.write(fds[0], b"through the passed write end")
            assert os.read(fds[1], 100) == b"through the passed write end"
        finally:
            channel.close_all(fds)
    finally:
        for fd in (r, w, null):
            os.close(fd)


def test_received_descriptors_are_close_on_exec(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        assert not os.get_inheritable(null)
        channel.send(a, {"op": "start"}, LIMIT, [null, null, null])
        _obj, fds = channel.recv(b, LIMIT, channel.START_FDS)
        try:
            assert [os.get_inheritable(fd) for fd in fds] == [False, False, False]
        finally:
            channel.close_all(fds)
    finally:
        os.close(null)


def test_frames_back_to_back_are_read_one_at_a_time(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    r, w = os.pipe()
    try:
        channel.send(a, {"n": 1}, LIMIT)
        channel.send(a, {"n": 2}, LIMIT, [r])
        channel.send(a, {"n": 3}, LIMIT)
        assert channel.recv(b, LIMIT, 1) == ({"n": 1}, [])
        obj, fds = channel.recv(b, LIMIT, 1)
        assert obj == {"n": 2} and len(fds) == 1
        channel.close_all(fds)
        assert channel.recv(b, LIMIT, 1) == ({"n": 3}, [])
    finally:
        os.close(r)
        os.close(w)


def test_a_large_frame_with_descriptors_is_sent_whole(pair: tuple[socket.socket, socket.socket]) -> None:
    """Larger than the socket buffer: send_fds sends part of it, sendall the rest."""
    a, b = pair
    obj = {"op": "load", "ok": True, "instances": {"x": "y" * (4 << 20)}, "problems": []}
    null = os.open("/dev/null", os.O_RDONLY)
    got: dict[str, Any] = {}

    def reader() -> None:
        got["frame"] = channel.recv(b, channel.MAX_ANSWER_BYTES, 1)

    t = threading.Thread(target=reader)
    t.start()
    try:
        channel.send(a, obj, channel.MAX_ANSWER_BYTES, [null])
    finally:
        t.join(20)
        os.close(null)
    received, fds = got["frame"]
    assert received == obj and len(fds) == 1
    channel.close_all(fds)


def test_the_clean_end_of_the_channel(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    a.close()
    assert channel.recv(b, LIMIT) == (None, [])
    assert channel.recv(b, LIMIT, 3) == (None, [])


def test_request_builds_a_versioned_request() -> None:
    assert channel.request("start", server="demo", agent=None) == {
        "v": channel.VERSION,
        "op": "start",
        "server": "demo",
        "agent": None,
    }
    assert channel.check_request(channel.request("stop", server="demo", agent="alice")) == "stop"


# --- limits ---------------------------------------------------------------------------------------


def test_an_oversized_frame_is_refused_when_sent(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    with pytest.raises(ProtocolError, match="exceeds"):
        channel.send(a, {"server": "x" * LIMIT}, LIMIT)
    a.close()
    assert channel.recv(b, LIMIT) == (None, [])  # nothing of it was sent


@pytest.mark.parametrize("n", [0, LIMIT + 1, 2**32 - 1])
def test_a_frame_announced_outside_the_limit_is_refused(pair: tuple[socket.socket, socket.socket], n: int) -> None:
    a, b = pair
    a.sendall(n.to_bytes(4, "big") + b"{}")
    with pytest.raises(ProtocolError, match="outside"):
        channel.recv(b, LIMIT)


def test_the_limit_is_inclusive(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    payload = b'{"k":"' + b"x" * (100 - 8) + b'"}'
    assert len(payload) == 100
    a.sendall(len(payload).to_bytes(4, "big") + payload)
    assert channel.recv(b, 100) == ({"k": "x" * 92}, [])


@pytest.mark.parametrize(
    "raw",
    [
        b"\x00",
        b"\x00\x00\x00",
        b"\x00\x00\x00\x10",
        b'\x00\x00\x00\x10{"v": 1',
    ],
)
@pytest.mark.parametrize("max_fds", [0, 3])
def test_a_frame_cut_short_by_the_end_is_refused(
    pair: tuple[socket.socket, socket.socket], raw: bytes, max_fds: int
) -> None:
    a, b = pair
    a.sendall(raw)
    a.close()
    with pytest.raises(ProtocolError):
        channel.recv(b, LIMIT, max_fds)


@pytest.mark.parametrize(
    "payload",
    [b"{", b"[]", b'"x"', b"null", b"{}{}", b"\xff\xfe", b'{"a": NaN}', b'{"a": 1e999}', b"[" * 5000 + b"]" * 5000],
)
def test_a_malformed_payload_is_refused(pair: tuple[socket.socket, socket.socket], payload: bytes) -> None:
    a, b = pair
    a.sendall(len(payload).to_bytes(4, "big") + payload)
    with pytest.raises(ProtocolError):
        channel.recv(b, LIMIT)


def test_descriptors_beyond_max_fds_are_refused_and_none_leaks(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    sent = [os.open("/dev/null", os.O_RDONLY) for _ in range(5)]
    try:
        before = open_fds()
        channel.send(a, {"op": "start", "ok": True}, LIMIT, sent)
        with pytest.raises(ProtocolError, match="cut off"):
            channel.recv(b, LIMIT, channel.START_FDS)  # room for 3: the kernel truncates (MSG_CTRUNC)
        assert open_fds() == before
    finally:
        for fd in sent:
            os.close(fd)


def test_descriptors_of_a_bad_frame_are_closed(pair: tuple[socket.socket, socket.socket]) -> None:
    a, b = pair
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        afd = a.fileno()
        before = open_fds() - {afd}
        socket.send_fds(a, [(7).to_bytes(4, "big") + b"{nope}!"], [null, null, null])
        with pytest.raises(ProtocolError):
            channel.recv(b, LIMIT, 3)
        assert open_fds() - {afd} == before
        socket.send_fds(a, [(LIMIT + 1).to_bytes(4, "big")], [null])
        with pytest.raises(ProtocolError):
            channel.recv(b, LIMIT, 3)
        assert open_fds() - {afd} == before
        socket.send_fds(a, [(50).to_bytes(4, "big") + b"{"], [null, null])
        a.close()
        with pytest.raises(ProtocolError):
            channel.recv(b, LIMIT, 3)
        assert open_fds() - {afd} == before
    finally:
        os.close(null)


def test_a_receiver_that_takes_no_descriptors_drops_them(pair: tuple[socket.socket, socket.socket]) -> None:
    """The spawner's recv of a request takes none: what a daemon attaches is dropped by the kernel."""
    a, b = pair
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        before = open_fds()
        for _ in range(20):
            channel.send(a, channel.request("hello"), LIMIT, [null] * 8)
            assert channel.recv(b, LIMIT) == (channel.request("hello"), [])
        assert open_fds() == before
    finally:
        os.close(null)


def test_descriptors_on_a_later_byte_are_not_taken(pair: tuple[socket.socket, socket.socket]) -> None:
    """Only a frame's first byte may carry descriptors; on the payload they are dropped."""
    a, b = pair
    null = os.open("/dev/null", os.O_RDONLY)
    frame = wire.encode_frame({"op": "x"}, LIMIT)
    try:
        before = open_fds()
        a.sendall(frame[:4])
        socket.send_fds(a, [frame[4:]], [null, null])
        assert channel.recv(b, LIMIT, 3) == ({"op": "x"}, [])
        assert open_fds() == before
    finally:
        os.close(null)


def test_close_all_ignores_closed_descriptors() -> None:
    r, w = os.pipe()
    os.close(w)
    channel.close_all([r, w, 987654])
    with pytest.raises(OSError):
        os.fstat(r)


@settings(max_examples=150, deadline=None)
@given(raw=st.binary(max_size=40), fds=st.integers(0, 6), max_fds=st.sampled_from([0, 1, 3]))
def test_recv_of_anything_is_a_frame_an_end_or_a_protocol_error_and_leaks_nothing(
    raw: bytes, fds: int, max_fds: int
) -> None:
    a, b = socket.socketpair()
    null = os.open("/dev/null", os.O_RDONLY)
    try:
        before = fd_count()
        if raw:
            if fds:
                socket.send_fds(a, [raw], [null] * fds)
            else:
                a.sendall(raw)
        a.close()
        try:
            obj, got = channel.recv(b, 64, max_fds)
        except ProtocolError:
            assert fd_count() == before - 1  # a is closed
        else:
            assert obj is None or isinstance(obj, dict)
            assert len(got) <= max_fds
            assert len(got) == 0 or fds == len(got)
            channel.close_all(got)
            assert fd_count() == before - 1
    finally:
        os.close(null)
        b.close()
        a.close()


# --- check_request ------------------------------------------------------------------------------------

VALID = [
    {"v": 1, "op": "hello"},
    {"v": 1, "op": "load"},
    {"v": 1, "op": "secrets", "server": "demo"},
    {"v": 1, "op": "start", "server": "demo", "agent": None},
    {"v": 1, "op": "start", "server": "demo", "agent": "alice"},
    {"v": 1, "op": "stop", "server": "demo", "agent": None},
]


@pytest.mark.parametrize("req", VALID)
def test_check_request_accepts_every_request_of_the_protocol(req: dict[str, Any]) -> None:
    assert channel.check_request(dict(req)) == req["op"]


def test_the_protocol_is_closed() -> None:
    assert set(channel.REQUESTS) == {"hello", "load", "secrets", "start", "stop"}
    assert set(channel.ANSWERS) == set(channel.REQUESTS)
    # nothing but names ever crosses towards root
    keys = {k for spec in channel.REQUESTS.values() for k in spec}
    assert keys == {"server", "agent"}


@pytest.mark.parametrize(
    ("req", "why"),
    [
        ({"v": 1, "op": "exec", "command": "/bin/sh"}, "unknown op"),
        ({"v": 1, "op": "Start", "server": "demo", "agent": None}, "unknown op"),
        ({"v": 1, "op": None}, "unknown op"),
        ({"v": 1, "op": ["hello"]}, "unknown op"),
        ({"v": 1}, "unknown op"),
        ({"v": 1, "op": "hello", "server": "demo"}, "unexpected key"),
        ({"v": 1, "op": "start", "server": "demo", "agent": None, "command": "/bin/sh"}, "unexpected key"),
        ({"v": 1, "op": "start", "server": "demo", "agent": None, "env": {"LD_PRELOAD": "x"}}, "unexpected key"),
        ({"v": 1, "op": "secrets", "server": "demo", "path": "/etc/shadow"}, "unexpected key"),
        ({"v": 1, "op": "start", "server": "demo"}, "missing key"),
        ({"v": 1, "op": "start", "agent": None}, "missing key"),
        ({"v": 1, "op": "secrets"}, "missing key"),
        ({"v": 1, "op": "start", "server": 1, "agent": None}, "wrong type"),
        ({"v": 1, "op": "start", "server": None, "agent": None}, "wrong type"),
        ({"v": 1, "op": "start", "server": ["demo"], "agent": None}, "wrong type"),
        ({"v": 1, "op": "start", "server": "demo", "agent": 0}, "wrong type"),
        ({"v": 1, "op": "start", "server": "demo", "agent": False}, "wrong type"),
        ({"v": 1, "op": "secrets", "server": {"demo": 1}}, "wrong type"),
        ({"v": 1, "op": "secrets", "server": "x" * (wire.MAX_STRING + 1)}, "too long"),
        ({"v": True, "op": "hello"}, "version"),
        ({"v": 1.0, "op": "hello"}, "version"),
        ({"v": "1", "op": "hello"}, "version"),
        ({"v": 2, "op": "hello"}, "version"),
        ({"v": 0, "op": "hello"}, "version"),
        ({"op": "hello"}, "version"),
    ],
)
def test_check_request_refuses_everything_else(req: dict[str, Any], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        channel.check_request(req)


def test_check_request_takes_the_longest_string_allowed() -> None:
    assert channel.check_request({"v": 1, "op": "secrets", "server": "x" * wire.MAX_STRING}) == "secrets"


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=8,
)
_KEYS = st.sampled_from(["v", "op", "server", "agent", "command", "env"]) | st.text(max_size=6)
_VALUES = st.sampled_from([1, 2, True, None, "hello", "start", "stop", "secrets", "load", "demo"]) | _JSON


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_check_request_is_an_op_of_the_protocol_or_a_protocol_error(req: dict[str, Any]) -> None:
    try:
        op = channel.check_request(req)
    except ProtocolError:
        return
    assert op in channel.REQUESTS and req["op"] == op
    assert type(req["v"]) is int and req["v"] == channel.VERSION
    spec = channel.REQUESTS[op]
    assert set(req) == {"v", "op", *spec}
    for key, (types, _required) in spec.items():
        assert type(req[key]) in types


# --- check_answer ----------------------------------------------------------------------------------------

GOOD: dict[str, dict[str, Any]] = {
    "hello": {"op": "hello", "ok": True, "version": 1, "host": {}},
    "load": {"op": "load", "ok": True, "instances": {}, "problems": []},
    "secrets": {"op": "secrets", "ok": True, "redact": {}, "url": None, "headers": {}, "fingerprint": "f"},
    "start": {"op": "start", "ok": True, "pid": 42, "user": "mcp-srv-x", "protections": {}, "warnings": []},
    "stop": {"op": "stop", "ok": True, "stopped": False},
}


@pytest.mark.parametrize("op", sorted(GOOD))
def test_check_answer_accepts_a_good_answer(op: str) -> None:
    fds = [10, 11, 12] if op == "start" else []
    assert channel.check_answer(op, dict(GOOD[op]), fds) == GOOD[op]


def test_check_answer_accepts_a_url_string() -> None:
    answer = {**GOOD["secrets"], "url": "https://example.invalid/mcp"}
    assert channel.check_answer("secrets", answer, []) == answer


@pytest.mark.parametrize("op", sorted(GOOD))
def test_check_answer_accepts_a_refusal_without_descriptors(op: str) -> None:
    refusal = {"op": op, "ok": False, "error": "no server named 'x' is configured"}
    assert channel.check_answer(op, refusal, []) == refusal


@pytest.mark.parametrize(
    ("op", "answer", "fds", "why"),
    [
        ("start", GOOD["stop"], [], "answered 'stop' to start"),
        ("hello", {**GOOD["hello"], "op": None}, [], "answered"),
        ("hello", {"ok": True, "version": 1, "host": {}}, [], "answered"),
        ("hello", {**GOOD["hello"], "ok": 1}, [], "answered"),
        ("hello", {**GOOD["hello"], "ok": None}, [], "answered"),
        ("stop", {"op": "stop"}, [], "answered"),
        ("start", {"op": "start", "ok": False}, [], "malformed refusal"),
        ("start", {"op": "start", "ok": False, "error": 3}, [], "malformed refusal"),
        ("start", {"op": "start", "ok": False, "error": "no"}, [5, 6, 7], "malformed refusal"),
        ("stop", {"op": "stop", "ok": False, "error": "no"}, [5], "malformed refusal"),
        ("hello", {**GOOD["hello"], "version": True}, [], "bad 'version'"),
        ("hello", {**GOOD["hello"], "version": "1"}, [], "bad 'version'"),
        ("hello", {"op": "hello", "ok": True, "version": 1}, [], "bad 'host'"),
        ("load", {**GOOD["load"], "problems": {}}, [], "bad 'problems'"),
        ("secrets", {**GOOD["secrets"], "url": 5}, [], "bad 'url'"),
        ("secrets", {**GOOD["secrets"], "fingerprint": None}, [], "bad 'fingerprint'"),
        ("start", {**GOOD["start"], "pid": True}, [5, 6, 7], "bad 'pid'"),
        ("start", {**GOOD["start"], "pid": 4.2}, [5, 6, 7], "bad 'pid'"),
        ("start", {**GOOD["start"], "warnings": "none"}, [5, 6, 7], "bad 'warnings'"),
        ("stop", {**GOOD["stop"], "stopped": 1}, [], "bad 'stopped'"),
        ("start", GOOD["start"], [], "0 descriptors"),
        ("start", GOOD["start"], [5, 6], "2 descriptors"),
        ("start", GOOD["start"], [5, 6, 7, 8], "4 descriptors"),
        ("hello", GOOD["hello"], [5], "1 descriptors"),
        ("stop", GOOD["stop"], [5, 6, 7], "3 descriptors"),
        ("secrets", GOOD["secrets"], [5], "1 descriptors"),
    ],
)
def test_check_answer_refuses_a_bad_answer(op: str, answer: dict[str, Any], fds: list[int], why: str) -> None:
    with pytest.raises(ProtocolError, match=why):
        channel.check_answer(op, answer, fds)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(sorted(channel.ANSWERS)),
    answer=st.dictionaries(
        st.sampled_from(["op", "ok", "error", "version", "host", "pid", "user", "stopped", "url"])
        | st.text(max_size=4),
        st.sampled_from(["hello", "start", "stop", True, False, 1, None, "x", {}, []]) | _JSON,
        max_size=6,
    ),
    nfds=st.sampled_from([0, 0, 1, 3]),
)
def test_check_answer_returns_a_checked_answer_or_a_protocol_error(op: str, answer: dict[str, Any], nfds: int) -> None:
    fds = list(range(100, 100 + nfds))
    try:
        checked = channel.check_answer(op, answer, fds)
    except ProtocolError:
        return
    assert checked["op"] == op and type(checked["ok"]) is bool
    if checked["ok"]:
        assert nfds == (channel.START_FDS if op == "start" else 0)
        for key, types in channel.ANSWERS[op].items():
            assert type(checked[key]) in types
    else:
        assert type(checked["error"]) is str and nfds == 0
