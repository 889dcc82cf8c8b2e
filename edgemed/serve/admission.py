"""Who generates when: a slot per model instance, a bounded queue in front of the slots (429 when full), and a
ticket per request that gives back whatever the request still holds, however it ends.

One model instance serves one request at a time (it holds one KV cache and is driven by one thread at a time),
so there are exactly as many slots as instances; concurrency comes from replicas, which the server opens itself.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from edgemed.serve.schema import ApiError

if TYPE_CHECKING:
    from edgemed.backends.base import Backend

log = logging.getLogger("edgemed.serve")


def slot_count(asked: int, given: Backend | None) -> int:
    """Generations at once, and so model instances: one per ``--max-concurrency`` slot when the server opens the
    model, one when the caller gave an open backend (a single instance)."""
    if given is None or asked == 1:
        return asked
    log.warning("the %s backend was opened by the caller and runs one generation at a time; "
                "--max-concurrency %d acts as 1", given.name, asked)
    return 1


class Gate:
    """At most ``slots`` generations at once and ``max_queue`` waiting; lives in the event loop (no locks)."""

    def __init__(self, slots: int, max_queue: int):
        self.slots, self.max_queue = slots, max_queue
        self.running = 0
        self.waiting = 0
        self.sem = asyncio.Semaphore(slots)

    def ticket(self) -> Ticket:
        """A place in the queue, or a 429 when every slot and place is taken."""
        if self.running + self.waiting >= self.slots + self.max_queue:
            raise ApiError(429, f"the server is busy ({self.running} running, {self.waiting} waiting, queue bound "
                           f"{self.max_queue}); retry shortly", "queue_full", "rate_limit_error")
        return Ticket(self)

    def leave(self) -> None:
        self.running -= 1
        self.sem.release()


class Ticket:
    """One request's place: waiting, then admitted (holds a slot), then handed to the worker, which gives it back.

    ``close()`` undoes whatever the request still holds, so a request that ends at any point (disconnect,
    timeout, an error before its generation started) never leaks a place or a slot.
    """

    def __init__(self, gate: Gate):
        gate.waiting += 1
        self.gate, self.state = gate, "waiting"

    async def admit(self, deadline: float, timeout: float) -> None:
        """Wait for a generation slot; 504 past the deadline (``timeout``, the request's limit, is for the message)."""
        try:
            await asyncio.wait_for(self._acquire(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise ApiError(504, f"the request waited longer than {timeout:g} s for a free slot; try again later",
                           "timeout") from None

    async def _acquire(self) -> None:
        try:
            await self.gate.sem.acquire()
        except BaseException:
            self.close()
            raise
        self.gate.waiting -= 1
        self.gate.running += 1
        self.state = "admitted"

    def hand_over(self) -> None:
        self.state = "handed"

    def close(self) -> None:
        if self.state == "waiting":
            self.gate.waiting -= 1
        elif self.state == "admitted":
            self.gate.leave()
        if self.state != "handed":
            self.state = "closed"
