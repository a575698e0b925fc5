"""Fair sharing of one server: at most ``slots`` calls sent at once, the rest served round-robin by caller.

A server that handles one request at a time (``concurrency = 1``) or a
few would otherwise serve callers in arrival order, so one agent's burst
would starve another. Waiting calls queue per caller; a freed slot goes to
the caller after the one served last, so each caller gets a turn before
any caller gets a second. The uncontended path takes no lock and no task.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import OrderedDict, deque


class FairQueue:
    """Slots of one server, handed out round-robin across callers."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.busy = 0
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        #: the caller served last: it waits for everyone else's turn before its next
        self._last: str | None = None

    @property
    def waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    async def acquire(self, caller: str) -> None:
        """Wait for a slot (cancellable: a cancelled wait takes none)."""
        if self.busy < self.slots and not self._waiting:
            self.busy += 1
            self._last = caller
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(caller, deque()).append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # the slot was handed over just as the wait was cancelled
                self.release()
            else:
                self._forget(caller, fut)
            raise

    def release(self) -> None:
        """Give a slot back: to the next caller's oldest waiting call, or free."""
        if self.busy > self.slots:  # fewer slots since it was taken
            self.busy -= 1
            return
        while self._waiting:
            if len(self._waiting) > 1 and next(iter(self._waiting)) == self._last:
                self._waiting.move_to_end(self._last)
            caller, queue = next(iter(self._waiting.items()))
            fut = queue.popleft()
            if queue:
                self._waiting.move_to_end(caller)  # its next call waits for every other caller's turn
            else:
                del self._waiting[caller]
            if not fut.done():
                fut.set_result(None)  # the slot passes on: busy stays the same
                self._last = caller
                return
        self.busy -= 1

    def resize(self, slots: int) -> None:
        """New ``concurrency``: more slots wake waiters now; fewer take effect as calls end."""
        self.slots = slots
        while self._waiting and self.busy < self.slots:
            self.busy += 1
            self.release()

    def _forget(self, caller: str, fut: asyncio.Future[None]) -> None:
        queue = self._waiting.get(caller)
        if queue is not None:
            with contextlib.suppress(ValueError):
                queue.remove(fut)
            if not queue:
                del self._waiting[caller]


__all__ = ["FairQueue"]
