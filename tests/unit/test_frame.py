"""Unit and property tests for ``broker.gate.verbs.read_frame``: a call's arguments on the gate's stdin.

The ``mcp`` shim (and ``agent.helper.frame``, byte for byte the same) sends
``mcp-args 1 N S``, then N items, each ``\\n`` LENGTH SPACE BYTES, and for
``--args -`` one ``\\n`` and S bytes of the agent's stdin. Every test reads
from a real pipe, written by a thread (a frame may be larger than the
pipe's buffer):

- a round trip through :func:`agent.helper.frame` gives back exactly the
  items and the stdin text, whatever they hold (newlines, spaces, non-ASCII,
  the shim's heredoc word on its own line, ``-``, empty strings, bytes that
  are not UTF-8);
- every malformed, cut-short, oversized or wrong-version frame is a
  ``UsageError`` (exit 64), never another exception, and never waits past
  ``wait``, also while the writer keeps the pipe open and silent or trickles
  bytes;
- a frame is read exactly: what follows it is not needed (an agent's harness
  may leave stdin open), and it is never read as part of the frame.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.helper import frame
from broker.core.errors import EX_USAGE, UsageError
from broker.gate import verbs
from broker.gate.verbs import MAX_ARGC, MAX_ARGV_BYTES, MAX_STDIN_BYTES, read_frame

#: a short wait: every refusal of a frame that never completes must come within it (plus scheduling slack)
WAIT = 0.2
SLACK = 1.5


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


@contextlib.contextmanager
def piped(data: bytes, *, close: bool) -> Iterator[int]:
    """The read end of a pipe a thread writes ``data`` to; with ``close=False`` the writer stays open after it."""
    r, w = os.pipe()

    def feed() -> None:
        try:
            with contextlib.suppress(OSError):  # the reader gave up (a refused frame): EPIPE
                _write_all(w, data)
        finally:
            if close:
                os.close(w)

    writer = threading.Thread(target=feed, daemon=True)
    writer.start()
    try:
        yield r
    finally:
        os.close(r)
        writer.join(5)
        assert not writer.is_alive()
        if not close:
            os.close(w)


def read(data: bytes, *, close: bool = True, wait: float = 5.0) -> tuple[list[str], str | None]:
    with piped(data, close=close) as r:
        return read_frame(r, wait)


def refused(data: bytes, *, close: bool, wait: float = WAIT) -> UsageError:
    """Assert that ``data`` is refused with a UsageError within ``wait`` (plus slack); return the error."""
    start = time.monotonic()
    with piped(data, close=close) as r:
        try:
            got = read_frame(r, wait)
        except UsageError as exc:
            error = exc
        else:
            pytest.fail(f"accepted {data[:80]!r} as {got!r}")
    took = time.monotonic() - start
    assert took < wait + SLACK, f"blocked {took:.2f}s on {data[:80]!r}"
    assert error.exit_code == EX_USAGE == 64
    assert str(error) and "\n" not in str(error)
    return error


# --- round trips ----------------------------------------------------------------------------------------

#: text the shim and the gate must carry untouched (no lone surrogates: argv holds bytes, see below)
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)
HOSTILE = st.sampled_from(
    [
        "",
        "-",
        "--",
        "--args",
        "--args=-",
        "MCP_PRIVSEP_ARGUMENTS",
        "\nMCP_PRIVSEP_ARGUMENTS\n",
        "MCP_PRIVSEP_ARGUMENTS\n",
        "a\nb",
        "\n",
        "\n\n",
        " ",
        "k= v ",
        "$f",
        "`id`",
        "$(id)",
        "\\",
        "'\"",
        "mcp-args 1 0 0",
        "\nmcp-args 1 1 0\n3 abc",
        "3 abc",
        "\x00",
        "\t\r\x0b\x0c",
        "é",
        "日本語",
        "\U0001f600",
        "\u2028",
        "\udcff\udc80",  # argv bytes that are not UTF-8, as Python decodes them (surrogateescape)
    ]
)
ITEMS = st.lists(st.one_of(HOSTILE, TEXT, TEXT.map(lambda s: f"k={s}")), max_size=12)
#: stdin is what --args - reads: it must be UTF-8 (surrogate escapes of bytes that are not are refused)
_UTF8 = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)
STDINS = st.one_of(
    st.none(), st.just(""), _UTF8, HOSTILE.filter(lambda s: "\udc80" not in s and "\udcff" not in s),
    st.just('{"text": "a\\nMCP_PRIVSEP_ARGUMENTS\\n"}'),
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(items=ITEMS, stdin=STDINS)
@example(items=[], stdin=None)
@example(items=["MCP_PRIVSEP_ARGUMENTS"], stdin="MCP_PRIVSEP_ARGUMENTS\n")
@example(items=["", "", "-"], stdin="\n")
def test_round_trip_with_the_helper_s_frame(items: list[str], stdin: str | None) -> None:
    got = read(frame(items, stdin))
    assert got == (items, stdin or None)  # an empty stdin is sent as none at all


@settings(max_examples=100, deadline=None)
@given(raw=st.lists(st.binary(max_size=20), max_size=6), data=st.binary(max_size=40))
def test_argument_bytes_that_are_not_utf8_survive_as_surrogate_escapes_stdin_is_refused(
    raw: list[bytes], data: bytes
) -> None:
    """Items keep their bytes (the gate's own parser refuses those that are not UTF-8, as for argv);
    what ``--args -`` read must be UTF-8, or the frame is refused (never passed on altered)."""
    items = [b.decode("utf-8", "surrogateescape") for b in raw]
    stdin = data.decode("utf-8", "surrogateescape")
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(UsageError, match="not valid UTF-8"):
            read(frame(items, stdin))
        return
    got_items, got_stdin = read(frame(items, stdin))
    assert [i.encode("utf-8", "surrogateescape") for i in got_items] == raw
    assert (got_stdin or "").encode("utf-8") == data


def test_the_frame_layout_is_what_the_gate_reads() -> None:
    assert read(b"mcp-args 1 0 0\n") == ([], None)
    assert read(b"mcp-args 1 1 0\n1 x") == (["x"], None)  # the final newline is not needed
    assert read(b"mcp-args 1 2 0\n3 a=1\n0 ") == (["a=1", ""], None)
    assert read(b"mcp-args 1 1 4\n1 -\n{}\n\n") == (["-"], "{}\n\n")
    assert read(b"mcp-args 1 1 0\n7 a\nb\nc d") == (["a\nb\nc d"], None)
    assert read(b"mcp-args 1 1 0\n2 \xc3\xa9") == (["é"], None)  # lengths count bytes
    assert read(b"mcp-args 1 01 0\n003 abc") == (["abc"], None)


def test_a_frame_at_the_caps_is_read() -> None:
    items = ["k=" + "x" * (MAX_ARGV_BYTES - 2)] + [""] * (MAX_ARGC - 1)
    stdin = "é" * (MAX_STDIN_BYTES // 2)
    assert len(stdin.encode()) == MAX_STDIN_BYTES
    assert read(frame(items, stdin)) == (items, stdin)


def test_a_large_frame_arrives_in_pieces_and_the_writer_may_stay_open() -> None:
    items = ["a" * 100_000, "b\n" * 50_000, "c"]
    stdin = "{}" + " " * 300_000
    assert read(frame(items, stdin), close=False) == (items, stdin)


# --- what follows a frame -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "tail",
    [b"", b"\n", b"EXTRA", b"\nmcp-args 1 1 0\n5 other", b"\x00" * 70_000, b"MCP_PRIVSEP_ARGUMENTS\n"],
    ids=["nothing", "newline", "word", "another frame", "70 KB", "heredoc word"],
)
@pytest.mark.parametrize("stdin", [None, '{"a": 1}'], ids=["no stdin", "stdin"])
def test_a_frame_is_read_exactly_and_what_follows_is_not_needed(tail: bytes, stdin: str | None) -> None:
    items = ["text=hi", "--json"]
    start = time.monotonic()
    got = read(frame(items, stdin) + tail, close=False, wait=5.0)
    assert got == (items, stdin)
    assert time.monotonic() - start < 2.0, "waited for more than the frame"


def test_a_frame_without_its_final_newline_and_an_open_writer_is_not_waited_for() -> None:
    start = time.monotonic()
    assert read(frame(["x"], "y")[:-1], close=False, wait=5.0) == (["x"], "y")
    assert time.monotonic() - start < 2.0


# --- refusals -------------------------------------------------------------------------------------------

GOOD = frame(["text=hi", "a\nb"], '{"n": 1}')

MALFORMED = [
    (b"", "no argument frame|cut short"),
    (b"m", "no argument frame|cut short"),
    (b"mcp-args", "no argument frame|cut short"),
    (b"mcp-args ", "no argument frame|cut short"),
    (b"text=hi\nmore=1\n", "no argument frame"),
    (b"MCP-ARGS 1 0 0\n", "no argument frame"),
    (b"mcp-argz 1 0 0\n", "no argument frame"),
    (b" mcp-args 1 0 0\n", "no argument frame"),
    (b"mcp-args\t1 0 0\n", "no argument frame"),
    (b"\xef\xbb\xbfmcp-args 1 0 0\n", "no argument frame"),  # a BOM
    (b"mcp-args 2 0 0\n", "another version"),
    (b"mcp-args 0 0 0\n", "another version"),
    (b"mcp-args 10 0 0\n", "another version"),
    (b"mcp-args 1.0 0 0\n", "another version"),
    (b"mcp-args  1 0 0\n", "another version"),
    (b"mcp-args x 0 0\n", "another version"),
    (b"mcp-args 1\n0 0\n", "another version"),
    (b"mcp-args 1 x 0\n", "malformed"),
    (b"mcp-args 1 -1 0\n", "malformed"),
    (b"mcp-args 1 +1 0\n", "malformed"),
    (b"mcp-args 1  0 0\n", "malformed"),
    (b"mcp-args 1 0\n", "malformed"),
    (b"mcp-args 1 0 0 \n", "malformed"),
    (b"mcp-args 1 0 x\n", "malformed"),
    (b"mcp-args 1 0 \n", "malformed"),
    (b"mcp-args 1 0 0x10\n", "malformed"),
    (b"mcp-args 1 \xd9\xa1 0\n", "malformed"),  # an Arabic-Indic digit
    (b"mcp-args 1 00000000001 0\n", "malformed"),  # more than ten digits
    (b"mcp-args 1 0 1e3\n", "malformed"),
    (b"mcp-args 1 1 0\nx3 abc", "malformed"),
    (b"mcp-args 1 1 0\n3abc", "malformed"),
    (b"mcp-args 1 1 0\n 3 abc", "malformed"),
    (b"mcp-args 1 1 0\n-3 abc", "malformed"),
    (b"mcp-args 1 1 0\r\n3 abc", "malformed"),
    (b"mcp-args 1 2 0\n3 abcX1 d", "malformed"),  # an item longer than its length
    (b"mcp-args 1 1 0\n\n3 abc", "malformed"),
    (b"mcp-args 1 1 0\n3\nabc", "malformed"),
    (b"mcp-args 1 0 2\r{}", "malformed"),
    (b"mcp-args 1 0 2 {}", "malformed"),
    (b"mcp-args 1 1 2\n1 -{}}", "malformed"),
    (f"mcp-args 1 {MAX_ARGC + 1} 0\n".encode(), "too many or too large"),
    (f"mcp-args 1 0 {MAX_STDIN_BYTES + 1}\n".encode(), "too many or too large"),
    (b"mcp-args 1 9999999999 0\n", "too many or too large"),
    (b"mcp-args 1 0 9999999999\n", "too many or too large"),
]
#: frames that are fine so far but end too soon: EOF says "cut short", an open, silent writer runs out the wait
SHORT = [
    b"mcp-args 1",
    b"mcp-args 1 0 0",  # the header's own newline ends its last number
    b"mcp-args 1 ",
    b"mcp-args 1 1",
    b"mcp-args 1 1 0",
    b"mcp-args 1 1 0\n",
    b"mcp-args 1 1 0\n3",
    b"mcp-args 1 1 0\n3 ",
    b"mcp-args 1 1 0\n3 ab",
    b"mcp-args 1 0 3\n",
    b"mcp-args 1 0 3\n{}",
    b"mcp-args 1 2 0\n1 a",
    b"mcp-args 1 1 0\n999999999 abc",
    GOOD[: len(GOOD) // 2],
    GOOD[:-3],
]


@pytest.mark.parametrize(("data", "words"), MALFORMED, ids=lambda v: repr(v)[:40] if isinstance(v, bytes) else None)
@pytest.mark.parametrize("close", [True, False], ids=["eof", "open"])
def test_a_malformed_frame_is_a_usage_error_in_time(data: bytes, words: str, close: bool) -> None:
    error = refused(data, close=close)
    import re

    assert re.search(words, str(error)), str(error)


@pytest.mark.parametrize("data", SHORT, ids=lambda v: repr(v)[:40])
def test_a_frame_cut_short_by_eof_is_a_usage_error(data: bytes) -> None:
    assert "cut short" in str(refused(data, close=True))


@pytest.mark.parametrize("data", SHORT, ids=lambda v: repr(v)[:40])
def test_a_frame_left_unfinished_on_an_open_pipe_times_out(data: bytes) -> None:
    start = time.monotonic()
    error = refused(data, close=False)
    assert time.monotonic() - start >= WAIT * 0.9  # it waited for the rest, as long as it may
    assert "no argument frame" in str(error)


def test_nothing_on_an_open_pipe_times_out_after_wait() -> None:
    for wait in (0.05, 0.3):
        start = time.monotonic()
        error = refused(b"", close=False, wait=wait)
        took = time.monotonic() - start
        assert wait * 0.9 <= took < wait + SLACK
        assert "run mcp calls through the 'mcp' command" in str(error)


def test_a_zero_wait_never_blocks() -> None:
    refused(b"", close=False, wait=0.0)
    refused(b"mcp-args 1 1 0\n", close=False, wait=0.0)


def test_a_trickling_writer_cannot_stretch_the_wait() -> None:
    """One byte now and then keeps the pipe busy, but the deadline is for the whole frame."""
    r, w = os.pipe()
    stop = threading.Event()
    data = iter(frame(["x" * 10_000], None))

    def trickle() -> None:
        for byte in data:
            if stop.wait(0.02):
                break
            try:
                os.write(w, bytes([byte]))
            except OSError:
                break

    writer = threading.Thread(target=trickle, daemon=True)
    writer.start()
    start = time.monotonic()
    try:
        with pytest.raises(UsageError, match="no argument frame"):
            read_frame(r, 0.3)
        assert time.monotonic() - start < 0.3 + SLACK
    finally:
        stop.set()
        writer.join(5)
        os.close(r)
        os.close(w)


@pytest.mark.parametrize("close", [True, False], ids=["eof", "open"])
def test_an_oversized_frame_is_refused_without_reading_it_all(close: bool) -> None:
    limit = MAX_ARGV_BYTES + MAX_STDIN_BYTES + 64 * (MAX_ARGC + 2)
    length = 3 * limit
    data = b"mcp-args 1 1 0\n%d " % length + b"x" * length
    start = time.monotonic()
    error = refused(data, close=close, wait=10.0)
    assert f"exceed {limit} bytes" in str(error)
    assert time.monotonic() - start < 5.0


def test_items_over_the_argv_cap_are_read_and_left_to_the_parser() -> None:
    """read_frame caps its whole input; the argv caps are parse_argv's, as for a command line."""
    items = ["k=" + "x" * MAX_ARGV_BYTES]
    got, _ = read(frame(items, None))
    assert got == items
    with pytest.raises(UsageError, match=f"exceed {MAX_ARGV_BYTES} bytes"):
        verbs.parse_argv(["call", "demo.echo", *got], None)


# --- fuzz: random and mutated frames -------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
@example(b"mcp-args 1 0 0\n")
@example(b"mcp-args 1 1 0\n0 ")
def test_random_bytes_are_a_frame_or_a_usage_error(data: bytes) -> None:
    try:
        items, stdin = read(data, wait=WAIT)
    except UsageError as exc:
        assert exc.exit_code == 64
        return
    assert data.startswith(b"mcp-args 1 ")
    assert all(isinstance(i, str) for i in items) and (stdin is None or isinstance(stdin, str))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    items=ITEMS,
    stdin=STDINS,
    cut=st.none() | st.integers(min_value=0, max_value=400),
    flips=st.lists(st.tuples(st.integers(min_value=0, max_value=400), st.integers(0, 255)), max_size=3),
    close=st.booleans(),
)
def test_mutated_frames_are_read_or_refused_in_time(
    items: list[str], stdin: str | None, cut: int | None, flips: list[tuple[int, int]], close: bool
) -> None:
    data = bytearray(frame(items, stdin))
    for at, value in flips:
        data[at % len(data)] = value
    if cut is not None:
        data = data[: max(0, len(data) - cut)]
    start = time.monotonic()
    try:
        read(bytes(data), close=close, wait=0.05)
    except UsageError as exc:
        assert exc.exit_code == 64
    assert time.monotonic() - start < 0.05 + SLACK


# --- the descriptor itself -----------------------------------------------------------------------------


# read_frame reports a descriptor it cannot read (closed, or open for writing only) as a usage error naming
# standard input (it used to raise OSError, which run() took for a broken stdout).
def test_an_unreadable_descriptor_is_a_usage_error() -> None:
    fd = os.open("/dev/null", os.O_WRONLY)
    try:
        with pytest.raises(UsageError):
            read_frame(fd, WAIT)
    finally:
        os.close(fd)
