"""The monitor's JSON API (what its pages show), described in its OpenAPI document."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class WorkflowSummary(BaseModel):
    id: int
    name: str
    status: str
    n_events: int
    done: int  # events in a terminal state
    events: dict[str, int]  # by state
    submitted_at: datetime
    finished_at: datetime | None = None


class TaskView(BaseModel):
    id: int
    label: str
    status: str
    parents: list[str]
    event_service: bool
    max_payloads_per_job: int
    n_events: int
    n_jobs: int
    events: dict[str, int]
    jobs: dict[str, int]
    released_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class JobView(BaseModel):
    id: int
    label: str
    seq: int
    status: str
    n_events: int
    first_number: int
    last_number: int
    log_path: str | None = None
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None


class WorkflowDetail(WorkflowSummary):
    tasks: list[TaskView]
    jobs: list[JobView]  # the first page; more at /api/workflows/{id}/jobs
    next_job: int | None = None  # pass as ?after= for the next page


class EventView(BaseModel):
    job_id: int | None = None
    number: int
    payload: str
    status: str
    attempt: int
    worker: str | None = None
    started_at: datetime | None = None
    ended_at: datetime | None = None
    duration: float | None = None  # seconds
    exit_code: int | None = None
    error: str | None = None
    replays: int = 0


class EventsPage(BaseModel):
    events: list[EventView]
    next: int | None = None  # pass as ?after= for the next page


class JobDetail(JobView):
    workflow_id: int
    workflow: str
    task_id: int
    walltime: float | None = None
    events: dict[str, int]


class FailedEvent(BaseModel):
    workflow_id: int
    label: str
    job_id: int
    number: int
    payload: str
    attempt: int
    worker: str | None = None
    ended_at: datetime | None = None
    error: str | None = None
    replay_command: str


class DeadLetters(BaseModel):
    dlq_depth: int | None  # messages in es.dlq (None: RabbitMQ unreachable)
    events: list[FailedEvent]
    replay_all: str


class WorkerView(BaseModel):
    id: str
    host: str
    pid: int
    slots: int
    status: str
    jobs: list[int]
    events_done: int
    started_at: datetime
    last_seen: datetime


class ReplayRequest(BaseModel):
    workflow: int | None = None
    task: str | None = None
    job: int | None = None
    event: int | None = None
    reason: str | None = None
    limit: int | None = None
    dry_run: bool = False


class ActionResult(BaseModel):
    ok: bool
    detail: str
    lines: list[str] = []
