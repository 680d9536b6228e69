"""``dispatcher status ID --watch``: live progress bars in the terminal (rich), redrawn
on every bookkeeping NOTIFY of the workflow."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from dispatcher.status import EVENT_STATES, TERMINAL_WORKFLOW, progress
from dispatcher.store import Store


def _detail(events: dict[str, int]) -> str:
    return " ".join(f"{s}={events[s]}" for s in (*EVENT_STATES, "retrying") if events.get(s))


async def watch_workflow(store: Store, workflow_id: int) -> int:
    """Returns 0 if the workflow finished, 1 if it failed or was cancelled."""
    changed = asyncio.Event()
    conn = await asyncpg.connect(store.dsn)
    await conn.add_listener("dispatcher_progress", lambda *a: changed.set() if a[3] == str(workflow_id) else None)
    bars = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    rows: dict[str, TaskID] = {}
    try:
        with Live(bars, console=bars.console, refresh_per_second=4):
            while True:
                st: dict[str, Any] | None = await store.workflow_status(workflow_id)
                assert st is not None
                for t in st["tasks"]:
                    done = sum(t["events"].get(s, 0) for s in ("finished", "failed", "cancelled"))
                    if t["label"] not in rows:
                        rows[t["label"]] = bars.add_task(t["label"], total=t["n_events"], detail="")
                    bars.update(rows[t["label"]], completed=done, detail=f"{t['status']:<9} {_detail(t['events'])}")
                if st["status"] in TERMINAL_WORKFLOW:
                    break
                try:  # the timeout only guards against a lost notification
                    await asyncio.wait_for(changed.wait(), 5.0)
                except TimeoutError:
                    pass
                changed.clear()
                await asyncio.sleep(0.25)
        done, total = progress(st)
        bars.console.print(f"workflow {workflow_id}: {st['status']} ({done}/{total} events done)")
        return 0 if st["status"] == "finished" else 1
    finally:
        await conn.close()
