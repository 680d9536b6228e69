"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from transport.interface import Transport

T = TypeVar("T")


async def eventually(check: Callable[[], Awaitable[T]], *, timeout: float = 20.0, what: str = "condition") -> T:
    """Wait until ``check()`` returns something truthy (the test's own wait, not product code)."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {result!r})")
        await asyncio.sleep(0.05)


async def queue_gone(broker: Transport, name: str) -> bool:
    return await broker.queue_state(name) is None
