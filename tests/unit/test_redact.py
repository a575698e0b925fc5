"""Secret redaction: every field, every common encoding, across blocks, and a marker that names nothing.

The encodings are the ones a leaking server was seen to get through (issue
17): percent-encoding in any case and partial, hex with separators or
``0x``, base64 and base64url at all three byte offsets and line-wrapped,
JSON escapes, a secret split across two blocks, a numeric secret as a JSON
number; and their neighbours (HTML references, zero-width characters).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from broker.daemon.redact import MARKER, MIN_SECRET_LENGTH, Redactor

SECRET = "s3cr3t-T0ken/with+chars=="
NAMED = {"svc.TOKEN": SECRET}


def _wrap(text: str, width: int = 16) -> str:
    return "\n".join(text[i : i + width] for i in range(0, len(text), width))


def _pct_lower(raw: bytes) -> str:
    return "".join(f"%{b:02x}" for b in raw)


#: (name, how a server might spell the secret): every one must come out without it
ENCODINGS: list[tuple[str, Callable[[str], str]]] = [
    ("plain", lambda s: f"token={s};"),
    ("percent, upper", lambda s: quote(s, safe="")),
    ("percent, lower", lambda s: _pct_lower(s.encode())),
    ("percent, plus for space", lambda s: quote_plus(s)),
    ("percent, partial", lambda s: s[:5] + quote(s[5:], safe="")),
    (
        "percent, every byte, mixed case",
        lambda s: "".join(f"%{b:02X}" if i % 2 else f"%{b:02x}" for i, b in enumerate(s.encode())),
    ),
    ("percent, twice-partial", lambda s: s[:3] + _pct_lower(s[3:9].encode()) + s[9:]),
    ("hex", lambda s: s.encode().hex()),
    ("HEX", lambda s: s.encode().hex().upper()),
    ("hex with colons", lambda s: ":".join(f"{b:02x}" for b in s.encode())),
    ("hex with spaces", lambda s: " ".join(f"{b:02X}" for b in s.encode())),
    ("hex with dashes", lambda s: "-".join(f"{b:02x}" for b in s.encode())),
    ("hex 0x each", lambda s: " ".join(f"0x{b:02x}" for b in s.encode())),
    ("hex 0x, comma list", lambda s: ", ".join(f"0x{b:02X}" for b in s.encode())),
    ("hex one 0x number", lambda s: "0x" + s.encode().hex()),
    ("hex \\x escapes", lambda s: "".join(f"\\x{b:02x}" for b in s.encode())),
    ("hex inside a dump", lambda s: "dump: 00ff" + s.encode().hex() + "00ff end"),
    ("base64", lambda s: base64.b64encode(s.encode()).decode()),
    ("base64url", lambda s: base64.urlsafe_b64encode(s.encode()).decode()),
    ("base64, unpadded", lambda s: base64.b64encode(s.encode()).decode().rstrip("=")),
    ("base64 at offset 1", lambda s: base64.b64encode(b"x" + s.encode()).decode()),
    ("base64 at offset 2", lambda s: base64.b64encode(b"xy" + s.encode()).decode()),
    ("base64url at offset 1", lambda s: base64.urlsafe_b64encode(b"\xfb" + s.encode()).decode()),
    ("base64url at offset 2", lambda s: base64.urlsafe_b64encode(b"\xfb\xff" + s.encode()).decode()),
    ("base64, line-wrapped", lambda s: _wrap(base64.b64encode(b"header:" + s.encode() + b":trailer").decode())),
    ("base64, CRLF-wrapped", lambda s: base64.encodebytes(b"q" * 50 + s.encode()).decode().replace("\n", "\r\n")),
    ("base64 in a JSON string", lambda s: json.dumps({"blob": _wrap(base64.b64encode(s.encode()).decode(), 8)})),
    ("JSON \\u escapes", lambda s: "".join(f"\\u{ord(c):04x}" for c in s)),
    ("JSON \\u escapes, upper", lambda s: "".join(f"\\u{ord(c):04X}" for c in s)),
    ("JSON \\u escapes, partial", lambda s: s[:4] + "".join(f"\\u{ord(c):04x}" for c in s[4:10]) + s[10:]),
    ("JSON, escaped slash", lambda s: json.dumps(s)[1:-1].replace("/", "\\/")),
    ("HTML decimal references", lambda s: "".join(f"&#{ord(c)};" for c in s)),
    ("HTML hex references", lambda s: "".join(f"&#x{ord(c):X};" for c in s)),
    ("spaced out", lambda s: " ".join(s)),
    ("zero-width joined", lambda s: "\u200b".join(s)),
    ("split by an escaped newline", lambda s: s[:7] + "\\n" + s[7:]),
    ("split by a newline", lambda s: s[:9] + "\n" + s[9:]),
]


@pytest.mark.parametrize(("name", "spell"), ENCODINGS, ids=[e[0] for e in ENCODINGS])
def test_every_encoding_is_redacted_and_the_marker_names_nothing(name: str, spell: Callable[[str], str]) -> None:
    r = Redactor(NAMED)
    text = spell(SECRET)
    hits: set[str] = set()
    out = r.text(text, hits)
    assert MARKER in out, (name, text, out)
    assert not r.detect(out), (name, out)  # no view of what is left holds the secret
    assert SECRET not in out and "svc" not in out and "TOKEN" not in out
    assert hits == {"svc.TOKEN"}  # the operator's record says which


def test_there_are_at_least_35_encodings() -> None:
    assert len(ENCODINGS) >= 35


def test_the_text_around_a_secret_is_kept() -> None:
    r = Redactor(NAMED)
    assert r.text(f"before {SECRET} after") == f"before {MARKER} after"
    assert r.text(f"a={quote(SECRET, safe='')}&b=2") == f"a={MARKER}&b=2"
    assert r.text(f"x {SECRET.encode().hex()} y") == f"x {MARKER} y"


@given(st.binary(max_size=20), st.binary(max_size=20), st.sampled_from([base64.b64encode, base64.urlsafe_b64encode]))
@example(b"", b"", base64.b64encode)
def test_base64_of_secret_inside_any_blob_is_redacted(prefix: bytes, suffix: bytes, encode: object) -> None:
    r = Redactor(NAMED)
    assert callable(encode)
    blob = encode(prefix + SECRET.encode() + suffix).decode()
    out = r.text(blob)
    assert MARKER in out
    assert not r.detect(out)
    # no 8-character window of the secret's own encoding survives
    core = encode(SECRET.encode()).decode()[4:-8]
    assert core not in out


@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=40), st.text(max_size=40))
def test_redaction_never_leaves_the_secret_readable(before: str, after: str) -> None:
    r = Redactor(NAMED)
    out = r.text(before + SECRET + after)
    assert not r.detect(out) and SECRET not in out


def test_a_numeric_secret_returned_as_a_number_is_redacted() -> None:
    r = Redactor({"bank.PIN": "31415926535"})
    hits: set[str] = set()
    out = r.deep({"balance": 12, "account": 31415926535, "as_float": 31415926535.0, "list": [1, 31415926535]}, hits)
    assert out["balance"] == 12 and out["account"] == MARKER and out["list"] == [1, MARKER]
    assert "31415926535" not in json.dumps(out)
    assert hits == {"bank.PIN"}


def test_deep_redacts_keys_and_nested_values() -> None:
    r = Redactor({"a.K": SECRET})
    value = {"x": [SECRET, {"y": f"pre {SECRET} post"}], SECRET: 1, "n": 5, "b": True}
    out = r.deep(value)
    assert SECRET not in repr(out)
    assert out["n"] == 5 and out["b"] is True


def test_a_secret_split_across_values_is_found_jointly() -> None:
    r = Redactor(NAMED)
    pieces = [f"the token is {SECRET[:10]}", f"{SECRET[10:]} (two blocks)", "unrelated"]
    assert r.deep(pieces) == pieces  # no one piece holds it
    hits: set[str] = set()
    out = r.joint(pieces, hits)
    assert out == [f"the token is {MARKER}", f"{MARKER} (two blocks)", "unrelated"]
    assert hits == {"svc.TOKEN"} and not r.detect("\n".join(out))


def test_found_names_secrets_anywhere_in_arguments() -> None:
    r = Redactor({"mail.PASSWORD": "correct-horse-battery", "ha.TOKEN": "eyJhbGciOiJIUzI1NiJ9xyz"})
    assert r.found({"text": "guess1 guess2"}) == set()
    assert r.found({"text": "guess1 correct-horse-battery"}) == {"mail.PASSWORD"}
    assert r.found({"correct%2Dhorse%2Dbattery": 1}) == {"mail.PASSWORD"}  # a key, percent-encoded
    assert r.found([["text", base64.b64encode(b"eyJhbGciOiJIUzI1NiJ9xyz").decode()]]) == {"ha.TOKEN"}


def test_one_marker_for_every_secret() -> None:
    r = Redactor({"a.ONE": "first-secret-value", "b.TWO": "second-secret-value"})
    assert r.text("first-secret-value / second-secret-value") == f"{MARKER} / {MARKER}"


def test_short_values_are_not_redacted() -> None:
    short = "x" * (MIN_SECRET_LENGTH - 1)
    r = Redactor({"a.SHORT": short})
    assert r.text(f"the {short} stays") == f"the {short} stays"


def test_no_secrets_is_identity() -> None:
    r = Redactor({})
    value = {"a": ["b"]}
    assert r.deep(value) is value
    assert r.joint(["a", "b"]) == ["a", "b"]


def test_a_result_without_a_secret_is_returned_as_is() -> None:
    r = Redactor(NAMED)
    value = {"content": [{"type": "text", "text": "hello " * 100}], "n": 3}
    assert r.deep(value) is value


def test_what_cannot_be_placed_is_blanked_whole() -> None:
    # a secret readable only after two encodings in a row (percent-encoded hex): detection sees it through the
    # percent view's hex view, the locating pattern models one encoding at a time: the whole value goes
    r = Redactor(NAMED)
    nested = quote(":".join(f"{b:02x}" for b in SECRET.encode()), safe="")
    assert r.text(f"keep? {nested}") == MARKER
