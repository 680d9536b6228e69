"""What the monitor shows, built from the bookkeeping's reads: the API answers these views
as JSON, the pages render them."""

from __future__ import annotations

import contextlib
import shlex
from datetime import UTC, datetime
from typing import Any

from fastapi import HTTPException
from markupsafe import Markup

from dispatcher.monitor import pictures
from dispatcher.monitor.params import PAGE
from dispatcher.store import Store
from schemas.api import (
    DeadLetters,
    EventsPage,
    EventView,
    FailedEvent,
    JobDetail,
    JobView,
    TaskDetail,
    TaskView,
    WorkerView,
    WorkflowDetail,
    WorkflowSummary,
)
from schemas.joblog import job_commands
from schemas.states import terminal
from transport.interface import Transport


def replay_command(
    *, workflow: int | None = None, task: str | None = None, job: int | None = None, event: int | None = None
) -> str:
    parts = ["dispatcher", "replay"]
    for flag, value in (("--workflow", workflow), ("--task", task), ("--job", job), ("--event", event)):
        if value is not None:
            parts += [flag, shlex.quote(str(value))]
    return " ".join(parts)


def _event(row: dict[str, Any]) -> EventView:
    started, ended = row.get("started_at"), row.get("ended_at")
    duration = (ended - started).total_seconds() if started and ended else None
    return EventView(**row, duration=duration)


def _page(rows: list[dict[str, Any]], limit: int) -> EventsPage:
    """``rows`` holds one more than ``limit`` when there is a next page."""
    return EventsPage(
        events=[_event(r) for r in rows[:limit]], next=rows[limit - 1]["number"] if len(rows) > limit else None
    )


class Views:
    def __init__(self, store: Store, broker: Transport | None) -> None:
        self.store = store
        self.broker = broker

    async def workflows(self, limit: int = 50) -> list[WorkflowSummary]:
        rows = await self.store.monitor_workflows(limit)
        return [WorkflowSummary(**r, done=terminal(r["events"])) for r in rows]

    async def workflow(self, workflow_id: int, after: int = 0, status: str | None = None) -> WorkflowDetail:
        st = await self.store.workflow_status(workflow_id)
        if st is None:
            raise HTTPException(404, f"no workflow {workflow_id}")
        parents = await self.store.task_parents(workflow_id)
        tasks = [
            TaskView(**{k: t[k] for k in TaskView.model_fields if k in t}, parents=parents.get(t["id"], []))
            for t in st["tasks"]
        ]
        events: dict[str, int] = {}
        for t in tasks:
            for s, n in t.events.items():
                events[s] = events.get(s, 0) + n
        jobs = [JobView(**r) for r in await self.store.jobs_page(workflow_id, after, status, PAGE + 1)]
        return WorkflowDetail(
            id=st["id"],
            name=st["name"],
            status=st["status"],
            n_events=st["n_events"],
            done=terminal(events),
            events=events,
            submitted_at=st["submitted_at"],
            finished_at=st["finished_at"],
            tasks=tasks,
            jobs=jobs[:PAGE],
            next_job=jobs[PAGE - 1].id if len(jobs) > PAGE else None,
        )

    async def job(self, job_id: int) -> JobDetail:
        row = await self.store.monitor_job(job_id)
        if row is None:
            raise HTTPException(404, f"no job {job_id}")
        counts = await self.store.job_event_counts(job_id)
        return JobDetail(**row, events=counts)

    async def job_timeline(self, job_id: int, log: str | None) -> Markup:
        """The job's timeline picture: its attempts from the bookkeeping, its workers'
        set-ups and tear-downs from its log (when this monitor can read it)."""
        rows, total = await self.store.job_attempts(job_id, pictures.MAX_BARS)
        bars = pictures.attempt_bars(rows, datetime.now(UTC))
        for c in job_commands(log or ""):
            bars.append(
                pictures.Bar(c.worker, c.what, c.start, c.end, f"{c.what} on {c.worker}: {c.end - c.start:.3f} s")
            )
        return pictures.job_timeline(bars, left_out=total - len(rows))

    async def task(self, task_id: int) -> TaskDetail:
        row = await self.store.monitor_task(task_id)
        if row is None:
            raise HTTPException(404, f"no task {task_id}")
        return TaskDetail(**row, done=terminal(row["events"]))

    async def pictures(self, task_ids: list[int]) -> list[Markup]:
        """The tasks' progress (events ended per second), events by state over time, and
        attempts' durations: a workflow's pictures are those of all its tasks."""
        samples = pictures.totals(await self.store.count_samples(task_ids, pictures.MAX_SAMPLES))
        durations = await self.store.duration_counts(task_ids)
        drawn = [pictures.progress(samples), pictures.states(samples), pictures.durations(durations)]
        return [p for p in drawn if p]

    async def job_events(self, job_id: int, after: int, status: str | None, limit: int) -> EventsPage:
        return _page(await self.store.job_events_page(job_id, after, status, limit + 1), limit)

    async def task_events(self, task_id: int, after: int, status: str | None, limit: int) -> EventsPage:
        return _page(await self.store.task_events_page(task_id, after, status, limit + 1), limit)

    async def dead_letters(self, workflow_id: int | None = None, limit: int = 500) -> DeadLetters:
        depth = None
        if self.broker is not None:
            with contextlib.suppress(Exception):
                depth = await self.broker.queue_depth(self.broker.names.dlq)
        rows = await self.store.failed_events(workflow_id, limit)
        events = [
            FailedEvent(
                **r, replay_command=replay_command(workflow=r["workflow_id"], job=r["job_id"], event=r["number"])
            )
            for r in rows
        ]
        return DeadLetters(dlq_depth=depth, events=events, replay_all=replay_command(workflow=workflow_id))

    async def workers(self) -> list[WorkerView]:
        return [WorkerView(**r) for r in await self.store.monitor_workers()]
