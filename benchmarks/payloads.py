"""Payloads for the benchmarks (``payloadFunction: benchmarks.payloads:NAME``)."""

from __future__ import annotations

import asyncio


def noop(payload: str) -> None:
    return None


async def sleep50(payload: str) -> None:
    await asyncio.sleep(0.05)
