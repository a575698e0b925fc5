"""Secret redaction: plain, URL-encoded, hex and base64 at every alignment."""

from __future__ import annotations

import base64
from urllib.parse import quote, quote_plus

from hypothesis import given
from hypothesis import strategies as st

from broker.daemon.redact import MIN_SECRET_LENGTH, Redactor

SECRET = "s3cr3t-T0ken/with+chars=="


def test_every_encoding_is_redacted() -> None:
    r = Redactor({"svc.TOKEN": SECRET})
    raw = SECRET.encode()
    for text in (
        f"token={SECRET};",
        quote(SECRET, safe=""),
        quote_plus(SECRET),
        raw.hex(),
        base64.b64encode(raw).decode(),
        base64.urlsafe_b64encode(raw).decode(),
    ):
        out = r.text(text)
        assert "[REDACTED:svc.TOKEN]" in out, text
        assert SECRET not in out


@given(st.binary(max_size=20), st.binary(max_size=20), st.sampled_from([base64.b64encode, base64.urlsafe_b64encode]))
def test_base64_of_secret_inside_any_blob_is_redacted(prefix: bytes, suffix: bytes, encode: object) -> None:
    r = Redactor({"svc.TOKEN": SECRET})
    assert callable(encode)
    blob = encode(prefix + SECRET.encode() + suffix).decode()
    out = r.text(blob)
    assert "[REDACTED:svc.TOKEN]" in out
    # no 8-character window of the secret's own encoding survives
    core = encode(SECRET.encode()).decode()[4:-8]
    assert core not in out


def test_deep_redacts_keys_and_nested_values() -> None:
    r = Redactor({"a.K": SECRET})
    value = {"x": [SECRET, {"y": f"pre {SECRET} post"}], SECRET: 1, "n": 5, "b": True}
    out = r.deep(value)
    assert SECRET not in repr(out)
    assert out["n"] == 5 and out["b"] is True


def test_short_values_are_not_redacted() -> None:
    short = "x" * (MIN_SECRET_LENGTH - 1)
    r = Redactor({"a.SHORT": short})
    assert r.text(f"the {short} stays") == f"the {short} stays"


def test_no_secrets_is_identity() -> None:
    r = Redactor({})
    value = {"a": ["b"]}
    assert r.deep(value) is value
