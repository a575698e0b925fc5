"""Unit tests for the bounds on what the daemon puts in an audit record.

Every record must fit in the space the log keeps reserved past its end
(``audit.RESERVE_LOW``), whatever an agent sends or a server answers: long
reasons are cut with a count, and argument key lists are capped with their
total kept.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker.daemon import audit
from broker.daemon.records import MAX_AUDIT_KEYS, MAX_AUDIT_TEXT, argument_fields, bounded


def test_short_reasons_and_key_lists_are_kept_whole() -> None:
    assert bounded("denied: x") == "denied: x"
    field = argument_fields({"b": 1, "a": 2}, "hmac-sha256:" + "0" * 32)
    assert field["arg_keys"] == ["a", "b"] and "arg_keys_total" not in field
    assert field["args_size"] == len('{"b":1,"a":2}') and field["args_digest"].startswith("hmac-sha256:")


def test_the_worst_key_list_fits_the_reservation() -> None:
    args = {chr(0x10000 + i) * 10_000: i for i in range(1000)}  # long keys of 4-byte characters
    field = argument_fields(args, "hmac-sha256:" + "0" * 32)
    assert field["arg_keys_total"] == 1000
    assert len(audit.canonical(field).encode()) < audit.RESERVE_LOW // 2


def test_a_long_reason_is_cut_and_says_how_much() -> None:
    text = "e" * (MAX_AUDIT_TEXT + 123)
    cut = bounded(text)
    assert cut.startswith("e" * MAX_AUDIT_TEXT) and cut.endswith("[... 123 more characters]")


@given(st.dictionaries(st.text(max_size=600), st.integers(), max_size=400))
def test_any_argument_keys_make_a_bounded_field(args: dict[str, int]) -> None:
    field = argument_fields(args, "hmac-sha256:" + "0" * 32)
    assert len(field["arg_keys"]) <= MAX_AUDIT_KEYS
    assert len(audit.canonical(field).encode()) < audit.RESERVE_LOW // 2
    if "arg_keys_total" in field:
        assert field["arg_keys_total"] == len(args)
    else:
        assert field["arg_keys"] == sorted(args)
