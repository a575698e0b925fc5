"""The shared fake daemon (``tests/fakes.py``) does what the gate and stdio tests rely on.

Each behaviour is checked through the real client (``broker.core.wire``):
canned and per-request answers, an interim frame before the answer, a
dropped request, garbage, validation on or off (protocol v2: a request
naming its caller is refused), persistent connections, the counters and
recordings (the peer's uid too), ``reset()`` and ``close_all()``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from broker.core import wire
from broker.core.errors import Unavailable
from tests.fakes import FakeDaemon, Reply, by_op


@pytest.fixture
def sock_path(tmp_root: str) -> str:
    return f"{tmp_root}/run/gate.sock"


@pytest.fixture
def made(sock_path: str) -> Iterator[list[FakeDaemon]]:
    daemons: list[FakeDaemon] = []
    yield daemons
    for d in daemons:
        d.close()


def start(made: list[FakeDaemon], path: str, *args: Any, **kwargs: Any) -> FakeDaemon:
    d = FakeDaemon(path, *args, **kwargs)
    made.append(d)
    return d


def ask(path: str, op: str = "list", on_pending: Any = None, **fields: Any) -> Any:
    message = wire.request(op, **fields)
    return wire.exchange(path, message, 5.0, None, on_pending)


def test_the_default_answers_like_a_daemon(made: list[FakeDaemon], sock_path: str) -> None:
    d = start(made, sock_path)
    assert ask(sock_path, "list") == by_op({"op": "list"})
    assert ask(sock_path, "status") == by_op({"op": "status"})
    assert by_op({"op": "call"}, refuse=75) == {"ok": False, "exit": 75, "error": "refused with 75"}
    assert by_op({"op": "report"}, refuse=75) == {"ok": True, "result": None}
    assert [r["op"] for r in d.requests] == ["list", "status"]
    assert d.requests[0] == {"v": wire.PROTOCOL_VERSION, "op": "list"}
    assert d.connections == 2 and len(d.frames) == 2
    assert d.peer_uids == [os.getuid(), os.getuid()]  # the kernel's word, as the real daemon reads it


@pytest.mark.parametrize("fields", [{"caller": "alice"}, {"uid": 1000}, {"caller": "alice", "uid": 1000}])
def test_a_request_naming_its_caller_is_refused_like_the_daemon_does(
    made: list[FakeDaemon], sock_path: str, fields: dict[str, Any]
) -> None:
    d = start(made, sock_path)
    with pytest.raises(Unavailable):
        wire.exchange(sock_path, wire.request("list", **fields), 5.0, None)
    assert d.requests == [] and len(d.frames) == 1
    assert ask(sock_path) == by_op({"op": "list"})  # the listener lives on


def test_a_canned_answer_and_what_was_asked(made: list[FakeDaemon], sock_path: str) -> None:
    d = start(made, sock_path, {"ok": True, "result": {"text": "hi"}})
    assert ask(sock_path, "call", tool="demo.echo", kv=[["text", "x"]], args={"text": "y"}, timeout=None) == {
        "ok": True,
        "result": {"text": "hi"},
    }
    assert d.calls() == ["y"] and d.calls("missing") == ["None"]
    assert [r["tool"] for r in d.ops("call")] == ["demo.echo"] and d.ops("list") == []
    assert wire.decode_payload(d.frames[0]) == d.requests[0]


def test_an_interim_frame_then_the_answer(made: list[FakeDaemon], sock_path: str) -> None:
    start(made, sock_path, lambda req: [{"pending": "ab12", "wait": 1}, {"ok": True, "result": None}])
    said: list[str] = []
    assert ask(sock_path, on_pending=said.append) == {"ok": True, "result": None}
    assert said == ["ab12"]


@pytest.mark.parametrize("reply", [None, b"\x00\x00\x00\x05nope!"], ids=["dropped", "garbage"])
def test_a_dropped_or_garbled_answer_is_unavailable(made: list[FakeDaemon], sock_path: str, reply: Reply) -> None:
    d = start(made, sock_path, lambda req: reply)
    with pytest.raises(Unavailable, match="broker unavailable"):
        ask(sock_path)
    assert len(d.requests) == 1  # the request was read before the connection went


def test_an_invalid_request_is_recorded_only_without_validation(made: list[FakeDaemon], tmp_root: str) -> None:
    strict = start(made, f"{tmp_root}/a/gate.sock")
    loose = start(made, f"{tmp_root}/b/gate.sock", validate=False)
    with pytest.raises(Unavailable):
        wire.exchange(strict.path, {"v": wire.PROTOCOL_VERSION, "op": "bogus"}, 5.0, None)
    assert strict.requests == [] and len(strict.frames) == 1  # read, refused, the connection closed
    old = wire.request("list", caller="alice", uid=1000)
    assert wire.exchange(loose.path, {"v": wire.PROTOCOL_VERSION, "op": "bogus"}, 5.0, None)["ok"] is True
    assert wire.exchange(loose.path, old, 5.0, None)["ok"] is True
    assert loose.requests == [{"v": wire.PROTOCOL_VERSION, "op": "bogus"}, old]


def test_connections_persist_and_are_counted(made: list[FakeDaemon], sock_path: str) -> None:
    d = start(made, sock_path, delay=0.05)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        for _ in range(3):
            s.sendall(wire.encode_frame(wire.request("status")))
            n = wire.frame_length(wire.recv_exact(s, 4), wire.MAX_RESPONSE_BYTES)
            assert wire.decode_payload(wire.recv_exact(s, n))["ok"] is True
    assert d.connections == 1 and len(d.requests) == 3 and d.max_active == 1


def test_reset_forgets_and_restores_the_answer(made: list[FakeDaemon], sock_path: str) -> None:
    d = start(made, sock_path)
    d.answer = {"ok": False, "exit": 77, "error": "no"}
    assert ask(sock_path)["exit"] == 77
    d.reset()
    assert d.requests == [] and d.frames == [] and d.peer_uids == []
    assert ask(sock_path) == by_op({"op": "list"})


def test_close_all_ends_open_connections(made: list[FakeDaemon], sock_path: str) -> None:
    d = start(made, sock_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(sock_path)
        deadline = time.monotonic() + 5
        while not d.conns:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        d.close_all()
        s.settimeout(5)
        assert s.recv(1) == b""  # closed by the fake
