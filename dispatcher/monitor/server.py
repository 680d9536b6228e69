"""Serving a monitor app until told to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

import uvicorn
from fastapi import FastAPI

log = logging.getLogger("dispatcher.monitor")  # the name its records always had


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield  # the dispatcher handles SIGINT/SIGTERM itself


async def serve(app: FastAPI, host: str, port: int, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set."""
    server = _Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off"))
    log.info("monitor listening", extra={"url": f"http://{host}:{port}/"})

    async def stopper() -> None:
        await stop.wait()
        server.should_exit = True

    watcher = asyncio.create_task(stopper())
    try:
        await server.serve()
    finally:
        watcher.cancel()
