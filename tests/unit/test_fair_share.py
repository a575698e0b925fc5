"""One agent cannot hurt another at a shared server: fair turns, and a timeout that ends only its own call.

The server here is a fake upstream that handles one request at a time, as
many stdio servers do: a ping waits behind the call being worked on.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import mcp
import pytest

from broker.core.errors import TempFail
from broker.core.servers import ServerDef
from broker.daemon.config import Server
from broker.daemon.limits import Holdings, Quota, Refusals
from broker.daemon.upstream.fair import FairQueue
from broker.daemon.upstream.handle import ServerHandle


class Sequential:
    """An upstream serving one request at a time; ``obeys`` False: it ignores a cancel and works on."""

    def __init__(self, obeys: bool = True) -> None:
        self.lock = asyncio.Lock()
        self.obeys = obeys
        self.pings = 0
        self.served: list[str] = []

    async def call_tool(self, name: str, arguments: dict[str, Any], timeout: float, progress: Any = None) -> Any:
        await self.lock.acquire()
        try:
            await asyncio.sleep(float(arguments.get("seconds", 0)))
        except asyncio.CancelledError:
            if not self.obeys:  # it goes on working: the lock stays taken for the rest of the work
                loop = asyncio.get_running_loop()
                loop.call_later(float(arguments.get("seconds", 0)), self.lock.release)
                raise
            self.lock.release()
            raise
        self.lock.release()
        self.served.append(str(arguments.get("who", name)))
        return mcp.types.CallToolResult(content=[mcp.types.TextContent(type="text", text="done")])

    async def send_ping(self) -> None:
        self.pings += 1
        async with self.lock:
            return


def handle_for(client: Sequential, concurrency: int = 16, grace: float = 30.0) -> ServerHandle:
    spec = ServerDef(name="seq", source="test", command="/bin/true", concurrency=concurrency)
    handle = ServerHandle(
        Server("seq", "test", spec),
        spawner=None,
        connect_timeout=5,
        backoff_max=1,
        errlog=lambda _line: None,
        cancel_grace=grace,
    )
    handle.client = client  # type: ignore[assignment]
    handle.state = "up"
    return handle


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_timeout_never_restarts_a_server_busy_with_another_callers_call() -> None:
    async def go() -> tuple[Any, bool]:
        fake = Sequential()
        h = handle_for(fake, grace=1.0)
        # the victim's call outlasts both the grace and the old rule's 5 s ping, which restarted the server
        other = asyncio.ensure_future(h.call("t", {"seconds": 5.5, "who": "victim"}, 20, caller="victim"))
        await asyncio.sleep(0.05)
        with pytest.raises(TempFail, match="timed out"):
            await h.call("t", {"seconds": 5, "who": "attacker"}, 0.3, caller="attacker")
        result = await other
        await asyncio.sleep(0.5)
        return result, h._broken.is_set()

    result, broken = run(go())
    assert result.content[0].text == "done"  # the other caller's call ran to its end
    assert not broken


def test_a_server_ignoring_a_cancel_is_restarted_after_the_grace_when_idle() -> None:
    async def go() -> tuple[bool, str, float]:
        fake = Sequential(obeys=False)
        h = handle_for(fake, grace=0.5)
        started = time.monotonic()
        with pytest.raises(TempFail):
            await h.call("t", {"seconds": 30}, 0.2, caller="a")
        while not h._broken.is_set() and time.monotonic() - started < 5:
            await asyncio.sleep(0.05)
        return h._broken.is_set(), h.reason, time.monotonic() - started

    broken, reason, took = run(go())
    assert broken and "ignored a cancel for 0.5 s" in reason
    assert took < 2.5


def test_a_server_obeying_a_cancel_is_kept() -> None:
    async def go() -> tuple[bool, int]:
        fake = Sequential(obeys=True)
        h = handle_for(fake, grace=0.5)
        with pytest.raises(TempFail):
            await h.call("t", {"seconds": 30}, 0.2, caller="a")
        await asyncio.sleep(1.0)
        return h._broken.is_set(), fake.pings

    broken, pings = run(go())
    assert not broken and pings == 1  # checked once, idle, and it answered


def test_a_one_at_a_time_server_gets_no_call_until_a_cancelled_one_has_let_go() -> None:
    async def go() -> tuple[list[str], float]:
        fake = Sequential(obeys=False)
        h = handle_for(fake, concurrency=1, grace=5)
        with pytest.raises(TempFail):
            await h.call("t", {"seconds": 1.0, "who": "slow"}, 0.2, caller="a")
        sent = time.monotonic()
        await h.call("t", {"seconds": 0, "who": "next"}, 10, caller="b")
        return fake.served, time.monotonic() - sent

    served, waited = run(go())
    assert served == ["next"]
    assert waited > 0.5  # it waited (in the daemon, not behind the stuck call at the server) for the ping


def test_calls_to_a_busy_server_take_turns_by_caller() -> None:
    async def go() -> list[str]:
        fake = Sequential()
        h = handle_for(fake, concurrency=1)
        burst = [
            asyncio.ensure_future(h.call("t", {"seconds": 0.05, "who": f"flood{n}"}, 30, caller="flood"))
            for n in range(8)
        ]
        await asyncio.sleep(0.01)
        victim = asyncio.ensure_future(h.call("t", {"seconds": 0, "who": "victim"}, 30, caller="victim"))
        await asyncio.gather(*burst, victim)
        return fake.served

    served = run(go())
    assert served.index("victim") == 1  # right after the call being served; arrival order made it 9th


def test_fair_queue_hands_slots_round_robin_and_forgets_cancelled_waits() -> None:
    async def go() -> list[str]:
        q = FairQueue(1)
        order: list[str] = []
        await q.acquire("a")

        async def one(caller: str, tag: str) -> None:
            await q.acquire(caller)
            order.append(tag)
            await asyncio.sleep(0)
            q.release()

        tasks = [asyncio.ensure_future(one("a", f"a{n}")) for n in range(3)]
        tasks += [asyncio.ensure_future(one("b", f"b{n}")) for n in range(2)]
        gone = asyncio.ensure_future(one("c", "c-cancelled"))
        await asyncio.sleep(0.01)
        gone.cancel()
        await asyncio.sleep(0.01)
        q.release()
        await asyncio.gather(*tasks)
        assert q.busy == 0 and q.waiting == 0
        return order

    assert run(go()) == ["b0", "a0", "b1", "a1", "a2"]  # "a" held the slot: "b" has the next turn


QUOTA = Quota(sessions=2, connections=3, calls=2, approvals=1, audit_bytes=1000, audit_window=10)


def test_holdings_refuse_beyond_each_quota_and_release() -> None:
    h = Holdings()
    h.take_connection("a", 100, QUOTA)
    h.take_connection("a", 100, QUOTA)
    h.take_connection("a", 101, QUOTA)
    with pytest.raises(TempFail, match="max_connections"):
        h.take_connection("a", 101, QUOTA)
    h.drop_connection("a", 100)
    with pytest.raises(TempFail, match="max_sessions"):
        h.take_connection("a", 102, QUOTA)  # a third gate process
    h.take_connection("b", 200, QUOTA)  # another caller is not touched
    h.take_call("a", QUOTA)
    h.take_call("a", QUOTA)
    with pytest.raises(TempFail, match="max_calls_in_flight"):
        h.take_call("a", QUOTA)
    h.take_call("b", QUOTA)
    h.drop_call("a")
    h.take_call("a", QUOTA)
    for pid in (100, 101, 101):
        h.drop_connection("a", pid)
    assert "a" not in h.pids and h.connections["a"] == 0


def test_the_audit_budget_throttles_then_refills() -> None:
    h = Holdings()
    quota = Quota(sessions=2, connections=3, calls=2, approvals=1, audit_bytes=1000, audit_window=1)
    h.check_audit("a", quota)
    h.spend_audit("a", 1200, quota)
    with pytest.raises(TempFail, match=r"audit_bytes_per_window.*retry in \d+ s"):
        h.check_audit("a", quota)
    h.check_audit("b", quota)
    time.sleep(0.5)
    h.check_audit("a", quota)  # half a window later, half the budget is back


def test_refusals_of_a_burst_become_one_record_and_a_summary() -> None:
    r = Refusals()
    assert r.note("a", "calls", "x", now=0.0) is True
    assert [r.note("a", "calls", f"x{n}", now=1.0) for n in range(5)] == [False] * 5
    assert r.note("b", "calls", "y", now=1.0) is True
    assert r.due(now=5.0) == []
    assert r.due(now=11.0) == [("a", "calls", 5, "x4")]
    assert r.note("a", "calls", "again", now=12.0) is True


def test_large_requests_of_one_caller_wait_for_its_read_budget_and_others_do_not() -> None:
    from broker.daemon import limits

    async def go() -> list[str]:
        h = Holdings()
        big = 3 * 1024 * 1024  # three of them exceed the 8 MiB budget
        order: list[str] = []
        taken = [await h.take_reading("a", big) for _ in range(2)]
        assert await h.take_reading("a", 1000) == 0  # small frames are never held back

        async def third() -> None:
            t = await h.take_reading("a", big)
            order.append("a3")
            h.drop_reading("a", t)

        waiting = asyncio.ensure_future(third())
        other = await h.take_reading("b", big)  # another caller has its own budget
        order.append("b")
        await asyncio.sleep(0.05)
        assert order == ["b"] and h.reading["a"] == 2 * big
        h.drop_reading("a", taken[0])
        await waiting
        h.drop_reading("a", taken[1])
        h.drop_reading("b", other)
        assert not h.reading and limits.READ_BUDGET == 8 * 1024 * 1024
        return order

    assert run(go()) == ["b", "a3"]
