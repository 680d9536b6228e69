"""Text rendering of workflow status (``dispatcher status`` and ``submit --wait``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg

from dispatcher.store import Store
from schemas.states import EVENT_STATES, TERMINAL, terminal


def progress(status: dict[str, Any]) -> tuple[int, int]:
    """(terminal events, all events) of a workflow."""
    return sum(terminal(t["events"]) for t in status["tasks"]), int(status["n_events"])


async def follow(store: Store, workflow_id: int) -> AsyncIterator[dict[str, Any]]:
    """The workflow's status now, then again on every bookkeeping NOTIFY about it (at most
    twice a second), until it ends; the last one yielded is its end state."""
    changed = asyncio.Event()
    conn = await asyncpg.connect(store.dsn)
    await conn.add_listener("dispatcher_progress", lambda *a: changed.set() if a[3] == str(workflow_id) else None)
    try:
        while True:
            status = await store.workflow_status(workflow_id)
            assert status is not None
            yield status
            if status["status"] in TERMINAL:
                return
            try:  # the timeout only guards against a lost notification
                await asyncio.wait_for(changed.wait(), 5.0)
            except TimeoutError:
                pass
            changed.clear()
            await asyncio.sleep(0.5)
    finally:
        await conn.close()


def render(status: dict[str, Any]) -> str:
    done, total = progress(status)
    lines = [f"workflow {status['id']} {status['name']!r}: {status['status']}  {done}/{total} events done"]
    width = max(len(t["label"]) for t in status["tasks"])
    for t in status["tasks"]:
        events = " ".join(f"{s}={t['events'][s]}" for s in EVENT_STATES if t["events"].get(s))
        jobs = " ".join(f"{s}={n}" for s, n in sorted(t["jobs"].items()))
        es = f"ES x{t['max_payloads_per_job']}" if t["event_service"] else "no ES"
        lines.append(f"  {t['label']:<{width}}  {t['status']:<9} {es:<8} events: {events or '-'}  jobs: {jobs or '-'}")
    return "\n".join(lines)


def progress_line(status: dict[str, Any]) -> str:
    done, total = progress(status)
    counts: dict[str, int] = {}
    for t in status["tasks"]:
        for s, n in t["events"].items():
            counts[s] = counts.get(s, 0) + n
    width = 30
    filled = int(width * done / total) if total else width
    detail = " ".join(f"{s}={counts[s]}" for s in EVENT_STATES if counts.get(s))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {status['status']} ({detail})"
