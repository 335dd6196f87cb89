"""How many requests generate at once, and how many may wait for a turn.

A request beyond `running` waits for a slot, at most `queue_timeout` seconds and behind at
most `max_waiting` others; past either bound it is refused with 503 and Retry-After, so an
overloaded server says so at once instead of holding connections until clients time out.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass

from qlora.serve.engine import RequestError


@dataclass
class Admission:
    running: int = 1
    max_waiting: int = 16
    queue_timeout: float = 30.0

    def __post_init__(self) -> None:
        if self.running < 1 or self.max_waiting < 0 or self.queue_timeout < 0:
            raise ValueError("running >= 1, max_waiting >= 0, queue_timeout >= 0")
        self._slots = asyncio.Semaphore(self.running)
        self.active = 0
        self.waiting = 0

    def _busy(self, why: str) -> RequestError:
        retry = max(1, math.ceil(self.queue_timeout)) if self.queue_timeout else 1
        return RequestError(
            f"the server is busy ({self.running} running, {why}); retry later",
            status=503,
            code="server_busy",
            type_="server_error",
            headers={"Retry-After": str(retry)},
        )

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        if self._slots.locked():
            if self.waiting >= self.max_waiting:
                raise self._busy(f"{self.waiting} waiting")
            self.waiting += 1
            try:
                await asyncio.wait_for(self._slots.acquire(), self.queue_timeout)
            except TimeoutError:
                raise self._busy(f"no slot within {self.queue_timeout:g} s") from None
            finally:
                self.waiting -= 1
        else:
            await self._slots.acquire()
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1
            self._slots.release()
