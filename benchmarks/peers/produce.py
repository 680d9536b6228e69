"""A peer's producer, as its own process: ``python -m benchmarks.peers.produce MODULE N``.

It imports the peer's app and connects (``prepare``), prints "ready", waits for "go" on
stdin, publishes N tasks with the peer's own client (``produce``), prints one JSON line
(publish start and end, its CPU seconds while publishing), then stays until stdin closes,
so that the benchmark reads its CPU use while it is alive."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import resource
import sys
import time
from typing import Any


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def report(t0: float, c0: float) -> None:
    print(json.dumps({"publish_start": t0, "publish_end": time.time(), "cpu_s": cpu() - c0}), flush=True)


async def run_async(app: Any, n: int) -> None:
    await app.prepare()
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    if (await loop.run_in_executor(None, sys.stdin.readline)).strip() != "go":
        return
    c0, t0 = cpu(), time.time()
    await app.produce(n)
    report(t0, c0)
    await loop.run_in_executor(None, sys.stdin.read)


def main() -> None:
    module, n = sys.argv[1], int(sys.argv[2])
    app = importlib.import_module(f"benchmarks.peers.{module}")
    if inspect.iscoroutinefunction(app.produce):
        asyncio.run(run_async(app, n))
        return
    app.prepare()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return
    c0, t0 = cpu(), time.time()
    app.produce(n)
    report(t0, c0)
    sys.stdin.read()


if __name__ == "__main__":
    main()
