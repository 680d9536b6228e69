"""``dispatcher status ID --watch``: live progress bars in the terminal (rich), redrawn
on every bookkeeping NOTIFY of the workflow."""

from __future__ import annotations

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from dispatcher.status import follow, progress
from dispatcher.store import Store
from schemas.states import EVENT_STATES, terminal


def _detail(events: dict[str, int]) -> str:
    return " ".join(f"{s}={events[s]}" for s in EVENT_STATES if events.get(s))


async def watch_workflow(store: Store, workflow_id: int) -> int:
    """Returns 0 if the workflow finished, 1 if it failed or was cancelled."""
    bars = Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
    rows: dict[str, TaskID] = {}
    with Live(bars, console=bars.console, refresh_per_second=4):
        async for st in follow(store, workflow_id):
            for t in st["tasks"]:
                if t["label"] not in rows:
                    rows[t["label"]] = bars.add_task(t["label"], total=t["n_events"], detail="")
                bars.update(
                    rows[t["label"]], completed=terminal(t["events"]), detail=f"{t['status']:<9} {_detail(t['events'])}"
                )
    done, total = progress(st)
    bars.console.print(f"workflow {workflow_id}: {st['status']} ({done}/{total} events done)")
    return 0 if st["status"] == "finished" else 1
