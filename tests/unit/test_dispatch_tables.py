"""The daemon's dispatch tables match the protocol's closed op sets, and say who may send each op."""

from __future__ import annotations

import inspect

from broker.core import wire
from broker.daemon.service import ADMIN_ROUTES, GATE_ROUTES


def test_every_gate_op_has_exactly_one_handler() -> None:
    assert set(GATE_ROUTES) == set(wire.OPS)


def test_every_admin_op_has_exactly_one_handler() -> None:
    assert set(ADMIN_ROUTES) == set(wire.ADMIN_OPS)


def test_admin_ops_are_for_root_only() -> None:
    assert {peer for route in ADMIN_ROUTES.values() for peer in route.peers} == {"root"}


def test_handlers_are_coroutines_of_the_right_shape() -> None:
    for op, route in GATE_ROUTES.items():
        assert inspect.iscoroutinefunction(route.handler), op
        assert list(inspect.signature(route.handler).parameters) == ["self", "req", "ctx", "conn"], op
    for op, route in ADMIN_ROUTES.items():
        assert inspect.iscoroutinefunction(route.handler), op
        assert list(inspect.signature(route.handler).parameters) == ["self", "req"], op
