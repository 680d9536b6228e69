"""Payload functions for the tests (``payloadFunction: tests.payloads:NAME``).

State that must survive a worker's death lives in marker files, named by the payload.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from pathlib import Path


def noop(payload: str) -> None:
    return None


def flaky(payload: str) -> str:
    """``ok:X`` succeeds; ``once:PATH`` fails the first time (creates PATH);
    ``until:PATH`` fails until PATH exists."""
    kind, _, arg = payload.partition(":")
    if kind == "once":
        marker = Path(arg)
        if not marker.exists():
            marker.write_text("failed once")
            raise RuntimeError(f"first try of {arg} fails")
    elif kind == "until" and not Path(arg).exists():
        raise ValueError(f"not fixed yet: {arg}")
    return f"done {payload}"


async def sleepy(payload: str) -> str:
    """``SECONDS`` or ``SECONDS:anything``: sleeps, then succeeds."""
    await asyncio.sleep(float(payload.split(":")[0]))
    return f"slept {payload}"


def deadly(payload: str) -> str:
    """``die:X`` kills the worker's process (as an OOM kill would); anything else succeeds."""
    if payload.startswith("die:"):
        os.kill(os.getpid(), signal.SIGKILL)
    return f"done {payload}"


def bad_text(payload: str) -> str:
    """Fails with text no database or log takes as is: ``nul`` (a NUL byte) or
    ``surrogate`` (a lone surrogate, which UTF-8 cannot encode)."""
    if payload == "nul":
        raise ValueError("bad\x00byte")
    if payload == "surrogate":
        raise ValueError("bad \udcff byte")
    return "fine"


def lose_work_dirs(payload: str) -> str:
    """``ROOT``: removes the jobs' work directories under ROOT, then returns a result, whose
    output file (in the work directory that is gone) cannot be written."""
    for work_dir in Path(payload).glob("job-*"):
        shutil.rmtree(work_dir, ignore_errors=True)
    return "done"
