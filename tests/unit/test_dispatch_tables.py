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


def test_no_gate_op_decides_what_only_the_operator_may() -> None:
    """An agent's gate can propose a server and approve nothing: deciding ops exist on admin.sock only."""
    deciding = {"approve", "reject", "unfreeze", "pin_accept", "reload", "proposal_decide"}
    assert deciding <= set(wire.ADMIN_OPS)
    assert not deciding & set(wire.OPS)
    assert {"propose", "proposals"} <= set(wire.OPS)
    assert GATE_ROUTES["propose"].peers == GATE_ROUTES["proposals"].peers == frozenset({"gate"})
    assert ADMIN_ROUTES["proposals"].peers == ADMIN_ROUTES["proposal_decide"].peers == frozenset({"root"})
