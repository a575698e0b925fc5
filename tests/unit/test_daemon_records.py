"""Unit tests for the bounds on what the daemon puts in an audit record.

Every record must fit in the space the log keeps reserved past its end
(``audit.RESERVE_LOW``), whatever an agent sends or a server answers: long
reasons are cut with a count, and argument key lists are capped with their
total kept.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from broker import audit
from broker.daemon import MAX_AUDIT_KEYS, MAX_AUDIT_TEXT, _arg_keys, _bounded


def test_short_reasons_and_key_lists_are_kept_whole() -> None:
    assert _bounded("denied: x") == "denied: x"
    assert _arg_keys({"b": 1, "a": 2}) == {"arg_keys": ["a", "b"]}


def test_the_worst_key_list_fits_the_reservation() -> None:
    args = {chr(0x10000 + i) * 10_000: i for i in range(1000)}  # long keys of 4-byte characters
    field = _arg_keys(args)
    assert field["arg_keys_total"] == 1000
    assert len(audit.canonical(field).encode()) < audit.RESERVE_LOW // 2


def test_a_long_reason_is_cut_and_says_how_much() -> None:
    text = "e" * (MAX_AUDIT_TEXT + 123)
    cut = _bounded(text)
    assert cut.startswith("e" * MAX_AUDIT_TEXT) and cut.endswith("[... 123 more characters]")


@given(st.dictionaries(st.text(max_size=600), st.integers(), max_size=400))
def test_any_argument_keys_make_a_bounded_field(args: dict[str, int]) -> None:
    field = _arg_keys(args)
    assert len(field["arg_keys"]) <= MAX_AUDIT_KEYS
    assert len(audit.canonical(field).encode()) < audit.RESERVE_LOW // 2
    if "arg_keys_total" in field:
        assert field["arg_keys_total"] == len(args)
    else:
        assert field["arg_keys"] == sorted(args)
